"""The Reasoner on a real vLLM (CPU) serving the demo reasoning model, through the three vLLM
adapters (OpenAI-compatible HTTP and gRPC servers in their own processes, and AsyncLLM embedded
in a sidecar run from the vLLM environment): the thinking response arrives split into reasoning
and answer exactly as the local backend produces it, and a thinking budget stops the request,
continues it with </think> appended, and the model answers. The memory agent runs end to end
against the same server."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import grpc
import pytest
from servers import running_sidecar
from vllm_runtime import running_vllm_grpc, running_vllm_http, started_together

from guard.demo.reasoner_model import SHOWCASE, demo_reasoner_dir, showcase_cases
from guard.reasoning.thinking import CLOSING_TEXT
from server.qwen3guard.reasoning.v1 import reasoning_pb2 as pb
from server.qwen3guard.reasoning.v1 import reasoning_pb2_grpc as pb_grpc
from server.qwen3guard.v1 import guard_pb2 as gpb

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def vllm_targets():
    model = demo_reasoner_dir()
    with started_together(running_vllm_http(model, name="demo-reasoner"), running_vllm_grpc(model)) as (url, target):
        yield url, target


@pytest.fixture(scope="module")
def policies(tmp_path_factory):
    from servers import policies_with

    return policies_with(
        tmp_path_factory.mktemp("policies"), permissive="extends: default\nthresholds:\n  unsafe: 1.0\n"
    )


@dataclass
class Address:
    address: str


@pytest.fixture(scope="module", params=["http", "grpc", "async-llm"])
def reasoner(request, demo_dir, vllm_targets, policies):
    url, target = vllm_targets
    if request.param == "async-llm":
        with async_llm_reasoner(demo_dir, policies) as address:
            yield request.param, Address(address)
        return
    upstream = {"upstream_url": url} if request.param == "http" else {"upstream_grpc": target}
    with running_sidecar(
        model=str(demo_dir), judge="", policies=str(policies), reasoner="upstream", **upstream
    ) as running:
        yield request.param, running


@contextmanager
def async_llm_reasoner(demo_dir, policies):
    """`guard serve --upstream-engine async-llm --reasoner upstream` from the vLLM environment (this
    repository is installed there): vLLM's AsyncLLM in the sidecar's own process."""
    import asyncio
    import subprocess

    from test_serve_process import wait_serving
    from vllm_runtime import CACHE, free_port, vllm_env, vllm_python_with_sidecar

    port = free_port()
    args = ["--model", str(demo_dir), "--address", f"127.0.0.1:{port}", "--metrics-port", "0", "--judge", ""]
    args += [
        "--policies",
        str(policies),
        "--upstream-engine",
        "async-llm",
        "--upstream-model",
        str(demo_reasoner_dir()),
    ]
    args += ["--upstream-gpu-memory-utilization", "0.1", "--upstream-max-model-len", "2048", "--reasoner", "upstream"]
    args += ["--upstream-enforce-eager"]  # no torch.compile: ~70 s less to start on these CPUs
    log = (CACHE / f"async-llm-reasoner-{port}.log").open("w")
    process = subprocess.Popen(
        [str(vllm_python_with_sidecar()), "-m", "server.cli", "serve", *args],
        stdout=log, stderr=subprocess.STDOUT, text=True, cwd=str(CACHE), env=vllm_env(),
    )  # fmt: skip
    try:
        asyncio.run(wait_serving(f"127.0.0.1:{port}", process, timeout=300))
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture(scope="module")
def expected():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(demo_reasoner_dir()))
    return tokenizer, {c.index: c.response_ids for c in showcase_cases(tokenizer) if c.thinking}


async def generate(address: str, **fields) -> list[pb.GenerateResponse]:
    async with grpc.aio.insecure_channel(address) as channel:
        return [r async for r in pb_grpc.ReasonerStub(channel).Generate(pb.GenerateRequest(**fields), timeout=120)]


def split(responses) -> tuple[list[int], list[int]]:
    pick = lambda kind: [i for r in responses if r.WhichOneof("event") == kind for i in getattr(r, kind).token_ids]  # noqa: E731
    return pick("reasoning"), pick("answer")


async def test_the_thinking_response_arrives_split_and_whole(reasoner, expected):
    adapter, running = reasoner
    tokenizer, ids = expected
    responses = await generate(
        running.address, domain="permissive", messages=[gpb.ChatMessage(role="user", content=SHOWCASE[0][0])],
        sampling=gpb.SamplingParams(max_tokens=120),
    )  # fmt: skip
    assert responses[0].start.backend == {"http": "vllm-http", "grpc": "vllm-grpc", "async-llm": "async-llm"}[adapter]
    reasoning, answer = split(responses)
    close = tokenizer.convert_tokens_to_ids("</think>")
    assert reasoning + answer == ids[0] and close in reasoning
    assert tokenizer.decode(reasoning[reasoning.index(close) + 1 :]).strip() == ""  # the block's line breaks
    assert tokenizer.decode(answer).strip().removesuffix("<|im_end|>") == SHOWCASE[0][2]
    assert responses[-1].end.finish_reason == "stop"


async def test_a_thinking_budget_through_vllm(reasoner, expected):
    adapter, running = reasoner
    tokenizer, ids = expected
    budget = 6
    responses = await generate(
        running.address, domain="permissive", messages=[gpb.ChatMessage(role="user", content=SHOWCASE[3][0])],
        sampling=gpb.SamplingParams(max_tokens=80), thinking_budget=budget,
    )  # fmt: skip
    reasoning, answer = split(responses)
    closing = tokenizer.encode(CLOSING_TEXT, add_special_tokens=False)
    assert reasoning == ids[3][:budget] + closing and answer and tokenizer.decode(answer[:1]).strip()
    end = responses[-1].end
    assert end.thinking_budget_reached and end.usage.reasoning_tokens == budget + len(closing)
    if adapter == "grpc":  # both requests' finish reasons were taken: the adapter keeps nothing per request
        assert not running.sidecar.upstream.finish_reasons


async def test_the_memory_agent_end_to_end_against_vllm(vllm_targets):
    """Three chunks of 32 tokens through the demo model served by vLLM: one call a chunk, the
    memory cut to its bound, and an answer prompt vLLM accepts (a seeded sample writes more than
    the bound)."""
    from test_memory_agent import DOCUMENT, QUESTION, Completer, agent_for
    from transformers import AutoTokenizer

    from guard.reasoning.memory_agent import ChunkDone, Ready
    from server.upstream import Sampling, VllmHttpUpstream

    url, _ = vllm_targets
    tokenizer = AutoTokenizer.from_pretrained(str(demo_reasoner_dir()))
    agent = agent_for(tokenizer, memory_tokens=16)
    upstream = VllmHttpUpstream(url)
    complete = Completer(upstream, Sampling(temperature=1.0, seed=7, max_tokens=40))
    try:
        events = [e async for e in agent.run(QUESTION, DOCUMENT, complete)]
        assert complete.calls == len(events) - 1 == len(agent.chunks(DOCUMENT)) == 3
        ready = events[-1]
        await complete(list(ready.answer_prompt_ids))
    finally:
        await upstream.close()
    assert complete.calls == 4  # chunks + the answer call
    assert all(isinstance(e, ChunkDone) and e.memory_tokens <= 16 for e in events[:-1])
    assert isinstance(ready, Ready) and ready.memory_tokens <= 16
    answer_text = tokenizer.decode(list(ready.answer_prompt_ids))
    assert f"<question>\n{QUESTION}\n</question>" in answer_text
