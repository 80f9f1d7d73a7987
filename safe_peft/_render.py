"""Text rendering of a :class:`~safe_peft.report.LoadReport`: a pure function of the report.

Order is fixed: headline, the most likely cause, the fix, bounded key samples, then the
promise about the base model. Per-layer repeats collapse into one line
(``layers.{0...79}.self_attn.q_proj.lora_A.weight``), as transformers' loading report does.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from safe_peft._bounds import shorten
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
    collapsed = collapse_keys(rows)
    out = [f"{title} ({len(rows)}):"]
    out.extend(
        f"  {shorten(key, KEY_CHARS)}: {info}" if info else f"  {shorten(key, KEY_CHARS)}"
        for key, info in collapsed[:sample_size]
    )
    hidden = len(collapsed) - sample_size
    if hidden > 0:
        out.append(f"  ... and {hidden} more lines")
    return out


def collapse_keys(rows: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Merge rows whose keys differ only in numeric path segments and whose info is equal.

    ``[("h.0.attn.w", "x"), ("h.1.attn.w", "x")]`` becomes ``[("h.{0...1}.attn.w", "x")]``.
    Order follows the first appearance of each group.
    """
    groups: dict[tuple[tuple[str | None, ...], str], list[set[int]]] = {}
    for key, info in rows:
        parts = key.split(".")
        template = tuple(None if p.isdigit() else p for p in parts)
        numbers = [int(p) for p in parts if p.isdigit()]
        slot = groups.setdefault((template, info), [set() for _ in numbers])
        for position, number in enumerate(numbers):
            slot[position].add(number)
    result = []
    for (template, info), values in groups.items():
        slots = iter(values)
        parts = [p if p is not None else _fmt_indices(next(slots)) for p in template]
        result.append((".".join(parts), info))
    return result


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
