"""The load plan, in stages: read the adapter -> view the model -> convert the layout as peft does -> choose
(opt-in) renames -> (opt-in) repairs -> the verdict.

Each stage returns a frozen value and reads only what the earlier ones returned. :func:`make_plan` runs them in
order; it is shared by :func:`diagnose` (which returns the report) and by the loader (which executes the plan),
so that the prediction and the load cannot drift apart. No stage modifies the model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from safe_peft._catalog import finding, order, without_spent_fix
from safe_peft._files.config_values import check_against_model
from safe_peft._files.locate import AdapterFiles, no_config_error
from safe_peft._files.source import AdapterSource, read_adapter
from safe_peft._keys import PEFT_PREFIX, Shape, strip_prefix
from safe_peft._model.view import ModelView, expected_keys
from safe_peft._plan.checks import (
    adapter_name_findings,
    base_config_findings,
    model_findings,
    replication_findings,
    token_index_findings,
    wrapper_findings,
    wrapper_needs,
)
from safe_peft._plan.classify import Evidence, classify
from safe_peft._plan.compare import compare_keys
from safe_peft._plan.options import LoadOptions
from safe_peft._plan.peft_conversions import (
    conversion_breaks_keys,
    named_keys_peft_accepts,
    other_adapters_copies,
    peft_conversions,
    sizes_peft_ignores,
)
from safe_peft._plan.remap import RemapPlan, plan_given, plan_remap, to_rules
from safe_peft._plan.repairs import changed_fields, rank_relaxed, repair_config, resized_view, vocab_rows, vocab_target
from safe_peft.report import Cause, Diagnosis, LoadReport
from safe_peft.rules import BUILTIN, model_rules

if TYPE_CHECKING:
    from torch import nn

__all__ = ["FIRST_ADAPTER", "Layout", "LoadPlan", "Route", "convert_layout", "make_plan", "plan_load"]


@dataclass(frozen=True)
class LoadPlan:
    """What the loader will do: which files, which config, which renames, and the verdict."""

    report: LoadReport
    files: AdapterFiles
    peft_config: Any
    checkpoint: dict[str, Shape]
    renames: dict[str, str] = field(default_factory=dict)
    dropped: tuple[str, ...] = ()
    vocab_size: int | None = None
    view: ModelView | None = None
    rules: tuple[str, ...] = ()  # names of the remap rules applied
    legacy: tuple[bool, ...] | None = None  # MergedLinear parts converted (repair="legacy")


class Route:
    """How one route plans, as small hooks of the one planning sequence (:func:`make_plan`).

    This base is the first adapter into a bare model (``PeftModel.from_pretrained``); the routes into a model that
    already carries adapters (:mod:`safe_peft._plan.routes`) override the hooks. No route has a sequence of its own, so
    a check added to the sequence holds on every route.
    """

    name = "from_pretrained"

    def planning_model(self, model: nn.Module) -> nn.Module:
        """The model the keys are planned against."""
        return model

    def refusals(self, model: nn.Module, source: AdapterSource, options: LoadOptions) -> list[Diagnosis]:
        """What the route itself refuses before any key is compared."""
        return []

    def convert(self, planning: nn.Module, source: AdapterSource, view: ModelView, options: LoadOptions) -> Layout:
        """The checkpoint's keys as the route's loader converts them."""
        key_mapping = options.peft_kwargs.get("key_mapping")
        return convert_layout(planning, source, view, options.adapter_name, key_mapping)

    def settle(self, model: nn.Module, plan: LoadPlan, source: AdapterSource | None, adapter_name: str) -> LoadPlan:
        """The plan as the route reports it (``source`` None: the plan stopped before comparing keys)."""
        return plan


FIRST_ADAPTER = Route()


def make_plan(
    model: nn.Module,
    model_id: str | os.PathLike[str],
    adapter_name: str = "default",
    *,
    remap: object = None,
    repair: tuple[str, ...] = (),
    allow_pickle: bool = False,
    peft_kwargs: Mapping[str, Any] | None = None,
    route: Route = FIRST_ADAPTER,
    verify_base: bool = True,
) -> LoadPlan:
    """Build the plan for loading ``model_id`` into ``model`` on ``route`` (raises AdapterFormatError for bad
    files): :func:`plan_load` with the options spelled as keywords."""
    options = LoadOptions(
        adapter_name, remap, repair, allow_pickle=allow_pickle, verify_base=verify_base, peft_kwargs=peft_kwargs or {}
    )
    return plan_load(model, model_id, options, route)


def plan_load(model: nn.Module, model_id: str | os.PathLike[str], options: LoadOptions, route: Route) -> LoadPlan:
    """The one planning sequence, for every route: ``options`` as the entry point took them, ``route``'s hooks."""
    from safe_peft._keys import gc_paused, memoised

    with memoised(), gc_paused():  # a plan builds only acyclic data: no collection pass over a header's keys
        return _make_plan(model, model_id, options, route)


