"""Errors a caller can cause; each maps to one gRPC status in ``server``."""


class EngineError(Exception):
    """Base class of caller-visible errors."""


class InvalidInput(EngineError):
    """Malformed input: ids out of the vocabulary, oversized chunk, wrong call order (INVALID_ARGUMENT)."""


class LimitExceeded(EngineError):
    """A session, token or queue limit was hit (RESOURCE_EXHAUSTED)."""


class SessionClosed(EngineError):
    """The session was closed, cancelled, expired, or the engine shut down."""


class FailedPrecondition(EngineError):
    """The request is valid but cannot be served in the system's current configuration (FAILED_PRECONDITION)."""
