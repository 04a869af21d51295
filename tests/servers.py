"""Real servers on loopback for the tests: the sidecar in a background event loop, and LLM
backends (a tiny real Qwen3 causal LM generating token by token, and a scripted text streamer)
served with grpc.aio. No mocks of our own engine: the sidecar runs the real one."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import torch

from server.app import Sidecar, start_sidecar
from server.settings import ServeSettings

REPO = Path(__file__).resolve().parents[1]
LLM_SERVICE = "llm.v1.Generator"
LLM_METHOD = f"/{LLM_SERVICE}/Generate"


class LoopThread:
    """An asyncio loop in a daemon thread; ``run`` executes a coroutine there and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@dataclass
class RunningSidecar:
    sidecar: Sidecar
    loop: LoopThread

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.sidecar.port}"

    @property
    def engine(self):
        return self.sidecar.holder.runtime.engine


# Test domains that decide deterministically on any output of a random model.
ANY_OUTPUT_DOMAINS = {
    "permissive": "extends: default\nthresholds:\n  unsafe: 1.0\n",
    "always_interrupt": "extends: default\nthresholds:\n  unsafe: 0.0\nprompt:\n  unsafe: ALLOW\n",
    "redact_all": "extends: default\nthresholds:\n  unsafe: 0.0\nprompt:\n  unsafe: ALLOW\n"
    "response:\n  unsafe: REDACT\n",
}


def policies_with(directory: Path, **files: str) -> Path:
    """The shipped policies copied into ``directory`` plus test domains (``name=yaml_text``)."""
    import shutil

    shutil.copytree(REPO / "policies", directory, dirs_exist_ok=True)
    for name, text in files.items():
        (directory / f"{name}.yaml").write_text(text)
    return directory


@contextmanager
def running_sidecar(**overrides) -> Iterator[RunningSidecar]:
    overrides.setdefault("policies", str(REPO / "policies"))
    overrides.setdefault("audit_log", "")  # the audit log's own tests give it a file; stdout stays readable
    settings = ServeSettings(address="127.0.0.1:0", metrics_port=0, **overrides)
    loop = LoopThread()
    try:
        sidecar = loop.run(start_sidecar(settings))
    except BaseException:
        loop.stop()
        raise
    try:
        yield RunningSidecar(sidecar, loop)
    finally:
        loop.run(sidecar.drain(0))
        loop.stop()


# ----------------------------------------------------------------------------- LLM backends


def _json(obj) -> bytes:
    return json.dumps(obj).encode()


@dataclass
class BackendLog:
    """What the backend saw: requests, messages sent, cancellations."""

    sent: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)
    completed: threading.Event = field(default_factory=threading.Event)
    forwards: int = 0


class ScriptedTextBackend:
    """Streams ``request["pieces"]`` as {"text": piece} messages, ``delay`` seconds apart."""

    def __init__(self, delay: float = 0.02) -> None:
        self.delay = delay
        self.log = BackendLog()

    async def generate(self, request: dict, context) -> None:
        try:
            for piece in request["pieces"]:
                await asyncio.sleep(self.delay)
                self.log.sent += 1
                yield {"text": piece}
            self.log.completed.set()
        except (asyncio.CancelledError, GeneratorExit):  # cancelled while sleeping, or while sending
            self.log.cancelled.set()
            raise


class TinyModelBackend:
    """Greedy generation from a tiny random Qwen3ForCausalLM with the real vocabulary, one token a
    message ({"ids": [id], "text": piece}). ``force_ids`` constrains decoding (guided generation):
    each step's logits are masked to the next forced id, so the output is deterministic."""

    def __init__(self, tokenizer, delay: float = 0.0) -> None:
        from transformers import Qwen3Config, Qwen3ForCausalLM

        torch.manual_seed(0)
        cfg = Qwen3Config(
            vocab_size=151936,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            tie_word_embeddings=True,
        )
        self.model = Qwen3ForCausalLM(cfg).eval()
        self.tokenizer = tokenizer
        self.delay = delay
        self.log = BackendLog()

    def _step(self, ids: torch.Tensor, past):
        with torch.no_grad():
            out = self.model(input_ids=ids, cache=past, use_cache=True)
        self.log.forwards += 1
        return out.logits[0, -1], out.past_key_values

    async def generate(self, request: dict, context) -> None:
        prompt = self.tokenizer.encode(request["prompt"])
        forced = request.get("force_ids")
        steps = len(forced) if forced else request.get("max_tokens", 16)
        past = None
        ids = torch.tensor([prompt])
        try:
            for i in range(steps):
                logits, past = await asyncio.to_thread(self._step, ids, past)
                if forced:
                    mask = torch.full_like(logits, float("-inf"))
                    mask[forced[i]] = 0.0
                    logits = logits + mask
                token = int(torch.argmax(logits))
                ids = torch.tensor([[token]])
                self.log.sent += 1
                yield {"ids": [token], "text": self.tokenizer.decode([token])}
                await asyncio.sleep(self.delay)
            self.log.completed.set()
        except (asyncio.CancelledError, GeneratorExit):  # cancelled while computing, or while sending
            self.log.cancelled.set()
            raise


