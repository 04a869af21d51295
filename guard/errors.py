"""Errors a caller can cause; each maps to one gRPC status in ``server``."""


class EngineError(Exception):
    """Base class of caller-visible errors."""


class InvalidInput(EngineError):
    """Malformed input: ids out of the vocabulary, oversized chunk, wrong call order (INVALID_ARGUMENT)."""


class LimitExceeded(EngineError):
    """A session, token or queue limit was hit (RESOURCE_EXHAUSTED)."""


class ContextTooLong(LimitExceeded):
    """The prompt alone is over a session's token limit: retrying will not help (HTTP gateways: 400)."""


class RateLimited(LimitExceeded):
    """A tenant is over one of its limits (concurrent streams, tokens per second): RESOURCE_EXHAUSTED
    with the limit in the message; retrying later helps (HTTP gateways: 429)."""


class Unauthenticated(EngineError):
    """No credentials, or credentials no tenant holds (UNAUTHENTICATED; HTTP 401)."""


class PermissionDenied(EngineError):
    """The tenant may not use this domain or service, or the call is admin-only (PERMISSION_DENIED; HTTP 403)."""


class SessionClosed(EngineError):
    """The session was closed, cancelled, expired, or the engine shut down."""


class FailedPrecondition(EngineError):
    """The request is valid but cannot be served in the system's current configuration (FAILED_PRECONDITION)."""


class SessionExpired(SessionClosed):
    """The caller left the session idle past the idle timeout: the stream ends with a status,
    never through the fail mode (the fail mode covers the model failing, not the caller)."""


class ModelFailed(SessionClosed):
    """The guard model failed under this session (a step raised); the policy's fail mode applies."""


class EngineStopped(SessionClosed):
    """The engine is shutting down (draining, or the model went away)."""
