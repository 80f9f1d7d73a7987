"""A kohya-ss LoRA (no adapter_config.json) is recognised, and converted with remap="auto" to the trained outputs."""

from __future__ import annotations

import os
import re
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from safe_peft import AdapterLoadError, Cause, diagnose, inspect_adapter, safe_load_adapter
from tests.support.helpers import build, outputs, primary


def _kohya(peft_dir: str, out: str, *, alpha: float, name: str = "my_lora.safetensors") -> str:
    """The same trained weights in kohya's layout: lora_te_<module path with _>.lora_down/.lora_up/.alpha."""
    os.makedirs(out)
    state = {}
    for key, value in load_file(os.path.join(peft_dir, "adapter_model.safetensors")).items():
        module = re.sub(r"^base_model\.model\.", "", key).rsplit(".", 2)[0]
        flat = "lora_te_" + module.replace(".", "_")
        part = "lora_down" if ".lora_A." in key else "lora_up"
        state[f"{flat}.{part}.weight"] = value
        state[f"{flat}.alpha"] = torch.tensor(alpha)
    save_file(state, os.path.join(out, name))
    return out


@pytest.fixture
def kohya_dir(adapters: dict[str, Any], tmp_path: Any) -> str:
    # the fixture adapter was trained with lora_alpha=8, r=8: kohya stores that alpha per module
    return _kohya(adapters["causal"][0], str(tmp_path / "kohya"), alpha=8.0)


def test_kohya_is_recognised_with_the_conversion_as_fix(kohya_dir: str) -> None:
    report = diagnose(build("causal"), kohya_dir)
    assert not report.ok and report.primary is not None
    assert (report.primary.cause, report.primary.code, report.primary.remap) == (Cause.FOREIGN_FORMAT, "kohya", "auto")
    with pytest.raises(AdapterLoadError):
        safe_load_adapter(build("causal"), kohya_dir)


@pytest.mark.parametrize("as_file", [False, True])
def test_kohya_converted_by_auto_remap_gives_trained_outputs(
    kohya_dir: str, adapters: dict[str, Any], as_file: bool
) -> None:
    target = os.path.join(kohya_dir, "my_lora.safetensors") if as_file else kohya_dir
    model, report = safe_load_adapter(build("causal"), target, remap="auto", output_loading_info=True)
    assert report.ok and len(report.renames) == 8
    assert torch.allclose(outputs(model), adapters["causal"][1], atol=1e-5)


def test_kohya_alpha_becomes_the_scaling(adapters: dict[str, Any], tmp_path: Any) -> None:
    """alpha=16 with r=8 doubles the LoRA update: the converted config must carry it."""
    directory = _kohya(adapters["causal"][0], str(tmp_path / "k16"), alpha=16.0)
    model = safe_load_adapter(build("causal"), directory, remap="auto")
    from peft import LoraConfig

    config = model.peft_config["default"]
    assert isinstance(config, LoraConfig) and config.lora_alpha == 16
    reference = safe_load_adapter(build("causal"), adapters["causal"][0])
    for module in ("q_proj", "v_proj"):
        ours = getattr(model.get_submodule("base_model.model.model.layers.0.self_attn"), module)
        theirs = getattr(reference.get_submodule("base_model.model.model.layers.0.self_attn"), module)
        assert ours.scaling["default"] == 2 * theirs.scaling["default"]


def test_kohya_written_as_a_peft_adapter(kohya_dir: str, adapters: dict[str, Any], tmp_path: Any) -> None:
    from peft import PeftModel

    from safe_peft._fix.writer import fix_adapter

    fix_adapter(build("causal"), kohya_dir, str(tmp_path / "peft"), remap="auto")
    model = PeftModel.from_pretrained(build("causal"), str(tmp_path / "peft"))
    assert torch.allclose(outputs(model), adapters["causal"][1], atol=1e-5)


def test_kohya_for_another_model_is_not_converted(kohya_dir: str) -> None:
    report = diagnose(build("gpt2"), kohya_dir, remap="auto")
    assert not report.ok and report.primary is not None
    assert report.primary.code == "kohya" and report.primary.remap is None


