"""GuardedGeneration against a real vLLM (CPU, its own process and environment): a safe
generation arrives whole; an interrupted one is aborted upstream (vLLM counts an abort and has
no running request afterwards); the tokens vLLM generated after the interrupt are measured."""

from __future__ import annotations

import asyncio
import shutil

import grpc
import httpx
import pytest
from servers import REPO, running_sidecar
from vllm_runtime import free_port, running_vllm_http, tiny_upstream_model, vllm_env, vllm_metric

from server.qwen3guard.v1 import guard_pb2 as pb
from server.qwen3guard.v1 import guard_pb2_grpc as pb_grpc

pytestmark = pytest.mark.vllm

PROMPT = [{"role": "user", "content": "Explain how a bicycle gear works."}]


@pytest.fixture(scope="module")
def vllm_url(tiny_vllm_url):
    return tiny_vllm_url


@pytest.fixture(scope="module")
def guarded(demo_dir, vllm_url, tmp_path_factory):
    """The sidecar with the upstream vLLM; test domains that decide deterministically on any output."""
    directory = tmp_path_factory.mktemp("policies")
    shutil.copytree(REPO / "policies", directory, dirs_exist_ok=True)
    (directory / "permissive.yaml").write_text("extends: default\nthresholds:\n  unsafe: 1.0\n")
    (directory / "always_interrupt.yaml").write_text(
        "extends: default\nthresholds:\n  unsafe: 0.0\nprompt:\n  unsafe: ALLOW\n"
    )
    with running_sidecar(model=str(demo_dir), policies=str(directory), upstream_url=vllm_url, judge="") as sidecar:
        yield sidecar


async def generate(address: str, **fields) -> list[pb.GenerateResponse]:
    async with grpc.aio.insecure_channel(address) as channel:
        call = pb_grpc.GuardedGenerationStub(channel).Generate(pb.GenerateRequest(**fields))
        return [r async for r in call]


def chat(messages):
    return [pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages]


async def direct_completion(url: str, prompt_ids: list[int], max_tokens: int) -> list[int]:
    async with httpx.AsyncClient(timeout=60) as client:
        reply = await client.post(
            url + "/v1/completions",
            json={
                "model": "tiny-qwen3",
                "prompt": prompt_ids,
                "max_tokens": max_tokens,
                "temperature": 0,
                "return_token_ids": True,
            },
        )
        return reply.json()["choices"][0]["token_ids"]


async def test_safe_generation_arrives_whole(guarded, vllm_url, guard_tokenizer):
    responses = await generate(
        guarded.address, domain="permissive", messages=chat(PROMPT), sampling=pb.SamplingParams(max_tokens=12)
    )
    start, end = responses[0].start, responses[-1].end
    assert start.upstream == "vllm-http" and start.input_path == "token_ids"
    assert start.prompt.verdict.action == pb.ALLOW
    released = [t for r in responses if r.WhichOneof("kind") == "chunk" for t in r.chunk.token_ids]
    rendered = guard_tokenizer.render_prompt(
        [__import__("guard.text.conversation", fromlist=["Message"]).Message(**m) for m in PROMPT]
    )
    expected = await direct_completion(vllm_url, [*rendered.prompt_ids, *rendered.preamble_ids], 12)
    assert released == expected
    assert not end.stopped and end.finish_reason == "length" and end.released_tokens == 12


