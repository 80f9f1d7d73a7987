"""Which tensors an adapter owns in a model, and which base tensors a load writes in place."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from safe_peft._keys import LORA_OWN, Role, base_tensor_name, checkpoint_key, role_of
from safe_peft._model.walk import named_paths

if TYPE_CHECKING:
    from peft import PeftModel
    from torch import nn

    from safe_peft._plan.plan import LoadPlan

__all__ = [
    "adapter_tensor_ids",
    "adapter_tensors",
    "copy_into",
    "overwritten_base_tensors",
    "rewrites_base",
    "takes_in_place",
]


def overwritten_base_tensors(
    model: nn.Module, plan: LoadPlan, *, through: Callable[[nn.Module], nn.Module] | None = None
) -> list[Any]:
    """Base-model tensors the load writes in place: every checkpoint entry that names a tensor the base already has
    (biases saved by ``bias="all"`` / ``"lora_only"``, base embedding weights saved with the adapter, ...), and
    the targeted weights when the config's initialisation rewrites them (PiSSA, OLoRA, CorDA, LoftQ).
    ``through``: ``model`` carries adapters, and its base is seen through them with this function (called only when
    there is anything to look for)."""
    rewrites = plan.view is not None and rewrites_base(plan.peft_config)
    if not rewrites and all(role_of(key) in LORA_OWN for key in plan.checkpoint):  # never a base tensor
        return []
    if through is not None:
        model = through(model)
    tensors: dict[str, Any] = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    names = set()
    for key in plan.checkpoint:
        name = base_tensor_name(key)
        if name in tensors:
            names.add(name)
    if rewrites:
        assert plan.view is not None
        names |= {f"{e.module}.weight" for e in plan.view.expected.values() if e.role is Role.A}
    return [tensors[name] for name in sorted(names) if name in tensors]


def rewrites_base(config: Any) -> bool:
    """Whether peft's injection with this config rewrites the targeted base weights (it re-runs the init)."""
    init = str(getattr(config, "init_lora_weights", True)).lower()
    return init in {"pissa", "olora", "corda", "loftq"} or init.startswith("pissa_niter_")


def adapter_tensors(
    model: PeftModel,
    adapter_name: str,
    analytic: bool,
    layers: Iterable[tuple[str, nn.Module]] | None = None,
) -> dict[str, Any]:
    """The adapter's tensors in the model, under their checkpoint keys.

    For plain LoRA (the analytic view) the tensors are those the tuner layers hold under the adapter's name,
    named by the key grammar (DoRA magnitudes also drop ``.weight``, as peft saves them); otherwise they come
    from ``get_peft_model_state_dict``. A test holds the two equal. ``layers``: (name, module) pairs to look in
    instead of the whole model, when the caller has found the tuner layers already (a hot-swap's LoRA layers).
    """
    from peft import get_peft_model_state_dict

    if not analytic:
        return dict(get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False))
    wrapped = f".modules_to_save.{adapter_name}."
    tensors = {}
    walk = named_paths(model) if layers is None else layers  # as state_dict: every path
    for name, tensor in _owned_state(walk, adapter_name):  # parameters and buffers (saved heads' stats)
        if wrapped in name:
            tensors[name.replace(wrapped, ".")] = tensor
        else:
            key = checkpoint_key(name, adapter_name)
            tensors[key[: -len(".weight")] if key.endswith(".lora_magnitude_vector.weight") else key] = tensor
    return tensors


def _owned_state(modules: Iterable[tuple[str, nn.Module]], adapter_name: str) -> Iterator[tuple[str, Any]]:
    """``model.state_dict(keep_vars=True)`` restricted to the adapter's own entries, under the same names, without
    walking the base model's tensors: every per-adapter container a tuner layer (or a saved-module wrapper) among
    ``modules`` (the model's ``named_modules(remove_duplicate=False)``) holds (lora_A, lora_magnitude_vector,
    modules_to_save, ...), at the adapter's name."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    containers = (torch.nn.ModuleDict, torch.nn.ParameterDict)
    is_tuner: dict[type, bool] = {}  # per class: an ABC's isinstance costs a microsecond, on every module
    for prefix, module in modules:
        kind = type(module)
        tuner = is_tuner.get(kind)
        if tuner is None:
            tuner = is_tuner[kind] = issubclass(kind, BaseTunerLayer)
        if not tuner and not isinstance(module.__dict__["_modules"].get("modules_to_save"), torch.nn.ModuleDict):
            continue
        for attr, container in module._modules.items():
            if attr == "base_layer" or not isinstance(container, containers) or adapter_name not in container:
                continue
            where = f"{prefix}.{attr}.{adapter_name}" if prefix else f"{attr}.{adapter_name}"
            item = container[adapter_name]
            if isinstance(item, torch.Tensor):
                yield where, item
            else:
                yield from _state_of(item, where)


def _state_of(module: nn.Module, where: str) -> Iterator[tuple[str, Any]]:
    """``module.state_dict(keep_vars=True)`` under ``where``: read directly for a leaf module with torch's own
    saving (a tuner layer's ``nn.Linear`` / ``nn.Embedding`` halves), by ``state_dict`` for anything else."""
    import torch

    plain = (
        not module._modules
        and type(module)._save_to_state_dict is torch.nn.Module._save_to_state_dict
        and not module._state_dict_hooks
        and not module._state_dict_pre_hooks
        and not getattr(module, "_extra_state", None)
        and type(module).get_extra_state is torch.nn.Module.get_extra_state
    )
    if not plain:
        for sub, tensor in module.state_dict(keep_vars=True).items():
            yield f"{where}.{sub}", tensor
        return
    for name, param in module._parameters.items():
        if param is not None:
            yield f"{where}.{name}", param
    for name, buffer in module._buffers.items():
        if buffer is not None and name not in module._non_persistent_buffers_set:
            yield f"{where}.{name}", buffer


def takes_in_place(checkpoint: dict[str, tuple[int, ...]], tensors: dict[str, Any]) -> bool:
    """Whether ``checkpoint`` can be written into ``tensors`` by a copy per key: the same keys, shape for shape, into
    ordinary local tensors (no DTensor or other subclass, nothing on meta)."""
    import torch

    if set(checkpoint) != set(tensors):
        return False
    for key, shape in checkpoint.items():
        tensor = tensors[key]
        if tuple(tensor.shape) != shape or type(tensor) not in (torch.Tensor, torch.nn.Parameter):
            return False
        if tensor.device.type == "meta":
            return False
    return True


def copy_into(tensors: dict[str, Any], weights: dict[str, Any]) -> None:
    """Write each of ``weights`` into the tensor of the same key, in place (what ``load_state_dict`` does)."""
    import torch

    with torch.no_grad():
        for key, value in weights.items():
            tensors[key].copy_(value)


def adapter_tensor_ids(model: nn.Module, adapter_name: str) -> set[int]:
    """The tensors that belong to ``adapter_name``, found structurally (:func:`_owned_state`): the entries under
    that name in each tuner layer's adapter containers (and in saved-module wrappers). Never by matching names, so
    that any name peft accepts (``weight``, ``base_layer``, ...) is told apart from the base model's own tensors."""
    return {id(tensor) for _, tensor in _owned_state(named_paths(model), adapter_name)}
