"""Meta-device copies of a model, and peft's injection of an adapter config into one.

A skeleton (:func:`meta_skeleton`) has the model's structure with meta tensors for parameters and buffers (nothing
copied, the model untouched), or real stand-ins for the modules a method's initialisation reads. The view
(:mod:`safe_peft._model.view`) injects a config into it to list the keys and shapes the model expects; the loader
builds an adapter's tensors on meta in this thread only (:func:`on_meta_here`).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

__all__ = ["injected", "meta_skeleton", "on_meta", "on_meta_here", "value_free_shapes"]


def meta_skeleton(model: nn.Module, real: frozenset[str] = frozenset(), seed: int = 0) -> nn.Module:
    """A structural copy of ``model`` whose parameters and buffers are meta tensors.

    No tensor data is copied, and the original (its parameters' ``requires_grad`` included)
    is never touched. Accelerate hooks are left out. The modules named in ``real`` get real
    CPU tensors instead: a clone of their values (random values of a fixed seed when the
    model itself is on meta), for peft methods whose initialisation reads the base weights.
    """
    import torch

    memo: dict[int, Any] = {}
    generator = torch.Generator().manual_seed(seed)

    def stand_in(tensor: torch.Tensor, materialize: bool) -> torch.Tensor:
        if not materialize:
            return torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
        if tensor.device.type != "meta":
            return tensor.detach().to("cpu", copy=True)
        if tensor.is_floating_point() and seed % 2 and tensor.dim() == 2:
            # a second stand-in of another structure (nearly rank one): a shape that depends on the weights'
            # spectrum (AdaMSS' subspaces) differs from the full-rank one's, so it is found and left open
            rows = torch.randn((tensor.shape[0], 1), generator=generator)
            cols = torch.randn((1, tensor.shape[1]), generator=generator)
            noise = torch.randn(tensor.shape, generator=generator)
            return (rows @ cols + 1e-2 * noise).to(tensor.dtype)
        if tensor.is_floating_point():
            return torch.randn(tensor.shape, generator=generator).to(tensor.dtype)
        return torch.zeros(tensor.shape, dtype=tensor.dtype)

    for name, module in model.named_modules():
        hook = module.__dict__.get("_hf_hook")
        if hook is not None:
            memo[id(hook)] = None
        materialize = name in real
        for param in module._parameters.values():
            if param is not None and id(param) not in memo:
                memo[id(param)] = torch.nn.Parameter(stand_in(param, materialize), requires_grad=param.requires_grad)
        for buf in module._buffers.values():
            if buf is not None and id(buf) not in memo:
                memo[id(buf)] = stand_in(buf, materialize)
    from safe_peft._model.sharding import is_sharded, sharded_skeleton  # hook: FSDP2 modules refuse deepcopy

    return sharded_skeleton(model, memo) if is_sharded(model) else copy.deepcopy(model, memo)


def injected(
    model: nn.Module, config: Any, adapter_name: str, real: frozenset[str] = frozenset(), seed: int = 0
) -> tuple[dict[str, Any], dict[str, Any]]:
    """peft's injection of ``config`` into a skeleton of ``model`` (:func:`meta_skeleton`, with the modules in
    ``real`` real): the adapter's state dict, and what peft adds to it when it saves the embedding layers too."""
    import contextlib

    from peft import PeftModel, get_peft_model_state_dict
    from peft.auto import MODEL_TYPE_TO_PEFT_MODEL_MAPPING

    peft_cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(str(config.task_type or ""), PeftModel)
    skeleton = meta_skeleton(model, real, seed)
    # A model that already carries adapters has peft's `peft_config` attribute: on the copy, peft would take it
    # for a second adapter and warn ("Already found a `peft_config` attribute"), a notice plain peft's load of
    # this adapter does not give. The copy only has to show which keys this adapter's injection makes.
    skeleton.__dict__.pop("peft_config", None)
    _quiet_checkpointing_flag(skeleton)
    # The adapter's tensors are built on meta by a torch function mode, which is thread-local, never by peft's
    # low_cpu_mem_usage, which patches nn.Module.register_parameter for the whole process (another thread's
    # load would get meta tensors), nor by `with torch.device("meta")`, which also sets the module-global
    # torch.utils._device.CURRENT_DEVICE (overlapping threads can leave it on meta). No warnings filter is
    # touched: Python < 3.14 has none per thread (docs/security.md).
    # With real targets, the adapter's own (small) tensors are real too: some methods index them on save.
    with on_meta_here() if not real else contextlib.nullcontext():
        peft_model = peft_cls(skeleton, copy.deepcopy(config), adapter_name, low_cpu_mem_usage=False)
    state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name, save_embedding_layers=False)
    # what peft adds when it saves the embedding layers too (resized vocabularies): the base weights under
    # base_layer. / token_adapter.base_layer., a tied head's entries, ... asked of peft itself, only of a model
    # where peft looks for them (elsewhere it finds none and warns: a notice the load itself does not give)
    extra: dict[str, Any] = {}
    if hasattr(peft_model, "get_input_embeddings"):
        try:
            extra = get_peft_model_state_dict(peft_model, adapter_name=adapter_name, save_embedding_layers=True)
        except Exception:  # noqa: BLE001 - a model peft cannot find embeddings in saves none
            pass
    return state, extra


