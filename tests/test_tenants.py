"""Tenants on a real server: API keys and mTLS identities, domains and services, admin-only
reload, concurrent-call and token limits, the tenant in audit records and metrics, live reload
of the tenants file keeping the last good set; the same decisions on the OpenAI endpoint."""

from __future__ import annotations

import json
import time

import grpc
import httpx
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc
from servers import running_sidecar
from test_tls import SecretVolume, secure_channel, server_files
from vllm_runtime import free_port

from guard.errors import Unauthenticated
from server.auth import TokenBucket
from server.qwen3guard.v1 import guard_pb2 as pb
from server.qwen3guard.v1 import guard_pb2_grpc as pb_grpc
from server.tenants import TenantError, TenantStore, hash_key, parse_tenants

PROMPT = [pb.ChatMessage(role="user", content="Tell me about rivers.")]
KEYS = {"ops": "ops-key-1", "kids": "kids-key-1", "meter": "meter-key-1", "one": "one-key-1"}
SERVICES = ("StreamGuard", "Policies", "Judge", "GuardedGeneration", "OpenAI")


def tenants_yaml(**extra_tenants: dict) -> str:
    tenants = {
        "ops": {"keys": [hash_key(KEYS["ops"])], "admin": True},
        "kids-app": {
            "keys": [hash_key(KEYS["kids"])],
            "domains": ["children_education"],
            "services": ["StreamGuard", "Policies"],
        },
        "metered": {"keys": [hash_key(KEYS["meter"])], "limits": {"tokens_per_second": 0.01, "burst_tokens": 8}},
        "single": {"keys": [hash_key(KEYS["one"])], "limits": {"max_streams": 1}},
        **extra_tenants,
    }
    return json.dumps({"tenants": tenants})  # JSON is YAML


def bearer(tenant: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {KEYS[tenant]}"),)


def test_the_tenants_file_is_checked_whole():
    tenants = parse_tenants(tenants_yaml(), SERVICES)
    assert tenants["kids-app"].may_use_domain("children_education") and not tenants["kids-app"].may_use_domain(
        "default"
    )
    assert tenants["ops"].may_call("Judge") and not tenants["kids-app"].may_call("Judge")
    assert tenants["metered"].limits.burst == 8 and tenants["single"].limits.max_streams == 1
    bad = {
        "tenants": {
            "Bad Name": {"keys": [hash_key("x")]},
            "raw": {"keys": ["plain-text-key"], "services": ["Moderation"], "colour": "red"},
            "nobody": {"domains": ["kids"]},
            "twin": {"keys": [hash_key(KEYS["ops"])], "limits": {"max_streams": -1, "tokens_per_minute": 5}},
            "ops": {"keys": [hash_key(KEYS["ops"])], "admin": "yes"},
        }
    }
    with pytest.raises(TenantError) as error:
        parse_tenants(json.dumps(bad), SERVICES, "tenants.yaml")
    message = str(error.value)
    expected_problems = (
        "tenants.Bad Name: a tenant name", "is not 'sha256:<64 hex digits>'", "unknown service 'Moderation'",
        "unknown key 'colour'", "tenants.nobody: no keys and no identities", "max_streams must be a number",
        "unknown key 'tokens_per_minute'", "a credential is also twin's", "admin must be true or false",
    )  # fmt: skip
    for expected in expected_problems:
        assert expected in message, (expected, message)
    assert "plain-text-key" not in message  # a key pasted by mistake is not echoed into logs
    with pytest.raises(TenantError, match="not valid YAML"):
        parse_tenants("tenants: [", SERVICES)


def test_guard_tenants_makes_keys_and_checks_files(tmp_path):
    """`guard tenants`: hash-key reads the key from stdin (never argv), new-key prints a key with
    its hash, check lists each tenant or exits 1 with every problem, without echoing a key."""
    from cli_runner import guard_main

    hashed = guard_main("tenants", "hash-key", stdin="ops-key-1\n")
    assert hashed.returncode == 0 and hashed.stdout == hash_key("ops-key-1") + "\n"
    empty = guard_main("tenants", "hash-key", stdin="")
    assert empty.returncode == 2 and "give the key on standard input" in empty.stderr
    made = guard_main("tenants", "new-key")
    key, digest = (line.split(":", 1)[1].strip() for line in made.stdout.splitlines())
    assert made.returncode == 0 and key.startswith("gk_") and len(key) > 40 and digest == hash_key(key)
    good = tmp_path / "tenants.yaml"
    good.write_text(tenants_yaml())
    checked = guard_main("tenants", "check", str(good))
    assert checked.returncode == 0
    assert "ok  kids-app" in checked.stdout and "domains children_education" in checked.stdout
    assert "admin" in next(line for line in checked.stdout.splitlines() if line.startswith("ok  ops"))
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({"tenants": {"raw": {"keys": ["plain-text-key"]}}}))
    refused = guard_main("tenants", "check", str(bad))
    assert refused.returncode == 1 and "is not 'sha256:<64 hex digits>'" in refused.stderr
    assert "plain-text-key" not in refused.stderr + refused.stdout


