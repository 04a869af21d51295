"""The Stream Qwen3Guard model core: config, checkpoint loading, the Qwen3 modules, the KV cache, the stream engine."""
