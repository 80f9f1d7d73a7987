"""The ``--target ENGINE`` side of ``safe-peft check`` and ``safe-peft fix`` (hooked into the CLI).

``check --target`` reads the adapter config and header only (no torch); ``fix --target`` writes the exact
conversion and checks its output again. Exit codes as elsewhere: 0 the engine serves it, 1 it refuses or serves
it wrong (or no rule decides), 2 usage error or unreadable input.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Protocol

from safe_peft._engines.rule_types import ENGINES

__all__ = [
    "add_target_arguments",
    "run_check_target",
    "run_fix_target",
    "table",
]

OK, INCOMPATIBLE, USAGE = 0, 1, 2


class _Output(Protocol):
    def write(self, text: str) -> None: ...
    def good(self, text: str) -> str: ...
    def bad(self, text: str) -> str: ...


def add_target_arguments(parser: argparse.ArgumentParser, *, fix: bool = False) -> None:
    names = sorted({alias for aliases in ENGINES.values() for alias in aliases})
    parser.add_argument(
        "--target",
        choices=names,
        metavar="ENGINE",
        help=f"check (or convert) for a serving engine instead of peft: {', '.join(ENGINES)}",
    )
    parser.add_argument("--engine-version", default=None, help="the engine's rule set (default: the newest known)")
    if fix:
        parser.add_argument("--pad-rank", type=int, default=None, metavar="R", help="also pad every module to rank R")
    else:
        parser.add_argument(
            "--engine-arg",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="a setting the engine will run with, e.g. max_lora_rank=16 (repeat)",
        )


def _engine_args(pairs: list[str]) -> dict[str, Any]:
    args: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--engine-arg {pair!r}: expected KEY=VALUE")
        args[key.replace("-", "_")] = int(value) if value.isascii() and value.isdigit() else value
    return args


def run_check_target(args: argparse.Namespace, adapters: list[str], out: _Output) -> int:
    from safe_peft._engines.check import TargetReport, check_target, unreadable
    from safe_peft.errors import AdapterFormatError

    engine_args = _engine_args(args.engine_arg)
    reports: list[TargetReport] = []
    for path in adapters:
        try:
            report = check_target(
                path, args.target, base=args.base, version=args.engine_version, engine_args=engine_args
            )
        except AdapterFormatError as exc:  # one unreadable adapter is a row of the table, as in plain check
            report = unreadable(path, args.target, args.engine_version, exc)
        reports.append(report)
    if args.json:
        document = {
            "schema_version": 1,
            "engine": reports[0].engine if reports else args.target,
            "engine_version": reports[0].version if reports else args.engine_version,
            "summary": {
                v: sum(1 for r in reports if r.verdict == v)
                for v in ("serves", "serves_wrong", "refuses", "unknown", "unreadable")
            },
            "results": [r.to_dict() for r in reports],
        }
        out.write(json.dumps(document, indent=2))
    else:
        out.write(_render(reports, out))
    if any(r.verdict == "unreadable" for r in reports):
        return USAGE
    return OK if all(r.ok for r in reports) else INCOMPATIBLE


def table(rows: list[tuple[str, str, str, str]], out: _Output, *, good: str) -> list[str]:
    """The lines of a check's summary table (the first row its header): columns aligned, each verdict coloured
    good when it is ``good``, bad otherwise."""
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = []
    for i, (path, verdict, what, fix) in enumerate(rows):
        shown = verdict if i == 0 else (out.good(verdict) if verdict == good else out.bad(verdict))
        pad = " " * (widths[1] - len(verdict))
        lines.append(f"{path.ljust(widths[0])}  {shown}{pad}  {what.ljust(widths[2])}  {fix}".rstrip())
    return lines


def _render(reports: list[Any], out: _Output) -> str:
    rows = [("ADAPTER", "VERDICT", "FINDING", "FIX")]
    for r in reports:
        first = r.findings[0] if r.findings else None
        fix = ("safe-peft fix --target " + r.engine) if r.fixable else (first.fix if first else " ".join(r.command))
        rows.append((r.adapter, r.verdict, first.code if first else "-", fix[:70]))
    lines = table(rows, out, good="serves")
    for r in reports:
        if r.findings:
            lines.append("")
            lines.append(str(r))
    served = sum(1 for r in reports if r.ok)
    engine = f"{reports[0].engine} {reports[0].version}" if reports else ""
    lines.append(f"\n{served} of {len(reports)} adapters served as peft runs them by {engine}.")
    return "\n".join(lines)


def run_fix_target(args: argparse.Namespace, out: _Output) -> int:
    from safe_peft._engines.fix import fix_for_target
    from safe_peft.errors import AdapterFormatError, AdapterLoadError

    try:
        report = fix_for_target(
            args.adapter,
            args.target,
            args.out,
            base=args.base,
            version=args.engine_version,
            pad_rank_to=args.pad_rank,
            force=args.force,
        )
    except AdapterFormatError:
        raise
    except AdapterLoadError as exc:
        for d in exc.report.causes:
            out.write(out.bad(f"[{d.code}] {d.message}"))
            if d.fix:
                out.write(f"  fix: {d.fix}")
        out.write(out.bad("Nothing was written: no exact conversion makes this adapter serve right."))
        return INCOMPATIBLE
    if not report.conversions:
        out.write(
            f"{args.adapter}: {report.before.engine} already serves it as peft does; wrote it with its scales "
            f"folded into lora_B ({len(report.factors)} modules), which gives the same outputs."
        )
    else:
        out.write(f"Wrote {args.out}: {', '.join(report.conversions)} ({len(report.factors)} modules).")
    out.write(
        out.good(f"Checked: {report.after.engine} {report.after.version} serves it ({' '.join(report.after.command)}).")
    )
    return OK
