"""A fixed sample of the real-layout families (tests/support/families.py; each whole family: `run_sweep.py
--family`): plain peft behaves as the case says, safe_peft loads what plain peft loads exactly, names the expected
primary finding otherwise, and every fix it names loads the trained outputs."""

from __future__ import annotations

from typing import Any

import pytest

from safe_peft import Cause, Diagnosis
from tests.support import families
from tests.support.tiny import quiet

SAMPLE = [
    "resize/modules_to_save/pad1/dir/resized",
    "resize/modules_to_save/pad8/dir/resized",
    "resize/modules_to_save/pad1/dir/original",
    "resize/modules_to_save/pad8/code/original",
    "resize/lora_lm_head/pad1/dir/original",
    "resize/lora_embedding/pad8/dir/original",
    "resize/trainable_tokens/pad1/dir/original",
    "resize/trainable_tokens/pad1/code/original",
    "empty/zero3",
    "empty/patched_state_dict",
    "empty/resume",
    "old_peft/lora/plain/as_default",
    "old_peft/lora/embedding/as_lora",
    "old_peft/weight/plain/as_default",
    "old_peft/lora_A/plain/as_default",
    "old_peft/q_proj/plain/as_default",
    "empty/zero3_partitions",
    "vl/text_into_vl",
    "vl/vision_too_into_text",
    "kohya/sd1",
    "kohya/sdxl_te2",
    "controls/roberta_seq_cls_into_lm",
    "controls/prompt_tuning_into_bare",
    "controls/t5_seq2seq_into_bare",
    "controls/trainable_tokens_nan_gpt2",
    "controls/trainable_tokens_nan_t5",
]
CASES = {c.id: c for c in families.cases()}


@pytest.mark.parametrize("name", SAMPLE)
def test_family_case(name: str) -> None:
    case = CASES[name]
    outcome = families.run(case)
    assert (outcome.kind, outcome.code) == (families.OK, case.code or ""), outcome.detail
    assert len(outcome.fixes_run) == len(case.fix)


def test_every_family_has_cases_and_every_expected_code_is_in_the_catalog() -> None:
    from safe_peft._catalog import CATALOG

    assert {c.family for c in CASES.values()} == set(families.FAMILIES)
    assert all(c.code is None or c.code in CATALOG for c in CASES.values())


def test_an_empty_checkpoint_offers_no_fix_even_when_one_is_asked_for(tmp_path: Any) -> None:
    from safe_peft import AdapterLoadError, diagnose, safe_load_adapter
    from tests.support.helpers import build

    situation = families._empty_case("zero3")(str(tmp_path))
    for repair in ((), ("targets",), ("targets", "rank", "vocab")):
        report = diagnose(build("causal"), situation.directory, repair=repair)
        assert report.primary is not None
        assert (report.primary.cause, report.primary.code) == (Cause.CORRUPT_CHECKPOINT, "empty_checkpoint")
        assert [d for d in report.causes if d.remap or d.repair] == []
    with pytest.raises(AdapterLoadError) as info:
        safe_load_adapter(build("causal"), situation.directory, repair=("targets",))
    assert [d.code for d in info.value.report.causes] == ["empty_checkpoint"]


@pytest.mark.parametrize(
    ("offered", "remap", "repair", "still_offered"),
    [
        ({"repair": ("targets",)}, None, ("targets",), False),
        ({"repair": ("targets",)}, None, ("rank",), True),
        ({"repair": ("vocab",)}, "auto", ("vocab", "rank"), False),
        ({"remap": "auto"}, "auto", (), False),
        ({"remap": "auto"}, None, (), True),
        ({"remap": "auto", "repair": ("rank",)}, "auto", (), True),
        ({"remap": "auto", "repair": ("rank",)}, "auto", ("rank",), False),
        ({}, "auto", ("rank",), False),
    ],
)
def test_a_finding_never_offers_the_fix_already_given(
    offered: dict[str, Any], remap: Any, repair: tuple[str, ...], still_offered: bool
) -> None:
    """A finding still found with its own opt-in given would offer a fix that is refused with itself again."""
    from safe_peft._catalog import without_spent_fix

    found = Diagnosis(
        Cause.CONFIG_MISMATCH, "x", "m", "f", remap=offered.get("remap"), repair=offered.get("repair", ())
    )
    after = without_spent_fix(found, remap, repair)
    assert bool(after.remap or after.repair) is still_offered
    assert after.code == found.code and after.cause == found.cause
    if offered and not still_offered:
        assert after.details["spent_fix"] == found.fix_arguments()


def _d(code: str, proven: bool = False) -> Diagnosis:
    from safe_peft._catalog import finding

    return finding(code, code, fix="", remap="auto" if proven else None, details={"proven": True} if proven else None)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        # a finding whose opt-in fix is proven exact first; the config difference it explains is secondary
        ([("base_config_differs", False), ("text_to_vl_nesting", True)], ["text_to_vl_nesting", "base_config_differs"]),
        # the trained base's config explains the keys' story: before it
        ([("more_layers", False), ("base_config_differs", False)], ["base_config_differs", "more_layers"]),
        (
            [("dimension_mismatch", False), ("base_config_differs", False)],
            ["base_config_differs", "dimension_mismatch"],
        ),
        # what it does not explain keeps its place
        ([("rank_mismatch", False), ("base_config_differs", False)], ["rank_mismatch", "base_config_differs"]),
        # a rename not proven exact is no reason to move
        (
            [("base_config_differs", False), ("text_to_vl_nesting", False)],
            ["base_config_differs", "text_to_vl_nesting"],
        ),
        # proven ones keep their own order; the rest follow as given
        (
            [("unknown_modules", False), ("head_prefix_remove", True), ("strip_module", True)],
            ["head_prefix_remove", "strip_module", "unknown_modules"],
        ),
        ([("rank_mismatch", False), ("dora_flag", False)], ["rank_mismatch", "dora_flag"]),
    ],
)
def test_the_ordering_rule(given: list[tuple[str, bool]], expected: list[str]) -> None:
    from safe_peft._catalog import order

    assert [d.code for d in order([_d(c, p) for c, p in given])] == expected


@pytest.mark.parametrize(("kind", "offered"), [("seqcls", None)])
def test_task_type_mismatch_offers_remap_only_on_the_bare_model(
    adapters: dict[str, Any], kind: str, offered: str | None
) -> None:
    """A CAUSAL_LM adapter on another task's class (its keys fit) is not loaded as a plain PeftModel there: the
    class is the mistake (the bare model case is tests/support/families.py's t5_seq2seq_into_bare)."""
    from safe_peft import diagnose
    from tests.support.helpers import build

    report = diagnose(build(kind), adapters["causal_task"][0])
    task = next(d for d in report.causes if d.code == "task_type_mismatch")
    assert task.remap == offered


def test_the_resized_saved_heads_layout_loads_through_the_switch_too(tmp_path: Any) -> None:
    """peft's own from_pretrained under safe_peft.patched(): the same plan, the same exact load."""
    from peft import PeftModel

    import safe_peft

    situation = families._resize_case("modules_to_save", 8, True, True)(str(tmp_path))
    with safe_peft.patched(), quiet():
        model = PeftModel.from_pretrained(situation.base(), situation.directory)
    assert situation.differs(model) <= 1e-5
