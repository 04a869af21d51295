"""Guard objects <-> protobuf, and guard errors -> gRPC status codes: shared by every service."""

from __future__ import annotations

import logging

import grpc

from guard.errors import (
    EngineError,
    EngineStopped,
    FailedPrecondition,
    InvalidInput,
    LimitExceeded,
    PermissionDenied,
    SessionExpired,
    Unauthenticated,
)
from guard.model.labels import RiskLevel
from guard.policy.actions import Action
from guard.policy.compiled import ACTIONS
from guard.session.moderation import ChunkVerdict
from guard.session.response_session import ChunkOutcome, FinalOutcome
from guard.session.verdict import Verdict
from server.qwen3guard.v1 import guard_pb2 as pb

log = logging.getLogger(__name__)

RISK = {"SAFE": pb.SAFE, "CONTROVERSIAL": pb.CONTROVERSIAL, "UNSAFE": pb.UNSAFE}
ACTION = {a: pb.Action.Value(a.name) for a in Action}
ACTION_OF = {value: action for action, value in ACTION.items()}  # the wire value back to the Action
_LEVEL_PB = [RISK[level.name] for level in RiskLevel]  # by RiskLevel value
_ACTION_PB = [ACTION[a] for a in ACTIONS]  # by action code


class Unavailable(Exception):
    """Loading, draining, or not configured: the caller should retry elsewhere or later (UNAVAILABLE)."""


def status_of(error: EngineError) -> grpc.StatusCode:
    if isinstance(error, InvalidInput):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(error, LimitExceeded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(error, FailedPrecondition):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(error, Unauthenticated):
        return grpc.StatusCode.UNAUTHENTICATED
    if isinstance(error, PermissionDenied):
        return grpc.StatusCode.PERMISSION_DENIED
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


def check_token_detail(value: int, where: str) -> None:
    """An unknown ``TokenDetail`` is the caller's error (proto3 would let it through silently)."""
    if value not in pb.TokenDetail.values():
        known = sorted(pb.TokenDetail.values())
        raise InvalidInput(f"{where}: `token_detail` {value} is not a TokenDetail value {known}")


def chunk_pb(outcome: ChunkOutcome, probabilities: bool, detail: int = pb.ALL_TOKENS) -> pb.ChunkVerdict:
    """The chunk's message; ``detail`` (a ``TokenDetail``) says which token verdicts it carries."""
    out = pb.ChunkVerdict()
    fill_chunk(out, outcome, probabilities, detail)
    return out


def fill_chunk(out: pb.ChunkVerdict, outcome: ChunkOutcome, probabilities: bool, detail: int = pb.ALL_TOKENS) -> None:
    """Fill ``out`` (a field of the response being built: no copy) from the chunk's outcome."""
    out.action = ACTION[outcome.action]
    out.released = outcome.released
    out.released_chars = outcome.released_chars
    out.judged = outcome.judged
    out.received = outcome.received
    if outcome.released_text:
        out.released_text = outcome.released_text
    if outcome.unjudged:
        out.unjudged = True
    if outcome.reason:
        out.reason = outcome.reason
    for a, b in outcome.redactions:
        out.redactions.add(start=a, end=b)
    chunk = outcome.verdict
    if chunk is not None and chunk.count:
        if detail != pb.NO_TOKENS:
            _add_tokens(out.tokens, chunk, probabilities, not_safe_only=detail == pb.NOT_SAFE_TOKENS)
        out.timing.queue_ms = outcome.queue_s * 1e3
        out.timing.compute_ms = outcome.compute_s * 1e3
    if outcome.flag_index is not None:
        out.first_unsafe_index = outcome.flag_index


def _add_tokens(tokens, chunk: ChunkVerdict, probabilities: bool, *, not_safe_only: bool) -> None:
    """Token verdict messages straight from the chunk's lists (no per-token Python objects)."""
    judgement, scores = chunk.judgement, chunk.scores
    levels, actions = judgement.level, judgement.action
    if not_safe_only:
        if judgement.all_safe:
            return
        rows: list[int] | range = [i for i, level in enumerate(levels) if level]  # SAFE is 0
    else:
        rows = range(chunk.count)
    risk_names, label_levels = chunk.risk_labels.labels.names, chunk.risk_labels.levels
    category_names = chunk.categories.names
    risk_index, category_index, chosen = scores.risk_index, scores.category_index, scores.risk_probability
    ids, first = scores.token_ids, scores.first_index
    add = tokens.add
    for i in rows:
        verdict = add(index=first + i, token_id=ids[i]).verdict
        r = risk_index[i]
        verdict.risk = _LEVEL_PB[levels[i]]
        verdict.risk_label = risk_names[r]
        verdict.risk_probability = chosen[i]
        if label_levels[r] is not RiskLevel.SAFE:  # the model's category, only when its label is not Safe
            verdict.category = category_names[category_index[i]]
        verdict.action = _ACTION_PB[actions[i]]
        if probabilities:
            verdict.risk_probs.update(zip(risk_names, scores.risk_probs[i].tolist(), strict=True))
            verdict.category_probs.update(zip(category_names, scores.category_probs[i].tolist(), strict=True))


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
