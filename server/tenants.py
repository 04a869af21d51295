"""Tenants: who may call the sidecar, with which domains and services, within which limits.

The tenants file is YAML, mounted from a Secret and edited live (a change is checked and swapped
in atomically; an invalid file keeps the last good set and is reported, like policies)::

    tenants:
      chat-gateway:
        keys: ["sha256:9f86d08..."]     # SHA-256 of each API key (hex); never the key itself
        identities: ["spiffe://cluster.local/ns/llm/sa/gateway", "CN=gateway.llm"]  # mTLS peers
        domains: ["default", "kids"]   # or ["*"]
        services: ["StreamGuard", "GuardedGeneration"]   # or ["*"]
        admin: false                   # admin: Policies.Reload and other writes
        limits:
          max_streams: 64              # concurrent calls (streams, unary calls, HTTP requests)
          tokens_per_second: 5000      # tokens judged, a token bucket ...
          burst_tokens: 20000          # ... holding this many (default: 2 s worth)

A key arrives as ``authorization: Bearer <key>`` (gRPC metadata or the HTTP header); an mTLS
client certificate may name the tenant instead (its common name as ``CN=<name>``, or any subject
alternative name), on the gRPC port; the OpenAI endpoint takes keys only (its ASGI server does not
pass the peer certificate on). ``guard tenants new-key`` makes a key and its hash.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import yaml

from guard.errors import Unauthenticated

log = logging.getLogger(__name__)

__all__ = ["Limits", "Tenant", "TenantError", "TenantStore", "current_tenant", "hash_key", "parse_tenants"]

ANY = "*"
_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")
_NAME = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,62}[a-z0-9])?$")  # a metric label: short, no spaces
_TENANT_KEYS = {"keys", "identities", "domains", "services", "admin", "limits"}
_LIMIT_KEYS = {"max_streams", "tokens_per_second", "burst_tokens"}


# The tenant of the call being served (None: the sidecar runs open), set by server/auth.py.
current_tenant: ContextVar[Tenant | None] = ContextVar("current_tenant", default=None)


class TenantError(ValueError):
    """The tenants file is invalid; the message names every problem."""


def hash_key(key: str) -> str:
    """The form a key is stored in: ``sha256:<hex>``."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Limits:
    max_streams: int = 0  # 0 = no limit
    tokens_per_second: float = 0.0  # 0 = no limit
    burst_tokens: float = 0.0  # the bucket's size; 0 = two seconds' worth

    @property
    def burst(self) -> float:
        return self.burst_tokens or 2 * self.tokens_per_second


@dataclass(frozen=True)
class Tenant:
    name: str
    key_hashes: frozenset[str] = frozenset()
    identities: frozenset[str] = frozenset()
    domains: frozenset[str] = frozenset({ANY})
    services: frozenset[str] = frozenset({ANY})
    admin: bool = False
    limits: Limits = Limits()

    def may_use_domain(self, domain: str) -> bool:
        return ANY in self.domains or domain in self.domains

    def may_call(self, service: str) -> bool:
        return ANY in self.services or service in self.services


def _strings(value: object, where: str, problems: list[str]) -> frozenset[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        problems.append(f"{where} must be a list of non-empty strings")
        return frozenset()
    return frozenset(value)


def _limits(value: object, where: str, problems: list[str]) -> Limits:
    if value is None:
        return Limits()
    if not isinstance(value, dict):
        problems.append(f"{where} must be a mapping")
        return Limits()
    for key in set(value) - _LIMIT_KEYS:
        problems.append(f"{where}: unknown key {key!r} (known: {', '.join(sorted(_LIMIT_KEYS))})")
    numbers = {}
    for key in _LIMIT_KEYS & set(value):
        number = value[key]
        if isinstance(number, bool) or not isinstance(number, int | float) or number < 0:
            problems.append(f"{where}.{key} must be a number >= 0, got {number!r}")
        else:
            numbers[key] = number
    if "max_streams" in numbers and numbers["max_streams"] != int(numbers["max_streams"]):
        problems.append(f"{where}.max_streams must be a whole number")
    return Limits(int(numbers.get("max_streams", 0)), float(numbers.get("tokens_per_second", 0)),
                  float(numbers.get("burst_tokens", 0)))  # fmt: skip


def parse_tenants(text: str, services: Iterable[str], source: str = "tenants") -> dict[str, Tenant]:
    """The tenants of a file's text. ``services``: the names a tenant may list (a typo is an error,
    not a silently useless grant). Raises TenantError naming every problem."""
    known_services = set(services)
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise TenantError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("tenants"), dict):
        raise TenantError(f"{source}: expected a mapping with a `tenants:` mapping of tenant name to settings")
    problems: list[str] = []
    tenants: dict[str, Tenant] = {}
    owner_of: dict[str, str] = {}  # key hash or identity -> tenant: one credential, one tenant
    for name, body in document["tenants"].items():
        where = f"{source}: tenants.{name}"
        if not isinstance(name, str) or not _NAME.match(name):
            problems.append(f"{where}: a tenant name is lower-case letters, digits, '.', '_', '-' (at most 64)")
            continue
        if not isinstance(body, dict):
            problems.append(f"{where} must be a mapping")
            continue
        for key in set(body) - _TENANT_KEYS:
            problems.append(f"{where}: unknown key {key!r} (known: {', '.join(sorted(_TENANT_KEYS))})")
        keys = _strings(body.get("keys", []), f"{where}.keys", problems)
        for key in keys:
            if not _HASH.match(key):
                problems.append(f"{where}.keys: {key[:12]!r}... is not 'sha256:<64 hex digits>' (store hashes, "
                                "never keys: `guard tenants hash-key`)")  # fmt: skip
        identities = _strings(body.get("identities", []), f"{where}.identities", problems)
        if not keys and not identities:
            problems.append(f"{where}: no keys and no identities (nobody could authenticate as it)")
        for credential in keys | identities:
            if credential in owner_of:
                problems.append(f"{where}: a credential is also {owner_of[credential]}'s")
            owner_of[credential] = name
        domains = _strings(body.get("domains", [ANY]), f"{where}.domains", problems)
        services_of = _strings(body.get("services", [ANY]), f"{where}.services", problems)
        for service in services_of - known_services - {ANY}:
            known = ", ".join(sorted(known_services))
            problems.append(f"{where}.services: unknown service {service!r} (known: {known})")
        admin = body.get("admin", False)
        if not isinstance(admin, bool):
            problems.append(f"{where}.admin must be true or false")
        limits = _limits(body.get("limits"), f"{where}.limits", problems)
        tenants[name] = Tenant(name, keys, identities, domains, services_of, admin is True, limits)
    if problems:
        raise TenantError("\n".join(problems))
    return tenants


