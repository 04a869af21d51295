"""Policy files: YAML in a directory, one domain per file, validated with file, line and field
for every error; ``extends`` inherits from another domain; a store that reloads live.

Reloading is all-or-nothing: when any file is invalid the last good set stays active and the
error is kept for the Policies service and the metrics. Kubernetes ConfigMap volumes (files that
are symlinks into a ``..data`` directory swapped atomically) are read through their symlinks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from guard.errors import InvalidInput
from guard.model.labels import RiskLevel
from guard.policy.actions import PROMPT_ACTIONS, RESPONSE_ACTIONS, Action
from guard.policy.rules import FailMode, Policy, ReleaseDefault, Topic, category_key
from guard.session.verdict import ControversialMode

log = logging.getLogger(__name__)

DEFAULT_DOMAIN = "default"


@dataclass(frozen=True)
class Problem:
    file: str
    line: int  # 1-based; 0 when the file itself is the problem
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.field or '(file)'}: {self.message}"


class PolicyError(ValueError):
    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


# ---------------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class Enum:
    values: tuple[str, ...]


@dataclass(frozen=True)
class Number:
    low: float
    high: float
    integer: bool = False


@dataclass(frozen=True)
class MapOf:
    value: dict
    required: tuple[str, ...] = ()  # keys every entry must have


@dataclass(frozen=True)
class ListOf:
    item: Any
    min_items: int = 0


PROMPT_ACTION = Enum(tuple(a.name for a in PROMPT_ACTIONS))
RESPONSE_ACTION = Enum(tuple(a.name for a in RESPONSE_ACTIONS))
PROBABILITY = Number(0.0, 1.0)
SCHEMA: dict[str, Any] = {
    "description": str,
    "extends": str,
    "prompt": {"safe": PROMPT_ACTION, "controversial": PROMPT_ACTION, "unsafe": PROMPT_ACTION},
    "response": {"controversial": RESPONSE_ACTION, "unsafe": RESPONSE_ACTION},
    "thresholds": {"unsafe": PROBABILITY, "controversial": PROBABILITY},
    "controversial": Enum(("strict", "loose")),
    "debounce": Number(1, 64, integer=True),
    "release_mode": Enum(("hold_back", "optimistic")),
    "redact_marker": str,
    "categories": MapOf({"prompt": PROMPT_ACTION, "response": RESPONSE_ACTION}),
    "fail_mode": Enum(("open", "closed")),
    "model_timeout_ms": Number(1, 600_000, integer=True),
    # The Reasoner: whether the reasoning trace (inside <think>) is moderated too, or only the answer.
    "moderate_reasoning": bool,
    # Named topics matched against the prompt by the Embedder (cosine similarity to exemplars).
    "topics": MapOf(
        {
            "description": str,
            "action": Enum(("BLOCK", "FLAG")),
            "threshold": PROBABILITY,
            "examples": ListOf(str, min_items=1),
        },
        required=("action", "threshold", "examples"),
    ),
}


def _validate(node: yaml.Node, schema: Any, path: str, file: str, problems: list[Problem]) -> Any:
    line = node.start_mark.line + 1

    def bad(message: str) -> None:
        problems.append(Problem(file, line, path, message))

    if isinstance(schema, dict | MapOf):
        if not isinstance(node, yaml.MappingNode):
            bad("expected a mapping")
            return None
        out = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            sub_path = f"{path}.{key}" if path else str(key)
            if isinstance(schema, MapOf):
                out[key] = _validate(value_node, schema.value, sub_path, file, problems)
                missing = [r for r in schema.required if isinstance(out[key], dict) and r not in out[key]]
                for name in missing:
                    problems.append(Problem(file, key_node.start_mark.line + 1, f"{sub_path}.{name}", "required"))
            elif key not in schema:
                problems.append(
                    Problem(
                        file,
                        key_node.start_mark.line + 1,
                        sub_path,
                        f"unknown key; expected one of {', '.join(schema)}",
                    )
                )
            elif key in out:
                problems.append(Problem(file, key_node.start_mark.line + 1, sub_path, "duplicate key"))
            else:
                out[key] = _validate(value_node, schema[key], sub_path, file, problems)
        return out
    if isinstance(schema, ListOf):
        if not isinstance(node, yaml.SequenceNode):
            bad("expected a list")
            return None
        if len(node.value) < schema.min_items:
            bad(f"expected at least {schema.min_items} item(s)")
        return [_validate(item, schema.item, f"{path}[{i}]", file, problems) for i, item in enumerate(node.value)]
    if not isinstance(node, yaml.ScalarNode):
        bad("expected a single value")
        return None
    try:  # the node's own (resolved) tag decides its type; an unknown tag (`!x`) is a problem, not a crash
        value = yaml.constructor.SafeConstructor().construct_object(node, deep=True)
    except yaml.YAMLError as exc:
        bad(f"cannot read this value ({getattr(exc, 'problem', None) or exc})")
        return None
    if schema is str:
        if not isinstance(value, str):
            bad(f"expected text, got {value!r}")
        return value
    if schema is bool:
        if not isinstance(value, bool):
            bad(f"expected true or false, got {value!r}")
        return value
    if isinstance(schema, Enum):
        text = str(value).strip()
        match = next((v for v in schema.values if v.lower() == text.lower()), None)
        if match is None:
            bad(f"{text!r} is not one of {', '.join(schema.values)}")
        return match
    if isinstance(schema, Number):
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or (schema.integer and not isinstance(value, int))
        ):
            bad(f"expected {'an integer' if schema.integer else 'a number'}, got {value!r}")
            return None
        if not schema.low <= value <= schema.high:
            bad(f"must be between {schema.low:g} and {schema.high:g}, got {value}")
        return value
    raise TypeError(schema)


def parse_policy_text(text: str, file: str) -> tuple[dict[str, Any], dict[str, int], list[Problem]]:
    """Validated raw dict, line of each top-level key, problems."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        return {}, {}, [Problem(file, mark.line + 1 if mark else 0, "", f"invalid YAML: {exc}")]
    if root is None:
        return {}, {}, []
    problems: list[Problem] = []
    raw = _validate(root, SCHEMA, "", file, problems) or {}
    lines = {}
    if isinstance(root, yaml.MappingNode):
        lines = {k.value: k.start_mark.line + 1 for k, _ in root.value if isinstance(k, yaml.ScalarNode)}
    return raw, lines, problems


