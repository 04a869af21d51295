"""Policies over gRPC: the Policies service, domains on StreamGuard streams, REDACT, and the
fail mode when the model is too slow or goes away (fail closed interrupts, fail open continues
and is counted)."""

from __future__ import annotations

import shutil

import grpc
import pytest
from servers import REPO, running_sidecar

from guard.demo.corpus import SHOWCASE
from server.client import SidecarClient
from server.qwen3guard.v1 import guard_pb2 as pb
from server.qwen3guard.v1 import guard_pb2_grpc as pb_grpc

PII = SHOWCASE[3]  # the demo flags the credit card sentence as PII


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


async def test_policies_service_lists_gets_evaluates_and_reloads(sidecar):
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        stub = pb_grpc.PoliciesStub(channel)
        listing = await stub.List(pb.ListPoliciesRequest())
        domains = {p.domain: p for p in listing.policies}
        assert {"default", "medical", "children_education"} <= set(domains)
        assert domains["medical"].extends == "default" and listing.generation >= 1 and not listing.last_error
        detail = await stub.Get(pb.GetPolicyRequest(domain="medical"))
        assert "REDACT" in detail.effective_yaml and detail.summary.version == domains["medical"].version
        redact = await stub.Evaluate(
            pb.EvaluateRequest(domain="medical", stage=pb.RESPONSE, risk=pb.UNSAFE, category="PII")
        )
        assert redact.action == pb.REDACT
        research = pb.EvaluateRequest(
            domain="security_research", stage=pb.RESPONSE, risk=pb.UNSAFE, category="Self-Harm"
        )
        assert (await stub.Evaluate(research)).action == pb.INTERRUPT
        research.probabilities.update({"Safe": 0.3, "Unsafe": 0.6, "Controversial": 0.1})  # below its 0.8 threshold
        below = await stub.Evaluate(research)
        assert below.action == pb.CONTINUE and below.effective_risk == pb.SAFE
        reload = await stub.Reload(pb.ReloadRequest())
        assert reload.ok and not reload.changed
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Evaluate(pb.EvaluateRequest(domain="nope", stage=pb.PROMPT, risk=pb.SAFE))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown domain 'nope'" in info.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Get(pb.GetPolicyRequest(domain="nope"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_unknown_domain_on_a_stream_is_invalid_argument(sidecar):
    async with SidecarClient(sidecar.address) as client:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async with client.moderate(messages=user("Hello"), domain="nope"):
                pass
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown domain 'nope'" in info.value.details()


async def test_redact_replaces_the_span_and_the_stream_continues(sidecar, guard_tokenizer):
    ids = guard_tokenizer.encode(PII.response)
    async with SidecarClient(sidecar.address) as client:
        async with client.moderate(messages=user(PII.prompt), domain="medical") as stream:
            assert stream.prompt.policy_version
            released, spans = "", []
            for i in range(0, len(ids), 5):
                chunk = (await stream.send_ids(ids[i : i + 5])).chunk
                assert chunk.action != pb.INTERRUPT
                released += chunk.released_text
                spans += [(s.start, s.end) for s in chunk.redactions]
            final = await stream.close()
    released += final.released_text
    spans += [(s.start, s.end) for s in final.redactions]
    assert final.action == pb.CONTINUE
    assert released.startswith("Here is a simple plan")
    assert "[personal data removed]" in released and "4111" not in released
    span_start = len(guard_tokenizer.encode(PII.response[: PII.unsafe_from_char]))
    assert spans and all(start >= span_start - 1 for start, _ in spans)


async def test_the_default_domain_interrupts_the_same_response(sidecar, guard_tokenizer):
    ids = guard_tokenizer.encode(PII.response)
    async with SidecarClient(sidecar.address) as client:
        async with client.moderate(messages=user(PII.prompt)) as stream:
            response = await stream.send_ids(ids)
    assert response.chunk.action == pb.INTERRUPT


def fail_mode_policies(tmp_path, timeout_ms: int):
    directory = tmp_path / "policies"
    shutil.copytree(REPO / "policies", directory)
    (directory / "closed.yaml").write_text(f"extends: default\nfail_mode: closed\nmodel_timeout_ms: {timeout_ms}\n")
    (directory / "open.yaml").write_text(f"extends: default\nfail_mode: open\nmodel_timeout_ms: {timeout_ms}\n")
    return directory


LONG_PROMPT = " ".join([SHOWCASE[0].prompt] * 60)  # a prefill that takes well over 1 ms


