"""Hot-swapping, safely: ``peft.utils.hotswap.hotswap_adapter`` with every check made before a tensor is touched.

peft's hot-swap writes a new LoRA's weights into the tensors of a loaded one (no new modules, so a compiled model
is not recompiled). It checks little and reports nothing typed: a new adapter's ``rank_pattern`` / ``alpha_pattern``
are matched against parameter names, which they never match, so such modules run with the wrong scaling, silently;
a DoRA adapter covering fewer modules zeroes the others' magnitudes (their output becomes zero); and a failure part
way leaves the model half-swapped. Here the new adapter is first planned as a fresh load (its own keys and shapes
against the model), then compared with the loaded adapter (peft's restrictions: LoRA only, not merged, the same
``use_rslora`` / ``lora_dropout`` / ``alpha_pattern`` / ``use_dora``, no module the loaded one lacks, ranks that fit
its tensors), and only then swapped, with the model recorded first and restored on any failure. After the swap each
module's scaling is what a fresh load of the new adapter gives, and every swapped tensor is checked against the file.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from safe_peft._catalog import finding
from safe_peft._keys import LORA_OWN, PEFT_PREFIX, Role, module_of, rank_axis, role_of
from safe_peft._load.adapter_tensors import adapter_tensors, copy_into, takes_in_place
from safe_peft._load.directory import load_directory
from safe_peft._load.driver import Loaded, LoadRoute, Protected, drive
from safe_peft._load.snapshot import ModuleSnapshot, ValueSnapshot
from safe_peft._load.verification import keys_finding, non_finite_finding, scan_values
from safe_peft._plan.options import LoadOptions
from safe_peft._plan.plan import LoadPlan, plan_load
from safe_peft._plan.routes import CarryingRoute, is_peft_model

if TYPE_CHECKING:
    from peft import PeftModel
    from torch import nn

    from safe_peft.report import Diagnosis, LoadReport

__all__ = ["HotSwap", "hotswap_plan", "safe_hotswap_adapter"]


def safe_hotswap_adapter(
    model: nn.Module,
    model_name_or_path: str | os.PathLike[str],
    adapter_name: str = "default",
    torch_device: str | None = None,
    *,
    remap: object = None,
    allow_pickle: bool = False,
    verify_base: bool = True,
    **kwargs: Any,
) -> LoadReport:
    """Swap the weights of the loaded adapter ``adapter_name`` for another's, or fail with an explanation.

    It does what ``peft.utils.hotswap.hotswap_adapter(model, model_name_or_path, adapter_name)`` does. The new
    adapter is checked before any tensor is touched. A failure during the swap restores every tensor and scaling.
    A swap is always strict.

    :param model: a ``PeftModel``, or ``torch.compile`` of one (the point of hot-swapping: no recompilation).
    :param model_name_or_path: the new adapter: a local directory, or a hub id when online.
    :param adapter_name: the loaded adapter whose weights are replaced.
    :param torch_device: as in peft: the device to read the new weights to.
    :param remap: as in :func:`safe_load_adapter`.
    :param allow_pickle: as in :func:`safe_load_adapter`.
    :param verify_base: as in :func:`safe_load_adapter`.
    :param kwargs: ``**kwargs`` go to peft: ``subfolder``, ``token``, ...
    :returns: the :class:`LoadReport` of the swap.
    :raises AdapterLoadError: when the new adapter does not fit the model, or cannot take the loaded one's place
        (cause ``hotswap_incompatible``).

    ```python
    >>> model = safe_load_adapter(make_base(), adapter_dir)
    >>> safe_hotswap_adapter(model, adapter_dir).ok
    True

    ```
    """
    options = LoadOptions(  # always strict: a swap that does not fit is refused
        adapter_name, remap, allow_pickle=allow_pickle, verify_base=verify_base, peft_kwargs=kwargs
    )
    return drive(HotSwap(model, model_name_or_path, options, torch_device)).report


def hotswap_plan(
    model: nn.Module, model_name_or_path: str | os.PathLike[str], options: LoadOptions
) -> tuple[LoadPlan, dict[str, Any]]:
    """The plan of a hot-swap (nothing is touched): the new adapter planned as a fresh load, then compared with the
    loaded one. Returns the plan and what the swap needs (the scalings a fresh load would give, per module)."""
    peft_model, adapter_name = _unwrapped(model), options.adapter_name
    plan = plan_load(peft_model, model_name_or_path, options, CarryingRoute("hotswap"))
    if adapter_name not in peft_model.peft_config:
        loaded = ", ".join(peft_model.peft_config) or "none"
        cause = finding(
            "hotswap_not_loaded",
            f"{type(peft_model).__name__} has no adapter named {adapter_name!r} to swap (it has {loaded}): a hot-swap "
            "replaces the weights of a loaded adapter",
            loaded=loaded,
        )
        return _refused(plan, [cause]), {}
    if not plan.report.ok:
        return plan, {}
    causes, needs = _compare(model, peft_model, plan, adapter_name)
    return (_refused(plan, causes) if causes else plan), needs


@dataclass(frozen=True)
class _Swap:
    """How the swap goes: a copy into the loaded tensors (``in_place``) or peft's own hot-swap."""

    in_place: bool
    names: dict[str, str]  # checkpoint key -> the state-dict key peft's hot-swap gives it
    prefix: str


