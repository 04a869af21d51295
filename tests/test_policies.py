"""Policy files: validation with file, line and field; inheritance; the shipped domains; live
reload (including the ConfigMap symlink swap); failures reported once (a missing directory, a
file that is not UTF-8, also through `Policies.Reload`); `Policies.Evaluate` probability checks;
`guard policy check|explain`."""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import grpc
import pytest
from cli_runner import guard_main
from servers import running_sidecar

from guard.errors import InvalidInput
from guard.model.labels import RiskLevel
from guard.policy.actions import Action
from guard.policy.loader import PolicyError, PolicyStore, check_path, load_policies
from guard.policy.rules import FailMode, ReleaseDefault
from guard.session.verdict import ControversialMode
from server.metrics import Metrics
from server.qwen3guard.v1 import guard_pb2 as pb
from server.qwen3guard.v1 import guard_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[1]
U, C, S = RiskLevel.UNSAFE, RiskLevel.CONTROVERSIAL, RiskLevel.SAFE


def load(**files: str):
    return load_policies({name: (f"{name}.yaml", text) for name, text in files.items()})[0]


def problems(**files: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        load(**files)
    return [str(p) for p in info.value.problems]


def test_shipped_policies_are_valid_and_differ():
    policies = check_path(REPO / "policies")
    assert {"default", "children_education", "medical", "customer_support", "security_research"} <= set(policies)
    children, medical, support, research = (
        policies[d] for d in ("children_education", "medical", "customer_support", "security_research")
    )
    assert children.decide("response", C, "Political") == (U, Action.INTERRUPT)  # strict
    assert children.debounce == 1 and children.fail_mode is FailMode.CLOSED
    assert medical.decide("response", U, "PII") == (U, Action.REDACT)
    assert medical.decide("response", U, "Self-Harm") == (U, Action.FLAG) and medical.fail_mode is FailMode.OPEN
    assert support.release_mode is ReleaseDefault.OPTIMISTIC
    assert research.decide("prompt", U, "Jailbreak") == (U, Action.FLAG) and research.debounce == 4
    assert len({p.version for p in policies.values()}) == len(policies)


def test_unknown_keys_are_errors_with_file_line_and_field():
    found = problems(default="debounce: 2\nrespons:\n  unsafe: INTERRUPT\n")
    assert found == [
        "default.yaml:2: respons: unknown key; expected one of description, extends, prompt, "
        "response, thresholds, controversial, debounce, release_mode, redact_marker, categories, "
        "fail_mode, model_timeout_ms, moderate_reasoning, topics"
    ]


def test_moderate_reasoning_is_a_boolean_inherited_by_extends():
    assert problems(default="moderate_reasoning: maybe\n") == [
        "default.yaml:1: moderate_reasoning: expected true or false, got 'maybe'"
    ]
    policies = load(default="moderate_reasoning: false\n", child="extends: default\n", other="debounce: 2\n")
    assert not policies["default"].moderate_reasoning and not policies["child"].moderate_reasoning
    assert policies["other"].moderate_reasoning  # the default: reasoning is moderated


def test_every_error_is_reported_at_once():
    text = "\n".join(
        [
            "debounce: 0",  # line 1: out of range
            "response:",
            "  unsafe: BLOCK",  # line 3: BLOCK is a prompt action
            "thresholds:",
            "  unsafe: high",  # line 5: not a number
            "categories:",
            "  PII:",
            "    response: SHRED",  # line 8: unknown action
            "controversial: maybe",  # line 9
        ]
    )
    found = problems(default=text)
    assert [f.split(": ")[0] + ": " + f.split(": ")[1] for f in found] == [
        "default.yaml:1: debounce",
        "default.yaml:3: response.unsafe",
        "default.yaml:5: thresholds.unsafe",
        "default.yaml:8: categories.PII.response",
        "default.yaml:9: controversial",
    ]
    assert "'BLOCK' is not one of CONTINUE, ALLOW, FLAG, REDACT, INTERRUPT" in found[1]


def test_invalid_yaml_names_the_line():
    found = problems(default="debounce: 2\nresponse: [unclosed\n")
    assert found[0].startswith("default.yaml:") and "invalid YAML" in found[0]


def test_inheritance_merges_nested_maps_and_child_wins():
    policies = load(
        default="response:\n  controversial: FLAG\ncategories:\n  PII:\n    response: REDACT\ndebounce: 3\n",
        child="extends: default\ndebounce: 1\ncategories:\n  Violent:\n    response: FLAG\n",
    )
    child = policies["child"]
    assert child.debounce == 1
    assert child.decide("response", U, "PII") == (U, Action.REDACT)  # inherited
    assert child.decide("response", U, "Violent") == (U, Action.FLAG)  # added


def test_missing_parent_and_cycles_are_errors():
    assert "no policy named 'nope'" in problems(default="extends: nope\n")[0]
    found = problems(default="description: d\n", a="extends: b\n", b="extends: a\n")
    assert any("inheritance cycle" in f for f in found)


def test_unknown_domain_is_invalid_input(tmp_path):
    shutil.copytree(REPO / "policies", tmp_path / "p")
    store = PolicyStore(tmp_path / "p")
    assert store.get("").name == "default" and store.get("medical").name == "medical"
    with pytest.raises(InvalidInput, match="unknown domain 'nope'"):
        store.get("nope")


def wait_for(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def test_live_reload_applies_valid_edits_and_keeps_the_last_good_set(tmp_path):
    directory = tmp_path / "p"
    shutil.copytree(REPO / "policies", directory)
    store = PolicyStore(directory)
    store.watch(0.05)
    try:
        version = store.version
        started = time.monotonic()
        (directory / "medical.yaml").write_text("extends: default\ndebounce: 7\n")
        assert wait_for(lambda: store.get("medical").debounce == 7, timeout=1.0)
        assert time.monotonic() - started < 1.0 and store.version == version + 1
        (directory / "medical.yaml").write_text("extends: default\ndebounce: many\n")
        assert wait_for(lambda: store.last_error != "")
        assert "medical.yaml:2: debounce" in store.last_error
        assert store.get("medical").debounce == 7  # the last good version stays active
        (directory / "new_domain.yaml").write_text("extends: default\ncontroversial: strict\n")
        (directory / "medical.yaml").write_text("extends: default\n")
        assert wait_for(lambda: "new_domain" in store.policies and not store.last_error)
        assert store.get("new_domain").controversial is ControversialMode.STRICT
    finally:
        store.stop()


class ConfigMapVolume:
    """A ConfigMap volume as the kubelet writes it: the files live in a timestamped directory,
    ``..data`` points at it, and each key is a top-level symlink through ``..data``. An update
    writes a new directory, swaps ``..data`` atomically (rename), then adds / removes key symlinks
    and deletes the old directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.generation = 0
        root.mkdir(parents=True)

    def write(self, files: dict[str, str]) -> None:
        self.generation += 1
        target = self.root / f"..2026_11_29_10_00_00.{self.generation:04d}"
        target.mkdir()
        for name, text in files.items():
            (target / name).write_text(text)
        old = os.readlink(self.root / "..data") if (self.root / "..data").is_symlink() else None
        os.symlink(target.name, self.root / "..data_tmp")
        os.replace(self.root / "..data_tmp", self.root / "..data")  # the atomic swap
        for link in self.root.iterdir():
            if not link.name.startswith("..") and link.name not in files:
                link.unlink()
        for name in files:
            if not (self.root / name).is_symlink():
                os.symlink(f"..data/{name}", self.root / name)
        if old:
            shutil.rmtree(self.root / old)


def test_configmap_updates_are_picked_up_the_way_the_kubelet_makes_them(tmp_path):
    default = (REPO / "policies" / "default.yaml").read_text()
    volume = ConfigMapVolume(tmp_path / "policies")
    volume.write({"default.yaml": default, "medical.yaml": "extends: default\ndebounce: 2\n"})
    store = PolicyStore(volume.root)
    store.watch(0.05)
    try:
        assert store.get("medical").debounce == 2 and set(store.policies) == {"default", "medical"}
        assert store.get("medical").source == str(volume.root / "medical.yaml")  # not the timestamped path
        version = store.version
        volume.write(
            {
                "default.yaml": default,
                "medical.yaml": "extends: default\ndebounce: 5\n",
                "finance.yaml": "extends: default\ncontroversial: strict\n",  # a new key in the same update
            }
        )
        assert wait_for(lambda: store.get("medical").debounce == 5 and "finance" in store.policies)
        assert store.version == version + 1 and not store.last_error and "..data" not in store.policies
        # A broken update is rejected with the file operators know; the last good set stays.
        volume.write({"default.yaml": default, "medical.yaml": "extends: default\ndebounce: many\n"})
        assert wait_for(lambda: store.last_error != "")
        assert f"{volume.root / 'medical.yaml'}:2: debounce" in store.last_error
        assert store.get("medical").debounce == 5 and "finance" in store.policies
        # The same content swapped in again (kubelet resync) is not a new version.
        good = {"default.yaml": default, "medical.yaml": "extends: default\ndebounce: 3\n"}
        volume.write(good)
        assert wait_for(lambda: store.get("medical").debounce == 3)
        version = store.version
        volume.write(good)
        time.sleep(0.3)
        assert store.version == version
    finally:
        store.stop()


def test_policy_check_cli_reports_file_line_and_field(tmp_path):
    good = guard_main("policy", "check", str(REPO / "policies"))
    assert good.returncode == 0 and "ok  medical" in good.stdout
    bad_dir = tmp_path / "bad"
    shutil.copytree(REPO / "policies", bad_dir)
    (bad_dir / "medical.yaml").write_text("extends: default\nfail_mode: sometimes\n")
    bad = guard_main("policy", "check", str(bad_dir / "medical.yaml"))
    assert bad.returncode == 1
    assert "medical.yaml:2: fail_mode: 'sometimes' is not one of open, closed" in bad.stderr


def test_policy_explain_cli_prints_the_effective_table():
    result = guard_main("policy", "explain", "medical", "--policies", str(REPO / "policies"))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "category pii" in out and "REDACT" in out
    assert "fail_mode       open after 3000 ms" in out
    assert "UNSAFE           FLAG       INTERRUPT" in out  # prompt FLAG (medical), response inherited


# ------------------------------------------------------------------ failures reported once


def rejected_total(metrics) -> float:
    return metrics.registry.get_sample_value("guard_policy_rejected_total") or 0.0


def events(caplog, event: str) -> int:
    return sum(f"event={event} " in r.getMessage() for r in caplog.records)


def test_missing_directory_is_reported_once_until_it_changes_or_recovers(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="guard.policy.loader")
    directory, moved = tmp_path / "p", tmp_path / "moved"
    shutil.copytree(REPO / "policies", directory)
    metrics = Metrics()
    store = PolicyStore(directory, on_change=metrics.on_policy_change)
    version = store.version
    directory.rename(moved)
    results = [store.reload() for _ in range(5)]  # five polls of the watcher
    assert [r.ok for r in results] == [False] * 5 and "the policy directory does not exist" in results[-1].error
    assert events(caplog, "policy_rejected") == 1 and rejected_total(metrics) == 1
    moved.rename(directory)  # back with the same content: recovered, not a new version
    results = [store.reload() for _ in range(3)]
    assert all(r.ok and not r.changed for r in results) and store.version == version and not store.last_error
    assert events(caplog, "policy_recovered") == 1
    assert metrics.registry.get_sample_value("guard_policy_last_reload_ok") == 1
    (directory / "medical.yaml").write_text("extends: default\ndebounce: many\n")  # a different failure
    for _ in range(3):
        store.reload()
    assert events(caplog, "policy_rejected") == 2 and rejected_total(metrics) == 2
    shutil.rmtree(directory)  # and another: the directory is gone
    for _ in range(3):
        store.reload()
    assert events(caplog, "policy_rejected") == 3 and rejected_total(metrics) == 3
    assert store.get("medical").debounce == 2  # the last good set stayed active throughout


NOT_UTF8 = b"extends: default\ndescription: caf\xe9\ndebounce: 1\n"  # Latin-1, as some editors save


def test_a_policy_file_that_is_not_utf8_is_rejected_once_and_the_last_good_set_stays(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="guard.policy.loader")
    directory = tmp_path / "p"
    shutil.copytree(REPO / "policies", directory)
    metrics = Metrics()
    store = PolicyStore(directory, on_change=metrics.on_policy_change)
    (directory / "medical.yaml").write_bytes(NOT_UTF8)
    results = [store.reload() for _ in range(4)]  # polls: no exception, no traceback
    expected = f"{directory / 'medical.yaml'}: (file): not valid UTF-8 (byte 0xe9 at offset 33, line 2)"
    assert all(not r.ok for r in results) and results[0].error.startswith(expected)
    assert store.get("medical").debounce == 2 and rejected_total(metrics) == 1
    assert events(caplog, "policy_rejected") == 1 and not [r for r in caplog.records if r.exc_info]
    with pytest.raises(PolicyError, match="not valid UTF-8"):
        check_path(directory / "medical.yaml")  # `guard policy check` says the same


async def test_reload_over_grpc_reports_a_non_utf8_file_as_a_rejection(demo_dir, tmp_path):
    directory = tmp_path / "p"
    shutil.copytree(REPO / "policies", directory)
    with running_sidecar(model=str(demo_dir), policies=str(directory), policy_poll_s=0) as sidecar:
        async with grpc.aio.insecure_channel(sidecar.address) as channel:
            stub = pb_grpc.PoliciesStub(channel)
            generation = (await stub.List(pb.ListPoliciesRequest())).generation
            (directory / "medical.yaml").write_bytes(NOT_UTF8)
            first = await stub.Reload(pb.ReloadRequest())
            again = await stub.Reload(pb.ReloadRequest())
            assert not first.ok and not first.changed and first.generation == generation
            assert "medical.yaml: (file): not valid UTF-8 (byte 0xe9 at offset 33" in first.error
            assert again.error == first.error
            assert (await stub.List(pb.ListPoliciesRequest())).last_error == first.error
            kept = await stub.Evaluate(  # the last good medical policy still redacts PII
                pb.EvaluateRequest(domain="medical", stage=pb.RESPONSE, risk=pb.UNSAFE, category="PII")
            )
            assert kept.action == pb.REDACT
        assert sidecar.sidecar.metrics.registry.get_sample_value("guard_policy_rejected_total") == 1


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -0.25, 1.5])
async def test_evaluate_probability_outside_0_1_is_invalid_argument(sidecar, value):
    request = pb.EvaluateRequest(domain="security_research", stage=pb.RESPONSE, risk=pb.UNSAFE, category="Self-Harm")
    request.probabilities.update({"Safe": 0.2, "Unsafe": value})
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pb_grpc.PoliciesStub(channel).Evaluate(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == f"`probabilities['Unsafe']` must be a number between 0 and 1, got {value:g}"
