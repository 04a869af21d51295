"""Streaming Qwen3Guard: model loading, the batched stream engine, verdicts, tokenisation.

Nothing in this package imports gRPC; the transport lives in ``server``.
"""

__version__ = "0.1.0"
