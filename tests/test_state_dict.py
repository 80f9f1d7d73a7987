"""safe_load_state_dict: same effect as load_state_dict on success, nothing written on failure."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from safe_peft import AdapterLoadError, Cause, safe_load_state_dict
from tests.support.helpers import assert_unchanged, build, fingerprint


def test_success_matches_torch() -> None:
    source = build("causal", seed=3)
    state = source.state_dict()
    ours, theirs = build("causal"), build("causal")
    report = safe_load_state_dict(ours, state)
    theirs.load_state_dict(state)
    assert report.ok
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert torch.equal(a, b), name


def test_failure_writes_nothing_where_torch_writes_everything_that_matched() -> None:
    source = build("causal", seed=3)
    state = {k: v for k, v in source.state_dict().items() if "lm_head" not in k}
    state["model.norm.weight"] = torch.zeros(7)
    plain = build("causal")
    with pytest.raises(RuntimeError):
        plain.load_state_dict(state)
    weight = "model.embed_tokens.weight"
    assert torch.equal(plain.get_parameter(weight), source.get_parameter(weight))  # torch already wrote it
    model = build("causal")
    before = fingerprint(model)
    with pytest.raises(AdapterLoadError) as info:
        safe_load_state_dict(model, state)
    assert_unchanged(before, model)
    report = info.value.report
    assert [m.key for m in report.missing] == ["lm_head.weight"]
    assert [(s.key, s.checkpoint_shape) for s in report.size_mismatches] == [("model.norm.weight", (7,))]


def test_adapter_state_dict_into_bare_model_is_wrong_loader(adapters: dict[str, Any]) -> None:
    state = load_file(f"{adapters['causal'][0]}/adapter_model.safetensors")
    frozen = dict(state)
    model = build("causal")
    before = fingerprint(model)
    with pytest.raises(AdapterLoadError) as info:
        safe_load_state_dict(model, state)
    primary = info.value.report.primary
    assert primary is not None
    assert (primary.cause, primary.code) == (Cause.WRONG_LOADER, "adapter_into_base_model")
    assert "safe_load_adapter" in primary.fix
    assert_unchanged(before, model)
    assert state.keys() == frozen.keys()


def test_base_weights_into_peft_model_is_wrong_loader(adapters: dict[str, Any]) -> None:
    from safe_peft import safe_load_adapter

    peft_model = safe_load_adapter(build("causal"), adapters["causal"][0])
    state = {k: v for k, v in build("causal").state_dict().items()}
    with pytest.raises(AdapterLoadError) as info:
        safe_load_state_dict(peft_model, state)
    assert info.value.report.primary is not None
    assert info.value.report.primary.code == "base_weights_into_peft_model"


def test_non_strict_reports_missing_and_unexpected() -> None:
    state = {k: v for k, v in build("causal", seed=3).state_dict().items() if "lm_head" not in k}
    state["extra"] = torch.zeros(1)
    report = safe_load_state_dict(build("causal"), state, strict=False)
    assert report.ok
    assert [m.key for m in report.missing] == ["lm_head.weight"]
    assert [u.key for u in report.unexpected] == ["extra"]


def test_remap_auto_strips_ddp_prefix() -> None:
    source = build("causal", seed=3)
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    model = build("causal")
    with pytest.raises(AdapterLoadError) as info:
        safe_load_state_dict(model, state)
    assert info.value.report.primary is not None
    assert info.value.report.primary.code == "strip_module"
    report = safe_load_state_dict(model, state, remap="auto")
    assert report.renames["module.lm_head.weight"] == "lm_head.weight"
    assert torch.equal(model.get_parameter("lm_head.weight"), source.get_parameter("lm_head.weight"))
