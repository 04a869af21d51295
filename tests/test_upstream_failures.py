"""An upstream that breaks midway: the caller gets UNAVAILABLE, and the domain's fail mode decides
what of the held-back response was released. The upstream is a real HTTP server on a loopback
port speaking vLLM's streaming protocol, which drops the connection after a few chunks."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from http.server import ThreadingHTTPServer

import grpc
import pytest
from servers import VllmProtocolHandler, policies_with, running_sidecar

from server.qwen3guard.v1 import guard_pb2 as pb
from server.qwen3guard.v1 import guard_pb2_grpc as pb_grpc

RESPONSE = "The capital of Australia is Canberra, not Sydney. Let me know if you would like more details."
PROMPT = [pb.ChatMessage(role="user", content="What is the capital of Australia?")]


class BreakingVllm:
    """/v1/models, /tokenize (with the guard's own tokenizer: the token path), and a streaming
    /v1/completions that sends ``chunks_before_break`` chunks and then drops the connection."""

    def __init__(self, tokenizer, response_ids: list[int], chunks_before_break: int = 3) -> None:
        outer = self

        class Handler(VllmProtocolHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/tokenize":
                    self._json({"tokens": tokenizer.encode(body["prompt"], add_special_tokens=False)})
                    return
                outer.requests += 1
                self._start_events()
                size = max(1, len(response_ids) // (chunks_before_break + 1))
                for k in range(chunks_before_break):
                    ids = response_ids[k * size : (k + 1) * size]
                    self._event({"choices": [{"index": 0, "text": tokenizer.decode(ids), "token_ids": ids}]})
                outer.sent = response_ids[: chunks_before_break * size]
                # The connection closes without the closing chunk: the stream breaks midway, as when
                # vLLM dies. (A FIN, not a RST: a RST may discard the chunks the client has not read yet.)
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True

        self.requests = 0
        self.sent: list[int] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def breaking(guard_tokenizer, demo_dir, tmp_path_factory):
    upstream = BreakingVllm(guard_tokenizer.hf, guard_tokenizer.encode(RESPONSE))
    # Every token is Unsafe but the interrupt needs 32 in a row: all of this response is held back.
    held = (
        "extends: default\nthresholds:\n  unsafe: 0.0\ndebounce: 32\nprompt:\n  unsafe: ALLOW\n"
        "categories:\n  Jailbreak:\n    prompt: ALLOW\n"  # every prompt is Unsafe here; none may be blocked
    )
    directory = policies_with(
        tmp_path_factory.mktemp("policies"),
        held_open=held + "fail_mode: open\n",
        held_closed=held + "fail_mode: closed\n",
    )
    with running_sidecar(model=str(demo_dir), policies=str(directory), upstream_url=upstream.url, judge="") as sidecar:
        yield upstream, sidecar
    upstream.close()


async def generate_until_status(address: str, **fields) -> tuple[list[pb.GenerateResponse], grpc.aio.AioRpcError]:
    responses = []
    async with grpc.aio.insecure_channel(address) as channel:
        call = pb_grpc.GuardedGenerationStub(channel).Generate(pb.GenerateRequest(**fields))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for response in call:
                responses.append(response)
    return responses, info.value


def released_text(responses: list[pb.GenerateResponse]) -> str:
    return "".join(r.chunk.text for r in responses if r.WhichOneof("kind") == "chunk")


async def test_fail_open_releases_the_partial_response_then_unavailable(breaking, guard_tokenizer):
    upstream, sidecar = breaking
    responses, status = await generate_until_status(sidecar.address, domain="held_open", messages=PROMPT)
    assert status.code() == grpc.StatusCode.UNAVAILABLE and "upstream" in status.details()
    assert upstream.sent and released_text(responses) == guard_tokenizer.hf.decode(upstream.sent)
    end = responses[-1].end
    assert end.finish_reason == "upstream_error" and not end.stopped and "fail open" in end.reason
    assert end.released_tokens == end.generated_tokens == len(upstream.sent)


async def test_fail_closed_withholds_what_was_held_back_then_unavailable(breaking):
    upstream, sidecar = breaking
    responses, status = await generate_until_status(sidecar.address, domain="held_closed", messages=PROMPT)
    assert status.code() == grpc.StatusCode.UNAVAILABLE and "upstream" in status.details()
    assert released_text(responses) == ""
    end = responses[-1].end
    assert end.finish_reason == "upstream_error" and end.stopped
    assert f"{len(upstream.sent)} held-back tokens withheld" in end.reason and end.released_tokens == 0


async def test_a_broken_upstream_harms_no_other_stream(breaking):
    """The sidecar keeps serving: StreamGuard streams and later generations are unaffected."""
    upstream, sidecar = breaking
    before = upstream.requests
    for _ in range(3):
        _, status = await generate_until_status(sidecar.address, domain="held_closed", messages=PROMPT)
        assert status.code() == grpc.StatusCode.UNAVAILABLE
    assert upstream.requests == before + 3
    engine = sidecar.sidecar.holder.runtime.engine
    # Every guard session of the broken generations is closed (the handler's cleanup runs just
    # after the caller has its status).
    deadline = asyncio.get_running_loop().time() + 5
    while engine.live_sessions and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)
    assert engine.live_sessions == 0
