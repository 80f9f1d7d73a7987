"""What a model expects from an adapter: every key it would load, with its shape.

Keys are in the checkpoint's own namespace (``base_model.model.<module>.lora_A.weight``, no
adapter-name infix), so they compare directly with the keys of a saved adapter file.

Two ways to compute them, both without touching the caller's model:

* analytic, for LoRA on ``nn.Linear``, ``nn.Embedding`` and transformers' ``Conv1D``: peft's
  own matching (``check_target_module_exists``, ``_maybe_include_all_linear_layers``,
  ``get_pattern_key``) decides the targets; shapes follow from the layers. It reads only the
  module tree, so a 70B-parameter meta model takes milliseconds.
* by injection, for everything else: peft injects the adapter into a meta-device skeleton of
  the model (parameters replaced by meta tensors, nothing copied) and
  ``get_peft_model_state_dict`` lists the keys.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from safe_peft._catalog import finding
from safe_peft._keys import PEFT_PREFIX, Role, lora_key, pattern_key, pattern_keys, role_of
from safe_peft._model.meta import injected, on_meta, value_free_shapes
from safe_peft._model.walk import every_module, named_modules
from safe_peft._versions import TASK_HEADS
from safe_peft.errors import RAISED, raised_by
from safe_peft.report import Diagnosis

if TYPE_CHECKING:
    from torch import nn

__all__ = ["ExpectedKey", "ModelView", "expected_keys", "has_weight_conversions"]

# Prompt-learning methods whose virtual tokens are key/value states (token_dim = head_dim x the KV heads)
_KV_PROMPTS = ("PREFIX_TUNING", "CARTRIDGE")
# Config features whose tensors peft's injection leaves out on the meta device (created at the first forward on a
# real device: MonteCLoRA's sampler), and methods whose initialisation computes from the base weights and so fails
# on meta (SHiRA's mask, FRoD's and AdaMSS' decompositions): the view injects them with the targeted modules real
# at once, without a first attempt on meta.
_DEFERRED_ON_META = ("monteclora_config",)
_COMPUTED_FROM_WEIGHTS = frozenset({"SHIRA", "FROD", "ADAMSS"})


class _DeferredOnMeta(Exception):
    """The config's injection on meta would fail or leave tensors out (see ``_DEFERRED_ON_META``)."""


# Config features the analytic path does not model; any of them sends the computation to injection.
_INJECTION_ONLY = (
    "target_parameters",
    "trainable_token_indices",
    "layer_replication",
    "alora_invocation_tokens",
    "arrow_config",
    "megatron_config",
    "ensure_weight_tying",
    "use_qalora",
)


@dataclass(frozen=True)
class ExpectedKey:
    """One key the model would load. ``required=False`` marks keys peft saves only sometimes
    (the base embedding weights written by ``save_embedding_layers``)."""

    key: str
    shape: tuple[int, ...]
    module: str
    role: Role
    required: bool = True


@dataclass(frozen=True)
class ModulePort:
    """A leaf layer's kind and its input / output sizes, for naming the dimension that differs."""

    kind: str
    in_features: int
    out_features: int


@dataclass(frozen=True)
class ModelView:
    """The expected keys and the facts about the model the diagnosis reasons with."""

    model_class: str
    expected: dict[str, ExpectedKey]
    layers: dict[str, ModulePort]
    module_names: frozenset[str]
    base_model_prefix: str
    task_heads: tuple[str, ...]
    method: str
    error: Diagnosis | None = None


def expected_keys(model: nn.Module, config: Any, adapter_name: str = "default") -> ModelView:
    """Compute what ``model`` expects from an adapter with ``config``. Never modifies ``model``."""
    layers, names = _survey(model)
    common: dict[str, Any] = {
        "model_class": type(model).__name__,
        "layers": layers,
        "module_names": names,
        "base_model_prefix": str(getattr(model, "base_model_prefix", "") or ""),
        "task_heads": TASK_HEADS.get(str(getattr(config, "task_type", None) or "").split(".")[-1], ()),
    }
    analytic = _analytic(model, config, common["task_heads"]) if _analytic_applies(model, config) else None
    if analytic is not None:
        expected, error = analytic
        return ModelView(expected=expected, method="analytic", error=error, **common)
    expected, error = _by_injection(model, config, adapter_name)
    if error is None and getattr(config, "is_prompt_learning", False):
        error = _prompt_dimensions(model, config)
    return ModelView(expected=expected, method="injection", error=error, **common)


