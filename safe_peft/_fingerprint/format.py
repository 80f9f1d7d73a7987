"""The base fingerprint's stored form: what a stamp holds, where its samples are, and how it is encoded in the
adapter's safetensors ``__metadata__`` (key :data:`KEY`) and parsed back, bounded, from untrusted input.

A stamp is ``v1.`` + base64 of zlib-compressed JSON: the sampled tensors' names and shapes, the grid size, the
precision the base held them in, and the values as float32. The positions are not stored: they are a function of
each tensor's name and shape (:func:`positions`), the same on any device, in any dtype, sharded or not.

>>> positions("model.layers.0.self_attn.q_proj.weight", (64, 64), 2)
((1, 31), (34, 35))
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import math
import struct
import zlib
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ABSOLUTE_FLOOR",
    "KEY",
    "MAX_STAMP_CHARS",
    "MAX_TENSORS",
    "OTHER_WEIGHTS",
    "QUANTIZED",
    "ROUNDOFF",
    "Fingerprint",
    "FingerprintError",
    "Sampled",
    "grid_for",
    "positions",
]

KEY = "safe_peft.base_fingerprint"
VERSION = 1
BUDGET = 1024  # sampled values in all (4 bytes each before compression)
MAX_TENSORS = 256  # tensors sampled; a larger set is thinned deterministically by the hash of their names
MIN_GRID, MAX_GRID = 2, 16
MAX_STAMP_CHARS = 64 * 1024  # a stamp longer than this is refused unread: bounded parsing
MAX_DECODED = 256 * 1024
MAX_NAME = 1000
_PREFIX = "v1."
# Unit roundoff of each precision (relative error of one rounding); quantized formats use a relative-L2 bound
ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8, "float8": 2.0**-3}
QUANTIZED = {"int8": 0.03, "nf4": 0.2, "fp4": 0.25}  # relative L2 of the sample, per side (docs/fingerprint.md)
ABSOLUTE_FLOOR = 1e-7  # float16 subnormals and values near zero
OTHER_WEIGHTS = 0.5  # a relative difference above this: not the same weights changed, other weights


class FingerprintError(ValueError):
    """A fingerprint that cannot be made or read: the base is on the meta device or sharded, no tensor the adapter
    modifies is in the base, the adapter is not a local safetensors file, or a stored stamp is malformed.

    ``str(err)``: ``"/data/adapter/adapter_model.safetensors: the base fingerprint is malformed (not valid
    base64); stamp the adapter again (safe-peft stamp ADAPTER --base BASE)"``
    """


@dataclass(frozen=True)
class Sampled:
    """One sampled tensor: its name in the base, its shape, and the values at :func:`positions` (row-major)."""

    name: str
    shape: tuple[int, ...]
    values: tuple[float, ...]


@dataclass(frozen=True)
class Fingerprint:
    """The stamp: sampled tensors, the grid size, the precision they were read in, and the base's class."""

    tensors: tuple[Sampled, ...]
    grid: int
    precision: str
    base: str = ""

    def encode(self) -> str:
        """The metadata value: ``v1.`` + base64 of zlib-compressed JSON (names, shapes, float32 values)."""
        values = [v for t in self.tensors for v in t.values]
        payload = {
            "version": VERSION,
            "grid": self.grid,
            "precision": self.precision,
            "base": self.base[:200],
            "tensors": [[t.name, list(t.shape)] for t in self.tensors],
            "values": base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode("ascii"),
        }
        text = json.dumps(payload, separators=(",", ":"))
        return _PREFIX + base64.b64encode(zlib.compress(text.encode(), 9)).decode("ascii")

    @classmethod
    def decode(cls, text: str, path: str) -> Fingerprint:
        """Parse a stored stamp; raises :class:`FingerprintError` naming ``path`` for anything malformed."""
        if len(text) > MAX_STAMP_CHARS:
            raise _malformed(path, f"{len(text):,} characters (limit {MAX_STAMP_CHARS:,})")
        if not text.startswith(_PREFIX):
            raise _malformed(path, f"unknown format {text[:8]!r} (expected {_PREFIX!r}; a newer safe_peft?)")
        try:
            packed = base64.b64decode(text[len(_PREFIX) :], validate=True)
            inflate = zlib.decompressobj()
            raw = inflate.decompress(packed, MAX_DECODED)
            if inflate.unconsumed_tail:
                raise _malformed(path, f"it decompresses to more than {MAX_DECODED:,} bytes")
            data = json.loads(raw.decode("utf-8"))
        except (binascii.Error, ValueError, zlib.error, RecursionError) as exc:
            raise _malformed(path, f"not valid base64 / zlib / JSON ({str(exc)[:80]})") from None
        return _from_payload(data, path)