async def test_interrupt_aborts_the_upstream_request(guarded, vllm_url):
    """Closing the stream aborts the vLLM request: it stops generating, never finishes with
    stop/length, and no request is left running. (This vLLM counts client aborts in neither
    request_success_total nor its logs at INFO, so the proof is in the token and request counters.)"""
    finished = {r: vllm_metric(vllm_url, "vllm:request_success_total", finished_reason=r) for r in ("stop", "length")}
    generated_before = vllm_metric(vllm_url, "vllm:generation_tokens_total")
    responses = await generate(
        guarded.address, domain="always_interrupt", messages=chat(PROMPT), sampling=pb.SamplingParams(max_tokens=1000)
    )
    end = responses[-1].end
    assert end.stopped and end.finish_reason == "interrupted" and end.offset == 1  # debounce 2
    assert end.released_tokens == 0  # HOLD_BACK: nothing of the flagged run was shown
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while vllm_metric(vllm_url, "vllm:num_requests_running") != 0:
        assert loop.time() < deadline, "the vLLM request is still running"
        await asyncio.sleep(0.2)
    await asyncio.sleep(1.0)  # a request that was not aborted would now finish with `length`
    for reason, count in finished.items():
        assert vllm_metric(vllm_url, "vllm:request_success_total", finished_reason=reason) == count
    generated = vllm_metric(vllm_url, "vllm:generation_tokens_total") - generated_before
    after = generated - (end.offset + 1)
    print(f"vLLM generated {generated:.0f} of at most 1000 tokens; {after:.0f} after the interrupt fired")
    assert generated < 500  # stopped long before max_tokens (typically 2: nothing after the interrupt)


async def test_blocked_prompt_never_reaches_the_upstream(guarded, vllm_url):
    before = vllm_metric(vllm_url, "vllm:request_success_total", finished_reason="length")
    responses = await generate(
        guarded.address, messages=chat([{"role": "user", "content": "How do I build a pipe bomb at home?"}])
    )
    assert responses[0].start.prompt.verdict.action == pb.BLOCK
    assert responses[-1].end.finish_reason == "blocked" and responses[-1].end.stopped
    assert vllm_metric(vllm_url, "vllm:request_success_total", finished_reason="length") == before


async def test_unreachable_upstream_is_unavailable(demo_dir):
    with running_sidecar(model=str(demo_dir), upstream_url=f"http://127.0.0.1:{free_port()}", judge="") as sidecar:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await generate(sidecar.address, messages=chat(PROMPT))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "upstream" in info.value.details()


async def test_bad_generate_requests_are_invalid_argument(guarded):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await generate(guarded.address, messages=chat(PROMPT), sampling=pb.SamplingParams(max_tokens=100000))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_tokens" in info.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await generate(guarded.address, prompt_token_ids=[1, 2, 3])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "<|im_end|>" in info.value.details()


@pytest.fixture(scope="module")
def more_upstreams():
    """vLLM's gRPC server of the same model and an HTTP server of a model with another tokenizer,
    started together on first use (their start-ups overlap)."""
    from vllm_runtime import running_vllm_grpc, started_together, tiny_other_upstream_model

    with started_together(running_vllm_grpc(tiny_upstream_model()), running_vllm_http(tiny_other_upstream_model())) as (
        target,
        url,
    ):
        yield target, url


@pytest.fixture(scope="module")
def vllm_grpc_target(more_upstreams):
    return more_upstreams[0]


@pytest.fixture(scope="module")
def guarded_grpc(demo_dir, guarded, vllm_grpc_target):
    """The same sidecar setup, attached to vLLM's gRPC server instead."""
    policies = guarded.sidecar.settings.policies
    with running_sidecar(model=str(demo_dir), policies=policies, upstream_grpc=vllm_grpc_target, judge="") as sidecar:
        yield sidecar


async def test_grpc_safe_generation_arrives_whole(guarded_grpc, vllm_url, guard_tokenizer):
    from guard.text.conversation import Message

    responses = await generate(
        guarded_grpc.address, domain="permissive", messages=chat(PROMPT), sampling=pb.SamplingParams(max_tokens=12)
    )
    assert responses[0].start.upstream == "vllm-grpc"
    assert responses[0].start.input_path == "token_ids"  # GetTokenizer's bundle tokenizes like the guard
    released = [t for r in responses if r.WhichOneof("kind") == "chunk" for t in r.chunk.token_ids]
    rendered = guard_tokenizer.render_prompt([Message(**m) for m in PROMPT])
    assert released == await direct_completion(vllm_url, [*rendered.prompt_ids, *rendered.preamble_ids], 12)
    assert responses[-1].end.finish_reason == "length"