def _prompt_dimensions(model: nn.Module, config: Any) -> Diagnosis | None:
    """Prompt-learning configs carry the training model's sizes; compare them with this model's."""
    model_config = getattr(model, "config", None)
    getter = getattr(model, "get_input_embeddings", None)
    embeddings = getter() if callable(getter) else None
    hidden = getattr(embeddings, "embedding_dim", None) or getattr(model_config, "hidden_size", None)
    widths = {hidden}
    if str(getattr(config, "peft_type", "")).split(".")[-1] in _KV_PROMPTS and hidden:
        heads = getattr(model_config, "num_attention_heads", None)
        kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
        if heads:  # prefix tuning stores the key/value width: head_dim x the KV heads
            widths.add(hidden // heads * kv_heads)
    layers = getattr(model_config, "num_hidden_layers", None)
    sizes: dict[str, tuple[Any, set[Any]]] = {"token_dim": (hidden, widths), "num_layers": (layers, {layers})}
    for name, (actual, allowed) in sizes.items():
        saved = getattr(config, name, None)
        if saved is not None and actual is not None and saved not in allowed:
            return finding(
                "dimension_mismatch",
                f"the adapter was trained with {name}={saved}, but {type(model).__name__} has {actual}: its virtual "
                "tokens cannot be fed to this model",
                details={"field": name, "adapter": saved, "model": actual},
                base=getattr(config, "base_model_name_or_path", None),
            )
    return None


def _survey(model: nn.Module) -> tuple[dict[str, ModulePort], frozenset[str]]:
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    layers = {}
    names = []
    for name, module in named_modules(model):
        names.append(name)
        if isinstance(module, nn.Linear):
            layers[name] = ModulePort("linear", module.in_features, module.out_features)
        elif isinstance(module, Conv1D):
            in_f, out_f = module.weight.shape
            layers[name] = ModulePort("conv1d", int(in_f), int(out_f))
        elif isinstance(module, nn.Embedding):
            layers[name] = ModulePort("embedding", module.num_embeddings, module.embedding_dim)
    return layers, frozenset(names)


def _analytic_applies(model: nn.Module, config: Any) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import PeftType

    if config.peft_type != PeftType.LORA or getattr(config, "bias", "none") != "none":
        return False
    if any(getattr(config, name, None) for name in _INJECTION_ONLY) or _variant_beyond_dora(config):
        return False
    if any(isinstance(m, BaseTunerLayer) for m in every_module(model)):
        return False  # the model already carries adapters: let peft itself work out what is new
    return not has_weight_conversions(model)


def _variant_beyond_dora(config: Any) -> bool:
    """Whether the config asks for a LoRA variant other than DoRA (KaSA, VeLoRA, MonteCLoRA, BD-LoRA, MiCA, ...),
    whose extra tensors and shapes only injection knows: read from peft's own declaration of its variants (the
    field metadata ``is_lora_variant``, and ``lora_variants`` for the values of ``init_lora_weights``)."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name, None)
        if field.metadata.get("is_lora_variant") and field.name != "use_dora" and value:
            return True
        if isinstance(value, str) and value in (field.metadata.get("lora_variants") or ()):
            return True
    return False


def has_weight_conversions(model: nn.Module) -> bool:
    """Whether transformers 5 registers an architecture-level weight conversion (MoE fusing, VLM moves).

    peft then rewrites the config and the checkpoint keys for this model; only injection follows that.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        return False
    try:
        from peft.utils import transformers_weight_conversion as conversion
    except ImportError:
        return False
    lookup: Any = getattr(conversion, "get_checkpoint_conversion_mapping", None)
    return lookup is not None and lookup(model_type) is not None


def _analytic(
    model: nn.Module, config: Any, task_heads: tuple[str, ...]
) -> tuple[dict[str, ExpectedKey], Diagnosis | None] | None:
    from peft.tuners.tuners_utils import _ExcludedModule, _maybe_include_all_linear_layers, check_target_module_exists
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    cfg: Any = copy.copy(config)
    cfg.target_modules = copy.copy(config.target_modules)
    if cfg.target_modules is None:  # peft fills the default targets of the model type
        from safe_peft._model.defaults import default_targets

        cfg.target_modules = default_targets(model, cfg)
    saved = list(config.modules_to_save or [])
    cfg.modules_to_save = (saved + list(task_heads)) if (saved or task_heads) else None
    cfg = _maybe_include_all_linear_layers(cfg, model)
    use_dora = bool(getattr(cfg, "use_dora", False))
    lora_bias = bool(getattr(cfg, "lora_bias", False))
    expected: dict[str, ExpectedKey] = {}
    targeted: list[str] = []
    rank_keys = pattern_keys(cfg.rank_pattern)
    for name, module in named_modules(model):
        if not name:
            continue
        found = check_target_module_exists(cfg, name)
        if not found or isinstance(found, _ExcludedModule):
            continue
        rank = cfg.rank_pattern.get(pattern_key(rank_keys, name), cfg.r)
        if isinstance(module, (nn.Linear, Conv1D)):
            if isinstance(module, Conv1D):
                in_f, out_f = (int(d) for d in module.weight.shape)
            else:
                in_f, out_f = module.in_features, module.out_features
            keys: list[tuple[str, tuple[int, ...]]] = [
                (lora_key(name, "lora_A"), (rank, in_f)),
                (lora_key(name, "lora_B"), (out_f, rank)),
            ]
            if lora_bias:
                keys.append((lora_key(name, "lora_B", "bias"), (out_f,)))
        elif isinstance(module, nn.Embedding):
            in_f, out_f = module.num_embeddings, module.embedding_dim
            keys = [
                (lora_key(name, "lora_embedding_A"), (rank, in_f)),
                (lora_key(name, "lora_embedding_B"), (out_f, rank)),
            ]
            if lora_bias:
                return None
        else:
            return None  # a layer type this path does not model (conv, quantized, custom): use injection
        if use_dora:
            keys.append((lora_key(name, "lora_magnitude_vector"), (out_f,)))
        for key, shape in keys:
            expected[key] = ExpectedKey(key, tuple(shape), name, role_of(key) or Role.OTHER)
        targeted.append(name)
    if not targeted and cfg.target_modules:
        return {}, _no_target_found(cfg.target_modules)  # peft raises NoMatchingPeftModuleError here
    saved_modules = set()
    for name, module in _modules_to_save(model, cfg.modules_to_save or []):
        saved_modules.add(name)
        for pname, tensor in module.state_dict(keep_vars=True).items():  # buffers too (BatchNorm statistics)
            key = f"{PEFT_PREFIX}{name}.{pname}"
            expected[key] = ExpectedKey(key, tuple(tensor.shape), name, Role.SAVED_MODULE)
    _add_embedding_layers(model, expected, set(targeted), saved_modules)
    return expected, None


def _modules_to_save(model: nn.Module, names: list[str]) -> Iterator[tuple[str, nn.Module]]:
    if not names:
        return
    taken: list[str] = []
    for key, module in model.named_modules(remove_duplicate=False):
        if key and any(key.endswith(target) for target in names):
            if any(key.startswith(t + ".") for t in taken):
                continue
            taken.append(key)
            yield key, module


def _embedding_layers(model: nn.Module) -> list[nn.Module]:
    getters = [getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)]
    layers = []
    for getter in getters:
        try:
            layer = getter() if callable(getter) else None
        except (NotImplementedError, AttributeError):
            layer = None
        if layer is not None:
            layers.append(layer)
    return layers


