"""Execute a load plan: snapshot the model, load with peft, verify, and undo everything on any failure.

The entry points (:mod:`safe_peft._routes`, the sharded route in :mod:`safe_peft._distributed.load`) decide what
to load; this module is the one place that changes a model, and only after the plan said the load will succeed.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from safe_peft._catalog import fatal, finding
from safe_peft._files.rewrite import write_weights
from safe_peft._files.source import HUB_KWARGS
from safe_peft._keys import LORA_OWN, Role, base_tensor_name, checkpoint_key, role_of
from safe_peft._load.snapshot import ModuleSnapshot, ValueSnapshot
from safe_peft._model.walk import named_paths
from safe_peft.errors import AdapterLoadError, raised_by
from safe_peft.report import LoadReport, MissingKey, SizeMismatch, UnexpectedKey

if TYPE_CHECKING:
    from peft import PeftModel
    from torch import nn

    from safe_peft._plan.plan import LoadPlan

__all__ = [
    "adapter_tensor_ids",
    "adapter_tensors",
    "atomically",
    "copy_into",
    "execute",
    "install_given_config",
    "is_fatal",
    "late_failure",
    "load_directory",
    "merge_reports",
    "overwritten_base_tensors",
    "rewrites_base",
    "scan_values",
    "settled",
    "takes_in_place",
    "verify",
]


def is_fatal(report: LoadReport) -> bool:
    """Failures even lenient loading cannot get past (the catalog says which), and shape mismatches."""
    return bool(report.size_mismatches) or any(fatal(d) for d in report.causes)


def execute(
    base_model: nn.Module, plan: LoadPlan, adapter_name: str, strict: bool, kwargs: dict[str, Any]
) -> tuple[PeftModel, LoadReport]:
    from peft import PeftModel

    snapshot = ModuleSnapshot(base_model)
    snapshot.protect(overwritten_base_tensors(base_model, plan))
    with atomically(snapshot, plan.report) as temporary:
        if plan.vocab_size is not None:
            base_model.resize_token_embeddings(plan.vocab_size)  # type: ignore[operator]
        directory, workdir = load_directory(plan, with_config=False)
        temporary.append(workdir)
        passthrough = {k: v for k, v in kwargs.items() if k not in HUB_KWARGS and k != "config"}
        route = load_route(base_model, plan, strict, kwargs)
        from safe_peft._load.plain_calls import (
            plain_calls,  # hook: under safe_peft.patch(), these calls stay plain peft
        )

        with plain_calls():
            state = None
            own = route == "meta" or (route == "initialising" and "low_cpu_mem_usage" not in kwargs)
            if own and proven_exact(base_model, plan, strict, kwargs):
                on_meta = route == "meta"
                exact = on_meta and rounds_on_meta(base_model, plan, kwargs)
                config, rest = plan.peft_config, dict(passthrough)
                model, state = _own_route(base_model, directory, adapter_name, config, rest, on_meta, exact)
            else:
                config = plan.peft_config
                model = PeftModel.from_pretrained(base_model, directory, adapter_name, config=config, **passthrough)
        report = verify(model, plan, adapter_name, state=state)
        report = settled(plan, replace(report, route=route), strict)
    install_given_config(model, adapter_name, kwargs.get("config"))
    return model, report


def install_given_config(model: Any, adapter_name: str, given: Any) -> None:
    """A caller's ``config=`` object is the adapter's config after the load, as peft installs it: it takes what
    the load set on the checked copy (``inference_mode = not is_trainable``, filled-in ``target_modules``, ...).
    Only after the load committed: on a failure the caller's object is untouched."""
    if given is None:
        return
    installed = model.peft_config[adapter_name]
    if installed is not given:
        given.__dict__.update(installed.__dict__)
        model.peft_config[adapter_name] = given


def load_directory(plan: LoadPlan, *, with_config: bool) -> tuple[str, str | None]:
    """The directory peft loads from: the adapter's own, or a temporary one holding the weights (rewritten when keys
    are renamed or dropped, else linked) and, ``with_config``, the checked config. Returns it and the temporary
    directory to remove (None when there is none)."""
    renamed = bool(plan.renames or plan.dropped or plan.legacy is not None)
    if not (renamed or with_config):
        return plan.files.directory, None
    from safe_peft._fix.writer import temporary_directory

    with temporary_directory() as workdir:  # removed if writing into it fails half-way
        if renamed:
            write_weights(
                plan.files.weights_path,
                os.path.join(workdir, "adapter_model.safetensors"),
                weights_format=plan.files.weights_format,
                renames=plan.renames,
                dropped=plan.dropped,
                legacy=plan.legacy,
            )
        else:
            target = os.path.join(workdir, os.path.basename(plan.files.weights_path))
            try:
                os.symlink(os.path.abspath(plan.files.weights_path), target)
            except OSError:  # no symbolic links here: copy
                shutil.copyfile(plan.files.weights_path, target)
        if with_config:
            plan.peft_config.save_pretrained(workdir)
    return workdir, workdir


