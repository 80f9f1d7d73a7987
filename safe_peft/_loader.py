"""``safe_load_adapter``: check first, load with peft, verify, and undo everything on failure."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import TYPE_CHECKING, Any

from safe_peft._adapter import HUB_KWARGS
from safe_peft._catalog import fatal, finding
from safe_peft._keys import Role, base_tensor_name, role_of
from safe_peft._plan import LoadPlan, make_plan
from safe_peft._snapshot import ModuleSnapshot
from safe_peft._weights import write_weights
from safe_peft.errors import AdapterLoadError
from safe_peft.report import LoadReport, MissingKey, SizeMismatch, UnexpectedKey

if TYPE_CHECKING:
    from peft import PeftModel
    from torch import nn

__all__ = ["safe_load_adapter"]


def safe_load_adapter(
    base_model: nn.Module,
    model_id: str | os.PathLike[str],
    adapter_name: str = "default",
    *,
    remap: object = None,
    repair: tuple[str, ...] | list[str] = (),
    strict: bool = True,
    allow_pickle: bool = False,
    output_loading_info: bool = False,
    collective_timeout: float | None = None,
    **peft_kwargs: Any,
) -> Any:
    """Load a PEFT adapter like ``PeftModel.from_pretrained``, or fail with an explanation.

    Returns the same ``PeftModel`` peft would (``(model, report)`` with
    ``output_loading_info=True``). Raises :class:`AdapterLoadError` (a ``RuntimeError``) with
    a :class:`LoadReport` when the adapter does not fit; ``base_model`` is then left exactly
    as it was given. ``strict=False`` keeps peft's lenient handling of missing keys but still
    reports them. Nothing is renamed or repaired unless ``remap`` / ``repair`` ask for it.

    On a sharded model (FSDP2, tensor parallel) every rank must call it: the ranks agree on one verdict
    before anything changes, and restore together if any rank fails; ``collective_timeout`` (seconds,
    default 600) bounds the wait for the other ranks. See docs/distributed.md.
    """
    kwargs = dict(peft_kwargs)  # never mutate the caller's kwargs
    from safe_peft._distributed import is_sharded, load_sharded  # hook: sharded models load collectively

    if is_sharded(base_model):
        return load_sharded(
            base_model,
            model_id,
            adapter_name,
            remap=remap,
            repair=tuple(repair),
            strict=strict,
            allow_pickle=allow_pickle,
            output_loading_info=output_loading_info,
            collective_timeout=collective_timeout,
            peft_kwargs=kwargs,
        )
    plan = make_plan(
        base_model,
        model_id,
        adapter_name,
        remap=remap,
        repair=tuple(repair),
        allow_pickle=allow_pickle,
        peft_kwargs=kwargs,
    )
    if not plan.report.ok and (strict or _fatal(plan.report)):
        raise AdapterLoadError(plan.report)
    model, report = _execute(base_model, plan, adapter_name, strict, kwargs)
    return (model, report) if output_loading_info else model


def _fatal(report: LoadReport) -> bool:
    """Failures even lenient loading cannot get past (the catalog says which), and shape mismatches."""
    return bool(report.size_mismatches) or any(fatal(d) for d in report.causes)


def _execute(
    base_model: nn.Module, plan: LoadPlan, adapter_name: str, strict: bool, kwargs: dict[str, Any]
) -> tuple[PeftModel, LoadReport]:
    from peft import PeftModel

    snapshot = ModuleSnapshot(base_model)
    snapshot.protect(_overwritten_base_tensors(base_model, plan))
    workdir = None
    try:
        if plan.vocab_size is not None:
            base_model.resize_token_embeddings(plan.vocab_size)  # type: ignore[operator]
        directory = plan.files.directory
        if plan.renames or plan.dropped or plan.legacy is not None:
            workdir = tempfile.mkdtemp(prefix="safe_peft_")
            write_weights(
                plan.files.weights_path,
                os.path.join(workdir, "adapter_model.safetensors"),
                weights_format=plan.files.weights_format,
                renames=plan.renames,
                dropped=plan.dropped,
                legacy=plan.legacy,
            )
            directory = workdir
        passthrough = {k: v for k, v in kwargs.items() if k not in HUB_KWARGS and k != "config"}
        model = PeftModel.from_pretrained(base_model, directory, adapter_name, config=plan.peft_config, **passthrough)
        report = _verify(model, plan, adapter_name)
        if not report.ok and strict:
            raise AdapterLoadError(report)
        return model, (report if report.ok and plan.report.ok else _merge(plan.report, report))
    except AdapterLoadError:
        snapshot.restore()
        raise
    except Exception as exc:
        snapshot.restore()
        raise AdapterLoadError(_late_failure(plan.report, exc)) from exc
    except BaseException:  # KeyboardInterrupt, SystemExit, GeneratorExit: undo, then let it through unchanged
        snapshot.restore()
        raise
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


def _overwritten_base_tensors(model: nn.Module, plan: LoadPlan) -> list[Any]:
    """Base-model tensors the load writes in place: every checkpoint entry that names a tensor the base already has
    (biases saved by ``bias="all"`` / ``"lora_only"``, base embedding weights saved with the adapter, ...), and
    the targeted weights when the config's initialisation rewrites them (PiSSA, OLoRA, CorDA, LoftQ)."""
    tensors: dict[str, Any] = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    names = set()
    for key in plan.checkpoint:
        name = base_tensor_name(key)
        if name in tensors:
            names.add(name)
    if plan.view is not None and rewrites_base(plan.peft_config):
        names |= {f"{e.module}.weight" for e in plan.view.expected.values() if e.role is Role.A}
    return [tensors[name] for name in sorted(names) if name in tensors]