def _embedding_parameters(model: nn.Module) -> list[tuple[str, Any]]:
    """(name, parameter) of the input and output embedding layers' own parameters."""
    layers = _embedding_layers(model)
    return [
        (f"{name}.{pname}", param)
        for name, module in named_modules(model)
        if any(module is layer for layer in layers)
        for pname, param in module.named_parameters()
    ]


def _add_embedding_layers(
    model: nn.Module, expected: dict[str, ExpectedKey], targeted: set[str], saved: set[str]
) -> None:
    """peft also saves the embedding layers' whole state when embeddings were targeted or resized: every entry under
    the layer's name, adapter name removed. When a LoRA targets an embedding, only the targeted ones, whose weight
    then sits under ``base_layer.``; otherwise every embedding layer, where a saved module (``modules_to_save``) is
    wrapped, so its copy and the original sit under ``modules_to_save.`` and ``original_module.`` (beside the saved
    module's own key)."""
    parameters = _embedding_parameters(model)
    any_targeted = any(name.rpartition(".")[0] in targeted for name, _ in parameters)
    for name, param in parameters:
        module, _, pname = name.rpartition(".")
        if any_targeted:
            inner = ["base_layer."] if module in targeted else []
        else:
            inner = ["modules_to_save.", "original_module."] if module in saved else [""]
        for where in inner:
            key = f"{PEFT_PREFIX}{module}.{where}{pname}"
            if key not in expected:
                expected[key] = ExpectedKey(key, tuple(param.shape), module, Role.BASE_EMBEDDING, required=False)


