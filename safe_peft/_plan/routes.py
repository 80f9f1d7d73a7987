"""The routes an adapter takes into a model, planned with the stages of :mod:`safe_peft._plan.plan`.

* ``add``: a further adapter into a PeftModel (plain: ``peft_model.load_adapter(path, "b")`` with a new name). The
  plan sees the PeftModel's base through its adapters, and runs peft's own refusals of the combination first.
* ``replace``: an adapter replaced by another, config and weights (peft has no atomic counterpart); as ``add``, with
  the old adapter's name free.
* ``reload``: a checkpoint's weights written into an adapter that is there (plain: ``load_adapter`` with an existing
  name, what the Trainer's resume does); as ``add``, and the checkpoint must fit the adapter as it is loaded.
* ``inplace``: into a transformers model itself, no PeftModel (plain: transformers' ``model.load_adapter(path)``),
  with transformers' key handling: ``base_model.model.`` optional, and in transformers 5 one ``base_model_prefix``
  level added or stripped per key.
* ``hotswap``: as ``add``; :mod:`safe_peft._routes.hotswap` then compares the result with the loaded adapter.

A model that already carries adapters is planned on :func:`see_through`: a shallow copy of its module tree with every
tuner layer replaced by its base layer (leaves shared, nothing copied or changed), so that the expected keys of the
new adapter come from the same analytic or injection paths as for a bare model. A test holds them equal to what
peft's own ``add_adapter`` creates on the real model.
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from safe_peft._catalog import finding
from safe_peft._files.source import AdapterSource
from safe_peft._keys import PEFT_PREFIX
from safe_peft._model.view import ModelView
from safe_peft._plan.options import LoadOptions
from safe_peft._plan.plan import FIRST_ADAPTER, Layout, LoadPlan, Route, convert_layout, plan_load
from safe_peft.errors import RAISED
from safe_peft.report import Diagnosis, LoadReport

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "ROUTES",
    "CarryingRoute",
    "inplace_conversion",
    "is_peft_model",
    "plan_for",
    "resolve_route",
    "route_hooks",
    "see_through",
]

ROUTES = ("from_pretrained", "add", "replace", "reload", "inplace", "hotswap")
_NO_MAPPING = {r"(?!)": ""}  # a key_mapping that matches nothing: the model's own mapping is not peft's to apply here
# Codes that do not apply on a route that wraps nothing: the PeftModel class is already chosen (or none is used)
_NOT_ON_ROUTE = frozenset({"task_type_mismatch"})
# Config fields a reload may differ in: metadata, initialisation and training-only settings, and fields whose effect
# shows in the keys and shapes (compared on their own). Any other difference changes what the adapter computes.
RELOAD_IGNORED = frozenset(
    {
        "inference_mode",
        "base_model_name_or_path",
        "revision",
        "peft_version",
        "auto_mapping",
        "task_type",
        "lora_dropout",
        "init_lora_weights",
        "loftq_config",
        "eva_config",
        "corda_config",
        "runtime_config",
        "target_modules",
        "exclude_modules",
        "modules_to_save",
        "layers_to_transform",
        "layers_pattern",
        "megatron_config",
        "megatron_core",
    }
)


def is_peft_model(model: object) -> bool:
    """Whether ``model`` is a :class:`peft.PeftModel` (without importing peft when nothing could be one)."""
    if "peft" not in sys.modules:
        return False
    from peft import PeftModel

    return isinstance(model, PeftModel)


def adapter_names(model: object) -> tuple[str, ...]:
    """The adapters a model carries: a PeftModel's, or those transformers loaded into it in place."""
    if is_peft_model(model):
        return tuple(model.peft_config)  # type: ignore[attr-defined]
    if getattr(model, "_hf_peft_config_loaded", False):
        return tuple(getattr(model, "peft_config", {}) or {})
    return ()


def resolve_route(model: object, adapter_name: object, replace: object, inplace: bool) -> str:
    """The route a call takes: its arguments and whether the name is already taken decide."""
    if inplace:
        return "inplace"
    if not is_peft_model(model):
        return "from_pretrained"
    if not isinstance(adapter_name, str) or adapter_name not in adapter_names(model):
        return "add"
    if replace == "weights":
        return "reload"
    return "replace" if replace else "add"


def plan_for(model: nn.Module, model_id: str | os.PathLike[str], options: LoadOptions, *, inplace: bool) -> LoadPlan:
    """The plan of whichever route the options name (``diagnose`` uses this)."""
    route = resolve_route(model, options.adapter_name, options.replace, inplace)
    return plan_load(model, model_id, options, route_hooks(route))