def _from_payload(data: Any, path: str) -> Fingerprint:
    if not isinstance(data, dict) or data.get("version") != VERSION:
        raise _malformed(path, "not a version-1 fingerprint object")
    grid, precision, base, entries = data.get("grid"), data.get("precision"), data.get("base", ""), data.get("tensors")
    if type(grid) is not int or not MIN_GRID <= grid <= MAX_GRID:
        raise _malformed(path, f"grid must be an integer in [{MIN_GRID}, {MAX_GRID}]")
    if precision not in ROUNDOFF and precision not in QUANTIZED:
        raise _malformed(path, f"unknown precision {str(precision)[:20]!r}")
    if not isinstance(base, str) or not isinstance(entries, list) or len(entries) > MAX_TENSORS:
        raise _malformed(path, f"tensors must be a list of at most {MAX_TENSORS} entries")
    shapes: list[tuple[str, tuple[int, ...]]] = []
    for entry in entries:
        named = isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
        if not named or len(entry[0]) > MAX_NAME:
            raise _malformed(path, "each tensor entry must be [name, shape]")
        shape = entry[1]
        if not (isinstance(shape, list) and 1 <= len(shape) <= 8 and all(type(d) is int and d > 0 for d in shape)):
            raise _malformed(path, f"tensor {entry[0][:80]!r}: shape must be 1 to 8 positive integers")
        shapes.append((entry[0], tuple(shape)))
    counts = [len(r) * len(c) for r, c in (positions(n, s, grid) for n, s in shapes)]
    try:
        blob = base64.b64decode(str(data.get("values")), validate=True)
    except (binascii.Error, ValueError):
        raise _malformed(path, "values are not valid base64") from None
    if len(blob) != 4 * sum(counts):
        raise _malformed(path, f"{len(blob) // 4} values for {sum(counts)} sampled positions")
    flat = struct.unpack(f"<{sum(counts)}f", blob)
    if not math.isfinite(sum(flat)):  # a NaN or an infinity carries into the sum; float32 values cannot overflow it
        raise _malformed(path, "a sampled value is not finite")
    tensors, at = [], 0
    for (name, shape), n in zip(shapes, counts, strict=True):
        tensors.append(Sampled(name, shape, tuple(flat[at : at + n])))
        at += n
    return Fingerprint(tuple(tensors), grid, str(precision), base)


def _malformed(path: str, what: str) -> FingerprintError:
    return FingerprintError(
        f"{path}: the base fingerprint is malformed ({what}); stamp the adapter again "
        "(safe-peft stamp ADAPTER --base BASE), or load with verify_base=False"
    )


# -- where the samples are ---------------------------------------------------------------------------------------


def grid_for(count: int) -> int:
    """The grid side for ``count`` tensors: as many values as the budget allows, 2 to 16 per side."""
    return max(MIN_GRID, min(MAX_GRID, math.isqrt(BUDGET // max(count, 1))))


@functools.lru_cache(maxsize=4096)
def positions(name: str, shape: tuple[int, ...], grid: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The sampled rows (first dimension) and columns (the other dimensions flattened) of a tensor: a function of
    its name and shape alone. A 1-D tensor has one row."""
    rows = shape[0] if len(shape) > 1 else 1
    cols = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    seed = f"{name}|{','.join(map(str, shape))}"
    return _pick(seed + "|r", rows, grid), _pick(seed + "|c", cols, grid)


def _pick(seed: str, n: int, k: int) -> tuple[int, ...]:
    if n <= k:
        return tuple(range(n))
    chosen: set[int] = set()
    i = 0
    while len(chosen) < k:
        digest = hashlib.sha256(f"{seed}|{i}".encode()).digest()
        chosen.add(int.from_bytes(digest[:8], "little") % n)
        i += 1
    return tuple(sorted(chosen))
