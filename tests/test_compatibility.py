"""Adapters saved by old peft versions (checked-in fixtures, see tests/fixtures/README.md) keep loading today,
with outputs equal to the adapter as trained on the same base weights."""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import pytest
import torch

from safe_peft import diagnose, safe_load_adapter

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
CASES = sorted(glob.glob(os.path.join(FIXTURES, "peft-*", "*", "fixture.json")))


def base_model(kind: str = "causal") -> torch.nn.Module:
    """The fixture base: the causal LM, or the same weights under a 3-label classification head (``seqcls``)."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    with open(os.path.join(FIXTURES, "base", "config.json")) as f:
        data = json.load(f)
    if kind == "seqcls":
        model: torch.nn.Module = LlamaForSequenceClassification(LlamaConfig(**{**data, "num_labels": 3}))
    else:
        model = LlamaForCausalLM(LlamaConfig(**data))
    missing, unexpected = model.load_state_dict(
        load_file(os.path.join(FIXTURES, "base", "model.safetensors")), strict=False
    )
    assert set(missing) <= {"score.weight"} and set(unexpected) <= ({"lm_head.weight"} if kind == "seqcls" else set())
    return model.eval()


def _id(path: str) -> str:
    return "/".join(path.split(os.sep)[-3:-1])


def test_fixtures_exist() -> None:
    assert len(CASES) >= 3


@pytest.mark.parametrize("path", CASES, ids=_id)
def test_old_adapter_loads_with_trained_outputs(path: str) -> None:
    with open(path) as f:
        fixture: dict[str, Any] = json.load(f)
    directory = os.path.dirname(path)
    kwargs: dict[str, Any] = {"adapter_name": fixture["adapter_name"]}
    if fixture["subfolder"]:
        kwargs["subfolder"] = fixture["subfolder"]
    if fixture["weights_format"] == "pickle":
        kwargs["allow_pickle"] = True
    base = base_model(fixture.get("model_class", "causal"))
    predicted = diagnose(base, directory, **kwargs)
    assert predicted.ok, str(predicted)
    model = safe_load_adapter(base, directory, **kwargs)
    model.set_adapter(fixture["adapter_name"])
    with torch.no_grad():
        logits = model(torch.tensor(fixture["input"])).logits
    assert torch.allclose(logits, torch.tensor(fixture["logits"]), atol=1e-4), (
        (logits - torch.tensor(fixture["logits"])).abs().max()
    )


def test_vision_language_adapter_from_before_transformers_4_52() -> None:
    """A Llava adapter saved with transformers 4.51 (`language_model.model.*` keys) on today's layout: peft converts
    the keys itself, safe_peft predicts that, reports it, and the outputs equal the adapter as trained."""
    from transformers import LlavaForConditionalGeneration

    root = os.path.join(FIXTURES, "vlm-transformers-4.51.3")
    with open(os.path.join(root, "adapter", "fixture.json")) as f:
        fixture = json.load(f)
    adapter = os.path.join(root, "adapter")

    def base() -> torch.nn.Module:
        return LlavaForConditionalGeneration.from_pretrained(os.path.join(root, "base")).eval()

    predicted = diagnose(base(), adapter)
    assert predicted.ok, str(predicted)
    model, report = safe_load_adapter(base(), adapter, output_loading_info=True)
    assert [(w.cause.value, w.code) for w in report.warnings] == [("version_skew", "converted_layout")]
    assert report.warnings[0].details["converted"] == 8
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(fixture["input"])).logits
    assert torch.allclose(logits, torch.tensor(fixture["logits"]), atol=1e-4)


def _legacy_base() -> torch.nn.Module:
    from safetensors.torch import load_file
    from transformers import GPT2Config, GPT2LMHeadModel

    root = os.path.join(FIXTURES, "legacy-peft-0.2.0", "base")
    with open(os.path.join(root, "config.json")) as f:
        model = GPT2LMHeadModel(GPT2Config(**json.load(f)))
    missing, unexpected = model.load_state_dict(load_file(os.path.join(root, "model.safetensors")), strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # tied to the embeddings
    model.tie_weights()
    return model.eval()


def test_merged_linear_adapter_of_peft_0_2_is_converted_by_the_legacy_repair(tmp_path: Any) -> None:
    """peft 0.2.0 saved LoRA on GPT-2's fused c_attn (enable_lora=[q, not k, v]) as MergedLinear: 3-D lora_B."""
    from peft import PeftModel

    from safe_peft import Cause
    from safe_peft._fix.writer import fix_adapter

    adapter = os.path.join(FIXTURES, "legacy-peft-0.2.0", "adapter")
    with open(os.path.join(adapter, "fixture.json")) as f:
        fixture = json.load(f)
    report = diagnose(_legacy_base(), adapter, allow_pickle=True)
    assert report.primary is not None
    assert (report.primary.cause, report.primary.code, report.primary.repair) == (
        Cause.VERSION_SKEW,
        "legacy_merged_linear",
        ("legacy",),
    )
    model, loaded = safe_load_adapter(
        _legacy_base(), adapter, allow_pickle=True, repair=("legacy",), output_loading_info=True
    )
    assert loaded.ok and loaded.repairs[0].startswith("legacy: MergedLinear")
    from peft import LoraConfig

    config = model.peft_config["default"]
    assert isinstance(config, LoraConfig) and config.r == 8 and config.lora_alpha == 16
    with torch.no_grad():
        logits = model(torch.tensor(fixture["input"])).logits
    assert torch.allclose(logits, torch.tensor(fixture["logits"]), atol=1e-4)
    out = str(tmp_path / "converted")
    fix_adapter(_legacy_base(), adapter, out, allow_pickle=True, repair=("legacy",))
    with torch.no_grad():
        plain = PeftModel.from_pretrained(_legacy_base(), out)(torch.tensor(fixture["input"])).logits
    assert torch.allclose(plain, torch.tensor(fixture["logits"]), atol=1e-4)


