"""The configured Generative judge backend: an endpoint, a checkpoint, the demo, or none."""

from __future__ import annotations

import logging

from server.judge_service import JudgeBackend
from server.settings import ServeSettings

log = logging.getLogger(__name__)


def load_judge(settings: ServeSettings) -> JudgeBackend | None:
    """The configured Generative judge: an endpoint, a checkpoint, the demo, or none."""
    if settings.judge_endpoint:
        from guard.judge.remote import RemoteJudge

        return JudgeBackend(
            remote=RemoteJudge(
                settings.judge_endpoint,
                model=settings.judge_model or None,
                retries=settings.judge_retries,
                concurrency=settings.judge_concurrency,
            )
        )
    if not settings.judge:
        return None
    from guard.judge.local import LocalJudge
    from guard.runtime import parse_dtype

    if settings.judge == "demo":
        from guard.demo.judge_model import demo_judge_dir

        path = demo_judge_dir()
    else:
        path = settings.judge
    local = LocalJudge(
        path,
        device=settings.device,
        dtype=parse_dtype(settings.dtype),
        max_batch=settings.judge_max_batch,
        wait_ms=settings.judge_wait_ms,
        max_queue=settings.judge_max_queue,
    )
    if local.demo:
        log.warning("event=demo_judge notice=%r", local.demo.get("notice"))
    return JudgeBackend(local=local)
