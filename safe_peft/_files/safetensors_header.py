"""Read and validate a safetensors header with the standard library alone.

The format is an 8-byte little-endian header length, that many bytes of UTF-8 JSON, then the
data region. Everything is checked before any tensor data is touched, and nothing is
allocated beyond the header itself, which is bounded by the file size and by
``MAX_HEADER_BYTES``. Each fault is an :class:`AdapterFormatError` with
``Cause.CORRUPT_CHECKPOINT`` and a stable ``code``.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import Any

from safe_peft._bounds import MAX_NDIM, MAX_TENSORS, open_regular
from safe_peft._keys import gc_paused
from safe_peft.errors import AdapterFormatError

__all__ = ["MAX_HEADER_BYTES", "SafetensorsHeader", "read_header", "read_scalar"]

MAX_HEADER_BYTES = 100_000_000  # the limit safetensors itself enforces

DTYPE_SIZES: dict[str, float] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "F4": 0.5,
    "F6_E2M3": 0.75,
    "F6_E3M2": 0.75,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in the header. Offsets are relative to the data region."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header: tensors in file order, the ``__metadata__`` map, and where data starts."""

    path: str
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int
    file_size: int

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def sniff_format(first_bytes: bytes) -> str | None:
    """Name the container a file that is *not* a readable safetensors file is, from its first bytes: "pickle",
    "zip" or None. Only asked once the safetensors reading of the same bytes has failed: a valid header length
    of 640 bytes is ``80 02 00 ...``, which is also how a protocol-2 pickle starts."""
    if first_bytes[:4] == b"PK\x03\x04":
        return "zip"  # torch.save's default format is a zip archive holding a pickle
    if len(first_bytes) >= 2 and first_bytes[0] == 0x80 and 2 <= first_bytes[1] <= 5:
        return "pickle"
    return None


