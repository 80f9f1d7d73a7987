"""How a model is sharded (FSDP2, tensor parallel): the survey of its layers, the layouts a sharded model cannot
take, and the views of sharded tensors (their local part, their content digest, a skeleton copy).

Shapes need no translation: a ``DTensor`` parameter reports its full (logical) shape, and so do the
layers' ``in_features`` / ``out_features``, so the plan compares checkpoint shapes with logical ones
as for an unsharded model. Where the new adapter weights must then live is
:mod:`safe_peft._distributed.place`'s part.

Anything the placement cannot do (prompt learning, ``modules_to_save`` copies, a vocabulary resize, DoRA or
embeddings under tensor parallelism, FSDP over tensor parallelism, an unrecognised tensor-parallel style) is
refused here, before the model is touched, with the way that works: load the adapter first, then shard.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from safe_peft._catalog import finding
from safe_peft._keys import strip_prefix
from safe_peft._model.walk import every_parameter
from safe_peft._versions import SHARDED_LOAD_TORCH_SINCE, torch_at_least
from safe_peft.report import Diagnosis

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "LayerSharding",
    "Sharding",
    "content_digest",
    "is_dtensor",
    "is_sharded",
    "local_tensor",
    "sharded_skeleton",
    "sharding_findings",
    "survey",
]

_TRANSFORMERS_STYLES = ("colwise", "rowwise", "embedding_rowwise")  # what peft shards LoRA for
_TORCH_STYLES = "torch.distributed.tensor.parallel.style"  # torch's own styles; look-alikes are not rebuilt


@dataclass(frozen=True)
class LayerSharding:
    """How one module's own parameters are sharded.

    ``engine`` is "fsdp", "tp" (``parallelize_module``), "tp_transformers" (``tp_plan``), "fsdp_tp" (FSDP over
    tensor-parallel parameters) or "unknown"; ``style`` is "colwise" / "rowwise" (or transformers' plan name).
    """

    module: str
    engine: str
    style: str = ""
    placements: str = ""
    parallel_style: Any = field(default=None, compare=False, repr=False)  # the recovered torch ParallelStyle
    fsdp_group: Any = field(default=None, compare=False, repr=False)  # the FSDP param group managing it


@dataclass(frozen=True)
class Sharding:
    """Every module of the model that holds DTensor parameters of its own."""

    layers: dict[str, LayerSharding]
    fsdp: bool

    @property
    def engines(self) -> frozenset[str]:
        return frozenset(layer.engine for layer in self.layers.values())


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a DTensor (cheap: False unless torch's DTensor was imported)."""
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(p, dtensor) for p in every_parameter(model))


def local_tensor(tensor: Any) -> Any:
    """A DTensor's local shard (what this rank holds); any other tensor as it is."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) and is_dtensor(tensor) else tensor


def is_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a torch DTensor (on every supported torch; imports nothing)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def _dtensor_type() -> Any:
    """torch's DTensor class once torch has imported it, else None (imports nothing). It is public as
    ``torch.distributed.tensor.DTensor`` from torch 2.5 on, ``torch.distributed._tensor.DTensor`` before."""
    for name in ("torch.distributed.tensor", "torch.distributed._tensor"):
        cls = getattr(sys.modules.get(name), "DTensor", None)
        if cls is not None:
            return cls
    return None


def survey(model: nn.Module) -> Sharding:
    """How each module of ``model`` is sharded (reads attributes and hooks only; changes nothing)."""
    groups = _fsdp_groups(model)
    layers: dict[str, LayerSharding] = {}
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if is_dtensor(p)]
        if not own:
            continue
        placements = ", ".join(str(tuple(p.placements)) for p in own[:1])
        group = next((groups[id(p)] for p in own if id(p) in groups), None)
        if group is not None:
            mesh = getattr(getattr(group, "mesh_info", None), "mesh", None)
            same = all(p.device_mesh is mesh or p.device_mesh == mesh for p in own)
            layers[name] = LayerSharding(name, "fsdp" if same else "fsdp_tp", "", placements, fsdp_group=group)
            continue
        style, parallel = _torch_style(module, own[0])
        if style:
            layers[name] = LayerSharding(name, "tp", style, placements, parallel_style=parallel)
            continue
        plan = _transformers_plan(model, name)
        engine = "tp_transformers" if plan else "unknown"
        layers[name] = LayerSharding(name, engine, plan or "", placements)
    return Sharding(layers, bool(groups))


def _fsdp_groups(model: nn.Module) -> dict[int, Any]:
    """id(sharded parameter) -> the FSDP2 parameter group that manages it."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return {}
    groups: dict[int, Any] = {}
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        state = module._get_fsdp_state()
        groups_of_state = getattr(state, "_fsdp_param_groups", None)
        if groups_of_state is None:  # torch <= 2.10 keeps one group per state (later: a list, and this a property)
            single = getattr(state, "_fsdp_param_group", None)
            groups_of_state = [single] if single is not None else []
        for group in groups_of_state:
            for fsdp_param in group.fsdp_params:
                groups[id(fsdp_param.sharded_param)] = group
    return groups


