"""The service registry: built-in services and third-party plug-ins are served the same way
(servicers, health names, reflection, options, load and close), and a service that fails to
start stops the start-up with its name."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from servers import running_sidecar

from server.qwen3guard.v1 import guard_pb2
from server.registry import ENTRY_POINT_GROUP, ServiceLoadError

# A third-party service as a distribution of its own: its proto is built at import time (no
# generated code needed), it declares a `guard serve` option and a load step.
PLUGIN_MODULE = '''
"""A tiny plug-in service for the qwen3guard sidecar: Echo.Say answers with a greeting."""
import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from server.registry import HostedService, ServeOption, ServiceSpec

FILE = descriptor_pb2.FileDescriptorProto(name="echo_plugin/v1/echo.proto", package="echo_plugin.v1", syntax="proto3")
for name in ("SayRequest", "SayReply"):
    message = FILE.message_type.add(name=name)
    message.field.add(name="text", number=1, type=9, label=1)
service = FILE.service.add(name="Echo")
service.method.add(name="Say", input_type=".echo_plugin.v1.SayRequest", output_type=".echo_plugin.v1.SayReply")
POOL = descriptor_pool.Default()
POOL.Add(FILE)
SayRequest = message_factory.GetMessageClass(POOL.FindMessageTypeByName("echo_plugin.v1.SayRequest"))
SayReply = message_factory.GetMessageClass(POOL.FindMessageTypeByName("echo_plugin.v1.SayReply"))
LOADED = []
CLOSED = []


def build(ctx):
    greeting = ctx.option("echo_greeting")

    async def say(request, context):
        if not LOADED:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "not loaded")
        return SayReply(text=f"{greeting}, {request.text}")

    handler = grpc.method_handlers_generic_handler(
        "echo_plugin.v1.Echo",
        {"Say": grpc.unary_unary_rpc_method_handler(
            say, request_deserializer=SayRequest.FromString, response_serializer=SayReply.SerializeToString
        )},
    )

    async def load():
        LOADED.append(True)

    async def close():
        CLOSED.append(True)

    return HostedService(
        add_to_server=lambda server: server.add_generic_rpc_handlers((handler,)),
        service_names=("echo_plugin.v1.Echo",),
        load=load,
        close=close,
    )


SPEC = ServiceSpec(
    "Echo",
    build,
    options=(ServeOption("echo_greeting", str, "hello", "what Echo says first"),),
    description="a test plug-in",
)
'''

BROKEN_MODULE = """
from server.registry import ServiceSpec


def build(ctx):
    raise RuntimeError("the broken plug-in cannot find its model")


SPEC = ServiceSpec("Broken", build)
"""


def _install_plugin(root: Path, name: str, module: str) -> Path:
    """pip-install a one-module distribution with a `qwen3guard.services` entry point into a folder."""
    source = root / f"{name}-src"
    source.mkdir()
    (source / f"{name}.py").write_text(module)
    (source / "pyproject.toml").write_text(
        textwrap.dedent(
            f"""
            [build-system]
            requires = ["setuptools>=61"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "{name.replace("_", "-")}"
            version = "0.0.1"

            [project.entry-points."{ENTRY_POINT_GROUP}"]
            {name} = "{name}:SPEC"

            [tool.setuptools]
            py-modules = ["{name}"]
            """
        )
    )
    target = root / f"{name}-site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
    )
    return target


@pytest.fixture
def echo_plugin(tmp_path, monkeypatch):
    site = _install_plugin(tmp_path, "echo_plugin", PLUGIN_MODULE)
    monkeypatch.syspath_prepend(str(site))
    yield site
    sys.modules.pop("echo_plugin", None)


def _health(channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def _reflected_services(channel) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    return {s.name for reply in replies for s in reply.list_services_response.service}


def test_builtin_services_all_have_health_and_reflection(sidecar):
    """The fixture has no upstream: GuardedGeneration is served (a clear UNAVAILABLE) and
    reflected, but its health name stays NOT_SERVING so a readiness probe on it fails."""
    with grpc.insecure_channel(sidecar.address) as channel:
        reflected = _reflected_services(channel)
        for name in ("StreamGuard", "GuardedGeneration", "Judge", "Policies"):
            full = guard_pb2.DESCRIPTOR.services_by_name[name].full_name
            assert full in reflected, f"{full} missing from reflection"
            expected = "NOT_SERVING" if name == "GuardedGeneration" else "SERVING"
            assert _health(channel, full) == health_pb2.HealthCheckResponse.ServingStatus.Value(expected), full


def test_guarded_generation_with_an_upstream_reports_serving(demo_dir):
    with running_sidecar(model=str(demo_dir), judge="", upstream_url="http://127.0.0.1:9") as running:
        with grpc.insecure_channel(running.address) as channel:
            full = guard_pb2.DESCRIPTOR.services_by_name["GuardedGeneration"].full_name
            assert _health(channel, full) == health_pb2.HealthCheckResponse.SERVING


def test_an_installed_plugin_is_served_with_health_reflection_and_its_option(echo_plugin, demo_dir):
    from server.registry import ServeOption  # noqa: F401  (the plug-in imports it from the host)

    with running_sidecar(model=str(demo_dir), plugin_options=(("echo_greeting", "bonjour"),)) as running:
        import echo_plugin as plugin

        with grpc.insecure_channel(running.address) as channel:
            say = channel.unary_unary(
                "/echo_plugin.v1.Echo/Say",
                request_serializer=plugin.SayRequest.SerializeToString,
                response_deserializer=plugin.SayReply.FromString,
            )
            assert say(plugin.SayRequest(text="world"), timeout=10).text == "bonjour, world"
            assert "echo_plugin.v1.Echo" in _reflected_services(channel)
            assert _health(channel, "echo_plugin.v1.Echo") == health_pb2.HealthCheckResponse.SERVING
            assert plugin.LOADED == [True]
    assert plugin.CLOSED == [True], "the drain runs the plug-in's close step"


def test_plugin_options_are_serve_flags_and_environment(echo_plugin):
    from server.cli import build_parser
    from server.settings import settings_from

    args = build_parser().parse_args(["serve", "--echo-greeting", "hola"])
    assert settings_from(args, {}).plugin_option("echo_greeting") == "hola"
    args = build_parser().parse_args(["serve"])
    assert settings_from(args, {"GUARD_ECHO_GREETING": "ciao"}).plugin_option("echo_greeting") == "ciao"
    assert settings_from(args, {}).plugin_option("echo_greeting") == "hello"


def test_a_plugin_that_fails_to_build_stops_the_start_up_with_its_name(tmp_path, monkeypatch, demo_dir):
    monkeypatch.syspath_prepend(str(_install_plugin(tmp_path, "broken_plugin", BROKEN_MODULE)))
    try:
        with (
            pytest.raises(ServiceLoadError, match=r"'Broken'.*cannot find its model"),
            running_sidecar(model=str(demo_dir)),
        ):
            pass
    finally:
        sys.modules.pop("broken_plugin", None)


def test_a_service_that_fails_to_load_stops_serve_with_its_name(tmp_path):
    """`guard serve` exits 1 and names the failing service (the stream model path does not exist)."""
    missing = tmp_path / "no-such-checkpoint"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "server.cli",
            "serve",
            "--model",
            str(missing),
            "--address",
            "127.0.0.1:0",
            "--metrics-port",
            "0",
            "--judge",
            "",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 1
    assert "StreamGuard" in done.stderr and str(missing) in done.stderr
