"""Which way a load writes the adapter: safe_peft's own assignment of the checkpoint (on the meta device, or after
peft's initialisation) or peft's own ``from_pretrained`` / ``load_adapter``."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from safe_peft._files.source import HUB_KWARGS
from safe_peft._keys import LORA_OWN, role_of
from safe_peft._load.adapter_tensors import rewrites_base

if TYPE_CHECKING:
    from torch import nn

    from safe_peft._plan.plan import LoadPlan

__all__ = [
    "META_ROUTE_MIN_ELEMENTS_PER_MODULE",
    "load_route",
    "own_route",
    "proven_exact",
    "rounds_on_meta",
]


def load_route(base_model: nn.Module, plan: LoadPlan, strict: bool, kwargs: Mapping[str, Any]) -> str:
    """``"meta"`` when the plan proves the checkpoint complete and exact for a method whose adapter is nothing but
    weights the checkpoint holds (plain LoRA on linear, embedding and Conv1D layers, DoRA and lora_bias included)
    and its tensors are large enough for it to pay: the adapter is then created on the meta device and the
    checkpoint assigned to it, skipping the random initialisation plain peft does and overwrites.
    ``"initialising"`` (peft's default) otherwise, and whenever the caller chose ``low_cpu_mem_usage`` themselves."""
    if "low_cpu_mem_usage" in kwargs:  # the caller's choice: peft's own route, as asked
        return "low_cpu_mem_usage" if kwargs["low_cpu_mem_usage"] else "initialising"
    if not proven_exact(base_model, plan, strict, kwargs) or not _initialising_costs_more(plan):
        return "initialising"
    if rounds_on_meta(base_model, plan, kwargs) and not _adapter_tensors_only(base_model, plan, kwargs):
        return "initialising"
    return "meta"


def rounds_on_meta(base_model: nn.Module, plan: LoadPlan, kwargs: Mapping[str, Any]) -> bool:
    """Whether peft's meta route would round the checkpoint here: with autocast, on a targeted base layer holding
    its weight below float32 (float16, bfloat16, float8), it assigns the file's tensor, moves it to the base layer's
    dtype, then upcasts it back to float32, where the initialising route upcasts first and copies the file's values
    exactly. The meta route then copies the file's values in last (``exact_values``)."""
    return bool(kwargs.get("autocast_adapter_dtype", True)) and _half_precision_targets(base_model, plan)


def _adapter_tensors_only(base_model: nn.Module, plan: LoadPlan, kwargs: Mapping[str, Any]) -> bool:
    """The checkpoint holds LoRA's own tensors only, under their own keys: each has a place in the adapter to copy
    the file's values into. (A saved base tensor or head would be assigned in the file's dtype by the meta route.)"""
    if kwargs.get("key_mapping") or getattr(base_model, "_checkpoint_conversion_mapping", None):
        return False
    return not plan.renames and all(role_of(key) in LORA_OWN for key in plan.checkpoint)


def _half_precision_targets(base_model: nn.Module, plan: LoadPlan) -> bool:
    """Whether a targeted base layer holds its weight below float32 (or cannot be found where the plan put it)."""
    assert plan.view is not None
    for path in {e.module for e in plan.view.expected.values() if e.required}:
        try:
            module: Any = base_model.get_submodule(path)
        except AttributeError:
            return True  # not found where the plan put it: keep the route that cannot round
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        weight = getattr(base, "weight", None)
        if weight is None or not weight.is_floating_point() or weight.element_size() < 4:
            return True
    return False


def proven_exact(base_model: nn.Module, plan: LoadPlan, strict: bool, kwargs: Mapping[str, Any]) -> bool:
    """The plan proves the checkpoint complete and exact for plain LoRA, and nothing from_pretrained interprets
    besides (no device map, no other arguments, no resize, no base rewrite): safe_peft may then do peft's steps
    itself (:func:`own_route`), on either route."""
    view = plan.view
    exact = plan.report.ok and view is not None and view.method == "analytic" and view.error is None
    if not exact or not strict or plan.vocab_size is not None or rewrites_base(plan.peft_config):
        return False
    if set(kwargs) - _META_ROUTE_KWARGS:  # anything else from_pretrained itself interprets: leave it to peft
        return False
    return getattr(base_model, "hf_device_map", None) is None and not _has_meta_tensors(base_model)


# The meta route skips the random initialisation of the adapter's tensors (a cost per element) but pays the per-thread
# meta device context on every torch call of the injection (a cost per adapted module). Measured on the benchmark
# Llamas (docs/performance.md): about 5 ns per element and 0.3 ms per module, so the meta route is the faster one from
# about 64k adapter elements per adapted module (the 119M r=64 adapter: 180k, the 33M r=16 one: 22k).
META_ROUTE_MIN_ELEMENTS_PER_MODULE = 65_536


def _initialising_costs_more(plan: LoadPlan) -> bool:
    assert plan.view is not None
    required = [e for e in plan.view.expected.values() if e.required]
    elements = sum(math.prod(e.shape) for e in required)
    modules = {e.module for e in required}
    return bool(modules) and elements >= META_ROUTE_MIN_ELEMENTS_PER_MODULE * len(modules)


_META_ROUTE_KWARGS = frozenset(
    {"is_trainable", "autocast_adapter_dtype", "torch_device", "key_mapping", *HUB_KWARGS, "config"}
)


def _has_meta_tensors(model: nn.Module) -> bool:
    return any(p.device.type == "meta" for p in model.parameters())


def own_route(
    base_model: nn.Module,
    directory: str,
    adapter_name: str,
    config: Any,
    kwargs: dict[str, Any],
    on_meta: bool,
    exact_values: bool,
) -> tuple[Any, dict[str, Any] | None]:
    """What ``PeftModel.from_pretrained`` does for a model without a device map, ``on_meta`` with the adapter's
    tensors created on the meta device (a thread-local device context: no process-wide patch), and the checkpoint
    then written by :func:`safe_peft._load.assign.load_checkpoint`. Returns the PeftModel and, when they were written
    there, the adapter's tensors under their checkpoint keys."""
    import copy

    from peft import PeftModel
    from peft.auto import MODEL_TYPE_TO_PEFT_MODEL_MAPPING

    config = copy.deepcopy(config)  # the plan's own config is never changed
    is_trainable = bool(kwargs.pop("is_trainable", False))
    autocast = kwargs.pop("autocast_adapter_dtype", True)
    key_mapping = kwargs.pop("key_mapping", None)
    if key_mapping is None:
        key_mapping = getattr(base_model, "_checkpoint_conversion_mapping", {})
    config.inference_mode = not is_trainable
    if hasattr(config, "runtime_config"):  # as from_pretrained sets it (no ephemeral offload on this route)
        config.runtime_config.ephemeral_gpu_offload = False
    # as from_pretrained picks the class: the task type as given (an enum or its string value)
    peft_cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(config.task_type, PeftModel) if config.task_type else PeftModel
    from safe_peft._model.meta import on_meta_here  # thread-local: torch.device("meta") sets a module global too

    with on_meta_here() if on_meta else contextlib.nullcontext():
        model = peft_cls(base_model, config, adapter_name, autocast_adapter_dtype=autocast)
    torch_device = kwargs.pop("torch_device", None)
    assert not kwargs, kwargs  # proven_exact admits only the arguments read above (hub ones stay out of kwargs)
    from safe_peft._load.assign import (  # what load_adapter does from here, without its whole-model walks
        AdapterLoad,
        load_checkpoint,
    )

    load = AdapterLoad(
        directory, adapter_name, on_meta=on_meta, is_trainable=is_trainable, autocast_adapter_dtype=autocast
    )
    _, state = load_checkpoint(
        model, load, torch_device=torch_device, key_mapping=key_mapping, exact_values=exact_values
    )
    return model, state