def read_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Read and validate the header of the safetensors file at ``path``.

    Raises :class:`AdapterFormatError` naming the file (and the tensor, where one is at fault).
    """
    path = os.fspath(path)
    try:
        f, file_size = open_regular(path)
        with f:
            prefix = f.read(8) if file_size >= 8 else b""  # never more than it says it holds
            if len(prefix) < 8:
                raise _fault(
                    path, "truncated_file", f"the file has {file_size} bytes, fewer than the 8-byte header length"
                )
            (length,) = struct.unpack("<Q", prefix)
            opening = f.read(1) if 0 < length <= file_size - 8 else b""
            container = sniff_format(prefix) if opening != b"{" else None
            if container is not None:
                raise _fault(
                    path,
                    "not_safetensors",
                    f"the file is a {container} file (torch.save format), not safetensors",
                    details={"format": container},
                )
            f.seek(8)
            if length > MAX_HEADER_BYTES:
                raise _fault(path, "header_too_large", f"the header claims {length} bytes (limit {MAX_HEADER_BYTES})")
            if length > file_size - 8:
                raise _fault(
                    path, "truncated_file", f"the header claims {length} bytes but only {file_size - 8} follow"
                )
            raw = f.read(length)
    except OSError as exc:
        raise AdapterFormatError.of(
            "unreadable_file",
            f"{path}: cannot read the file ({exc.strerror or exc})",
            adapter=path,
        ) from None
    if len(raw) < length:
        raise _fault(path, "truncated_file", f"the header claims {length} bytes but only {len(raw)} could be read")
    with gc_paused():  # a 100k-tensor header builds a million acyclic objects: no collection can free any
        entries, metadata = _parse_json(path, raw)
        data_size = file_size - 8 - length
        tensors = _validate_entries(path, entries, data_size)
    return SafetensorsHeader(path=path, tensors=tensors, metadata=metadata, data_start=8 + length, file_size=file_size)


def read_scalar(header: SafetensorsHeader, key: str) -> float:
    """The value of a one-element tensor (a kohya ``alpha``): a few bytes read at its offset."""
    info = header.tensors[key]
    formats = {"F32": "<f", "F64": "<d", "F16": "<e", "I64": "<q", "I32": "<i"}
    f, _ = open_regular(header.path)
    with f:
        f.seek(header.data_start + info.begin)
        raw = f.read(info.end - info.begin)
    if info.dtype == "BF16" and len(raw) == 2:
        return float(struct.unpack("<f", b"\x00\x00" + raw)[0])
    if info.dtype not in formats or len(raw) != struct.calcsize(formats[info.dtype]):
        raise AdapterFormatError.of("bad_entry", f"{header.path}: {key!r} is not a scalar alpha", adapter=header.path)
    return float(struct.unpack(formats[info.dtype], raw)[0])


def _parse_json(path: str, raw: bytes) -> tuple[list[tuple[str, Any]], dict[str, str]]:
    claimed = raw.count(b'"data_offsets"')  # every entry names its offsets: a bound on the count, before parsing
    if claimed > MAX_TENSORS + 16:
        raise _too_many(path, claimed)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _fault(path, "bad_json", f"the header is not valid UTF-8 (byte {exc.start})") from None
    duplicates: list[str] = []

    def pairs_hook(pairs: list[tuple[str, Any]]) -> Any:
        found = dict(pairs)  # C speed; only when a key repeats are the pairs looked at one by one
        if len(found) != len(pairs):
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    duplicates.append(key)
                seen.add(key)
        return _Object(found)

    try:
        top = json.loads(text, object_pairs_hook=pairs_hook, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise _fault(path, "bad_json", f"the header is not valid JSON ({str(exc)[:200]})") from None
    if duplicates:
        raise _fault(
            path,
            "duplicate_header_key",
            f"the header lists {duplicates[0]!r} more than once (a JSON parser would silently keep the last)",
            details={"keys": sorted(set(duplicates))[:20]},
        )
    if not isinstance(top, _Object):
        raise _fault(path, "bad_json", f"the header is a JSON {type(top).__name__}, not an object")
    metadata: dict[str, str] = {}
    if "__metadata__" in top:
        value = top.pop("__metadata__")
        if not isinstance(value, _Object) or not all(isinstance(v, str) for v in value.values()):
            raise _fault(path, "bad_metadata", "__metadata__ must map strings to strings")
        metadata = dict(value)
    if len(top) > MAX_TENSORS:
        raise _too_many(path, len(top))
    return list(top.items()), metadata


def _too_many(path: str, count: int) -> AdapterFormatError:
    return _fault(
        path,
        "too_many_tensors",
        f"the header lists {count:,} tensors (limit {MAX_TENSORS:,}; a LoRA on every expert of the largest MoE "
        "models has about 140,000)",
        details={"tensors": count, "limit": MAX_TENSORS},
    )


def _no_constant(text: str) -> Any:
    raise ValueError(f"{text} is not a JSON value")


def _validate_entries(path: str, entries: list[tuple[str, Any]], data_size: int) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    limit = data_size * 2 + 1
    for name, fields in entries:
        if type(fields) is not _Object or not ("dtype" in fields and "shape" in fields and "data_offsets" in fields):
            raise _fault(path, "bad_entry", f"tensor {name!r}: entry must have dtype, shape and data_offsets", name)
        dtype, shape, offsets = fields["dtype"], fields["shape"], fields["data_offsets"]
        size = DTYPE_SIZES.get(dtype) if type(dtype) is str else None
        if size is None:
            raise _fault(path, "bad_dtype", f"tensor {name!r}: unknown dtype {str(dtype)[:40]!r}", name)
        if type(shape) is not list or not all(type(d) is int and d >= 0 for d in shape):
            raise _fault(path, "bad_shape", f"tensor {name!r}: shape must be a list of non-negative integers", name)
        if len(shape) > MAX_NDIM:
            raise _fault(
                path, "bad_shape", f"tensor {name!r}: shape has {len(shape):,} dimensions (limit {MAX_NDIM})", name
            )
        if not (type(offsets) is list and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)):
            raise _fault(path, "bad_offsets", f"tensor {name!r}: data_offsets must be two non-negative integers", name)
        begin, end = offsets
        if begin > end:
            raise _fault(path, "bad_offsets", f"tensor {name!r}: data_offsets [{begin}, {end}] run backwards", name)
        numel = 1
        for d in shape:
            numel *= d
            if numel > limit:  # stop multiplying absurd shapes early; any such shape fails below
                break
        expected = numel * size
        if expected != end - begin:
            raise _fault(
                path,
                "bad_offsets",
                f"tensor {name!r}: shape {shape} of {dtype} needs {expected:g} bytes, offsets span {end - begin}",
                name,
            )
        if end > data_size:
            raise _fault(
                path,
                "truncated_file",
                f"tensor {name!r} ends at byte {end} of the data region, which has only {data_size} bytes "
                "(an incomplete download or copy?)",
                name,
            )
        tensors[name] = TensorInfo(name, dtype, tuple(shape), begin, end)
    position = 0
    for info in sorted(tensors.values(), key=_offsets):
        if info.begin != position:
            what = "overlaps the previous tensor" if info.begin < position else "leaves a hole before it"
            raise _fault(path, "bad_offsets", f"tensor {info.name!r}: data at byte {info.begin} {what}", info.name)
        position = info.end
    if position != data_size:
        raise _fault(
            path,
            "trailing_bytes",
            f"the data region has {data_size} bytes but the tensors cover {position}",
        )
    return tensors


def _offsets(info: TensorInfo) -> tuple[int, int]:
    return info.begin, info.end


class _Object(dict):  # type: ignore[type-arg]
    """A JSON object of the header (a dict subclass, so a tensor entry is told from other JSON values)."""

    __slots__ = ()


def _fault(
    path: str, code: str, what: str, tensor: str | None = None, details: dict[str, Any] | None = None
) -> AdapterFormatError:
    facts: dict[str, Any] = {"file": path, **(details or {})}
    if tensor is not None:
        facts["tensor"] = tensor
    return AdapterFormatError.of(code, f"{path}: {what}", adapter=path, details=facts)
