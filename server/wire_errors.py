"""Request bytes that do not parse as the method's message answer INVALID_ARGUMENT, not UNKNOWN.

grpc.aio deserializes a request with the handler's ``request_deserializer`` (``Message.FromString``)
and treats a ``DecodeError`` as a servicer crash: UNKNOWN for the caller and a traceback in the
server log for every such call. ``WireErrorsInterceptor`` wraps each handler so that a decode
failure becomes an ``Undecodable`` value instead of an exception. A unary request that is one
aborts with INVALID_ARGUMENT before the servicer runs. In a request stream it is raised where the
servicer reads it, as ``UndecodableRequest`` (an ``InvalidInput``), so the servicer ends the
stream and closes its session the way it does for any invalid request; if the servicer lets the
error escape, the interceptor answers INVALID_ARGUMENT itself.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from guard.errors import InvalidInput

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Undecodable:
    """What a request deserializer returns for bytes that are not a valid ``message``."""

    message: str  # full protobuf message name, or the method path when unknown
    reason: str

    def details(self) -> str:
        return f"the request bytes are not a valid {self.message}: {self.reason}"


def _message_name(deserializer: Callable, method: str) -> str:
    """``Message.FromString`` is bound to the message class, which knows its full name."""
    descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    return getattr(descriptor, "full_name", f"request of {method}")


def _reason(exc: Exception, message: str) -> str:
    """upb says "Error parsing message with type 'X': <why>"; keep the why."""
    text = str(exc) or type(exc).__name__
    prefix = f"Error parsing message with type '{message}': "
    return text.removeprefix(prefix)


def _tolerant(deserializer: Callable, method: str) -> Callable[[bytes], Any]:
    message = _message_name(deserializer, method)

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # DecodeError, or whatever a non-protobuf deserializer raises
            return Undecodable(message, _reason(exc, message))

    return deserialize


def _log(bad: Undecodable, method: str) -> None:
    """One line a call, never a traceback: the caller sent bad bytes, the server is fine."""
    log.info("event=undecodable_request method=%s message=%s reason=%r", method, bad.message, bad.reason)


async def _reject(bad: Undecodable, method: str, context: grpc.aio.ServicerContext) -> None:
    _log(bad, method)
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, bad.details())


class UndecodableRequest(InvalidInput):
    """Raised by a request stream at a message that did not parse."""


def _checked(requests: AsyncIterator, method: str) -> AsyncIterator:
    async def iterate() -> AsyncIterator:
        async for request in requests:
            if isinstance(request, Undecodable):
                _log(request, method)
                raise UndecodableRequest(request.details())
            yield request

    return iterate()


def _wrap(behavior: Callable, request_streaming: bool, method: str) -> Callable | None:
    """The behaviour with its request (or request stream) checked; None for a synchronous one."""

    async def prepare(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        if request_streaming:
            return _checked(request_or_iterator, method)
        if isinstance(request_or_iterator, Undecodable):
            await _reject(request_or_iterator, method, context)
        return request_or_iterator

    if inspect.isasyncgenfunction(behavior):

        async def responses(request_or_iterator, context):
            try:
                async for response in behavior(await prepare(request_or_iterator, context), context):
                    yield response
            except UndecodableRequest as exc:  # the servicer did not turn it into a status
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

        return responses
    if inspect.iscoroutinefunction(behavior):

        async def response(request_or_iterator, context):
            try:
                return await behavior(await prepare(request_or_iterator, context), context)
            except UndecodableRequest as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

        return response
    return None


# (request_streaming, response_streaming) -> the behaviour's field and the handler's constructor
HANDLER_KINDS = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


class WireErrorsInterceptor(grpc.aio.ServerInterceptor):
    """grpc.aio server interceptor: undecodable request bytes are INVALID_ARGUMENT, without a traceback."""

    async def intercept_service(
        self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        field, make = HANDLER_KINDS[(handler.request_streaming, handler.response_streaming)]
        behavior = _wrap(getattr(handler, field), handler.request_streaming, method)
        if behavior is None:  # synchronous handlers are left as they are (none are registered here)
            return handler
        return make(
            behavior,
            request_deserializer=_tolerant(handler.request_deserializer, method),
            response_serializer=handler.response_serializer,
        )