def _torch_style(module: nn.Module, weight: Any) -> tuple[str, Any]:
    """The ``ColwiseParallel`` / ``RowwiseParallel`` that ``parallelize_module`` applied to a linear layer.

    torch keeps no record of the style, only the hooks it registered: lambdas that close over
    ``functools.partial(<Style>._prepare_input_fn, input_layouts, ...)`` and
    ``partial(<Style>._prepare_output_fn, output_layouts, use_local_output)``. The style is rebuilt from
    those arguments and accepted only when the weight's placement is the one that style gives.
    """
    import functools

    from torch import nn
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    def partials(hooks: Mapping[Any, Any], suffix: str) -> list[tuple[str, tuple[Any, ...]]]:
        found = []
        for hook in hooks.values():
            for cell in getattr(hook, "__closure__", None) or ():
                try:
                    value = cell.cell_contents
                except ValueError:  # an empty cell
                    continue
                if isinstance(value, functools.partial) and getattr(value.func, "__module__", "") == _TORCH_STYLES:
                    owner, _, name = getattr(value.func, "__qualname__", "").rpartition(".")
                    if name == suffix:
                        found.append((owner, tuple(value.args)))
        return found

    inputs = partials(module._forward_pre_hooks, "_prepare_input_fn")
    outputs = partials(module._forward_hooks, "_prepare_output_fn")
    if len(inputs) != 1 or len(outputs) != 1 or inputs[0][0] != outputs[0][0] or not isinstance(module, nn.Linear):
        return "", None
    owner = inputs[0][0]
    expected_dim = {"ColwiseParallel": 0, "RowwiseParallel": 1}.get(owner)
    placements = tuple(weight.placements)
    if expected_dim is None or len(placements) != 1 or placements[0] != Shard(expected_dim):
        return "", None
    try:
        (input_layouts, _), (output_layouts, use_local_output) = inputs[0][1][:2], outputs[0][1][:2]
        cls = ColwiseParallel if owner == "ColwiseParallel" else RowwiseParallel
        style = cls(input_layouts=input_layouts[0], output_layouts=output_layouts[0], use_local_output=use_local_output)
    except (TypeError, ValueError, IndexError):
        return "", None
    style.src_data_rank = None  # every rank holds the whole adapter: slice locally, no scatter
    return ("colwise" if owner == "ColwiseParallel" else "rowwise"), style


def _transformers_plan(model: nn.Module, name: str) -> str | None:
    """transformers' ``tp_plan`` entry for module ``name`` (layer numbers as ``*``), if the model has one."""
    import re

    plan = getattr(model, "tp_plan", None) or getattr(model, "_tp_plan", None)
    if not isinstance(plan, Mapping) or getattr(model, "_device_mesh", None) is None:
        return None
    generic = re.sub(r"\.\d+(\.|$)", lambda m: ".*" + m.group(1), name)
    value = plan.get(generic)
    return str(value) if value is not None else None


def _peft_shards_transformers_tp() -> bool:
    """Whether the installed peft shards LoRA layers by transformers' ``tp_plan`` itself (peft >= 0.21)."""
    try:
        from peft.import_utils import is_transformers_dtensor_tp
        from peft.tuners.lora import model as lora_model
    except ImportError:
        return False
    return bool(is_transformers_dtensor_tp) and hasattr(lora_model, "add_lora_tp_hooks_dtensor")


# --- before loading: what can be placed --------------------------------------------------------------------


