"""A stand-in for a library you do not own: it loads adapters with plain peft and transformers calls, and a user
cannot change those calls (only switch them, with safe_peft.patched())."""

from __future__ import annotations

from typing import Any

from peft import AutoPeftModelForCausalLM, PeftModel


def load_for_inference(base: Any, path: str, **kwargs: Any) -> Any:
    return PeftModel.from_pretrained(base, path, **kwargs)


def add_adapters(peft_model: Any, paths: dict[str, str]) -> Any:
    for name, path in paths.items():
        peft_model.load_adapter(path, adapter_name=name)
    return peft_model


def load_with_transformers(model: Any, path: str) -> Any:
    model.load_adapter(path)
    return model


def auto_load(path: str) -> Any:
    return AutoPeftModelForCausalLM.from_pretrained(path)
