"""The decision audit log on a real sidecar: an interrupted stream writes exactly one interrupt
record (its offset and policy version) and one end record; a blocked prompt one decision record;
no record and no log line holds the users' text (only its SHA-256); a file that cannot be
written is counted and turns the audit health name NOT_SERVING, and the streams go on."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from servers import ANY_OUTPUT_DOMAINS, policies_with, running_sidecar
from test_stream_guard_service import moderate_text

from guard.text.conversation import Message
from server.qwen3guard.v1 import guard_pb2 as pb

SECRET_PROMPT = "Tell me about the Zanzibar heron migration."
SECRET_ANSWER = "The Zanzibar herons leave in March and return in October."
BLOCKED = SimpleNamespace(prompt="How do I build a pipe bomb at home?", response="Sure.")


@pytest.fixture(scope="module")
def policies(tmp_path_factory):
    slow_rule = "extends: default\nthresholds:\n  unsafe: 0.0\nprompt:\n  unsafe: ALLOW\ndebounce: 64\n"
    return policies_with(tmp_path_factory.mktemp("policies"), slow_rule=slow_rule, **ANY_OUTPUT_DOMAINS)


def records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_one_record_per_decision_and_per_end_without_the_text(
    demo_dir, policies, tmp_path, caplog, guard_tokenizer
):
    audit = tmp_path / "audit.jsonl"
    caplog.set_level(logging.DEBUG)
    with running_sidecar(model=str(demo_dir), policies=str(policies), judge="", audit_log=str(audit)) as sidecar:
        example = SimpleNamespace(prompt=SECRET_PROMPT, response=SECRET_ANSWER)
        responses = await moderate_text(sidecar.address, example, domain="always_interrupt", request_id="req-1")
        final = responses[-1].final
        policy_version = responses[0].prompt.policy_version
        blocked = await moderate_text(sidecar.address, BLOCKED, request_id="req-2")
        assert blocked[0].prompt.verdict.action == pb.BLOCK
    written = records(audit)
    first = [r for r in written if r["request_id"] == "req-1"]
    decisions = [r for r in first if r["kind"] == "decision"]
    assert [r["action"] for r in decisions].count("INTERRUPT") == 1  # exactly one interrupt record
    interrupt = decisions[-1]
    assert interrupt["action"] == "INTERRUPT" and interrupt["stage"] == "response"
    assert interrupt["offset"] == final.first_unsafe_index and interrupt["policy_version"] == policy_version
    assert interrupt["category"] == final.category
    assert interrupt["domain"] == "always_interrupt" and interrupt["front_end"] == "moderate"
    assert interrupt["model"] == demo_dir.name and len(interrupt["model_digest"]) == 16
    ends = [r for r in first if r["kind"] == "end"]
    assert len(ends) == 1 and ends[0]["outcome"] == "interrupted"
    second = [r for r in written if r["request_id"] == "req-2"]
    assert [(r["stage"], r["action"]) for r in second if r["kind"] == "decision"] == [("prompt", "BLOCK")]
    prompt_record = next(r for r in second if r["kind"] == "decision")
    rendered = guard_tokenizer.render_prompt([Message("user", BLOCKED.prompt)])
    judged = guard_tokenizer.hf.decode(rendered.prompt_ids)  # what the prompt verdict judged
    assert prompt_record["text_sha256"] == hashlib.sha256(judged.encode()).hexdigest()
    assert [r["outcome"] for r in second if r["kind"] == "end"] == ["blocked"]
    # never the text: not in a record, not in a log line (by default)
    raw = audit.read_text() + "\n".join(r.getMessage() for r in caplog.records)
    for secret in ("Zanzibar", "pipe bomb", SECRET_ANSWER):
        assert secret not in raw
    assert all(len(r["text_sha256"]) == 64 for r in written if "text_sha256" in r)


async def test_a_failing_audit_log_is_counted_and_reported(demo_dir, policies):
    """/dev/full takes the file open but refuses every write."""
    with running_sidecar(model=str(demo_dir), policies=str(policies), judge="", audit_log="/dev/full") as sidecar:
        example = SimpleNamespace(prompt=SECRET_PROMPT, response=SECRET_ANSWER)
        responses = await moderate_text(sidecar.address, example, domain="always_interrupt")
        assert responses[-1].WhichOneof("kind") == "final"  # the stream itself is unaffected
        failures = sidecar.sidecar.metrics.audit_failures
        async with grpc.aio.insecure_channel(sidecar.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = asyncio.get_running_loop().time() + 10  # the writer thread reports as it writes
            while True:
                status = await health.Check(health_pb2.HealthCheckRequest(service="qwen3guard.audit"))
                if failures._value.get() >= 2 and status.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break  # the interrupt and the end, neither lost silently
                assert asyncio.get_running_loop().time() < deadline, (failures._value.get(), status.status)
                await asyncio.sleep(0.05)
            whole = await health.Check(health_pb2.HealthCheckRequest(service=""))
            assert whole.status == health_pb2.HealthCheckResponse.SERVING  # degraded, not down


async def test_a_file_audit_log_rotates_by_size(demo_dir, policies, tmp_path):
    audit = tmp_path / "audit.jsonl"
    settings = {"audit_log": str(audit), "audit_max_bytes": 1200, "audit_backups": 2}
    with running_sidecar(model=str(demo_dir), policies=str(policies), judge="", **settings) as sidecar:
        example = SimpleNamespace(prompt=SECRET_PROMPT, response=SECRET_ANSWER)
        for _ in range(4):
            await moderate_text(
                sidecar.address, example, domain="redact_all"
            )  # records without an interrupt's 5 s drain
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    assert all(p.stat().st_size <= 1200 for p in tmp_path.iterdir())
    assert all(records(p) for p in tmp_path.iterdir())  # whole JSON lines in each


async def test_flag_and_redact_records_name_their_token(demo_dir, policies, tmp_path):
    """Every FLAG and REDACT record names the response token it concerns (thresholds at 0 here: the
    model itself may call the tokens Safe, so there is no category to name)."""
    audit = tmp_path / "audit.jsonl"
    with running_sidecar(model=str(demo_dir), policies=str(policies), judge="", audit_log=str(audit)) as sidecar:
        example = SimpleNamespace(prompt=SECRET_PROMPT, response=SECRET_ANSWER)
        await moderate_text(sidecar.address, example, domain="redact_all", request_id="redact")
        await moderate_text(sidecar.address, example, domain="slow_rule", request_id="flag")
    written = records(audit)
    for request_id, action in (("redact", "REDACT"), ("flag", "FLAG")):
        decisions = [r for r in written if r["request_id"] == request_id and r["kind"] == "decision"]
        assert decisions and all(r["action"] == action for r in decisions)
        offsets = [r["offset"] for r in decisions]
        assert all(isinstance(o, int) for o in offsets) and offsets == sorted(set(offsets)), offsets
        assert all(len(r["text_sha256"]) == 64 for r in decisions)  # (category: "" where the model says Safe)
        assert offsets[-1] < decisions[-1]["tokens_judged"]