@contextlib.contextmanager
def atomically(snapshot: ModuleSnapshot | ValueSnapshot, planned: LoadReport) -> Iterator[list[str | None]]:
    """The one undo of every route: on any exit by an exception the snapshot is restored; an ``AdapterLoadError``
    and a ``BaseException`` that is not an ``Exception`` (KeyboardInterrupt, SystemExit) go through unchanged, any
    other error becomes an ``AdapterLoadError`` with the planned report and peft's message. Yields a list for the
    temporary directories the load writes; they are removed on every exit."""
    temporary: list[str | None] = []
    try:
        yield temporary
        _remove(temporary)  # still inside the undo: a Ctrl-C while removing them undoes the load, never half-commits
    except AdapterLoadError:
        snapshot.restore()
        raise
    except Exception as exc:
        snapshot.restore()
        raise AdapterLoadError(late_failure(planned, exc)) from exc
    except BaseException:  # KeyboardInterrupt, SystemExit, GeneratorExit: undo, then let it through unchanged
        snapshot.restore()
        raise
    finally:
        _remove(temporary)


def _remove(temporary: list[str | None]) -> None:
    while temporary:
        directory = temporary.pop()
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)


def load_route(base_model: nn.Module, plan: LoadPlan, strict: bool, kwargs: dict[str, Any]) -> str:
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


def rounds_on_meta(base_model: nn.Module, plan: LoadPlan, kwargs: dict[str, Any]) -> bool:
    """Whether peft's meta route would round the checkpoint here: with autocast, on a targeted base layer holding
    its weight below float32 (float16, bfloat16, float8), it assigns the file's tensor, moves it to the base layer's
    dtype, then upcasts it back to float32, where the initialising route upcasts first and copies the file's values
    exactly. The meta route then copies the file's values in last (``exact_values``)."""
    return bool(kwargs.get("autocast_adapter_dtype", True)) and _half_precision_targets(base_model, plan)


def _adapter_tensors_only(base_model: nn.Module, plan: LoadPlan, kwargs: dict[str, Any]) -> bool:
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


def proven_exact(base_model: nn.Module, plan: LoadPlan, strict: bool, kwargs: dict[str, Any]) -> bool:
    """The plan proves the checkpoint complete and exact for plain LoRA, and nothing from_pretrained interprets
    besides (no device map, no other arguments, no resize, no base rewrite): safe_peft may then do peft's steps
    itself (:func:`_own_route`), on either route."""
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


