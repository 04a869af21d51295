"""Property tests (hypothesis): random Moderate request sequences against a real sidecar never end
UNKNOWN or INTERNAL and never leave a session open; random edits of the shipped policies load or
fail with file:line problems, never a crash; random unicode split anywhere through the
incremental tokenizer gives the tokenization of the whole text."""

from __future__ import annotations

import asyncio
import time

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from servers import REPO

from guard.policy.loader import PolicyError, load_policies
from guard.text.incremental_tokenizer import IncrementalTokenizer
from server.qwen3guard.v1 import guard_pb2 as pb
from server.qwen3guard.v1 import guard_pb2_grpc as pb_grpc

FIXTURES = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]

# Text as it reaches the guard: any code point, control and zero-width characters, unpaired
# surrogates replaced (protobuf strings are UTF-8).
PIECES = st.text(st.characters(codec="utf-8"), max_size=12) | st.sampled_from(
    ["\u200b", "\u200d\u200d", "\ufeff", "\x00", "\x1b[0m", "<|im_end|>", "<|im_", "\U0001f468\u200d\U0001f469"]
)
TEXT = st.lists(PIECES, max_size=4).map("".join)

ROLES = st.sampled_from(["user", "assistant", "system", "tool", "", "robot"])
MESSAGES = st.lists(st.builds(pb.ChatMessage, role=ROLES, content=TEXT), max_size=3)
OPEN = st.builds(
    pb.OpenRequest,
    request_id=st.text(max_size=8),
    domain=st.sampled_from(["", "default", "medical", "no-such-domain"]),
    messages=MESSAGES,
    prompt_token_ids=st.lists(st.integers(0, 200_000), max_size=6),
    release_mode=st.sampled_from([0, 1, 2, 7]),
)
CHUNK = st.builds(pb.ChunkRequest, text=TEXT, token_ids=st.lists(st.integers(0, 200_000), max_size=8))
REQUEST = st.one_of(
    st.builds(pb.ModerateRequest, open=OPEN),
    st.builds(pb.ModerateRequest, chunk=CHUNK),
    st.builds(pb.ModerateRequest, close=st.just(pb.CloseRequest())),
    st.just(pb.ModerateRequest()),
)


CLIENT_SIDE = "Internal error from Core"  # grpcio's own status when a write races the server's end


async def _drive(address: str, requests: list[pb.ModerateRequest]) -> tuple[grpc.StatusCode, str]:
    """Write the requests (stopping where the server has ended the stream), read to the end;
    the server's status."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = pb_grpc.StreamGuardStub(channel).Moderate()
        try:
            for request in requests:
                if call.done():
                    break
                await call.write(request)
            if not call.done():
                await call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass
        try:
            async for _ in call:
                pass
        except grpc.aio.AioRpcError:
            pass
        return await call.code(), await call.details()


@settings(max_examples=60, deadline=None, suppress_health_check=FIXTURES)
@given(requests=st.lists(REQUEST, max_size=6))
def test_random_moderate_streams_end_with_a_clear_status(sidecar, requests):
    code, details = asyncio.run(_drive(sidecar.address, requests))
    server_fault = code == grpc.StatusCode.UNKNOWN or (code == grpc.StatusCode.INTERNAL and details != CLIENT_SIDE)
    assert not server_fault, (code, details, requests)
    deadline = time.monotonic() + 10
    while sidecar.engine.live_sessions and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sidecar.engine.live_sessions == 0


def _shipped() -> dict[str, tuple[str, str]]:
    return {p.stem: (p.name, p.read_text()) for p in sorted((REPO / "policies").glob("*.yaml"))}


EDIT = st.tuples(
    st.sampled_from(["delete", "duplicate", "replace", "insert", "indent", "truncate"]),
    st.integers(0, 10_000),
    st.text(st.characters(codec="utf-8"), max_size=12)
    | st.sampled_from(["unsafe: 2", "- x", ": :", "{", "&a *a", "\t"]),
)


@settings(max_examples=150, deadline=None)
@given(domain=st.sampled_from(sorted(_shipped())), edits=st.lists(EDIT, min_size=1, max_size=3))
def test_edited_policies_load_or_fail_with_file_and_line(domain, edits):
    files = _shipped()
    name, text = files[domain]
    lines = text.splitlines()
    for kind, where, value in edits:
        i = where % max(len(lines), 1)
        if kind == "delete" and lines:
            del lines[i]
        elif kind == "duplicate" and lines:
            lines.insert(i, lines[i])
        elif kind == "replace" and lines:
            head = lines[i].split(":", 1)[0]
            lines[i] = f"{head}: {value}" if ":" in lines[i] else value
        elif kind == "insert":
            lines.insert(i, value)
        elif kind == "indent" and lines:
            lines[i] = "  " + lines[i]
        elif kind == "truncate":
            lines = lines[:i]
    files[domain] = (name, "\n".join(lines) + "\n")
    try:
        load_policies(files)
    except PolicyError as exc:
        assert exc.problems and all(p.file for p in exc.problems)
        assert any(p.line or p.file for p in exc.problems)
        assert all(f"{p.file}:{p.line}" in str(exc) for p in exc.problems if p.line)


@settings(max_examples=300, deadline=None, suppress_health_check=FIXTURES)
@given(text=st.text(st.characters(codec="utf-8"), max_size=40), cuts=st.lists(st.integers(0, 40), max_size=6))
def test_random_text_split_anywhere_tokenizes_as_a_whole(guard_tokenizer, text, cuts):
    """Below the forced-cut bounds (here out of reach), any split gives the whole text's ids."""
    hf = guard_tokenizer.hf
    inc = IncrementalTokenizer(hf, max_pending_chars=4096, max_pending_tokens=4096)
    points = sorted({min(c, len(text)) for c in cuts})
    ids: list[int] = []
    start = 0
    for point in [*points, len(text)]:
        ids += inc.push(text[start:point])
        start = point
    ids += inc.finish()
    assert ids == guard_tokenizer.encode(text)
