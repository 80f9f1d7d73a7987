"""The base fingerprint: a small, deterministic sample of the base weights an adapter modifies, kept in the adapter's
safetensors ``__metadata__`` under :data:`KEY`, and its comparison with the base a load is given.

What is sampled: for every tensor of the base the adapter touches (the weights of its target modules, the originals
of ``modules_to_save`` and trainable-token embeddings), a grid of ``rows x cols`` elements whose positions are
derived from a hash of the tensor's name and shape alone, so that they are the same on any device, in any dtype,
sharded or not. At most :data:`MAX_TENSORS` tensors and :data:`BUDGET` values in all: a few KB whatever the model.

Comparing reads only the sampled elements (never a whole weight, never the adapter's tensors) and allows for the
rounding of both sides' precision (a bfloat16 copy of the same base verifies); anything more is a different base.
The tolerance and the numbers behind it are in docs/fingerprint.md; the stored form is
:mod:`safe_peft._fingerprint.format`.

>>> [d.code for d in base_check(other_base, adapter_files).causes]  # doctest: +SKIP
['base_weights_differ']
"""

from __future__ import annotations

import functools
import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from safe_peft._bounds import open_regular
from safe_peft._catalog import finding
from safe_peft._fingerprint.format import (
    ABSOLUTE_FLOOR,
    KEY,
    OTHER_WEIGHTS,
    QUANTIZED,
    ROUNDOFF,
    Fingerprint,
    FingerprintError,
    Sampled,
    positions,
)
from safe_peft._model.sharding import is_dtensor
from safe_peft.report import Diagnosis

if TYPE_CHECKING:
    from torch import Tensor, nn

    from safe_peft._files.locate import AdapterFiles

__all__ = ["BaseCheck", "base_check", "compare", "precision_of", "read_stamp", "resolve", "sample_tensor"]


def _coordinates(shape: tuple[int, ...], grid: int, name: str) -> list[tuple[int, ...]]:
    rows, cols = positions(name, shape, grid)
    if len(shape) == 1:
        return [(c,) for c in cols]
    rest = shape[1:]
    out = []
    for r in rows:
        for c in cols:
            coord = []
            for d in reversed(rest):
                coord.append(c % d)
                c //= d
            out.append((r, *reversed(coord)))
    return out


# -- reading the sampled elements -----------------------------------------------------------------------------


def precision_of(tensor: Tensor) -> str:
    """The precision a base tensor holds its values in: a float dtype, or a bitsandbytes quantization."""
    kind = type(tensor).__name__
    if kind == "Params4bit":
        state = getattr(tensor, "quant_state", None)
        return "fp4" if getattr(state, "quant_type", "nf4") == "fp4" else "nf4"
    if kind == "Int8Params":
        return "int8"
    name = str(tensor.dtype).rsplit(".", 1)[-1]
    if name.startswith("float8"):
        return "float8"
    return name if name in ROUNDOFF else "float32"


def sample_tensor(tensor: Tensor, name: str, shape: tuple[int, ...], grid: int) -> list[float | None] | None:
    """The values at the sampled positions, as floats (None for positions another rank holds), or None when the
    tensor holds no values here (meta device, or a form this cannot read). Reads only those elements."""
    import torch

    coords = _coordinates(shape, grid, name)
    if tensor.device.type == "meta":
        return None
    kind = type(tensor).__name__
    with torch.no_grad():
        if kind in ("Params4bit", "Int8Params"):
            return _quantized(tensor, coords)
        if is_dtensor(tensor):
            return _local(tensor, coords)
        taken = _take(tensor, name, shape, grid)
        return None if taken is None else list(taken.to("cpu", torch.float64).tolist())


def _take(tensor: Tensor, name: str, shape: tuple[int, ...], grid: int) -> Tensor | None:
    """A plain tensor's sampled elements, in its own dtype and on its device (``torch.take``: only those elements,
    whatever the strides); None for any other kind of tensor."""
    import torch

    if type(tensor).__name__ in ("Params4bit", "Int8Params") or is_dtensor(tensor):
        return None
    if tensor.device.type == "meta" or tuple(tensor.shape) != shape:
        return None
    index = _flat_index(name, shape, grid)
    with torch.no_grad():
        return torch.take(tensor.detach(), index if tensor.device.type == "cpu" else index.to(tensor.device))


