"""Entry points: the CLI now, the gRPC services next. Holds no tensor math."""
