"""Hot-swapping: safe_hotswap_adapter as peft.utils.hotswap.hotswap_adapter, with every restriction checked before a
tensor is touched, scalings as a fresh load of the new adapter gives them, and nothing half-swapped on failure."""

from __future__ import annotations

from typing import Any

import peft
import pytest
import torch
from peft import IA3Config, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap

from safe_peft import AdapterLoadError, safe_hotswap_adapter
from safe_peft._versions import hotswap_copies
from tests.support.helpers import assert_same_state, build, derive, model_state, outputs, primary, train_adapter


@pytest.fixture(scope="module")
def swaps(tmp_path_factory: pytest.TempPathFactory, adapters: dict[str, Any]) -> dict[str, str]:
    """Adapters to swap into the tiny causal Llama carrying adapters['causal'] (r=8 on q_proj and v_proj)."""
    root = tmp_path_factory.mktemp("hotswap")
    made = {"loaded": adapters["causal"][0], "wide": adapters["wide"][0], "dora": adapters["dora"][0]}

    def make(name: str, **lora: Any) -> None:
        made[name] = str(root / name)
        train_adapter(build("causal"), made[name], **lora)

    make("same", seed=2)
    make("smaller", seed=3, r=4)
    make("larger", seed=4, r=16)
    make("pattern", seed=5, rank_pattern={"q_proj": 4}, lora_alpha=16)
    make("subset", seed=6, target_modules=["q_proj"])
    make("rslora", seed=7, use_rslora=True)
    make("more_targets", seed=8, target_modules=["q_proj", "v_proj", "k_proj"])
    make("head", seed=9, modules_to_save=["lm_head"])
    make("dora_subset", seed=10, use_dora=True, target_modules=["q_proj"])
    made["ia3"] = str(root / "ia3")
    get_peft_model(build("causal"), IA3Config(target_modules=["v_proj"], feedforward_modules=[])).save_pretrained(
        made["ia3"]
    )
    nan = lambda k, v: v.fill_(float("nan")) if "layers.1.self_attn.v_proj.lora_B" in k else v  # noqa: E731
    made["nan"] = derive(made["same"], str(root / "nan"), tensors=nan)
    return made


def _loaded(swaps: dict[str, str], which: str = "loaded") -> PeftModel:
    return PeftModel.from_pretrained(build("causal"), swaps[which])


def _fresh(swaps: dict[str, str], which: str) -> torch.Tensor:
    return outputs(PeftModel.from_pretrained(build("causal"), swaps[which]))


# the adapter swapped in -> the route: a copy into the loaded tensors when every shape matches (and peft's own
# hot-swap copies too: from 0.20; before, it swaps the tensor objects of a model that is not compiled), peft's otherwise
COPIES = hotswap_copies(peft.__version__)
FITTING = {
    "same": "in_place" if COPIES else "peft_hotswap",
    "smaller": "peft_hotswap",
    "larger": "peft_hotswap",
    "subset": "peft_hotswap",
}


def _parameters(model: PeftModel) -> list[tuple[str, str, torch.dtype, bool]]:
    return [(n, type(p).__name__, p.dtype, p.requires_grad) for n, p in model.named_parameters()]


@pytest.mark.parametrize("which", list(FITTING))
def test_a_fitting_swap_equals_peft_s_and_a_fresh_load(which: str, swaps: dict[str, str]) -> None:
    plain = _loaded(swaps)
    hotswap_adapter(plain, swaps[which], "default")
    ours = _loaded(swaps)
    report = safe_hotswap_adapter(ours, swaps[which], "default")
    assert report.ok and not report.warnings and report.route == FITTING[which]
    assert _parameters(ours) == _parameters(plain)  # tensor kinds, dtypes, flags: as peft's own swap leaves them
    assert torch.equal(outputs(ours), outputs(plain))
    a, b = ours.state_dict(), plain.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.allclose(outputs(ours), _fresh(swaps, which), atol=1e-5)


def test_a_rank_pattern_gets_the_scaling_a_fresh_load_gives(swaps: dict[str, str]) -> None:
    """peft's hot-swap looks rank_pattern up with parameter names, which never match: plain runs the q_proj layers
    with scaling lora_alpha / r = 2 instead of 16 / 4 = 4. The safe swap sets it, and says so."""
    fresh = _fresh(swaps, "pattern")
    plain = _loaded(swaps)
    hotswap_adapter(plain, swaps["pattern"], "default")
    assert not torch.allclose(outputs(plain), fresh, atol=1e-3)
    ours = _loaded(swaps)
    report = safe_hotswap_adapter(ours, swaps["pattern"], "default")
    assert [w.code for w in report.warnings] == ["hotswap_scaling_corrected"]
    assert torch.allclose(outputs(ours), fresh, atol=1e-5)
    q_proj = ours.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    assert isinstance(q_proj, LoraLayer)
    scaling = q_proj.scaling["default"]
    assert scaling == 4.0


