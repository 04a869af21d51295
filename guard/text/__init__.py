"""Text handling: conversation rendering, the incremental tokenizer, the offline Qwen3 tokenizer."""
