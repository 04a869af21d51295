"""Guard objects <-> protobuf, and guard errors -> gRPC status codes: shared by every service."""

from __future__ import annotations

import logging

import grpc

from guard.errors import EngineError, EngineStopped, FailedPrecondition, InvalidInput, LimitExceeded, SessionExpired
from guard.model.labels import RiskLevel
from guard.policy.actions import Action
from guard.session.response_session import ChunkOutcome, FinalOutcome
from guard.session.verdict import Verdict
from server.qwen3guard.v1 import guard_pb2 as pb

log = logging.getLogger(__name__)

RISK = {"SAFE": pb.SAFE, "CONTROVERSIAL": pb.CONTROVERSIAL, "UNSAFE": pb.UNSAFE}
ACTION = {a: pb.Action.Value(a.name) for a in Action}


class Unavailable(Exception):
    """Loading, draining, or not configured: the caller should retry elsewhere or later (UNAVAILABLE)."""


def status_of(error: EngineError) -> grpc.StatusCode:
    if isinstance(error, InvalidInput):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(error, LimitExceeded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(error, FailedPrecondition):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(error, EngineStopped):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(error, SessionExpired):
        return grpc.StatusCode.ABORTED
    return grpc.StatusCode.ABORTED


def error_status(exc: BaseException, *, request_id: str, rpc: str) -> tuple[grpc.StatusCode, str]:
    """The status and message a handler ends with for ``exc``. Unexpected errors are INTERNAL,
    logged once here with the request id (and the traceback), never with request content."""
    if isinstance(exc, Unavailable):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, EngineError):
        return status_of(exc), str(exc)
    log.error("event=internal_error rpc=%s request_id=%s error=%s", rpc, request_id, type(exc).__name__, exc_info=exc)
    return grpc.StatusCode.INTERNAL, (
        f"internal error in {rpc} ({type(exc).__name__}); request_id={request_id or 'none'}: "
        "the sidecar logged the details"
    )


def verdict_pb(verdict: Verdict, level: RiskLevel, action: Action, probabilities: bool) -> pb.Verdict:
    msg = pb.Verdict(
        risk=RISK[level.name],
        risk_label=verdict.risk_label,
        risk_probability=verdict.risk_probability,
        category=verdict.category or "",
        action=ACTION[action],
    )
    if probabilities:
        msg.risk_probs.update(verdict.risk_probs)
        msg.category_probs.update(verdict.category_probs)
    return msg


def chunk_pb(outcome: ChunkOutcome, probabilities: bool) -> pb.ChunkVerdict:
    out = pb.ChunkVerdict(
        tokens=[
            pb.TokenVerdict(
                index=t.index, token_id=t.token_id, verdict=verdict_pb(t.verdict, t.level, t.action, probabilities)
            )
            for t in outcome.tokens
        ],
        action=ACTION[outcome.action],
        released=outcome.released,
        released_text=outcome.released_text,
        released_chars=outcome.released_chars,
        judged=outcome.judged,
        received=outcome.received,
        unjudged=outcome.unjudged,
        reason=outcome.reason,
        redactions=[pb.Span(start=a, end=b) for a, b in outcome.redactions],
    )
    if outcome.tokens:
        out.timing.CopyFrom(pb.Timing(queue_ms=outcome.queue_s * 1e3, compute_ms=outcome.compute_s * 1e3))
    if outcome.flag_index is not None:
        out.first_unsafe_index = outcome.flag_index
    return out


def final_pb(outcome: FinalOutcome) -> pb.FinalResponse:
    final = pb.FinalResponse(
        action=pb.INTERRUPT if outcome.interrupted else pb.CONTINUE,
        judged=outcome.judged,
        released=outcome.released,
        released_chars=outcome.released_chars,
        released_text=outcome.released_text,
        redactions=[pb.Span(start=a, end=b) for a, b in outcome.redactions],
        reason=outcome.reason,
        category=outcome.category,
    )
    if outcome.flag_index is not None:
        final.first_unsafe_index = outcome.flag_index
    return final
