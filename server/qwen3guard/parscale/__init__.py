"""Generated gRPC code (python -m server.codegen)."""