def _make_plan(model: nn.Module, model_id: str | os.PathLike[str], options: LoadOptions, route: Route) -> LoadPlan:
    adapter_name, remap, repair = options.adapter_name, options.remap, options.repair
    kwargs = dict(options.peft_kwargs)
    planning = route.planning_model(model)
    refused = adapter_name_findings(adapter_name) + model_findings(planning)
    source = read_adapter(model_id, repair=repair, allow_pickle=options.allow_pickle, peft_kwargs=kwargs)
    if not refused:  # a file without a PEFT config (kohya) takes the same route, so the same refusals
        refused = route.refusals(model, source, options)
    if refused:
        return route.settle(model, _refusal(model, source, adapter_name, refused), None, adapter_name)
    if source.raw is None:
        return route.settle(model, _foreign_plan(planning, source, adapter_name, remap), None, adapter_name)
    if kwargs.get("config") is None:  # what peft would hang or fail on with this model
        check_against_model(planning, source.config_data, path=source.raw.path, adapter=source.location)
    saved = expected_keys(planning, source.peft_config, adapter_name)
    retarget = _targets_follow_keys(planning, source.peft_config, saved, adapter_name)
    # plan against the renamed targets; keep them only if the keys are renamed too
    view = saved if retarget is None else retarget.view
    layout = route.convert(planning, source, view, options)
    if kwargs.get("ignore_mismatched_sizes"):  # the caller asked peft to leave out what does not fit
        layout, view = sizes_ignored(layout, view)
    renaming = choose_renames(layout, view, remap, repair)
    if retarget is not None and not renaming.applied and compare_keys(renaming.checkpoint, view.expected).ok:
        view = saved  # the keys fit as they are, so nothing renames the saved targets: peft finds none of them
    if retarget is not None and renaming.applied:
        source = replace(source, peft_config=retarget.config, repairs=(*source.repairs, retarget.note))
    repaired = apply_repairs(planning, source, renaming, view, repair, adapter_name)
    plan = verdict(planning, source, layout, renaming, repaired, options)
    return route.settle(model, plan, source, adapter_name)


# -- stage: convert the layout as peft does ---------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """The checkpoint's keys after the conversions the installed peft itself applies on load."""

    checkpoint: dict[str, Shape]
    warnings: tuple[Diagnosis, ...] = ()
    causes: tuple[Diagnosis, ...] = ()  # peft's conversion itself breaks keys that fit
    dropped: tuple[str, ...] = ()  # keys left out of the file peft loads (other adapters' copies)


