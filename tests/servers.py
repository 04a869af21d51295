"""Real servers on loopback for the tests: the sidecar in a background event loop, and LLM
backends (a tiny real Qwen3 causal LM generating token by token, and a scripted text streamer)
served with grpc.aio. No mocks of our own engine: the sidecar runs the real one."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
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


@contextmanager
def running_sidecar(**overrides) -> Iterator[RunningSidecar]:
    overrides.setdefault("policies", str(REPO / "policies"))
    settings = ServeSettings(address="127.0.0.1:0", metrics_port=0, **overrides)
    loop = LoopThread()
    sidecar = loop.run(start_sidecar(settings))
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
