"""Loading into a sharded model (FSDP2, tensor parallel): one verdict for all ranks, atomic on every rank.

The flow on every rank, with two agreements (see :mod:`safe_peft._distributed.collective`):

1. plan (header and module tree only, as for one process; sharded layouts safe_peft cannot place are
   refused here) -> **agree "plan"**: every rank posts its verdict and a fingerprint of what it would
   load; if any rank refuses, fails, reads a different adapter or stays silent past the timeout, every
   rank raises before anything changed.
2. load with peft, verify, and put the adapter weights under the model's sharding; all of it local, no
   collective, so a rank that fails here still reaches the next agreement -> **agree "load"** (with a
   digest of the replicated adapter tensors): if any rank failed, every rank restores its base model
   and raises.

Every rank's error names the failing rank(s) and their cause (that rank's own diagnosis, tagged with
its rank). A rank that never answers is named after ``collective_timeout`` seconds: nobody hangs.

This route does not go through :func:`safe_peft._load.driver.drive` as a whole: between the plan and the load, and
after the load, the ranks must agree, and a rank's failure must reach the agreement instead of raising. It shares
the first adapter's route (:class:`safe_peft._routes.first_adapter.FirstAdapter`): its plan, and its protect ->
load -> verify -> settle (:func:`~safe_peft._load.driver.drive_planned`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from safe_peft._catalog import finding
from safe_peft._distributed.collective import Collective, Outcome, Vote
from safe_peft._distributed.place import finish, place, prepare
from safe_peft._load.snapshot import ModuleSnapshot
from safe_peft._model.sharding import content_digest, is_sharded, survey
from safe_peft.errors import AdapterFormatError, AdapterLoadError
from safe_peft.report import Diagnosis, LoadReport

if TYPE_CHECKING:
    from torch import nn

    from safe_peft._load.driver import LoadRoute
    from safe_peft._plan.plan import LoadPlan

__all__ = ["is_sharded", "load_sharded"]

_FINDINGS_PER_RANK = 3
_MESSAGE_LIMIT = 600


def load_sharded(route: LoadRoute) -> Any:
    """``safe_load_adapter`` for a model with DTensor parameters (``route``: the first adapter's, whose plan and
    load every rank runs); every rank of the job must call it."""
    from safe_peft._load.adapter_tensors import adapter_tensors, overwritten_base_tensors
    from safe_peft._load.atomic import is_fatal
    from safe_peft._load.driver import Loaded, drive_planned

    base_model: nn.Module = route.model
    options, adapter_name = route.options, route.options.adapter_name
    collective = Collective.for_job(options.collective_timeout)
    where = _Where(collective, os.fspath(route.model_id), type(base_model).__name__, adapter_name)
    plan: LoadPlan | None = None
    refusal: LoadReport | None = None
    error: BaseException | None = None
    try:
        plan = route.plan()
        if not plan.report.ok and (options.strict or is_fatal(plan.report)):
            refusal = plan.report
    except AdapterLoadError as exc:
        refusal, error = exc.report, exc
    except Exception as exc:  # noqa: BLE001 - any failure must still reach the agreement, or the others wait
        refusal, error = where.crashed(exc, "planning"), exc
    where.settle("plan", refusal, _plan_fingerprint(plan, adapter_name), error)
    assert plan is not None  # settle raised otherwise

    snapshot: ModuleSnapshot | None = None
    failure: LoadReport | None = None
    digest = ""
    model: Any = None
    report: LoadReport | None = None
    try:  # nothing in here is a collective: a rank that fails still reaches the agreement below
        sharding = survey(base_model)
        prepare(base_model)
        snapshot = ModuleSnapshot(base_model)
        snapshot.protect(overwritten_base_tensors(base_model, plan))
        outcome = drive_planned(route, plan, commit=False)  # committed once every rank loaded
        model, report = outcome.model, outcome.report
        analytic = plan.view is not None and plan.view.method == "analytic"
        digest = content_digest(adapter_tensors(model, adapter_name, analytic))
        unplaced = place(model, sharding, adapter_name)
        if unplaced:
            snapshot.restore()
            failure = where.unplaced(plan.report, unplaced)
    except AdapterLoadError as exc:  # execute restored the model already
        _restore(snapshot)
        failure, error = exc.report, exc
    except Exception as exc:  # noqa: BLE001 - restore, then tell the other ranks
        _restore(snapshot)
        failure, error = where.crashed(exc, "loading", plan.report), exc
    except BaseException:
        _restore(snapshot)  # interrupted: the other ranks will name this one as silent
        raise
    try:
        where.settle("load", failure, digest, error)
    except AdapterLoadError:
        if failure is None:
            _restore(snapshot)  # this rank loaded, another did not: undo here too
        raise
    assert report is not None
    finish(model)
    route.commit(Loaded(model))
    return options.returned(model, report)


def _restore(snapshot: ModuleSnapshot | None) -> None:
    if snapshot is not None:
        snapshot.restore()


def _plan_fingerprint(plan: LoadPlan | None, adapter_name: str) -> str:
    """What the rank will load: adapter name, checkpoint keys and shapes, renames, the effective config."""
    if plan is None:
        return ""
    config = getattr(plan.peft_config, "to_dict", None)
    data = {
        "adapter_name": adapter_name,
        "checkpoint": sorted((k, list(s)) for k, s in plan.checkpoint.items()),
        "renames": sorted(plan.renames.items()),
        "config": _canonical(config()) if callable(config) else None,
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _canonical(value: Any) -> Any:
    """Sets as sorted lists (their order differs between processes), recursively."""
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted(str(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


class _Where:
    """This rank's place in the job, and the reports it raises."""

    def __init__(self, collective: Collective | None, adapter: str, model_class: str, adapter_name: str) -> None:
        self.collective = collective
        self.rank = collective.rank if collective is not None else 0
        self.world_size = collective.world_size if collective is not None else 1
        self.adapter, self.model_class, self.adapter_name = adapter, model_class, adapter_name

    def settle(self, stage: str, failure: LoadReport | None, fingerprint: str, error: BaseException | None) -> None:
        """Agree with the other ranks; raise on every rank unless all of them are fine."""
        if self.collective is None:
            if failure is not None:
                raise _error_type(error)(failure) from error
            return
        findings = tuple(_finding(d) for d in (failure.causes if failure is not None else [])[:_FINDINGS_PER_RANK])
        outcome = self.collective.agree(stage, Vote(self.rank, failure is None, fingerprint, findings))
        if not outcome.ok:
            raise _error_type(error)(self.joint(outcome, failure)) from error

    def joint(self, outcome: Outcome, own: LoadReport | None) -> LoadReport:
        """The report every rank raises: the failing ranks' causes, tagged with their rank, first."""
        causes: list[Diagnosis] = []
        groups: dict[tuple[str, str], list[tuple[int, dict[str, Any]]]] = {}
        for vote in outcome.failed:
            if vote.findings:
                first = vote.findings[0]
                groups.setdefault((first["cause"], first["code"]), []).append((vote.rank, first))
        for members in groups.values():
            ranks = [rank for rank, _ in members]
            first = members[0][1]
            causes.append(self._tagged(first, ranks, outcome.failed_count))
        if own is not None:  # this rank's further findings, after the shared ones
            seen = {(d.cause.value, d.code) for d in causes}
            rest = [d for d in own.causes[1:] if (d.cause.value, d.code) not in seen]
            causes += [self._tagged(d.to_dict(), [self.rank], 1) for d in rest]
        if outcome.silent:
            causes.append(
                finding(
                    "rank_timeout",
                    f"{_ranks(outcome.silent, self.world_size)} did not reach the {outcome.stage!r} verdict of "
                    f"safe_load_adapter within {outcome.timeout:g} s",
                    fix="every rank must call safe_load_adapter with the same adapter at the same point of the "
                    "program; if a rank is only slow (still reading its part of the base model), pass a larger "
                    "collective_timeout=.",
                    details={"ranks": list(outcome.silent), "stage": outcome.stage, "timeout": outcome.timeout},
                )
            )
        if outcome.disagreeing:
            what = "keys, shapes or config" if outcome.stage == "plan" else "tensor values"
            causes.append(
                finding(
                    "ranks_disagree",
                    f"{_ranks(outcome.disagreeing, self.world_size)} read an adapter with other {what} than rank 0",
                    fix="give every rank the same adapter (one shared directory, or identical copies).",
                    details={"ranks": list(outcome.disagreeing), "stage": outcome.stage},
                )
            )
        base = own if own is not None else LoadReport(ok=False)
        return replace(
            base,
            ok=False,
            causes=causes or [self._unexplained(outcome)],
            adapter=base.adapter or self.adapter,
            model_class=base.model_class or self.model_class,
            adapter_name=self.adapter_name,
            base_model_unchanged=True,
        )

    def _tagged(self, seen: dict[str, Any], ranks: list[int], failed_count: int) -> Diagnosis:
        more = failed_count - len(ranks) if len(ranks) > 1 and failed_count > len(ranks) else 0
        who = _ranks(ranks, self.world_size) + (f" (and {more} more)" if more else "")
        return finding(
            seen["code"],
            f"{who}: {seen['message']}",
            fix=seen.get("fix", ""),
            remap=seen.get("remap"),
            repair=tuple(seen.get("repair") or ()),
            details={**(seen.get("details") or {}), "ranks": ranks},
        )

    def _unexplained(self, outcome: Outcome) -> Diagnosis:
        return finding(
            "rank_failed",
            f"{_ranks([v.rank for v in outcome.failed], self.world_size)} could not load the adapter",
            fix="see the error raised on that rank.",
        )

    def crashed(self, exc: Exception, during: str, report: LoadReport | None = None) -> LoadReport:
        base = report or LoadReport(ok=False, adapter=self.adapter, model_class=self.model_class)
        text = str(exc).splitlines()[0][:300] if str(exc) else ""
        diagnosis = finding(
            "load_failed",
            f"{during} failed with {type(exc).__name__}: {text}",
            fix="see the traceback on the failing rank; the base model was restored on every rank.",
        )
        return replace(base, ok=False, causes=[diagnosis])

    def unplaced(self, report: LoadReport, modules: list[str]) -> LoadReport:
        diagnosis = finding(
            "adapter_not_placed",
            f"{len(modules)} adapter layers could not be put under the model's sharding (e.g. {modules[0]!r}); "
            "left as plain tensors they would train apart on every rank",
            fix="load the adapter into the model before sharding it, then shard the PeftModel.",
            details={"modules": modules[:20]},
        )
        return replace(report, ok=False, causes=[diagnosis])


def _finding(diagnosis: Diagnosis) -> dict[str, Any]:
    data = diagnosis.to_dict()
    data["message"] = data["message"][:_MESSAGE_LIMIT]
    return data


def _ranks(ranks: Any, world_size: int) -> str:
    listed = sorted(ranks)
    names = ", ".join(str(r) for r in listed[:8]) + (", ..." if len(listed) > 8 else "")
    return f"{'rank' if len(listed) == 1 else 'ranks'} {names} of {world_size}"


def _error_type(error: BaseException | None) -> type[AdapterLoadError]:
    return AdapterFormatError if isinstance(error, AdapterFormatError) else AdapterLoadError