def sharding_findings(
    model: nn.Module,
    config: Any,
    expected: Mapping[str, Any],
    repair: tuple[str, ...],
    checkpoint: Mapping[str, Any] | None = None,
    torch_version: str | None = None,
) -> list[Diagnosis]:
    """Why an adapter with ``config`` (and the ``checkpoint`` keys) cannot be loaded into this sharded ``model``
    (empty: it can).

    ``expected`` is the model view's expected keys (``ExpectedKey`` with ``module`` and ``role``);
    ``torch_version`` the torch whose APIs would place the adapter (default: the installed one).
    Pure: reads the model's parameters and hooks, and changes nothing.
    """
    if not is_sharded(model):
        return []
    if torch_version is None:
        import torch

        torch_version = str(torch.__version__)
    if not torch_at_least(torch_version, SHARDED_LOAD_TORCH_SINCE):
        return [
            finding(
                "load_before_sharding",
                f"loading an adapter into a sharded model needs torch >= {SHARDED_LOAD_TORCH_SINCE} (fully_shard's "
                f"ignored_params, parallelize_module's src_data_rank); this is torch {torch_version}",
                fix=_load_first_fix(Sharding({}, True), [], "default"),
                details={"torch": torch_version, "needs_torch": f">= {SHARDED_LOAD_TORCH_SINCE}"},
            )
        ]
    sharding = survey(model)
    peft_type = str(getattr(getattr(config, "peft_type", None), "value", getattr(config, "peft_type", "")))
    is_lora = peft_type.upper().endswith("LORA") and not peft_type.upper().endswith("ADALORA")
    reasons: list[str] = []
    tp_modules: list[tuple[str, str]] = []
    if getattr(config, "is_prompt_learning", False):
        reasons.append(f"{peft_type} keeps its virtual tokens outside the sharded modules")
    heads = sorted({e.module for e in expected.values() if e.role == "modules_to_save"})
    if heads:
        reasons.append(f"modules_to_save copies ({', '.join(heads[:3])}) would be unmanaged copies of sharded weights")
    if getattr(config, "trainable_token_indices", None):
        reasons.append("trainable_token_indices edits rows of the sharded embeddings")
    if "vocab" in repair:
        reasons.append("repair=('vocab',) would resize sharded embeddings")
    written = sorted(k for k in checkpoint or () if k in expected and expected[k].role == "embedding_base")
    if written:
        reasons.append(f"the adapter carries base embedding weights to write into sharded ones (e.g. {written[0]!r})")
    if getattr(config, "use_dora", False):
        reasons.append("DoRA computes its magnitude from the full base weight when peft injects it")
    owners = {name for name, m in model.named_modules() if next(m.parameters(recurse=False), None) is not None}
    targets = sorted(
        {_owner(k, owners) for k, e in expected.items() if e.role not in {"modules_to_save", "embedding_base"}} - {""}
    )
    for module in targets:
        layer = sharding.layers.get(module)
        if layer is None:
            if sharding.fsdp:
                reasons.append(f"{module} is not managed by FSDP (its parameters are plain tensors)")
            continue
        if layer.engine == "fsdp":
            continue
        if layer.engine in {"tp", "tp_transformers"}:
            tp_modules.append((module, layer.style))
            why = _tp_refusal(layer, config, is_lora)
        elif layer.engine == "fsdp_tp":
            why = "FSDP over tensor-parallel parameters (a 2-D mesh) is not placed by safe_peft"
        else:
            why = f"its parameters are DTensors ({layer.placements}) sharded by a method safe_peft does not recognise"
        if why:
            reasons.append(f"{module}: {why}")
    if not reasons:
        return []
    engines = sorted(sharding.engines)
    return [
        finding(
            "load_before_sharding",
            f"this adapter cannot be placed on the sharded model ({', '.join(engines)}): {reasons[0]}"
            + (f" (and {len(reasons) - 1} more)" if len(reasons) > 1 else ""),
            fix=_load_first_fix(sharding, tp_modules, getattr(config, "adapter_name", None) or "default"),
            details={"engines": engines, "reasons": reasons[:20]},
        )
    ]