def convert_layout(
    model: nn.Module, source: AdapterSource, view: ModelView, adapter_name: str, key_mapping: Any
) -> Layout:
    checkpoint, converted = peft_conversions(model, source.peft_config, source.shapes, adapter_name, key_mapping)
    broken = conversion_breaks_keys(model, source.shapes, checkpoint, view.expected)
    checkpoint = named_keys_peft_accepts(checkpoint, view.expected, adapter_name)
    if broken is not None:
        return Layout(checkpoint, causes=(broken,))
    stray, loaded = other_adapters_copies(checkpoint, view.expected, adapter_name)
    if not stray:
        return Layout(checkpoint, tuple(converted))
    gone = set(stray)
    notes = list(converted)
    if loaded:  # plain peft would write them over the adapter's own tensors: say so
        notes.append(
            finding(
                "other_adapter_copies",
                f"the file holds {len(stray)} copies of another adapter's tensors beside this adapter's own (e.g. "
                f"{stray[0]!r}; peft 0.17 saves every adapter's lora_B bias into each file): they are left out, "
                "where plain peft would load them over this adapter's own",
                details={"keys": list(stray[:20])},
            )
        )
    return Layout({k: v for k, v in checkpoint.items() if k not in gone}, tuple(notes), dropped=stray)


def sizes_ignored(layout: Layout, view: ModelView) -> tuple[Layout, ModelView]:
    """``ignore_mismatched_sizes=True``: the tensors whose shape differs from the model's are out of the plan, as
    peft leaves them out of the load, and their adapter tensors keep their initial values (not missing: the caller
    asked); a warning names them."""
    skipped = sizes_peft_ignores(layout.checkpoint, view.expected)
    if not skipped:
        return layout, view
    gone = set(skipped)
    shapes = {k: f"checkpoint {list(layout.checkpoint[k])}, model {list(view.expected[k].shape)}" for k in skipped}
    note = finding(
        "mismatched_sizes_ignored",
        f"{len(skipped)} checkpoint tensor(s) whose shape differs from the model's were skipped, as "
        f"ignore_mismatched_sizes=True asks (e.g. {skipped[0]}: {shapes[skipped[0]]}); those adapter tensors keep "
        "their initial values",
        details={"keys": list(skipped[:20]), "shapes": [shapes[k] for k in skipped[:20]]},
    )
    checkpoint = {k: s for k, s in layout.checkpoint.items() if k not in gone}
    expected = {k: replace(e, required=False) if k in gone else e for k, e in view.expected.items()}
    # the file keeps them: peft, given the same argument, leaves them out itself and warns as it does plainly
    return replace(layout, checkpoint=checkpoint, warnings=(*layout.warnings, note)), replace(view, expected=expected)


# -- stage: choose renames (opt-in) ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Renaming:
    """The checkpoint after the renames the caller opted into, and the closest plan when none was exact."""

    checkpoint: dict[str, Shape]
    renames: dict[str, str] = field(default_factory=dict)
    dropped: tuple[str, ...] = ()
    applied: tuple[str, ...] = ()  # rule names
    closest: RemapPlan | None = None  # the best plan found, when the keys do not fit as they are
    findings: tuple[Diagnosis, ...] = ()
    auto: bool = False  # remap='auto' and the keys fit, as they are or renamed: its conversions apply


def choose_renames(layout: Layout, view: ModelView, remap: object, repair: tuple[str, ...]) -> Renaming:
    checkpoint = layout.checkpoint
    diff = compare_keys(checkpoint, view.expected)
    relaxed = rank_relaxed() if "rank" in repair else None
    plan: RemapPlan | None = None
    findings: list[Diagnosis] = []
    if remap is not None and remap != "auto":
        plan = plan_given(to_rules(remap), checkpoint, view.expected, relaxed)
        if not plan.exact:
            findings.append(_remap_refused(plan, "the given remap rules"))
    elif diff.missing or diff.unexpected:
        plan = plan_remap(checkpoint, view.expected, BUILTIN + model_rules(view.base_model_prefix), same_shape=relaxed)
        if remap == "auto" and not plan.exact:
            findings.append(_remap_refused(plan, "no combination of the built-in rules"))
    if remap is None or plan is None or not plan.exact:
        fits = remap == "auto" and plan is None
        return Renaming(checkpoint, closest=plan, findings=tuple(findings), auto=fits)
    gone = set(plan.dropped)
    moved = {plan.renames.get(k, k): s for k, s in checkpoint.items() if k not in gone}
    return Renaming(moved, dict(plan.renames), plan.dropped, tuple(r.name for r in plan.rules), auto=remap == "auto")


