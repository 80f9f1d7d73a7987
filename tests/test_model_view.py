"""The analytic expected keys equal what peft's own injection produces, on real tiny models."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from typing import Any

import pytest
import torch
from peft import LoraConfig

from safe_peft._model.meta import meta_skeleton
from safe_peft._model.view import _by_injection, expected_keys
from tests.support.helpers import build

CASES: list[tuple[str, dict[str, Any]]] = [
    ("causal", dict(target_modules=["q_proj", "v_proj"])),
    ("causal", dict(target_modules="all-linear", use_dora=True)),
    ("causal", dict(target_modules=["q_proj", "embed_tokens"], use_dora=True, modules_to_save=["lm_head"])),
    ("causal", dict(target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"])),
    ("causal", dict(target_modules=["q_proj", "lm_head"], modules_to_save=["embed_tokens"])),
    ("causal", dict(target_modules=["v_proj"], lora_bias=True, rank_pattern={"layers.1.self_attn.v_proj": 8})),
    ("causal", dict(target_modules=["q_proj", "k_proj"], layers_to_transform=[1], layers_pattern="layers")),
    ("causal", dict(target_modules=r".*\.(q|k)_proj")),
    ("seqcls", dict(target_modules=["q_proj"], task_type="SEQ_CLS")),
    ("gpt2", dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
    ("bert", dict(target_modules=["query", "value"], exclude_modules=["layer.0.attention.self.query"])),
    ("bare", dict(target_modules=["q_proj"], layers_to_transform=[1])),
]


# peft's own notice for lora_bias on a layer without a bias: plain peft gives it on every load of such a config
PEFT_NOTICE = pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed but the targeted layer:UserWarning")


@pytest.mark.parametrize(
    "kind, lora",
    [pytest.param(k, lo, marks=[PEFT_NOTICE] if lo.get("lora_bias") else []) for k, lo in CASES],
    ids=[f"{k}-{i}" for i, (k, _) in enumerate(CASES)],
)
def test_analytic_equals_injection(kind: str, lora: dict[str, Any]) -> None:
    model = build(kind)
    config = LoraConfig(r=4, **lora)
    view = expected_keys(model, config)
    assert view.method == "analytic"
    injected, error = _by_injection(model, config, "default")
    assert (view.error is None) == (error is None)
    assert {k: (e.shape, e.required) for k, e in view.expected.items()} == {
        k: (e.shape, e.required) for k, e in injected.items()
    }


def test_unmodelled_configs_use_injection() -> None:
    view = expected_keys(build("causal"), LoraConfig(r=4, target_modules=["q_proj"], bias="lora_only"))
    assert view.method == "injection"
    assert any(k.endswith("q_proj.lora_A.weight") for k in view.expected)


def test_meta_skeleton_copies_no_data_and_leaves_the_model_alone() -> None:
    model = build("causal")
    model.get_parameter("model.layers.0.self_attn.q_proj.weight").requires_grad_(False)
    skeleton = meta_skeleton(model)
    assert all(p.device.type == "meta" for p in skeleton.parameters())
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert not skeleton.get_parameter("model.layers.0.self_attn.q_proj.weight").requires_grad
    assert skeleton.get_submodule("model.layers.0") is not model.get_submodule("model.layers.0")


def test_diagnose_on_a_meta_model_agrees_with_a_real_one(adapters: dict[str, Any]) -> None:
    from transformers import LlamaForCausalLM

    from safe_peft import diagnose
    from tests.support.helpers import llama_config

    with torch.device("meta"):
        meta = LlamaForCausalLM(llama_config())
    assert diagnose(meta, adapters["causal"][0]).ok
    bad = diagnose(meta, adapters["wide"][0])
    real = diagnose(build("causal"), adapters["wide"][0])
    assert bad.primary is not None and bad.primary == real.primary
    assert bad.size_mismatches == real.size_mismatches


def test_dispatched_model(adapters: dict[str, Any], tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model dispatched by accelerate (a layer offloaded to disk, its parameters on meta) diagnoses and loads."""
    from safe_peft import AdapterLoadError, diagnose, safe_load_adapter
    from tests.support.helpers import disk_offloaded

    monkeypatch.chdir(tmp_path)  # see disk_offloaded
    model = disk_offloaded(str(tmp_path))
    assert model.get_parameter("model.layers.1.self_attn.q_proj.weight").device.type == "meta"
    assert diagnose(model, adapters["causal"][0]).ok
    wrong = diagnose(model, adapters["wide"][0])
    assert wrong.primary is not None and wrong.primary.code == "dimension_mismatch"
    with pytest.raises(AdapterLoadError):
        safe_load_adapter(model, adapters["wide"][0])
    assert type(model.get_submodule("model.layers.0.self_attn.q_proj")) is torch.nn.Linear
    with torch.no_grad():
        plain = model(torch.tensor([[1, 5, 9, 13, 17, 21]])).logits  # hooks still work after the refused load
    assert torch.allclose(plain, build("causal")(torch.tensor([[1, 5, 9, 13, 17, 21]])).logits, atol=1e-5)
    # peft 0.21 itself cannot load into a disk-offloaded layer ("Cannot copy out of meta tensor"): a real
    # late failure, after injection. safe_peft must report it and leave the dispatched model working.
    before = [(n, type(m).__name__) for n, m in model.named_modules()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(AdapterLoadError) as info:
            safe_load_adapter(model, adapters["causal"][0])
    assert info.value.report.primary is not None
    assert info.value.report.causes[-1].code == "load_failed"
    assert [(n, type(m).__name__) for n, m in model.named_modules()] == before
    assert not hasattr(model, "peft_config")
    with torch.no_grad():
        again = model(torch.tensor([[1, 5, 9, 13, 17, 21]])).logits
    assert torch.allclose(again, plain, atol=1e-6)


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar"))


def test_diagnose_reads_only_the_header_of_a_huge_sparse_adapter(tmp_path: Any) -> None:
    """An adapter whose data region is a 600 MB hole: diagnose answers and reads well under 1 MB."""
    import json
    import struct

    from transformers import LlamaForCausalLM

    from safe_peft import diagnose
    from tests.support.helpers import llama_config

    hidden, layers, r = 4096, 4, 16
    cfg = llama_config(
        hidden_size=hidden,
        intermediate_size=11008,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    header: dict[str, Any] = {}
    offset = 0
    shapes = {
        "q_proj": (hidden, hidden),
        "k_proj": (hidden, hidden),
        "v_proj": (hidden, hidden),
        "o_proj": (hidden, hidden),
        "gate_proj": (hidden, 11008),
        "up_proj": (hidden, 11008),
        "down_proj": (11008, hidden),
    }
    for i in range(layers):
        for name, (fan_in, fan_out) in shapes.items():
            part = "mlp" if name in {"gate_proj", "up_proj", "down_proj"} else "self_attn"
            stem = f"base_model.model.model.layers.{i}.{part}.{name}"
            for suffix, shape in (("lora_A.weight", [r, fan_in]), ("lora_B.weight", [fan_out, r])):
                size = shape[0] * shape[1] * 4
                header[f"{stem}.{suffix}"] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
                offset += size
    directory = tmp_path / "sparse"
    directory.mkdir()
    body = json.dumps(header).encode()
    weights = directory / "adapter_model.safetensors"
    with open(weights, "wb") as f:
        f.write(struct.pack("<Q", len(body)) + body)
    hole = 600 * 1024 * 1024
    os.truncate(weights, 8 + len(body) + offset + 0)  # the data region: a hole, no bytes written
    (directory / "adapter_config.json").write_text(
        json.dumps(
            {"peft_type": "LORA", "r": r, "lora_alpha": 32, "target_modules": "all-linear", "task_type": "CAUSAL_LM"}
        )
    )
    assert offset > 10 * 1024 * 1024
    assert hole > 0
    diagnose(model, str(directory))  # warm up imports outside the measurement
    before = _rchar()
    report = diagnose(model, str(directory))
    read = _rchar() - before
    assert report.ok, str(report)
    assert read < 1024 * 1024, read


def test_import_is_lazy() -> None:
    code = (
        "import sys, safe_peft\n"
        "from safe_peft import Cause, LoadReport, AdapterLoadError, inspect_adapter, parse_load_error\n"
        "parse_load_error('size mismatch for a: copying a param with shape torch.Size([1]) from checkpoint, "
        "the shape in current model is torch.Size([2]).')\n"
        "heavy = [m for m in ('torch', 'peft', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("kind, lora", CASES[:-1], ids=[f"{k}-{i}" for i, (k, _) in enumerate(CASES[:-1])])
def test_fast_adapter_tensor_names_equal_peft_state_dict(kind: str, lora: dict[str, Any]) -> None:
    from peft import get_peft_model, get_peft_model_state_dict

    from safe_peft._load.adapter_tensors import adapter_tensors

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notice about lora_bias on bias-less layers
        model = get_peft_model(build(kind), LoraConfig(r=4, **lora))
        # peft 0.21 also warns that lora_B.bias (1-D by design) looks like a ZeRO-3 shard: its false positive
        reference = get_peft_model_state_dict(model, save_embedding_layers=False)
    fast = adapter_tensors(model, "default", analytic=True)
    assert {k: tuple(v.shape) for k, v in fast.items()} == {k: tuple(v.shape) for k, v in reference.items()}
