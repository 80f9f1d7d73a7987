"""The data model of a load verdict: findings, key lists and the report that holds them.

Everything here is plain data: no torch, no peft. Reports are built by the diagnosis, by
``parse_load_error`` and by tests directly. The message (``str(report)``) is a pure function of the report:
headline, the most likely cause, the fix, bounded key samples, then the promise about the base model; per-layer
repeats collapse into one line (``layers.{0...79}.self_attn.q_proj.lora_A.weight``), as transformers' loading
report does.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from safe_peft._bounds import json_safe, shorten
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
    """The broad class of a finding.

    Each cause has a page in the docs. The values are stable lower-case strings: compare them, or the members, never
    the message text. ``str(cause)`` is the value on every Python version.

    ```python
    >>> Cause.WRONG_BASE_MODEL.value
    'wrong_base_model'
    >>> Cause("key_format") is Cause.KEY_FORMAT
    True
    >>> diagnose(other_base, adapter_dir).primary.cause
    <Cause.WRONG_BASE_MODEL: 'wrong_base_model'>

    ```
    """

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

    A named tuple: immutable like the findings. Named tuples are cheap: 100,000 of them (a parsed key wall, or a
    70B model's adapter) take a few tens of milliseconds to build.

    :var key: the model's key.
    :var expected_shape: the shape the model expects, or None when unknown (a parsed error message).

    ```python
    >>> report = parse_load_error('Missing key(s) in state_dict: "bias".')
    >>> report.missing
    [MissingKey(key='bias', expected_shape=None)]

    ```
    """

    key: str
    expected_shape: Shape | None = None


class UnexpectedKey(NamedTuple):
    """A key in the checkpoint that no part of the model takes.

    :var key: the checkpoint's key.
    :var shape: the tensor's shape in the checkpoint, or None when unknown.

    ```python
    >>> report = parse_load_error('Unexpected key(s) in state_dict: "head.weight".')
    >>> report.unexpected[0].key
    'head.weight'

    ```
    """

    key: str
    shape: Shape | None = None


class SizeMismatch(NamedTuple):
    """A key both sides have, with different shapes.

    :var key: the key.
    :var checkpoint_shape: the tensor's shape in the checkpoint.
    :var model_shape: the shape the model expects.

    ```python
    >>> mismatch = diagnose(other_base, adapter_dir).size_mismatches[0]
    >>> mismatch.checkpoint_shape, mismatch.model_shape
    ((8, 64), (8, 128))

    ```
    """

    key: str
    checkpoint_shape: Shape
    model_shape: Shape


