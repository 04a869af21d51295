"""`guard serve`: the sidecar (settings from flags, then GUARD_* variables; see server/settings.py)."""

from __future__ import annotations

import logging

from server.settings import add_serve_arguments


def cmd_serve(args) -> int:
    """Run the sidecar until SIGTERM; settings from flags, then GUARD_* environment variables."""
    import asyncio

    from server.app import serve
    from server.settings import settings_from

    settings = settings_from(args)
    logging.getLogger().setLevel(settings.log_level.upper())
    logging.getLogger(__name__).info("event=settings %s", settings.describe())
    return asyncio.run(serve(settings))


def add_parser(sub) -> None:
    serve = sub.add_parser("serve", help="run the gRPC sidecar (StreamGuard, health, reflection, metrics)")
    add_serve_arguments(serve)
    serve.set_defaults(func=cmd_serve)

