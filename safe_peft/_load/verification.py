"""After a load: every expected adapter tensor came from the checkpoint and holds finite values."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from safe_peft._catalog import finding
from safe_peft._keys import Role, role_of
from safe_peft._load.adapter_tensors import adapter_tensors
from safe_peft.report import Diagnosis, LoadReport, MissingKey, SizeMismatch, UnexpectedKey

if TYPE_CHECKING:
    from peft import PeftModel

    from safe_peft._plan.plan import LoadPlan

__all__ = [
    "keys_finding",
    "non_finite_finding",
    "scan_values",
    "tied_copies_not_finite",
    "verify",
]


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
        message = f"{len(on_meta)} adapter tensors were never loaded and are still on the meta device"
        causes.append(keys_finding("left_on_meta", message, on_meta))
    non_finite, zero_b = scan_values(state)
    non_finite += [k for k in tied_copies_not_finite(plan, state) if k not in non_finite]
    if non_finite:
        causes.append(non_finite_finding(non_finite, ": training diverged or the file is damaged"))
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
    # the plan's report (its renames, repairs, adapter and model class), with what the load found
    found = replace(plan.report, ok=not causes, causes=causes, warnings=warnings, adapter_name=adapter_name)
    found = replace(found, missing=missing, unexpected=unexpected, size_mismatches=mismatches)
    return replace(found, renames=dict(found.renames), repairs=list(found.repairs))


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


def non_finite_finding(keys: list[str], why: str = "") -> Diagnosis:
    """``non_finite_values`` for these adapter tensors (``why``: what it likely means, appended)."""
    message = f"{len(keys)} adapter tensors hold NaN or Inf (e.g. {keys[0]!r}){why}"
    return keys_finding("non_finite_values", message, keys)


def keys_finding(code: str, message: str, keys: list[str]) -> Diagnosis:
    """A finding about adapter tensors, naming the first 20 of their keys."""
    return finding(code, message, details={"keys": keys[:20]})
