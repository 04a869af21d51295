"""Upstream generation engines the sidecar attaches to (GuardedGeneration).

One interface: ``generate`` yields token deltas as the engine produces them; closing the
generator (``aclose``) aborts the upstream request. Adapters:

- ``VllmHttpUpstream``: vLLM's OpenAI-compatible server, ``/v1/completions`` with the prompt as
  token ids, ``stream`` and ``return_token_ids`` (token ids in and out, no re-tokenisation);
  abort by closing the connection.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

import httpx


@dataclass(frozen=True)
class UpstreamDelta:
    token_ids: list[int]
    text: str
    finish_reason: str | None  # set on the last delta: stop, length, abort, ...


class UpstreamError(RuntimeError):
    """The upstream refused the request, failed midway, or timed out."""


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_p: float | None = None
    max_tokens: int = 256
    seed: int | None = None
    stop: tuple[str, ...] = ()


class Upstream(Protocol):
    name: str

    def generate(self, request_id: str, prompt_ids: list[int], sampling: Sampling) -> AsyncIterator[UpstreamDelta]: ...

    async def close(self) -> None: ...


class VllmHttpUpstream:
    name = "vllm-http"

    def __init__(self, base_url: str, *, model: str | None = None, timeout_s: float = 60.0) -> None:
        self.base = base_url.rstrip("/").removesuffix("/v1")
        self.model = model
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=5.0))

    async def close(self) -> None:
        await self._client.aclose()

    async def _model_name(self) -> str:
        if self.model is None:
            try:
                response = await self._client.get(self.base + "/v1/models")
                response.raise_for_status()
            except httpx.HTTPError as exc:
                raise UpstreamError(f"cannot list models at {self.base}: {type(exc).__name__}: {exc}") from None
            self.model = response.json()["data"][0]["id"]
        return self.model

    async def generate(
        self, request_id: str, prompt_ids: list[int], sampling: Sampling
    ) -> AsyncIterator[UpstreamDelta]:
        body = {
            "model": await self._model_name(),
            "prompt": prompt_ids,
            "stream": True,
            "return_token_ids": True,
            "max_tokens": sampling.max_tokens,
            "temperature": sampling.temperature,
            "stream_options": {"include_usage": False},
        }
        if sampling.top_p:
            body["top_p"] = sampling.top_p
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        if sampling.stop:
            body["stop"] = list(sampling.stop)
        try:
            async with self._client.stream(
                "POST", self.base + "/v1/completions", json=body, headers={"X-Request-Id": request_id}
            ) as response:
                if response.status_code != 200:
                    detail = (await response.aread()).decode(errors="replace")[:300]
                    raise UpstreamError(f"vLLM answered HTTP {response.status_code}: {detail}")
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: ") :]
                    if data == "[DONE]":
                        return
                    choice = json.loads(data)["choices"][0]
                    yield UpstreamDelta(
                        list(choice.get("token_ids") or []), choice.get("text") or "", choice.get("finish_reason")
                    )
        except httpx.HTTPError as exc:  # refused, reset midway, timed out
            raise UpstreamError(f"vLLM stream failed: {type(exc).__name__}: {exc}") from None