class TenantStore:
    """The active tenants, swapped atomically when the file changes to a valid set; an invalid or
    unreadable file keeps the last good set (reported once per content, as with policies)."""

    def __init__(
        self,
        path: Path,
        services: Iterable[str],
        on_change: Callable[[TenantStore], None] | None = None,
    ) -> None:
        self.path = path
        self.services = tuple(services)
        self.on_change = on_change
        self.version = 0
        self.last_error = ""
        self._by_key: dict[str, Tenant] = {}  # key hash -> tenant
        self._by_identity: dict[str, Tenant] = {}  # mTLS name -> tenant (apart: a name is not a key)
        self.tenants: dict[str, Tenant] = {}
        self._signature: tuple = ()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if not self.reload():
            raise TenantError(self.last_error)

    def _stat(self) -> tuple:
        stat = os.stat(self.path)  # follows the Secret's symlinks
        return (stat.st_ino, stat.st_dev, stat.st_mtime_ns, stat.st_size)

    def reload(self) -> bool:
        """Read the file if it changed; True when the active set is the file's."""
        try:
            signature = self._stat()
            if signature == self._signature:
                if self.last_error:  # readable again, and the file in force: nothing is rejected any more
                    self.last_error = ""
                    if self.on_change is not None:
                        self.on_change(self)
                return True
            tenants = parse_tenants(self.path.read_text(), self.services, str(self.path))
        except (OSError, TenantError) as exc:
            error = str(exc)
            if error != self.last_error:
                log.error("event=tenants_rejected error=%r (the previous tenants stay active)", error)
                self.last_error = error
                if self.on_change is not None:
                    self.on_change(self)
            return False
        by_key = {key: t for t in tenants.values() for key in t.key_hashes}
        by_identity = {identity: t for t in tenants.values() for identity in t.identities}
        self.tenants, self._by_key, self._by_identity = tenants, by_key, by_identity
        self._signature = signature
        self.last_error = ""
        self.version += 1
        log.info("event=tenants_loaded version=%d tenants=%d", self.version, len(tenants))
        if self.on_change is not None:
            self.on_change(self)
        return True

    def watch(self, interval_s: float) -> None:
        def poll() -> None:
            while not self._stop.wait(interval_s):
                self.reload()

        self._thread = threading.Thread(target=poll, name="tenants-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def authenticate(self, authorization: str | None, peer_identities: Iterable[str] = ()) -> Tenant:
        """The tenant a bearer key or an mTLS peer identity belongs to (the key first)."""
        if authorization:
            scheme, _, key = authorization.strip().partition(" ")
            if scheme.lower() != "bearer" or not key.strip():
                raise Unauthenticated("the authorization must be 'Bearer <key>'")
            tenant = self._by_key.get(hash_key(key.strip()))
            if tenant is None:
                raise Unauthenticated("unknown API key")
            return tenant
        for identity in peer_identities:
            tenant = self._by_identity.get(identity)
            if tenant is not None:
                return tenant
        if peer_identities:
            raise Unauthenticated("no API key, and the client certificate names no tenant")
        raise Unauthenticated("no API key: send 'authorization: Bearer <key>'")
