"""Tiny real models and real adapters for the tests (fixed seeds, nothing downloaded)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from safe_peft import Diagnosis, LoadReport

INPUT = torch.tensor([[1, 5, 9, 13, 17, 21]])


def save_config(model: nn.Module, directory: str | os.PathLike[str]) -> None:
    """Write ``model``'s config.json alone, naming its class: a base the command line reads by path."""
    from transformers import PreTrainedModel

    assert isinstance(model, PreTrainedModel)
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(directory)


def primary(report: LoadReport) -> Diagnosis:
    """The report's most likely cause; a report with none fails the test here, saying so."""
    assert report.primary is not None, f"no finding in the report: {report}"
    return report.primary


def llama_config(**overrides: Any) -> Any:
    from transformers import LlamaConfig

    values: dict[str, Any] = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        max_position_embeddings=64,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def build(kind: str = "causal", seed: int = 0, **overrides: Any) -> nn.Module:
    """A tiny transformers model with fixed weights: causal | bare | seqcls | gpt2 | bert."""
    import transformers as tf

    torch.manual_seed(seed)
    model: nn.Module
    if kind == "gpt2":
        model = tf.GPT2LMHeadModel(
            tf.GPT2Config(
                n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0
            )
        )
    elif kind == "bert":
        model = tf.BertModel(
            tf.BertConfig(
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=128,
                vocab_size=100,
                max_position_embeddings=64,
            )
        )
    else:
        cls = {"causal": tf.LlamaForCausalLM, "bare": tf.LlamaModel, "seqcls": tf.LlamaForSequenceClassification}[kind]
        extra = {"num_labels": 3, "pad_token_id": 0} if kind == "seqcls" else {}
        model = cls(llama_config(**{**extra, **overrides}))
    return model.eval()


def disk_offloaded(directory: Any) -> nn.Module:
    """The tiny causal Llama loaded by accelerate with its second layer offloaded to disk (parameters on meta).

    Call with the current directory set to ``directory``: transformers' disk offload writes a copy of the weights
    under the current directory.
    """
    from transformers import LlamaForCausalLM

    build("causal").save_pretrained(os.path.join(directory, "base"))
    device_map = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    return LlamaForCausalLM.from_pretrained(
        os.path.join(directory, "base"), device_map=device_map, offload_folder=os.path.join(directory, "offload")
    )


def train_adapter(model: nn.Module, directory: str, seed: int = 1, **lora: Any) -> torch.Tensor:
    """Wrap ``model`` with a LoRA whose lora_B is non-zero (as after training), save it, return its outputs."""
    lora.setdefault("r", 8)
    lora.setdefault("target_modules", ["q_proj", "v_proj"])
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.05)
    peft_model.eval()
    peft_model.save_pretrained(directory)
    return outputs(peft_model)