# ---------------------------------------------------------------------------------- compile


def _merge(parent: dict, child: dict) -> dict:
    out = dict(parent)
    for key, value in child.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def compile_policy(name: str, raw: dict[str, Any], source: str = "") -> Policy:
    """Effective raw dict (after inheritance) -> Policy."""
    base = Policy()
    prompt = dict(base.prompt_actions)
    for level in ("safe", "controversial", "unsafe"):
        if level in raw.get("prompt", {}):
            prompt[RiskLevel[level.upper()]] = Action[raw["prompt"][level]]
    response = dict(base.response_actions)
    for level in ("controversial", "unsafe"):
        if level in raw.get("response", {}):
            response[RiskLevel[level.upper()]] = Action[raw["response"][level]]
    prompt_categories, response_categories = {}, {}
    for category, actions in (raw.get("categories") or {}).items():
        if "prompt" in actions:
            prompt_categories[category_key(category)] = Action[actions["prompt"]]
        if "response" in actions:
            response_categories[category_key(category)] = Action[actions["response"]]
    thresholds = raw.get("thresholds", {})
    topics = tuple(
        Topic(name, Action[t["action"]], t["threshold"], tuple(t["examples"]), t.get("description", ""))
        for name, t in sorted((raw.get("topics") or {}).items())
    )
    return Policy(
        name=name,
        description=raw.get("description", ""),
        prompt_actions=prompt,
        response_actions=response,
        prompt_category_actions=prompt_categories,
        response_category_actions=response_categories,
        unsafe_threshold=thresholds.get("unsafe"),
        controversial_threshold=thresholds.get("controversial"),
        controversial=ControversialMode(raw.get("controversial", base.controversial.value)),
        debounce=raw.get("debounce", base.debounce),
        release_mode=ReleaseDefault(raw.get("release_mode", base.release_mode.value)),
        redact_marker=raw.get("redact_marker", base.redact_marker),
        fail_mode=FailMode(raw.get("fail_mode", base.fail_mode.value)),
        model_timeout_ms=raw.get("model_timeout_ms", base.model_timeout_ms),
        moderate_reasoning=raw.get("moderate_reasoning", base.moderate_reasoning),
        topics=topics,
        source=source,
        version=hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:12],
    )


def policy_files(directory: Path) -> list[Path]:
    """*.yaml / *.yml in the directory, skipping dotfiles and ConfigMap internals (``..data``)."""
    return sorted(
        p for p in directory.iterdir() if p.suffix in (".yaml", ".yml") and not p.name.startswith(".") and p.is_file()
    )


