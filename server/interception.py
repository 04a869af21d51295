"""Run code around every RPC's servicer: the shared plumbing of the server interceptors that need
the call's context (authentication, tracing), for unary and streaming handlers alike."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, aclosing
from typing import Any

import grpc

from server.wire_errors import HANDLER_KINDS

Around = Callable[[grpc.aio.ServicerContext], AbstractAsyncContextManager[Any]]


def around_handler(handler: grpc.RpcMethodHandler, around: Around) -> grpc.RpcMethodHandler:
    """``handler`` with its behaviour run inside ``around(context)`` (entered before the servicer
    runs, exited when its response or its last streamed response is sent, or when it fails)."""
    field_name, make = HANDLER_KINDS[(handler.request_streaming, handler.response_streaming)]
    behavior = getattr(handler, field_name)
    if inspect.isasyncgenfunction(behavior):

        async def responses(request_or_iterator: Any, context: grpc.aio.ServicerContext):
            # aclosing: a cancelled call closes the servicer's generator here, in the call's own
            # task, not later from the garbage collector in another (contexts and slots unwind now).
            async with around(context), aclosing(behavior(request_or_iterator, context)) as produced:
                async for response in produced:
                    yield response

        wrapped = responses
    else:

        async def response(request_or_iterator: Any, context: grpc.aio.ServicerContext):
            async with around(context):
                return await behavior(request_or_iterator, context)

        wrapped = response
    return make(wrapped, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)  # fmt: skip
