"""The Reasoner in a real sidecar on a loopback port: reasoning and answer separated and guarded
(the reasoning too, or not, as the policy says), the thinking budget, SAE steering, the memory
agent, a vLLM upstream as backend, and bad requests refused by name."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import grpc
import pytest
from servers import ScriptedVllm, policies_with, running_sidecar

from guard.demo.corpus import SAFE_SENTENCES, UNSAFE_PROMPTS
from guard.demo.reasoner_model import SHOWCASE, STRATEGY_FEATURES, demo_reasoner_dir, showcase_cases
from guard.reasoning.thinking import CLOSING_TEXT
from server.qwen3guard.reasoning.v1 import reasoning_pb2 as pb
from server.qwen3guard.reasoning.v1 import reasoning_pb2_grpc as pb_grpc
from server.qwen3guard.v1 import guard_pb2 as gpb

REPO = Path(__file__).resolve().parents[1]
POLICIES = {
    # never interrupts: the reasoning / answer split and release are under test
    "permissive": "extends: default\nthresholds:\n  unsafe: 1.0\n",
    # interrupts at the second response token, whatever the text
    "always_interrupt": (
        "extends: default\nthresholds:\n  unsafe: 0.0\nprompt:\n  unsafe: ALLOW\n"
        "categories:\n  Jailbreak:\n    prompt: ALLOW\n"
    ),
    # every response token redacted (nothing interrupts)
    "redact_all": (
        "extends: default\nthresholds:\n  unsafe: 0.0\nprompt:\n  unsafe: ALLOW\nresponse:\n  unsafe: REDACT\n"
        "categories:\n  Jailbreak:\n    prompt: ALLOW\nredact_marker: '[X]'\n"
    ),
    "answer_only": "extends: permissive\nmoderate_reasoning: false\n",
    "answer_only_interrupt": "extends: always_interrupt\nmoderate_reasoning: false\n",
}


@pytest.fixture(scope="module")
def reasoner_dir():
    return demo_reasoner_dir()


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    return policies_with(tmp_path_factory.mktemp("policies"), **POLICIES)


@pytest.fixture(scope="module")
def served(demo_dir, reasoner_dir, policy_dir):
    with running_sidecar(
        model=str(demo_dir),
        judge="",
        policies=str(policy_dir),
        reasoner=str(reasoner_dir),
        reasoner_context_window=1024,
        reasoner_chunk_tokens=32,
        reasoner_memory_tokens=16,
        reasoner_memory_window=64,
        reasoner_document_window=16,  # the demo guard only judges short prompts well
    ) as running:
        yield running


@pytest.fixture(scope="module")
def cases(reasoner_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(reasoner_dir))
    return tokenizer, {(c.index, c.thinking): c for c in showcase_cases(tokenizer)}


async def generate(address: str, **fields) -> list[pb.GenerateResponse]:
    async with grpc.aio.insecure_channel(address) as channel:
        return [r async for r in pb_grpc.ReasonerStub(channel).Generate(pb.GenerateRequest(**fields), timeout=120)]


def ask(index: int, **fields) -> dict:
    fields.setdefault("domain", "permissive")
    fields.setdefault("sampling", gpb.SamplingParams(max_tokens=120))
    return dict(messages=[gpb.ChatMessage(role="user", content=SHOWCASE[index][0])], **fields)


def generated(responses) -> list[int]:
    """Every response token, reasoning then answer."""
    reasoning, answer, _, _ = phases(responses)
    return reasoning + answer


def answer_start(tokenizer, response: list[int]) -> int:
    """Where the answer starts: after ``</think>`` and the line breaks that close the block."""
    cut = response.index(tokenizer.convert_tokens_to_ids("</think>")) + 1
    while tokenizer.decode(response[cut : cut + 1]).strip() == "":
        cut += 1
    return cut


def phases(responses) -> tuple[list[int], list[int], list[pb.Delta], list[pb.Delta]]:
    reasoning = [r.reasoning for r in responses if r.WhichOneof("event") == "reasoning"]
    answer = [r.answer for r in responses if r.WhichOneof("event") == "answer"]
    return [i for d in reasoning for i in d.token_ids], [i for d in answer for i in d.token_ids], reasoning, answer


# ---------------------------------------------------------------------- thinking and guarding


def test_info_reports_the_backend_and_the_sae(served, reasoner_dir):
    with grpc.insecure_channel(served.address) as channel:
        info = pb_grpc.ReasonerStub(channel).Info(pb.InfoRequest(), timeout=30)
    assert info.backend == "local" and info.model == reasoner_dir.name and info.demo
    assert info.sae_loaded and info.can_steer and info.sae_width == 256
    assert set(info.strategies) == set(STRATEGY_FEATURES)
    assert (info.memory_window, info.chunk_tokens, info.memory_tokens) == (64, 32, 16)


async def test_reasoning_then_answer_each_judged(served, cases):
    tokenizer, by_case = cases
    for index in range(len(SHOWCASE)):
        responses = await generate(served.address, **ask(index))
        reasoning, answer, r_deltas, a_deltas = phases(responses)
        expected = by_case[(index, True)].response_ids
        cut = answer_start(tokenizer, expected)
        assert reasoning + answer == expected, tokenizer.decode(reasoning + answer)
        assert reasoning == expected[:cut] and answer == expected[cut:]
        assert all(d.HasField("verdict") for d in r_deltas + a_deltas)  # the policy moderates the reasoning
        assert "".join(d.text for d in a_deltas).strip() == SHOWCASE[index][2]
        assert "".join(d.text for d in r_deltas).strip() == SHOWCASE[index][1]  # no <think> tags in text
        start, end = responses[0].start, responses[-1].end
        assert start.moderate_reasoning and start.backend == "local"
        assert end.finish_reason == "stop" and not end.stopped and not end.thinking_budget_reached
        usage = end.usage
        assert (usage.reasoning_tokens, usage.answer_tokens) == (len(reasoning), len(answer))
        assert usage.prompt_tokens == len(by_case[(index, True)].prompt_ids)


async def test_thinking_off_is_all_answer(served, cases):
    _, by_case = cases
    responses = await generate(served.address, **ask(1, enable_thinking=False))
    reasoning, answer, _, a_deltas = phases(responses)
    assert reasoning == [] and answer == by_case[(1, False)].response_ids
    assert "".join(d.text for d in a_deltas) == SHOWCASE[1][2]
    assert responses[-1].end.usage.reasoning_tokens == 0


async def test_the_thinking_budget_closes_the_reasoning_and_the_model_answers(served, cases):
    tokenizer, by_case = cases
    budget = 7
    responses = await generate(served.address, **ask(0, thinking_budget=budget))
    reasoning, answer, _, _ = phases(responses)
    closing = tokenizer.encode(CLOSING_TEXT, add_special_tokens=False)  # "\n</think>\n\n": all reasoning
    assert reasoning == by_case[(0, True)].response_ids[:budget] + closing
    assert answer and answer[0] not in closing
    end = responses[-1].end
    assert end.thinking_budget_reached and end.usage.reasoning_tokens == budget + len(closing)
    assert end.usage.answer_tokens == len(answer)


async def test_a_budget_that_leaves_no_room_to_answer_ends_with_length(served):
    responses = await generate(served.address, **ask(0, thinking_budget=8, sampling=gpb.SamplingParams(max_tokens=10)))
    end = responses[-1].end
    assert end.finish_reason == "length" and end.thinking_budget_reached and end.usage.answer_tokens <= 1


async def test_an_interrupt_in_the_reasoning_ends_the_stream(served):
    responses = await generate(served.address, **ask(0, domain="always_interrupt"))
    reasoning, answer, _, _ = phases(responses)
    end = responses[-1].end
    assert end.finish_reason == "interrupted" and end.stopped and end.offset == 1  # debounce 2
    assert answer == [] and len(reasoning) <= 1
    assert end.usage.reasoning_tokens < 10  # the local generation was stopped at once


async def test_unmoderated_reasoning_streams_unjudged_and_the_answer_is_still_guarded(served, cases):
    _, by_case = cases
    responses = await generate(served.address, **ask(2, domain="answer_only_interrupt"))
    reasoning, answer, r_deltas, _ = phases(responses)
    expected = by_case[(2, True)].response_ids
    assert not responses[0].start.moderate_reasoning
    assert reasoning == expected[: len(reasoning)] and len(reasoning) > 20  # the whole trace, unjudged
    assert not any(d.HasField("verdict") for d in r_deltas)
    assert "".join(d.text for d in r_deltas).strip() == SHOWCASE[2][1]  # as released text: no <think> tags
    end = responses[-1].end
    assert end.finish_reason == "interrupted" and end.offset == len(reasoning) + 1  # the answer's second token
    assert len(answer) <= 1 and end.released_tokens == len(reasoning) + len(answer)
    calm = await generate(served.address, **ask(2, domain="answer_only"))
    assert phases(calm)[0] + phases(calm)[1] == expected


async def test_a_redacted_release_across_the_answer_boundary_keeps_its_markers(served, cases):
    """Every token redacted: the whole response is released at its end, reasoning and answer in
    one release; each part shows the marker and nothing of the text."""
    _, by_case = cases
    responses = await generate(served.address, **ask(1, domain="redact_all"))
    reasoning, answer, r_deltas, a_deltas = phases(responses)
    assert reasoning + answer == by_case[(1, True)].response_ids and reasoning and answer
    assert "".join(d.text for d in r_deltas) == "[X]" and "".join(d.text for d in a_deltas) == "[X]"
    end = responses[-1].end
    assert end.finish_reason == "stop" and end.released_tokens == len(reasoning) + len(answer)


async def test_stop_strings_end_the_local_generation(served, cases):
    tokenizer, by_case = cases
    expected = by_case[(0, True)].response_ids
    stop = SHOWCASE[0][1].split()[2]  # a word of the reasoning
    responses = await generate(served.address, **ask(0, sampling=gpb.SamplingParams(max_tokens=120, stop=[stop])))
    response = generated(responses)
    assert response == expected[: len(response)] and len(response) < len(expected)
    assert stop in tokenizer.decode(response) and stop not in tokenizer.decode(response[:-1])  # ends at it
    assert responses[-1].end.finish_reason == "stop"


# ---------------------------------------------------------------------- steering


async def test_steering_alpha_zero_changes_nothing_and_a_strong_steer_does(served, cases):
    _, by_case = cases
    expected = by_case[(0, True)].response_ids
    zero = await generate(
        served.address, **ask(0, steer=[pb.Steer(strategy="backtracking", alpha=0.0, offset=0, tokens=50)])
    )
    assert generated(zero) == expected
    strong = await generate(
        served.address,
        **ask(0, steer=[pb.Steer(feature=STRATEGY_FEATURES["backtracking"][0], alpha=20.0, offset=5, tokens=40)]),
    )
    steered = generated(strong)
    assert steered[:5] == expected[:5] and steered != expected
    (report,) = strong[-1].end.steered
    assert (
        report.target == f"feature {STRATEGY_FEATURES['backtracking'][0]}" and report.start == 5 and report.tokens == 40
    )


def steered_predictions(reasoner_dir: Path, sequence: list[int], first: int, feature: int, alpha: float):
    """Greedy next tokens of one full forward over ``sequence`` with ``alpha`` times the feature's
    unit decoder direction added at positions ``first`` onwards, on the SAE's layer (a hook written
    here, independent of the service's steering code)."""
    import torch

    from guard.reasoning.local_lm import LocalCausalLM
    from guard.reasoning.sae import SparseAutoencoder

    lm = LocalCausalLM(reasoner_dir)
    sae = SparseAutoencoder.load(reasoner_dir / "sae")
    direction = sae.W_dec[feature].float() / sae.W_dec[feature].float().norm()

    def add(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.clone()
        hidden[:, first:] += alpha * direction
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = lm.model.model.layers[sae.layer].register_forward_hook(add)
    try:
        with torch.inference_mode():
            logits = lm.model(input_ids=torch.tensor([sequence])).logits[0]
    finally:
        handle.remove()
    return logits.argmax(-1).tolist()


async def test_a_budget_closed_in_the_decode_loop_keeps_the_steering_before_it(served, cases, reasoner_dir):
    """Steered from the first response token with a thinking budget: the whole response is what
    ONE steered pass predicts at every generated position (the closing ids were written in the
    same pass), not what a continuation re-reading the earlier positions unsteered would give."""
    tokenizer, by_case = cases
    prompt = by_case[(0, True)].prompt_ids
    feature, alpha, budget = STRATEGY_FEATURES["backtracking"][0], 8.0, 8
    steer = pb.Steer(feature=feature, alpha=alpha, offset=0, tokens=4096)
    responses = await generate(served.address, **ask(0, thinking_budget=budget, steer=[steer]))
    response = generated(responses)
    closing = tokenizer.encode(CLOSING_TEXT, add_special_tokens=False)
    assert responses[-1].end.thinking_budget_reached and response[budget : budget + len(closing)] == closing
    written = [k for k in range(len(response)) if not budget <= k < budget + len(closing)]
    after = range(budget + len(closing), len(response) - 1)
    assert len(after) > 3
    one_pass = steered_predictions(reasoner_dir, prompt + response, len(prompt), feature, alpha)
    assert [one_pass[len(prompt) - 1 + k] for k in written] == [response[k] for k in written]
    # the continuation's view: the positions before the budget re-read without the steer
    resumed = len(prompt) + budget + len(closing)
    continued = steered_predictions(reasoner_dir, prompt + response, resumed, feature, alpha)
    assert [continued[len(prompt) - 1 + k] for k in after] != [response[k] for k in after]


async def test_a_triggered_steer_starts_after_its_trigger(served, cases):
    tokenizer, by_case = cases
    expected = by_case[(0, True)].response_ids
    steer = pb.Steer(strategy="backtracking", alpha=20.0, trigger="Wait", tokens=30)
    responses = await generate(served.address, **ask(0, steer=[steer]))
    steered = generated(responses)
    (report,) = responses[-1].end.steered
    prefix = tokenizer.decode(expected[: report.start])
    assert prefix.endswith("Wait") or prefix.rstrip(",").endswith("Wait")
    assert "Wait" not in tokenizer.decode(expected[: report.start - 1])
    assert steered[: report.start] == expected[: report.start] and steered != expected


@pytest.mark.parametrize(
    "steer, message",
    [
        (
            pb.Steer(strategy="daydreaming", alpha=1, offset=0, tokens=4),
            "strategy 'daydreaming' is unknown; strategies: ",
        ),
        (pb.Steer(feature=100000, alpha=1, offset=0, tokens=4), "is not an SAE feature (width 256)"),
        (pb.Steer(feature=3, alpha=1e9, offset=0, tokens=4), "alpha is 1000000000.0; it must be finite and within ±50"),
        (pb.Steer(feature=3, alpha=math.nan, offset=0, tokens=4), "alpha is nan"),
        (pb.Steer(feature=3, alpha=1, offset=0, tokens=0), "tokens is 0; it must be in [1, 4096]"),
        (pb.Steer(vector=pb.Vector(values=[1.0, 2.0]), alpha=1, offset=0, tokens=4), "must be 64 finite values"),
        (pb.Steer(alpha=1, offset=0, tokens=4), "names no feature, strategy or vector"),
        (pb.Steer(feature=3, alpha=1, trigger="", tokens=4), "trigger is empty or longer than 256"),
        (pb.Steer(feature=3, alpha=1, trigger="x" * 300, tokens=4), "trigger is empty or longer than 256"),
        (pb.Steer(feature=3, alpha=1, offset=3_000_000_000, tokens=4), "offset is 3000000000; a response has at most"),
    ],
)
async def test_bad_steers_are_invalid_argument_by_name(served, steer, message):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate(served.address, **ask(0, steer=[steer]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()


async def test_features_are_listed_and_recalled(served):
    async with grpc.aio.insecure_channel(served.address) as channel:
        stub = pb_grpc.ReasonerStub(channel)
        listed = await stub.ListFeatures(pb.ListFeaturesRequest(), timeout=30)
        assert {(f.index, f.strategy) for f in listed.features} == {(i, s) for s, (i, _) in STRATEGY_FEATURES.items()}
        recalled = await stub.RecallFeatures(pb.RecallFeaturesRequest(keywords=["wait", "check", "verify"]), timeout=60)
        first = recalled.features[0]
        assert first.index == STRATEGY_FEATURES["backtracking"][0] and first.strategy == "backtracking"
        assert {"wait", "check"} <= {h.lower() for h in first.hits}
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.RecallFeatures(pb.RecallFeaturesRequest(keywords=[]), timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# ---------------------------------------------------------------------- the memory agent


DOCUMENT = " ".join(
    f"Section {i}: the archive lists {i * 7} crates of apples delivered to the harbour on day {i}." for i in range(12)
)


async def test_a_long_document_is_read_by_the_memory_agent_then_answered(served, cases):
    tokenizer, _ = cases
    tokens = len(tokenizer.encode(DOCUMENT, add_special_tokens=False))
    assert tokens > 64  # over the window: the memory agent reads it
    question = "How many crates arrived on day 5?"
    responses = await generate(
        served.address, domain="permissive", document=pb.Document(text=DOCUMENT, question=question),
        sampling=gpb.SamplingParams(max_tokens=40),
    )  # fmt: skip
    assert responses[0].start.memory_agent
    progress = [r.progress for r in responses if r.WhichOneof("event") == "progress"]
    chunks = progress[0].chunks
    assert [p.chunk for p in progress] == list(range(1, chunks + 1)) and chunks >= math.ceil(tokens / 32)
    assert all(p.memory_tokens <= 16 for p in progress)
    end = responses[-1].end
    assert end.usage.memory_calls == chunks and end.finish_reason in ("stop", "length")
    assert end.usage.reasoning_tokens + end.usage.answer_tokens > 0

    short = await generate(
        served.address, domain="permissive", document=pb.Document(text="Day 5: 35 crates.", question=question),
        sampling=gpb.SamplingParams(max_tokens=20),
    )  # fmt: skip
    assert not short[0].start.memory_agent and not any(r.WhichOneof("event") == "progress" for r in short)


async def test_a_document_is_judged_before_the_memory_agent_reads_it(served, guard_tokenizer):
    """An unsafe request deep in a document longer than the guard's window: a later window blocks
    it, and the memory agent never starts. (The demo guard only recognises the request near the
    start of a short prompt, so the document puts it at a window's start: windows of 16 tokens
    overlap by a quarter, one starts every 12.)"""
    hf = guard_tokenizer.hf
    filler = " ".join(SAFE_SENTENCES)
    while len(hf.encode(filler, add_special_tokens=False)) % 12:
        filler += " ok"
    document = f"{filler} {UNSAFE_PROMPTS[0][0]} {filler}"
    question = "What does the document say?"
    responses = await generate(
        served.address, domain="default", document=pb.Document(text=document, question=question),
        sampling=gpb.SamplingParams(max_tokens=20),
    )  # fmt: skip
    assert responses[0].start.memory_agent and responses[0].start.prompt.verdict.action == gpb.BLOCK
    assert not any(r.WhichOneof("event") == "progress" for r in responses)  # nothing was read
    end = responses[-1].end
    assert end.finish_reason == "blocked" and "the document (window" in end.reason
    assert "(window 1 of" not in end.reason
    calm = await generate(
        served.address, domain="default", document=pb.Document(text=f"{filler} {filler}", question=question),
        sampling=gpb.SamplingParams(max_tokens=8),
    )  # fmt: skip
    assert calm[0].start.memory_agent and calm[-1].end.finish_reason != "blocked"


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(document=pb.Document(text="x", question="")), "needs both `text` and `question`"),
        (
            dict(document=pb.Document(text="x", question="q"), messages=[gpb.ChatMessage(role="user", content="hi")]),
            "not both",
        ),
        (dict(messages=[gpb.ChatMessage(role="assistant", content="hi")]), "must end with a user turn"),
        (
            dict(messages=[gpb.ChatMessage(role="user", content="hi")], sampling=gpb.SamplingParams(max_tokens=1020)),
            "exceeds the model's context window of 1024 tokens",
        ),
        (
            dict(messages=[gpb.ChatMessage(role="user", content="hi")], sampling=gpb.SamplingParams(stop=["a"] * 17)),
            "sampling.stop has 17 strings; at most 16",
        ),
    ],
)
async def test_bad_requests_are_invalid_argument(served, fields, message):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate(served.address, domain="permissive", **fields)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()


async def test_a_cancelled_generation_frees_the_local_backend(served):
    async with grpc.aio.insecure_channel(served.address) as channel:
        call = pb_grpc.ReasonerStub(channel).Generate(
            pb.GenerateRequest(**ask(0, sampling=gpb.SamplingParams(max_tokens=400)))
        )
        seen = 0
        async for _ in call:
            seen += 1
            if seen == 3:
                call.cancel()
                break
    await asyncio.sleep(0.2)
    responses = await generate(served.address, **ask(4))  # the backend is free again
    assert responses[-1].end.finish_reason == "stop"
    assert served.engine.live_sessions == 0


async def test_metrics_count_generations_phases_budgets_and_steers(served):
    registry = served.sidecar.metrics.registry

    def sample(name: str, **labels) -> float:
        return registry.get_sample_value(name, labels) or 0.0

    before = {
        "stop": sample("guard_reasoner_generations_total", backend="local", finish_reason="stop"),
        "reasoning": sample("guard_reasoner_tokens_total", phase="reasoning"),
        "budget": sample("guard_reasoner_thinking_budget_reached_total"),
        "steers": sample("guard_reasoner_steers_total", kind="strategy"),
    }
    steer = pb.Steer(strategy="backtracking", alpha=0.0, offset=0, tokens=2)
    responses = await generate(served.address, **ask(1, thinking_budget=4, steer=[steer]))
    end = responses[-1].end
    assert sample("guard_reasoner_generations_total", backend="local", finish_reason=end.finish_reason) >= 1
    if end.finish_reason == "stop":
        assert sample("guard_reasoner_generations_total", backend="local", finish_reason="stop") == before["stop"] + 1
    assert sample("guard_reasoner_tokens_total", phase="reasoning") == before["reasoning"] + end.usage.reasoning_tokens
    assert sample("guard_reasoner_thinking_budget_reached_total") == before["budget"] + 1
    assert sample("guard_reasoner_steers_total", kind="strategy") == before["steers"] + 1


# ---------------------------------------------------------------------- a vLLM upstream as backend


@pytest.fixture(scope="module")
def upstream_served(demo_dir, policy_dir, guard_tokenizer, cases):
    """The Reasoner on GuardedGeneration's upstream: a real HTTP server speaking vLLM's protocol that
    streams the first showcase's thinking response for every request."""
    _, by_case = cases
    upstream = ScriptedVllm(guard_tokenizer.hf, by_case[(0, True)].response_ids, chunk=2)
    try:
        with running_sidecar(
            model=str(demo_dir), judge="", policies=str(policy_dir), upstream_url=upstream.url, reasoner="upstream"
        ) as running:
            yield running, upstream
    finally:
        upstream.close()


async def test_the_upstream_backend_reasons_budgets_and_aborts_but_cannot_steer(upstream_served, cases):
    tokenizer, by_case = cases
    running, upstream = upstream_served
    expected = by_case[(0, True)].response_ids
    responses = await generate(running.address, **ask(0))
    assert responses[0].start.backend == "vllm-http"
    assert generated(responses) == expected

    before = upstream.requests
    budgeted = await generate(running.address, **ask(0, thinking_budget=5))
    reasoning, answer, _, _ = phases(budgeted)
    closing = tokenizer.encode(CLOSING_TEXT, add_special_tokens=False)
    assert reasoning == expected[:5] + closing
    assert answer == expected[: len(answer)]  # the scripted server replays its response: all answer now
    assert upstream.requests - before == 2  # the first request was stopped and continued once
    assert budgeted[-1].end.thinking_budget_reached

    disconnected = upstream.disconnected
    stopped = await generate(running.address, **ask(0, domain="always_interrupt"))
    assert stopped[-1].end.finish_reason == "interrupted"
    for _ in range(50):  # the upstream sees the connection closed (the HTTP abort)
        if upstream.disconnected > disconnected or upstream.completed:
            break
        await asyncio.sleep(0.1)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate(running.address, **ask(0, steer=[pb.Steer(feature=1, alpha=1, offset=0, tokens=2)]))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "steering needs the local backend" in caught.value.details()


def test_guard_reason_cli_prints_the_guarded_generation(demo_dir, policy_dir):
    import json

    from cli_runner import guard_main

    args = ["reason", "--model", "demo", "--guard-model", str(demo_dir), "--policies", str(policy_dir)]
    args += ["--domain", "permissive", "--text", SHOWCASE[0][0], "--budget", "400", "--json"]
    done = guard_main(*args)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["model"]["demo"] and out["answer"].strip() == SHOWCASE[0][2]
    assert SHOWCASE[0][1] in out["reasoning"]
    assert out["end"]["finish_reason"] == "stop" and not out["end"]["thinking_budget_reached"]
    assert out["end"]["usage"]["reasoning_tokens"] == len(out["reasoning_ids"])
    bad = guard_main(*args[:-1], "--steer", "nonsense")
    assert bad.returncode == 2 and "expected TARGET=ALPHA@START:T" in bad.stderr
    unknown = guard_main(*args[:-1], "--steer", "daydreaming=2@0:4")
    assert unknown.returncode == 2 and "INVALID_ARGUMENT" in unknown.stderr and "daydreaming" in unknown.stderr


def test_a_mismatched_sae_or_a_missing_upstream_stops_the_start_up_by_name(demo_dir, tmp_path):
    from guard.reasoning.sae_writer import write_sae
    from server.registry import ServiceLoadError

    sae = write_sae(tmp_path / "sae", d_model=32, width=16, layer=0)
    with pytest.raises(ServiceLoadError, match=r"'Reasoner'.*d_model 32.*hidden_size is 64"):
        with running_sidecar(model=str(demo_dir), judge="", reasoner="demo", reasoner_sae=str(sae)):
            pass
    with pytest.raises(ServiceLoadError, match=r"'Reasoner'.*--reasoner upstream needs an upstream"):
        with running_sidecar(model=str(demo_dir), judge="", reasoner="upstream"):
            pass
