"""Upstream generation engines the sidecar attaches to (GuardedGeneration).

One interface: ``generate`` yields deltas as the engine produces them; closing the generator
(``aclose``) aborts the upstream request. ``tokenize`` says how the upstream tokenizes text, so
the service can tell whether its ids are Qwen3 ids (token path: no re-tokenisation) or not (text
path: the upstream renders the conversation with its own template and its text deltas go through
the guard's incremental tokenizer). Adapters:

- ``VllmHttpUpstream``: vLLM's OpenAI-compatible server. Token path: ``/v1/completions`` with the
  prompt as ids and ``return_token_ids``; text path: ``/v1/chat/completions``. Abort: close the
  connection.
- ``VllmGrpcUpstream``: vLLM's gRPC server (``VllmEngine``, stubs from ``smg-grpc-proto``): ids
  in and out; for the text path the upstream's tokenizer is fetched once (``GetTokenizer``) to
  render the prompt and to detokenize the output. Abort: the ``Abort`` RPC, then cancel.
- ``AsyncLlmUpstream`` (``server.upstream_async_llm``): vLLM embedded in this process.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import tempfile
import zipfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from guard.session.release import IncrementalDetokenizer


@dataclass(frozen=True)
class UpstreamDelta:
    token_ids: list[int]  # the upstream's ids (Qwen3 ids only on the token path)
    text: str  # the delta's text (always set on the text path)
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


@dataclass(frozen=True)
class UpstreamPrompt:
    """Token path: the Qwen3-rendered prompt ids, assistant preamble included. Text path: the
    messages, which the upstream renders with its own chat template. ``text``: a raw completion
    prompt (OpenAI ``/v1/completions``), tokenized by the upstream without a template."""

    token_ids: tuple[int, ...] = ()
    messages: tuple[dict, ...] = ()
    text: str = ""


class Upstream(Protocol):
    name: str

    async def tokenize(self, text: str) -> list[int]:
        """The upstream's ids for ``text`` (special tokens parsed, none added)."""
        ...

    def generate(self, request_id: str, prompt: UpstreamPrompt, sampling: Sampling) -> AsyncIterator[UpstreamDelta]: ...

    async def abort(self, request_id: str) -> bool:
        """Stop a running request. True: its stream now ends by itself, with the engine's finish
        reason ("abort"); False: this upstream has no abort call, close the stream instead."""
        ...

    async def close(self) -> None: ...


def take_finish_reason(upstream: Any, request_id: str) -> str:
    """What the engine reported for ``request_id``, where the adapter records it (``finish_reasons``),
    taken out: every caller takes it once its stream ends, so an adapter keeps nothing per request."""
    return getattr(upstream, "finish_reasons", {}).pop(request_id, "")


def render_with(tokenizer: Any, messages: tuple[dict, ...]) -> list[int]:
    """The upstream's own rendering of a conversation, ready for its assistant turn."""
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def prompt_ids_with(tokenizer: Any, prompt: UpstreamPrompt) -> list[int]:
    """The prompt as the upstream's ids: given ids, the rendered messages, or the raw text
    tokenized as vLLM's completions API does (its special tokens added)."""
    if prompt.token_ids:
        return list(prompt.token_ids)
    if prompt.messages:
        return render_with(tokenizer, prompt.messages)
    return tokenizer.encode(prompt.text)


