"""Rewrite an adapter's weights file: keys renamed and dropped, streamed byte for byte.

A rename-only rewrite holds no tensor in memory: the header is rewritten and the data region streamed through
unchanged (safetensors offsets are relative to the data region). Dropped keys are compacted by copying the kept
byte ranges. A pickle source (allowed only with ``allow_pickle=True``) is converted through memory, since it has
no header to rewrite. This module knows files and key maps, not plans: both the loader and the writer use it.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from safe_peft._files.safetensors_header import read_header
from safe_peft.errors import AdapterFormatError

__all__ = ["write_weights"]

_CHUNK = 16 * 1024 * 1024


def write_weights(
    source: str,
    out: str,
    *,
    weights_format: str = "safetensors",
    renames: Mapping[str, str] | None = None,
    dropped: Iterable[str] = (),
    legacy: tuple[bool, ...] | None = None,
    metadata: Callable[[list[str]], dict[str, str]] = lambda _keys: {"format": "pt"},
) -> None:
    """Write the weights of ``source`` to ``out`` as safetensors, keys renamed and dropped.

    ``metadata(original_keys)`` gives the ``__metadata__`` entries to add. A safetensors source streams (no tensor
    is held in memory); a pickle source, or a legacy MergedLinear conversion, goes through memory.
    """
    renames = dict(renames or {})
    gone = set(dropped)
    if weights_format != "safetensors" or legacy is not None:
        from safetensors.torch import load_file, save_file

        from safe_peft._files.legacy import convert_lora_b
        from safe_peft._files.pickled import load_pickle

        tensors = load_pickle(source) if weights_format != "safetensors" else load_file(source)
        if legacy is not None:  # tensor data changes: the one fix that cannot stream
            tensors = {
                k: convert_lora_b(v, legacy) if k.endswith(".lora_B.weight") and v.ndim == 3 else v
                for k, v in tensors.items()
            }
        kept = {renames.get(k, k): v.contiguous() for k, v in tensors.items() if k not in gone}
        carried = read_header(source).metadata if weights_format == "safetensors" else {}  # the stamp, say
        save_file(kept, out, metadata={**carried, **metadata(list(tensors))})
        return
    header = read_header(source)
    missing = [k for k in renames if k not in header.tensors]
    if missing:
        raise ValueError(
            f"{source}: the renames refer to keys the file does not hold (e.g. {missing[0]!r}): "
            "this model converts adapter keys on load, so a rewritten file would not round-trip; "
            "load with safe_load_adapter(..., remap=...) instead"
        )
    ranges: list[tuple[int, int]] = []
    entries: dict[str, Any] = {"__metadata__": {**header.metadata, **metadata(list(header.tensors))}}
    position = 0
    for info in sorted(header.tensors.values(), key=lambda t: t.begin):
        if info.name in gone:
            continue
        size = info.end - info.begin
        entries[renames.get(info.name, info.name)] = {
            "dtype": info.dtype,
            "shape": list(info.shape),
            "data_offsets": [position, position + size],
        }
        ranges.append((info.begin, info.end))
        position += size
    body = json.dumps(entries, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)  # safetensors aligns the data region to 8 bytes
    with open(source, "rb") as src, open(out, "wb") as dst:
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
            raise AdapterFormatError.of("truncated_file", f"{src.name}: ended early")
        dst.write(chunk)
        count -= len(chunk)
