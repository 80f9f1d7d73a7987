"""Text rendering of a :class:`~safe_peft.report.LoadReport`: a pure function of the report.

Order is fixed: headline, the most likely cause, the fix, bounded key samples, then the
promise about the base model. Per-layer repeats collapse into one line
(``layers.{0...79}.self_attn.q_proj.lora_A.weight``), as transformers' loading report does.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from safe_peft._bounds import shorten

if TYPE_CHECKING:
    from safe_peft.report import LoadReport

__all__ = ["collapse_keys", "render_report"]

SAMPLE_SIZE = 10
KEY_CHARS = 300  # a key longer than this (only a hostile header has one) is shown cut


def render_report(report: LoadReport, *, sample_size: int = SAMPLE_SIZE) -> str:
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


def collapse_keys(rows: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
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
