"""Bounds on the work hostile input can cause: size caps, and regular expressions checked before peft runs them.

Every limit an adapter can reach is a constant here, named in the error that reports it, and listed in
docs/security.md. Real adapters stay far below each one (the margin is given with each constant).

Regular expressions come from adapter configs (``target_modules`` and ``exclude_modules`` as a string,
``rank_pattern`` / ``alpha_pattern`` keys, ``modules_to_save`` and ``layers_pattern`` entries), and peft matches
every module name of the model against them, with Python's backtracking ``re``: a pattern such as ``(.+)+Z`` never
finishes on a 30-character module name, so peft itself would hang. Each pattern is compiled (bounded by
:data:`MAX_PATTERN_CHARS`), then checked statically for the shapes that backtrack catastrophically (repetition nested
in unbounded repetition, alternation or a back-reference under unbounded repetition, three or more unbounded
repetitions in one pattern). Only a pattern of such a shape is then *run*, exactly as peft runs it, on the model's
own module names, in a separate Python process with a deadline (:data:`TRIAL_SECONDS`): it is refused only if it
does not finish there. So the patterns peft users write (``.*\\.(q_proj|v_proj)``,
``model\\.layers\\.\\d+\\.self_attn\\.(q|k|v)_proj``, ``(.*\\.)?(q|v)_proj``) are never run twice, and a suspicious-
looking pattern that is in fact fast on this model is accepted.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import gc
import hashlib
import json
import math
import os
import re
import stat
import subprocess
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

__all__ = [
    "MAX_CONFIG_BYTES",
    "MAX_DETAIL_CHARS",
    "MAX_DETAIL_ITEMS",
    "MAX_INIT_ITERATIONS",
    "MAX_MESSAGE_CHARS",
    "MAX_NDIM",
    "MAX_PATTERN_CHARS",
    "MAX_PATTERN_ENTRIES",
    "MAX_REPLICATED_LAYERS",
    "MAX_TENSORS",
    "TRIAL_SECONDS",
    "Pattern",
    "bounded_details",
    "compiled",
    "gc_paused",
    "json_safe",
    "open_regular",
    "shorten",
    "slow_patterns",
    "static_fault",
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


# -- time: bulk parsing without needless collections -----------------------------------------------------


_GC_LOCK = threading.Lock()
_GC_PAUSES = [0, False]  # how many threads are inside gc_paused(), and whether the GC was enabled before the first


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic GC around bulk building of acyclic strings and tuples.

    The GC is process-wide, so the pause is counted: the first thread in records whether it was enabled and
    disables it, the last one out restores that state, whatever the interleaving of threads (a plain
    disable/enable pair could leave it disabled for good). Nothing else is changed."""
    with _GC_LOCK:
        if _GC_PAUSES[0] == 0:
            _GC_PAUSES[1] = gc.isenabled()
            gc.disable()
        _GC_PAUSES[0] += 1
    try:
        yield
    finally:
        with _GC_LOCK:
            _GC_PAUSES[0] -= 1
            if _GC_PAUSES[0] == 0 and _GC_PAUSES[1]:
                gc.enable()


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


# -- regular expressions from configs --------------------------------------------------------------------------


@dataclass(frozen=True)
class Pattern:
    """A regular expression peft builds from a config value and matches against module names.

    ``key`` is the config key, ``entry`` the value's own pattern (a list entry or a map key; the whole value for
    ``target_modules`` / ``exclude_modules`` strings), ``regex`` the full pattern peft compiles (the entry inside
    peft's own wrapper) and ``how`` ``"fullmatch"`` or ``"match"``."""

    key: str
    entry: str
    regex: str
    how: str


def static_fault(pattern: Pattern) -> tuple[str, str, bool]:
    """Check one config pattern without running it: ``(code, fault, suspicious)``.

    ``fault`` is why it cannot be used at all (``config_limit_exceeded``: too long; ``invalid_config_value``: not a
    regular expression), or ``""``; ``suspicious`` is whether its shape can backtrack catastrophically, so that it
    must pass a trial run (:func:`slow_patterns`).
    """
    if len(pattern.entry) > MAX_PATTERN_CHARS:
        why = f"is {len(pattern.entry):,} characters long (limit {MAX_PATTERN_CHARS:,})"
        return "config_limit_exceeded", why, False
    if len(pattern.regex) <= _CACHED_CHARS:
        return _regex_fault(pattern.regex)
    return _regex_fault.__wrapped__(pattern.regex)


_CACHED_CHARS = 256  # patterns this short (every real one) are checked and compiled once per process


@functools.lru_cache(maxsize=2 * MAX_PATTERN_ENTRIES)
def _regex_fault(regex: str) -> tuple[str, str, bool]:
    try:
        compiled(regex)
    except (re.error, RecursionError, OverflowError, ValueError) as exc:
        return "invalid_config_value", f"is not a valid regular expression ({shorten(str(exc), 200)})", False
    return "", "", _suspicious(regex)


