"""Write a fixed adapter: renamed keys, repaired config, safetensors, provenance in ``__metadata__``.

A rename-only fix holds no tensor in memory: the header is rewritten and the data region
streamed through unchanged (safetensors offsets are relative to the data region). Dropped
keys are compacted by copying the kept byte ranges. A pickle source (allowed only with
``allow_pickle=True``) is converted through memory, since it has no header to rewrite.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
from typing import TYPE_CHECKING, Any

from safe_peft._adapter_files import SAFETENSORS_NAME
from safe_peft._plan import LoadPlan, load_pickle, make_plan
from safe_peft._safetensors_header import read_header
from safe_peft.errors import AdapterFormatError, AdapterLoadError
from safe_peft.report import LoadReport

if TYPE_CHECKING:
    from torch import nn

__all__ = ["fix_adapter", "provenance", "write_weights"]

_CHUNK = 16 * 1024 * 1024


def fix_adapter(
    base_model: nn.Module,
    model_id: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    remap: object = None,
    repair: tuple[str, ...] | list[str] = (),
    allow_pickle: bool = False,
    force: bool = False,
    **peft_kwargs: Any,
) -> LoadReport:
    """Write the adapter, fixed by the given opt-ins, to ``out_dir`` so plain peft loads it.

    Raises :class:`AdapterLoadError` (writing nothing) when the fixed adapter would still not
    fit. Never writes into the source directory; refuses a non-empty ``out_dir`` unless
    ``force``. A ``"vocab"`` repair cannot live in the adapter: the base model must still be
    resized to the vocabulary the report names before loading the written adapter.
    """
    plan = make_plan(
        base_model, model_id, remap=remap, repair=tuple(repair), allow_pickle=allow_pickle, peft_kwargs=peft_kwargs
    )
    if not plan.report.ok:
        raise AdapterLoadError(plan.report)
    target = os.path.abspath(os.fspath(out_dir))
    _check_target(target, plan, force)
    parent = os.path.dirname(target) or "."
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".safe_peft_", dir=parent)
    try:
        write_weights(plan, os.path.join(staging, SAFETENSORS_NAME))
        plan.peft_config.save_pretrained(staging)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return plan.report


def _check_target(target: str, plan: LoadPlan, force: bool) -> None:
    source = os.path.realpath(plan.files.directory)
    resolved = os.path.realpath(target)
    if resolved == source or source.startswith(resolved + os.sep):
        raise ValueError(f"{target}: is the adapter's own directory (or holds it); write the fix to a new directory")
    if os.path.isdir(target) and os.listdir(target) and not force:
        raise FileExistsError(f"{target}: exists and is not empty; choose a new directory or pass force=True")


def provenance(plan: LoadPlan, original_keys: list[str]) -> dict[str, str]:
    """Metadata that says where a fixed adapter came from."""
    from safe_peft import __version__

    digest = hashlib.sha256("\n".join(sorted(original_keys)).encode()).hexdigest()
    return {
        "format": "pt",
        "safe_peft.version": __version__,
        "safe_peft.source": plan.files.location,
        "safe_peft.source_keys_sha256": digest,
        "safe_peft.renamed": str(len(plan.renames)),
        "safe_peft.dropped": str(len(plan.dropped)),
        "safe_peft.rules": ",".join(plan.rules),
        "safe_peft._repairs": json.dumps(plan.report.repairs),
    }


def write_weights(plan: LoadPlan, path: str) -> None:
    """Write the plan's renamed / filtered (/ converted) weights to ``path`` as safetensors."""
    if plan.files.weights_format != "safetensors" or plan.legacy is not None:
        from safetensors.torch import load_file, save_file

        from safe_peft._legacy import convert_lora_b

        pickled = plan.files.weights_format != "safetensors"
        tensors = load_pickle(plan.files.weights_path) if pickled else load_file(plan.files.weights_path)
        if plan.legacy is not None:  # tensor data changes: the one fix that cannot stream
            tensors = {
                k: convert_lora_b(v, plan.legacy) if k.endswith(".lora_B.weight") and v.ndim == 3 else v
                for k, v in tensors.items()
            }
        kept = {plan.renames.get(k, k): v.contiguous() for k, v in tensors.items() if k not in set(plan.dropped)}
        save_file(kept, path, metadata=provenance(plan, list(tensors)))
        return
    header = read_header(plan.files.weights_path)
    dropped = set(plan.dropped)
    missing = [k for k in plan.renames if k not in header.tensors]
    if missing:
        raise ValueError(
            f"{plan.files.weights_path}: the renames refer to keys the file does not hold (e.g. {missing[0]!r}): "
            "this model converts adapter keys on load, so a rewritten file would not round-trip; "
            "load with safe_load_adapter(..., remap=...) instead"
        )
    ranges: list[tuple[int, int]] = []
    entries: dict[str, Any] = {"__metadata__": {**header.metadata, **provenance(plan, list(header.tensors))}}
    position = 0
    for info in sorted(header.tensors.values(), key=lambda t: t.begin):
        if info.name in dropped:
            continue
        size = info.end - info.begin
        entries[plan.renames.get(info.name, info.name)] = {
            "dtype": info.dtype,
            "shape": list(info.shape),
            "data_offsets": [position, position + size],
        }
        ranges.append((info.begin, info.end))
        position += size
    body = json.dumps(entries, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)  # safetensors aligns the data region to 8 bytes
    with open(plan.files.weights_path, "rb") as src, open(path, "wb") as dst:
        dst.write(struct.pack("<Q", len(body)) + body)
        for begin, end in _merge(ranges):
            src.seek(header.data_start + begin)
            _copy(src, dst, end - begin)


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Adjacent byte ranges as one (a rename-only fix is a single range: the whole data region)."""
    merged: list[tuple[int, int]] = []
    for begin, end in ranges:
        if merged and merged[-1][1] == begin:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((begin, end))
    return merged


def _copy(src: Any, dst: Any, count: int) -> None:
    while count > 0:
        chunk = src.read(min(_CHUNK, count))
        if not chunk:
            raise AdapterFormatError.of(
            "truncated_file", f"{src.name}: ended early")
        dst.write(chunk)
        count -= len(chunk)
