"""Atomic at every stage: a load made to fail at each point, by a real broken input, leaves the base model as it was."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Callable
from typing import Any, Literal

import pytest
import torch

from safe_peft import AdapterLoadError, safe_load_adapter
from tests.support.helpers import assert_unchanged, build, derive, disk_offloaded, fingerprint


def _bad_config(src: str, dst: str) -> tuple[str, dict[str, Any]]:
    shutil.copytree(src, dst)
    with open(os.path.join(dst, "adapter_config.json"), "w") as f:
        f.write('{"peft_type": "LORA", "r": ')
    return dst, {}


def _bad_header(src: str, dst: str) -> tuple[str, dict[str, Any]]:
    shutil.copytree(src, dst)
    path = os.path.join(dst, "adapter_model.safetensors")
    os.truncate(path, os.path.getsize(path) - 4)
    return dst, {}


def _bad_pickle_data(src: str, dst: str) -> tuple[str, dict[str, Any]]:
    shutil.copytree(src, dst)
    os.remove(os.path.join(dst, "adapter_model.safetensors"))
    with open(os.path.join(dst, "adapter_model.bin"), "wb") as f:
        f.write(b"PK\x03\x04 not really a zip archive")
    return dst, {"allow_pickle": True}


def _injection(src: str, dst: str) -> tuple[str, dict[str, Any]]:
    """target_modules naming a container (LlamaMLP), which peft cannot wrap."""
    return derive(src, dst, config=lambda c: c.update(target_modules=["mlp"])), {}


def _state_dict_load(src: str, dst: str) -> tuple[str, dict[str, Any]]:
    """A fitting adapter; the base is disk-offloaded, where peft 0.21 fails after injecting (see _base)."""
    return src, {}


def _verification(src: str, dst: str) -> tuple[str, dict[str, Any]]:
    nan = lambda k, v: v.fill_(float("inf")) if "layers.0.self_attn.v_proj.lora_A" in k else v  # noqa: E731
    return derive(src, dst, tensors=nan), {}


STAGES: dict[str, tuple[Callable[[str, str], tuple[str, dict[str, Any]]], str]] = {
    "config_parse": (_bad_config, "bad_config_json"),
    "header": (_bad_header, "truncated_file"),
    "data_read": (_bad_pickle_data, "unreadable_pickle"),
    "layer_injection": (_injection, "injection_rejected"),
    "state_dict_load": (_state_dict_load, "load_failed"),
    "post_load_verification": (_verification, "non_finite_values"),
}


def _base(stage: str, tmp_path: Any) -> torch.nn.Module:
    if stage != "state_dict_load":
        return build("causal")
    os.chdir(tmp_path)  # see disk_offloaded
    return disk_offloaded(str(tmp_path))


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_failure_point_leaves_the_base_model_unchanged(
    stage: str, adapters: dict[str, Any], tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    make, code = STAGES[stage]
    monkeypatch.chdir(os.getcwd())  # restored after the test, whatever _base changes
    directory, kwargs = make(adapters["causal"][0], str(tmp_path / stage))
    base = _base(stage, tmp_path)
    before = fingerprint(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(AdapterLoadError) as info:
            safe_load_adapter(base, directory, **kwargs)
    assert code in [d.code for d in info.value.report.causes], str(info.value)
    assert_unchanged(before, base)
    with torch.no_grad():
        assert torch.allclose(base(torch.tensor([[1, 2, 3]])).logits, build("causal")(torch.tensor([[1, 2, 3]])).logits)


def test_undo_after_a_successful_load_that_fails_verification_restores_embeddings(tmp_path: Any) -> None:
    """Base embedding weights saved with an embedding adapter are written in place by peft; a failure restores them."""
    from tests.support.helpers import train_adapter

    directory = str(tmp_path / "emb")
    train_adapter(build("causal", seed=5), directory, target_modules=["embed_tokens", "q_proj"])
    weights = os.path.join(directory, "adapter_model.safetensors")
    from safetensors.torch import load_file, save_file

    state = load_file(weights)
    assert any(k.endswith("embed_tokens.base_layer.weight") for k in state)
    state = {k: (v.fill_(float("nan")) if "q_proj.lora_B" in k else v) for k, v in state.items()}
    save_file(state, weights)
    base = build("causal")
    before = fingerprint(base)
    with pytest.raises(AdapterLoadError) as info:
        safe_load_adapter(base, directory)
    assert info.value.report.primary is not None
    assert info.value.report.primary.code == "non_finite_values"
    assert_unchanged(before, base)


def test_config_json_is_untouched_and_files_unmodified(adapters: dict[str, Any], tmp_path: Any) -> None:
    directory = derive(adapters["causal"][0], str(tmp_path / "x"), config=lambda c: c.update(r=4))
    with open(os.path.join(directory, "adapter_config.json")) as f:
        before = json.load(f)
    with pytest.raises(AdapterLoadError):
        safe_load_adapter(build("causal"), directory)
    with open(os.path.join(directory, "adapter_config.json")) as f:
        assert json.load(f) == before


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_base_rewriting_init_is_restored_after_a_failed_load(init: Literal["pissa", "olora"], tmp_path: Any) -> None:
    """peft re-runs PiSSA / OLoRA initialisation on load, rewriting base weights through `.data`: a load that then
    fails must still give the base its original values back."""
    from peft import LoraConfig, get_peft_model

    directory = str(tmp_path / init)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_peft_model(
            build("causal"), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=init)
        ).save_pretrained(directory)
    bad = derive(
        directory,
        str(tmp_path / "nan"),
        tensors=lambda k, v: v.fill_(float("nan")) if "layers.1.self_attn.q_proj.lora_B" in k else v,
    )
    assert diagnose_warnings(bad) == []  # plain peft re-runs the init on the original base: that load is exact
    base = build("causal")
    before = fingerprint(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(AdapterLoadError) as info:
            safe_load_adapter(base, bad)
    assert info.value.report.primary is not None and info.value.report.primary.code == "non_finite_values"
    assert_unchanged(before, base)


def diagnose_warnings(directory: str) -> list[str]:
    from safe_peft import diagnose

    return [w.code for w in diagnose(build("causal"), directory).warnings]
