"""The cache's one build step: built once however many processes ask at the same time, and never
visible half-written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

BUILDER = """
import sys, time
from pathlib import Path
from guard.cache import cached_build

def build(tmp: Path) -> None:
    with open(sys.argv[1], "a") as log:
        log.write("built\\n")
    time.sleep(0.5)  # long enough for the other processes to be waiting on the lock
    (tmp / "config.json").write_text("{}")

print(cached_build("artefact-test", build))
"""


def test_concurrent_builders_build_once_and_agree(tmp_path):
    log = tmp_path / "builds.log"
    env = {"GUARD_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", BUILDER, str(log)], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    outputs = {p.communicate(timeout=120)[0].strip() for p in processes}
    assert all(p.returncode == 0 for p in processes)
    assert log.read_text().count("built") == 1, "more than one process built the artefact"
    (built,) = outputs
    assert (Path(built) / "config.json").exists()
    leftovers = [p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith(".artefact-test-")]
    assert leftovers == [], "a temporary build folder was left behind"
