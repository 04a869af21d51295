"""TLS for every listener of the sidecar (gRPC, metrics, the OpenAI endpoint), mTLS when a client
CA is configured, and certificates that follow their files on disk.

Kubernetes rotates a mounted Secret by swapping a symlink under the running pod (cert-manager
renews every few weeks); a sidecar that read its certificate once would serve an expired one until
restarted. Here each new handshake first looks at the files (three ``stat`` calls): when they
changed, the new certificate, key and client CA are loaded, checked (the key must match the
certificate), and used from that handshake on. Open connections keep the session they negotiated.
A half-written rotation (a certificate without its key yet) keeps the last good material and is
retried on the next handshake: the sidecar never stops serving because of a rotation.

gRPC uses grpcio's own dynamic credentials (its fetcher runs per handshake); the HTTP listeners use
one ``ssl.SSLContext`` whose SNI callback hands each handshake the current context.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

__all__ = ["CertificateWatcher", "TlsError", "TlsFiles", "TlsMaterial"]


class TlsError(ValueError):
    """The TLS files cannot be used (missing, unreadable, or a key that does not match)."""


@dataclass(frozen=True)
class TlsFiles:
    """Where the server's certificate chain, its key and (for mTLS) the client CA bundle live."""

    cert: Path
    key: Path
    client_ca: Path | None = None  # set: every listener requires a client certificate signed by it

    @property
    def paths(self) -> tuple[Path, ...]:
        return (self.cert, self.key) + ((self.client_ca,) if self.client_ca else ())

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None


@dataclass(frozen=True)
class TlsMaterial:
    """One consistent, checked set of certificate, key and client CA (PEM bytes)."""

    cert: bytes
    key: bytes
    client_ca: bytes | None
    generation: int  # 1 for the files read at start-up, +1 per reload


def _signature(paths: tuple[Path, ...]) -> tuple:
    """What changes when a file is replaced or rewritten (stat follows Kubernetes' symlinks)."""
    signature = []
    for path in paths:
        stat = os.stat(path)
        signature.append((stat.st_ino, stat.st_dev, stat.st_mtime_ns, stat.st_size))
    return tuple(signature)


def _server_context(files: TlsFiles, client_ca: bytes | None) -> ssl.SSLContext:
    """A server-side context from the files (raises ssl.SSLError / OSError when they do not fit)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(files.cert), str(files.key))  # checks that the key matches
    if client_ca is not None:
        context.load_verify_locations(cadata=client_ca.decode("ascii"))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class CertificateWatcher:
    """The last good TLS material of one set of files, reloaded when the files change.

    ``on_reload(material)`` and ``on_error(exc)`` are called from whichever thread noticed the
    change (a handshake on grpc's or the HTTP server's thread): keep them short and thread-safe.
    """

    def __init__(
        self,
        files: TlsFiles,
        *,
        on_reload: Callable[[TlsMaterial], None] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.files = files
        self.on_reload = on_reload
        self.on_error = on_error
        self._lock = threading.Lock()
        self._signature: tuple = ()
        self._failed_signature: tuple | None = None  # files that do not load: not read again until they change
        self._reported: tuple | None = None  # the last problem reported (once, not per handshake)
        try:
            self._material, self._context = self._load(generation=1)
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise TlsError(f"cannot use the TLS files {', '.join(map(str, files.paths))}: {exc}") from exc

    # ------------------------------------------------------------------ loading

    def _load(self, generation: int) -> tuple[TlsMaterial, ssl.SSLContext]:
        before = _signature(self.files.paths)
        cert = self.files.cert.read_bytes()
        key = self.files.key.read_bytes()
        client_ca = self.files.client_ca.read_bytes() if self.files.client_ca else None
        context = _server_context(self.files, client_ca)
        if _signature(self.files.paths) != before:  # rewritten while we read: not one consistent set
            raise ValueError("the files changed while they were read")
        self._signature = before
        return TlsMaterial(cert, key, client_ca, generation), context

    def current(self) -> TlsMaterial:
        """The material to use for a new handshake: the files' if they changed and load, else the last good."""
        with self._lock:
            try:
                signature = _signature(self.files.paths)
            except OSError as exc:  # a file missing mid-rotation: keep serving the last good set
                self._report(exc, ("missing", str(exc)))
                return self._material
            if signature == self._signature or signature == self._failed_signature:
                return self._material
            try:
                self._material, self._context = self._load(self._material.generation + 1)
            except (ssl.SSLError, ValueError) as exc:  # the files' content is wrong: wait for the next change
                self._failed_signature = signature
                self._report(exc, signature)
                return self._material
            except OSError as exc:  # passing (no descriptors, a remount): tried again at the next handshake
                self._report(exc, ("unreadable", signature))
                return self._material
            self._failed_signature = self._reported = None
            material = self._material
        log.info("event=tls_reloaded generation=%d", material.generation)
        if self.on_reload is not None:
            self.on_reload(material)
        return material

    def _report(self, exc: BaseException, problem: tuple) -> None:
        """Log and count a problem once, however many handshakes meet it."""
        if problem == self._reported:
            return
        self._reported = problem
        log.warning("event=tls_reload_failed error=%r (the previous certificate stays in use)", str(exc))
        if self.on_error is not None:
            self.on_error(exc)

    # ------------------------------------------------------------------ listeners

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """grpcio's dynamic server credentials: each handshake asks for the current certificate."""
        given = self.current()

        def configuration(material: TlsMaterial):
            return grpc.ssl_server_certificate_configuration(
                [(material.key, material.cert)], root_certificates=material.client_ca
            )

        def fetch():  # on a grpc core thread, per handshake; None = keep the configuration it has
            nonlocal given
            material = self.current()
            if material.generation == given.generation:
                return None
            given = material
            return configuration(material)

        return grpc.dynamic_ssl_server_credentials(
            configuration(given), fetch, require_client_authentication=self.files.mutual
        )

    def ssl_context(self) -> ssl.SSLContext:
        """A server context for the HTTP listeners; each handshake switches to the current one."""
        self.current()
        front = self._context

        def pick(connection: ssl.SSLObject | ssl.SSLSocket, _server_name: str | None, context: ssl.SSLContext):
            self.current()
            latest = self._context
            if latest is not context:
                connection.context = latest
            return None

        front.sni_callback = pick
        return front