@functools.lru_cache(maxsize=4096)
def _flat_index(name: str, shape: tuple[int, ...], grid: int) -> Tensor:
    import torch

    rows, cols = positions(name, shape, grid)
    width = math.prod(shape[1:]) if len(shape) > 1 else 0
    return torch.tensor([r * width + c for r in rows for c in cols] if width else list(cols), dtype=torch.int64)


def _gather(tensor: Tensor, coords: Sequence[tuple[int, ...]]) -> list[float | None]:
    import torch

    index = tuple(torch.tensor(axis, device=tensor.device) for axis in zip(*coords, strict=True))
    return list(tensor[index].double().cpu().tolist())


def _local(tensor: Any, coords: list[tuple[int, ...]]) -> list[float | None] | None:
    """A DTensor's sampled elements that this rank holds (no collective: every rank reads its own)."""
    try:
        from torch.distributed.tensor import Replicate, Shard
    except ImportError:  # torch before 2.5, on which sharded loading is refused anyway: not verified here
        return None

    if not all(isinstance(p, (Replicate, Shard)) for p in tensor.placements):
        return None
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local_shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    except (ImportError, RuntimeError, TypeError, ValueError):
        return None
    local = tensor.to_local()
    inside = [
        i for i, c in enumerate(coords) if all(o <= x < o + n for x, o, n in zip(c, offset, local_shape, strict=True))
    ]
    values: list[float | None] = [None] * len(coords)
    if inside:
        shifted = [tuple(x - o for x, o in zip(coords[i], offset, strict=True)) for i in inside]
        for i, v in zip(inside, _gather(local, shifted), strict=True):
            values[i] = v
    return values


def _quantized(tensor: Any, coords: list[tuple[int, ...]]) -> list[float | None] | None:
    """bitsandbytes weights: int8 from its row scales (only the sampled elements); 4-bit dequantized."""
    import torch

    try:
        if type(tensor).__name__ == "Int8Params":
            scale = getattr(tensor, "SCB", None)
            if scale is None or tensor.dtype != torch.int8:  # not quantized yet: the values are the weights
                return _gather(tensor.data, coords)
            codes = _gather(tensor.data, coords)
            rows = _gather(scale.reshape(-1, 1), [(c[0], 0) for c in coords])
            return [None if q is None or s is None else q * s / 127.0 for q, s in zip(codes, rows, strict=True)]
        import importlib

        bnb_functional: Any = importlib.import_module("bitsandbytes.functional")  # optional: not a dependency
        state = tensor.quant_state
        full = bnb_functional.dequantize_4bit(tensor.data, state)
        return _gather(full.reshape(tuple(state.shape)), coords)
    except (ImportError, AttributeError, RuntimeError, TypeError, ValueError):
        return None


# -- comparing --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorVerdict:
    """One sampled tensor compared: ``kind`` is ``same``, ``low_rank`` (the same plus a low-rank difference: a
    merge), ``other`` (other weights) or ``changed`` (changed throughout: fine-tuned); ``relative`` is
    |difference| / |stamped| over the sample, from ``error`` and ``norm`` (sums of squares, pooled on quantized
    bases)."""

    name: str
    kind: str
    relative: float
    error: float = 0.0
    norm: float = 0.0