def test_an_alpha_pattern_swapped_in_place_gets_the_scaling_a_fresh_load_gives(tmp_path: Any) -> None:
    """Both adapters with the same alpha_pattern (a hot-swap requires it) and the same shapes: the copy route sets
    each module's scaling as a fresh load does, where plain peft's hot-swap ignores the pattern, and says so."""
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    for seed, directory in ((21, first), (22, second)):
        train_adapter(build("causal"), directory, seed=seed, alpha_pattern={"q_proj": 32}, lora_alpha=16)
    fresh = outputs(PeftModel.from_pretrained(build("causal"), second))
    plain = PeftModel.from_pretrained(build("causal"), first)
    hotswap_adapter(plain, second, "default")
    assert not torch.allclose(outputs(plain), fresh, atol=1e-3)
    ours = PeftModel.from_pretrained(build("causal"), first)
    report = safe_hotswap_adapter(ours, second, "default")
    assert report.route == FITTING["same"]
    assert [w.code for w in report.warnings] == ["hotswap_scaling_corrected"]
    assert torch.allclose(outputs(ours), fresh, atol=1e-5)


def test_a_swap_beside_another_adapter_is_peft_s(swaps: dict[str, str]) -> None:
    """With another adapter whose name holds this one's ("default2"), peft's hot-swap also zeroes that adapter's
    tensors (it zeroes every key holding ``lora_`` and the name that the new adapter lacks): peft's own route is
    taken, and the result is the same model as plain peft's."""

    def two() -> PeftModel:
        model = _loaded(swaps)
        model.load_adapter(swaps["same"], "default2")
        return model

    plain, ours = two(), two()
    hotswap_adapter(plain, swaps["same"], "default")
    report = safe_hotswap_adapter(ours, swaps["same"], "default")
    assert report.route == "peft_hotswap"
    a, b = ours.state_dict(), plain.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _parameters(ours) == _parameters(plain)


# case -> (adapter to swap in, what to do to the loaded model first, primary code)
FAILURES: dict[str, tuple[str, str, str]] = {
    "not_loaded": ("same", "other_name", "hotswap_not_loaded"),
    "other_method": ("ia3", "", "hotswap_unsupported"),
    "saved_head": ("head", "", "hotswap_unsupported"),
    "dora_subset": ("dora_subset", "dora", "hotswap_unsupported"),
    "merged": ("same", "merge", "hotswap_merged"),
    "other_scaling_rule": ("rslora", "", "hotswap_config_differs"),
    "new_targets": ("more_targets", "", "hotswap_new_targets"),
    "rank_too_large_for_prepared": ("larger", "prepare", "hotswap_rank_too_large"),
    "other_base": ("wide", "", "dimension_mismatch"),
    "after_swapping": ("nan", "", "non_finite_values"),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_every_refusal_is_typed_and_nothing_is_swapped(case: str, swaps: dict[str, str]) -> None:
    which, setup, code = FAILURES[case]
    model = _loaded(swaps, "dora" if setup == "dora" else "loaded")
    name = "other" if setup == "other_name" else "default"
    if setup == "merge":
        model.merge_adapter()
    if setup == "prepare":
        prepare_model_for_compiled_hotswap(model, target_rank=8)
    before = model_state(model)
    with pytest.raises(AdapterLoadError) as caught:
        safe_hotswap_adapter(model, swaps[which], name)
    assert caught.value.report.causes[0].code == code
    assert_same_state(before, model)


@pytest.mark.parametrize("which", ["same", "smaller"])
def test_an_interrupt_half_way_through_restores_every_tensor(
    which: str, swaps: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopped at the third scaling update (the copy route: every tensor copied; peft's: part way through its
    tensors), the model is put back whole."""
    import peft.utils.hotswap as hotswap

    model = _loaded(swaps)
    before = model_state(model)
    real, calls = hotswap._update_scaling, []

    def interrupted(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real(*args, **kwargs)

    monkeypatch.setattr(hotswap, "_update_scaling", interrupted)
    with pytest.raises(KeyboardInterrupt):
        safe_hotswap_adapter(model, swaps[which], "default")
    assert_same_state(before, model)


def test_a_compiled_model_swaps_without_recompiling(swaps: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The point of hot-swapping: prepared and compiled once, then swapped in place (a recompile would raise)."""
    import torch._dynamo

    model = _loaded(swaps)
    prepare_model_for_compiled_hotswap(model, target_rank=8)
    compiled = torch.compile(model, backend="eager")
    assert isinstance(compiled, torch.nn.Module)  # torch.compile of a module is a module (OptimizedModule)
    assert torch.allclose(outputs(compiled), _fresh(swaps, "loaded"), atol=1e-5)
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    for which in ("smaller", "pattern", "same"):
        report = safe_hotswap_adapter(compiled, swaps[which], "default")
        assert report.ok
        assert torch.allclose(outputs(compiled), _fresh(swaps, which), atol=1e-5)
    before = model_state(compiled)
    with pytest.raises(AdapterLoadError) as caught:
        safe_hotswap_adapter(compiled, swaps["larger"], "default")
    assert primary(caught.value.report).code == "hotswap_rank_too_large"
    assert primary(caught.value.report).details["rank"] == 16
    assert_same_state(before, compiled)
    assert torch.allclose(outputs(compiled), _fresh(swaps, "same"), atol=1e-5)


def test_not_a_peft_model_is_refused_with_the_function_to_use(swaps: dict[str, str]) -> None:
    with pytest.raises(TypeError, match="safe_load_adapter"):
        safe_hotswap_adapter(build("causal"), swaps["same"], "default")
