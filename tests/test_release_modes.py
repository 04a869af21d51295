"""Every release mode releases exactly the response, through both front ends (Moderate and
GuardedGeneration) and both input paths (token ids and text): OPTIMISTIC text goes out on
arrival, HOLD_BACK once judged, and special tokens never appear in released text."""

from __future__ import annotations

import grpc
import pytest
from servers import ScriptedVllm, policies_with, running_sidecar

from server.qwen3guard.v1 import guard_pb2 as pb
from server.qwen3guard.v1 import guard_pb2_grpc as pb_grpc

PROMPT = "How do I boil an egg?"
ANSWER = "Put the egg in boiling water for nine minutes, then cool it in cold water. Enjoy your breakfast!"
MODES = {"hold_back": pb.HOLD_BACK, "optimistic": pb.OPTIMISTIC}


@pytest.fixture(scope="module")
def response_ids(guard_tokenizer) -> list[int]:
    """The answer as a generator emits it: ending with <|im_end|>, which a user never sees."""
    return [*guard_tokenizer.encode(ANSWER), guard_tokenizer.im_end_id]


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    # Never interrupts, whatever the demo model thinks of the answer: the release path is under test.
    return policies_with(
        tmp_path_factory.mktemp("policies"), permissive="extends: default\nthresholds:\n  unsafe: 1.0\n"
    )


@pytest.fixture(scope="module")
def moderate_sidecar(demo_dir, policy_dir):
    with running_sidecar(model=str(demo_dir), policies=str(policy_dir), judge="") as running:
        yield running


async def _moderate(address: str, mode: int, chunks: list[pb.ChunkRequest]) -> list[pb.ModerateResponse]:
    async def requests():
        yield pb.ModerateRequest(
            open=pb.OpenRequest(
                domain="permissive", release_mode=mode, messages=[pb.ChatMessage(role="user", content=PROMPT)]
            )
        )
        for chunk in chunks:
            yield pb.ModerateRequest(chunk=chunk)
        yield pb.ModerateRequest(close=pb.CloseRequest())

    async with grpc.aio.insecure_channel(address) as channel:
        return [r async for r in pb_grpc.StreamGuardStub(channel).Moderate(requests())]


def _released(responses: list[pb.ModerateResponse]) -> str:
    text = "".join(r.chunk.released_text for r in responses if r.WhichOneof("kind") == "chunk")
    return text + responses[-1].final.released_text


@pytest.mark.parametrize("mode", sorted(MODES))
async def test_moderate_token_path_releases_the_exact_text(moderate_sidecar, guard_tokenizer, response_ids, mode):
    chunks = [pb.ChunkRequest(token_ids=response_ids[k : k + 4]) for k in range(0, len(response_ids), 4)]
    responses = await _moderate(moderate_sidecar.address, MODES[mode], chunks)
    final = responses[-1].final
    assert final.action == pb.CONTINUE and final.released == len(response_ids)
    assert _released(responses) == ANSWER  # no "<|im_end|>" in what a user sees
    assert final.released_chars == len(ANSWER)
    first_chunk = next(r.chunk for r in responses if r.WhichOneof("kind") == "chunk")
    if mode == "optimistic":  # released on arrival, before any verdict could hold it back
        assert first_chunk.released_text == guard_tokenizer.hf.decode(response_ids[:4])


@pytest.mark.parametrize("mode", sorted(MODES))
async def test_moderate_text_path_releases_the_exact_text(moderate_sidecar, mode):
    pieces = [ANSWER[k : k + 7] for k in range(0, len(ANSWER), 7)]
    responses = await _moderate(moderate_sidecar.address, MODES[mode], [pb.ChunkRequest(text=p) for p in pieces])
    final = responses[-1].final
    assert final.action == pb.CONTINUE
    assert _released(responses) == ANSWER
    assert final.released_chars == len(ANSWER)
    chunk_texts = [r.chunk.released_text for r in responses if r.WhichOneof("kind") == "chunk"]
    if mode == "optimistic":
        assert chunk_texts[: len(pieces)] == pieces  # each delta goes out as it arrived, then the tail


@pytest.fixture(scope="module", params=["token_ids", "text"])
def generation_sidecar(request, demo_dir, policy_dir, guard_tokenizer, response_ids):
    upstream = ScriptedVllm(guard_tokenizer.hf, response_ids, text_path=request.param == "text")
    try:
        with running_sidecar(
            model=str(demo_dir), policies=str(policy_dir), judge="", upstream_url=upstream.url
        ) as running:
            yield request.param, running
    finally:
        upstream.close()


@pytest.mark.parametrize("mode", sorted(MODES))
async def test_guarded_generation_releases_the_exact_text(generation_sidecar, response_ids, mode):
    path, running = generation_sidecar
    request = pb.GenerateRequest(
        domain="permissive", release_mode=MODES[mode], messages=[pb.ChatMessage(role="user", content=PROMPT)]
    )
    async with grpc.aio.insecure_channel(running.address) as channel:
        responses = [r async for r in pb_grpc.GuardedGenerationStub(channel).Generate(request)]
    assert responses[0].start.input_path == path
    chunks = [r.chunk for r in responses if r.WhichOneof("kind") == "chunk"]
    assert "".join(c.text for c in chunks) == ANSWER
    end = responses[-1].end
    assert end.finish_reason == "stop" and not end.stopped
    if path == "token_ids":
        assert [i for c in chunks for i in c.token_ids] == response_ids  # ids go out as generated
        assert end.released_tokens == len(response_ids)
    if mode == "optimistic":
        assert chunks[0].text, "optimistic text is released on arrival"