def test_a_certificate_name_is_never_taken_for_a_key(tmp_path):
    """Key hashes are not secret (they sit in the file): a client certificate whose name spells a
    tenant's key hash must not authenticate as that tenant."""
    path = tmp_path / "tenants.yaml"
    path.write_text(tenants_yaml())
    store = TenantStore(path, SERVICES)
    assert store.authenticate(f"Bearer {KEYS['ops']}").name == "ops"
    with pytest.raises(Unauthenticated):
        store.authenticate(None, [hash_key(KEYS["ops"])])
    with pytest.raises(Unauthenticated, match="Bearer"):
        store.authenticate("Basic b3BzOmtleQ==")


def test_the_token_bucket_refills_at_its_rate_and_refuses_while_in_debt():
    now = [0.0]
    bucket = TokenBucket("t", clock=lambda: now[0])
    bucket.configure(rate=10, burst=20)
    bucket.admit()
    bucket.charge(50)  # a chunk may take the bucket into debt once ...
    with pytest.raises(Exception, match=r"over its limit of 10 tokens per second \(burst 20\); retry in 3.00 s"):
        bucket.admit()  # ... the next one waits until the debt is paid
    now[0] = 3.0
    bucket.admit()
    now[0] = 100.0
    bucket._refill()
    assert bucket.tokens == 20  # never above the burst


@pytest.fixture(scope="module")
def tenant_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tenants")
    (root / "tenants.yaml").write_text(tenants_yaml())
    return root


@pytest.fixture(scope="module")
def guarded(demo_dir, tenant_files, tmp_path_factory):
    audit = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    with running_sidecar(model=str(demo_dir), judge="", tenants=str(tenant_files / "tenants.yaml"),
                         tenants_poll_s=0.05, audit_log=str(audit)) as running:  # fmt: skip
        running.audit_path = audit
        yield running


def audit_records(running) -> list[dict]:
    return [json.loads(line) for line in running.audit_path.read_text().splitlines() if line.strip()]


async def drain(call, close: bool = False) -> None:
    """Read a Moderate call to its end (its status is then in ``call.code()``). ``close``: once the
    prompt verdict is in, send `close` (never into a call the server has already ended: a write
    that fails would become the call's status)."""
    try:
        while (message := await call.read()) is not grpc.aio.EOF:
            if close and message.WhichOneof("kind") == "prompt":
                await call.write(pb.ModerateRequest(close=pb.CloseRequest()))
    except grpc.aio.AioRpcError:
        pass


