"""Who is calling, and may they: authentication, authorization and per-tenant limits for every
front end (the gRPC services through ``AuthInterceptor``, the OpenAI endpoint through its ASGI
middleware), from one ``Authorizer`` over the tenants file (server/tenants.py).

Per call: the tenant is found from ``authorization: Bearer <key>`` or the mTLS peer certificate
(UNAUTHENTICATED otherwise); the service must be one of its services and admin-only methods need
an admin (PERMISSION_DENIED); a concurrent-call slot is taken (RESOURCE_EXHAUSTED beyond
``max_streams``). While the call runs, the tenant is in the request's context: the policy store
checks every domain the call resolves against the tenant's domains, the audit log records the
tenant, and each response session charges its judged tokens to the tenant's token bucket.
Health and reflection stay open (the kubelet and grpcurl need them; reflection can be turned off).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc

from guard.errors import EngineError, PermissionDenied, RateLimited, Unauthenticated
from guard.session.metering import current_meter
from server.interception import around_handler
from server.tenants import Tenant, TenantStore, current_tenant
from server.wire import status_of

log = logging.getLogger(__name__)

__all__ = ["ADMIN_METHODS", "OPEN_SERVICES", "AuthInterceptor", "Authorizer", "Grant"]

# Open to anyone who reaches the port: the kubelet's probes and grpcurl's discovery.
OPEN_SERVICES = frozenset(
    {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"}
)
# Calls that change the sidecar: an admin tenant only.
ADMIN_METHODS = frozenset({"/qwen3guard.v1.Policies/Reload"})


def split_method(method: str) -> tuple[str, str]:
    """``/pkg.v1.Service/Method`` -> (``pkg.v1.Service``, ``Service``)."""
    full = method.lstrip("/").split("/", 1)[0]
    return full, full.rsplit(".", 1)[-1]


def peer_identities(auth_context: dict[str, list[bytes]]) -> list[str]:
    """The names an mTLS client certificate gives: ``CN=<common name>`` and each subject
    alternative name (DNS names, URIs such as SPIFFE ids), as grpc core reports them."""
    names = [f"CN={cn.decode()}" for cn in auth_context.get("x509_common_name", [])]
    names += [san.decode() for san in auth_context.get("x509_subject_alternative_name", [])]
    return names


class TokenBucket:
    """Tokens per second with a burst; may go into debt by one charge (see guard/session/metering)."""

    def __init__(self, tenant: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.tenant = tenant
        self._clock = clock
        self.rate = 0.0
        self.burst = 0.0
        self.tokens = 0.0
        self._at = clock()

    def configure(self, rate: float, burst: float) -> None:
        """Follow the tenants file (a reload may change the limit of a tenant with calls open)."""
        if (rate, burst) != (self.rate, self.burst):
            if self.rate == 0:
                self.tokens = burst  # a new bucket starts full
            self.rate, self.burst = rate, burst
            self.tokens = min(self.tokens, burst)

    def _refill(self) -> None:
        now = self._clock()
        self.tokens = min(self.burst, self.tokens + (now - self._at) * self.rate)
        self._at = now

    def admit(self) -> None:
        if self.rate <= 0:
            return
        self._refill()
        if self.tokens < 0:
            wait = -self.tokens / self.rate
            raise RateLimited(
                f"tenant {self.tenant!r} is over its limit of {self.rate:g} tokens per second "
                f"(burst {self.burst:g}); retry in {wait:.2f} s"
            )

    def charge(self, tokens: int) -> None:
        if self.rate > 0:
            self._refill()
            self.tokens -= tokens


@dataclass
class _TenantState:
    """What a tenant uses now: open calls and its bucket (kept across reloads of the file)."""

    bucket: TokenBucket
    open_calls: int = 0


@dataclass
class Grant:
    """One admitted call: its tenant, and the slot it holds until ``release``."""

    tenant: Tenant
    _release: Callable[[], None] = field(repr=False)
    _released: bool = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._release()


class Authorizer:
    """The decisions, for every front end. Runs on the event loop (no locks)."""

    def __init__(self, store: TenantStore, metrics: Any = None) -> None:
        self.store = store
        self.metrics = metrics
        self._state: dict[str, _TenantState] = {}

    def _count(self, tenant: str, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.tenant_requests.labels(tenant, outcome).inc()

    def _state_of(self, tenant: Tenant) -> _TenantState:
        state = self._state.get(tenant.name)
        if state is None:
            state = self._state[tenant.name] = _TenantState(TokenBucket(tenant.name))
        state.bucket.configure(tenant.limits.tokens_per_second, tenant.limits.burst)
        return state

    def admit(self, authorization: str | None, identities: Iterable[str], service: str, method: str) -> Grant:
        """Authenticate, authorize the service (and admin-only methods) and take a call slot."""
        try:
            tenant = self.store.authenticate(authorization, list(identities))
        except Unauthenticated:
            self._count("unknown", "unauthenticated")
            raise
        if not tenant.may_call(service):
            self._count(tenant.name, "denied")
            raise PermissionDenied(f"tenant {tenant.name!r} may not call {service} (its services: "
                                   f"{', '.join(sorted(tenant.services))})")  # fmt: skip
        if method in ADMIN_METHODS and not tenant.admin:
            self._count(tenant.name, "denied")
            raise PermissionDenied(f"{method} is admin-only; tenant {tenant.name!r} is not an admin")
        state = self._state_of(tenant)
        limit = tenant.limits.max_streams
        if limit and state.open_calls >= limit:
            self._count(tenant.name, "rate_limited")
            raise RateLimited(f"tenant {tenant.name!r} has {state.open_calls} calls open, its limit (max_streams)")
        state.open_calls += 1
        self._count(tenant.name, "allowed")
        if self.metrics is not None:
            self.metrics.tenant_open_calls.labels(tenant.name).inc()

        def release() -> None:
            state.open_calls -= 1
            if self.metrics is not None:
                self.metrics.tenant_open_calls.labels(tenant.name).dec()

        return Grant(tenant, release)

    def enter(self, grant: Grant) -> None:
        """Make the grant's tenant the context of the code that serves the call (this task, and
        tasks it starts): domain checks, audit records and token charges see it."""
        current_tenant.set(grant.tenant)
        current_meter.set(self._state_of(grant.tenant).bucket)

    @staticmethod
    def check_domain(domain: str) -> None:
        """PolicyStore.access_check: the calling tenant (if any) may use ``domain``."""
        tenant = current_tenant.get()
        if tenant is not None and not tenant.may_use_domain(domain):
            raise PermissionDenied(f"tenant {tenant.name!r} may not use the domain {domain!r} "
                                   f"(its domains: {', '.join(sorted(tenant.domains))})")  # fmt: skip


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Every RPC except health and reflection is authenticated and authorized before its servicer runs."""

    def __init__(self, authorizer: Authorizer, open_services: frozenset[str] = OPEN_SERVICES) -> None:
        self.authorizer = authorizer
        self.open_services = open_services

    async def intercept_service(
        self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        full, service = split_method(method)
        if handler is None or full in self.open_services:
            return handler
        authorizer = self.authorizer

        @asynccontextmanager
        async def admitted(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
            metadata = {key: value for key, value in (context.invocation_metadata() or ()) if isinstance(value, str)}
            try:
                grant = authorizer.admit(metadata.get("authorization"), peer_identities(context.auth_context()),
                                         service, method)  # fmt: skip
            except EngineError as exc:
                log.info("event=call_refused method=%s reason=%r", method, str(exc))
                await context.abort(status_of(exc), str(exc))
            authorizer.enter(grant)
            try:
                yield
            except (PermissionDenied, RateLimited, Unauthenticated) as exc:  # raised in a servicer that left it
                await context.abort(status_of(exc), str(exc))
            finally:
                grant.release()

        return around_handler(handler, admitted)
