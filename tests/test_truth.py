"""No false alarms: adapters that plain peft loads exactly load exactly and quietly with safe_peft, each built from
a real tiny model and saved by real peft (issue 10's reproduced cases)."""

from __future__ import annotations

import os
import re
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from safe_peft import diagnose, safe_load_adapter
from tests.support.helpers import build, derive, outputs, primary


def _plain_loads_exactly(directory: str, trained: torch.Tensor, kind: str = "causal") -> bool:
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(build(kind), directory)
    missing = [w for w in caught if "missing adapter keys" in str(w.message)]
    return not missing and torch.allclose(outputs(model), trained, atol=1e-6)


def _peft_accepts_named_keys() -> bool:
    from peft.tuners.tuners_utils import BaseTuner

    return hasattr(BaseTuner, "_remap_adapter_state_dict_for_load")


def test_keys_that_carry_the_adapter_name(adapters: dict[str, Any], tmp_path: Any) -> None:
    """``...lora_A.default.weight`` (a raw state_dict() saved as the adapter): what the installed peft does with
    them, safe_peft does (peft >= 0.18 loads them as they are; older peft leaves them unexpected)."""
    src, trained = adapters["causal"]
    directory = derive(src, str(tmp_path / "named"), keys=lambda k: re.sub(r"\.(lora_[AB])\.", r".\1.default.", k))
    report = diagnose(build("causal"), directory)
    if not _peft_accepts_named_keys():
        assert not report.ok and not _plain_loads_exactly(directory, trained)
        return
    assert _plain_loads_exactly(directory, trained)
    assert report.ok and not report.warnings and not report.causes
    model, loaded = safe_load_adapter(build("causal"), directory, output_loading_info=True)
    assert loaded.ok and not loaded.warnings and not loaded.renames
    assert torch.allclose(outputs(model), trained, atol=1e-6)


def test_keys_with_another_adapter_name_still_need_the_opt_in(adapters: dict[str, Any], tmp_path: Any) -> None:
    src, trained = adapters["causal"]
    directory = derive(src, str(tmp_path / "other"), keys=lambda k: re.sub(r"\.(lora_[AB])\.", r".\1.other.", k))
    assert not _plain_loads_exactly(directory, trained)
    report = diagnose(build("causal"), directory)
    assert not report.ok and report.primary is not None and report.primary.remap == "auto"
    model = safe_load_adapter(build("causal"), directory, remap="auto")
    assert torch.allclose(outputs(model), trained, atol=1e-6)


@pytest.mark.parametrize(
    ("model_type", "class_name"),
    [("levit", "LevitForImageClassification"), ("swiftformer", "SwiftFormerForImageClassification")],
)
def test_saved_heads_with_batchnorm_buffers(model_type: str, class_name: str) -> None:
    """modules_to_save holding BatchNorm (running_mean, running_var, num_batches_tracked) loads exactly."""
    from tests.support import sweep

    result = sweep.run_case(sweep.Case(model_type, class_name, "image_cls", "LORA", "all-linear"))
    assert result.outcome == sweep.EXACT, result.detail


@pytest.mark.parametrize("name", ["weight", "base_layer", "lora", "a", "q_proj", "x-y", "modules_to_save", "B"])
def test_any_adapter_name_peft_accepts_loads(adapters: dict[str, Any], name: str) -> None:
    """peft accepts these names; so does safe_peft, with the trained outputs (verification finds the adapter's
    tensors structurally, never by matching the name inside tensor names)."""
    directory, trained = adapters["causal"]
    assert diagnose(build("causal"), directory, adapter_name=name).ok
    model, report = safe_load_adapter(build("causal"), directory, adapter_name=name, output_loading_info=True)
    assert report.ok and not report.warnings
    model.set_adapter(name)
    assert torch.allclose(outputs(model), trained, atol=1e-6)


@pytest.mark.parametrize("name", ["", "a.b", "../evil", "training", "keys", "forward", 5, "x" * 300])
def test_adapter_names_peft_cannot_use_are_refused_up_front(adapters: dict[str, Any], name: Any) -> None:
    from safe_peft import AdapterLoadError, Cause
    from tests.support.helpers import assert_unchanged, fingerprint

    directory, _ = adapters["causal"]
    predicted = diagnose(build("causal"), directory, adapter_name=name)
    assert predicted.primary is not None
    assert (predicted.primary.cause, predicted.primary.code) == (Cause.CONFIG_MISMATCH, "invalid_adapter_name")
    suggestion = predicted.primary.fix.split("adapter_name=")[1].rstrip(".")
    base = build("causal")
    before = fingerprint(base)
    with pytest.raises(AdapterLoadError) as info:
        safe_load_adapter(base, directory, adapter_name=name)
    assert primary(info.value.report).code == "invalid_adapter_name"
    assert_unchanged(before, base)
    assert len(str(info.value)) < 2000
    safe_load_adapter(build("causal"), directory, adapter_name=eval(suggestion))  # the suggested name works