# -- stage: repairs (opt-in) -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Repaired:
    """The config and the model's view after the repairs the caller opted into."""

    peft_config: Any
    view: ModelView
    config_data: Mapping[str, Any]
    repairs: tuple[str, ...] = ()
    vocab_size: int | None = None


def apply_repairs(
    model: nn.Module,
    source: AdapterSource,
    renaming: Renaming,
    view: ModelView,
    repair: tuple[str, ...],
    adapter_name: str,
) -> Repaired:
    peft_config, config_data = source.peft_config, source.config_data
    repairs = list(source.repairs)
    checkpoint = renaming.checkpoint
    if (renaming.applied or renaming.auto) and wrapper_needs(model, getattr(peft_config, "task_type", None)):
        # remap='auto' loads a task model's adapter into the bare model: it is wrapped as a plain PeftModel
        task = str(peft_config.task_type).rsplit(".", 1)[-1]
        peft_config = replace_config(peft_config, task_type=None)
        repairs.append(f"task_type: {task} -> None (the bare {type(model).__name__} is wrapped as a plain PeftModel)")
        view = expected_keys(model, peft_config, adapter_name)
    vocab_size = None
    if repair:
        peft_config, repaired = repair_config(peft_config, repair, checkpoint, view.module_names)
        repairs += repaired
        if repaired or source.repairs:
            config_data = {**config_data, **changed_fields(peft_config)}
            view = expected_keys(model, peft_config, adapter_name)
        if "vocab" in repair:
            vocab_size = vocab_target(view, checkpoint)
            if vocab_size is not None:
                view = resized_view(view, checkpoint, vocab_size)
                current = vocab_rows(model)
                change = "grow" if current is None or vocab_size > current else "shrink"
                repairs.append(f"vocab: {change} the base model's token embeddings from {current} to {vocab_size} rows")
    return Repaired(peft_config, view, config_data, tuple(repairs), vocab_size)


@dataclass(frozen=True)
class _Retarget:
    config: Any
    view: ModelView
    note: str


def _targets_follow_keys(model: nn.Module, config: Any, view: ModelView, adapter_name: str) -> _Retarget | None:
    """``target_modules`` saved as full module paths (peft expands ``all-linear`` that way) name no module of a
    model whose layers sit under another prefix (a causal LM's adapter on the bare model). When a model-class
    rename makes them name modules of this model, the renamed targets give the view the keys can be planned
    against; the rename is kept only if the keys are renamed too (``remap="auto"``)."""
    if view.error is None or view.error.code != "target_modules_not_found":
        return None
    targets = getattr(config, "target_modules", None)
    if not isinstance(targets, (list, set, tuple)) or not any("." in str(t) for t in targets):
        return None
    for rule in (*model_rules(view.base_model_prefix), *BUILTIN):
        if rule.cause is not Cause.MODEL_CLASS_MISMATCH:
            continue
        renamed = sorted({strip_prefix(rule.apply(PEFT_PREFIX + str(t)) or str(t)) for t in targets})
        if set(renamed) == {str(t) for t in targets}:
            continue
        retargeted = replace_config(config, target_modules=set(renamed))
        new_view = expected_keys(model, retargeted, adapter_name)
        if new_view.error is None:
            example = f"{sorted(map(str, targets))[0]} -> {renamed[0]}"
            note = f"targets: target_modules renamed like the keys ({rule.name}), e.g. {example}"
            return _Retarget(retargeted, new_view, note)
    return None


def replace_config(config: Any, **changes: Any) -> Any:
    """A copy of a peft config with fields changed (the caller's object is never modified)."""
    import copy

    new = copy.deepcopy(config)
    for name, value in changes.items():
        setattr(new, name, value)
    return new


# -- stage: the verdict ----------------------------------------------------------------------------------------


