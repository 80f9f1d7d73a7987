"""PEFT methods other than plain LoRA go through peft's own injection on a meta skeleton: each loads with its
trained outputs, diagnose agrees, and a mismatch is still explained."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from peft import (
    AdaLoraConfig,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    VeraConfig,
    get_peft_model,
)

from safe_peft import AdapterLoadError, Cause, diagnose, safe_load_adapter
from tests.support.helpers import assert_unchanged, build, fingerprint, outputs

METHODS = {
    "ia3": lambda: IA3Config(
        target_modules=["q_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], task_type="CAUSAL_LM"
    ),
    "loha": lambda: LoHaConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    "lokr": lambda: LoKrConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    "adalora": lambda: AdaLoraConfig(
        r=4, init_r=6, target_r=4, total_step=10, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
    ),
    "prompt_tuning": lambda: PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
    "prefix_tuning": lambda: PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
    "vera": lambda: VeraConfig(r=4, target_modules=["q_proj", "k_proj"], task_type="CAUSAL_LM"),
    "lora_bias_all": lambda: LoraConfig(r=4, target_modules=["q_proj"], bias="all", task_type="CAUSAL_LM"),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, torch.Tensor]]:
    made = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's own notices while building (AdaLoRA total_step, ...)
        for name, config in METHODS.items():
            torch.manual_seed(1)
            model = get_peft_model(build("causal"), config())
            with torch.no_grad():
                for _, param in model.named_parameters():
                    if param.requires_grad:
                        param.add_(torch.randn_like(param) * 0.05)
            model.eval()
            directory = str(tmp_path_factory.mktemp(name))
            model.save_pretrained(directory)
            made[name] = (directory, outputs(model))
    return made


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_loads_with_trained_outputs(method: str, saved: dict[str, Any]) -> None:
    directory, trained = saved[method]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # peft's AdaLoraConfig warns about `r` whenever it is built
        warnings.simplefilter("ignore", FutureWarning)  # transformers' past_key_values notice (prefix tuning)
        assert diagnose(build("causal"), directory).ok
        model, report = safe_load_adapter(build("causal"), directory, output_loading_info=True)
        assert torch.allclose(outputs(model), trained, atol=1e-5)
    assert report.ok and not report.causes


@pytest.mark.parametrize("method", ["ia3", "loha", "prompt_tuning"])
def test_method_on_another_base_is_refused_and_explained(method: str, saved: dict[str, Any]) -> None:
    directory, _ = saved[method]
    base = build("causal", hidden_size=128, intermediate_size=256)
    before = fingerprint(base)
    predicted = diagnose(base, directory)
    assert not predicted.ok and predicted.primary is not None
    assert predicted.primary.cause is Cause.WRONG_BASE_MODEL
    with pytest.raises(AdapterLoadError) as info:
        safe_load_adapter(base, directory)
    assert [d.code for d in info.value.report.causes] == [d.code for d in predicted.causes]
    assert_unchanged(before, base)
