"""Putting a loaded adapter under the sharding of its base model (FSDP2, tensor parallel).

* FSDP2 (``fully_shard``): each tuner layer (``lora.Linear``, ...) becomes an FSDP unit of its own
  on the mesh, mixed-precision and offload policies of the unit that manages its base layer, with
  the base layer's parameters ignored (they stay with their unit). Its weights are then sharded and
  its gradients reduce-scattered like the rest of the model.
* tensor parallel through ``parallelize_module`` (``ColwiseParallel`` / ``RowwiseParallel`` on a
  linear layer): the LoRA half that sees the sharded dimension takes the base layer's own style
  (``lora_B`` of a column-parallel layer, ``lora_A`` of a row-parallel one); the other half stays
  replicated, and autograd all-reduces its gradient.
* tensor parallel through transformers' ``tp_plan``: peft (0.21+) shards the LoRA halves itself.

How the model is sharded, and which layouts are refused before it is touched, is
:mod:`safe_peft._model.sharding`'s part. Placement runs no collective: every rank slices its part locally
(``src_data_rank=None``).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from safe_peft._keys import strip_prefix
from safe_peft._model.sharding import LayerSharding, Sharding, is_dtensor

if TYPE_CHECKING:
    from torch import nn

__all__ = ["finish", "place", "prepare"]


def prepare(model: nn.Module) -> None:
    """Reshard FSDP2 modules left unsharded by an earlier forward, so peft sees (and freezes) the sharded
    parameters themselves. The registered parameters change, the values do not."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def place(model: nn.Module, sharding: Sharding, adapter_name: str) -> list[str]:
    """Put the new adapter weights of every tuner layer under the sharding of its base layer.

    Returns the modules whose adapter could not be placed (empty when all are). Runs no collective.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    unplaced: list[str] = []
    module: Any
    for name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        path = strip_prefix(name)
        layer = sharding.layers.get(path)
        if layer is None:
            continue
        if layer.engine == "fsdp":
            _place_fsdp(module, layer)
        elif layer.engine == "tp":
            _place_tp(module, layer, adapter_name)
        elif layer.engine == "tp_transformers":
            _logical_features(module, layer, adapter_name)
        if not _placed(module, layer, adapter_name):
            unplaced.append(path)
    return unplaced


def _adapter_parameters(module: Any) -> list[tuple[str, Any]]:
    base = {id(p) for p in module.get_base_layer().parameters()}
    return [(n, p) for n, p in module.named_parameters() if id(p) not in base]


def _place_fsdp(module: Any, layer: LayerSharding) -> None:
    from torch.distributed.fsdp import fully_shard

    if not _adapter_parameters(module) or all(is_dtensor(p) for _, p in _adapter_parameters(module)):
        return
    group = layer.fsdp_group
    fully_shard(
        module,
        mesh=group.mesh_info.mesh,
        mp_policy=group.mp_policy,
        offload_policy=group.offload_policy,
        ignored_params=set(module.get_base_layer().parameters()),
    )


def _place_tp(module: Any, layer: LayerSharding, adapter_name: str) -> None:
    from torch.distributed.tensor.parallel import parallelize_module

    half = "lora_B" if layer.style == "colwise" else "lora_A"
    parts = getattr(module, half, None)
    if parts is None or adapter_name not in parts:
        return
    target = parts[adapter_name]
    if is_dtensor(target.weight):
        return
    mesh = module.get_base_layer().weight.device_mesh
    parallelize_module(target, mesh, copy.copy(layer.parallel_style), src_data_rank=None)  # local slices only


def _logical_features(module: Any, layer: LayerSharding, adapter_name: str) -> None:
    """peft (0.21) builds the sharded LoRA half of a tp_plan layer with this rank's local size in
    ``in_features`` / ``out_features``, while transformers' styles read them as the full sizes when they
    wrap a local input or output (training only: inference takes a local fast path), and then fail with
    ``shape '[12, 16]' is invalid``. Set them to the DTensor weight's logical sizes, as the base layer has."""
    half = {"colwise": "lora_B", "rowwise": "lora_A"}.get(layer.style)
    parts = getattr(module, half, None) if half else None
    if parts is None or adapter_name not in parts or not is_dtensor(parts[adapter_name].weight):
        return
    target = parts[adapter_name]
    out_features, in_features = (int(d) for d in target.weight.shape)
    target.in_features, target.out_features = in_features, out_features


def _placed(module: Any, layer: LayerSharding, adapter_name: str) -> bool:
    if layer.engine == "fsdp":
        return all(is_dtensor(p) for _, p in _adapter_parameters(module))
    if layer.engine in {"tp", "tp_transformers"} and layer.style in {"colwise", "rowwise"}:
        half = "lora_B" if layer.style == "colwise" else "lora_A"
        parts = getattr(module, half, None)
        return parts is not None and adapter_name in parts and is_dtensor(parts[adapter_name].weight)
    return layer.engine == "tp_transformers"  # embedding_rowwise: peft shards it inside the layer's forward


def finish(model: nn.Module) -> None:
    """Let FSDP2 take the new units into its root on the next forward.

    FSDP2 finds its units once, at the first forward (lazy init). When that already ran, the new
    units would each act as a root of their own; clearing the lazy-init marks makes the next forward
    collect every unit again (FSDP2 documents that lazy init may be repeated after parameters change).
    """
    try:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPStateContext
    except ImportError:
        return
    states = [m._get_fsdp_state() for m in model.modules() if isinstance(m, FSDPModule)]
    if not any(getattr(s, "_is_root", None) is not None for s in states):
        return
    for state in states:
        if hasattr(state, "_is_root") and hasattr(state, "_state_ctx"):
            state._is_root = None
            state._state_ctx = FSDPStateContext()
