"""Generative Qwen3Guard judgments: parsing, the local batched backend, the OpenAI-compatible backend."""
