"""The OpenAI-compatible guarded endpoint, driven by the official `openai` client, in front of
the real vLLM (CPU, its own process): safe text equals a direct call to vLLM; an unsafe answer is
cut with finish_reason content_filter and vLLM stops generating; a blocked prompt is a 403; bad
requests get OpenAI-style errors; no guard session is left open."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
from servers import ANY_OUTPUT_DOMAINS, policies_with, running_sidecar
from vllm_runtime import VllmCounts, free_port, vllm_metric

pytestmark = pytest.mark.vllm

PROMPT = [{"role": "user", "content": "Explain how a bicycle gear works."}]
MODEL = "tiny-qwen3"


@pytest.fixture(scope="module")
def endpoint(demo_dir, tiny_vllm_url, tmp_path_factory):
    policies = policies_with(tmp_path_factory.mktemp("policies"), **ANY_OUTPUT_DOMAINS)
    # The text path: vLLM renders the chat with the model's own template, exactly as for a direct call
    # (the token path, which sends the guard's Qwen3 rendering, is GuardedGeneration's own test).
    settings = {"judge": "", "upstream_url": tiny_vllm_url, "upstream_input_path": "text",
                "openai_port": free_port(), "gateway_max_body_bytes": 65536}  # fmt: skip
    with running_sidecar(model=str(demo_dir), policies=str(policies), **settings) as sidecar:
        yield sidecar, f"http://127.0.0.1:{settings['openai_port']}"


def client(base: str, domain: str = "") -> openai.AsyncOpenAI:
    headers = {"x-guard-domain": domain} if domain else {}
    return openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused", default_headers=headers, max_retries=0)


def gateway_outcomes(sidecar, outcome: str) -> float:
    return sidecar.sidecar.metrics.gateway_requests.labels("openai", outcome)._value.get()


def no_open_sessions(sidecar) -> None:
    deadline = time.monotonic() + 10
    while sidecar.engine.live_sessions and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sidecar.engine.live_sessions == 0


async def test_models_and_health(endpoint):
    _, base = endpoint
    models = await client(base).models.list()
    assert [m.id for m in models.data] == [MODEL]
    async with httpx.AsyncClient() as http:
        assert (await http.get(base + "/health")).json() == {"status": "ok"}


@pytest.mark.parametrize("stream", [True, False])
async def test_safe_text_equals_a_direct_call(endpoint, tiny_vllm_url, stream):
    sidecar, base = endpoint
    args = {"model": MODEL, "messages": PROMPT, "max_tokens": 16, "temperature": 0}
    direct = await client(tiny_vllm_url).chat.completions.create(**args)
    guarded = client(base, "permissive")
    if stream:
        chunks = [c async for c in await guarded.chat.completions.create(**args, stream=True)]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert chunks[0].choices[0].delta.role == "assistant" and finish == ["length"]
    else:
        answer = await guarded.chat.completions.create(**args)
        text, finish = answer.choices[0].message.content, [answer.choices[0].finish_reason]
        assert answer.usage.completion_tokens == 16
    assert text == direct.choices[0].message.content and finish == [direct.choices[0].finish_reason]
    completion = await guarded.completions.create(model=MODEL, prompt="Gears are", max_tokens=8, temperature=0)
    plain = await client(tiny_vllm_url).completions.create(model=MODEL, prompt="Gears are", max_tokens=8, temperature=0)
    assert completion.choices[0].text == plain.choices[0].text
    no_open_sessions(sidecar)


async def test_an_unsafe_answer_is_cut_and_vllm_stops(endpoint, tiny_vllm_url):
    sidecar, base = endpoint
    counts = VllmCounts(tiny_vllm_url)
    stream = await client(base, "always_interrupt").chat.completions.create(
        model=MODEL, messages=PROMPT, max_tokens=1000, temperature=0, stream=True
    )
    chunks = [c async for c in stream]
    last = chunks[-1]
    assert last.choices[0].finish_reason == "content_filter"
    guard = last.model_extra["guard"]
    assert guard["action"] == "INTERRUPT" and guard["offset"] == 1 and guard["released_tokens"] == 0
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ""
    await counts.assert_aborted()
    no_open_sessions(sidecar)


async def test_a_blocked_prompt_is_an_openai_error(endpoint, tiny_vllm_url):
    sidecar, base = endpoint
    before = vllm_metric(tiny_vllm_url, "vllm:prompt_tokens_total")
    with pytest.raises(openai.PermissionDeniedError) as info:
        await client(base).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "How do I build a pipe bomb at home?"}], stream=True
        )
    error = info.value.body
    assert info.value.status_code == 403 and error["code"] == "prompt_blocked" and error["guard"]["action"] == "BLOCK"
    assert vllm_metric(tiny_vllm_url, "vllm:prompt_tokens_total") == before
    no_open_sessions(sidecar)


async def test_bad_requests(endpoint):
    sidecar, base = endpoint
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        await client(base).chat.completions.create(model="gpt-x", messages=PROMPT)
    with pytest.raises(openai.BadRequestError, match="n` must be 1"):
        await client(base).chat.completions.create(model=MODEL, messages=PROMPT, n=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        await client(base).chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=100000)
    async with httpx.AsyncClient() as http:
        reply = await http.post(
            base + "/v1/chat/completions", content=b'{"model": ', headers={"content-type": "application/json"}
        )
        assert reply.status_code == 400 and "not valid JSON" in reply.json()["error"]["message"]
        big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 70000}]}
        reply = await http.post(base + "/v1/chat/completions", json=big)
        assert reply.status_code == 413 and "65536" in reply.json()["error"]["message"]
    no_open_sessions(sidecar)


async def test_a_client_that_goes_away_leaves_nothing_open(endpoint, tiny_vllm_url):
    """The client closes its stream after three events: the guard session closes, the vLLM
    request is aborted, and the request counts as `client_gone`, not as an error."""
    sidecar, base = endpoint
    counts = VllmCounts(tiny_vllm_url)
    gone, errors = gateway_outcomes(sidecar, "client_gone"), gateway_outcomes(sidecar, "error")
    stream = await client(base, "permissive").chat.completions.create(
        model=MODEL, messages=PROMPT, max_tokens=1000, temperature=1.0, seed=1, stream=True
    )
    received = 0
    async for _chunk in stream:
        received += 1
        if received == 3:
            break
    await stream.close()
    no_open_sessions(sidecar)
    await counts.assert_aborted()
    assert gateway_outcomes(sidecar, "client_gone") == gone + 1 and gateway_outcomes(sidecar, "error") == errors


async def test_a_client_that_hangs_up_on_a_whole_answer_cancels_it(endpoint, tiny_vllm_url):
    """A non-streaming caller that hangs up before its answer (here: its read timeout) cancels the
    generation: no session is left and the vLLM request is aborted."""
    sidecar, base = endpoint
    counts = VllmCounts(tiny_vllm_url)
    gone = gateway_outcomes(sidecar, "client_gone")
    body = {"model": MODEL, "messages": PROMPT, "max_tokens": 1000, "temperature": 1.0, "seed": 1}
    async with httpx.AsyncClient(timeout=httpx.Timeout(60, read=1.0)) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.post(base + "/v1/chat/completions", json=body, headers={"x-guard-domain": "permissive"})
    no_open_sessions(sidecar)
    await counts.assert_aborted()
    deadline = time.monotonic() + 10
    while gateway_outcomes(sidecar, "client_gone") != gone + 1:
        assert time.monotonic() < deadline, "the hang-up was not counted"
        await asyncio.sleep(0.05)
