"""peft's ``load_adapter`` for plain LoRA, done by safe_peft without peft's walks of the whole model.

Once the adapter is injected, what is left of ``PeftModel.load_adapter(path, name, ...)`` is reading the file and
``set_peft_model_state_dict``. For plain LoRA that function amounts to one write per checkpoint key
(``load_state_dict(..., strict=False)``: ``copy_`` into the initialised tensor; with ``low_cpu_mem_usage``, a new
``Parameter`` of the file's tensor replacing the meta one, with its ``requires_grad``, then each tuner layer's
``_move_adapter_to_device_of_base_layer``). peft gets there through four walks of the whole model
(``state_dict()``, ``load_state_dict``, ``named_modules``, ``named_parameters``): about a quarter of a load.
:func:`load_checkpoint` does the writes from one walk of its own.

It does so only where nothing else can happen on peft's way (:func:`_survey`): torch's own ``load_state_dict`` /
``state_dict`` on every module, no state-dict hooks, no saved-module wrappers or buffer dicts, no transformers
weight conversion, no tensor-parallel resharding, the swap-tensors future flag off, every key a ``Parameter`` of
the same shape. Anything else goes through peft's own ``set_peft_model_state_dict``. The rest of the tail is peft's
own code, called as ``load_adapter`` calls it (the same tail in peft 0.17.1 to 0.21.2): the move to each base
layer's device and dtype, peft's upcast of the adapter's dtype, ``eval()`` unless trainable. The move and the upcast
are skipped only where they have nothing to change (every tensor already of the base layer's device and dtype; no
tensor below float32).

For a further adapter, :func:`load_adapter` also does the head of peft's ``load_adapter`` (the config read from the
directory, peft's checks, ``add_adapter``, the trainable flags), as the installed release does it (version facts in
:mod:`safe_peft._versions`; a release not read there keeps peft's own ``load_adapter``).

tests/test_assign.py holds each result equal to plain peft's, tensor for tensor and flag for flag.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from safe_peft._keys import checkpoint_key
from safe_peft._model.walk import named_paths

if TYPE_CHECKING:
    from peft import PeftModel
    from torch import nn

__all__ = ["AdapterLoad", "add_adapter", "load_adapter", "load_checkpoint", "loads_like_peft"]

# A slot: the module that holds the adapter's tensor, the attribute it holds it under, and the model's key for it
Slot = tuple[Any, str, str]


# load_adapter's keyword arguments the steps here read; with any other, peft's own load_adapter runs
_LOAD_ADAPTER_KWARGS = frozenset(
    {"is_trainable", "autocast_adapter_dtype", "torch_device", "ephemeral_gpu_offload", "low_cpu_mem_usage"}
    | {"key_mapping"}
)


@dataclass(frozen=True)
class AdapterLoad:
    """One adapter as ``load_adapter`` is asked to load it, what its head (:func:`add_adapter`) and its tail
    (:func:`load_checkpoint`) both read: the directory, the adapter's name, its tensors created on the meta device
    (``low_cpu_mem_usage``), trainable or not, and peft's upcast of half-precision adapter weights."""

    directory: str
    adapter_name: str
    on_meta: bool
    is_trainable: bool
    autocast_adapter_dtype: bool


def loads_like_peft(peft_model: PeftModel, adapter_name: str, kwargs: dict[str, Any]) -> bool:
    """Whether :func:`load_adapter` can stand in for ``peft_model.load_adapter(directory, adapter_name, **kwargs)``:
    a new name, a peft release whose ``load_adapter`` was read, only the arguments read here, no device map (peft
    would re-dispatch the model)."""
    from safe_peft._versions import load_adapter_facts

    if adapter_name in peft_model.peft_config or set(kwargs) - _LOAD_ADAPTER_KWARGS:
        return False
    return load_adapter_facts().read and getattr(peft_model, "hf_device_map", None) is None