def _no_target_found(target_modules: Any) -> Diagnosis:
    targets = sorted(target_modules) if isinstance(target_modules, (set, list, tuple)) else [str(target_modules)]
    return finding(
        "target_modules_not_found",
        f"none of the adapter's target modules ({', '.join(map(str, targets[:10]))}) exists in the model",
        details={"target_modules": targets, RAISED: "ValueError"},  # peft: NoMatchingPeftModuleError(ValueError)
    )


def _by_injection(model: nn.Module, config: Any, adapter_name: str) -> tuple[dict[str, ExpectedKey], Diagnosis | None]:
    from safe_peft._keys import module_of

    embedding_keys: dict[str, ExpectedKey] = {}

    def inject(real: frozenset[str], seed: int = 0) -> dict[str, Any]:
        state, extra = injected(model, config, adapter_name, real, seed)
        for key, tensor in extra.items():
            if key not in state:
                embedding_keys[key] = ExpectedKey(key, tuple(tensor.shape), module_of(key), Role.BASE_EMBEDDING, False)
        return state

    try:
        kind = str(getattr(config, "peft_type", "")).rsplit(".", 1)[-1]
        if kind in _COMPUTED_FROM_WEIGHTS or any(getattr(config, name, None) for name in _DEFERRED_ON_META):
            raise _DeferredOnMeta  # straight to the injection with real targets
        state = inject(frozenset())
    except Exception as exc:  # noqa: BLE001 - peft signals a config the model cannot take with several types
        # Methods whose initialisation computes from the base weights (SHiRA's mask, FRoD / AdaMSS decompositions,
        # AdaLoRA's pruned ranks) cannot run on meta tensors: again, with the targeted modules' weights real.
        targets = _targeted(model, config)
        if not targets:
            return {}, _injection_error(exc, config, model)
        try:
            state = inject(targets)
            if on_meta(model, targets):  # random stand-in values: find the dimensions that depend on them
                state = value_free_shapes(state, inject(targets, seed=1))
        except Exception as again:  # noqa: BLE001 - as above
            return {}, _injection_error(again, config, model)
    expected = {}
    for key, tensor in state.items():
        expected[key] = ExpectedKey(key, tuple(tensor.shape), module_of(key), role_of(key) or Role.OTHER)
    for key, want in [*embedding_keys.items(), *_filled_on_load(state).items()]:
        expected.setdefault(key, want)
    return expected, None


def _filled_on_load(state: dict[str, Any]) -> dict[str, ExpectedKey]:
    """Entries peft's load creates from the file rather than finds in the model: SHiRA's indices live in a plain
    dict on the layer, which its ``_remap_adapter_state_dict_for_load`` fills from ``<layer>.shira_indices`` (two
    rows, one column per SHiRA weight); a layer injected without a mask (a custom ``mask_fn``, which is never
    saved) has none until then."""
    from safe_peft._keys import module_of

    found = {}
    for key, tensor in state.items():
        if key.endswith(".shira_weight"):
            indices = f"{key.removesuffix('shira_weight')}shira_indices"
            found[indices] = ExpectedKey(indices, (2, int(tensor.shape[0])), module_of(indices), Role.OTHER)
    return found


def _targeted(model: nn.Module, config: Any) -> frozenset[str]:
    """The modules peft's own matcher targets with ``config`` (all leaf layers when the config names none)."""
    from peft.tuners.tuners_utils import _ExcludedModule, check_target_module_exists

    names = set()
    for name, module in model.named_modules():
        if not name or next(module.children(), None) is not None:
            continue
        if getattr(config, "target_modules", None) is None:
            names.add(name)
            continue
        try:
            found = check_target_module_exists(config, name)
        except Exception:  # noqa: BLE001 - a config peft's matcher cannot read: injection reports it
            return frozenset()
        if found and not isinstance(found, _ExcludedModule):
            names.add(name)
    return frozenset(names)


def _injection_error(exc: Exception, config: Any, model: nn.Module) -> Diagnosis:
    """Classify a failed injection from data: does peft's own matcher find any target in the model?"""
    from peft.tuners.tuners_utils import check_target_module_exists

    targets = getattr(config, "target_modules", None)
    if targets and not any(check_target_module_exists(config, name) for name, _ in model.named_modules() if name):
        return _no_target_found(targets)
    if isinstance(exc, Warning):  # the caller's warning filters raise peft's notice: so would they in the load
        return finding(
            "injection_rejected",
            f"peft warned while applying this config, and the active warning filters make the warning an error (the "
            f"load would stop at it too): {type(exc).__name__}: {str(exc)[:300]}",
            details=raised_by(exc),
        )
    return finding(
        "injection_rejected",
        f"peft cannot apply this adapter config to the model: {type(exc).__name__}: {str(exc)[:300]}",
        details=raised_by(exc),
    )
