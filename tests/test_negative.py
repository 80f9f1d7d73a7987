"""A fixed sample of the negative sweep (tests/support/negative.py; the whole sweep: `make sweep`): the primary cause is
right, the base untouched, and every fix the report names loads the trained outputs."""

from __future__ import annotations

import pytest

from tests.support import negative

SAMPLE = [("llama", s.name) for s in negative.SCENARIOS] + [
    ("gpt2", "causal_into_bare"),
    ("gpt2", "rank_edited"),
    ("qwen2", "shallower_base"),
    ("opt", "bare_into_causal"),
]


@pytest.mark.parametrize(("arch", "scenario"), SAMPLE, ids=[f"{a}-{s}" for a, s in SAMPLE])
def test_negative_case(arch: str, scenario: str) -> None:
    chosen = next(s for s in negative.SCENARIOS if s.name == scenario)
    outcome = negative.run(arch, chosen)
    assert outcome.ok, outcome.detail
    assert len(outcome.fixes_run) >= len(chosen.fixed_by)


def test_cross_architecture_adapter_is_the_wrong_base_model() -> None:
    outcome = negative.run("gpt2", None, "llama")
    assert outcome.ok, outcome.detail