def load_policies(files: dict[str, tuple[str, str]]) -> tuple[dict[str, Policy], dict[str, dict]]:
    """{domain: (file name, text)} -> ({domain: Policy}, {domain: effective raw}); PolicyError lists all problems."""
    problems: list[Problem] = []
    raws: dict[str, dict] = {}
    lines: dict[str, dict[str, int]] = {}
    for domain, (file, text) in files.items():
        raw, key_lines, found = parse_policy_text(text, file)
        problems += found
        raws[domain], lines[domain] = raw, key_lines
    effective: dict[str, dict] = {}

    def resolve(domain: str, chain: tuple[str, ...]) -> dict | None:
        if domain in effective:
            return effective[domain]
        raw = raws[domain]
        parent_name = raw.get("extends")
        if parent_name is None:
            effective[domain] = raw
            return raw
        file = files[domain][0]
        line = lines[domain].get("extends", 0)
        if parent_name not in raws:
            problems.append(
                Problem(file, line, "extends", f"no policy named {parent_name!r} (known: {', '.join(sorted(raws))})")
            )
            return None
        if parent_name in chain:
            problems.append(Problem(file, line, "extends", f"inheritance cycle: {' -> '.join((*chain, parent_name))}"))
            return None
        parent = resolve(parent_name, (*chain, parent_name))
        if parent is None:
            return None
        merged = _merge({k: v for k, v in parent.items() if k not in ("description",)}, raw)
        merged.pop("extends", None)
        merged["extends"] = parent_name
        effective[domain] = merged
        return merged

    for domain in raws:
        resolve(domain, (domain,))
    if problems:
        raise PolicyError(problems)
    policies = {
        d: compile_policy(d, {k: v for k, v in raw.items() if k != "extends"}, files[d][0])
        for d, raw in effective.items()
    }
    return policies, effective


def unmatched_topics(policies: dict[str, Policy], files: dict[str, tuple[str, str]]) -> None:
    """Topics need the Embedder: without it, every policy that has them (its own or inherited)
    is an error naming the file and the line of its ``topics:`` key (0 when inherited)."""
    problems = []
    for domain, policy in sorted(policies.items()):
        if not policy.topics:
            continue
        file, text = files[domain]
        line = next((i for i, t in enumerate(text.splitlines(), 1) if t.startswith("topics:")), 0)
        where = "" if line else " (inherited)"
        problems.append(
            Problem(
                file,
                line,
                "topics",
                f"topics{where} need the Embedder: start the sidecar with --embedder DIR|demo, or remove them",
            )
        )
    if problems:
        raise PolicyError(problems)


def snapshot_dir(directory: Path) -> Path:
    """Where to read a consistent set of files. A mounted Kubernetes ConfigMap keeps its files in a
    timestamped directory that the kubelet swaps in atomically through the ``..data`` symlink;
    reading through the resolved target never mixes files of two versions."""
    data = directory / "..data"
    return data.resolve() if data.is_symlink() else directory


