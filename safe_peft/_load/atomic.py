"""The one undo of every route: a snapshot restored on any failure, and the report a failure or a lenient load
settles on."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from typing import TYPE_CHECKING

from safe_peft._catalog import fatal, finding
from safe_peft.errors import AdapterLoadError, raised_by
from safe_peft.report import LoadReport

if TYPE_CHECKING:
    from safe_peft._load.snapshot import ModuleSnapshot, ValueSnapshot
    from safe_peft._plan.plan import LoadPlan

__all__ = [
    "atomically",
    "is_fatal",
    "late_failure",
    "merge_reports",
    "settled",
]


@contextlib.contextmanager
def atomically(snapshot: ModuleSnapshot | ValueSnapshot, planned: LoadReport) -> Iterator[list[str | None]]:
    """The one undo of every route: on any exit by an exception the snapshot is restored; an ``AdapterLoadError``
    and a ``BaseException`` that is not an ``Exception`` (KeyboardInterrupt, SystemExit) go through unchanged, any
    other error becomes an ``AdapterLoadError`` with the planned report and peft's message. Yields a list for the
    temporary directories the load writes; they are removed on every exit."""
    temporary: list[str | None] = []
    try:
        yield temporary
        _remove(temporary)  # still inside the undo: a Ctrl-C while removing them undoes the load, never half-commits
    except AdapterLoadError:
        snapshot.restore()
        raise
    except Exception as exc:
        snapshot.restore()
        raise AdapterLoadError(late_failure(planned, exc)) from exc
    except BaseException:  # KeyboardInterrupt, SystemExit, GeneratorExit: undo, then let it through unchanged
        snapshot.restore()
        raise
    finally:
        _remove(temporary)


def _remove(temporary: list[str | None]) -> None:
    while temporary:
        directory = temporary.pop()
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)


def is_fatal(report: LoadReport) -> bool:
    """Failures even lenient loading cannot get past (the catalog says which), and shape mismatches."""
    return bool(report.size_mismatches) or any(fatal(d) for d in report.causes)


def settled(plan: LoadPlan, report: LoadReport, strict: bool) -> LoadReport:
    """The end of every route: raise when the verification failed and the load is strict (the caller's
    :func:`atomically` then undoes it), else the report to return, the plan's findings merged in when either one
    found something."""
    if not report.ok and strict:
        raise AdapterLoadError(report)
    return report if report.ok and plan.report.ok else merge_reports(plan.report, report)


def merge_reports(before: LoadReport, after: LoadReport) -> LoadReport:
    from dataclasses import replace

    return replace(before, causes=before.causes + after.causes, warnings=after.warnings, ok=False)


def late_failure(report: LoadReport, exc: Exception) -> LoadReport:
    from dataclasses import replace

    from safe_peft._plan.parse_error import parse_load_error

    parsed = parse_load_error(exc)
    late = finding(
        "load_failed",
        f"peft failed while loading: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}",
        details=raised_by(exc),
    )
    return replace(
        report,
        ok=False,
        missing=report.missing or parsed.missing,
        unexpected=report.unexpected or parsed.unexpected,
        size_mismatches=report.size_mismatches or parsed.size_mismatches,
        causes=[*report.causes, late],
    )
