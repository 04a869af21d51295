"""Risk levels and the checkpoint's label maps.

Label strings come from config.json; this module only maps them onto the three risk levels the
verdict logic needs, so a checkpoint that spells them differently still loads (or fails loudly).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass


class RiskLevel(enum.IntEnum):
    """What a risk label means; the numeric value is ours, not the checkpoint's index."""

    SAFE = 0
    CONTROVERSIAL = 1
    UNSAFE = 2


_RISK_NAMES = {"safe": RiskLevel.SAFE, "unsafe": RiskLevel.UNSAFE, "controversial": RiskLevel.CONTROVERSIAL}


class LabelError(ValueError):
    """A label map in config.json is missing, malformed or does not match the head size."""


@dataclass(frozen=True)
class LabelSet:
    """Ordered labels of one head: ``names[i]`` is the checkpoint's string for logit ``i``."""

    names: tuple[str, ...]

    @classmethod
    def from_config_map(cls, field: str, mapping: Mapping[str, str] | None, size: int) -> LabelSet:
        """Parse a config map such as ``{"0": "Safe", "1": "Unsafe", "2": "Controversial"}``."""
        if not isinstance(mapping, Mapping) or not mapping:
            raise LabelError(f"config.json field `{field}` must be an object of index -> label")
        try:
            by_index = {int(k): str(v) for k, v in mapping.items()}
        except ValueError as exc:
            raise LabelError(f"config.json field `{field}` has a non-integer key: {exc}") from None
        if sorted(by_index) != list(range(size)):
            raise LabelError(
                f"config.json field `{field}` must have keys 0..{size - 1} for a head of size {size}, "
                f"got {sorted(by_index)}"
            )
        return cls(tuple(by_index[i] for i in range(size)))

    def __len__(self) -> int:
        return len(self.names)


@dataclass(frozen=True)
class RiskLabels:
    """A risk head's labels plus which index is Safe / Unsafe / Controversial."""

    labels: LabelSet
    levels: tuple[RiskLevel, ...]

    @classmethod
    def from_labels(cls, field: str, labels: LabelSet) -> RiskLabels:
        levels = []
        for name in labels.names:
            level = _RISK_NAMES.get(name.strip().lower())
            if level is None:
                raise LabelError(
                    f"config.json field `{field}` has risk label {name!r}; expected Safe, Unsafe or Controversial"
                )
            levels.append(level)
        if RiskLevel.SAFE not in levels or RiskLevel.UNSAFE not in levels:
            raise LabelError(f"config.json field `{field}` must contain both a Safe and an Unsafe label")
        return cls(labels, tuple(levels))

    def index_of(self, level: RiskLevel) -> int | None:
        return self.levels.index(level) if level in self.levels else None