def test_config_written_by_a_newer_peft_lists_each_ignored_key() -> None:
    """peft 0.21.2 wrote this config: on an older installed peft (make test-oldest) its unknown keys are ignored,
    each listed as a VERSION_SKEW warning, and the adapter still gives its trained outputs."""
    import dataclasses

    from peft import LoraConfig

    directory = os.path.join(FIXTURES, "peft-0.21.2", "default")
    with open(os.path.join(directory, "adapter_config.json")) as f:
        written = json.load(f)
    unknown = sorted(set(written) - {f.name for f in dataclasses.fields(LoraConfig)})
    model, report = safe_load_adapter(base_model(), directory, output_loading_info=True)
    skew = [w for w in report.warnings if w.code == "unknown_config_keys"]
    assert [w.details["keys"] for w in skew] == ([unknown] if unknown else [])
    with open(os.path.join(directory, "fixture.json")) as f:
        fixture = json.load(f)
    with torch.no_grad():
        logits = model(torch.tensor(fixture["input"])).logits
    assert torch.allclose(logits, torch.tensor(fixture["logits"]), atol=1e-4)


# peft 0.21's own notice for this config on a model without tied embeddings; plain peft gives it on every load
@pytest.mark.filterwarnings("ignore:You have requested `ensure_weight_tying`:UserWarning")
def test_unknown_key_with_a_value_that_may_matter_is_refused(tmp_path: Any) -> None:
    """peft 0.21.2 wrote `ensure_weight_tying: true`: a peft that does not know the key (0.17.1, make test-oldest)
    cannot honour it, so the load is refused; a peft that knows it loads the adapter."""
    import dataclasses
    import shutil

    from peft import LoraConfig

    from safe_peft import AdapterLoadError

    directory = str(tmp_path / "tying")
    shutil.copytree(os.path.join(FIXTURES, "peft-0.21.2", "default"), directory)
    path = os.path.join(directory, "adapter_config.json")
    with open(path) as f:
        data = json.load(f)
    data["ensure_weight_tying"] = True
    with open(path, "w") as f:
        json.dump(data, f)
    if "ensure_weight_tying" in {f.name for f in dataclasses.fields(LoraConfig)}:
        assert diagnose(base_model(), directory).ok
    else:
        with pytest.raises(AdapterLoadError) as info:
            safe_load_adapter(base_model(), directory)
        primary = info.value.report.primary
        assert primary is not None and primary.code == "meaning_changing_config_key"
        assert "ensure_weight_tying" in str(info.value) and "upgrade peft to 0.21.2" in primary.fix
        assert primary.repair == ("config",)
        # the named way past it, executed: the key is dropped and the adapter loads (and says so)
        _, report = safe_load_adapter(base_model(), directory, repair=primary.repair, output_loading_info=True)
        assert report.ok and any("ensure_weight_tying" in r for r in report.repairs)
