"""Exceptions. Each carries the whole :class:`LoadReport`; ``str(err)`` is rendered from it."""

from __future__ import annotations

from typing import Any

from safe_peft.report import LoadReport

__all__ = ["AdapterFormatError", "AdapterLoadError"]


class AdapterLoadError(RuntimeError):
    """An adapter does not fit the model (or could not be loaded). ``.report`` says why.

    A ``RuntimeError`` subclass, so code that already catches torch's load errors keeps working.
    """

    def __init__(self, report: LoadReport) -> None:
        self.report = report
        super().__init__(str(report))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.report,))


class AdapterFormatError(AdapterLoadError):
    """An adapter file is unreadable, malformed or unsafe (refused pickle, bad header, bad config)."""

    @classmethod
    def of(
        cls,
        code: str,
        message: str,
        *,
        fix: str | None = None,
        adapter: str = "",
        details: dict[str, Any] | None = None,
        **fill: Any,
    ) -> AdapterFormatError:
        """The error for a single finding about a file: cause, fix and opt-in come from the catalog entry of
        ``code`` (``fix`` overrides; ``fill`` fills the entry's fix template)."""
        from safe_peft._catalog import finding

        diagnosis = finding(code, message, fix=fix, details=details, **fill)
        return cls(LoadReport(ok=False, causes=[diagnosis], adapter=adapter))

    @property
    def code(self) -> str:
        primary = self.report.primary
        return primary.code if primary is not None else ""