class HotSwap(LoadRoute):
    """A hot-swap: planned as a fresh load and compared with the loaded adapter (:func:`hotswap_plan`, whose
    findings the route keeps for the swap: one call, one route object), then the loaded tensors and scalings are
    recorded (their values, or the whole model when peft may put new tensors in place), swapped, and checked against
    the file (:meth:`verify`, its own: the swapped tensors may be zero-padded)."""

    def __init__(
        self, model: nn.Module, model_id: str | os.PathLike[str], options: LoadOptions, torch_device: str | None
    ) -> None:
        super().__init__(model, model_id, options)
        self.peft_model, self.torch_device = _unwrapped(model), torch_device
        self.needs: dict[str, Any] = {}

    def plan(self) -> LoadPlan:
        plan, self.needs = hotswap_plan(self.model, self.model_id, self.options)
        return plan

    def protect(self, plan: LoadPlan) -> Protected:
        import torch
        from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING

        peft_model, adapter_name = self.peft_model, self.options.adapter_name
        layers: dict[str, Any] = self.needs["layers"]
        loaded: dict[str, Any] = self.needs["loaded"]
        prefix = PEFT_TYPE_TO_PREFIX_MAPPING[plan.peft_config.peft_type]
        names = _state_names(plan, adapter_name, prefix)
        in_place = _swaps_in_place(peft_model, plan, loaded, layers, names, _compiled(self.model, peft_model))
        scalings = [m.scaling[adapter_name] for m in layers.values()]
        tensor_scalings = [s for s in scalings if isinstance(s, torch.Tensor)]
        if in_place:  # values and scalings change, nothing else (a swap sets no train / eval mode)
            snapshot: ModuleSnapshot | ValueSnapshot = ValueSnapshot(
                peft_model, dicts=[m.scaling for m in layers.values()], modes=False
            )
        else:  # peft may put new tensors in place (a larger rank)
            snapshot = ModuleSnapshot(peft_model)
        snapshot.protect([*loaded.values(), *tensor_scalings])
        return Protected(snapshot, _Swap(in_place, names, prefix))

    def load(self, plan: LoadPlan, protected: Protected, temporary: list[str | None]) -> Loaded:
        from peft.utils.hotswap import _update_scaling, hotswap_adapter_from_state_dict
        from peft.utils.other import infer_device
        from peft.utils.save_and_load import _insert_adapter_name_into_state_dict, load_peft_weights

        swap: _Swap = protected.held
        adapter_name, layers, loaded = self.options.adapter_name, self.needs["layers"], self.needs["loaded"]
        directory, workdir = load_directory(plan, with_config=False)
        temporary.append(workdir)
        device = self.torch_device if self.torch_device is not None else infer_device()
        weights = load_peft_weights(directory, device=device)  # a local directory: the hub arguments served the plan
        if swap.in_place:  # what peft's hot-swap does when every shape matches: copy, then set the scalings
            copy_into(loaded, weights)
            for module, scaling in _peft_scalings(plan.peft_config, swap.names).items():
                _update_scaling(layers[module], adapter_name=adapter_name, scaling=scaling)
        else:
            # peft may swap the tensors it is given into the model (a larger rank): it gets copies, these stay the
            # file's
            given = {k: v.clone() for k, v in weights.items()}
            state = _insert_adapter_name_into_state_dict(given, adapter_name=adapter_name, parameter_prefix=swap.prefix)
            hotswap_adapter_from_state_dict(
                model=self.model,
                state_dict=state,
                adapter_name=adapter_name,
                config=plan.peft_config,
                parameter_prefix=swap.prefix,
            )
        corrected = _correct_scalings(layers, self.needs.get("scalings", {}), adapter_name)
        route = "in_place" if swap.in_place else "peft_hotswap"
        return Loaded(self.peft_model, loaded if swap.in_place else None, route, held=(weights, corrected))

    def verify(self, plan: LoadPlan, loaded: Loaded) -> LoadReport:
        weights, corrected = loaded.held
        report = _verify(self.peft_model, plan, self.options.adapter_name, weights, loaded.state)
        report = replace(report, route=loaded.route)
        if not corrected:
            return report
        module, had, want = corrected[0]
        note = finding(
            "hotswap_scaling_corrected",
            f"peft's hot-swap set {len(corrected)} modules' LoRA scaling from r / lora_alpha alone (e.g. {module}: "
            f"{had:g}); set to what the adapter's rank_pattern / alpha_pattern give ({want:g}), as a fresh load "
            "does",
            details={"modules": [c[0] for c in corrected][:20]},
        )
        return replace(report, warnings=[*report.warnings, note])


