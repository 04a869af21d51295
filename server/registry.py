"""The service registry: every gRPC service the sidecar hosts declares itself here, the same way.

A service is a :class:`ServiceSpec`: its name, the ``guard serve`` options it owns, whether the
configuration enables it, and a ``build`` step that returns a :class:`HostedService` (how to add
its servicers to the server, its full proto service names for health and reflection, and its load
and close steps). The server (server/app.py) never names a service: it builds what is enabled,
registers it, reports each service's own health name NOT_SERVING until that service has loaded,
and closes them in reverse order when it drains.

Built-in services are listed in ``server.services``; third-party services are found through the
``qwen3guard.services`` entry point group (each entry point loads a ServiceSpec, or a callable
returning one), so a plug-in distribution only has to be installed to be served.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:
    from guard.policy.loader import PolicyStore
    from server.audit import AuditLog
    from server.auth import Authorizer
    from server.media import MediaDecoding
    from server.metrics import Metrics
    from server.settings import ServeSettings
    from server.tls import CertificateWatcher

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "qwen3guard.services"


@dataclass(frozen=True)
class ServeOption:
    """A plug-in's ``guard serve`` option: ``--{name}`` / ``GUARD_{NAME}`` (dashes as underscores)."""

    name: str  # snake_case key
    type: type = str  # str, int, float or bool
    default: Any = ""
    help: str = ""


@dataclass
class HostedService:
    """A built service, ready to be added to the server."""

    add_to_server: Callable[[grpc.aio.Server], None]
    service_names: tuple[str, ...]  # full proto names: health names and reflection
    load: Callable[[], Awaitable[None]] | None = None  # e.g. load a model (off the event loop)
    close: Callable[[], Awaitable[None]] | None = None  # drain step, after the server stopped
    state: Any = None  # the service's own object, for services that build on it (by spec name)
    extras: dict[str, Any] = field(default_factory=dict)  # shared objects other services derive from it
    # False: served (calls get a clear UNAVAILABLE) but its health name stays NOT_SERVING, e.g.
    # GuardedGeneration without an upstream, so a readiness probe on it does not pass.
    available: bool = True


@dataclass
class ServiceContext:
    """What a service's build step may use: configuration and the shared pieces of the server."""

    settings: ServeSettings
    metrics: Metrics
    policies: PolicyStore
    built: dict[str, HostedService] = field(default_factory=dict)  # services built before this one
    audit: AuditLog | None = None  # the decision audit log (None when turned off)
    tls: CertificateWatcher | None = None  # the listeners' certificate (None: plaintext)
    authorizer: Authorizer | None = None  # tenants and their limits (None: open)
    _media: MediaDecoding | None = None

    @property
    def media(self) -> MediaDecoding:
        """Where images and video frames are decoded (one bound for every service that takes media)."""
        if self._media is None:
            from server.media import MediaDecoding

            self._media = MediaDecoding(self.settings.vision_decode_workers)
        return self._media

    def option(self, name: str) -> Any:
        """A plug-in option's value (its default when not given)."""
        return self.settings.plugin_option(name)


@dataclass(frozen=True)
class ServiceSpec:
    """What a service registers (see the module doc)."""

    name: str
    build: Callable[[ServiceContext], HostedService]
    options: tuple[ServeOption, ...] = ()  # plug-in options (built-ins keep theirs in ServeSettings)
    settings_fields: tuple[str, ...] = ()  # the ServeSettings fields this service owns (help grouping)
    enabled: Callable[[ServeSettings], bool] = lambda settings: True
    description: str = ""


class ServiceLoadError(RuntimeError):
    """A service failed to build or load: the start-up stops with its name and the reason."""

    def __init__(self, service: str, reason: BaseException | str) -> None:
        self.service = service
        detail = f"{type(reason).__name__}: {reason}" if isinstance(reason, BaseException) else reason
        super().__init__(f"service {service!r} failed to start: {detail}")


def plugin_specs() -> list[ServiceSpec]:
    """Third-party services from the ``qwen3guard.services`` entry point group (sorted by name)."""
    specs = []
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            loaded = ep.load()
            spec = loaded() if callable(loaded) and not isinstance(loaded, ServiceSpec) else loaded
        except Exception as exc:
            raise ServiceLoadError(ep.name, exc) from exc
        if not isinstance(spec, ServiceSpec):
            raise ServiceLoadError(ep.name, f"entry point {ep.value!r} gave {type(spec).__name__}, not a ServiceSpec")
        specs.append(spec)
    return specs


def all_specs() -> list[ServiceSpec]:
    """Built-in services first (in dependency order), then plug-ins; names are unique."""
    from server.services import BUILTIN_SERVICES

    specs = [*BUILTIN_SERVICES, *plugin_specs()]
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise ServiceLoadError(spec.name, "two services are registered under this name")
        seen.add(spec.name)
    return specs


def plugin_options(specs: Iterable[ServiceSpec]) -> list[ServeOption]:
    return [option for spec in specs for option in spec.options]
