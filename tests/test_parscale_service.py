"""The ParScale service in a real sidecar on a loopback port: guarded generation equal to the
model's own greedy decoding (alone and concurrently), an interrupt that stops it, scores equal to
the model's log-probabilities, Info, bad input refused by name, a cancelled call that frees its KV
slots, and the `guard parscale` command."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest
import torch
from cli_runner import guard_main
from servers import policies_with, running_sidecar
from test_parscale_model import full_logits, reference_greedy

from guard.demo.parscale_model import demo_parscale_dir
from guard.parscale.loading import load_tokenizer
from guard.parscale.model import ParScaleLM
from guard.text.conversation import parse_messages
from server.qwen3guard.parscale.v1 import parscale_pb2 as pb
from server.qwen3guard.parscale.v1 import parscale_pb2_grpc as pb_grpc
from server.qwen3guard.v1 import guard_pb2 as gpb

REPO = Path(__file__).resolve().parents[1]
POLICIES = {
    "permissive": "extends: default\nthresholds:\n  unsafe: 1.0\n",
    "always_interrupt": (
        "extends: default\nthresholds:\n  unsafe: 0.0\nprompt:\n  unsafe: ALLOW\n"
        "categories:\n  Jailbreak:\n    prompt: ALLOW\n"
    ),
}
QUESTIONS = ("What is the capital of Australia?", "Write a short poem about the ocean.", "How do I sort a list?")


@pytest.fixture(scope="module")
def parscale_dir() -> Path:
    return demo_parscale_dir()


@pytest.fixture(scope="module")
def model(parscale_dir) -> ParScaleLM:
    return ParScaleLM.load(parscale_dir)


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    return policies_with(tmp_path_factory.mktemp("policies"), **POLICIES)


@pytest.fixture(scope="module")
def audit_path(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("audit") / "audit.jsonl"


@pytest.fixture(scope="module")
def served(demo_dir, parscale_dir, policy_dir, audit_path):
    with running_sidecar(
        model=str(demo_dir), judge="", policies=str(policy_dir), parscale=str(parscale_dir), parscale_max_tokens=256,
        audit_log=str(audit_path),
    ) as running:  # fmt: skip
        yield running


async def audit_records(path: Path, request_id: str) -> list[dict]:
    """The audit records of ``request_id`` once its end record is out (the writer thread batches)."""
    for _ in range(200):
        lines = path.read_text().splitlines() if path.exists() else []
        mine = [r for r in map(json.loads, lines) if r["request_id"] == request_id]
        if any(r["kind"] == "end" for r in mine):
            return mine
        await asyncio.sleep(0.05)
    raise AssertionError(f"no end record for {request_id} in {path}")


def engine_of(running):
    return running.sidecar.service("ParScale").state.model.engine


def prompt_ids(guard_tokenizer, question: str) -> list[int]:
    """What GuardedGeneration sends its upstream on the token path: the rendered prompt and header."""
    rendered = guard_tokenizer.render_prompt(parse_messages([{"role": "user", "content": question}]))
    return [*rendered.prompt_ids, *rendered.preamble_ids]


async def generate(address: str, question: str, **fields) -> list[gpb.GenerateResponse]:
    fields.setdefault("domain", "permissive")
    fields.setdefault("sampling", gpb.SamplingParams(max_tokens=10))
    request = gpb.GenerateRequest(messages=[gpb.ChatMessage(role="user", content=question)], **fields)
    async with grpc.aio.insecure_channel(address) as channel:
        return [r async for r in pb_grpc.ParScaleStub(channel).Generate(request, timeout=60)]


async def freed(running) -> None:
    """Wait until the engine holds no request and no KV slot (a slot held by a running step is
    freed when that step ends)."""
    engine = engine_of(running)
    for _ in range(200):
        if engine.live == 0 and engine.pool.live == 0:
            return
        await asyncio.sleep(0.05)


def generated(responses) -> list[int]:
    return [i for r in responses if r.WhichOneof("kind") == "chunk" for i in r.chunk.token_ids]


def test_info_describes_the_model(served, model):
    with grpc.insecure_channel(served.address) as channel:
        info = pb_grpc.ParScaleStub(channel).Info(pb.InfoRequest(), timeout=30)
    config = model.config
    assert (info.parscale_n, info.prefix_tokens, info.smoothing) == (4, 8, pytest.approx(0.1))
    assert info.kv_bytes_per_token == config.kv_bytes_per_token(4) == 4 * 2 * 2 * 2 * 16 * 4
    assert info.kv_bytes_prefix == 8 * info.kv_bytes_per_token and info.max_tokens_per_request == 256
    assert info.demo and "DEMO" in info.notice and info.vocab_size == 151936


async def test_guarded_generation_equals_the_models_greedy_decoding(served, model, guard_tokenizer, audit_path):
    responses = await generate(served.address, QUESTIONS[0], request_id="parscale-greedy")
    start, end = responses[0].start, responses[-1].end
    assert start.upstream == "parscale" and start.input_path == "token_ids"
    assert generated(responses) == reference_greedy(model, prompt_ids(guard_tokenizer, QUESTIONS[0]), 10)
    assert end.finish_reason == "length" and end.generated_tokens == 10 and not end.stopped
    (record,) = [r for r in await audit_records(audit_path, "parscale-greedy") if r["kind"] == "end"]
    assert record["front_end"] == "parscale" and record["outcome"] == "completed"  # the audit log names ParScale


async def test_concurrent_generations_each_equal_their_own(served, model, guard_tokenizer):
    results = await asyncio.gather(*(generate(served.address, q, sampling=gpb.SamplingParams(max_tokens=6))
                                     for q in QUESTIONS))  # fmt: skip
    for question, responses in zip(QUESTIONS, results, strict=True):
        assert generated(responses) == reference_greedy(model, prompt_ids(guard_tokenizer, question), 6)
    assert engine_of(served).live == 0


async def test_an_interrupt_stops_the_generation(served):
    responses = await generate(served.address, QUESTIONS[1], domain="always_interrupt",
                               sampling=gpb.SamplingParams(max_tokens=200))  # fmt: skip
    end = responses[-1].end
    assert end.finish_reason == "interrupted" and end.stopped
    assert end.generated_tokens < 20  # stopped at once, not run to 200
    await freed(served)
    assert engine_of(served).live == 0 and engine_of(served).pool.live == 0


async def test_a_cancelled_call_frees_its_kv_slots(served):
    request = gpb.GenerateRequest(messages=[gpb.ChatMessage(role="user", content=QUESTIONS[2])], domain="permissive",
                                  sampling=gpb.SamplingParams(max_tokens=200))  # fmt: skip
    async with grpc.aio.insecure_channel(served.address) as channel:
        call = pb_grpc.ParScaleStub(channel).Generate(request, timeout=60)
        async for response in call:
            if response.WhichOneof("kind") == "chunk":
                break
        call.cancel()
    await freed(served)
    assert engine_of(served).live == 0 and engine_of(served).pool.live == 0


def test_scores_equal_the_models_log_probabilities(served, model, parscale_dir):
    tokenizer = load_tokenizer(parscale_dir)
    prompt, continuation = tokenizer.encode("The harbour opens at"), tokenizer.encode(" nine in the morning.")
    expected = torch.log_softmax(full_logits(model, prompt + continuation), -1)
    positions = torch.arange(len(prompt) - 1, len(prompt) + len(continuation) - 1)
    expected = expected[positions, torch.tensor(continuation)]
    with grpc.insecure_channel(served.address) as channel:
        stub = pb_grpc.ParScaleStub(channel)
        by_ids = stub.Score(pb.ScoreRequest(prompt_token_ids=prompt, continuation_token_ids=continuation), timeout=30)
        by_text = stub.Score(
            pb.ScoreRequest(prompt_text="The harbour opens at", continuation_text=" nine in the morning."), timeout=30
        )
    assert [t.token_id for t in by_ids.tokens] == continuation and by_ids.prompt_tokens == len(prompt)
    torch.testing.assert_close(torch.tensor([t.logprob for t in by_ids.tokens], dtype=torch.float32), expected,
                               atol=2e-5, rtol=1e-4)  # fmt: skip
    assert by_ids.total_logprob == pytest.approx(float(expected.sum()), abs=1e-3)
    assert [t.logprob for t in by_text.tokens] == [t.logprob for t in by_ids.tokens]


@pytest.mark.parametrize(
    "request_, code, message",
    [
        (pb.ScoreRequest(prompt_token_ids=[1], continuation_text="x"), "INVALID_ARGUMENT", "not both"),
        (pb.ScoreRequest(prompt_token_ids=[1]), "INVALID_ARGUMENT", "non-empty continuation"),
        (pb.ScoreRequest(prompt_token_ids=[1], continuation_token_ids=[999999]), "INVALID_ARGUMENT", "[0, 151936)"),
        (pb.ScoreRequest(prompt_token_ids=[1] * 200, continuation_token_ids=[1] * 100), "INVALID_ARGUMENT",
         "at most 256"),
    ],
)  # fmt: skip
def test_bad_scores_are_refused_by_name(served, request_, code, message):
    with grpc.insecure_channel(served.address) as channel, pytest.raises(grpc.RpcError) as caught:
        pb_grpc.ParScaleStub(channel).Score(request_, timeout=30)
    assert caught.value.code().name == code and message in caught.value.details()


async def test_a_generation_beyond_the_request_limit_is_invalid_argument(served):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate(served.address, QUESTIONS[0], sampling=gpb.SamplingParams(max_tokens=300))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "exceeds ParScale's 256 tokens per request" in caught.value.details()
    assert engine_of(served).live == 0


def test_guard_parscale_cli_greedy_and_topk(parscale_dir, model, tmp_path):
    ids = [151644, 872, 198, 9707, 151645]
    (tmp_path / "ids.json").write_text(json.dumps(ids))
    cli = ["parscale", "--model", str(parscale_dir), "--ids", str(tmp_path / "ids.json")]
    greedy = guard_main(*cli, "--greedy", "5", "--json")
    assert greedy.returncode == 0, greedy.stderr
    assert json.loads(greedy.stdout) == {"token_ids": reference_greedy(model, ids, 5)}
    top = guard_main(*cli, "--topk", "3", "--json")
    assert top.returncode == 0, top.stderr
    expected = full_logits(model, ids)[-1].topk(3)
    out = json.loads(top.stdout)["topk"]
    assert [t for t, _ in out] == expected.indices.tolist()
    assert [v for _, v in out] == pytest.approx(expected.values.tolist(), abs=1e-4)
    bad = guard_main(*cli, "--greedy", "0")
    assert bad.returncode == 2 and "--greedy N and --topk K must be at least 1" in bad.stderr
