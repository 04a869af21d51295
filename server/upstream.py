"""Upstream generation engines the sidecar attaches to (GuardedGeneration).

One interface: ``generate`` yields token deltas as the engine produces them; closing the
generator (``aclose``) aborts the upstream request. Adapters:

- ``VllmHttpUpstream``: vLLM's OpenAI-compatible server, ``/v1/completions`` with the prompt as
  token ids, ``stream`` and ``return_token_ids`` (token ids in and out, no re-tokenisation);
  abort by closing the connection.
"""

from __future__ import annotations

import asyncio
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


class VllmGrpcUpstream:
    """vLLM's gRPC server (``vllm.entrypoints.launchers.grpc_server``; stubs from PyPI
    ``smg-grpc-proto``, service ``VllmEngine``): token ids in and out. Abort: the ``Abort`` RPC,
    then the stream is read (briefly) for vLLM's ``finish_reason`` and the call is cancelled as a
    backstop. ``finish_reasons`` keeps what vLLM reported per request id."""

    name = "vllm-grpc"

    def __init__(self, target: str, *, abort_wait_s: float = 2.0) -> None:
        import grpc
        from smg_grpc_proto import vllm_engine_pb2, vllm_engine_pb2_grpc

        self._grpc = grpc
        self._pb = vllm_engine_pb2
        self._channel = grpc.aio.insecure_channel(target)
        self._stub = vllm_engine_pb2_grpc.VllmEngineStub(self._channel)
        self.abort_wait_s = abort_wait_s
        self.finish_reasons: dict[str, str] = {}

    async def close(self) -> None:
        await self._channel.close()

    async def generate(
        self, request_id: str, prompt_ids: list[int], sampling: Sampling
    ) -> AsyncIterator[UpstreamDelta]:
        pb = self._pb
        params = pb.SamplingParams(
            temperature=sampling.temperature,
            top_p=sampling.top_p or 1.0,
            max_tokens=sampling.max_tokens,
            stop=list(sampling.stop),
            n=1,
        )
        if sampling.seed is not None:
            params.seed = sampling.seed
        call = self._stub.Generate(
            pb.GenerateRequest(
                request_id=request_id,
                tokenized=pb.TokenizedInput(input_ids=prompt_ids),
                sampling_params=params,
                stream=True,
            )
        )
        finished = False
        try:
            async for response in call:
                if response.WhichOneof("response") == "chunk":
                    yield UpstreamDelta(list(response.chunk.token_ids), "", None)
                else:
                    finished = True
                    self.finish_reasons[request_id] = response.complete.finish_reason
                    yield UpstreamDelta([], "", response.complete.finish_reason)
                    return
        except self._grpc.aio.AioRpcError as exc:
            if exc.code() != self._grpc.StatusCode.CANCELLED:
                raise UpstreamError(f"vLLM gRPC stream failed: {exc.code().name}: {exc.details()}") from None
        finally:
            if not finished:
                await self._abort(call, request_id)

    async def _abort(self, call, request_id: str) -> None:
        """Abort RPC, then wait briefly for vLLM's final message (finish_reason), then cancel."""
        try:
            await self._stub.Abort(self._pb.AbortRequest(request_ids=[request_id]), timeout=5)

            async def final_reason() -> None:
                async for response in call:
                    if response.WhichOneof("response") == "complete":
                        self.finish_reasons[request_id] = response.complete.finish_reason
                        return

            await asyncio.wait_for(final_reason(), self.abort_wait_s)
        except (self._grpc.aio.AioRpcError, TimeoutError):
            pass
        finally:
            call.cancel()