def load_adapter(
    peft_model: PeftModel, directory: str, adapter_name: str, kwargs: dict[str, Any], *, exact_values: bool = False
) -> tuple[Any, dict[str, Any] | None]:
    """``peft_model.load_adapter(directory, adapter_name, **kwargs)`` for a new name (see :func:`loads_like_peft`):
    peft's steps, with the checkpoint written by :func:`load_checkpoint`. Returns peft's result and the adapter's
    tensors when they were written here."""
    load = AdapterLoad(
        directory,
        adapter_name,
        on_meta=bool(kwargs.get("low_cpu_mem_usage", False)),
        is_trainable=bool(kwargs.get("is_trainable", False)),
        autocast_adapter_dtype=bool(kwargs.get("autocast_adapter_dtype", True)),
    )
    add_adapter(peft_model, load, ephemeral_gpu_offload=bool(kwargs.get("ephemeral_gpu_offload", False)))
    return load_checkpoint(
        peft_model,
        load,
        torch_device=kwargs.get("torch_device"),
        key_mapping=kwargs.get("key_mapping"),
        exact_values=exact_values,
    )


def add_adapter(peft_model: PeftModel, load: AdapterLoad, *, ephemeral_gpu_offload: bool = False) -> None:
    """The head of ``peft_model.load_adapter(load.directory, load.adapter_name, ...)`` for a new name: the config as
    peft reads it, peft's checks, ``add_adapter``, and the trainable flags, as the installed peft's ``load_adapter``
    does them (the version facts in :mod:`safe_peft._versions`)."""
    from peft.config import PeftConfig
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    from safe_peft._versions import load_adapter_facts

    facts = load_adapter_facts()
    config: Any = PEFT_TYPE_TO_CONFIG_MAPPING[PeftConfig._get_peft_type(load.directory)].from_pretrained(
        load.directory, ephemeral_gpu_offload=ephemeral_gpu_offload
    )
    model: Any = peft_model
    model._check_new_adapter_config(config, is_trainable=load.is_trainable)
    config.inference_mode = not load.is_trainable
    extra = {"autocast_adapter_dtype": load.autocast_adapter_dtype} if facts.passes_autocast else {}
    model.add_adapter(load.adapter_name, config, low_cpu_mem_usage=load.on_meta, **extra)
    if load.is_trainable and facts.sets_requires_grad:
        model.set_requires_grad(load.adapter_name)


def load_checkpoint(
    model: PeftModel,
    load: AdapterLoad,
    *,
    torch_device: str | None,
    key_mapping: dict[str, str] | None,
    exact_values: bool = False,
) -> tuple[Any, dict[str, Any] | None]:
    """The tail of ``model.load_adapter(load.directory, load.adapter_name, ...)`` for an adapter already injected
    (on the meta device when ``load.on_meta``). Returns what peft's returns (missing keys filtered as
    peft filters them) and, when the checkpoint was written here, the adapter's tensors under their checkpoint keys
    (for the verification, which then need not look for them). ``exact_values``: the meta route standing in for
    the initialising one on a half-precision base, where peft's move rounds the file's values to the base's dtype
    before its upcast: the file's values are copied into the upcast tensors last, as the initialising route holds
    them (the route is taken only for a checkpoint of the adapter's own tensors, see
    :func:`safe_peft._load.route_choice.load_route`)."""
    from peft.utils.other import infer_device
    from peft.utils.save_and_load import load_peft_weights, set_peft_model_state_dict

    adapter_name, on_meta = load.adapter_name, load.on_meta
    device = torch_device if torch_device is not None else infer_device()
    weights = load_peft_weights(load.directory, device=device, key_mapping=key_mapping)
    survey = _survey(model, adapter_name)
    written = survey is not None and _fits(survey.slots, weights, on_meta)
    if written:
        assert survey is not None
        result = _write(model, survey, weights, adapter_name, on_meta)
    else:
        result = set_peft_model_state_dict(model, weights, adapter_name=adapter_name, low_cpu_mem_usage=on_meta)
    exact = weights if exact_values else None
    del weights  # as in peft: the file's tensors live on only where they were assigned
    prefix = _tuner_prefix(model, adapter_name)
    kept = [key for key in result.missing_keys if prefix in key and adapter_name in key]
    result.missing_keys.clear()
    result.missing_keys.extend(kept)
    tuner: Any = model.base_model
    if hasattr(tuner, "_cast_adapter_dtype") and not (written and _full_precision(_held(survey))):
        tuner._cast_adapter_dtype(adapter_name=adapter_name, autocast_adapter_dtype=load.autocast_adapter_dtype)
    if not load.is_trainable:
        model.eval()
    if exact is not None:
        _copy_exact(adapter_name, exact, survey if written else _survey(model, adapter_name, gates=False))
    return result, (_held(survey) if written else None)  # read last: the move and the upcast may replace tensors


