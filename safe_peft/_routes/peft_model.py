"""Loading into a PeftModel that already carries adapters: a further adapter, a replacement, a reload.

The safe counterpart of ``peft_model.load_adapter(path, adapter_name)``. The plan comes from
:func:`safe_peft._plan.plan.plan_load` with the route's hooks. The load is peft's ``load_adapter`` on a directory
holding exactly the checked config (and the weights, linked, or renamed when an opt-in asked); for plain LoRA its
steps are done by :mod:`safe_peft._load.assign` (the same model, without peft's walks of it). The whole PeftModel is
recorded first (:class:`~safe_peft._load.snapshot.ModuleSnapshot`): the adapters already there, their weights (cloned
when a reload writes into them), the active adapter, every ``requires_grad`` flag and the ``peft_config`` dict come
back exactly as they were whenever anything fails.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from safe_peft._files.source import HUB_KWARGS
from safe_peft._load.adapter_tensors import (
    adapter_tensor_ids,
    adapter_tensors,
    copy_into,
    overwritten_base_tensors,
    takes_in_place,
)
from safe_peft._load.assign import load_adapter, loads_like_peft
from safe_peft._load.directory import load_directory
from safe_peft._load.driver import Loaded, LoadRoute, Outcome, Protected, drive
from safe_peft._load.plain_calls import plain_calls
from safe_peft._load.route_choice import load_route, rounds_on_meta
from safe_peft._load.snapshot import ModuleSnapshot, ValueSnapshot
from safe_peft._plan.plan import LoadPlan, plan_load
from safe_peft._plan.routes import CarryingRoute, resolve_route, see_through
from safe_peft._versions import load_adapter_facts

if TYPE_CHECKING:
    from peft import PeftModel

    from safe_peft._plan.options import LoadOptions

__all__ = ["IntoPeftModel", "load_into", "run_load"]


def load_into(peft_model: PeftModel, model_id: str | os.PathLike[str], options: LoadOptions) -> Any:
    """``safe_load_adapter`` on a PeftModel: add ``adapter_name``, or replace / reload it (``replace=``)."""
    route = resolve_route(peft_model, options.adapter_name, options.replace, False)
    outcome = run_load(peft_model, model_id, options, route=route)
    return options.returned(outcome.model, outcome.report)


def run_load(peft_model: PeftModel, model_id: str | os.PathLike[str], options: LoadOptions, *, route: str) -> Outcome:
    """Plan and load on ``route`` (add | replace | reload); the outcome's ``result`` is peft's load result."""
    return drive(IntoPeftModel(peft_model, model_id, options, route))


class IntoPeftModel(LoadRoute):
    """A further adapter, a replacement or a reload into a PeftModel. The whole PeftModel is recorded (the adapters
    there, the weights a reload writes into, the active adapter, ``requires_grad`` flags, ``peft_config``), except
    for a reload that is only a copy into the adapter's tensors: then those values and the modes are recorded."""

    def __init__(self, model: PeftModel, model_id: str | os.PathLike[str], options: LoadOptions, route: str) -> None:
        super().__init__(model, model_id, options)
        self.route = route

    def plan(self) -> LoadPlan:
        return plan_load(self.model, self.model_id, self.options, CarryingRoute(self.route))

    def protect(self, plan: LoadPlan) -> Protected:
        peft_model, adapter_name, route = self.model, self.options.adapter_name, self.route
        analytic = plan.view is not None and plan.view.method == "analytic"
        loaded = adapter_tensors(peft_model, adapter_name, analytic) if route == "reload" else {}
        if route == "reload" and analytic and _writes_in_place(peft_model, plan, loaded, self.options.peft_kwargs):
            values = ValueSnapshot(peft_model)  # a copy into the adapter's tensors, and the train / eval flags
            values.protect([loaded[key] for key in plan.checkpoint])
            return Protected(values, _InPlace(loaded))
        snapshot = ModuleSnapshot(peft_model)
        protected = overwritten_base_tensors(peft_model.get_base_model(), plan, through=see_through)
        protected += list(loaded.values())  # a reload writes the checkpoint into the adapter's own tensors, in place
        snapshot.protect(protected)
        active = list(peft_model.active_adapters)
        flags = {id(p): p.requires_grad for p in peft_model.parameters()} if route == "replace" else {}
        return Protected(snapshot, (active, flags))

    def load(self, plan: LoadPlan, protected: Protected, temporary: list[str | None]) -> Loaded:
        if isinstance(protected.held, _InPlace):
            return _reload_in_place(self.model, plan, protected.held.loaded, self.options.peft_kwargs)
        peft_model, adapter_name, route = self.model, self.options.adapter_name, self.route
        kwargs, (active, flags) = self.options.peft_kwargs, protected.held
        inner = peft_model.get_base_model()
        directory, workdir = load_directory(plan, with_config=route != "reload")
        temporary.append(workdir)
        passthrough = {k: v for k, v in kwargs.items() if k not in HUB_KWARGS and k != "config"}
        mapping = getattr(inner, "_checkpoint_conversion_mapping", None)
        if mapping and "key_mapping" not in passthrough and not getattr(plan.peft_config, "is_prompt_learning", False):
            passthrough["key_mapping"] = mapping  # what from_pretrained applies, and the plan predicted
        if route == "replace":
            _delete_quietly(peft_model, adapter_name, active)
        taken = load_route(inner, plan, self.options.strict, kwargs) if route != "reload" else "initialising"
        # peft before 0.19 creates a further adapter in the base's dtype (no autocast on add_adapter): there its
        # initialising route rounds the file's values just as its meta route does, and nothing is to be copied back
        exact = taken == "meta" and rounds_on_meta(inner, plan, kwargs) and load_adapter_facts().passes_autocast
        analytic = plan.view is not None and plan.view.method == "analytic"
        own = analytic and loads_like_peft(peft_model, adapter_name, passthrough)  # plain LoRA: without the walks
        if exact and not own:
            taken, exact = "initialising", False  # peft's own meta route would round the adapter here
        if taken == "meta":  # complete and exact: peft creates the new adapter on meta and assigns the checkpoint
            passthrough["low_cpu_mem_usage"] = True  # (an argument loads_like_peft admits)
        state = None
        with plain_calls():
            if own:
                result, state = load_adapter(peft_model, directory, adapter_name, passthrough, exact_values=exact)
            else:
                result = peft_model.load_adapter(directory, adapter_name, **passthrough)
        if route == "replace":
            _keep_roles(peft_model, adapter_name, active, flags, bool(kwargs.get("is_trainable", False)))
        return Loaded(peft_model, state, taken, result)


