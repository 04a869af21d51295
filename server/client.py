"""A small asyncio client for the sidecar's StreamGuard service.

async with SidecarClient("127.0.0.1:50051") as client:
    async with client.moderate(messages=[{"role": "user", "content": "Hi"}]) as stream:
        prompt = stream.prompt                       # PromptVerdict
        verdict = await stream.send_text("Sure, ")   # ChunkVerdict for this chunk
        final = await stream.close()                 # FinalResponse
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import grpc

from server.qwen3guard.v1 import guard_pb2 as pb
from server.qwen3guard.v1 import guard_pb2_grpc as pb_grpc


class ModerationError(RuntimeError):
    """The sidecar ended the stream in an unexpected way."""


def open_request(
    *,
    messages: Iterable[Mapping[str, str]] | None = None,
    prompt_token_ids: Sequence[int] | None = None,
    request_id: str = "",
    domain: str = "",
    release_mode: int = pb.HOLD_BACK,
    controversial: int = pb.STRICT,
    debounce: int = 0,
    include_probabilities: bool = False,
    token_detail: int = pb.ALL_TOKENS,
) -> pb.ModerateRequest:
    return pb.ModerateRequest(
        open=pb.OpenRequest(
            request_id=request_id,
            domain=domain,
            messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages or ()],
            prompt_token_ids=list(prompt_token_ids or ()),
            release_mode=release_mode,
            controversial=controversial,
            debounce=debounce,
            include_probabilities=include_probabilities,
            token_detail=token_detail,
        )
    )


class ModerationStream:
    """One Moderate call driven request/response: each send awaits its verdict."""

    def __init__(self, call: grpc.aio.StreamStreamCall, first: pb.ModerateRequest) -> None:
        self.call = call
        self._first = first
        self.prompt: pb.PromptVerdict | None = None
        self.final: pb.FinalResponse | None = None
        self.interrupted = False  # the sidecar answered INTERRUPT; it sends `final` and ends the stream

    async def __aenter__(self) -> ModerationStream:
        await self.call.write(self._first)
        response = await self._read()
        if response.WhichOneof("kind") != "prompt":
            raise ModerationError(f"expected the prompt verdict first, got {response.WhichOneof('kind')}")
        self.prompt = response.prompt
        if self.prompt.reason and self.prompt.verdict.action == pb.BLOCK:
            self.interrupted = True  # fail closed on the prompt: the sidecar sends `final` and ends the stream
        return self

    async def __aexit__(self, *exc) -> None:
        if self.final is None:
            self.call.cancel()

    async def _read(self) -> pb.ModerateResponse:
        response = await self.call.read()
        if response is grpc.aio.EOF:
            raise ModerationError("the sidecar ended the stream")
        kind = response.WhichOneof("kind")
        if kind == "final":
            self.final = response.final
        elif kind == "chunk" and response.chunk.action == pb.INTERRUPT:
            self.interrupted = True
        return response

    async def send_ids(self, token_ids: Sequence[int]) -> pb.ModerateResponse:
        """Send a chunk of ids; the sidecar's ChunkVerdict for it (check ``interrupted``)."""
        await self.call.write(pb.ModerateRequest(chunk=pb.ChunkRequest(token_ids=list(token_ids))))
        return await self._read()

    async def send_text(self, text: str) -> pb.ModerateResponse:
        await self.call.write(pb.ModerateRequest(chunk=pb.ChunkRequest(text=text)))
        return await self._read()

    async def close(self) -> pb.FinalResponse:
        """End the response: read any last chunk verdict, return the final message."""
        if self.final is None:
            if not self.interrupted:  # after an interrupt the sidecar judges nothing more
                await self.call.write(pb.ModerateRequest(close=pb.CloseRequest()))
            # Half-close in both cases: after an interrupt the sidecar reads and drops what is still
            # in flight until the caller half-closes (or DRAIN_AFTER_STOP_S passes), then ends OK.
            await self.call.done_writing()
            while self.final is None:
                await self._read()
            await self.call.code()  # wait for the status, so closing the channel next cancels nothing
        return self.final


class SidecarClient:
    def __init__(self, target: str | grpc.aio.Channel, *, timeout: float | None = None) -> None:
        self._own = isinstance(target, str)
        self.channel = grpc.aio.insecure_channel(target) if isinstance(target, str) else target
        self.stub = pb_grpc.StreamGuardStub(self.channel)
        self.timeout = timeout

    async def __aenter__(self) -> SidecarClient:
        return self

    async def __aexit__(self, *exc) -> None:
        if self._own:
            await self.channel.close()

    async def info(self) -> pb.InfoResponse:
        return await self.stub.Info(pb.InfoRequest(), timeout=self.timeout)

    def moderate(self, **open_fields) -> ModerationStream:
        """An async context manager around one Moderate stream (``open_request`` fields)."""
        return ModerationStream(self.stub.Moderate(timeout=self.timeout), open_request(**open_fields))
