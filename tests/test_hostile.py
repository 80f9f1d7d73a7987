"""The hostile-input battery (issue 16), run the way ``tests/support/hostile.py`` describes: one process writes every
case's files, a second one measures them, so each case's time and peak memory are its own and not the building's.

For every case, on every surface that reads an adapter (``diagnose`` on a base and on a PeftModel, the first adapter,
a further adapter, transformers' in-place route, a hot-swap, ``safe-peft check --json`` with a base and with
``--target``, ``safe-peft inspect --json``, ``safe-peft fix`` and ``fix --target``): no exception that is not
safe-peft's own escapes; every surface gives the case's code (the engine check: for the files it reads); a refused
load leaves the model unchanged, a load that goes through is exact, and a refused fix writes nothing; every call
finishes within :data:`SECONDS` of CPU time (and a bounded wall time); the process's peak memory stays within
:data:`MEMORY_RATIO` of a clean run's; messages and JSON are bounded and the JSON is strict.
``SAFE_PEFT_STRESS=1`` adds the heavy variants (``hostile.py``'s ``STRESS`` cases).
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest

from tests.support import hostile

SECONDS = 5.0  # CPU seconds of each call of each case (the process and its regex trial runs)
# Wall time: the machine running the suite may be shared (make test beside other work), which stretches wall time
# but not CPU time; wall time is still bounded, for what takes no CPU (a read blocking on a FIFO, a hang).
WALL_SECONDS = 3 * SECONDS
MEMORY_RATIO = 1.5  # peak resident memory against a clean run's
MESSAGE_CHARS = 20_000  # a report's text, a load error's text
JSON_CHARS = 200_000  # one --json document / one report's to_dict(), besides twice the adapter's own bytes
HERE = os.path.dirname(os.path.abspath(__file__))
NAMES = [case.name for case in hostile.CASES]


def _step(*args: str, timeout: float) -> None:
    path = os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": path}  # this checkout's safe_peft, not an install's
    proc = subprocess.run(
        [sys.executable, "-m", "tests.support.hostile", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, f"hostile.py {args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def battery(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("hostile")
    out = root / "results.json"
    _step("make", str(root), timeout=600)
    _step("run", str(root), str(out), timeout=900)
    with open(out) as f:
        document: dict[str, Any] = hostile.strict_json(f.read())
    document["by_name"] = {r["name"]: r for r in document["results"]}
    return document


def test_the_battery_is_large_enough() -> None:
    assert len(NAMES) >= 60
    assert len(set(NAMES)) == len(NAMES)
    assert sum(case.code is not None for case in hostile.CASES) >= 60  # refusals, besides the controls


def test_the_clean_run_loads_exactly(battery: dict[str, Any]) -> None:
    clean = battery["clean"]
    assert clean["raw"] == [] and set(clean["codes"].values()) == {None}
    assert clean["outputs_exact"]
    assert clean["exits"] == {"check": 0, "check_target": 0, "inspect": 0, "fix": 0, "fix_target": 0}
    assert clean["verdicts"] == {"check": "compatible", "check_target": "serves"}
    assert battery["baseline_kb"] > 0


# Every surface that reads an adapter. The Python ones give the case's code; so does `safe-peft check --base`.
PYTHON_SURFACES = ("diagnose", "load", "diagnose_peft", "load_further", "inplace", "hotswap")
LOADS = ("load", "load_further", "inplace", "hotswap")
# Where a surface rightly gives another code than the first adapter's, and why (none today).
SURFACE_DIFFERS: dict[tuple[str, str], str | None] = {}
# Cases whose refusal comes from the base model, which an engine check (no model) does not have: it reads the files
# and judges them as its engine does.
# Likewise the refusals of the installed peft's own config classes: an engine check reads the JSON as its engine
# does, without peft.
NEEDS_THE_MODEL = {
    "init_corda_unprepared": "CorDA's precondition is a property of the base model (preprocess_corda ran on it)",
    "init_loftq_without_config": "peft's LoraConfig refuses init_lora_weights='loftq' without loftq_config",
    "peft_type_unknown": "unknown to the installed peft; every engine loads LoRA only (its not_lora refusal)",
    "peft_type_10mb": "unknown to the installed peft; every engine loads LoRA only (its not_lora refusal)",
}


@pytest.mark.parametrize("name", NAMES)
def test_hostile_case(name: str, battery: dict[str, Any]) -> None:
    case = next(c for c in hostile.CASES if c.name == name)
    result = battery["by_name"][name]
    assert result["raw"] == [], result["raw"]
    for surface in PYTHON_SURFACES:
        if surface not in result["codes"]:  # a hot-swap takes no adapter_name of its own
            assert surface == "hotswap" and case.kwargs
            continue
        expected = SURFACE_DIFFERS.get((name, surface), case.code)
        assert result["codes"][surface] == expected, (surface, result["codes"])
    if case.code is None:
        assert result["outputs_exact"], "the load went through but the model is not the trained one"
    else:
        assert all(result["unchanged"].get(s, True) for s in LOADS), f"a refused load changed: {result['unchanged']}"
        assert result["load_message_chars"] <= MESSAGE_CHARS
    if case.cli:
        _cli_surfaces_agree(case, result)
    assert result["message_chars"] <= MESSAGE_CHARS
    assert result["diagnose_json_chars"] <= JSON_CHARS + 2 * result["input_bytes"]
    busy = {call: round(s, 2) for call, s in result["cpu"].items() if s > SECONDS}
    assert not busy, f"over {SECONDS} CPU seconds: {busy}"
    slow = {call: round(s, 2) for call, s in result["seconds"].items() if s > WALL_SECONDS}
    assert not slow, f"over {WALL_SECONDS} s: {slow}"
    ratio = result["hwm_kb"] / battery["baseline_kb"]
    assert ratio <= MEMORY_RATIO, f"peak memory {ratio:.2f} x the clean run's"


def _cli_surfaces_agree(case: hostile.Case, result: dict[str, Any]) -> None:
    """`check` gives the case's code; a file the peft check cannot read, the engine check cannot read either (same
    code, verdict unreadable, exit 2); `fix` and `fix --target` write nothing for such a file (exit 2), `fix`
    nothing for an adapter that does not fit (exit 1), and write a control."""
    verdicts, exits, written = result["verdicts"], result["exits"], result["written"]
    assert result["codes"]["check"] == case.code
    assert (verdicts["check"] == "compatible") == (case.code is None), verdicts
    assert (exits["check"] == 0) == (case.code is None), exits
    unreadable = verdicts["check"] == "unreadable"
    if unreadable and case.name not in NEEDS_THE_MODEL:
        assert result["codes"]["check_target"] == case.code, result["codes"]
        assert verdicts["check_target"] == "unreadable" and exits["check_target"] == 2
    else:
        assert verdicts["check_target"] != "unreadable", result["codes"]
    assert exits["inspect"] in (0, 2), exits  # a summary, or one line saying why the files cannot be read
    want_fix = 0 if case.code is None else (2 if unreadable else 1)
    assert exits["fix"] == want_fix and written["fix"] == (want_fix == 0), (exits, written)
    if unreadable and case.name not in NEEDS_THE_MODEL:
        assert exits["fix_target"] == 2 and not written["fix_target"], (exits, written)
    else:
        assert exits["fix_target"] in (0, 1) and written["fix_target"] == (exits["fix_target"] == 0), (exits, written)
    # parsed strictly by hostile.py (no NaN / Infinity); every key listed, so it grows with the header alone
    assert result["json_chars"] <= JSON_CHARS + 2 * result["input_bytes"]


def test_strict_json_refuses_non_finite_numbers() -> None:
    """The battery's own JSON check is a strict parser: Python's json accepts NaN / Infinity by default."""
    for text in ('{"r": NaN}', '{"r": Infinity}', "[-Infinity]"):
        with pytest.raises(ValueError, match="not JSON"):
            hostile.strict_json(text)
    assert hostile.strict_json('{"r": 8, "a": [1.5, "NaN"]}') == {"r": 8, "a": [1.5, "NaN"]}


def test_every_case_ran(battery: dict[str, Any]) -> None:
    assert [r["name"] for r in battery["results"]] == NAMES
    assert battery["busiest_cpu_s"] <= SECONDS and battery["slowest_s"] <= WALL_SECONDS
    assert battery["peak_ratio"] <= MEMORY_RATIO
