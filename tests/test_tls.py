"""TLS and mTLS on every listener, with certificates rotated on disk under open connections.

Certificates are made here (trustme), laid out as Kubernetes mounts a Secret (files that are
symlinks into a ``..data`` directory swapped atomically on rotation), and rotated while a
Moderate stream stays open: the open stream goes on, new connections get the new certificate,
a broken rotation keeps the last good one.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import grpc
import httpx
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc
from servers import running_sidecar
from vllm_runtime import free_port

from server.qwen3guard.v1 import guard_pb2 as pb
from server.qwen3guard.v1 import guard_pb2_grpc as pb_grpc
from server.settings import ServeSettings
from server.tls import CertificateWatcher, TlsError, TlsFiles

PROMPT = [pb.ChatMessage(role="user", content="Tell me about rivers.")]


class SecretVolume:
    """A directory laid out like a mounted Kubernetes Secret: ``tls.crt`` -> ``..data/tls.crt``,
    ``..data`` -> a timestamped directory, replaced by an atomic rename on each update."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.version = 0
        root.mkdir(parents=True, exist_ok=True)

    def write(self, files: dict[str, bytes]) -> None:
        self.version += 1
        target = self.root / f"..2026_12_02_{self.version:04d}"
        target.mkdir()
        for name, data in files.items():
            (target / name).write_bytes(data)
            link = self.root / name
            if not link.is_symlink():
                link.symlink_to(Path("..data") / name)
        staging = self.root / "..data_tmp"
        staging.symlink_to(target.name)
        os.replace(staging, self.root / "..data")

    def path(self, name: str) -> str:
        return str(self.root / name)


def server_files(ca: trustme.CA, key_of: trustme.LeafCert | None = None) -> dict[str, bytes]:
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
    key = (key_of or leaf).private_key_pem.bytes()
    return {"tls.crt": chain, "tls.key": key}


def secure_channel(address: str, ca: trustme.CA, client: trustme.LeafCert | None = None) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.cert_pem.bytes(),
        private_key=client.private_key_pem.bytes() if client else None,
        certificate_chain=b"".join(b.bytes() for b in client.cert_chain_pems) if client else None,
    )
    return grpc.aio.secure_channel(address, credentials)


async def health_ok(address: str, ca: trustme.CA, client: trustme.LeafCert | None = None) -> bool:
    """A new connection's handshake succeeds and the health check answers."""
    async with secure_channel(address, ca, client) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc  # a refused handshake, nothing else
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING


def reloads(running, outcome: str) -> float:
    return running.sidecar.metrics.registry.get_sample_value("guard_tls_reloads_total", {"outcome": outcome}) or 0.0


@pytest.fixture()
def secret(tmp_path) -> SecretVolume:
    return SecretVolume(tmp_path / "tls")


async def test_grpc_tls_rotates_under_an_open_stream(demo_dir, secret):
    first_ca, second_ca, third_ca = trustme.CA(), trustme.CA(), trustme.CA()
    secret.write(server_files(first_ca))
    with running_sidecar(model=str(demo_dir), judge="", tls_cert=secret.path("tls.crt"),
                         tls_key=secret.path("tls.key")) as running:  # fmt: skip
        address = running.address
        async with grpc.aio.insecure_channel(address) as plaintext:  # a plaintext client gets nothing
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await health_pb2_grpc.HealthStub(plaintext).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

        async with secure_channel(address, first_ca) as channel:
            call = pb_grpc.StreamGuardStub(channel).Moderate()
            await call.write(pb.ModerateRequest(open=pb.OpenRequest(domain="default", messages=PROMPT)))
            assert (await call.read()).WhichOneof("kind") == "prompt"

            secret.write(server_files(second_ca))  # the Secret is rotated: a new CA, a new certificate
            assert await health_ok(address, second_ca)  # new connections get the new certificate
            assert not await health_ok(address, first_ca)
            assert reloads(running, "ok") == 1

            await call.write(pb.ModerateRequest(chunk=pb.ChunkRequest(text="Rivers carry water to the sea.")))
            await call.write(pb.ModerateRequest(close=pb.CloseRequest()))
            kinds = []
            while (message := await call.read()) is not grpc.aio.EOF:
                kinds.append(message.WhichOneof("kind"))
            assert kinds[-1] == "final" and await call.code() == grpc.StatusCode.OK  # the open stream went on

            # A broken rotation (a certificate with somebody else's key) keeps the last good one.
            secret.write(server_files(third_ca, key_of=third_ca.issue_cert("elsewhere")))
            assert await health_ok(address, second_ca)
            assert not await health_ok(address, third_ca)
            assert reloads(running, "failed") == 1  # reported once, not per handshake
            assert await health_ok(address, second_ca)
            assert reloads(running, "failed") == 1

            secret.write(server_files(third_ca))  # repaired: in use from the next handshake
            assert await health_ok(address, third_ca)
            assert reloads(running, "ok") == 2


