"""Retrieval models served beside the guard: Qwen3-Embedding (Embedder) and Qwen3-Reranker
(Reranker), loaded from their official checkpoint layouts with transformers and batched across
callers by the shared ``guard.batcher.Batcher``."""