def outputs(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out = model(INPUT)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def derive(
    src: str,
    dst: str,
    *,
    keys: Callable[[str], str | None] | None = None,
    tensors: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    config: Callable[[dict[str, Any]], None] | None = None,
) -> str:
    """Copy an adapter directory, renaming keys / changing tensors / editing the config on the way."""
    shutil.copytree(src, dst)
    path = os.path.join(dst, "adapter_model.safetensors")
    state = load_file(path)
    new = {}
    for key, value in state.items():
        name = keys(key) if keys else key
        if name is not None:
            new[name] = tensors(key, value) if tensors else value
    save_file({k: v.contiguous() for k, v in new.items()}, path)
    if config is not None:
        cfg_path = os.path.join(dst, "adapter_config.json")
        with open(cfg_path) as f:
            data = json.load(f)
        config(data)
        with open(cfg_path, "w") as f:
            json.dump(data, f)
    return dst


def fingerprint(model: nn.Module) -> dict[str, Any]:
    """Everything a failed load must leave as it was: structure, values, flags, attributes."""
    return {
        "types": [(n, type(m).__name__) for n, m in model.named_modules()],
        "params": {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
        "attrs": sorted(model.__dict__),
        "peft_config": hasattr(model, "peft_config"),
        "training": [m.training for m in model.modules()],
        "hooks": [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()],
    }


def assert_unchanged(before: dict[str, Any], model: nn.Module) -> None:
    after = fingerprint(model)
    assert after["types"] == before["types"]
    assert after["attrs"] == before["attrs"]
    assert after["peft_config"] == before["peft_config"] is False
    assert after["training"] == before["training"]
    assert after["hooks"] == before["hooks"]
    assert after["params"].keys() == before["params"].keys()
    for name, (value, grad) in before["params"].items():
        now = after["params"][name][0]
        assert now.device == value.device and now.shape == value.shape, name
        if value.device.type != "meta":
            assert torch.equal(now, value), name
        assert after["params"][name][1] == grad, name


def model_state(model: nn.Module) -> dict[str, Any]:
    """Everything a failed load must leave as it was, for any model: a bare base, a PeftModel (its adapters, their
    weights and configs, the active adapter, trainable flags) or a transformers model carrying adapters in place."""
    import copy

    from peft.tuners.tuners_utils import BaseTunerLayer

    inner = getattr(model, "_orig_mod", model)
    configs = getattr(inner, "peft_config", None)
    layers = {}
    for name, module in inner.named_modules():
        if isinstance(module, BaseTunerLayer):
            layers[name] = {
                "active": copy.copy(module.active_adapters),
                "merged": list(module.merged_adapters),
                "scaling": {
                    k: (v.detach().clone() if torch.is_tensor(v) else float(v))
                    for k, v in getattr(module, "scaling", {}).items()
                },
                "r": dict(getattr(module, "r", {})),
                "disabled": module.disable_adapters,
            }
    tuner = getattr(inner, "base_model", None)
    return {
        "types": [(n, type(m).__name__) for n, m in inner.named_modules()],
        "params": {n: (p.detach().clone(), p.requires_grad, p.dtype, p.device) for n, p in inner.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in inner.named_buffers()},
        "attrs": sorted(inner.__dict__),
        "peft_config": {k: v.to_dict() for k, v in configs.items()} if isinstance(configs, dict) else None,
        "active": _active(inner) if configs is not None else None,
        "targeted": list(getattr(tuner, "targeted_module_names", []) or []),
        "layers": layers,
        "training": [m.training for m in inner.modules()],
        "hooks": [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in inner.modules()],
        "hf_loaded": inner.__dict__.get("_hf_peft_config_loaded"),
    }


def assert_same_state(before: dict[str, Any], model: nn.Module) -> None:
    """``model`` is as ``before`` recorded it (see :func:`model_state`), tensor values included."""
    after = model_state(model)
    for key in ("types", "attrs", "peft_config", "active", "targeted", "training", "hooks", "hf_loaded"):
        assert after[key] == before[key], key
    assert after["layers"].keys() == before["layers"].keys()
    for name, layer in before["layers"].items():
        now = after["layers"][name]
        plain = [k for k in layer if k != "scaling"]
        assert [now[k] for k in plain] == [layer[k] for k in plain], name
        assert now["scaling"].keys() == layer["scaling"].keys(), name
        for k, v in layer["scaling"].items():
            assert torch.equal(now["scaling"][k], v) if torch.is_tensor(v) else now["scaling"][k] == v, (name, k)
    assert after["params"].keys() == before["params"].keys()
    for name, (value, grad, dtype, device) in before["params"].items():
        now, now_grad, now_dtype, now_device = after["params"][name]
        assert (now_grad, now_dtype, now_device, now.shape) == (grad, dtype, device, value.shape), name
        if value.device.type != "meta":
            assert _equal(now, value), name
    assert after["buffers"].keys() == before["buffers"].keys()
    for name, value in before["buffers"].items():
        assert torch.equal(after["buffers"][name], value), name


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch.equal, also for tensor subclasses that do not implement it (torchao's quantized weights): their inner
    tensors and metadata, as ``__tensor_flatten__`` gives them, are compared instead."""
    try:
        return torch.equal(a, b)
    except NotImplementedError:
        if type(a) is not type(b) or not hasattr(a, "__tensor_flatten__"):
            raise
    names, meta = getattr(a, "__tensor_flatten__")()  # a tensor subclass's (hasattr above)
    names_b, meta_b = getattr(b, "__tensor_flatten__")()
    return names == names_b and meta == meta_b and all(_equal(getattr(a, n), getattr(b, n)) for n in names)


def _active(model: nn.Module) -> list[str]:
    """A PeftModel's active adapters (a transformers model's are those of its tuner layers, recorded per layer:
    its own active_adapters() insists on a newer peft than transformers 5.24 loads adapters with)."""
    active = getattr(model, "active_adapters", [])
    return [] if callable(active) else list(active)