def _correct_scalings(
    layers: dict[str, Any], scalings: dict[str, float], adapter_name: str
) -> list[tuple[str, float, float]]:
    """Set each module's scaling to what a fresh load gives; returns (module, had, set) for those that differed."""
    from peft.utils.hotswap import _update_scaling

    corrected = []
    for module, scaling in scalings.items():
        layer = layers.get(PEFT_PREFIX + module)
        if layer is not None and not _close(layer.scaling[adapter_name], scaling):
            corrected.append((module, _value(layer.scaling[adapter_name]), scaling))
            _update_scaling(layer, adapter_name=adapter_name, scaling=scaling)
    return corrected


def _compiled(model: nn.Module, peft_model: PeftModel) -> bool:
    return model is not peft_model or getattr(peft_model, "_compiled_call_impl", None) is not None


def _compare(
    model: nn.Module, peft_model: PeftModel, plan: LoadPlan, adapter_name: str
) -> tuple[list[Diagnosis], dict[str, Any]]:
    """peft's hot-swap restrictions, checked against the loaded adapter as it is. Returns the causes and what the
    swap needs: the scalings a fresh load gives (per module), the loaded adapter's tensors and its LoRA layers."""
    from peft.utils.hotswap import CONFIG_KEYS_TO_CHECK

    old: Any = peft_model.peft_config[adapter_name]
    new: Any = plan.peft_config
    keys_to_check: dict[Any, Any] = dict(CONFIG_KEYS_TO_CHECK)
    if new.peft_type != old.peft_type or old.peft_type not in keys_to_check:
        kinds = {str(getattr(c, "peft_type", "")).rsplit(".", 1)[-1] for c in (old, new)}
        return [
            finding(
                "hotswap_unsupported",
                f"peft hot-swaps {', '.join(str(k).rsplit('.', 1)[-1] for k in keys_to_check)} adapters only; "
                f"these are {' and '.join(sorted(kinds))}",
                details={"peft_types": sorted(kinds)},
            )
        ], {}
    causes, layers = _merged(peft_model, adapter_name)
    old_data, new_data = old.to_dict(), new.to_dict()
    fields = [k for k in keys_to_check[old.peft_type] if old_data.get(k) != new_data.get(k)]
    if fields:
        causes.append(
            finding(
                "hotswap_config_differs",
                "the new adapter computes differently from the loaded one in what a hot-swap cannot change: "
                + ", ".join(f"{k}={new_data.get(k)!r} (loaded: {old_data.get(k)!r})" for k in fields),
                details={"fields": fields},
                fields=" / ".join(fields),
            )
        )
    tensors = adapter_tensors(peft_model, adapter_name, True, layers.items())  # the LoRA layers: all a swap writes
    loaded = {k: tuple(t.shape) for k, t in tensors.items()}
    causes += _key_refusals(new, dict(plan.checkpoint), loaded)
    prepared = any(isinstance(m.scaling[adapter_name], _tensor_type()) for m in layers.values())
    causes += _rank_refusal(plan.checkpoint, loaded, prepared, _compiled(model, peft_model))
    return causes, {"scalings": _scalings(new, plan.checkpoint), "loaded": tensors, "layers": layers}