def _copy_exact(adapter_name: str, weights: dict[str, Any], survey: _Survey | None) -> None:
    """Each file tensor copied into the adapter's tensor of its key, as the initialising route's ``copy_`` does."""
    import torch

    held = _held(survey) if survey is not None else {}
    if not set(weights) <= set(held):  # the route's condition rules this out; never leave rounded values
        raise RuntimeError(f"adapter {adapter_name!r}: checkpoint tensors without a place in the model")
    with torch.no_grad():
        for key, value in weights.items():
            held[key].copy_(value)


def _held(survey: _Survey | None) -> dict[str, Any]:
    """The tensors the slots hold now, under their checkpoint keys."""
    assert survey is not None
    return {key: owner._parameters[name] for key, (owner, name, _) in survey.slots.items()}


def _tuner_prefix(model: PeftModel, adapter_name: str) -> str:
    from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING

    table: dict[Any, str] = dict(PEFT_TYPE_TO_PREFIX_MAPPING)  # load_adapter's filter reads peft's own table
    return table.get(model.peft_config[adapter_name].peft_type, "")


@dataclass
class _Survey:
    """What one walk of the model found: each checkpoint key's slot, the tuner layers holding the adapter (with
    their slots), and every key ``load_state_dict`` would visit."""

    slots: dict[str, Slot] = field(default_factory=dict)
    layers: list[tuple[Any, list[Slot]]] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)


def _survey(model: PeftModel, adapter_name: str, *, gates: bool = True) -> _Survey | None:
    """The walk; None when peft's loading could do anything besides assigning the adapter's tensors (see the
    module's docstring). ``gates=False``: only find where the adapter's tensors are (None when a tuner layer holds
    something other than tensors and leaf modules of parameters)."""
    import torch
    from peft.tuners._buffer_dict import BufferDict
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import PeftType

    if getattr(model.peft_config[adapter_name], "peft_type", None) != PeftType.LORA:
        return None
    if gates and (torch.__future__.get_swap_module_params_on_conversion() or _distributed()):
        return None
    if gates and (type(model).load_state_dict is not torch.nn.Module.load_state_dict):
        return None
    if gates and (type(model).state_dict is not torch.nn.Module.state_dict or _converts_weights(model)):
        return None
    survey = _Survey()
    owners: set[tuple[int, str]] = set()
    plain: dict[type, bool] = {}
    containers = (torch.nn.ModuleDict, torch.nn.ParameterDict)
    for prefix, module in named_paths(model):
        kind = type(module)
        if kind not in plain:
            plain[kind] = _plain_class(kind)
        if gates and (not plain[kind] or _hooked(module)):
            return None
        lead = f"{prefix}." if prefix else ""
        survey.keys.extend(lead + name for name, p in module._parameters.items() if p is not None)
        skip = module._non_persistent_buffers_set
        survey.keys.extend(lead + name for name, b in module._buffers.items() if b is not None and name not in skip)
        if not issubclass(kind, BaseTunerLayer):
            continue
        held: list[Slot] = []
        for attr, container in module._modules.items():
            if attr == "base_layer":
                continue
            if gates and isinstance(container, BufferDict) and adapter_name in container:  # peft's own loading
                return None
            if not isinstance(container, containers) or adapter_name not in container:
                continue
            where = f"{lead}{attr}.{adapter_name}"
            item = container[adapter_name]
            found = [(container, adapter_name, where)] if isinstance(item, torch.Tensor) else _leaf(item, where)
            if found is None:
                return None
            held.extend(found)
        for owner, name, key in held:
            if (id(owner), name) in owners and gates:  # one tensor reached by two paths: leave it to peft
                return None
            owners.add((id(owner), name))
            saved = checkpoint_key(key, adapter_name)
            if saved.endswith(".lora_magnitude_vector.weight"):  # peft saves DoRA's magnitude without .weight
                saved = saved[: -len(".weight")]
            survey.slots[saved] = (owner, name, key)
        if held:
            survey.layers.append((module, held))
    return survey


def _leaf(module: nn.Module, where: str) -> list[Slot] | None:
    """The parameters of a leaf module the tuner holds for the adapter (an ``nn.Linear`` half, DoRA's magnitude
    layer); None for anything holding buffers or modules of its own."""
    if module._modules or any(b is not None for b in module._buffers.values()):
        return None
    return [(module, name, f"{where}.{name}") for name, p in module._parameters.items() if p is not None]