@dataclass(frozen=True)
class Diagnosis:
    """One finding: a cause, a stable code, what it means and how to fix it.

    Reports hold findings; you read them, you do not build them. ``url`` is the finding's section in the docs.

    :param cause: the broad class (:class:`Cause`).
    :param code: a stable, finer name, such as ``"strip_orig_mod"``: the section's anchor.
    :param message: what went wrong, for a person.
    :param fix: what to do about it, for a person.
    :param remap: the exact ``remap=`` argument of ``safe_load_adapter`` that fixes it, when one does.
    :param repair: the exact ``repair=`` argument that fixes it, when one does.
    :param details: JSON-safe facts behind the finding (for example the configured and the stored rank), so that
        tools need not parse ``message``.

    ```python
    >>> finding = diagnose(make_base(), compiled_adapter_dir).primary
    >>> finding.cause, finding.code, finding.remap
    (<Cause.KEY_FORMAT: 'key_format'>, 'strip_orig_mod', 'auto')
    >>> finding.url
    'https://github.com/safe-peft/safe-peft/blob/main/docs/causes/key_format.md#strip_orig_mod'

    ```
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
    """Everything known about one load, or one predicted load.

    ``str(report)`` is the explanation an error shows. ``to_dict()`` gives JSON-safe data with a
    ``schema_version``: the machine contract. ``primary`` is the most likely cause (None when nothing went wrong).

    :param ok: True when the adapter loads (or loaded) completely and exactly. Warnings never make it False.
    :param missing: keys the model expects that the checkpoint lacks (:class:`MissingKey`).
    :param unexpected: checkpoint keys that no part of the model takes (:class:`UnexpectedKey`).
    :param size_mismatches: keys both sides have, with different shapes (:class:`SizeMismatch`).
    :param causes: the findings that stop the load, most likely first (:class:`Diagnosis`).
    :param warnings: findings that did not stop the load (an all-zero ``lora_B``, config keys peft ignored).
    :param renames: the renames an opt-in ``remap`` applied, old key to new key.
    :param repairs: the repairs an opt-in ``repair`` applied, described.
    :param adapter: the adapter's path, for the rendered message only.
    :param model_class: the model's class name, for the rendered message only.
    :param adapter_name: the adapter's name in the model.
    :param base_model_unchanged: whether the model passed in is exactly as it was.
    :param route: how a load ran. ``"meta"``: the adapter was created on the meta device and the checkpoint
        assigned. ``"initialising"`` or ``"low_cpu_mem_usage"``: peft's own routes. ``"in_place"``: a reload or
        hot-swap copied into the loaded adapter's tensors. ``"peft_hotswap"``: peft's hot-swap. Empty for a
        prediction.

    ```python
    >>> report = diagnose(other_base, adapter_dir)
    >>> report.ok, len(report.size_mismatches), report.primary.code
    (False, 8, 'dimension_mismatch')
    >>> report.to_dict()["causes"][0]["cause"]
    'wrong_base_model'
    >>> print(report)
    Cannot load adapter '...' into LlamaForCausalLM: 0 missing, 0 unexpected, 8 size-mismatched keys.
    Most likely cause [wrong_base_model/dimension_mismatch]: ...
    The base model was left unchanged.
    Docs: https://github.com/safe-peft/safe-peft/blob/main/docs/causes/wrong_base_model.md#dimension_mismatch

    ```
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
        return _render_report(self)


def _shape(shape: Shape | None) -> list[int] | None:
    return None if shape is None else list(shape)


# -- the rendered message ------------------------------------------------------------------------------------------

SAMPLE_SIZE = 10
KEY_CHARS = 300  # a key longer than this (only a hostile header has one) is shown cut


def _render_report(report: LoadReport, *, sample_size: int = SAMPLE_SIZE) -> str:
    """Render ``report`` as the human message used by ``str(AdapterLoadError)``."""
    lines = [_headline(report)]
    primary = report.primary
    if primary is not None:
        lines.append(f"Most likely cause [{primary.cause.value}/{primary.code}]: {primary.message}")
        if primary.fix:
            lines.append(f"Fix: {primary.fix}")
    lines.extend(f"Also [{other.cause.value}/{other.code}]: {other.message}" for other in report.causes[1:])
    lines.extend(
        _section(
            "Missing keys (in the model, not in the checkpoint)",
            [(m.key, _fmt(m.expected_shape)) for m in report.missing],
            sample_size,
        )
    )
    lines.extend(
        _section(
            "Unexpected keys (in the checkpoint, not in the model)",
            [(u.key, _fmt(u.shape)) for u in report.unexpected],
            sample_size,
        )
    )
    lines.extend(
        _section(
            "Size mismatches",
            [
                (s.key, f"checkpoint {_fmt(s.checkpoint_shape)}, model {_fmt(s.model_shape)}")
                for s in report.size_mismatches
            ],
            sample_size,
        )
    )
    if report.renames:
        lines.extend(_section("Renamed", [(old, f"-> {new}") for old, new in report.renames.items()], sample_size))
    lines.extend(f"Repaired: {repair}" for repair in report.repairs)
    lines.extend(f"Warning [{w.cause.value}/{w.code}]: {w.message}" for w in report.warnings)
    if not report.ok:
        if report.base_model_unchanged:
            lines.append("The base model was left unchanged.")
        if primary is not None:
            lines.append(f"Docs: {primary.url}")
    return "\n".join(lines)


