"""`qwen3guard.v1.Judge`: Generative Qwen3Guard judgments with the domain policy's action.

The backend is the local judge (a checkpoint, batched across concurrent requests) or a remote
OpenAI-compatible endpoint. A judgment the model does not give in time, cannot give, or gives
in a form that does not parse is decided by the domain's fail mode, with a reason: never a
silent Safe.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from guard.errors import EngineError, InvalidInput
from guard.judge.judgment import Judgment, JudgmentParseError, judgment_action
from guard.judge.local import LocalJudge
from guard.judge.remote import JudgeUnavailable, RemoteJudge
from guard.policy.actions import Action
from guard.policy.loader import PolicyStore
from guard.policy.rules import FailMode, Policy
from guard.session.audit import AuditContext
from guard.text.conversation import parse_messages
from server.audit import AuditLog
from server.metrics import Metrics
from server.qwen3guard.v1 import guard_pb2 as pb
from server.qwen3guard.v1 import guard_pb2_grpc as pb_grpc
from server.tenants import current_tenant
from server.tracing import annotate
from server.wire import ACTION, ACTION_OF, RISK, status_of

log = logging.getLogger(__name__)

MAX_BATCH = 64


@dataclass
class JudgeBackend:
    """Exactly one of ``local`` / ``remote``; ``demo`` describes a demo judge."""

    local: LocalJudge | None = None
    remote: RemoteJudge | None = None

    @property
    def demo(self) -> bool:
        return bool(self.local is not None and self.local.demo)

    @property
    def model(self) -> str:
        """The judge's name for audit records: the checkpoint directory, or the endpoint's model."""
        if self.local is not None:
            return self.local.path.name
        return self.remote.model or self.remote.base if self.remote is not None else ""

    async def classify(self, messages: list[dict], scored: bool) -> Judgment:
        if self.local is not None:
            return await asyncio.wrap_future(self.local.classify(messages, scored=scored))
        if scored:
            raise InvalidInput("`scored` needs the local judge; the remote endpoint only generates")
        return await self.remote.classify(messages)

    async def close(self) -> None:
        if self.local is not None:
            await asyncio.to_thread(self.local.close)
        if self.remote is not None:
            await self.remote.close()


class JudgeHolder:
    def __init__(self) -> None:
        self.backend: JudgeBackend | None = None


class JudgeService(pb_grpc.JudgeServicer):
    def __init__(self, holder: JudgeHolder, policies: PolicyStore, metrics: Metrics,
                 audit: AuditLog | None = None) -> None:  # fmt: skip
        self.holder = holder
        self.policies = policies
        self.metrics = metrics
        self.audit = audit  # the decision audit log: one record per judgment that is not a plain ALLOW

    def _audit(
        self, policy: Policy, request: pb.ClassifyRequest, messages: list[dict], stage: int, action: Action,
        risk: str = "", categories: Sequence[str] = (), refusal: bool | None = None, fail_mode: str = "",
    ) -> None:  # fmt: skip
        if self.audit is None:
            return
        backend = self.holder.backend
        tenant = current_tenant.get()
        context = AuditContext(request.request_id or uuid.uuid4().hex, "judge", tenant=tenant.name if tenant else "",
                               model=backend.model if backend else "")  # fmt: skip
        trail = self.audit.trail(policy, context, end_record=False)
        conversation = lambda: json.dumps(messages, ensure_ascii=False, sort_keys=True)  # noqa: E731 (only if written)
        trail.judgment("prompt" if stage == pb.PROMPT else "response", action, ",".join(categories), risk, refusal,
                       fail_mode, conversation)  # fmt: skip

    async def Classify(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext) -> pb.Judgment:
        try:
            return await self._classify(request)
        except EngineError as exc:  # bad input, a full judge queue, the judge shutting down
            await context.abort(status_of(exc), str(exc))
        except _NoJudge as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))

    async def ClassifyBatch(self, request: pb.ClassifyBatchRequest, context) -> pb.ClassifyBatchResponse:
        if len(request.requests) > MAX_BATCH:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"`requests` has {len(request.requests)} entries; at most {MAX_BATCH}"
            )
        try:
            judgments = await asyncio.gather(*(self._classify(r) for r in request.requests))
        except EngineError as exc:  # bad input, a full judge queue, the judge shutting down
            await context.abort(status_of(exc), str(exc))
        except _NoJudge as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        return pb.ClassifyBatchResponse(judgments=judgments)

    async def _classify(self, request: pb.ClassifyRequest) -> pb.Judgment:
        backend = self.holder.backend
        if backend is None:
            raise _NoJudge("no judge is loaded (still loading, or the sidecar runs without --judge)")
        messages = [
            m.as_dict() for m in parse_messages([{"role": m.role, "content": m.content} for m in request.messages])
        ]
        if messages[-1]["role"] not in ("user", "assistant"):
            raise InvalidInput("the conversation must end with a user turn (prompt) or an assistant turn (response)")
        policy = self.policies.get(request.domain)
        stage = pb.RESPONSE if messages[-1]["role"] == "assistant" else pb.PROMPT
        try:
            judgment = await asyncio.wait_for(
                backend.classify(messages, request.scored), policy.model_timeout_ms / 1000
            )
        except (TimeoutError, JudgeUnavailable, JudgmentParseError) as exc:
            failed = self._failed(policy, stage, exc, backend.demo)
            annotate(domain=policy.name, action=ACTION_OF[failed.action].name, fail_mode=failed.reason)
            self._audit(policy, request, messages, stage, ACTION_OF[failed.action], fail_mode=failed.reason)
            return failed
        level, action = judgment_action(policy, judgment)
        stage_name = "prompt" if stage == pb.PROMPT else "response"
        annotate(domain=policy.name, policy_version=policy.version, stage=stage_name, risk=judgment.risk.name,
                 category=",".join(judgment.categories), action=action.name)  # fmt: skip
        self._audit(policy, request, messages, stage, action, judgment.risk.name, judgment.categories,
                    judgment.refusal)  # fmt: skip
        self.metrics.verdicts.labels(
            f"judge_{judgment.mode.value}", level.name, judgment.categories[0] if judgment.categories else ""
        ).inc()
        out = pb.Judgment(
            stage=stage,
            risk=RISK[judgment.risk.name],
            categories=judgment.categories,
            action=ACTION[action],
            effective_risk=RISK[level.name],
            raw_text=judgment.raw_text,
            policy_version=policy.version,
            timing=pb.Timing(queue_ms=judgment.queue_s * 1e3, compute_ms=judgment.inference_s * 1e3),
            demo=backend.demo,
        )
        if judgment.refusal is not None:
            out.refusal = judgment.refusal
        out.risk_probs.update(judgment.risk_probs)
        out.category_probs.update(judgment.category_probs)
        return out

    def _failed(self, policy: Policy, stage: int, exc: Exception, demo: bool) -> pb.Judgment:
        what = (
            f"the judge did not answer within {policy.model_timeout_ms} ms"
            if isinstance(exc, TimeoutError)
            else f"the judge output does not parse ({exc})"
            if isinstance(exc, JudgmentParseError)
            else f"the judge is unavailable ({exc})"
        )
        closed = policy.fail_mode is FailMode.CLOSED
        action = (
            (Action.BLOCK if stage == pb.PROMPT else Action.INTERRUPT)
            if closed
            else (Action.ALLOW if stage == pb.PROMPT else Action.CONTINUE)
        )
        self.metrics.fail_mode.labels(policy.name, policy.fail_mode.value, "judge").inc()
        log.warning(
            "event=judge_failure domain=%s fail_mode=%s error=%s",
            policy.name,
            policy.fail_mode.value,
            type(exc).__name__,
        )
        return pb.Judgment(
            stage=stage,
            action=ACTION[action],
            reason=f"{what}; fail {policy.fail_mode.value}",
            policy_version=policy.version,
            demo=demo,
        )


class _NoJudge(Exception):
    pass
