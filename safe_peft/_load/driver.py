"""The one route driver: plan -> refuse -> protect -> load -> verify -> settle, undone on any failure.

A route (:class:`LoadRoute`) says how it plans, what it records before the load, how it loads and, where it
differs, how it verifies; :func:`drive` owns the order, the refusal, the undo (any exception, ``BaseException``
included, restores the snapshot) and the report. The routes are in :mod:`safe_peft._routes`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from safe_peft._load.atomic import atomically, is_fatal, settled
from safe_peft._load.verification import verify
from safe_peft.errors import AdapterLoadError

if TYPE_CHECKING:
    import os

    from safe_peft._load.snapshot import ModuleSnapshot, ValueSnapshot
    from safe_peft._plan.options import LoadOptions
    from safe_peft._plan.plan import LoadPlan
    from safe_peft.report import LoadReport

__all__ = ["LoadRoute", "Loaded", "Outcome", "Protected", "drive", "drive_planned"]


@dataclass(frozen=True)
class Protected:
    """What a route recorded before loading: the snapshot the undo restores, and what it found on the way and
    loads with (``held``: the adapter's tensors a reload writes into, the layers a hot-swap writes, ...)."""

    snapshot: ModuleSnapshot | ValueSnapshot
    held: Any = None


@dataclass(frozen=True)
class Loaded:
    """What a route's load did: the model, the adapter's tensors under their checkpoint keys (None: verification
    finds them), the way it took (the report's ``route``), the plain function's return value, and anything the
    route's own verification needs (``held``)."""

    model: Any
    state: dict[str, Any] | None = None
    route: str = ""
    result: Any = None
    held: Any = None


@dataclass(frozen=True)
class Outcome:
    """A committed load: the model, its report and the plain function's return value."""

    model: Any
    report: LoadReport
    result: Any = None


class LoadRoute(ABC):
    """One route of a load into one model, for one call (``options`` as the public entry point took them)."""

    def __init__(self, model: Any, model_id: str | os.PathLike[str], options: LoadOptions) -> None:
        self.model, self.model_id, self.options = model, model_id, options

    @abstractmethod
    def plan(self) -> LoadPlan:
        """The plan, through :func:`safe_peft._plan.plan.plan_load` with the route's hooks; nothing changes."""

    @abstractmethod
    def protect(self, plan: LoadPlan) -> Protected:
        """Record what the load may change (before it changes anything)."""

    @abstractmethod
    def load(self, plan: LoadPlan, protected: Protected, temporary: list[str | None]) -> Loaded:
        """Do the load (``temporary``: directories to remove on every exit)."""

    def verify(self, plan: LoadPlan, loaded: Loaded) -> LoadReport:
        """Every expected adapter tensor came from the checkpoint and holds finite values."""
        report = verify(loaded.model, plan, self.options.adapter_name, state=loaded.state)
        return replace(report, route=loaded.route) if loaded.route else report

    def commit(self, loaded: Loaded) -> None:
        """After the load committed (outside the undo): what only a successful load may change."""
        return None


def drive(route: LoadRoute) -> Outcome:
    """Plan ``route``, refuse what the plan refuses (before anything changed), then :func:`drive_planned`."""
    plan = route.plan()
    if not plan.report.ok and (route.options.strict or is_fatal(plan.report)):
        raise AdapterLoadError(plan.report)
    return drive_planned(route, plan)


def drive_planned(route: LoadRoute, plan: LoadPlan, *, commit: bool = True) -> Outcome:
    """protect -> load -> verify -> settle -> commit; on any failure the snapshot is restored and the error goes on
    (an unexpected one as an :class:`AdapterLoadError` with the planned report). ``commit=False``: the caller
    commits once it knows the load stays (the sharded route, after the ranks agreed)."""
    protected = route.protect(plan)
    with atomically(protected.snapshot, plan.report) as temporary:
        loaded = route.load(plan, protected, temporary)
        report = settled(plan, route.verify(plan, loaded), route.options.strict)
        if commit:  # inside the undo: a commit that fails leaves the model as it was
            route.commit(loaded)
    return Outcome(loaded.model, report, loaded.result)
