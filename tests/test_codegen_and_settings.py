"""Generated gRPC code is fresh; `guard serve` settings come from flags, then environment."""

from __future__ import annotations

import argparse
import filecmp
from pathlib import Path

import pytest

from server.codegen import generate
from server.settings import ServeSettings, add_serve_arguments, env_name, settings_from

REPO = Path(__file__).resolve().parents[1]


def test_generated_code_matches_the_proto(tmp_path):
    written = generate(tmp_path)
    assert written
    for path in written:
        committed = REPO / "server" / path.relative_to(tmp_path)
        assert committed.exists(), f"{committed} is missing: run `make proto`"
        assert filecmp.cmp(path, committed, shallow=False), f"{committed} is stale: run `make proto`"


def parse(argv: list[str], env: dict[str, str] | None = None) -> ServeSettings:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return settings_from(parser.parse_args(argv), env or {})


def test_defaults_work():
    s = parse([])
    assert s == ServeSettings()
    assert s.engine_limits().max_kv_cache_bytes is None


def test_flags_win_over_environment():
    s = parse(["--max-sessions", "7", "--log-content"], {"GUARD_MAX_SESSIONS": "3", "GUARD_DTYPE": "bf16"})
    assert (s.max_sessions, s.dtype, s.log_content) == (7, "bf16", True)


def test_environment_fills_what_flags_leave_out():
    s = parse([], {env_name("idle_timeout_s"): "2.5", "GUARD_MAX_KV_CACHE_MB": "64", "GUARD_LOG_CONTENT": "no"})
    assert s.idle_timeout_s == 2.5 and s.engine_limits().max_kv_cache_bytes == 64 * 2**20 and not s.log_content


def test_bad_environment_value_is_named():
    with pytest.raises(ValueError, match="GUARD_MAX_SESSIONS='many'"):
        parse([], {"GUARD_MAX_SESSIONS": "many"})


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"upstream_url": "http://127.0.0.1:8000", "upstream_grpc": "127.0.0.1:50052"}, "one upstream, not"),
        ({"upstream_engine": "llama.cpp"}, "must be 'async-llm'"),
        ({"upstream_engine": "async-llm"}, "needs --upstream-model"),
    ],
)
def test_upstream_settings_that_cannot_work_are_refused_at_start(fields, match):
    from server.app import build_upstream

    with pytest.raises(ValueError, match=match):
        build_upstream(ServeSettings(**fields))


def test_unknown_upstream_input_path_is_refused():
    from server.guarded_generation import GuardedGenerationService

    with pytest.raises(ValueError, match="auto, token_ids, text"):
        GuardedGenerationService(guard=None, upstream=None, input_path="bytes")


def test_torch_threads_setting():
    import torch

    from guard.runtime import _TORCH_DEFAULT_THREADS, configure_torch_threads

    before = torch.get_num_threads()
    try:
        assert configure_torch_threads(3) == 3 == torch.get_num_threads()
        assert configure_torch_threads(0) == _TORCH_DEFAULT_THREADS == torch.get_num_threads()  # 0: torch's default
        with pytest.raises(ValueError, match="threads"):
            configure_torch_threads(-1)
    finally:
        torch.set_num_threads(before)