def compare(
    stamped: Sampled, now: Sequence[float | None], grid: int, stamp_precision: str, precision: str
) -> TensorVerdict:
    """Compare one tensor's stamped values with the values read now, allowing for both sides' precision: each
    element within the rounding of both (float formats), or the sample's relative L2 difference within the
    quantization error of both (bitsandbytes formats)."""
    pairs = [(s, c) for s, c in zip(stamped.values, now, strict=True) if c is not None]
    allowed = quantized_allowance(stamp_precision, precision)
    unit = ROUNDOFF.get(stamp_precision, 0.0) + ROUNDOFF.get(precision, 0.0) + ROUNDOFF["float32"]  # stamp: float32
    within = (abs(c - s) <= unit * (abs(s) if abs(s) > abs(c) else abs(c)) + ABSOLUTE_FLOOR for s, c in pairs)
    if allowed is None and all(within):  # the common case first, and cheaply: each element within the rounding
        return TensorVerdict(stamped.name, "same", 0.0)
    error = sum((c - s) ** 2 for s, c in pairs)
    norm = sum(s * s for s, _ in pairs)
    relative = math.sqrt(error / norm) if norm else math.sqrt(error)
    if allowed is not None and relative <= allowed:
        return TensorVerdict(stamped.name, "same", relative, error, norm)
    noise = (allowed if allowed is not None else unit) * math.sqrt(norm)  # what rounding alone can leave
    kind = _shape_of_change(stamped, now, grid, noise)
    if kind != "low_rank" and relative > OTHER_WEIGHTS:
        kind = "other"
    return TensorVerdict(stamped.name, kind, relative, error, norm)


def quantized_allowance(stamp_precision: str, precision: str) -> float | None:
    """The relative L2 difference two quantized (or one quantized, one float) copies of the same weights may show;
    None when neither side is quantized."""
    if stamp_precision not in QUANTIZED and precision not in QUANTIZED:
        return None
    return QUANTIZED.get(stamp_precision, 0.0) + QUANTIZED.get(precision, 0.0)


def _shape_of_change(stamped: Sampled, now: Sequence[float | None], grid: int, noise: float) -> str:
    """``low_rank`` when the sampled grid of differences has at most half its side in rank (a merged LoRA of
    lower rank than the grid), counting only singular values above the rounding ``noise``, else ``changed``.
    Needs a grid of at least 4 x 4, fully read here, and a difference well above the rounding."""
    import torch

    rows, cols = (len(axis) for axis in positions(stamped.name, stamped.shape, grid))
    if len(stamped.shape) < 2 or rows < 4 or cols < 4 or any(c is None for c in now):
        return "changed"
    diff = [float(c) - s for s, c in zip(stamped.values, now, strict=True) if c is not None]
    sigma = torch.linalg.svdvals(torch.tensor(diff, dtype=torch.float64).reshape(rows, cols))
    if float(sigma[0]) <= 10 * noise:  # a difference this close to the rounding does not show its shape
        return "changed"
    rank = int((sigma > max(float(sigma[0]) * 1e-3, noise)).sum())
    return "low_rank" if rank <= min(rows, cols) // 2 else "changed"


# -- the hook in the plan's verdict -----------------------------------------------------------------------------


@dataclass(frozen=True)
class BaseCheck:
    """What the stamp says about the base: fatal findings (``causes``) and notes (``warnings``)."""

    causes: tuple[Diagnosis, ...] = ()
    warnings: tuple[Diagnosis, ...] = ()


def read_stamp(path: str) -> Fingerprint | None:
    """The fingerprint stored in a safetensors file, or None when it has none. Reads the header only (an unstamped
    file: a search of the mapped header, nothing copied); raises :class:`FingerprintError` for a malformed stamp."""
    raw = _stamped_header(path)
    if raw is None:
        return None
    try:  # the header itself is validated by the reading stage (read_header); only the metadata is read here
        metadata = json.loads(raw).get("__metadata__")
    except (ValueError, AttributeError, RecursionError):
        return None
    text = metadata.get(KEY) if isinstance(metadata, dict) else None
    if text is not None and not isinstance(text, str):
        raise FingerprintError(f"{path}: the base fingerprint is malformed (not a string)")
    return None if text is None else Fingerprint.decode(text, path)


def _stamped_header(path: str) -> bytes | None:
    """The header's bytes when they name :data:`KEY`, else None (unreadable files are the reading stage's to
    report)."""
    import mmap

    from safe_peft._files.safetensors_header import MAX_HEADER_BYTES

    key = KEY.encode()
    try:
        f, size = open_regular(path)  # a device or FIFO in the weights' place is never read
        with f:
            if size < 8:  # read no further than the size the file states (a pseudo-file states 0)
                return None
            (length,) = struct.unpack("<Q", (f.read(8) or b"").ljust(8, b"\0"))
            if length > min(MAX_HEADER_BYTES, size - 8) or length == 0:
                return None
            if length <= 1 << 20:  # small headers: one read
                raw = f.read(length) or b""
                return raw if key in raw else None
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                return mapped[8 : 8 + length] if mapped.find(key, 8, 8 + length) >= 0 else None
    except (OSError, ValueError):
        return None