def _own_route(
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
    from safe_peft._load.assign import (
        load_checkpoint,  # what load_adapter does from here, without its whole-model walks
    )

    _, state = load_checkpoint(
        model,
        directory,
        adapter_name,
        on_meta=on_meta,
        is_trainable=is_trainable,
        autocast_adapter_dtype=autocast,
        torch_device=torch_device,
        key_mapping=key_mapping,
        exact_values=exact_values,
    )
    return model, state


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


def verify(model: PeftModel, plan: LoadPlan, adapter_name: str, state: dict[str, Any] | None = None) -> LoadReport:
    """After peft loaded: every expected adapter tensor came from the checkpoint and holds finite values.
    ``state``: the adapter's tensors under their checkpoint keys, when the caller names them (in-place loads)."""
    if state is None:
        state = adapter_tensors(model, adapter_name, plan.view is not None and plan.view.method == "analytic")
    checkpoint = plan.checkpoint
    optional = {k for k, e in (plan.view.expected.items() if plan.view else ()) if not e.required}
    missing = [MissingKey(k, tuple(t.shape)) for k, t in state.items() if k not in checkpoint and k not in optional]
    unexpected = [UnexpectedKey(k, s) for k, s in checkpoint.items() if k not in state and k not in optional]
    mismatches = [
        SizeMismatch(k, checkpoint[k], tuple(t.shape))
        for k, t in state.items()
        if k in checkpoint and tuple(t.shape) != checkpoint[k]
    ]
    causes = []
    on_meta = [k for k, t in state.items() if t.device.type == "meta"]
    if on_meta:
        causes.append(
            finding(
                "left_on_meta",
                f"{len(on_meta)} adapter tensors were never loaded and are still on the meta device",
                details={"keys": on_meta[:20]},
            )
        )
    non_finite, zero_b = scan_values(state)
    non_finite += [k for k in tied_copies_not_finite(plan, state) if k not in non_finite]
    if non_finite:
        causes.append(
            finding(
                "non_finite_values",
                f"{len(non_finite)} adapter tensors hold NaN or Inf (e.g. {non_finite[0]!r}): "
                "training diverged or the file is damaged",
                details={"keys": non_finite[:20]},
            )
        )
    predicted = {m.key for m in plan.report.missing} | {u.key for u in plan.report.unexpected}
    unpredicted = [k for k in (*(m.key for m in missing), *(u.key for u in unexpected)) if k not in predicted]
    if (unpredicted or mismatches) and not causes:
        causes.append(
            finding("verification_failed", "after loading, the adapter tensors in the model differ from the checkpoint")
        )
    warnings = list(plan.report.warnings)
    lora_b = [k for k in state if role_of(k) is Role.B]
    if lora_b and len(zero_b) == len(lora_b):
        warnings.append(
            finding("all_zero_lora_B", "every lora_B tensor is zero: the adapter changes nothing (saved untrained?)")
        )
    return LoadReport(
        ok=not causes,
        missing=missing,
        unexpected=unexpected,
        size_mismatches=mismatches,
        causes=causes,
        warnings=warnings,
        renames=dict(plan.report.renames),
        repairs=list(plan.report.repairs),
        adapter=plan.report.adapter,
        model_class=plan.report.model_class,
        adapter_name=adapter_name,
    )


def tied_copies_not_finite(plan: LoadPlan, state: dict[str, Any]) -> list[str]:
    """Checkpoint keys naming one tensor of the model together (tied embeddings: T5's shared / encoder / decoder /
    lm_head token deltas) keep only the value written last, so the model cannot show a NaN in the others: their
    values are read from the file (those keys alone) and scanned."""
    from safe_peft._model.sharding import local_tensor  # hook: a DTensor's storage is its local shard's

    shared: dict[tuple[str, int], list[str]] = {}
    for key, tensor in state.items():
        if tensor.device.type != "meta" and tensor.is_floating_point() and tensor.numel():
            shared.setdefault((str(tensor.device), local_tensor(tensor).data_ptr()), []).append(key)
    tied = [k for keys in shared.values() if len(keys) > 1 for k in keys if k in plan.checkpoint]
    if not tied or plan.files.weights_format != "safetensors":
        return []
    from safetensors import safe_open

    original = {new: old for old, new in plan.renames.items()}
    with safe_open(plan.files.weights_path, "pt") as f:
        names = set(f.keys())
        values = {k: f.get_tensor(original.get(k, k)) for k in tied if original.get(k, k) in names}
    return scan_values(values)[0]


def scan_values(state: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Keys of tensors holding NaN/Inf, and of all-zero lora_B tensors: one fused norm per device and dtype.

    A norm is non-finite when any element is (or, rarely, when it overflows: such tensors get an exact check).
    """
    import torch

    from safe_peft._model.sharding import local_tensor  # hook: a DTensor's values are scanned on its local shard

    groups: dict[tuple[Any, Any], list[str]] = {}
    for key, tensor in state.items():
        if tensor.device.type != "meta" and tensor.is_floating_point() and local_tensor(tensor).numel():
            groups.setdefault((tensor.device, tensor.dtype), []).append(key)
    non_finite, zero = [], []
    with torch.no_grad():
        for keys in groups.values():
            norms = torch.stack(torch._foreach_norm([local_tensor(state[k]).detach() for k in keys])).float().tolist()
            for key, norm in zip(keys, norms, strict=False):
                if norm != norm or norm in (float("inf"), float("-inf")):
                    if not bool(torch.isfinite(local_tensor(state[key])).all()):
                        non_finite.append(key)
                elif norm == 0.0 and role_of(key) is Role.B:
                    zero.append(key)
    return non_finite, zero


def settled(plan: LoadPlan, report: LoadReport, strict: bool) -> LoadReport:
    """The end of every route: raise when the verification failed and the load is strict (the caller's
    :func:`atomically` then undoes it), else the report to return, the plan's findings merged in when either one
    found something."""
    if not report.ok and strict:
        raise AdapterLoadError(report)
    return report if report.ok and plan.report.ok else merge_reports(plan.report, report)


def merge_reports(before: LoadReport, after: LoadReport) -> LoadReport:
    from dataclasses import replace

    return replace(before, causes=before.causes + after.causes, warnings=after.warnings, ok=False)


def late_failure(report: LoadReport, exc: Exception) -> LoadReport:
    from dataclasses import replace

    from safe_peft._plan.parse_error import parse_load_error

    parsed = parse_load_error(exc)
    late = finding(
        "load_failed",
        f"peft failed while loading: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}",
        details=raised_by(exc),
    )
    return replace(
        report,
        ok=False,
        missing=report.missing or parsed.missing,
        unexpected=report.unexpected or parsed.unexpected,
        size_mismatches=report.size_mismatches or parsed.size_mismatches,
        causes=[*report.causes, late],
    )
