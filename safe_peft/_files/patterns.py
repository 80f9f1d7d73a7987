"""Regular expressions from adapter configs, checked before peft runs them: statically, then by a trial run.

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

import functools
import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from safe_peft._bounds import MAX_PATTERN_CHARS, MAX_PATTERN_ENTRIES, TRIAL_SECONDS, shorten

__all__ = ["Pattern", "compiled", "slow_patterns", "static_fault"]


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