def route_hooks(route: str) -> Route:
    """The hooks of ``route`` (one of :data:`ROUTES`) in the one planning sequence
    (:func:`~safe_peft._plan.plan.plan_load`): :class:`CarryingRoute` for every route but the first adapter's."""
    return FIRST_ADAPTER if route == "from_pretrained" else CarryingRoute(route)


class CarryingRoute(Route):
    """The hooks of a route into a model that may already carry adapters (``add``, ``replace``, ``reload``,
    ``inplace``, ``hotswap``): planned on the model seen through its adapters, with the route's own refusals,
    transformers' key handling on the in-place route, and the reload's fit to the loaded adapter."""

    def __init__(self, name: str) -> None:
        self.name = name

    def planning_model(self, model: nn.Module) -> nn.Module:
        inner = model.get_base_model() if is_peft_model(model) else model  # type: ignore[operator]
        return see_through(inner)

    def refusals(self, model: nn.Module, source: AdapterSource, options: LoadOptions) -> list[Diagnosis]:
        trainable = bool(options.peft_kwargs.get("is_trainable", False))
        name, repair = options.adapter_name, options.repair
        return route_findings(model, source, name, self.name, repair, is_trainable=trainable)

    def convert(self, planning: nn.Module, source: AdapterSource, view: ModelView, options: LoadOptions) -> Layout:
        if self.name != "inplace":
            return super().convert(planning, source, view, options)
        # transformers' keys, not peft's
        layout = convert_layout(planning, source, view, options.adapter_name, _NO_MAPPING)
        return _inplace_layout(planning, layout, view, options.peft_kwargs)

    def settle(self, model: nn.Module, plan: LoadPlan, source: AdapterSource | None, adapter_name: str) -> LoadPlan:
        if source is not None:
            plan = _without(plan, _NOT_ON_ROUTE)
            if self.name == "reload" and plan.report.ok:
                plan = _reload_findings(model, plan, adapter_name, source)
        return _named(plan, model)


# -- the model seen through its adapters -----------------------------------------------------------------------


def see_through(model: nn.Module) -> nn.Module:
    """``model`` as its base: a shallow copy of the module tree with every tuner layer replaced by its base layer and
    every ``modules_to_save`` / trainable-token wrapper by its original module.

    Leaf modules (and so every parameter) are shared with ``model``; only container modules are copied, with new
    child dicts, so nothing of ``model`` changes. A model without adapters is returned as it is.
    """
    if "peft" not in sys.modules:
        return model
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    if not any(isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper)) for m in model.modules()):
        return model
    memo: dict[int, nn.Module] = {}

    def resolve(module: nn.Module) -> nn.Module:
        while True:
            if isinstance(module, BaseTunerLayer):
                module = module.get_base_layer()
            elif isinstance(module, AuxiliaryTrainingWrapper) and module.original_module is not None:
                module = module.original_module
            else:
                break
        done = memo.get(id(module))
        if done is not None:
            return done
        if not module._modules:
            memo[id(module)] = module
            return module
        new = copy.copy(module)
        memo[id(module)] = new
        new.__dict__["_modules"] = {k: (None if c is None else resolve(c)) for k, c in module._modules.items()}
        return new

    return resolve(model)


# -- what each route refuses before comparing keys --------------------------------------------------------------


