"""Bounds on the work hostile input can cause: the size caps, and the shortening of what findings echo.

Every limit an adapter can reach is a constant here, named in the error that reports it, and listed in
docs/security.md. Real adapters stay far below each one (the margin is given with each constant).

The regular expressions of configs are checked against these caps, statically and by trial, in
:mod:`safe_peft._files.patterns`.
"""

from __future__ import annotations

import errno
import math
import os
import stat
from collections.abc import Mapping
from typing import Any, BinaryIO

__all__ = [
    "MAX_CONFIG_BYTES",
    "MAX_INIT_ITERATIONS",
    "MAX_NDIM",
    "MAX_PATTERN_CHARS",
    "MAX_PATTERN_ENTRIES",
    "MAX_REPLICATED_LAYERS",
    "MAX_TENSORS",
    "TRIAL_SECONDS",
    "bounded_details",
    "json_safe",
    "open_regular",
    "shorten",
]

# adapter_config.json: peft writes 1-3 KB; a per-module rank_pattern of a 70B model is about 50 KB.
MAX_CONFIG_BYTES = 16 * 1024 * 1024
# a regular expression or a module name taken from a config: real ones are under 1,000 characters.
MAX_PATTERN_CHARS = 10_000
# entries of target_modules / exclude_modules / modules_to_save / layers_pattern / layers_to_transform /
# target_parameters lists and keys of rank_pattern / alpha_pattern: a per-module list of a 70B model has ~600.
MAX_PATTERN_ENTRIES = 10_000
# layers that layer_replication creates in all: real configs double or triple an 80-layer model.
MAX_REPLICATED_LAYERS = 4_096
# tensors in one safetensors header: a LoRA on every expert of a 61-layer, 384-expert MoE has ~140,000.
MAX_TENSORS = 1_000_000
# dimensions of one tensor: adapter tensors have 1 to 4.
MAX_NDIM = 64
# the deadline of a suspicious pattern's trial run on the model's module names (real ones take milliseconds).
TRIAL_SECONDS = 1.0
# iterations an initialisation runs on load (init_lora_weights="pissa_niter_N", loftq_config's loftq_iter): peft's
# docs use 4 to 16; each iteration is a pass of SVD work over every targeted weight.
MAX_INIT_ITERATIONS = 1_024
# the text of one finding (its message and its fix), and each string / list inside its details.
MAX_MESSAGE_CHARS = 4_000
MAX_DETAIL_CHARS = 2_000
MAX_DETAIL_ITEMS = 200


def shorten(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``text`` cut to about ``limit`` characters, keeping its start and end and saying how much was left out."""
    if len(text) <= limit:
        return text
    keep = max(limit - 40, 2)
    head, tail = text[: keep * 3 // 4], text[len(text) - keep // 4 :]
    return f"{head}... [{len(text) - len(head) - len(tail):,} characters left out] ...{tail}"


def bounded_details(value: Any, depth: int = 0) -> Any:
    """A finding's details with long strings shortened, long lists and maps cut, and non-finite floats spelled
    out (``"nan"``): they are echoed into messages and JSON, so a 10 MB config value must not be copied whole."""
    if isinstance(value, str):
        return shorten(value, MAX_DETAIL_CHARS)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (bool, int, float)) or value is None:
        return value
    if depth > 8:
        return shorten(repr(value), MAX_DETAIL_CHARS)
    if isinstance(value, Mapping):
        items = list(value.items())
        return {
            (shorten(k, MAX_DETAIL_CHARS) if isinstance(k, str) else k): bounded_details(v, depth + 1)
            for k, v in items[:MAX_DETAIL_ITEMS]
        }
    if isinstance(value, (list, tuple, set, frozenset)):
        short = len(value) <= MAX_DETAIL_ITEMS
        if short and all(isinstance(v, (int, float, bool)) and math.isfinite(v) for v in value):
            return value  # the common case (shapes, counts): kept as it is
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else list(value)
        cut = [bounded_details(v, depth + 1) for v in items[:MAX_DETAIL_ITEMS]]
        return tuple(cut) if isinstance(value, tuple) else cut
    return shorten(str(value), MAX_DETAIL_CHARS)


def json_safe(value: Any) -> Any:
    """``value`` as strict JSON data: maps with string keys, lists (sets sorted), non-finite floats spelled out
    (``"nan"``: strict JSON has none), anything else as its text."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value) if isinstance(value, (set, frozenset)) else value
        return [json_safe(v) for v in items]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # strict JSON has no NaN / Infinity
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def open_regular(path: str) -> tuple[BinaryIO, int]:
    """Open ``path`` for reading without ever blocking, and refuse anything but a regular file: the file and its
    size. Opened non-blocking (a FIFO or device swapped in opens at once), then refused (``OSError``) unless it is a
    regular file; readers read at most its size, so a pseudo-file that says it is empty (``/proc/kmsg``) is never
    read from."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    fd = os.open(path, flags)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file (a device, FIFO or socket: reading it could block)", path)
        return os.fdopen(fd, "rb"), info.st_size
    except BaseException:
        os.close(fd)
        raise