def read_policy_file(path: Path, shown: str) -> str:
    """The file's text; a PolicyError (not a traceback) when it cannot be read or is not UTF-8."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PolicyError([Problem(shown, 0, "", f"cannot read: {exc}")]) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        message = f"not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}, line {line}); save it as UTF-8"
        raise PolicyError([Problem(shown, 0, "", message)]) from None


def read_policy_dir(directory: Path) -> dict[str, tuple[str, str]]:
    files = {}
    for path in policy_files(snapshot_dir(directory)):
        shown = str(directory / path.name)  # the path operators know, not the kubelet's timestamped one
        files[path.stem] = (shown, read_policy_file(path, shown))
    return files


def check_path(path: Path) -> dict[str, Policy]:
    """Validate a directory, or one file (its ``extends`` resolved in the same directory)."""
    if path.is_dir():
        files = read_policy_dir(path)
        if not files:
            raise PolicyError([Problem(str(path), 0, "", "no *.yaml policy files")])
        return load_policies(files)[0]
    if not path.is_file():
        raise PolicyError([Problem(str(path), 0, "", "no such file or directory")])
    files = read_policy_dir(path.parent)
    files[path.stem] = (str(path), read_policy_file(path, str(path)))
    return {path.stem: load_policies(files)[0][path.stem]}


# ---------------------------------------------------------------------------------- store


@dataclass
class ReloadResult:
    ok: bool
    changed: bool
    version: int
    error: str = ""


@dataclass
class PolicyStore:
    """The active policy set: looked up per stream, swapped atomically on a valid change.

    A failure (invalid content, a missing directory, an unreadable file) is reported once, a log
    line and one ``on_change`` call, until it changes or recovers: a watcher polling a broken
    directory must not flood the logs nor count one mistake as many rejections."""

    directory: Path | None
    default_domain: str = DEFAULT_DOMAIN
    on_change: Callable[[PolicyStore], None] | None = None
    # False when the sidecar runs without the Embedder: a policy with topics is then invalid.
    topics_available: bool = True
    # Called with the domain every request resolves (before its policy is used): the server's
    # tenant check raises PermissionDenied there, whichever front end the request came through.
    access_check: Callable[[str], None] | None = None
    policies: dict[str, Policy] = field(default_factory=dict)
    effective: dict[str, dict] = field(default_factory=dict)
    version: int = 0  # increments on every accepted change
    loaded_at: float = 0.0
    last_error: str = ""  # the failure being reported; empty while the directory matches the active set
    _fingerprint: str = ""  # content of the active set
    _rejected_fingerprint: str = ""  # content last rejected: not parsed again until it changes
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _last_exception: PolicyError | None = None

    def __post_init__(self) -> None:
        result = self.reload()
        if not result.ok:
            raise self._last_exception

    def get(self, domain: str) -> Policy:
        name = domain or self.default_domain
        if self.access_check is not None:
            self.access_check(name)
        policy = self.policies.get(name)
        if policy is None:
            raise InvalidInput(f"unknown domain {name!r}; known policies: {', '.join(sorted(self.policies))}")
        return policy

    def candidate(self, domain: str, text: str, source: str = "(candidate)") -> Policy:
        """``text`` compiled as ``domain``'s policy against the active set: it may extend any domain
        the caller may use, its own domain's current version included (a candidate that says
        only what changes). PolicyError (file:line) when it does not compile."""
        raw, lines, problems = parse_policy_text(text, source)
        if problems:
            raise PolicyError(problems)
        parent = raw.get("extends")
        if parent is not None:
            if self.access_check is not None:
                self.access_check(parent)
            if parent not in self.effective:
                raise PolicyError([Problem(source, lines.get("extends", 0), "extends", f"no domain {parent!r}")])
            inherited = {k: v for k, v in self.effective[parent].items() if k not in ("description", "extends")}
            raw = _merge(inherited, raw)
        return compile_policy(domain, {k: v for k, v in raw.items() if k != "extends"}, source)

    def _read(self) -> dict[str, tuple[str, str]]:
        if self.directory is None:
            return {self.default_domain: ("(built-in)", "description: built-in default policy\n")}
        if not self.directory.is_dir():
            raise PolicyError([Problem(str(self.directory), 0, "", "the policy directory does not exist")])
        return read_policy_dir(self.directory)

    def reload(self) -> ReloadResult:
        """Re-read the directory; keep the last good set if anything is invalid."""
        with self._lock:
            try:
                files = self._read()
            except PolicyError as exc:
                return self._reject(exc, "")
            fingerprint = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
            if fingerprint == self._fingerprint:
                recovered = self._clear_error()
                result = ReloadResult(True, False, self.version)
            elif fingerprint == self._rejected_fingerprint:
                return ReloadResult(False, False, self.version, self.last_error)
            else:
                try:
                    policies, effective = load_policies(files)
                    if not self.topics_available:
                        unmatched_topics(policies, files)
                    if self.default_domain not in policies:
                        where = str(self.directory)
                        raise PolicyError(
                            [Problem(where, 0, "", f"no {self.default_domain}.yaml (the default domain)")]
                        )
                except PolicyError as exc:
                    return self._reject(exc, fingerprint)
                self.policies, self.effective = policies, effective
                self._fingerprint = fingerprint
                self.version += 1
                self.loaded_at = time.time()
                log.info("event=policy_loaded version=%d domains=%s", self.version, ",".join(sorted(policies)))
                recovered = self._clear_error()
                result = ReloadResult(True, True, self.version)
        if recovered or result.changed:
            self._notify()
        return result

    def _clear_error(self) -> bool:
        """Forget the reported failure; True (and one log line) if there was one."""
        self._rejected_fingerprint = ""
        if not self.last_error:
            return False
        self.last_error = ""
        log.info("event=policy_recovered active_version=%d", self.version)
        return True

    def _reject(self, exc: PolicyError, fingerprint: str) -> ReloadResult:
        """Keep the last good set; report the failure unless it is the one already reported."""
        self._rejected_fingerprint = fingerprint
        self._last_exception = exc
        error = str(exc)
        if error != self.last_error:
            self.last_error = error
            log.error("event=policy_rejected active_version=%d errors=%r", self.version, error)
            self._notify()
        return ReloadResult(False, False, self.version, error)

    def _notify(self) -> None:
        if self.on_change is not None:
            self.on_change(self)

    def watch(self, interval_s: float = 0.25) -> threading.Thread:
        """Poll the directory (content hash) and reload on change, in a daemon thread."""

        def loop() -> None:
            failure = ""  # the unexpected error last logged: one traceback per distinct failure
            while not self._stop.wait(interval_s):
                try:
                    self.reload()
                    failure = ""
                except Exception as exc:  # never let the watcher die
                    if repr(exc) != failure:
                        failure = repr(exc)
                        log.exception("event=policy_watch_failed")

        thread = threading.Thread(target=loop, name="policy-watch", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()