def route_findings(
    model: nn.Module,
    source: AdapterSource,
    adapter_name: str,
    route: str,
    repair: tuple[str, ...] = (),
    *,
    is_trainable: bool = False,
) -> list[Diagnosis]:
    """Refusals of the route itself: the name is taken, peft cannot combine the adapters (asked as peft asks it,
    with the config's ``inference_mode`` set from ``is_trainable``), the route cannot carry this kind of adapter."""
    config = source.peft_config
    names = adapter_names(model)
    found: list[Diagnosis] = []
    if route in ("add", "inplace") and adapter_name in names:
        found.append(_name_taken(model, adapter_name, names, route))
    if "vocab" in repair and route != "from_pretrained":
        found.append(
            finding(
                "repair_not_on_route",
                "repair=('vocab',) resizes the base model's embeddings, which the adapters already in the model share",
                details={"repair": "vocab"},
            )
        )
    if config is None:  # a file without a PEFT config (kohya): converted to plain LoRA, nothing more to ask
        return found
    if route == "inplace":
        if getattr(config, "is_prompt_learning", False) or getattr(config, "is_adaption_prompt", False):
            found.append(
                finding(
                    "not_injectable",
                    f"a {_type_name(config)} adapter (prompt learning) needs peft's PeftModel wrapper: transformers' "
                    "in-place loading injects layers only",
                )
            )
        return found
    if not is_peft_model(model) or found or route == "hotswap":  # a hot-swap's own checks: safe_peft._routes.hotswap
        return found
    ours = _type_name(config)
    theirs = _type_name(model)
    if ours != theirs:
        found.append(
            finding(
                "adapter_type_mismatch",
                f"the PeftModel holds {theirs} adapters ({', '.join(names)}); peft cannot add a {ours} adapter to it",
                details={"model_peft_type": theirs, "adapter_peft_type": ours},
            )
        )
        return found
    refusal = _combination_refusal(model, config, adapter_name, route, is_trainable)
    if refusal is not None:
        found.append(
            finding(
                "adapter_combination_refused",
                f"peft refuses to combine this adapter with {', '.join(n for n in names if n != adapter_name)}: "
                f"{refusal}",
                details={"peft_error": refusal, RAISED: "ValueError"},  # what peft's check raises
                advice="load it into a separate model, or change the configs as peft's message says.",
            )
        )
    return found


def _name_taken(model: nn.Module, adapter_name: str, names: tuple[str, ...], route: str) -> Diagnosis:
    free = next(f"{adapter_name}_{i}" for i in range(2, 10_000) if f"{adapter_name}_{i}" not in names)
    how = (
        "pass replace=True to replace it (done only if the new adapter loads), replace='weights' to write these "
        "weights into it (its config must match), or another adapter_name"
        if route != "inplace"
        else "pass another adapter_name, or delete the adapter first (model.delete_adapter(name))"
    )
    return finding(
        "adapter_name_taken",
        f"{type(model).__name__} already has an adapter named {adapter_name!r} (it has {', '.join(names)}); plain "
        "peft would write the new weights into it under the old config",
        details={"adapter_name": adapter_name, "adapters": list(names)},
        fix=f"{how} (e.g. adapter_name={free!r}).",
    )


def _combination_refusal(
    model: nn.Module, config: Any, adapter_name: str, route: str, is_trainable: bool
) -> str | None:
    """peft's own check of a new adapter against the ones already there, run on a shallow copy of the tuner, with
    the config as ``load_adapter`` hands it on (``inference_mode = not is_trainable``)."""
    tuner = getattr(model, "base_model", None)
    check = getattr(type(tuner), "_check_new_adapter_config", None)
    if tuner is None or check is None or not isinstance(getattr(tuner, "peft_config", None), dict):
        return None
    others = {k: v for k, v in tuner.peft_config.items() if not (route == "replace" and k == adapter_name)}
    if not others:
        return None
    probe = copy.copy(tuner)
    new = copy.deepcopy(config)
    new.inference_mode = not is_trainable
    probe.__dict__["peft_config"] = {**others, adapter_name: new}
    try:
        check(probe, new)
    except ValueError as exc:
        return str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
    return None


def _type_name(obj: Any) -> str:
    return str(getattr(obj, "peft_type", "") or "").rsplit(".", 1)[-1]


# -- a reload: the checkpoint written into an adapter that is already there ------------------------------------


def _reload_findings(model: nn.Module, plan: LoadPlan, adapter_name: str, source: AdapterSource) -> LoadPlan:
    """A reload writes the checkpoint into the existing adapter and keeps its config: the checkpoint must have the
    adapter's keys and shapes, and a config that computes the same way."""
    from safe_peft._load.adapter_tensors import adapter_tensors

    assert plan.view is not None
    loaded = adapter_tensors(model, adapter_name, plan.view.method == "analytic")  # type: ignore[arg-type]
    have = {k: tuple(t.shape) for k, t in loaded.items()}
    want = {k: e.shape for k, e in plan.view.expected.items() if e.required or k in plan.checkpoint}
    keys = sorted(set(have) ^ set(want))[:20]
    shapes = sorted(k for k in set(have) & set(want) if have[k] != want[k])[:20]
    configs: Any = model.peft_config
    current = configs[adapter_name].to_dict()
    saved = source.peft_config.to_dict()
    fields = sorted(
        k for k in set(current) | set(saved) if k not in RELOAD_IGNORED and _norm(current.get(k)) != _norm(saved.get(k))
    )
    if not (keys or shapes or fields):
        return plan
    parts = []
    if fields:
        parts.append("config " + ", ".join(f"{k}={saved.get(k)!r} (loaded: {current.get(k)!r})" for k in fields[:6]))
    if keys:
        parts.append(f"{len(set(have) ^ set(want))} keys only one of them has (e.g. {keys[0]!r})")
    if shapes:
        parts.append(f"{len(shapes)} shapes differ (e.g. {shapes[0]!r}: {want[shapes[0]]} vs {have[shapes[0]]})")
    diagnosis = finding(
        "reload_mismatch",
        f"the checkpoint does not fit adapter {adapter_name!r} as it is loaded: {'; '.join(parts)}; a reload keeps "
        "the loaded config, so these weights would compute something else",
        details={"fields": fields, "keys": keys, "shapes": shapes},
    )
    report = replace(plan.report, ok=False, causes=[*plan.report.causes, diagnosis])
    return replace(plan, report=report)


