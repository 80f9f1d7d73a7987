"""The record of what one CI environment ran: package versions and test outcomes, for docs/compatibility.md.

Hooked in by tests/conftest.py. Written only when ``SAFE_PEFT_COMPAT_ENV`` names the environment (the Makefile's
``test`` and ``test-oldest`` set it), to ``build/compat/<env>.json``; ``make compat-docs`` copies the records to
docs/compat/ and renders the tables (tools/compat.py).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import sys
import time
from collections import Counter
from importlib import metadata
from typing import Any

import pytest

ENV_VAR = "SAFE_PEFT_COMPAT_ENV"
PACKAGES = ("torch", "peft", "transformers", "safetensors", "accelerate", "huggingface_hub")
QUANTIZATION = ("bitsandbytes", "torchao", "optimum-quanto", "hqq")
QUANTIZED_TESTS = "tests/test_quantized.py::"


def _commit(root: str) -> str | None:
    """The commit the suite ran at (with ``+changes`` when the work tree differed from it), or None outside git."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True)
    except OSError:
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


class Recorder:
    """Counts each test's outcome (setup / call / teardown folded into one) and the quantized table's per backend."""

    def __init__(self, env: str) -> None:
        self.env = env
        self.started = time.monotonic()
        self.outcomes: dict[str, str] = {}
        self.skip_reasons: dict[str, str] = {}

    def add(self, report: pytest.TestReport) -> None:
        nodeid = report.nodeid
        if report.failed:
            self.outcomes[nodeid] = "failed" if report.when == "call" else "errors"
        elif report.skipped:
            self.outcomes[nodeid] = "xfailed" if hasattr(report, "wasxfail") else "skipped"
            if isinstance(report.longrepr, tuple):
                self.skip_reasons[nodeid] = str(report.longrepr[2]).removeprefix("Skipped: ")
        elif report.when == "call" and nodeid not in self.outcomes:
            self.outcomes[nodeid] = "passed"

    def record(self, session: pytest.Session, exitstatus: int) -> dict[str, Any]:
        counts = Counter(self.outcomes.values())
        quantized: dict[str, dict[str, Any]] = {}
        for nodeid, outcome in sorted(self.outcomes.items()):
            match = re.search(r"\[([A-Za-z0-9_]+)", nodeid) if nodeid.startswith(QUANTIZED_TESTS) else None
            if match is None:
                continue
            entry = quantized.setdefault(match.group(1), {"passed": 0, "failed": 0, "skipped": 0, "errors": 0})
            entry[outcome if outcome in entry else "failed"] += 1
            if nodeid in self.skip_reasons:
                entry.setdefault("skip_reason", self.skip_reasons[nodeid])
        config = session.config
        args = sorted(os.path.relpath(str(a), str(config.rootpath)) for a in config.args)
        selected = bool(config.getoption("keyword") or config.getoption("markexpr") or config.getoption("lf", False))
        return {
            "env": self.env,
            "commit": _commit(str(config.rootpath)),
            "python": platform.python_version(),
            "platform": f"{platform.system()} {platform.machine()}, CPU only",
            "packages": {name: _version(name) for name in PACKAGES},
            "quantization_packages": {name: _version(name) for name in QUANTIZATION},
            "tests": {k: counts.get(k, 0) for k in ("passed", "failed", "errors", "skipped", "xfailed")},
            "quantized": quantized,
            "exit_status": int(exitstatus),
            "whole_suite": args in ([], ["tests"]) and not selected,
            "seconds": round(time.monotonic() - self.started, 1),
            "finished": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        }


def write(recorder: Recorder, session: pytest.Session, exitstatus: int) -> str:
    directory = os.path.join(str(session.config.rootpath), "build", "compat")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{recorder.env}.json")
    with open(path, "w") as f:
        json.dump(recorder.record(session, exitstatus), f, indent=1, sort_keys=True)
        f.write("\n")
    return path


def recorder_from_environment() -> Recorder | None:
    env = os.environ.get(ENV_VAR, "").strip()
    if not env:
        return None
    if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,40}", env):
        sys.exit(f"{ENV_VAR}={env!r}: use a short lower-case name such as 'newest' or 'oldest'")
    return Recorder(env)
