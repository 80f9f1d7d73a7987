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
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from safe_peft._catalog import finding
from safe_peft._keys import PEFT_PREFIX, Role, lora_key, pattern_key, pattern_keys, role_of
from safe_peft._model.walk import every_module, named_modules
from safe_peft._versions import TASK_HEADS
from safe_peft.errors import RAISED, raised_by
from safe_peft.report import Diagnosis

if TYPE_CHECKING:
    from torch import nn

__all__ = ["ExpectedKey", "ModelView", "expected_keys", "has_weight_conversions", "meta_skeleton", "on_meta_here"]

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
    if cfg.target_modules is None:  # peft fills the default targets of the model type (issue 16)
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


def _by_injection(model: nn.Module, config: Any, adapter_name: str) -> tuple[dict[str, ExpectedKey], Diagnosis | None]:
    import contextlib

    from peft import PeftModel, get_peft_model_state_dict
    from peft.auto import MODEL_TYPE_TO_PEFT_MODEL_MAPPING

    from safe_peft._keys import module_of

    peft_cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(str(config.task_type or ""), PeftModel)

    embedding_keys: dict[str, ExpectedKey] = {}

    def inject(real: frozenset[str], seed: int = 0) -> tuple[nn.Module, dict[str, Any]]:
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
        # touched: Python < 3.14 has none per thread (issue 16; docs/security.md).
        # With real targets, the adapter's own (small) tensors are real too: some methods index them on save.
        with on_meta_here() if not real else contextlib.nullcontext():
            peft_model = peft_cls(skeleton, copy.deepcopy(config), adapter_name, low_cpu_mem_usage=False)
        state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name, save_embedding_layers=False)
        # what peft adds when it saves the embedding layers too (resized vocabularies): the base weights under
        # base_layer. / token_adapter.base_layer., a tied head's entries, ... asked of peft itself, only of a model
        # where peft looks for them (elsewhere it finds none and warns: a notice the load itself does not give)
        extra = {}
        if hasattr(peft_model, "get_input_embeddings"):
            try:
                extra = get_peft_model_state_dict(peft_model, adapter_name=adapter_name, save_embedding_layers=True)
            except Exception:  # noqa: BLE001 - a model peft cannot find embeddings in saves none
                pass
        for key, tensor in extra.items():
            if key not in state:
                embedding_keys[key] = ExpectedKey(key, tuple(tensor.shape), module_of(key), Role.BASE_EMBEDDING, False)
        return skeleton, state

    try:
        kind = str(getattr(config, "peft_type", "")).rsplit(".", 1)[-1]
        if kind in _COMPUTED_FROM_WEIGHTS or any(getattr(config, name, None) for name in _DEFERRED_ON_META):
            raise _DeferredOnMeta  # straight to the injection with real targets
        _, state = inject(frozenset())
    except Exception as exc:  # noqa: BLE001 - peft signals a config the model cannot take with several types
        # Methods whose initialisation computes from the base weights (SHiRA's mask, FRoD / AdaMSS decompositions,
        # AdaLoRA's pruned ranks) cannot run on meta tensors: again, with the targeted modules' weights real.
        targets = _targeted(model, config)
        if not targets:
            return {}, _injection_error(exc, config, model)
        try:
            _, state = inject(targets)
            if _on_meta(model, targets):  # random stand-in values: find the dimensions that depend on them
                state = _value_free_shapes(state, inject(targets, seed=1)[1])
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


def _on_meta(model: nn.Module, names: frozenset[str]) -> bool:
    return any(
        p.device.type == "meta" for name, m in model.named_modules() if name in names for p in m.parameters(False)
    )


def _value_free_shapes(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
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