def _headline(report: LoadReport) -> str:
    target = f" into {report.model_class}" if report.model_class else ""
    adapter = f"adapter {report.adapter!r}" if report.adapter else "adapter"
    name = f" (adapter_name={report.adapter_name!r})" if report.adapter_name != "default" else ""
    if report.ok:
        return f"{adapter}{name} loads{target}: every adapter weight matched."
    counts = (
        f"{len(report.missing)} missing, {len(report.unexpected)} unexpected, "
        f"{len(report.size_mismatches)} size-mismatched keys"
    )
    return f"Cannot load {adapter}{name}{target}: {counts}."


def _section(title: str, rows: Sequence[tuple[str, str]], sample_size: int) -> list[str]:
    if not rows:
        return []
    collapsed, groups = _collapse(rows, sample_size)
    out = [f"{title} ({len(rows)}):"]
    out.extend(
        f"  {shorten(key, KEY_CHARS)}: {info}" if info else f"  {shorten(key, KEY_CHARS)}" for key, info in collapsed
    )
    hidden = groups - sample_size
    if hidden > 0:
        out.append(f"  ... and {hidden} more lines")
    return out


def _collapse_keys(rows: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Merge rows whose keys differ only in numeric path segments and whose info is equal.

    ``[("h.0.attn.w", "x"), ("h.1.attn.w", "x")]`` becomes ``[("h.{0...1}.attn.w", "x")]``.
    Order follows the first appearance of each group.
    """
    return _collapse(rows, None)[0]


_NUMBER = re.compile(r"(?<![^.])[0-9]+(?![^.])")  # a whole numeric path segment (ASCII digits: int() reads them)


def _collapse(rows: Iterable[tuple[str, str]], limit: int | None) -> tuple[list[tuple[str, str]], int]:
    """The first ``limit`` groups of :func:`collapse_keys` (all when None) and how many groups there are: a
    report on a 100,000-key header shows ten lines, so only those ten gather their indices."""
    groups: dict[tuple[str, str], tuple[str, list[set[int]]] | None] = {}
    sub, findall = _NUMBER.sub, _NUMBER.findall
    for key, info in rows:
        group = (sub("\0", key), info)
        if group not in groups:
            if limit is not None and len(groups) >= limit:
                groups[group] = None  # counted, not shown
                continue
            groups[group] = (key, [set() for _ in findall(key)])
        slot = groups[group]
        if slot is None:
            continue
        numbers = findall(key)
        if len(numbers) == len(slot[1]):  # (a NUL in a hostile key could join two shapes: keep the first's)
            for position, number in enumerate(numbers):
                slot[1][position].add(int(number))
    result = []
    for (_, info), slot in groups.items():
        if slot is None:
            continue
        first, values = slot
        result.append((sub(_filler(values), first), info))
    return result, len(groups)


def _filler(values: list[set[int]]) -> Callable[[re.Match[str]], str]:
    """For ``re.sub``: the n-th numeric segment becomes the n-th set of indices."""
    slots = iter(values)
    return lambda _: _fmt_indices(next(slots))


def _fmt_indices(values: set[int]) -> str:
    ordered = sorted(values)
    if len(ordered) == 1:
        return str(ordered[0])
    if ordered[-1] - ordered[0] + 1 == len(ordered):
        return f"{{{ordered[0]}...{ordered[-1]}}}"
    if len(ordered) <= 6:
        return "{" + ",".join(map(str, ordered)) + "}"
    return "{" + ",".join(map(str, ordered[:3])) + f",...,{ordered[-1]}}}"


def _fmt(shape: tuple[int, ...] | None) -> str:
    if shape is None:
        return "?"
    if len(shape) > 16:  # a hostile header's million-dimension shape is not printed whole
        return "[" + ", ".join(map(str, shape[:8])) + f", ... {len(shape):,} dimensions]"
    return "[" + ", ".join(map(str, shape)) + "]"