async def test_grpc_interrupt_ends_with_finish_reason_abort(guarded_grpc):
    responses = await generate(
        guarded_grpc.address,
        domain="always_interrupt",
        request_id="guarded-abort-1",
        messages=chat(PROMPT),
        sampling=pb.SamplingParams(max_tokens=1000),
    )
    end = responses[-1].end
    assert end.stopped and end.offset == 1 and end.released_tokens == 0
    assert end.upstream_finish_reason == "abort"  # what vLLM's gRPC server reported for the request
    assert not guarded_grpc.sidecar.upstream.finish_reasons  # taken by the stream, nothing kept per request


# --- The text path: the upstream's tokenizer is not (or is not trusted to be) Qwen3's. ---


SEEDED = {"temperature": 1.0, "seed": 7}  # random tiny models repeat one token under greedy decoding


async def direct_chat(url: str, messages: list[dict], max_tokens: int) -> tuple[str, list[int]]:
    """vLLM's own answer (text and ids) to a chat request, sampled with the SEEDED parameters."""
    async with httpx.AsyncClient(timeout=60) as client:
        model = (await client.get(url + "/v1/models")).json()["data"][0]["id"]
        body = {"model": model, "messages": messages, "max_tokens": max_tokens, "return_token_ids": True, **SEEDED}
        choice = (await client.post(url + "/v1/chat/completions", json=body)).json()["choices"][0]
        return choice["message"]["content"], choice["token_ids"]


def released_text(responses: list[pb.GenerateResponse]) -> str:
    return "".join(r.chunk.text for r in responses if r.WhichOneof("kind") == "chunk")


@pytest.fixture(scope="module")
def vllm_other_url(more_upstreams):
    return more_upstreams[1]


@pytest.fixture(scope="module")
def guarded_other(demo_dir, guarded, vllm_other_url):
    policies = guarded.sidecar.settings.policies
    with running_sidecar(model=str(demo_dir), policies=policies, upstream_url=vllm_other_url, judge="") as sidecar:
        yield sidecar


async def test_other_tokenizer_takes_the_text_path(guarded_other, vllm_other_url):
    """A SentencePiece-style upstream: detected by the probe, rendered with its own template, its
    text deltas re-tokenized by the guard; the released text is exactly what vLLM generates."""
    sampling = pb.SamplingParams(max_tokens=16, **SEEDED)
    responses = await generate(guarded_other.address, domain="permissive", messages=chat(PROMPT), sampling=sampling)
    assert responses[0].start.input_path == "text"
    assert all(not r.chunk.token_ids for r in responses if r.WhichOneof("kind") == "chunk")
    text, ids = await direct_chat(vllm_other_url, PROMPT, 16)
    assert text.strip() and released_text(responses) == text
    assert responses[-1].end.generated_tokens == len(ids)


async def test_text_path_interrupt_aborts_and_releases_nothing(guarded_other, vllm_other_url):
    responses = await generate(
        guarded_other.address,
        domain="always_interrupt",
        messages=chat(PROMPT),
        sampling=pb.SamplingParams(max_tokens=1000),
    )
    end = responses[-1].end
    assert end.stopped and end.finish_reason == "interrupted" and released_text(responses) == ""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while vllm_metric(vllm_other_url, "vllm:num_requests_running") != 0:
        assert loop.time() < deadline, "the vLLM request is still running"
        await asyncio.sleep(0.2)
    assert end.generated_tokens < 500


async def test_text_path_refuses_prompt_token_ids(guarded_other, guard_tokenizer):
    from guard.text.conversation import Message

    rendered = guard_tokenizer.render_prompt([Message(**m) for m in PROMPT])
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await generate(guarded_other.address, prompt_token_ids=[*rendered.prompt_ids, *rendered.preamble_ids])
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "messages" in info.value.details()


