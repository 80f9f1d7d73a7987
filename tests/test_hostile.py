"""The hostile-input battery (issue 16), run the way ``tests/hostile.py`` describes: one process writes every case's
files, a second one measures them, so each case's time and peak memory are its own and not the building's.

For every case: no exception that is not safe-peft's own escapes ``diagnose``, ``safe_load_adapter`` or
``safe-peft check --json``; all three give the case's code; a refused load leaves the base unchanged and a load that
goes through is exact; every call finishes within :data:`SECONDS` of CPU time (and a bounded wall time); the
process's peak memory stays within :data:`MEMORY_RATIO` of a clean run's; messages and JSON are bounded and the JSON
is strict.
``SAFE_PEFT_STRESS=1`` adds the heavy variants (``hostile.py``'s ``STRESS`` cases).
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import hostile
import pytest

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
        [sys.executable, os.path.join(HERE, "hostile.py"), *args],
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
    assert clean["raw"] == [] and clean["diagnose"] is None and clean["load"] is None and clean["check"] is None
    assert clean["outputs_exact"] and clean["exit"] == 0 and clean["verdict"] == "compatible"
    assert battery["baseline_kb"] > 0


@pytest.mark.parametrize("name", NAMES)
def test_hostile_case(name: str, battery: dict[str, Any]) -> None:
    case = next(c for c in hostile.CASES if c.name == name)
    result = battery["by_name"][name]
    assert result["raw"] == [], result["raw"]
    assert result["diagnose"] == case.code
    assert result["load"] == case.code
    if case.code is None:
        assert result["outputs_exact"], "the load went through but the model is not the trained one"
    else:
        assert result["base_unchanged"], "a refused load left the base model changed"
        assert result["load_message_chars"] <= MESSAGE_CHARS
    if case.cli:
        assert result["check"] == case.code
        assert (result["verdict"] == "compatible") == (case.code is None), result["verdict"]
        assert (result["exit"] == 0) == (case.code is None), result["exit"]
        # parsed strictly by hostile.py (no NaN / Infinity); every key listed, so it grows with the header alone
        assert result["json_chars"] <= JSON_CHARS + 2 * result["input_bytes"]
    assert result["message_chars"] <= MESSAGE_CHARS
    assert result["diagnose_json_chars"] <= JSON_CHARS + 2 * result["input_bytes"]
    busy = {call: round(s, 2) for call, s in result["cpu"].items() if s > SECONDS}
    assert not busy, f"over {SECONDS} CPU seconds: {busy}"
    slow = {call: round(s, 2) for call, s in result["seconds"].items() if s > WALL_SECONDS}
    assert not slow, f"over {WALL_SECONDS} s: {slow}"
    ratio = result["hwm_kb"] / battery["baseline_kb"]
    assert ratio <= MEMORY_RATIO, f"peak memory {ratio:.2f} x the clean run's"


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