def _plain_class(kind: type) -> bool:
    """torch's own saving and loading, and not one of peft's wrappers whose keys its loader renames."""
    import torch
    from peft.utils.other import AuxiliaryTrainingWrapper

    base = torch.nn.Module
    return (
        kind._load_from_state_dict is base._load_from_state_dict  # type: ignore[attr-defined]
        and kind._save_to_state_dict is base._save_to_state_dict  # type: ignore[attr-defined]
        and kind.get_extra_state is base.get_extra_state  # type: ignore[attr-defined]
        and kind.set_extra_state is base.set_extra_state  # type: ignore[attr-defined]
        and not issubclass(kind, AuxiliaryTrainingWrapper)
    )


def _hooked(module: nn.Module) -> bool:
    return bool(
        module._load_state_dict_pre_hooks
        or module._load_state_dict_post_hooks
        or module._state_dict_hooks
        or module._state_dict_pre_hooks
    )


def _distributed() -> bool:
    import torch.distributed as dist

    return bool(dist.is_available() and dist.is_initialized())


def _converts_weights(model: PeftModel) -> bool:
    """Whether peft's loader converts the checkpoint for transformers 5's weight conversions (fused experts, ...)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        return False
    try:
        from peft.utils import transformers_weight_conversion
    except ImportError:  # a peft without the conversion (before 0.19)
        return False
    mapping: Any = getattr(transformers_weight_conversion, "get_checkpoint_conversion_mapping", None)
    return mapping is None or mapping(model_type) is not None


def _fits(slots: dict[str, Slot], weights: dict[str, Any], on_meta: bool) -> bool:
    """The file holds exactly the slots' keys, each a plain tensor of the shape of the parameter it fills: a meta
    one to replace (``on_meta``), else a real one to copy into."""
    import torch

    if set(weights) != set(slots):
        return False
    for key, (owner, name, _) in slots.items():
        param = owner._parameters.get(name)
        tensor = weights[key]
        if type(param) is not torch.nn.Parameter or (param.device.type == "meta") is not on_meta:
            return False
        if type(tensor) is not torch.Tensor or tensor.shape != param.shape:
            return False
    return True


def _write(model: PeftModel, survey: _Survey, weights: dict[str, Any], adapter_name: str, on_meta: bool) -> Any:
    """``load_state_dict(weights under the model's keys, strict=False, assign=on_meta)``, then (``on_meta``) each
    tuner layer's ``_move_adapter_to_device_of_base_layer``, as peft's ``set_peft_model_state_dict`` does them. A
    layer whose adapter tensors already have its base weight's device and dtype is left alone: there peft's move is
    ``.to()`` with nothing to change."""
    import torch
    from torch.nn.modules.module import _IncompatibleKeys

    with torch.no_grad():
        for key, (owner, name, _) in survey.slots.items():
            param = owner._parameters[name]
            if on_meta:
                setattr(owner, name, torch.nn.Parameter(weights[key], requires_grad=param.requires_grad))
            else:
                param.copy_(weights[key])
    loaded = {model_key for _, _, model_key in survey.slots.values()}
    missing = [key for key in survey.keys if key not in loaded]
    if on_meta:
        overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
        for layer, held in survey.layers:
            if overwrite or not _in_place(layer, held):
                layer._move_adapter_to_device_of_base_layer(adapter_name)
    return _IncompatibleKeys(missing, [])


def _in_place(layer: Any, held: list[Slot]) -> bool:
    """Whether every tensor the layer holds for the adapter has the device and dtype of its base layer's plain
    floating-point weight (no quantized ``qweight``, no ``compute_dtype``: peft would move to those)."""
    import torch

    base = layer.get_base_layer()
    if isinstance(base, torch.nn.MultiheadAttention) or hasattr(base, "qweight") or hasattr(base, "compute_dtype"):
        return False
    weight = base._parameters.get("weight")
    if type(weight) is not torch.nn.Parameter or not weight.is_floating_point():
        return False
    device, dtype = weight.device, weight.dtype
    for owner, name, _ in held:
        tensor = owner._parameters[name]
        if tensor.device != device or tensor.dtype != dtype:
            return False
    return True


def _full_precision(state: dict[str, Any]) -> bool:
    """No tensor peft's adapter dtype cast would touch (it upcasts half, bfloat16 and smaller floats only)."""
    import torch

    return all(not t.is_floating_point() or t.dtype in (torch.float32, torch.float64) for t in state.values())