def test_an_adapter_of_a_shallower_model_is_the_wrong_base_not_a_targets_repair(tmp_path: Any) -> None:
    """Layers 0..1 trained, the model has 4: wrong_base_model (more_layers), never a `targets` repair that would
    load a model the adapter was never trained for; with a local base_model_name_or_path, its config says so."""
    import json

    from safe_peft import AdapterLoadError, Cause
    from tests.support.helpers import assert_unchanged, fingerprint, train_adapter

    base_dir = str(tmp_path / "base")
    build("causal").save_pretrained(base_dir)
    directory = str(tmp_path / "shallow")
    train_adapter(build("causal"), directory)
    deep = build("causal", num_hidden_layers=4)
    report = diagnose(deep, directory)
    assert report.primary is not None
    assert (report.primary.cause, report.primary.code) == (Cause.WRONG_BASE_MODEL, "more_layers")
    assert not any(d.repair for d in report.causes)
    config_path = f"{directory}/adapter_config.json"
    with open(config_path) as f:
        config = json.load(f)
    config["base_model_name_or_path"] = base_dir
    with open(config_path, "w") as f:
        json.dump(config, f)
    report = diagnose(deep, directory)
    assert [d.code for d in report.causes][:2] == ["base_config_differs", "more_layers"]
    assert primary(report).details["differ"] == {"num_hidden_layers": [2, 4]}
    before = fingerprint(deep)
    with pytest.raises(AdapterLoadError):
        safe_load_adapter(deep, directory)
    assert_unchanged(before, deep)
    assert diagnose(build("causal"), directory).ok  # the base it was trained on: no finding


