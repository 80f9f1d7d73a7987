"""transformers' own route: safe_load_adapter_inplace(model, path) as model.load_adapter(path), checked and atomic.

Plain transformers injects the layers first and then loads whatever keys match (a broken adapter loads silently
wrong); here every success equals plain transformers' load, and every failure is typed with the model untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from peft import PeftModel, PromptTuningConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers.integrations.peft import PeftAdapterMixin

from safe_peft import AdapterLoadError, diagnose, safe_load_adapter, safe_load_adapter_inplace
from safe_peft._plan.routes import _shifts_prefix
from tests.support.helpers import assert_same_state, build, derive, model_state, outputs, primary, train_adapter


@pytest.fixture(autouse=True)
def _quiet_transformers() -> Iterator[None]:
    """transformers prints a load report table for every load; the tests compare tensors instead."""
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory, adapters: dict[str, Any]) -> dict[str, str]:
    root = tmp_path_factory.mktemp("inplace")
    good = adapters["causal"][0]
    made = {"good": good, "wide": adapters["wide"][0], "bare": adapters["bare"][0]}
    # keys without peft's prefix, as get_adapter_state_dict() gives them (transformers accepts both forms)
    made["unprefixed"] = derive(good, str(root / "unprefixed"), keys=lambda k: k.removeprefix("base_model.model."))
    made["second"] = str(root / "second")
    train_adapter(build("causal"), made["second"], seed=5, r=2, target_modules=["o_proj"])
    made["r4"] = derive(good, str(root / "r4"), config=lambda c: c.update(r=4))
    made["dropped"] = derive(good, str(root / "dropped"), keys=lambda k: None if "v_proj" in k else k)
    compiled = lambda k: k.replace("model.layers", "_orig_mod.model.layers")  # noqa: E731
    made["compiled"] = derive(good, str(root / "compiled"), keys=compiled)
    nan = lambda k, v: v.fill_(float("inf")) if "layers.1.self_attn.q_proj.lora_B" in k else v  # noqa: E731
    made["nan"] = derive(good, str(root / "nan"), tensors=nan)
    made["prompt"] = str(root / "prompt")
    torch.manual_seed(3)
    get_peft_model(build("causal"), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).save_pretrained(
        made["prompt"]
    )
    return made


def _adapter(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "lora_" in k}


def _same(ours: torch.nn.Module, plain: torch.nn.Module) -> None:
    assert isinstance(ours, (PeftModel, PeftAdapterMixin)) and isinstance(plain, (PeftModel, PeftAdapterMixin))
    a, b = _adapter(ours), _adapter(plain)
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a)
    configs = [{k: v.to_dict() for k, v in m.peft_config.items()} for m in (ours, plain)]
    assert configs[0] == configs[1]
    assert [(n, p.requires_grad) for n, p in ours.named_parameters()] == [
        (n, p.requires_grad) for n, p in plain.named_parameters()
    ]
    assert [m.training for m in ours.modules()] == [m.training for m in plain.modules()]
    assert torch.equal(outputs(ours), outputs(plain))


@pytest.mark.parametrize("which", ["good", "unprefixed"])
@pytest.mark.parametrize("trainable", [False, True])
def test_a_fitting_adapter_loads_as_transformers_loads_it(which: str, trainable: bool, saved: dict[str, str]) -> None:
    plain = build("causal")
    plain.load_adapter(saved[which], is_trainable=trainable)
    ours = build("causal")
    assert diagnose(ours, saved[which], inplace=True).ok
    model, report = safe_load_adapter_inplace(ours, saved[which], is_trainable=trainable, output_loading_info=True)
    assert model is ours and report.ok and ours._hf_peft_config_loaded
    _same(ours, plain)


def test_the_good_adapter_computes_what_peft_computes(saved: dict[str, str]) -> None:
    ours = safe_load_adapter_inplace(build("causal"), saved["good"])
    assert torch.allclose(outputs(ours), outputs(PeftModel.from_pretrained(build("causal"), saved["good"])))


def test_a_second_adapter_in_place(saved: dict[str, str]) -> None:
    plain = build("causal")
    plain.load_adapter(saved["good"])
    plain.load_adapter(saved["second"], adapter_name="second")
    ours = build("causal")
    safe_load_adapter_inplace(ours, saved["good"])
    assert diagnose(ours, saved["second"], "second", inplace=True).ok
    safe_load_adapter_inplace(ours, saved["second"], "second")
    _same(ours, plain)
    for model in (ours, plain):  # transformers 5.24's set_adapter() asks for peft >= 0.22: set it layer by layer
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.set_adapter("second")
    assert torch.equal(outputs(ours), outputs(plain))


@pytest.mark.parametrize(("which", "kind", "reference"), [("good", "bare", "bare"), ("bare", "causal", "causal")])
def test_a_model_class_shift_loads_exactly_where_transformers_shifts_it(
    which: str, kind: str, reference: str, saved: dict[str, str]
) -> None:
    """transformers 5 adds or strips the base_model_prefix level per key, so these load right there, and so they
    do here; transformers 4 loads nothing of them (silently), and here they are refused with the remap that fits."""
    exact = safe_load_adapter(build(kind), saved[which], remap="auto")  # the adapter as it should load
    plain = build(kind)
    plain.load_adapter(saved[which])
    ours = build(kind)
    if _shifts_prefix():
        assert torch.allclose(outputs(plain), outputs(exact))
        assert diagnose(ours, saved[which], inplace=True).ok
        safe_load_adapter_inplace(ours, saved[which])
        _same(ours, plain)
    else:
        assert not torch.allclose(outputs(plain), outputs(exact))  # plain transformers 4: the adapter did nothing
        before = model_state(ours)
        with pytest.raises(AdapterLoadError) as caught:
            safe_load_adapter_inplace(ours, saved[which])
        assert primary(caught.value.report).remap == "auto"
        assert_same_state(before, ours)
        safe_load_adapter_inplace(ours, saved[which], remap="auto")
        assert torch.allclose(outputs(ours), outputs(exact))


FAILURES = {
    "rank_mismatch": ("r4", "rank_mismatch"),
    "missing_keys": ("dropped", "targets_without_weights"),
    "orig_mod_keys": ("compiled", "strip_orig_mod"),
    "other_base": ("wide", "dimension_mismatch"),
    "prompt_learning": ("prompt", "not_injectable"),
    "after_loading": ("nan", "non_finite_values"),
}


@pytest.mark.parametrize("case", list(FAILURES))
@pytest.mark.parametrize("carrying", [False, True], ids=["bare", "carrying"])
def test_every_failure_is_typed_and_leaves_the_model_as_it_was(
    case: str, carrying: bool, saved: dict[str, str]
) -> None:
    which, code = FAILURES[case]
    model = build("causal")
    name = "default"
    if carrying:  # a model that already carries an adapter in place
        model.load_adapter(saved["second"], adapter_name="second")
    before = model_state(model)
    if code != "non_finite_values":
        predicted = diagnose(model, saved[which], name, inplace=True)
        assert not predicted.ok and predicted.causes[0].code == code
    with pytest.raises(AdapterLoadError) as caught:
        safe_load_adapter_inplace(model, saved[which], name)
    assert caught.value.report.causes[0].code == code
    assert_same_state(before, model)


def test_a_taken_name_is_refused(saved: dict[str, str]) -> None:
    model = safe_load_adapter_inplace(build("causal"), saved["good"])
    before = model_state(model)
    with pytest.raises(AdapterLoadError) as caught:
        safe_load_adapter_inplace(model, saved["second"])
    assert primary(caught.value.report).code == "adapter_name_taken"
    assert_same_state(before, model)


def test_an_interrupt_inside_transformers_restores_the_model(
    saved: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import peft

    model = build("causal")
    before = model_state(model)
    real = peft.inject_adapter_in_model

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        real(*args, **kwargs)  # the layers are in
        raise KeyboardInterrupt

    monkeypatch.setattr(peft, "inject_adapter_in_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        safe_load_adapter_inplace(model, saved["good"])
    assert_same_state(before, model)


def test_wrong_model_types_are_refused_with_the_function_to_use(saved: dict[str, str]) -> None:
    with pytest.raises(TypeError, match="safe_load_adapter"):
        safe_load_adapter_inplace(PeftModel.from_pretrained(build("causal"), saved["good"]), saved["second"])
    with pytest.raises(TypeError, match="safe_load_adapter"):
        safe_load_adapter_inplace(torch.nn.Sequential(torch.nn.Linear(2, 2)), saved["good"])


def test_opt_in_renames_load_exactly(saved: dict[str, str]) -> None:
    good = safe_load_adapter_inplace(build("causal"), saved["good"])
    model, report = safe_load_adapter_inplace(
        build("causal"), saved["compiled"], remap="auto", output_loading_info=True
    )
    assert report.renames
    assert torch.equal(outputs(model), outputs(good))