@pytest.mark.parametrize("adapter", ["http", "grpc"])
async def test_forced_text_path_matches_the_upstream_text(adapter, demo_dir, guarded, vllm_url, vllm_grpc_target):
    """`--upstream-input-path text` on the Qwen3 upstream: over HTTP vLLM renders and detokenizes;
    over gRPC the sidecar does, with the tokenizer bundle it fetched (GetTokenizer)."""
    target = {"upstream_url": vllm_url} if adapter == "http" else {"upstream_grpc": vllm_grpc_target}
    policies = guarded.sidecar.settings.policies
    with running_sidecar(
        model=str(demo_dir), policies=policies, upstream_input_path="text", judge="", **target
    ) as sidecar:
        sampling = pb.SamplingParams(max_tokens=16, **SEEDED)
        responses = await generate(sidecar.address, domain="permissive", messages=chat(PROMPT), sampling=sampling)
    assert responses[0].start.input_path == "text"
    text, ids = await direct_chat(vllm_url, PROMPT, 16)
    assert text.strip() and released_text(responses) == text
    assert responses[-1].end.generated_tokens == len(ids)


# --- Library mode: vLLM's AsyncLLM embedded in the sidecar's own process. ---


@pytest.fixture(scope="module")
def async_llm_sidecar(demo_dir, guarded):
    """`guard serve --upstream-engine async-llm` run from the vLLM environment (this repository is
    installed there): one process holds the guard and the engine; its /metrics has vLLM's too."""
    import subprocess

    from test_serve_process import wait_serving
    from vllm_runtime import CACHE, vllm_python_with_sidecar

    python = vllm_python_with_sidecar()
    port, metrics_port = free_port(), free_port()
    log = (CACHE / f"async-llm-sidecar-{port}.log").open("w")
    args = [
        "--model",
        str(demo_dir),
        "--address",
        f"127.0.0.1:{port}",
        "--metrics-port",
        str(metrics_port),
        "--judge",
        "",
        "--policies",
        guarded.sidecar.settings.policies,
        "--upstream-engine",
        "async-llm",
        "--upstream-model",
        str(tiny_upstream_model()),
        "--upstream-gpu-memory-utilization",
        "0.1",
        "--upstream-max-model-len",
        "2048",
        "--upstream-enforce-eager",  # no torch.compile: ~70 s less to start on these CPUs
    ]
    process = subprocess.Popen(
        [str(python), "-m", "server.cli", "serve", *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=str(CACHE),
        env=vllm_env(),
    )
    try:
        asyncio.run(wait_serving(f"127.0.0.1:{port}", process, timeout=300))
        yield f"127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}"
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


async def test_async_llm_safe_generation_arrives_whole(async_llm_sidecar, vllm_url, guard_tokenizer):
    from guard.text.conversation import Message

    address, _ = async_llm_sidecar
    responses = await generate(
        address, domain="permissive", messages=chat(PROMPT), sampling=pb.SamplingParams(max_tokens=12)
    )
    start = responses[0].start
    assert start.upstream == "async-llm" and start.input_path == "token_ids"
    released = [t for r in responses if r.WhichOneof("kind") == "chunk" for t in r.chunk.token_ids]
    rendered = guard_tokenizer.render_prompt([Message(**m) for m in PROMPT])
    assert released == await direct_completion(vllm_url, [*rendered.prompt_ids, *rendered.preamble_ids], 12)
    assert responses[-1].end.finish_reason == "length" and responses[-1].end.upstream_finish_reason == "length"


async def test_async_llm_interrupt_aborts_in_process(async_llm_sidecar):
    address, metrics_url = async_llm_sidecar
    responses = await generate(
        address, domain="always_interrupt", messages=chat(PROMPT), sampling=pb.SamplingParams(max_tokens=1000)
    )
    end = responses[-1].end
    assert end.stopped and end.offset == 1 and end.released_tokens == 0
    assert end.upstream_finish_reason == "abort"  # AsyncLLM's own final output for the request
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30  # vLLM's gauges (on the sidecar's own /metrics) follow its stats interval
    while vllm_metric(metrics_url, "vllm:num_requests_running") != 0:
        assert loop.time() < deadline, "the vLLM request is still running"
        await asyncio.sleep(0.2)
    print(f"async-llm: {end.tokens_after_interrupt} tokens generated after the interrupt")
