"""Gateway front ends beyond gRPC: the Envoy external processor and the OpenAI-compatible endpoint."""