_QUIET: dict[type, type] = {}  # model class -> its subclass for skeletons (see _quiet_checkpointing_flag)


def _quiet_checkpointing_flag(skeleton: nn.Module) -> None:
    """peft reads ``model.is_gradient_checkpointing``, which transformers 5 deprecates with a FutureWarning: its
    load of this adapter gives that notice once, and the copy would give it again. On the copy only, the flag is
    read through its new name (a subclass made for skeletons; the user's model and its class are untouched)."""
    cls = type(skeleton)
    if not isinstance(getattr(cls, "is_gradient_checkpointing", None), property) or not hasattr(
        cls, "is_activation_checkpointing"
    ):
        return
    quiet = _QUIET.get(cls)
    if quiet is None:
        flag = property(lambda self: self.is_activation_checkpointing)
        quiet = _QUIET.setdefault(cls, type(cls.__name__, (cls,), {"is_gradient_checkpointing": flag}))
    skeleton.__class__ = quiet


def on_meta_here() -> Any:
    """A context in which torch's factory functions called without a device build meta tensors, in this thread
    only (a torch function mode: the mode stack is per thread) and changing no module-level state."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._device import _device_constructors

    constructors = _device_constructors()

    class _Meta(TorchFunctionMode):
        def __torch_function__(
            self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
        ) -> Any:
            kwargs = kwargs or {}
            if func in constructors and kwargs.get("device") is None:
                kwargs["device"] = "meta"
            return func(*args, **kwargs)

    return _Meta()


def on_meta(model: nn.Module, names: frozenset[str]) -> bool:
    return any(
        p.device.type == "meta" for name, m in model.named_modules() if name in names for p in m.parameters(False)
    )


def value_free_shapes(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """Shapes from two injections with different stand-in values: a dimension that differs depends on the
    weights' values (AdaMSS' subspaces), so it becomes ``ANY``, and so does that dimension of every tensor of the
    same kind (the same name after its module, list indices blurred: two samples need not differ on each); what agrees
    everywhere is checked as usual."""
    from safe_peft._keys import ANY, module_of

    def kind(key: str) -> str:  # the name after the module, list indices blurred: adamss_B.0 and adamss_B.3 alike
        module = module_of(key)
        return re.sub(r"\.\d+(?=\.|$)", ".#", key[len(module) :] if module and key.startswith(module) else key)

    varying: dict[str, set[int]] = {}
    for key, tensor in first.items():
        other = second.get(key)
        if other is None or len(other.shape) != len(tensor.shape):
            continue
        axes = {i for i, (a, b) in enumerate(zip(tuple(tensor.shape), tuple(other.shape), strict=True)) if a != b}
        if axes:
            varying.setdefault(kind(key), set()).update(axes)
    shapes = {}
    for key, tensor in first.items():
        axes = varying.get(kind(key), set())
        shapes[key] = _Shaped(tuple(ANY if i in axes else d for i, d in enumerate(tuple(tensor.shape))))
    return shapes


@dataclass(frozen=True)
class _Shaped:
    shape: tuple[int, ...]
