"""The remap planner: exact or nothing, found when a damage is undoable, linear, never copying tensors."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from safe_peft._keys import Role
from safe_peft._model.view import ExpectedKey
from safe_peft._plan.remap import check_exact, plan_remap, to_rules
from safe_peft.rules import BUILTIN, RemapRule, model_rules, rename_state_dict

RULES = BUILTIN + model_rules("model")
MODULES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj"]

# Damages a real save can carry, each undone by a built-in rule.
DAMAGES = {
    "orig_mod": lambda k: k.replace("base_model.model.", "base_model.model._orig_mod.", 1),
    "module": lambda k: k.replace("base_model.model.", "base_model.model.module.", 1),
    "adapter_name": lambda k: re.sub(r"\.(lora_[AB])\.weight$", r".\1.default.weight", k),
    "no_prefix": lambda k: k.removeprefix("base_model.model."),
    "head_shift": lambda k: k.replace("base_model.model.model.", "base_model.model.", 1),
}


def _expected(layers: int, modules: list[str], rank: int) -> dict[str, ExpectedKey]:
    out = {}
    for i in range(layers):
        for m in modules:
            for part, shape in (("lora_A", (rank, 64)), ("lora_B", (64, rank))):
                key = f"base_model.model.model.layers.{i}.{m}.{part}.weight"
                out[key] = ExpectedKey(key, shape, f"model.layers.{i}.{m}", Role(part))
    return out


def _independently_exact(plan: Any, checkpoint: dict[str, Any], expected: dict[str, ExpectedKey]) -> bool:
    landed = [plan.renames.get(k, k) for k in checkpoint if k not in plan.dropped]
    return (
        len(landed) == len(set(landed))
        and all(
            k in expected and tuple(checkpoint[o]) == expected[k].shape
            for o, k in ((o, plan.renames.get(o, o)) for o in checkpoint if o not in plan.dropped)
        )
        and set(landed) >= {k for k, e in expected.items() if e.required}
    )


@pytest.mark.property
@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    layers=st.integers(1, 6),
    modules=st.lists(st.sampled_from(MODULES), min_size=1, max_size=5, unique=True),
    damages=st.lists(st.sampled_from(sorted(DAMAGES)), max_size=2, unique=True),
    perturb=st.sampled_from(["none", "drop_one", "reshape_one", "collide", "extra"]),
)
def test_planner_is_exact_or_refuses(layers: int, modules: list[str], damages: list[str], perturb: str) -> None:
    expected = _expected(layers, modules, 4)
    checkpoint: dict[str, tuple[int, ...]] = {}
    for key, want in expected.items():
        damaged = key
        for name in damages:
            damaged = DAMAGES[name](damaged)
        checkpoint[damaged] = want.shape
    keys = list(checkpoint)
    if perturb == "drop_one":
        del checkpoint[keys[0]]
    elif perturb == "reshape_one":
        checkpoint[keys[0]] = (5, 64)
    elif perturb == "collide" and len(keys) > 1:
        checkpoint[keys[0].replace("lora_A", "lora_A.default")] = checkpoint[keys[0]]
    elif perturb == "extra":
        checkpoint["base_model.model.model.layers.99.mlp.gate_proj.lora_A.weight"] = (4, 64)
    plan = plan_remap(checkpoint, expected, RULES)
    if plan.exact:
        assert _independently_exact(plan, checkpoint, expected)
        assert check_exact({k: plan.renames.get(k, k) for k in checkpoint}, checkpoint, expected) == ()
    undoable = perturb == "none" or (perturb == "collide" and len(keys) == 1)
    if undoable and damages and damages != ["head_shift", "no_prefix"] and damages != ["no_prefix", "head_shift"]:
        assert plan.exact, (damages, plan.problems)
    if perturb in {"drop_one", "reshape_one", "extra"}:
        assert not plan.exact


@pytest.mark.property
@settings(max_examples=100, deadline=None, derandomize=True)
@given(
    st.lists(st.text(alphabet="ab._0123lorAB", min_size=1, max_size=30), max_size=40, unique=True),
    st.lists(st.sampled_from(RULES), max_size=3),
)
def test_random_keys_and_rules_never_break_the_planner(keys: list[str], rules: list[RemapRule]) -> None:
    checkpoint = {k: (2, 2) for k in keys}
    expected = {k.upper(): ExpectedKey(k.upper(), (2, 2), "", Role.OTHER) for k in keys[: len(keys) // 2]}
    plan = plan_remap(checkpoint, expected, rules)
    if plan.exact:
        assert _independently_exact(plan, checkpoint, expected)


def test_refusal_names_the_closest_rules() -> None:
    expected = _expected(2, ["self_attn.q_proj"], 4)
    checkpoint = {DAMAGES["orig_mod"](k): (8, 64) if "lora_A" in k else (64, 8) for k in expected}
    plan = plan_remap(checkpoint, expected, RULES)
    assert not plan.exact
    assert [r.name for r in plan.rules] == ["strip_orig_mod"]
    assert any("shape" in p for p in plan.problems)


def test_renaming_never_copies_tensors() -> None:
    state = {f"module.layer{i}.weight": torch.randn(3, 3) for i in range(5)}
    renamed = rename_state_dict(state, {k: k.removeprefix("module.") for k in state}, dropped=["module.layer4.weight"])
    assert set(renamed) == {f"layer{i}.weight" for i in range(4)}
    for old, tensor in state.items():
        new = old.removeprefix("module.")
        if new in renamed:
            assert renamed[new] is tensor and renamed[new].data_ptr() == tensor.data_ptr()


@pytest.mark.parametrize("remap", [{r"^module\.": ""}, [RemapRule("mine", r"^module\.", "", "strip")]])
def test_user_rules(remap: Any) -> None:
    rules = to_rules(remap)
    assert rules[0].apply("module.x.weight") == "x.weight"


def test_bad_remap_argument() -> None:
    with pytest.raises(TypeError):
        to_rules(42)


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
def test_every_rule_is_documented_with_an_example(rule: RemapRule) -> None:
    import os

    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs", "remapping.md")) as f:
        text = f.read()
    section = text.split(f"### `{rule.name}`", 1)
    assert len(section) == 2, rule.name
    before, after = re.findall(r"`([^`]+)` -> `([^`]*)`", section[1].split("###", 1)[0])[0]
    assert rule.apply(before) == (None if rule.drop else after)
