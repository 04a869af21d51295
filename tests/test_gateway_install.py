"""A gateway installs the client and the interceptor without torch.

A fresh virtual environment gets ``pip install`` of this repository with no extras (built from
the working tree, not editable); torch and transformers must not be importable there, and a
script run by that environment's python moderates a real response through the interceptor,
against the real sidecar and a real LLM backend that this test process serves on loopback.

The environment with the base dependencies is cached under ``$GUARD_CACHE_DIR/gateway-venv``,
keyed by a hash of pyproject.toml; the project itself is reinstalled from the working tree on
every run, so the code under test is always the current one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from servers import LLM_METHOD, ScriptedTextBackend, running_backend

from guard.demo.corpus import SHOWCASE

REPO = Path(__file__).resolve().parents[1]
UNSAFE = SHOWCASE[2]
PIP_TIMEOUT_S = 600

# Run by the gateway environment's python: the interceptor on a channel to the backend.
GATEWAY_SCRIPT = r"""
import asyncio, json, sys

import grpc

import server
from server.interceptor import GuardInterceptor


async def main(job):
    async with grpc.aio.insecure_channel(job["sidecar"]) as sidecar:
        guard = GuardInterceptor(
            sidecar,
            conversation=lambda r: [{"role": "user", "content": r["prompt"]}],
            extract=lambda m: m["text"],
            make_stopped=lambda stop: {"stopped": True, "category": stop.category, "reason": stop.reason},
        )
        async with grpc.aio.insecure_channel(job["backend"], interceptors=guard.interceptors()) as channel:
            generate = channel.unary_stream(
                job["method"], request_serializer=lambda o: json.dumps(o).encode(), response_deserializer=json.loads
            )
            messages = [m async for m in generate(job["request"])]
    heavy = sorted(name for name in ("torch", "transformers", "numpy", "guard.model.engine") if name in sys.modules)
    print(json.dumps({"messages": messages, "heavy": heavy, "server": server.__file__}))


asyncio.run(main(json.loads(sys.stdin.read())))
"""


def _pip(python: Path, *args: str) -> None:
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        timeout=PIP_TIMEOUT_S,
    )
    if done.returncode:
        pytest.fail(f"pip install {' '.join(args)} failed:\n{done.stdout}{done.stderr}")


def _sources(into: Path) -> Path:
    """The package sources only (as deploy/Dockerfile copies them): building in place would leave
    build/ and egg-info in the shared working tree."""
    into.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, into / name)
    for package in ("guard", "server"):
        shutil.copytree(REPO / package, into / package, ignore=shutil.ignore_patterns("__pycache__"))
    return into


@pytest.fixture(scope="module")
def gateway_python(tmp_path_factory) -> Path:
    """A venv holding `pip install <repo>` without extras; reused while pyproject.toml is unchanged."""
    started = time.monotonic()
    key = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()[:16]
    root = Path(os.environ["GUARD_CACHE_DIR"]) / "gateway-venv"
    venv = root / key
    python = venv / "bin" / "python"
    sources = _sources(tmp_path_factory.mktemp("gateway") / "src")
    if not (venv / ".complete").exists():
        shutil.rmtree(venv, ignore_errors=True)  # a run that stopped half way
        # the base interpreter, not this venv: nothing of the test environment leaks in
        subprocess.run([sys._base_executable, "-m", "venv", str(venv)], check=True, timeout=120)
        _pip(python, str(sources))  # what a gateway runs: the base dependencies only
        _pip(python, "setuptools>=69")  # so that reruns build the project without isolation (fast)
        (venv / ".complete").touch()
    else:
        _pip(python, "--no-deps", "--no-build-isolation", "--force-reinstall", str(sources))
    print(f"gateway venv ready in {time.monotonic() - started:.1f} s ({venv})")
    return python


def test_base_install_has_neither_torch_nor_transformers(gateway_python):
    probe = "import importlib.util as u; print([m for m in ('torch', 'transformers') if u.find_spec(m)])"
    done = subprocess.run([str(gateway_python), "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]"


def test_gateway_interceptor_moderates_a_real_stream_without_torch(gateway_python, sidecar, tmp_path):
    backend = ScriptedTextBackend(delay=0.0)
    text = UNSAFE.response
    request = {"prompt": UNSAFE.prompt, "pieces": [text[i : i + 4] for i in range(0, len(text), 4)] + ["x"] * 200}
    with running_backend(backend) as backend_address:
        job = {"sidecar": sidecar.address, "backend": backend_address, "method": LLM_METHOD, "request": request}
        started = time.monotonic()
        done = subprocess.run(
            [str(gateway_python), "-c", GATEWAY_SCRIPT],
            input=json.dumps(job),
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,  # not the repository: `server` must come from the installed package
            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        )
        print(f"gateway script ran in {time.monotonic() - started:.1f} s")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["heavy"] == [], f"importing the interceptor pulled in {result['heavy']}"
    assert Path(result["server"]).is_relative_to(gateway_python.parents[1])
    *released, last = result["messages"]
    assert last["stopped"] and last["category"] == UNSAFE.response_category
    released_text = "".join(m["text"] for m in released)
    assert text.startswith(released_text) and len(released_text) <= UNSAFE.unsafe_from_char


def test_guard_command_without_the_serve_extra_says_what_to_install(gateway_python):
    guard = str(gateway_python.with_name("guard"))
    assert subprocess.run([guard, "serve", "--help"], capture_output=True, timeout=60).returncode == 0
    for command in (["moderate", "--text", "hello"], ["serve", "--address", "127.0.0.1:0", "--metrics-port", "0"]):
        done = subprocess.run([guard, *command], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, done.stderr
        assert "qwen3guard-sidecar[serve]" in done.stderr and "Traceback" not in done.stderr