async def test_model_slower_than_the_timeout(demo_dir, tmp_path):
    with running_sidecar(model=str(demo_dir), policies=str(fail_mode_policies(tmp_path, 1))) as slow:
        metrics = slow.sidecar.metrics
        async with SidecarClient(slow.address) as client:
            async with client.moderate(messages=user(LONG_PROMPT), domain="closed") as stream:
                assert stream.prompt.verdict.action == pb.BLOCK
                assert "did not answer within 1 ms; fail closed" in stream.prompt.reason
                final = await stream.close()
                assert final.action == pb.INTERRUPT and "fail closed" in final.reason
            async with client.moderate(messages=user(LONG_PROMPT), domain="open") as stream:
                assert stream.prompt.verdict.action == pb.ALLOW and "fail open" in stream.prompt.reason
                chunk = (await stream.send_text("Mix the flour, water and salt.")).chunk
                assert chunk.unjudged and chunk.action == pb.CONTINUE
                assert chunk.released_text == "Mix the flour, water and salt."
                final = await stream.close()
                assert final.action == pb.CONTINUE
        assert (
            metrics.registry.get_sample_value(
                "guard_fail_mode_total", {"domain": "open", "mode": "open", "stage": "prompt"}
            )
            == 1
        )
        assert (
            metrics.registry.get_sample_value(
                "guard_fail_mode_total", {"domain": "closed", "mode": "closed", "stage": "prompt"}
            )
            == 1
        )


async def test_model_unavailable_mid_stream(demo_dir, tmp_path, guard_tokenizer):
    ids = guard_tokenizer.encode(SHOWCASE[0].response)
    with running_sidecar(model=str(demo_dir), policies=str(fail_mode_policies(tmp_path, 5000))) as sidecar:
        async with SidecarClient(sidecar.address) as client:
            async with (
                client.moderate(messages=user(SHOWCASE[0].prompt), domain="closed") as closed,
                client.moderate(messages=user(SHOWCASE[0].prompt), domain="open") as opened,
            ):
                assert (await closed.send_ids(ids[:4])).chunk.action == pb.CONTINUE
                assert (await opened.send_ids(ids[:4])).chunk.action == pb.CONTINUE
                sidecar.engine.shutdown()  # the model goes away under both streams
                failed = (await closed.send_ids(ids[4:8])).chunk
                assert failed.action == pb.INTERRUPT and "unavailable" in failed.reason
                assert (await closed.close()).action == pb.INTERRUPT
                kept = (await opened.send_ids(ids[4:8])).chunk
                assert kept.unjudged and kept.action == pb.CONTINUE and kept.released == 8
                final = await opened.close()
                assert final.action == pb.CONTINUE
        metrics = sidecar.sidecar.metrics
        assert (
            metrics.registry.get_sample_value(
                "guard_fail_mode_total", {"domain": "open", "mode": "open", "stage": "response"}
            )
            == 1
        )


async def test_live_edit_applies_to_new_streams_and_open_streams_keep_theirs(demo_dir, tmp_path, guard_tokenizer):
    import asyncio

    directory = fail_mode_policies(tmp_path, 5000)
    with running_sidecar(model=str(demo_dir), policies=str(directory), policy_poll_s=0.05) as sidecar:
        async with SidecarClient(sidecar.address) as client, grpc.aio.insecure_channel(sidecar.address) as channel:
            policies = pb_grpc.PoliciesStub(channel)
            async with client.moderate(messages=user(PII.prompt), domain="medical") as before:
                (directory / "medical.yaml").write_text("extends: default\ndebounce: 1\n")  # drops the PII redaction
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 1.0
                old_version = before.prompt.policy_version
                while True:
                    async with client.moderate(messages=user(PII.prompt), domain="medical") as after:
                        if after.prompt.policy_version != old_version:
                            break
                    assert loop.time() < deadline, "the edit did not apply within a second"
                    await asyncio.sleep(0.05)
                ids = guard_tokenizer.encode(PII.response)
                kept = await before.send_ids(ids)  # the open stream still redacts
                assert kept.chunk.action == pb.REDACT
            (directory / "medical.yaml").write_text("extends: default\nrelease_mode: sometimes\n")
            while not (await policies.List(pb.ListPoliciesRequest())).last_error:
                await asyncio.sleep(0.05)
            listing = await policies.List(pb.ListPoliciesRequest())
            assert "medical.yaml:2: release_mode" in listing.last_error
            async with client.moderate(messages=user(PII.prompt), domain="medical") as current:
                assert current.prompt.policy_version == after.prompt.policy_version  # last good stays
        metrics = sidecar.sidecar.metrics.registry
        assert metrics.get_sample_value("guard_policy_last_reload_ok") == 0
        assert metrics.get_sample_value("guard_policy_rejected_total") >= 1
