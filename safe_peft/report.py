"""The data model of a load verdict: findings, key lists and the report that holds them.

Everything here is plain data: no torch, no peft. Reports are built by the diagnosis, by
``parse_load_error`` and by tests directly, and rendered by :mod:`safe_peft._render`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from safe_peft._bounds import json_safe
from safe_peft._keys import Shape

__all__ = [
    "DOCS_URL",
    "SCHEMA_VERSION",
    "Cause",
    "Diagnosis",
    "LoadReport",
    "MissingKey",
    "SizeMismatch",
    "UnexpectedKey",
]

SCHEMA_VERSION = 1
DOCS_URL = "https://github.com/safe-peft/safe-peft/blob/main/docs/causes"


class Cause(str, enum.Enum):
    """The broad class of a finding. Values are stable lower-case strings."""

    WRONG_BASE_MODEL = "wrong_base_model"
    MODEL_CLASS_MISMATCH = "model_class_mismatch"
    KEY_FORMAT = "key_format"
    CONFIG_MISMATCH = "config_mismatch"
    VOCAB_SIZE_MISMATCH = "vocab_size_mismatch"
    CORRUPT_CHECKPOINT = "corrupt_checkpoint"
    WRONG_LOADER = "wrong_loader"
    VERSION_SKEW = "version_skew"
    UNSAFE_FORMAT = "unsafe_format"
    FOREIGN_FORMAT = "foreign_format"
    DISTRIBUTED = "distributed"  # the ranks of a sharded load disagree, time out, or the layout cannot be placed
    ENGINE_INCOMPATIBLE = "engine_incompatible"  # a serving engine refuses the adapter or serves it wrong
    BASE_MODEL_UNAVAILABLE = "base_model_unavailable"  # the Auto route cannot build the base model the adapter names
    HOTSWAP_INCOMPATIBLE = "hotswap_incompatible"  # the new adapter cannot take the loaded one's place in a hot-swap
    UNKNOWN = "unknown"

    def __str__(self) -> str:  # same on every Python version (3.11 changed str() of mixed-in enums)
        return self.value


class MissingKey(NamedTuple):
    """A key the model expects that the checkpoint does not have.

    The key entries are named tuples: immutable like the findings, and cheap enough to build
    100,000 of (a parsed key wall, a 70B model's adapter) in a few tens of milliseconds.
    """

    key: str
    expected_shape: Shape | None = None


class UnexpectedKey(NamedTuple):
    """A key in the checkpoint that no part of the model takes."""

    key: str
    shape: Shape | None = None


class SizeMismatch(NamedTuple):
    """A key both sides have, with different shapes."""

    key: str
    checkpoint_shape: Shape
    model_shape: Shape


@dataclass(frozen=True)
class Diagnosis:
    """One finding: a cause, a stable code, what it means and how to fix it.

    ``remap`` and ``repair`` hold the exact ``safe_load_adapter`` argument that fixes the
    problem when an opt-in fix exists. ``details`` holds JSON-safe facts behind the finding
    (for example the configured and the stored rank) so that tools need not parse ``message``.
    """

    cause: Cause
    code: str
    message: str
    fix: str = ""
    remap: str | None = None
    repair: tuple[str, ...] = ()
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """The section of the docs that explains this cause."""
        return f"{DOCS_URL}/{self.cause.value}.md#{self.code}"

    def fix_arguments(self) -> str:
        """The keyword arguments that apply this finding's fix, as source text (may be empty)."""
        parts = []
        if self.remap is not None:
            parts.append(f"remap={self.remap!r}")
        if self.repair:
            parts.append(f"repair={self.repair!r}")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "cause": self.cause.value,
            "code": self.code,
            "message": self.message,
            "fix": self.fix,
            "remap": self.remap,
            "repair": list(self.repair),
            "url": self.url,
            "details": json_safe(self.details),
        }


@dataclass(frozen=True)
class LoadReport:
    """Everything known about one load (or one predicted load).

    ``ok`` is True when the adapter loads (or loaded) completely and exactly. ``warnings``
    never make ``ok`` False. ``renames`` and ``repairs`` list what an opt-in changed.
    ``adapter`` and ``model_class`` only serve the rendered message. ``route`` says how a load ran:
    ``"meta"`` (the adapter created on the meta device and the checkpoint assigned), ``"initialising"`` or
    ``"low_cpu_mem_usage"`` (peft's own routes), ``"in_place"`` (a reload or hot-swap copied into the loaded
    adapter's tensors) or ``"peft_hotswap"``; empty for a prediction.
    """

    ok: bool
    missing: list[MissingKey] = field(default_factory=list)
    unexpected: list[UnexpectedKey] = field(default_factory=list)
    size_mismatches: list[SizeMismatch] = field(default_factory=list)
    causes: list[Diagnosis] = field(default_factory=list)
    warnings: list[Diagnosis] = field(default_factory=list)
    renames: dict[str, str] = field(default_factory=dict)
    repairs: list[str] = field(default_factory=list)
    adapter: str = ""
    model_class: str = ""
    adapter_name: str = "default"
    base_model_unchanged: bool = True
    route: str = ""

    @property
    def primary(self) -> Diagnosis | None:
        """The most likely cause, or None when nothing went wrong."""
        return self.causes[0] if self.causes else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe data: the machine contract (see ``schema_version``)."""
        return {
            "schema_version": SCHEMA_VERSION,
            "ok": self.ok,
            "adapter": self.adapter,
            "model_class": self.model_class,
            "adapter_name": self.adapter_name,
            "base_model_unchanged": self.base_model_unchanged,
            "route": self.route,
            "missing": [{"key": m.key, "expected_shape": _shape(m.expected_shape)} for m in self.missing],
            "unexpected": [{"key": u.key, "shape": _shape(u.shape)} for u in self.unexpected],
            "size_mismatches": [
                {"key": s.key, "checkpoint_shape": list(s.checkpoint_shape), "model_shape": list(s.model_shape)}
                for s in self.size_mismatches
            ],
            "causes": [d.to_dict() for d in self.causes],
            "warnings": [d.to_dict() for d in self.warnings],
            "renames": dict(self.renames),
            "repairs": list(self.repairs),
        }

    def __str__(self) -> str:
        from safe_peft._render import render_report

        return render_report(self)


def _shape(shape: Shape | None) -> list[int] | None:
    return None if shape is None else list(shape)