def _merged(peft_model: PeftModel, adapter_name: str) -> tuple[list[Diagnosis], dict[str, Any]]:
    """One walk: the tuner layers the adapter is merged into (refused), and the LoRA layers a swap writes."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged: list[str] = []
    layers: dict[str, Any] = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, BaseTunerLayer) and adapter_name in module.merged_adapters:
            merged.append(name)
        if isinstance(module, LoraLayer) and adapter_name in module.scaling:
            layers[name] = module
    if not merged:
        return [], layers
    cause = finding(
        "hotswap_merged",
        f"adapter {adapter_name!r} is merged into the base weights ({len(merged)} layers, e.g. {merged[0]}): "
        "swapping merged weights would corrupt the base model when it is unmerged",
        details={"layers": merged[:20]},
    )
    return [cause], layers


def _key_refusals(new: Any, new_keys: dict[str, tuple[int, ...]], loaded: dict[str, tuple[int, ...]]) -> list[Any]:
    """Tensors a swap cannot write: not LoRA's own, in modules the loaded adapter lacks, or (DoRA) modules left out."""
    causes = []
    other = sorted(k for k in new_keys if role_of(k) not in LORA_OWN)
    if other:
        causes.append(
            keys_finding(
                "hotswap_unsupported",
                f"the new adapter carries {len(other)} tensors a hot-swap cannot swap (saved modules or base weights, "
                f"e.g. {other[0]!r}): only LoRA tensors are swapped",
                other,
            )
        )
    lacking = sorted(k for k in new_keys if k not in loaded and k not in other)
    if lacking:
        modules = sorted({module_of(k) for k in lacking})
        causes.append(
            finding(
                "hotswap_new_targets",
                f"the new adapter has {len(lacking)} tensors in {len(modules)} modules the loaded adapter has no such "
                f"tensor in (e.g. {lacking[0]!r}): a hot-swap cannot add LoRA layers",
                details={"keys": lacking[:20], "modules": modules[:20]},
            )
        )
    dora = bool(getattr(new, "use_dora", False))
    dropped = sorted({module_of(k) for k in loaded} - {module_of(k) for k in new_keys}) if dora else []
    if dropped:
        causes.append(
            finding(
                "hotswap_unsupported",
                f"the new DoRA adapter leaves out {len(dropped)} modules of the loaded one (e.g. {dropped[0]}): "
                "peft zeroes their tensors, magnitudes included, which zeroes those layers' outputs",
                details={"modules": dropped[:20]},
            )
        )
    return causes


def _rank_refusal(
    new_keys: dict[str, tuple[int, ...]], loaded: dict[str, tuple[int, ...]], prepared: bool, compiled: bool
) -> list[Any]:
    """A larger rank than the loaded tensors hold, on a compiled or hotswap-prepared model (the shapes must stay)."""
    larger = {}
    for key, shape in new_keys.items():
        axis = rank_axis(role_of(key))
        have = loaded.get(key)
        if axis is None or have is None or len(have) != len(shape) or len(shape) <= axis:
            continue
        if shape[axis] > have[axis]:
            larger[key] = (shape[axis], have[axis])
    if not larger or not (prepared or compiled):
        return []
    key, (want, have_r) = next(iter(larger.items()))
    top = max(w for w, _ in larger.values())
    return [
        finding(
            "hotswap_rank_too_large",
            f"the new adapter's rank is larger than the loaded tensors hold ({len(larger)} tensors, e.g. {key!r}: "
            f"rank {want} into {have_r}) on a {'compiled' if compiled else 'hotswap-prepared'} model: the tensors "
            "would change shape, which breaks the compiled graph",
            details={"keys": sorted(larger)[:20], "rank": top},
            rank=top,
        )
    ]


def _scalings(config: Any, keys: dict[str, tuple[int, ...]]) -> dict[str, float]:
    """Module -> the LoRA scaling a fresh load of ``config`` gives it (peft's injection: patterns by module name)."""
    return {module_of(key): _scaling(config, module_of(key)) for key in keys if role_of(key) is Role.A}


def _scaling(config: Any, name: str) -> float:
    """peft's LoRA scaling for ``name`` (a module's name in a fresh load; a state-dict key in peft's hot-swap): the
    rank and alpha of the first pattern that matches it, else ``r`` and ``lora_alpha``."""
    from peft.utils.other import get_pattern_key

    rank = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), name), config.r)
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), name), config.lora_alpha)
    return float(alpha / math.sqrt(rank) if config.use_rslora else alpha / rank)


