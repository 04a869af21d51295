"""vLLM embedded in the sidecar's process (library mode): ``AsyncLLM`` with delta outputs.

For users who run one process per pod: the engine and the guard share the event loop, there is
no transport between them, and an interrupt is ``AsyncLLM.abort`` (the engine frees the request's
KV blocks at its next step). Needs vLLM importable in this environment; imported only when
configured (``guard serve --upstream-engine async-llm --upstream-model PATH``).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

from server.upstream import Sampling, UpstreamDelta, UpstreamError, UpstreamPrompt, prompt_ids_with


class AsyncLlmUpstream:
    name = "async-llm"

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.finish_reasons: dict[str, str] = {}  # what the engine reported per request id

    @classmethod
    def from_model(
        cls,
        model: str,
        *,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        dtype: str = "auto",
        enforce_eager: bool = False,
    ) -> AsyncLlmUpstream:
        # vLLM logs to stdout by default; stdout carries the audit log's JSON lines (--audit-log -)
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
        try:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as exc:
            raise UpstreamError(f"--upstream-engine async-llm needs vLLM in this environment: {exc}") from None
        args = AsyncEngineArgs(
            model=model,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            dtype=dtype,
            enforce_eager=enforce_eager,
            disable_log_stats=False,
        )
        return cls(AsyncLLM.from_engine_args(args))

    async def close(self) -> None:
        self.engine.shutdown()

    async def tokenize(self, text: str) -> list[int]:
        return self.engine.get_tokenizer().encode(text, add_special_tokens=False)

    async def generate(
        self, request_id: str, prompt: UpstreamPrompt, sampling: Sampling
    ) -> AsyncIterator[UpstreamDelta]:
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        ids = prompt_ids_with(self.engine.get_tokenizer(), prompt)
        params = SamplingParams(
            temperature=sampling.temperature,
            top_p=sampling.top_p or 1.0,
            max_tokens=sampling.max_tokens,
            seed=sampling.seed,
            stop=list(sampling.stop) or None,
            output_kind=RequestOutputKind.DELTA,
        )
        outputs = self.engine.generate(TokensPrompt(prompt_token_ids=ids), params, request_id)
        finished = False
        try:
            async for output in outputs:
                completion = output.outputs[0]
                if output.finished:
                    finished = True
                    self.finish_reasons[request_id] = str(completion.finish_reason)
                yield UpstreamDelta(list(completion.token_ids), completion.text, completion.finish_reason)
        except (ValueError, RuntimeError) as exc:  # rejected input, engine dead
            raise UpstreamError(f"vLLM engine: {type(exc).__name__}: {exc}") from None
        finally:
            if not finished:
                await self._abort(outputs, request_id)

    async def abort(self, request_id: str) -> bool:
        await self.engine.abort(request_id)  # the request's stream then yields its final "abort" output
        return True

    async def _abort(self, outputs: AsyncIterator, request_id: str) -> None:
        """Abort in the engine, then read its final output (finish_reason "abort") briefly."""
        await self.engine.abort(request_id)

        async def final_reason() -> None:
            async for output in outputs:
                if output.finished:
                    self.finish_reasons[request_id] = str(output.outputs[0].finish_reason)
                    return

        try:
            await asyncio.wait_for(final_reason(), 2.0)
        except (TimeoutError, ValueError, RuntimeError):
            pass
        finally:
            await outputs.aclose()