@dataclass(frozen=True)
class _InPlace:
    """A reload that is a copy into the adapter's tensors (``loaded``, under their checkpoint keys)."""

    loaded: dict[str, Any]


# What the reload route of peft's load_adapter reads besides the directory; anything else goes through peft itself
_IN_PLACE_KWARGS = frozenset({"is_trainable", "torch_device", "autocast_adapter_dtype", *HUB_KWARGS})


def _writes_in_place(peft_model: PeftModel, plan: LoadPlan, loaded: dict[str, Any], kwargs: Mapping[str, Any]) -> bool:
    """Whether a reload can be done as what it amounts to in peft, a ``copy_`` of each checkpoint tensor into the
    adapter's tensor of the same key, and nothing else changes: the only adapter in the model (with others, peft's
    returned ``missing_keys`` names every key holding the adapter's name, theirs included), plain LoRA (the analytic
    view), the checkpoint's own keys (no renames, no key_mapping), exactly the adapter's keys with the same shapes,
    ordinary local tensors, no device map (peft would re-dispatch), and no low-precision adapter tensor that peft's
    autocast would upcast."""
    import torch

    if plan.renames or plan.dropped or plan.legacy is not None or plan.files.weights_format != "safetensors":
        return False
    if len(peft_model.peft_config) != 1:  # peft's result lists other adapters' keys holding the name as missing
        return False
    if set(kwargs) - _IN_PLACE_KWARGS or getattr(peft_model, "hf_device_map", None) is not None:
        return False
    if getattr(peft_model.get_base_model(), "_checkpoint_conversion_mapping", None):
        return False
    if not takes_in_place(plan.checkpoint, loaded):  # (the same keys: peft's result would list any left out)
        return False
    upcast = kwargs.get("autocast_adapter_dtype", True)
    low = [t for t in loaded.values() if t.is_floating_point() and t.dtype not in (torch.float32, torch.float64)]
    return not (upcast and low)


def _reload_in_place(
    peft_model: PeftModel, plan: LoadPlan, loaded: dict[str, Any], kwargs: Mapping[str, Any]
) -> Loaded:
    """The reload as peft does it for these adapters (``set_peft_model_state_dict`` copies each tensor into place,
    then ``eval()`` unless trainable), without peft's walks over the whole model."""
    from peft.utils.other import infer_device
    from peft.utils.save_and_load import load_peft_weights
    from torch.nn.modules.module import _IncompatibleKeys

    device = kwargs.get("torch_device") or infer_device()
    weights = load_peft_weights(plan.files.directory, device=device)
    copy_into(loaded, weights)
    if not kwargs.get("is_trainable", False):
        peft_model.eval()
    return Loaded(peft_model, loaded, "in_place", _IncompatibleKeys([], []))


def _delete_quietly(peft_model: PeftModel, adapter_name: str, active: list[str]) -> None:
    """``delete_adapter`` without peft's "adapter X was active, now Y is" notice: another adapter is made active
    first (its roles are put back by :func:`_keep_roles`). No warning filter is touched: they are process-wide."""
    others = [name for name in peft_model.peft_config if name != adapter_name]
    config: Any = peft_model.peft_config[adapter_name]
    if adapter_name in active and others and not config.is_prompt_learning:
        tuner: Any = peft_model.base_model
        rest = [name for name in active if name != adapter_name] or others[:1]
        tuner.set_adapter(rest if len(rest) > 1 else rest[0])
        if len(rest) == 1:
            peft_model.active_adapter = rest[0]
    peft_model.delete_adapter(adapter_name)


def _keep_roles(
    peft_model: PeftModel, adapter_name: str, active: list[str], flags: dict[int, bool], trainable: bool
) -> None:
    """After a replacement: the new adapter is active if the old one was; every other flag is as it was."""
    if adapter_name in active:
        tuner: Any = peft_model.base_model
        tuner.set_adapter(active if len(active) > 1 else active[0])
    own = adapter_tensor_ids(peft_model, adapter_name)
    for param in peft_model.parameters():
        if id(param) in own:
            param.requires_grad_(trainable)
        elif id(param) in flags:
            param.requires_grad_(flags[id(param)])