async def test_mtls_requires_a_client_certificate_from_the_rotating_client_ca(demo_dir, secret):
    server_ca, client_ca, next_client_ca = trustme.CA(), trustme.CA(), trustme.CA()
    secret.write({**server_files(server_ca), "ca.crt": client_ca.cert_pem.bytes()})
    gateway = client_ca.issue_cert("gateway.example")
    with running_sidecar(model=str(demo_dir), judge="", tls_cert=secret.path("tls.crt"), tls_key=secret.path("tls.key"),
                         tls_client_ca=secret.path("ca.crt"), health_port=free_port()) as running:  # fmt: skip
        # The kubelet's probes: plaintext, on their own port, which serves health and nothing else.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.sidecar.health_port}") as probe:
            reply = await health_pb2_grpc.HealthStub(probe).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as other:
                await pb_grpc.StreamGuardStub(probe).Info(pb.InfoRequest(), timeout=10)
            assert other.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert await health_ok(running.address, server_ca, gateway)
        assert not await health_ok(running.address, server_ca)  # no client certificate
        assert not await health_ok(running.address, server_ca, next_client_ca.issue_cert("gateway.example"))

        secret.write({**server_files(server_ca), "ca.crt": next_client_ca.cert_pem.bytes()})
        assert await health_ok(running.address, server_ca, next_client_ca.issue_cert("gateway.example"))
        assert not await health_ok(running.address, server_ca, gateway)  # the old CA is no longer trusted


def https_client(ca: trustme.CA, client: trustme.LeafCert | None = None) -> httpx.Client:
    context = ssl.create_default_context(cadata=ca.cert_pem.bytes().decode())
    if client is not None:
        client.configure_cert(context)
    return httpx.Client(verify=context, timeout=10)


def https_ok(url: str, ca: trustme.CA, client: trustme.LeafCert | None = None) -> bool:
    """The handshake succeeds and the listener answers (any HTTP status: it spoke HTTP over TLS)."""
    with https_client(ca, client) as http:
        try:
            http.get(url)
            return True
        except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
            return False


def test_the_http_listeners_serve_tls_and_follow_rotations(demo_dir, secret):
    """The OpenAI endpoint and /metrics use the same certificate, client CA and rotation."""
    server_ca, client_ca, next_server_ca = trustme.CA(), trustme.CA(), trustme.CA()
    secret.write({**server_files(server_ca), "ca.crt": client_ca.cert_pem.bytes()})
    client = client_ca.issue_cert("scraper.example")
    openai_port, metrics_port = free_port(), free_port()
    with running_sidecar(model=str(demo_dir), judge="", openai_port=openai_port, tls_cert=secret.path("tls.crt"),
                         tls_key=secret.path("tls.key"), tls_client_ca=secret.path("ca.crt")) as running:  # fmt: skip
        metrics_server = running.sidecar.metrics.serve_http(metrics_port, tls=running.sidecar.tls)
        try:
            urls = (f"https://127.0.0.1:{openai_port}/health", f"https://127.0.0.1:{metrics_port}/metrics")
            for url in urls:
                assert https_ok(url, server_ca, client), url
                assert not https_ok(url, server_ca), url  # mTLS: no client certificate, no answer
                with pytest.raises(httpx.HTTPError):
                    httpx.get(url.replace("https", "http"), timeout=5)  # plaintext gets nothing

            with https_client(server_ca, client) as kept:  # a keep-alive connection open across the rotation
                assert kept.get(urls[0]).status_code == 503  # /health answers: no upstream in this test
                secret.write({**server_files(next_server_ca), "ca.crt": client_ca.cert_pem.bytes()})
                for url in urls:
                    assert https_ok(url, next_server_ca, client), url
                    assert not https_ok(url, server_ca, client), url
                # The connection negotiated before still serves (a new one would not trust the new CA).
                assert kept.get(urls[0]).status_code == 503
            assert "guard_tls_reloads_total" in httpx.get(urls[1], verify=_context(next_server_ca, client)).text
        finally:
            metrics_server.shutdown()
            metrics_server.server_close()


def _context(ca: trustme.CA, client: trustme.LeafCert) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=ca.cert_pem.bytes().decode())
    client.configure_cert(context)
    return context


def test_bad_tls_settings_stop_the_start_up(tmp_path):
    with pytest.raises(TlsError, match="go together"):
        ServeSettings(tls_cert="/x.crt").tls_files()
    with pytest.raises(TlsError, match="needs --tls-cert"):
        ServeSettings(tls_client_ca="/ca.crt").tls_files()
    ca = trustme.CA()
    files = server_files(ca, key_of=ca.issue_cert("other"))
    (tmp_path / "tls.crt").write_bytes(files["tls.crt"])
    (tmp_path / "tls.key").write_bytes(files["tls.key"])
    with pytest.raises(TlsError, match="cannot use the TLS files"):  # a key that does not match
        CertificateWatcher(TlsFiles(tmp_path / "tls.crt", tmp_path / "tls.key"))
    with pytest.raises(TlsError, match="cannot use the TLS files"):
        CertificateWatcher(TlsFiles(tmp_path / "missing.crt", tmp_path / "tls.key"))