async def _code(call) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_calls_need_a_tenant_and_stay_within_its_services_and_domains(guarded):
    async with grpc.aio.insecure_channel(guarded.address) as channel:
        guard = pb_grpc.StreamGuardStub(channel)
        policies = pb_grpc.PoliciesStub(channel)
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING  # health stays open

        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await guard.Info(pb.InfoRequest(), timeout=10)
        assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in missing.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await guard.Info(pb.InfoRequest(), metadata=(("authorization", "Bearer not-a-key"),), timeout=10)
        assert unknown.value.code() == grpc.StatusCode.UNAUTHENTICATED and "unknown API key" in unknown.value.details()

        # kids-app: StreamGuard and Policies only, the kids domain only.
        listed = await policies.List(pb.ListPoliciesRequest(), metadata=bearer("kids"), timeout=10)
        assert [p.domain for p in listed.policies] == ["children_education"]
        with pytest.raises(grpc.aio.AioRpcError) as other_domain:
            await policies.Get(pb.GetPolicyRequest(domain="default"), metadata=bearer("kids"), timeout=10)
        assert other_domain.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as not_admin:
            await policies.Reload(pb.ReloadRequest(), metadata=bearer("kids"), timeout=10)
        assert not_admin.value.code() == grpc.StatusCode.PERMISSION_DENIED and "admin-only" in not_admin.value.details()
        assert (await policies.Reload(pb.ReloadRequest(), metadata=bearer("ops"), timeout=10)).ok
        evaluate = pb.EvaluateRequest(domain="default", stage=pb.RESPONSE, risk=pb.UNSAFE)
        with pytest.raises(grpc.aio.AioRpcError) as evaluated:
            await policies.Evaluate(evaluate, metadata=bearer("kids"), timeout=10)
        assert evaluated.value.code() == grpc.StatusCode.PERMISSION_DENIED

        denied = grpc.StatusCode.PERMISSION_DENIED
        for domain, expected in (("default", denied), ("", denied), ("children_education", grpc.StatusCode.OK)):
            call = guard.Moderate(metadata=bearer("kids"), timeout=20)
            await call.write(pb.ModerateRequest(open=pb.OpenRequest(domain=domain, messages=PROMPT)))
            await drain(call, close=True)
            assert await call.code() == expected, (domain, await call.details())
            if expected != grpc.StatusCode.OK:
                assert "tenant 'kids-app' may not use the domain" in await call.details()

        info = await guard.Info(pb.InfoRequest(), metadata=bearer("ops"), timeout=10)
        assert info.live_sessions == 0  # refused streams left nothing open
    registry = guarded.sidecar.metrics.registry
    assert (
        registry.get_sample_value("guard_tenant_requests_total", {"tenant": "unknown", "outcome": "unauthenticated"})
        == 2
    )
    assert registry.get_sample_value("guard_tenant_requests_total", {"tenant": "kids-app", "outcome": "denied"}) == 1
    assert registry.get_sample_value("guard_tenant_open_calls", {"tenant": "kids-app"}) == 0
    deadline = time.monotonic() + 30  # the audit writer thread batches its records
    while not (
        ends := [r for r in audit_records(guarded) if r["kind"] == "end" and r["domain"] == "children_education"]
    ):
        assert time.monotonic() < deadline, "no end record for the stream"
        await _sleep()
    assert all(r["tenant"] == "kids-app" for r in ends)  # the audit log names the tenant


async def test_a_tenant_over_its_concurrent_calls_is_refused_with_the_limit(guarded):
    async with grpc.aio.insecure_channel(guarded.address) as channel:
        guard = pb_grpc.StreamGuardStub(channel)
        first = guard.Moderate(metadata=bearer("one"), timeout=30)
        await first.write(pb.ModerateRequest(open=pb.OpenRequest(domain="default", messages=PROMPT)))
        assert (await first.read()).WhichOneof("kind") == "prompt"
        with pytest.raises(grpc.aio.AioRpcError) as second:
            await guard.Info(pb.InfoRequest(), metadata=bearer("one"), timeout=10)
        assert second.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "tenant 'single' has 1 calls open, its limit (max_streams)" in second.value.details()
        assert (
            await guard.Info(pb.InfoRequest(), metadata=bearer("ops"), timeout=10)
        ).live_sessions == 1  # others go on
        await first.write(pb.ModerateRequest(close=pb.CloseRequest()))  # the call is open: its prompt was read
        await drain(first)
        assert await first.code() == grpc.StatusCode.OK
        assert (await guard.Info(pb.InfoRequest(), metadata=bearer("one"), timeout=10)).live_sessions == 0  # slot back


async def test_a_tenant_over_its_token_rate_is_stopped_mid_stream(guarded):
    """Burst 8 tokens at 0.01 tokens/s: the prompt is judged (its tokens take the bucket into
    debt), the first chunk is refused with the limit in the message, the session is closed, and a
    new stream of the tenant is refused at its prompt."""
    async with grpc.aio.insecure_channel(guarded.address) as channel:
        guard = pb_grpc.StreamGuardStub(channel)
        call = guard.Moderate(metadata=bearer("meter"), timeout=30)
        await call.write(pb.ModerateRequest(open=pb.OpenRequest(domain="default", messages=PROMPT)))
        assert (await call.read()).WhichOneof("kind") == "prompt"
        await call.write(
            pb.ModerateRequest(chunk=pb.ChunkRequest(text="Rivers carry water from the hills down to the sea. "))
        )
        await drain(call)  # that chunk is refused: the server ends the call
        assert await call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "tenant 'metered' is over its limit of 0.01 tokens per second (burst 8)" in await call.details()
        again = guard.Moderate(metadata=bearer("meter"), timeout=30)
        await again.write(pb.ModerateRequest(open=pb.OpenRequest(domain="default", messages=PROMPT)))
        await drain(again)
        assert await again.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # in debt: not even a prompt
        assert (await guard.Info(pb.InfoRequest(), metadata=bearer("ops"), timeout=10)).live_sessions == 0