@contextmanager
def running_backend(backend) -> Iterator[str]:
    """Serve ``backend.generate`` as a unary-stream gRPC method (JSON payloads) on loopback."""
    loop = LoopThread()

    async def start():
        server = grpc.aio.server()

        async def chat(requests, context):
            first = await anext(aiter(requests))
            async for item in backend.generate(first, context):
                yield item

        handlers = {
            "Generate": grpc.unary_stream_rpc_method_handler(
                backend.generate, request_deserializer=json.loads, response_serializer=_json
            ),
            "Chat": grpc.stream_stream_rpc_method_handler(
                chat, request_deserializer=json.loads, response_serializer=_json
            ),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(LLM_SERVICE, handlers),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = loop.run(start())
    try:
        yield f"127.0.0.1:{port}"
    finally:
        loop.run(server.stop(0))
        loop.stop()


def llm_stub(channel: grpc.aio.Channel):
    """The gateway's view of the backend: a unary-stream callable with JSON payloads."""
    return channel.unary_stream(LLM_METHOD, request_serializer=_json, response_deserializer=json.loads)


def chat_stub(channel: grpc.aio.Channel):
    """The same backend as a stream-stream method (the first request carries the prompt)."""
    return channel.stream_stream(f"/{LLM_SERVICE}/Chat", request_serializer=_json, response_deserializer=json.loads)


def wait(future: Future, timeout: float = 30):
    return future.result(timeout)


# ----------------------------------------------------------------------------- a scripted vLLM


class VllmProtocolHandler(BaseHTTPRequestHandler):
    """What every fake of vLLM's OpenAI-compatible server shares: JSON answers, the model list,
    server-sent events over chunked encoding."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _json(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._json({"data": [{"id": "scripted"}]})

    def _start_events(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _event(self, body: dict | str) -> None:
        payload = f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n".encode()
        self.wfile.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
        self.wfile.flush()


class ScriptedVllm:
    """A real HTTP server on loopback speaking vLLM's OpenAI-compatible streaming protocol, with a
    scripted answer: ``/v1/completions`` streams ``response_ids`` (the token path: ``/tokenize``
    uses the guard's tokenizer), or, with ``text_path``, ``/tokenize`` disagrees with the guard and
    ``/v1/chat/completions`` streams the decoded text in pieces. ``chunk`` ids (or characters) per
    event. Fast and deterministic where a real vLLM is not needed (release modes, cancellation)."""

    def __init__(
        self, tokenizer, response_ids: list[int], *, text_path: bool = False, chunk: int = 3, delay: float = 0.0
    ) -> None:
        outer = self

        class Handler(VllmProtocolHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/tokenize":
                    ids = tokenizer.encode(body["prompt"], add_special_tokens=False)
                    self._json({"tokens": ids[::-1] if text_path else ids})
                    return
                outer.requests += 1
                self._start_events()
                try:
                    if self.path == "/v1/completions":
                        for k in range(0, len(response_ids), chunk):
                            ids = response_ids[k : k + chunk]
                            last = k + chunk >= len(response_ids)
                            choice = {
                                "index": 0,
                                "text": tokenizer.decode(ids),
                                "token_ids": ids,
                                "finish_reason": "stop" if last else None,
                            }
                            time.sleep(delay)
                            self._event({"choices": [choice]})
                            outer.sent += len(ids)
                    else:
                        text = tokenizer.decode(response_ids, skip_special_tokens=True)
                        for k in range(0, len(text), chunk):
                            last = k + chunk >= len(text)
                            delta = {
                                "index": 0,
                                "delta": {"content": text[k : k + chunk]},
                                "finish_reason": "stop" if last else None,
                            }
                            time.sleep(delay)
                            self._event({"choices": [delta]})
                            outer.sent += 1
                    self._event("[DONE]")
                    self.wfile.write(b"0\r\n\r\n")
                    self.wfile.flush()
                    outer.completed += 1
                except (BrokenPipeError, ConnectionResetError):
                    outer.disconnected += 1

        self.requests = self.sent = self.completed = self.disconnected = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