def test_layer_replication_on_an_already_replicated_base_is_refused_with_the_reason(tmp_path: Any) -> None:
    """peft's get_peft_model writes the replicated depth into the config it was given: a base built from that
    config again has 3 fresh layers, and replicating it once more is another model (plain peft: off by 0.6)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from safe_peft import AdapterLoadError, Cause
    from tests.support.helpers import INPUT, llama_config

    shared = llama_config()
    torch.manual_seed(0)
    config = LoraConfig(r=4, target_modules=["q_proj"], layer_replication=[(0, 2), (1, 2)], init_lora_weights=False)
    model = get_peft_model(LlamaForCausalLM(shared).eval(), config).eval()
    with torch.no_grad():
        trained = model(INPUT).logits
    directory = str(tmp_path / "replicated")
    model.save_pretrained(directory)
    assert shared.num_hidden_layers == 3  # what peft did to the caller's config
    torch.manual_seed(0)
    again = LlamaForCausalLM(shared).eval()
    plain = PeftModel.from_pretrained(LlamaForCausalLM(shared).eval(), directory)
    with torch.no_grad():
        assert float((plain(INPUT).logits - trained).abs().max()) > 0.1  # plain peft: silently another model
    report = diagnose(again, directory)
    assert report.primary is not None
    assert (report.primary.cause, report.primary.code) == (Cause.WRONG_BASE_MODEL, "replicated_base")
    with pytest.raises(AdapterLoadError):
        safe_load_adapter(again, directory)
    torch.manual_seed(0)
    fresh = LlamaForCausalLM(llama_config()).eval()  # the fix the report names: the original config
    loaded = safe_load_adapter(fresh, directory)
    with torch.no_grad():
        assert torch.allclose(loaded(INPUT).logits, trained, atol=1e-6)


def test_adalora_after_rank_pruning_loads_with_its_pruned_ranks(tmp_path: Any) -> None:
    """AdaLoRA prunes ranks per module during training; the saved rank_pattern makes peft resize on load."""
    from tests.support import methods, sweep

    result = sweep.run_case(
        sweep.Case("llama", "LlamaForCausalLM", "causal_lm", "ADALORA", "explicit"),
        methods.method_config,
        methods.train_hook(sweep.Case("llama", "LlamaForCausalLM", "causal_lm", "ADALORA", "explicit")),
    )
    assert result.outcome == sweep.EXACT, result.detail


def test_adalora_pruning_really_prunes(tmp_path: Any) -> None:
    import json

    from peft import get_peft_model

    from tests.support import methods, sweep

    case = sweep.Case("llama", "LlamaForCausalLM", "causal_lm", "ADALORA", "explicit")
    model = get_peft_model(build("causal"), methods.method_config(build("causal"), case))
    methods.train_hook(case)(model)  # type: ignore[misc]
    model.save_pretrained(str(tmp_path))
    with open(tmp_path / "adapter_config.json") as f:
        pattern = json.load(f)["rank_pattern"]
    ranks = {sum(mask) for mask in pattern.values()}
    assert (pattern and len(ranks) > 1) or min(ranks) < 6  # ranks differ per module, or all were cut below init_r


def test_user_rules_with_a_shape_problem_name_the_same_rules_and_a_real_docs_section(
    adapters: dict[str, Any], tmp_path: Any
) -> None:
    import json
    import os

    from safe_peft import AdapterLoadError

    src, trained = adapters["causal"]
    directory = derive(
        src,
        str(tmp_path / "compiled_r4"),
        keys=lambda k: k.replace("base_model.model.", "base_model.model._orig_mod."),
        config=lambda c: c.update(r=4),
    )
    rules = {r"_orig_mod\.": ""}
    report = diagnose(build("causal"), directory, remap=rules)
    codes = [d.code for d in report.causes]
    assert codes[0] == "rank_mismatch" and "user_remap" in codes
    assert "the same remap= rules" in primary(report).fix and "user_0" not in primary(report).fix
    layout = next(d for d in report.causes if d.code == "user_remap")
    anchor = layout.url.rsplit("#", 1)[1]
    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs", "causes", "key_format.md")) as f:
        assert f"### `{anchor}`" in f.read()
    with pytest.raises(AdapterLoadError):
        safe_load_adapter(build("causal"), directory, remap=rules)
    model = safe_load_adapter(build("causal"), directory, remap=rules, repair=("rank",))  # both, as the fix says
    assert torch.allclose(outputs(model), trained, atol=1e-6)
    assert json.loads(json.dumps(report.to_dict()))["causes"][0]["code"] == "rank_mismatch"


def test_lenient_load_after_a_predicted_mismatch_adds_no_false_verification_failure(
    adapters: dict[str, Any], tmp_path: Any
) -> None:
    src, _ = adapters["causal"]
    directory = derive(src, str(tmp_path / "half"), keys=lambda k: None if "v_proj" in k else k)
    predicted = diagnose(build("causal"), directory)
    assert not predicted.ok
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # peft's own missing-keys warning: lenient keeps it
        _, report = safe_load_adapter(build("causal"), directory, strict=False, output_loading_info=True)
    assert "verification_failed" not in [d.code for d in report.causes]
    assert [d.code for d in report.causes] == [d.code for d in predicted.causes]


def test_other_adapters_lora_bias_copies_peft_wrote_into_the_file(tmp_path: Any) -> None:
    """peft 0.17 saves, with ``lora_bias=True`` and two adapters, the other adapter's ``lora_B`` biases into each
    adapter's file (``...lora_B.default.bias`` beside ``...lora_B.bias``). peft 0.17 ignores those keys on load, so
    safe_peft loads the file exactly and quietly; a newer peft, loading it as "default", writes the copies over the
    adapter's own biases, so safe_peft leaves them out, loads the adapter that was saved and warns. A newer peft writes
    a clean file: the stray keys are then added as peft 0.17 writes them, so both environments test the same file."""
    from peft.tuners.tuners_utils import BaseTuner
    from safetensors.torch import load_file, save_file

    from safe_peft import safe_load_adapter_inplace

    def config() -> LoraConfig:
        return LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True, init_lora_weights=False)

    torch.manual_seed(3)
    model = get_peft_model(build("causal", attention_bias=True), config())
    model.add_adapter("x", config())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn_like(param) * 0.05)
    model.save_pretrained(str(tmp_path))
    directory = str(tmp_path / "x")
    path = os.path.join(directory, "adapter_model.safetensors")
    state = load_file(path)
    if not any(".lora_B.default.bias" in k for k in state):  # the file peft 0.17 writes
        theirs = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(".lora_B.default.bias")}
        state.update(theirs)
        save_file(state, path)
    model.set_adapter("x")
    reference = outputs(model)
    overwrites = hasattr(BaseTuner, "_remap_adapter_state_dict_for_load")  # a peft that passes model keys through
    plain = outputs(PeftModel.from_pretrained(build("causal", attention_bias=True), directory))
    assert torch.allclose(plain, reference, atol=1e-6) is not overwrites
    loaded, report = safe_load_adapter(build("causal", attention_bias=True), directory, output_loading_info=True)
    assert report.ok and not report.causes
    assert [w.code for w in report.warnings] == (["other_adapter_copies"] if overwrites else [])
    assert torch.allclose(outputs(loaded), reference, atol=1e-6)
    named = safe_load_adapter(build("causal", attention_bias=True), directory, "x", output_loading_info=True)
    assert named[1].ok and not named[1].warnings  # under its own name no peft loads the copies: quiet
    assert torch.allclose(outputs(named[0]), reference, atol=1e-6)
    inplace = build("causal", attention_bias=True)
    safe_load_adapter_inplace(inplace, directory)
    assert torch.allclose(outputs(inplace), reference, atol=1e-6)