def verdict(
    model: nn.Module,
    source: AdapterSource,
    layout: Layout,
    renaming: Renaming,
    repaired: Repaired,
    options: LoadOptions,
) -> LoadPlan:
    adapter_name, remap, repair = options.adapter_name, options.remap, options.repair
    checkpoint, view, plan = renaming.checkpoint, repaired.view, renaming.closest
    diff = compare_keys(checkpoint, view.expected)
    evidence = Evidence(diff, checkpoint, view, repaired.config_data, plan)
    if plan is not None and not plan.exact and _only_shapes_differ(plan, checkpoint, view):
        # the keys line up after the closest renames: the shapes are what is wrong, so classify those
        gone = set(plan.dropped)
        moved = {plan.renames.get(k, k): s for k, s in checkpoint.items() if k not in gone}
        evidence = Evidence(compare_keys(moved, view.expected), moved, view, repaired.config_data, None)
        causes = _with_layout(classify(evidence), plan, given=remap is not None and remap != "auto")
    else:
        causes = classify(evidence)  # the real cause first
    causes += renaming.findings
    if not any(d.cause is Cause.MODEL_CLASS_MISMATCH for d in causes):
        keys_fit = diff.ok and view.error is None  # only the task's wrapper is in the way: remap='auto' drops it
        causes += wrapper_findings(model, getattr(repaired.peft_config, "task_type", None), keys_fit)
    if not any(d.cause is Cause.VOCAB_SIZE_MISMATCH for d in causes):
        causes += token_index_findings(model, repaired.peft_config, repaired.vocab_size)
    causes += replication_findings(model, repaired.peft_config)
    causes = [*source.causes, *layout.causes, *causes]
    other_base = base_config_findings(model, repaired.peft_config)
    from safe_peft._model.sharding import sharding_findings  # hook: layouts a sharded model cannot take

    causes += sharding_findings(model, repaired.peft_config, view.expected, tuple(repair), checkpoint)
    from safe_peft._fingerprint.check import BaseCheck, base_check  # hook: a stamped adapter's base weights

    stamp = base_check(model, source.files, source.metadata) if options.verify_base else BaseCheck()
    causes += stamp.causes
    causes = [without_spent_fix(d, remap, tuple(repair)) for d in causes]
    ok = not causes and diff.ok
    if not ok:  # the config of the base it was trained on says why (before the keys' story it explains)
        causes = order([*other_base, *causes])
    report = LoadReport(
        ok=ok,
        missing=diff.missing,
        unexpected=diff.unexpected,
        size_mismatches=diff.size_mismatches,
        causes=causes,
        warnings=[*source.warnings, *layout.warnings, *(other_base if ok else []), *stamp.warnings],
        renames=dict(renaming.renames),
        repairs=list(repaired.repairs),
        adapter=source.location,
        model_class=view.model_class,
        adapter_name=adapter_name,
    )
    return LoadPlan(
        report,
        source.files,
        repaired.peft_config,
        checkpoint,
        dict(renaming.renames),
        (*layout.dropped, *renaming.dropped),
        repaired.vocab_size,
        view,
        renaming.applied,
        source.legacy,
    )


def _refusal(model: nn.Module, source: AdapterSource, adapter_name: str, causes: list[Diagnosis]) -> LoadPlan:
    """A plan that stops at the arguments or the model itself, before anything is compared."""
    report = LoadReport(
        ok=False,
        causes=[*causes, *source.causes],
        warnings=list(source.warnings),
        adapter=source.location,
        model_class=type(model).__name__,
        adapter_name=adapter_name if isinstance(adapter_name, str) else repr(adapter_name),
    )
    return LoadPlan(report, source.files, source.peft_config, dict(source.shapes))