def base_check(model: nn.Module, files: AdapterFiles, metadata: Mapping[str, str]) -> BaseCheck:
    """Compare a present stamp (in ``metadata``, the weights header's, as the reading stage read it) with
    ``model``'s weights (a model seen through its adapters). No stamp: nothing (with ``verify_base=False`` the plan
    does not call it). A meta-device base: a note. A mismatch: ``base_weights_differ``."""
    text = metadata.get(KEY)
    if text is None:
        return BaseCheck()
    try:
        stamp = Fingerprint.decode(text, files.weights_path)
    except FingerprintError as exc:
        return BaseCheck(causes=(finding("bad_fingerprint", str(exc), details={"file": files.weights_path}),))
    return _verify(model, stamp, files.weights_path)


def _verify(model: nn.Module, stamp: Fingerprint, path: str) -> BaseCheck:
    prefix = str(getattr(model, "base_model_prefix", "") or "")
    verdicts: list[TensorVerdict] = []
    unread: list[str] = []
    precisions: set[str] = set()
    read: list[tuple[Sampled, Any, str]] = []
    for sampled in stamp.tensors:
        tensor = _parameter(model, sampled.name, prefix)
        now: Any = None
        if tensor is not None:
            now = _take(tensor, sampled.name, sampled.shape, stamp.grid)  # the common case, batched below
            if now is None:
                now = sample_tensor(tensor, sampled.name, sampled.shape, stamp.grid)
        if tensor is None or now is None:
            unread.append(sampled.name)
            continue
        read.append((sampled, now, precision_of(tensor)))
        precisions.add(read[-1][2])
    notes = () if not unread else (_not_verified(unread, len(stamp.tensors), path),)
    if _all_within_rounding(read, stamp.precision):  # the common case, in a few tensor operations
        return BaseCheck(warnings=notes)
    for (sampled, _, precision), now in zip(read, _as_lists([now for _, now, _ in read]), strict=True):
        verdicts.append(compare(sampled, now, stamp.grid, stamp.precision, precision))
    differ = [v for v in verdicts if v.kind != "same"]
    allowed = max((quantized_allowance(stamp.precision, p) or 0.0 for p in precisions), default=0.0)
    if differ and allowed:  # quantized: the sample pooled over all tensors (a few values each are noisy)
        norm = sum(v.norm for v in verdicts)
        if math.sqrt(sum(v.error for v in verdicts) / norm if norm else 0.0) <= allowed:
            differ = []
    if not differ:
        return BaseCheck(warnings=notes)
    return BaseCheck(causes=(_differ(differ, len(verdicts), stamp, sorted(precisions), path),), warnings=notes)


def _parameter(model: nn.Module, name: str, prefix: str) -> Any:
    """The parameter ``name`` (or with the ``base_model_prefix`` level added or removed), found by its path: no walk
    of the whole model."""
    names = [name]
    if prefix:
        names += [name[len(prefix) + 1 :]] if name.startswith(prefix + ".") else [f"{prefix}.{name}"]
    for candidate in names:
        found = _get_parameter(model, candidate)
        if found is not None:
            return found
    return None


def _get_parameter(model: nn.Module, name: str) -> Any:
    *path, leaf = name.split(".")
    module: Any = model
    for part in path:
        module = module._modules.get(part)
        if module is None:
            return None
    return module._parameters.get(leaf)


