"""The `vllm` backend of the Embedder and the Reranker: the forward pass runs in a vLLM server
that already serves the model (``--runner pooling``), the rest stays here.

The sidecar still renders every sequence itself (instruction, official prompt, ``<|endoftext|>``,
truncation) from the checkpoint directory's tokenizer, and sends token ids, so both backends
compute the same thing: ``/v1/embeddings`` with ``use_activation: false`` returns the raw
last-token vector (MRL and normalisation are ours, as locally); ``/classify`` with
``use_activation: false`` returns the reranker's logit ``l_yes - l_no`` (vLLM turns the original
Qwen3-Reranker into that one-logit classifier with ``hf_overrides``, see the README). One HTTP
request per batch of the shared batcher.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import httpx
import numpy as np

from guard.errors import EngineStopped, InvalidInput
from guard.retrieval.backbone import ForwardStats

log = logging.getLogger(__name__)
R = TypeVar("R")


class VllmUnavailable(EngineStopped):
    """The vLLM endpoint could not be reached or answered with an error (UNAVAILABLE)."""


class VllmPooling:
    """A synchronous client (it runs on the batcher's thread) for one vLLM pooling server."""

    def __init__(self, url: str, *, model: str = "", timeout_s: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self._client = httpx.Client(base_url=self.url, timeout=timeout_s)
        self.model = model or self._first_model()

    def _first_model(self) -> str:
        data = self._request("GET", "/v1/models")["data"]
        if not data:
            raise VllmUnavailable(f"{self.url} serves no model")
        return data[0]["id"]

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        try:
            response = self._client.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise VllmUnavailable(f"vLLM at {self.url}{path} is unreachable: {exc}") from exc
        if response.status_code == 400:
            raise InvalidInput(f"vLLM refused the request: {response.text[:300]}")
        if response.status_code != 200:
            raise VllmUnavailable(f"vLLM at {self.url}{path} answered {response.status_code}: {response.text[:300]}")
        return response.json()

    def embed(self, sequences: Sequence[Sequence[int]]) -> list[np.ndarray]:
        body = {"model": self.model, "input": [list(s) for s in sequences], "use_activation": False}
        data = sorted(self._request("POST", "/v1/embeddings", body)["data"], key=lambda d: d["index"])
        return [np.asarray(d["embedding"], dtype=np.float32) for d in data]

    def classify(self, sequences: Sequence[Sequence[int]]) -> list[float]:
        body = {"model": self.model, "input": [list(s) for s in sequences], "use_activation": False}
        data = sorted(self._request("POST", "/classify", body)["data"], key=lambda d: d["index"])
        out = []
        for d in data:
            if len(d["probs"]) != 1:
                raise VllmUnavailable(
                    f"vLLM's classifier has {len(d['probs'])} outputs; a Qwen3 reranker has one (serve it with the "
                    "hf_overrides for the original Qwen3-Reranker, or the converted seq-cls checkpoint)"
                )
            out.append(float(d["probs"][0]))
        return out

    def close(self) -> None:
        self._client.close()


def timed_call(
    call: Callable[[Sequence[Sequence[int]]], list[R]],
    sequences: Sequence[Sequence[int]],
    on_batch: Callable[[ForwardStats, float], None] | None,
) -> list[R]:
    """One remote batch, reported to the metrics hook like a local forward (vLLM pads nothing)."""
    started = time.perf_counter()
    out = call(sequences)
    if on_batch is not None:
        tokens = sum(len(s) for s in sequences)
        try:
            on_batch(ForwardStats(1, len(sequences), tokens, tokens), time.perf_counter() - started)
        except Exception:
            log.exception("event=on_batch_failed")
    return out