class VllmHttpUpstream:
    name = "vllm-http"

    def __init__(self, base_url: str, *, model: str | None = None, timeout_s: float = 60.0) -> None:
        self.base = base_url.rstrip("/").removesuffix("/v1")
        self.model = model
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=5.0))

    async def close(self) -> None:
        await self._client.aclose()

    async def _post(self, path: str, body: dict) -> dict:
        try:
            response = await self._client.post(self.base + path, json=body)
        except httpx.HTTPError as exc:
            raise UpstreamError(f"{path} at {self.base} failed: {type(exc).__name__}: {exc}") from None
        if response.status_code != 200:
            raise UpstreamError(f"{path} answered HTTP {response.status_code}: {response.text[:300]}")
        return response.json()

    async def model_name(self) -> str:
        """The served model: the configured name, or the first one the server lists."""
        if self.model is None:
            try:
                response = await self._client.get(self.base + "/v1/models")
                response.raise_for_status()
            except httpx.HTTPError as exc:
                raise UpstreamError(f"cannot list models at {self.base}: {type(exc).__name__}: {exc}") from None
            self.model = response.json()["data"][0]["id"]
        return self.model

    async def abort(self, request_id: str) -> bool:
        return False  # the OpenAI-compatible API aborts a request when its connection closes

    async def tokenize(self, text: str) -> list[int]:
        body = {"model": await self.model_name(), "prompt": text, "add_special_tokens": False}
        return list((await self._post("/tokenize", body))["tokens"])

    async def generate(
        self, request_id: str, prompt: UpstreamPrompt, sampling: Sampling
    ) -> AsyncIterator[UpstreamDelta]:
        body: dict[str, Any] = {
            "model": await self.model_name(),
            "stream": True,
            "max_tokens": sampling.max_tokens,
            "temperature": sampling.temperature,
        }
        if prompt.token_ids or prompt.text:
            path = "/v1/completions"
            body.update(prompt=list(prompt.token_ids) or prompt.text, return_token_ids=True)
        else:
            path = "/v1/chat/completions"
            body.update(messages=list(prompt.messages), return_token_ids=True)  # ids only count tokens here
        if sampling.top_p:
            body["top_p"] = sampling.top_p
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        if sampling.stop:
            body["stop"] = list(sampling.stop)
        try:
            async with self._client.stream(
                "POST", self.base + path, json=body, headers={"X-Request-Id": request_id}
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
                    event = json.loads(data)
                    if "error" in event:  # vLLM reports a failure mid-stream as an error event
                        raise UpstreamError(f"vLLM stream error: {json.dumps(event['error'])[:300]}")
                    if not event.get("choices"):  # e.g. a usage-only event
                        continue
                    choice = event["choices"][0]
                    text = (
                        choice.get("text") if path == "/v1/completions" else (choice.get("delta") or {}).get("content")
                    )
                    yield UpstreamDelta(list(choice.get("token_ids") or []), text or "", choice.get("finish_reason"))
        except httpx.HTTPError as exc:  # refused, reset midway, timed out
            raise UpstreamError(f"vLLM stream failed: {type(exc).__name__}: {exc}") from None
        raise UpstreamError("vLLM stream ended without [DONE]")


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
        self._tokenizer: Any = None
        self._tokenizer_lock = asyncio.Lock()

    async def close(self) -> None:
        await self._channel.close()

    async def tokenizer(self) -> Any:
        """The upstream's own tokenizer, fetched once as vLLM's zip bundle (``GetTokenizer``)."""
        async with self._tokenizer_lock:
            if self._tokenizer is None:
                from smg_grpc_proto.generated import common_pb2

                data, digest = bytearray(), ""
                try:
                    async for chunk in self._stub.GetTokenizer(common_pb2.GetTokenizerRequest(), timeout=30):
                        data += chunk.data
                        digest = chunk.sha256 or digest
                except self._grpc.aio.AioRpcError as exc:
                    raise UpstreamError(f"vLLM GetTokenizer failed: {exc.code().name}: {exc.details()}") from None
                if digest and hashlib.sha256(data).hexdigest() != digest:
                    raise UpstreamError("vLLM's tokenizer bundle does not match its sha256")
                self._tokenizer = await asyncio.to_thread(_load_tokenizer_zip, bytes(data))
        return self._tokenizer

    async def tokenize(self, text: str) -> list[int]:
        return (await self.tokenizer()).encode(text, add_special_tokens=False)

    async def generate(
        self, request_id: str, prompt: UpstreamPrompt, sampling: Sampling
    ) -> AsyncIterator[UpstreamDelta]:
        pb = self._pb
        detokenizer = None
        ids = list(prompt.token_ids)
        if not ids:
            tokenizer = await self.tokenizer()
            ids = prompt_ids_with(tokenizer, prompt)
            detokenizer = IncrementalDetokenizer(tokenizer)
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
                tokenized=pb.TokenizedInput(input_ids=ids),
                sampling_params=params,
                stream=True,
            )
        )
        finished = False
        try:
            async for response in call:
                if response.WhichOneof("response") == "chunk":
                    new = list(response.chunk.token_ids)
                    yield UpstreamDelta(new, detokenizer.push(new) if detokenizer else "", None)
                else:
                    finished = True
                    self.finish_reasons[request_id] = response.complete.finish_reason
                    yield UpstreamDelta([], detokenizer.flush() if detokenizer else "", response.complete.finish_reason)
                    return
        except self._grpc.aio.AioRpcError as exc:
            if exc.code() != self._grpc.StatusCode.CANCELLED:
                raise UpstreamError(f"vLLM gRPC stream failed: {exc.code().name}: {exc.details()}") from None
        finally:
            if not finished:
                await self._abort(call, request_id)
        raise UpstreamError("vLLM gRPC stream ended without its final message")

    async def abort(self, request_id: str) -> bool:
        try:
            await self._stub.Abort(self._pb.AbortRequest(request_ids=[request_id]), timeout=5)
        except self._grpc.aio.AioRpcError:
            return False
        return True

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


def _load_tokenizer_zip(data: bytes) -> Any:
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="upstream-tokenizer-") as directory:
        with zipfile.ZipFile(io.BytesIO(data)) as bundle:
            bundle.extractall(directory)
        return AutoTokenizer.from_pretrained(directory)