def _owner(key: str, owners: set[str]) -> str:
    """The base module an adapter key belongs to: the longest prefix of its path that owns parameters."""
    parts = strip_prefix(key).split(".")
    for end in range(len(parts) - 1, 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in owners:
            return candidate
    return ""


def _tp_refusal(layer: LayerSharding, config: Any, is_lora: bool) -> str:
    if not is_lora:
        return "only LoRA adapters are placed on tensor-parallel layers"
    if layer.engine == "tp" and layer.style not in {"colwise", "rowwise"}:
        return f"the layer's tensor-parallel style ({layer.style or 'unknown'}) is not one safe_peft places"
    if layer.engine == "tp_transformers":
        if not _peft_shards_transformers_tp():
            return "the installed peft does not shard LoRA by transformers' tp_plan (peft >= 0.21 does)"
        if layer.style not in _TRANSFORMERS_STYLES:
            return f"peft does not shard LoRA for the tp_plan style {layer.style!r}"
    return ""


def _load_first_fix(sharding: Sharding, tp_modules: list[tuple[str, str]], adapter_name: str) -> str:
    if not tp_modules or sharding.fsdp:
        return (
            "load the adapter into the model before sharding it, then shard the PeftModel: "
            "model = safe_load_adapter(base_model, adapter); for layer in model.base_model.model.model.layers: "
            "fully_shard(layer); fully_shard(model). FSDP2 then shards and reduces the adapter with each layer."
        )
    module, style = tp_modules[0]
    half = "lora_B" if style.startswith("colwise") else "lora_A"
    cls = "ColwiseParallel" if style.startswith("colwise") else "RowwiseParallel"
    upgrade = (
        "upgrade peft (0.21 and later shard LoRA by transformers' tp_plan), or "
        if "tp_transformers" in sharding.engines and not _peft_shards_transformers_tp()
        else ""
    )
    return (
        f"{upgrade}load the adapter into the unsharded model first, then parallelize the PeftModel with a plan "
        f"that names the LoRA parts: {{'{module}.base_layer': {cls}(), '{module}.{half}.{adapter_name}': {cls}()}} "
        "(column-parallel layers shard lora_B, row-parallel layers lora_A), applied to model.base_model.model."
    )


def content_digest(tensors: Mapping[str, Any]) -> str:
    """A digest of the replicated (non-DTensor) adapter tensors' bytes: equal on every rank that read the same
    adapter. DTensor shards differ by design and are left out."""
    import hashlib

    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key]
        if is_dtensor(tensor) or tensor.device.type == "meta":
            continue
        digest.update(key.encode())
        digest.update(_bytes(tensor))
    return digest.hexdigest()


def _bytes(tensor: torch.Tensor) -> bytes:
    import torch

    flat = tensor.detach().reshape(-1).cpu().contiguous()
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    return bytes(flat.numpy().tobytes())


# --- a meta skeleton of a sharded model --------------------------------------------------------------------


def sharded_skeleton(model: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """``copy.deepcopy(model, memo)`` for a sharded model: FSDP2 classes, states and hooks left out.

    FSDP2 forbids deep copies of its modules, so their original classes are put back for the copy's
    duration (and restored). Hook dicts and FSDP / composable states are memoised as empty, the device
    mesh as None (peft must not shard the skeleton). The caller's ``memo`` maps parameters to meta tensors.
    """
    from collections import OrderedDict

    try:
        from torch.distributed._composable.contract import REGISTRY_KEY, STATE_KEY
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return copy.deepcopy(model, memo)
    hook_dicts = (
        "_forward_pre_hooks",
        "_forward_hooks",
        "_forward_pre_hooks_with_kwargs",
        "_forward_hooks_with_kwargs",
        "_forward_hooks_always_called",
        "_backward_pre_hooks",
        "_backward_hooks",
        "_state_dict_hooks",
        "_state_dict_pre_hooks",
        "_load_state_dict_pre_hooks",
        "_load_state_dict_post_hooks",
    )
    swapped: list[tuple[nn.Module, type]] = []
    for module in model.modules():
        state = module.__dict__
        for name in hook_dicts:
            value = state.get(name)
            if isinstance(value, dict):
                memo[id(value)] = OrderedDict() if isinstance(value, OrderedDict) else {}
        for name in (STATE_KEY, REGISTRY_KEY):
            if name in state:
                memo[id(state[name])] = {}
        if state.get("_device_mesh") is not None:
            memo[id(state["_device_mesh"])] = None
        if "forward" in state:  # transformers' tensor parallelism replaces forward on the instance
            memo[id(state["forward"])] = None
        if isinstance(module, FSDPModule):
            cls = type(module)
            swapped.append((module, cls))
            module.__class__ = cls.__mro__[getattr(cls, "_orig_cls_mro_index", 2)]
    try:
        skeleton = copy.deepcopy(model, memo)
    finally:
        for module, cls in swapped:
            module.__class__ = cls
    for module in skeleton.modules():  # instance-level forward overrides were memoised to None
        if "forward" in module.__dict__ and module.__dict__["forward"] is None:
            del module.__dict__["forward"]
    return skeleton
