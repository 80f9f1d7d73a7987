"""The docs name every cause and every code the library can emit."""

from __future__ import annotations

import glob
import os
import re

import pytest

from safe_peft import Cause
from safe_peft.rules import BUILTIN, model_rules

ROOT = os.path.dirname(os.path.dirname(__file__))


def _emitted_codes() -> set[tuple[str, str]]:
    found = set()
    for path in glob.glob(os.path.join(ROOT, "safe_peft", "*.py")):
        with open(path) as f:
            text = f.read()
        for match in re.finditer(r"Cause\.([A-Z_]+),\s*\n?\s*\"([a-z0-9_]+)\"", text):
            found.add((match.group(1).lower(), match.group(2)))
        if path.endswith("safetensors_header.py"):
            for match in re.finditer(r"_fault\(\s*path,\s*\"([a-z_]+)\"", text):
                found.add(("corrupt_checkpoint", match.group(1)))
    for rule in BUILTIN + model_rules("model"):
        found.add((rule.cause.value, rule.name))
    return found


@pytest.mark.parametrize("cause", list(Cause), ids=lambda c: c.value)
def test_every_cause_has_a_page(cause: Cause) -> None:
    assert os.path.isfile(os.path.join(ROOT, "docs", "causes", f"{cause.value}.md"))


def test_every_code_is_documented_under_its_cause() -> None:
    missing = []
    for cause, code in sorted(_emitted_codes()):
        with open(os.path.join(ROOT, "docs", "causes", f"{cause}.md")) as f:
            if f"### `{code}`" not in f.read():
                missing.append(f"{cause}/{code}")
    assert not missing, missing
    assert len(_emitted_codes()) > 50