def _norm(value: Any) -> Any:
    if isinstance(value, (list, tuple, set, frozenset)):
        return sorted(map(str, value))
    return value


# -- transformers' in-place route: its own key handling ---------------------------------------------------------


def inplace_conversion(
    model: nn.Module, keys: list[str], expected: Mapping[str, Any], key_mapping: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Checkpoint key -> the key it loads as on transformers' in-place route, in the checkpoint namespace.

    transformers strips ``base_model.model.`` (a key without it loads the same), applies the caller's ``key_mapping``
    (transformers 4: also a VLM's ``_checkpoint_conversion_mapping``), and transformers 5 adds or strips one
    ``base_model_prefix`` level per key when that makes the key one the model has (``rename_source_key``).
    """
    import re

    shifts = _shifts_prefix()
    prefix = str(getattr(model, "base_model_prefix", "") or "")
    known = {k[len(PEFT_PREFIX) :] for k in expected if k.startswith(PEFT_PREFIX)}
    if shifts and prefix:
        known |= {n for n, _ in model.named_parameters()}
    out = {}
    for key in keys:
        rest = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        for pattern, replacement in (key_mapping or {}).items():
            rest, count = re.subn(pattern, replacement, rest)
            if count:
                break
        if shifts and prefix and rest not in known:
            if rest.startswith(prefix) and rest[len(prefix) + 1 :] in known:
                rest = rest[len(prefix) + 1 :]
            elif f"{prefix}.{rest}" in known:
                rest = f"{prefix}.{rest}"
        out[key] = PEFT_PREFIX + rest
    return out


def _shifts_prefix() -> bool:
    """transformers 5's loader adds or strips a ``base_model_prefix`` level per key (``rename_source_key``)."""
    try:
        from transformers import core_model_loading
    except ImportError:
        return False
    return hasattr(core_model_loading, "rename_source_key")


def inplace_key_mapping(model: nn.Module, kwargs: Mapping[str, Any]) -> dict[str, str] | None:
    """The ``key_mapping`` transformers 4's ``load_adapter`` applies: the caller's, or a VLM's own."""
    given = (kwargs.get("adapter_kwargs") or {}).get("key_mapping") or kwargs.get("key_mapping")
    if given or _shifts_prefix():
        return dict(given) if given else None
    try:
        from transformers.integrations import peft as integration
    except ImportError:
        return None
    if any(name in type(model).__name__.lower() for name in getattr(integration, "VLMS", ())):
        return dict(getattr(model, "_checkpoint_conversion_mapping", None) or {}) or None
    return None


def _inplace_layout(model: nn.Module, layout: Layout, view: ModelView, kwargs: Mapping[str, Any]) -> Layout:
    keys = [*layout.checkpoint, *layout.dropped]
    mapping = inplace_conversion(model, keys, view.expected, inplace_key_mapping(model, kwargs))
    checkpoint = {mapping[k]: s for k, s in layout.checkpoint.items()}
    return Layout(checkpoint, layout.warnings, layout.causes, dropped=tuple(mapping[k] for k in layout.dropped))


# -- small helpers ---------------------------------------------------------------------------------------------


def _without(plan: LoadPlan, codes: frozenset[str]) -> LoadPlan:
    kept = [d for d in plan.report.causes if d.code not in codes]
    if len(kept) == len(plan.report.causes):
        return plan
    r = plan.report
    ok = not kept and not (r.missing or r.unexpected or r.size_mismatches)
    return replace(plan, report=replace(r, causes=kept, ok=ok))


def _named(plan: LoadPlan, model: nn.Module) -> LoadPlan:
    report: LoadReport = replace(plan.report, model_class=type(model).__name__)
    return replace(plan, report=report)