def test_inspect_a_kohya_file(kohya_dir: str) -> None:
    manifest = inspect_adapter(kohya_dir)
    assert manifest.peft_type.startswith("UNKNOWN") and len(manifest.tensors) == 12


def _with_keys(src: str, dst: str, keys: dict[str, torch.Tensor]) -> str:
    import shutil

    shutil.copytree(src, dst)
    save_file(keys, os.path.join(dst, "adapter_model.safetensors"))
    return dst


@pytest.mark.parametrize(
    "layout, code",
    [
        ("lycoris", "lycoris"),
        ("diffusers", "diffusers"),
        ("merged", "merged_checkpoint"),
    ],
)
def test_foreign_layouts_are_named(layout: str, code: str, adapters: dict[str, Any], tmp_path: Any) -> None:
    """A PEFT config beside weights in another tool's layout: the format is named, not a wall of keys."""
    if layout == "lycoris":  # LyCORIS LoHa names under a LoRA config
        keys = {f"lora_te_model_layers_{i}_self_attn_q_proj.hada_w1_a": torch.zeros(64, 4) for i in range(2)}
    elif layout == "diffusers":
        keys = {
            f"unet.down_blocks.{i}.attentions.0.processor.to_q_lora.down.weight": torch.zeros(4, 64) for i in range(2)
        }
    else:  # the adapter merged into the base: plain weights of the base model's own modules
        keys = {f"base_model.model.{k}": v for k, v in build("causal").state_dict().items() if "layers.0." in k}
    directory = _with_keys(adapters["causal"][0], str(tmp_path / layout), keys)
    report = diagnose(build("causal"), directory)
    assert report.primary is not None
    assert (report.primary.cause, report.primary.code) == (Cause.FOREIGN_FORMAT, code), str(report)


@pytest.mark.parametrize(
    ("names", "modules", "wrapper"),
    [
        # transformers 5's CLIPTextModel has no `text_model.` wrapper; kohya's SD1 / SD2 names still carry it
        (
            {"text_model_encoder_layers_0_q", "text_model_encoder_layers_1_q"},
            ["encoder.layers.0.q", "encoder.layers.1.q"],
            "text_model_",
        ),
        # names that resolve as they are keep them
        ({"text_model_encoder_layers_0_q"}, ["text_model.encoder.layers.0.q"], ""),
        # a wrapper only some names have is no wrapper
        ({"text_model_encoder_layers_0_q", "encoder_layers_1_q"}, ["encoder.layers.0.q", "encoder.layers.1.q"], ""),
        # a name that stays ambiguous without it: nothing is stripped
        ({"x_a_b"}, ["a.b", "a_b"], ""),
    ],
)
def test_a_wrapper_the_model_no_longer_has_is_stripped_only_when_every_name_then_resolves(
    names: set[str], modules: list[str], wrapper: str
) -> None:
    from safe_peft._plan.kohya import _gone_wrapper

    by_flat: dict[str, list[str]] = {}
    for name in modules:
        by_flat.setdefault(name.replace(".", "_"), []).append(name)
    assert _gone_wrapper(names, by_flat) == wrapper


def test_kohya_into_a_name_a_peft_model_already_has_is_refused(kohya_dir: str, adapters: dict[str, Any]) -> None:
    """A file without a PEFT config takes the same route as any adapter, so the route's own refusals hold: it never
    writes into the adapter that is there."""
    from tests.support.helpers import assert_same_state, model_state

    peft_model = safe_load_adapter(build("causal"), adapters["causal"][0])
    before = model_state(peft_model)
    assert primary(diagnose(peft_model, kohya_dir, "default", remap="auto")).code == "adapter_name_taken"
    with pytest.raises(AdapterLoadError) as caught:
        safe_load_adapter(peft_model, kohya_dir, "default", remap="auto")
    assert primary(caught.value.report).code == "adapter_name_taken"
    assert_same_state(before, peft_model)
    assert diagnose(peft_model, kohya_dir, "other", remap="auto").ok  # under a free name it converts
