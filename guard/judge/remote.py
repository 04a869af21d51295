"""The remote Generative Qwen3Guard backend: any OpenAI-compatible chat endpoint (vLLM serving
Qwen3Guard-Gen), greedy, with a timeout, retries with exponential backoff on transport errors,
429 and 5xx, and a limit on concurrent requests."""

from __future__ import annotations

import asyncio
import time

import httpx

from guard.judge.judgment import Judgment, mode_of, parse_output


class JudgeUnavailable(RuntimeError):
    """The endpoint could not be reached, timed out, or kept failing after the retries."""


class RemoteJudge:
    def __init__(
        self,
        endpoint: str,
        *,
        model: str | None = None,
        timeout_s: float = 10.0,
        retries: int = 2,
        backoff_s: float = 0.2,
        concurrency: int = 16,
        max_tokens: int = 128,
    ) -> None:
        self.base = endpoint.rstrip("/").removesuffix("/v1")
        self.model = model
        self.timeout_s, self.retries, self.backoff_s, self.max_tokens = timeout_s, retries, backoff_s, max_tokens
        self._limit = asyncio.Semaphore(concurrency)
        self._client: httpx.AsyncClient | None = None

    async def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout_s)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    async def _model_name(self) -> str:
        if self.model is None:
            response = await self._request("GET", "/v1/models")
            self.model = response["data"][0]["id"]
        return self.model

    async def _request(self, method: str, path: str, payload: dict | None = None) -> dict:
        client = await self._http()
        error = "no attempt"
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                response = await client.request(method, self.base + path, json=payload)
            except httpx.TransportError as exc:  # refused, reset, timed out
                error = f"{type(exc).__name__}: {exc}"
                continue
            if response.status_code == 429 or response.status_code >= 500:
                error = f"HTTP {response.status_code}"
                continue
            if response.status_code >= 400:
                raise JudgeUnavailable(f"{self.base}{path} answered HTTP {response.status_code}: {response.text[:200]}")
            return response.json()
        raise JudgeUnavailable(f"{self.base}{path} failed after {self.retries + 1} attempts ({error})")

    async def classify(self, messages: list[dict]) -> Judgment:
        """One chat completion at temperature 0, parsed with the official patterns."""
        async with self._limit:
            started = time.perf_counter()
            body = {
                "model": await self._model_name(),
                "messages": messages,
                "temperature": 0.0,
                "max_tokens": self.max_tokens,
            }
            reply = await self._request("POST", "/v1/chat/completions", body)
            text = reply["choices"][0]["message"]["content"] or ""
        mode = mode_of(messages)
        risk, categories, refusal = parse_output(text, mode)
        return Judgment(mode, risk, categories, refusal, text.strip(), inference_s=time.perf_counter() - started)