def _state_names(plan: LoadPlan, adapter_name: str, prefix: str) -> dict[str, str]:
    """Checkpoint key -> the state-dict key peft's hot-swap gives it (the adapter name inserted)."""
    from peft.utils.save_and_load import _insert_adapter_name_into_state_dict

    keys: dict[str, Any] = {key: key for key in plan.checkpoint}
    named = _insert_adapter_name_into_state_dict(keys, adapter_name, prefix)
    return {str(key): state for state, key in named.items()}


def _peft_scalings(config: Any, names: dict[str, str]) -> dict[str, float]:
    """The scaling peft's ``hotswap_adapter_from_state_dict`` gives each module: per state-dict key, patterns matched
    against the key itself (not the module), the last key of a module winning, as in its loop."""
    return {".".join(state.split(".")[:-3]): _scaling(config, state) for state in names.values()}


def _swaps_in_place(
    peft_model: PeftModel,
    plan: LoadPlan,
    loaded: dict[str, Any],
    layers: dict[str, Any],
    names: dict[str, str],
    compiled: bool,
) -> bool:
    """Whether peft's hot-swap would copy into tensors of the same shape and change nothing else: the only adapter in
    the model (peft zeroes every key holding ``lora_`` and the adapter's name that the new adapter lacks, other
    adapters' keys with the name as a substring included), a peft that copies (before 0.20 it swaps the tensor
    objects of a model that is not compiled), exactly the loaded adapter's LoRA tensors, shape for shape, ordinary
    local tensors, each of a layer peft's hot-swap finds by its key (it takes the module three levels up)."""
    import peft

    from safe_peft._versions import hotswap_copies

    if len(peft_model.peft_config) != 1 or not (compiled or hotswap_copies(peft.__version__)):
        return False
    lora = {k: t for k, t in loaded.items() if role_of(k) in LORA_OWN}
    if not takes_in_place(plan.checkpoint, lora):
        return False
    return all(".".join(names[key].split(".")[:-3]) in layers for key in plan.checkpoint)


def _verify(
    peft_model: PeftModel,
    plan: LoadPlan,
    adapter_name: str,
    weights: dict[str, Any],
    state: dict[str, Any] | None = None,
) -> LoadReport:
    """Every swapped tensor holds the file's values (zero-padded where the rank is smaller), all finite."""
    import torch

    if state is None:
        state = adapter_tensors(peft_model, adapter_name, True)
    wrong = []
    with torch.no_grad():
        for key, new in weights.items():
            have = state.get(key)
            if have is None:
                wrong.append(key)
                continue
            if have.dim() != new.dim() or any(h < n for h, n in zip(have.shape, new.shape, strict=True)):
                wrong.append(key)
                continue
            if have.shape == new.shape:
                same = torch.equal(have, new.to(have.device, have.dtype))
            else:
                padded = torch.zeros_like(have)  # peft pads a smaller rank with zeros
                padded[tuple(slice(0, n) for n in new.shape)] = new.to(have.device, have.dtype)
                same = torch.equal(have, padded)
            if not same:
                wrong.append(key)
    non_finite, _ = scan_values({k: state[k] for k in weights if k in state})
    causes = []
    if non_finite:
        causes.append(non_finite_finding(non_finite))
    elif wrong:
        message = f"after the swap, {len(wrong)} adapter tensors differ from the checkpoint (e.g. {wrong[0]!r})"
        causes.append(keys_finding("verification_failed", message, wrong))
    return replace(plan.report, ok=not causes, causes=causes)


def _unwrapped(model: nn.Module) -> PeftModel:
    inner = model._orig_mod if type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod") else model
    if not is_peft_model(inner):
        raise TypeError(
            f"safe_hotswap_adapter takes a PeftModel (or torch.compile of one), not {type(model).__name__}; load the "
            "first adapter with safe_load_adapter"
        )
    return inner  # type: ignore[return-value]


def _refused(plan: LoadPlan, causes: list[Diagnosis]) -> LoadPlan:
    return replace(plan, report=replace(plan.report, ok=False, causes=[*causes, *plan.report.causes]))


def _tensor_type() -> type:
    import torch

    return torch.Tensor


def _value(scaling: Any) -> float:
    return float(scaling.item()) if hasattr(scaling, "item") else float(scaling)


def _close(scaling: Any, want: float) -> bool:
    return math.isclose(_value(scaling), want, rel_tol=1e-6, abs_tol=1e-9)