def _foreign_plan(model: nn.Module, source: AdapterSource, adapter_name: str, remap: object) -> LoadPlan:
    """A weights file without a PEFT config: convert a kohya LoRA (with remap='auto'), refuse anything else."""
    from safe_peft._files.safetensors_header import read_scalar
    from safe_peft._plan.kohya import convert_kohya, is_kohya

    files, shapes, header = source.files, source.shapes, source.header
    assert header is not None
    if not is_kohya(shapes):
        raise no_config_error(files)
    conversion = convert_kohya(shapes, (n for n, _ in model.named_modules()), lambda k: read_scalar(header, k))
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    configs: dict[Any, Any] = dict(PEFT_TYPE_TO_CONFIG_MAPPING)
    peft_config = configs["LORA"](**conversion.config)
    gone = set(conversion.dropped)
    moved = {conversion.renames.get(k, k): s for k, s in shapes.items() if k not in gone}
    view = expected_keys(model, peft_config, adapter_name)
    diff = compare_keys(moved, view.expected)
    exact = not conversion.unresolved and diff.ok and view.error is None
    kohya = finding(
        "kohya",
        f"{files.weights_path}: a kohya-ss LoRA ({len(conversion.renames) // 2} modules, no adapter_config.json), "
        + (
            "whose modules all map onto this model"
            if exact
            else f"which does not map onto {type(model).__name__} ({len(conversion.unresolved)} names unresolved)"
        ),
        remap="auto" if exact else None,
        details={"format": "kohya", "unresolved": conversion.unresolved[:20], "config": conversion.config},
        advice="pass remap='auto' to convert it (lora_down -> lora_A, lora_up -> lora_B, alpha -> alpha_pattern)"
        if exact
        else "load it with the tool that wrote it (diffusers' load_lora_weights for image models).",
    )
    converted = remap == "auto" and exact
    report = LoadReport(
        ok=converted,
        causes=[] if converted else [kohya],
        warnings=list(source.warnings),
        renames=dict(conversion.renames) if converted else {},
        repairs=[f"config: synthesized from the kohya file: {conversion.config}"] if converted else [],
        adapter=source.location,
        model_class=view.model_class,
        adapter_name=adapter_name,
    )
    if not converted:
        return LoadPlan(report, files, peft_config, shapes, view=view)
    return LoadPlan(
        report, files, peft_config, moved, dict(conversion.renames), conversion.dropped, None, view, ("kohya",)
    )


def _remap_refused(plan: RemapPlan, what: str) -> Diagnosis:
    closest = ", ".join(r.name for r in plan.rules) or "none"
    return finding(
        "remap_not_exact",
        f"{what} makes every key match exactly, so nothing was renamed; closest: {closest}, "
        f"{plan.remaining} problems left (e.g. {plan.problems[0] if plan.problems else '-'})",
        details={"closest_rules": [r.name for r in plan.rules], "problems": list(plan.problems)},
    )


def _with_layout(causes: list[Diagnosis], plan: RemapPlan, given: bool) -> list[Diagnosis]:
    """The shape findings of renamed keys, plus the renames they need: one fix naming both opt-ins. The
    renames are the caller's own rules (``given``) or built-in ones (then ``remap='auto'`` applies them)."""
    names = ", ".join(r.name for r in plan.rules)
    how = "the same remap= rules" if given else f"remap='auto' (applies {names})"
    layout = finding(
        "user_remap" if given else plan.rules[0].name,
        f"the keys are also laid out differently: {'; '.join(r.description for r in plan.rules)}",
        fix=f"pass {how} together with the fix above.",
        remap=None if given else "auto",
        details={"rules": [r.name for r in plan.rules], "renamed": len(plan.renames)},
    )
    if causes and causes[0].repair:
        first = causes[0]
        combined = replace(first, remap=layout.remap, fix=f"{first.fix} The keys also need {how}.")
        return [combined, *causes[1:], layout]
    return [*causes, layout]


def _only_shapes_differ(plan: RemapPlan, checkpoint: Mapping[str, Shape], view: ModelView) -> bool:
    gone = set(plan.dropped)
    landed = {plan.renames.get(k, k) for k in checkpoint if k not in gone}
    required = {k for k, e in view.expected.items() if e.required}
    return bool(plan.renames) and landed <= view.expected.keys() and required <= landed