def compiled(regex: str) -> re.Pattern[str]:
    """``re.compile(regex)``, kept for short patterns: a config's thousands of rank_pattern keys overflow ``re``'s
    own 512-entry cache, and each is compiled by the checks and by the expected-keys view."""
    return _compiled(regex) if len(regex) <= _CACHED_CHARS else re.compile(regex)


@functools.lru_cache(maxsize=2 * MAX_PATTERN_ENTRIES)
def _compiled(regex: str) -> re.Pattern[str]:
    return re.compile(regex)


def _suspicious(regex: str) -> bool:
    try:
        from re import _constants as sre  # type: ignore[attr-defined]
        from re import _parser as parser  # type: ignore[attr-defined]
    except ImportError:  # Python 3.10
        import sre_constants as sre
        import sre_parse as parser
    try:
        tree = parser.parse(regex)
    except Exception:  # noqa: BLE001 - compiled above, so this is the parser's own limit: run the trial
        return True
    wide_ops = {sre.MAX_REPEAT, sre.MIN_REPEAT}
    possessive = {getattr(sre, "POSSESSIVE_REPEAT", None), getattr(sre, "ATOMIC_GROUP", None)} - {None}

    def scan(items: Any, in_repeat: bool) -> tuple[int, bool]:
        count, bad = 0, False
        for op, av in items:
            inner: list[tuple[Any, bool]] = []
            if op in wide_ops:
                _low, high, body = av
                wide = high == sre.MAXREPEAT or high > 64
                if wide and in_repeat:
                    bad = True  # (x+)+ : repetition nested in unbounded repetition
                count += wide
                inner.append((body, in_repeat or wide))
            elif op in possessive:  # no backtracking into them
                inner.append((av[-1] if isinstance(av, tuple) else av, False))
            elif op is sre.SUBPATTERN:
                inner.append((av[-1], in_repeat))
            elif op is sre.BRANCH:
                bad |= in_repeat  # (a|aa)+ : overlapping alternatives under repetition
                inner.extend((alt, in_repeat) for alt in av[1])
            elif op in (sre.ASSERT, sre.ASSERT_NOT):
                inner.append((av[1], in_repeat))
            elif op in (sre.GROUPREF, sre.GROUPREF_EXISTS):
                bad = True  # back-references defeat every bound
            for body, nested in inner:
                n, b = scan(body, nested)
                count, bad = count + n, bad or b
        return count, bad

    try:
        count, bad = scan(tree, False)
    except Exception:  # noqa: BLE001 - an unexpected tree shape: let the trial decide
        return True
    return bad or count >= 3


_TRIAL = """
import json, re, sys
job = json.loads(sys.stdin.read())
names = job["names"]
for index, (regex, how) in enumerate(job["patterns"]):
    run = getattr(re.compile(regex), how)
    for name in names:
        run(name)
    sys.stdout.write(f"{index}\\n")
    sys.stdout.flush()
"""


def slow_patterns(patterns: Sequence[Pattern], names: Iterable[str], seconds: float = TRIAL_SECONDS) -> list[Pattern]:
    """The patterns that do not finish matching ``names`` (as peft matches them) within ``seconds``.

    They run one after the other in a fresh Python process (``-I -S``: no site packages, nothing of the caller's),
    killed at the deadline; the pattern it was running then is the slow one, and the ones after it are not tried
    (the caller refuses the config for the first). Nothing of this process is touched.
    """
    if not patterns:
        return []
    job = json.dumps({"patterns": [(p.regex, p.how) for p in patterns], "names": sorted(set(names))})
    key = hashlib.sha256(job.encode()).hexdigest()
    if key in _TRIALS:  # the same config on the same model (diagnose, then load; a batch): tried once
        index = _TRIALS[key]
    else:
        index, settled = _trial(patterns, job, seconds)
        if settled:  # not when the trial process could not even start
            if len(_TRIALS) >= 256:
                _TRIALS.pop(next(iter(_TRIALS)), None)
            _TRIALS[key] = index
    return [] if index is None else [patterns[index]]


_TRIALS: dict[str, int | None] = {}  # sha256 of a trial -> the index of its slow pattern (None: all fast)


def _trial(patterns: Sequence[Pattern], job: str, seconds: float) -> tuple[int | None, bool]:
    """(index of the slow pattern or None, whether that is settled): the trial run itself."""
    executable = sys.executable or ""
    if not executable or not os.path.exists(executable):
        return 0, True  # no interpreter to run the trial in: refuse rather than risk the hang
    try:
        subprocess.run(
            [executable, "-I", "-S", "-c", _TRIAL],
            input=job,
            capture_output=True,
            text=True,
            timeout=seconds,
            check=True,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return min(len(out.split()), len(patterns) - 1), True
    except subprocess.CalledProcessError:
        return 0, True  # the pattern crashed the trial: refuse
    except OSError:
        return 0, False  # the trial could not start: refuse this time, never hang
    return None, True