def rewrites_base(config: Any) -> bool:
    """Whether peft's injection with this config rewrites the targeted base weights (it re-runs the init)."""
    init = str(getattr(config, "init_lora_weights", True)).lower()
    return init in {"pissa", "olora", "corda", "loftq"} or init.startswith("pissa_niter_")


def adapter_tensors(model: PeftModel, adapter_name: str, analytic: bool) -> dict[str, Any]:
    """The adapter's tensors in the model, under their checkpoint keys.

    For plain LoRA (the analytic view) the names come from ``named_parameters()`` through peft's own
    ``_remove_adapter_name_from_key`` (DoRA magnitudes also drop ``.weight``, as peft saves them);
    otherwise from ``get_peft_model_state_dict``. A test holds the two equal.
    """
    from peft import get_peft_model_state_dict

    config: Any = model.peft_config[adapter_name]
    remove = None
    if analytic:
        from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

        tuners: dict[Any, Any] = dict(PEFT_TYPE_TO_TUNER_MAPPING)
        # peft < 0.18 has no per-key mapping, and its get_peft_model_state_dict removes every ".<name>" from a key
        # (adapter_name="weight": every ".weight"), though its load of such an adapter is exact: the segment is
        # removed where the LoRA part puts it instead
        remove = getattr(tuners.get(config.peft_type), "_remove_adapter_name_from_key", None) or _without_name
    if remove is None:
        return dict(get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False))
    owned = _adapter_tensor_ids(model, adapter_name)
    wrapped = f".modules_to_save.{adapter_name}."
    tensors = {}
    for name, tensor in model.state_dict(keep_vars=True).items():  # parameters and buffers (saved heads' stats)
        if id(tensor) not in owned:
            continue
        if wrapped in name:
            tensors[name.replace(wrapped, ".")] = tensor
        else:
            key = remove(name, adapter_name)
            tensors[key[: -len(".weight")] if key.endswith(".lora_magnitude_vector.weight") else key] = tensor
    return tensors


_LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def _without_name(key: str, adapter_name: str) -> str:
    """``x.lora_A.<adapter_name>.weight`` -> ``x.lora_A.weight``: the adapter's name removed where the LoRA part
    puts it (as peft >= 0.18's ``_remove_adapter_name_from_key``), whatever the name is."""
    for part in _LORA_PARTS:
        marker = f".{part}.{adapter_name}"
        at = key.rfind(marker)
        end = at + len(marker)
        if at >= 0 and (end == len(key) or key[end] == "."):
            return key[: at + len(part) + 1] + key[end:]
    return key


def _adapter_tensor_ids(model: nn.Module, adapter_name: str) -> set[int]:
    """The tensors that belong to ``adapter_name``, found structurally: the entries under that name in each
    tuner layer's adapter containers (and in saved-module wrappers). Never by matching names, so that any name
    peft accepts (``weight``, ``base_layer``, ...) is told apart from the base model's own tensors."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    owned: set[int] = set()
    for module in model.modules():
        names = getattr(module, "adapter_layer_names", ()) if isinstance(module, BaseTunerLayer) else ()
        if not names and isinstance(getattr(module, "modules_to_save", None), torch.nn.ModuleDict):
            names = ("modules_to_save",)
        for attr in names:
            container = getattr(module, attr, None)
            if container is None or adapter_name not in container:
                continue
            item = container[adapter_name]
            if isinstance(item, torch.Tensor):
                owned.add(id(item))
            else:
                owned.update(id(t) for t in item.state_dict(keep_vars=True).values())
    return owned


def _verify(model: PeftModel, plan: LoadPlan, adapter_name: str) -> LoadReport:
    """After peft loaded: every expected adapter tensor came from the checkpoint and holds finite values."""
    state = adapter_tensors(model, adapter_name, plan.view is not None and plan.view.method == "analytic")
    checkpoint = plan.checkpoint
    optional = {k for k, e in (plan.view.expected.items() if plan.view else ()) if not e.required}
    missing = [MissingKey(k, tuple(t.shape)) for k, t in state.items() if k not in checkpoint]
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
    non_finite, zero_b = _scan_values(state)
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


def _scan_values(state: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Keys of tensors holding NaN/Inf, and of all-zero lora_B tensors: one fused norm per device and dtype.

    A norm is non-finite when any element is (or, rarely, when it overflows: such tensors get an exact check).
    """
    import torch

    from safe_peft._sharding import local_tensor  # hook: a DTensor's values are scanned on its local shard

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


def _merge(before: LoadReport, after: LoadReport) -> LoadReport:
    from dataclasses import replace

    return replace(before, causes=before.causes + after.causes, warnings=after.warnings, ok=False)


def _late_failure(report: LoadReport, exc: Exception) -> LoadReport:
    from dataclasses import replace

    from safe_peft._parse import parse_load_error

    parsed = parse_load_error(exc)
    late = finding(
        "load_failed",
        f"peft failed while loading: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}",
    )
    return replace(
        report,
        ok=False,
        missing=report.missing or parsed.missing,
        unexpected=report.unexpected or parsed.unexpected,
        size_mismatches=report.size_mismatches or parsed.size_mismatches,
        causes=[*report.causes, late],
    )
