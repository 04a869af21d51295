"""The ``guard`` command line as the tests run it.

``guard_script`` runs the installed console script in its own process: the entry point, the
environment and the exit status exactly as a user's shell sees them. ``guard_main`` calls the same
``server.cli.main(argv)`` in the test process: every command's own code, its output and exit
status, without paying the ~8 s of torch and transformers imports a fresh process costs. The
console script itself is run by test_cli, test_retrieval_cli and test_demo_model; other cases use
``guard_main``. An exception ``main`` does not turn into an exit status propagates (a traceback
is a failure).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

GUARD = str(Path(sys.executable).with_name("guard"))


def guard_script(*args: str, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``guard ARGS`` as a separate process (the installed console script)."""
    return subprocess.run(
        [GUARD, *args], input=stdin, capture_output=True, text=True, timeout=timeout, env=os.environ.copy()
    )


def guard_main(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """``guard ARGS`` in this process: stdin, stdout and stderr swapped for strings while it runs."""
    from server.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved_stdin = sys.stdin
    sys.stdin = io.StringIO(stdin or "")
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exit_:  # argparse's usage errors
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.stdin = saved_stdin
    return subprocess.CompletedProcess(["guard", *args], code, out.getvalue(), err.getvalue())