async def test_the_tenants_file_reloads_live_and_keeps_the_last_good_set(guarded, tenant_files):
    path = tenant_files / "tenants.yaml"
    original = path.read_text()
    registry = guarded.sidecar.metrics.registry
    try:
        async with grpc.aio.insecure_channel(guarded.address) as channel:
            guard = pb_grpc.StreamGuardStub(channel)
            newcomer = (("authorization", "Bearer new-key-1"),)
            assert (
                await _code(guard.Info(pb.InfoRequest(), metadata=newcomer, timeout=10))
                == grpc.StatusCode.UNAUTHENTICATED
            )
            path.write_text(tenants_yaml(newcomer={"keys": [hash_key("new-key-1")]}))
            await _until(lambda: guard.Info(pb.InfoRequest(), metadata=newcomer, timeout=10), grpc.StatusCode.OK)

            path.write_text("tenants:\n  broken: {keys: [not-a-hash]}\n")  # rejected: the last good set stays
            deadline = time.monotonic() + 30
            while registry.get_sample_value("guard_tenants_last_reload_ok") != 0:
                assert time.monotonic() < deadline
                await _sleep()
            assert await _code(guard.Info(pb.InfoRequest(), metadata=newcomer, timeout=10)) == grpc.StatusCode.OK
    finally:
        path.write_text(original)


async def _sleep() -> None:
    import asyncio

    await asyncio.sleep(0.05)


async def _until(make_call, expected: grpc.StatusCode) -> None:
    deadline = time.monotonic() + 30
    while await _code(make_call()) != expected:
        assert time.monotonic() < deadline, f"still not {expected}"
        await _sleep()


async def test_an_mtls_certificate_can_name_the_tenant(demo_dir, tmp_path):
    server_ca, client_ca = trustme.CA(), trustme.CA()
    secret = SecretVolume(tmp_path / "tls")
    secret.write({**server_files(server_ca), "ca.crt": client_ca.cert_pem.bytes()})
    tenants = {"tenants": {
        "gateway": {"identities": ["gateway.llm.svc.cluster.local"], "services": ["StreamGuard"]},
        "ops": {"identities": ["CN=ops.example"], "admin": True},
    }}  # fmt: skip
    (tmp_path / "tenants.yaml").write_text(json.dumps(tenants))
    with running_sidecar(model=str(demo_dir), judge="", tenants=str(tmp_path / "tenants.yaml"),
                         tls_cert=secret.path("tls.crt"), tls_key=secret.path("tls.key"),
                         tls_client_ca=secret.path("ca.crt")) as running:  # fmt: skip
        gateway = client_ca.issue_cert("gateway.llm.svc.cluster.local")  # a DNS SAN
        ops = client_ca.issue_cert("ops.internal", common_name="ops.example")
        stranger = client_ca.issue_cert("stranger.example")
        for client, expected in ((gateway, grpc.StatusCode.OK), (ops, grpc.StatusCode.OK),
                                 (stranger, grpc.StatusCode.UNAUTHENTICATED)):  # fmt: skip
            async with secure_channel(running.address, server_ca, client) as channel:
                assert await _code(pb_grpc.StreamGuardStub(channel).Info(pb.InfoRequest(), timeout=10)) == expected
        async with secure_channel(running.address, server_ca, gateway) as channel:
            policies = pb_grpc.PoliciesStub(channel)
            assert await _code(policies.List(pb.ListPoliciesRequest(), timeout=10)) == grpc.StatusCode.PERMISSION_DENIED
        async with secure_channel(running.address, server_ca, stranger) as channel:  # a key still works
            reply = pb_grpc.StreamGuardStub(channel).Info(pb.InfoRequest(), timeout=10, metadata=bearer("ops"))
            assert await _code(reply) == grpc.StatusCode.UNAUTHENTICATED  # ops has no key in this file


def test_the_openai_endpoint_answers_401_403_with_the_same_tenants(demo_dir, tenant_files):
    port = free_port()
    with running_sidecar(model=str(demo_dir), judge="", openai_port=port,
                         tenants=str(tenant_files / "tenants.yaml")):  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/health", timeout=10).status_code == 503  # open (no upstream here)
        missing = httpx.get(f"{base}/v1/models", timeout=10)
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert missing.json()["error"]["type"] == "unauthenticated"
        assert httpx.get(f"{base}/v1/models", headers={"authorization": "Bearer nope"}, timeout=10).status_code == 401
        kids = httpx.get(f"{base}/v1/models", headers={"authorization": f"Bearer {KEYS['kids']}"}, timeout=10)
        assert kids.status_code == 403 and "may not call OpenAI" in kids.json()["error"]["message"]
        ops = httpx.get(f"{base}/v1/models", headers={"authorization": f"Bearer {KEYS['ops']}"}, timeout=10)
        assert ops.status_code == 503  # authenticated and allowed: past the gate, to "no upstream is configured"