def _all_within_rounding(read: list[tuple[Sampled, Any, str]], stamp_precision: str) -> bool:
    """Whether every sampled element read as a plain float tensor is within both sides' rounding of its stamped
    value (what :func:`compare` checks one tensor at a time), for all tensors at once."""
    import torch

    if not read or stamp_precision in QUANTIZED or any(p in QUANTIZED for _, _, p in read):
        return False
    if not all(isinstance(now, torch.Tensor) for _, now, _ in read):
        return False
    now = _joined([t for _, t, _ in read])
    stamped = torch.tensor([v for s, _, _ in read for v in s.values], dtype=torch.float64)
    units = {p: ROUNDOFF[stamp_precision] + ROUNDOFF[p] + ROUNDOFF["float32"] for _, _, p in read}
    unit: Any = next(iter(units.values()))  # one precision (the usual case): a scalar
    if len(units) > 1:
        unit = torch.tensor([units[p] for s, _, p in read for _ in s.values], dtype=torch.float64)
    bound = unit * torch.maximum(stamped.abs(), now.abs()) + ABSOLUTE_FLOOR
    return bool(((now - stamped).abs() <= bound).all())


def _joined(tensors: list[Tensor]) -> Tensor:
    """Tensors as one float64 CPU tensor: one ``cat`` in their own dtype when they share it and the device."""
    import torch

    first = tensors[0]
    if all(t.dtype == first.dtype and t.device == first.device for t in tensors):
        return torch.cat(tensors).to("cpu", torch.float64)
    return torch.cat([t.to("cpu", torch.float64) for t in tensors])


def _as_lists(reads: list[Any]) -> list[list[float | None]]:
    """Sampled values as float lists: the tensors among them moved and converted in one ``cat``."""
    import torch

    tensors = [r for r in reads if isinstance(r, torch.Tensor)]
    flat: list[float] = _joined(tensors).tolist() if tensors else []
    out: list[list[float | None]] = []
    at = 0
    for r in reads:
        if isinstance(r, torch.Tensor):
            out.append(list(flat[at : at + r.numel()]))
            at += r.numel()
        else:
            out.append(r)
    return out


def resolve(names: Mapping[str, Any], name: str, prefix: str) -> str | None:
    """``name`` as ``names`` spells it: itself, or with the model's ``base_model_prefix`` level added or removed
    (an adapter of a causal LM on its bare model)."""
    if name in names:
        return name
    if prefix and name.startswith(prefix + ".") and name[len(prefix) + 1 :] in names:
        return name[len(prefix) + 1 :]
    if prefix and f"{prefix}.{name}" in names:
        return f"{prefix}.{name}"
    return None


_HOW = {
    "other": "other weights: another checkpoint (or another seed) of this architecture",
    "low_rank": "the same weights plus a low-rank difference: something was merged into this base (an adapter "
    "merged with merge_and_unload, say)",
    "changed": "the same weights, changed throughout: a fine-tuned base (or something of higher rank merged in)",
}


def _differ(
    differ: list[TensorVerdict], checked: int, stamp: Fingerprint, precision: list[str], path: str
) -> Diagnosis:
    kinds = sorted({v.kind for v in differ}, key=lambda k: -sum(1 for v in differ if v.kind == k))
    how = "; ".join(f"{sum(1 for v in differ if v.kind == k)} {_HOW[k]}" for k in kinds)
    example = ", ".join(v.name for v in differ[:3])
    return finding(
        "base_weights_differ",
        f"{path}: the base model's weights are not those the adapter was stamped with: {len(differ)} of {checked} "
        f"sampled tensors differ ({how}), e.g. {example}",
        details={
            "file": path,
            "kind": kinds[0],
            "tensors": [v.name for v in differ[:20]],
            "relative_difference": {v.name: round(v.relative, 6) for v in differ[:20]},
            "checked": checked,
            "stamp_precision": stamp.precision,
            "base_precision": precision,
        },
    )


def _not_verified(unread: list[str], total: int, path: str) -> Diagnosis:
    why = "they are on the meta device (no weights loaded) or not in this model"
    reason = "meta" if len(unread) == total else "partial"
    return finding(
        "base_not_verified",
        f"{path}: the adapter carries a base fingerprint, but {len(unread)} of {total} sampled tensors could not be "
        f"compared ({why}), e.g. {unread[0]}",
        details={"file": path, "reason": reason, "tensors": unread[:20]},
    )
