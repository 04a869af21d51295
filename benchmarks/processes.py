"""Server processes a benchmark starts, always ended however the benchmark ends.

One helper for every script, so that none leaves a sidecar, Envoy or py-spy running after an
error or a Ctrl-C, and each stops the same way: SIGTERM, a grace period, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def guard_command(*args: str) -> list[str]:
    """``guard ARGS`` with the CLI of the interpreter running the benchmark (the project's venv)."""
    return [str(Path(sys.executable).with_name("guard")), *args]


@contextlib.contextmanager
def running(
    command: list[str], what: str, *, log: Path | None = None, quiet: bool = False, grace_s: float = 60
) -> Iterator[subprocess.Popen]:
    """Run ``command`` from the repository root for the duration of the block.

    Output goes to ``log`` when given (stdout and stderr together), nowhere when ``quiet``, else to
    the benchmark's own terminal. On leaving, the process gets SIGTERM, ``grace_s`` seconds to
    exit, then SIGKILL, and is always waited for.
    """
    print(f"# starting {what}: {' '.join(command)}", file=sys.stderr)
    with contextlib.ExitStack() as stack:
        if log is not None:
            out = stack.enter_context(log.open("w"))
            streams = {"stdout": out, "stderr": subprocess.STDOUT}
        elif quiet:
            streams = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        else:
            streams = {}
        process = subprocess.Popen(command, cwd=REPO, **streams)
        try:
            yield process
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(grace_s)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
