"""safe_peft demo: a tiny Llama, a real adapter, and the ways loading it goes wrong.

Run with `make demo`. Nothing is downloaded: the model is built from a config with a fixed seed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

from safe_peft import AdapterLoadError, diagnose, safe_load_adapter

CONFIG = LlamaConfig(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=100,
)
INPUT = torch.tensor([[1, 5, 9, 13]])


def base(cls: type = LlamaForCausalLM) -> torch.nn.Module:
    torch.manual_seed(0)
    return cls(CONFIG).eval()


def rule(title: str) -> None:
    print(f"\n{'=' * 100}\n{title}\n{'=' * 100}")


def main() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers deprecation notices from peft
    work = tempfile.mkdtemp(prefix="safe_peft_demo_")
    try:
        good = os.path.join(work, "adapter")
        torch.manual_seed(1)
        trained = get_peft_model(base(), LoraConfig(r=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        trained.save_pretrained(good)
        with torch.no_grad():
            reference = trained(INPUT).logits

        broken = os.path.join(work, "broken")
        shutil.copytree(good, broken)
        path = os.path.join(broken, "adapter_config.json")
        with open(path) as f:
            cfg = json.load(f)
        cfg["r"] = 32  # the config saved next to these weights says r=32; the weights are rank 64
        with open(path, "w") as f:
            json.dump(cfg, f)

        rule("1. A config that disagrees with its weights: plain peft")
        model = base()
        try:
            PeftModel.from_pretrained(model, broken)
        except RuntimeError as exc:
            text = str(exc)
            print(text[:600] + (f"\n... ({len(text) - 600} more characters)" if len(text) > 600 else ""))
        print(
            f"\nAnd the base model now has LoRA layers injected: q_proj is a "
            f"{type(model.model.layers[0].self_attn.q_proj).__module__}.{type(model.model.layers[0].self_attn.q_proj).__name__}"
        )

        rule("1. The same load with safe_peft")
        model = base()
        try:
            safe_load_adapter(model, broken)
        except AdapterLoadError as exc:
            print(exc)
        print(f"\nThe base model is untouched: q_proj is a {type(model.model.layers[0].self_attn.q_proj).__name__}")

        rule("1. The opt-in fix the report names: repair=('rank',)")
        fixed, report = safe_load_adapter(model, broken, repair=("rank",), output_loading_info=True)
        with torch.no_grad():
            same = torch.allclose(fixed(INPUT).logits, reference, atol=1e-5)
        print("\n".join(report.repairs))
        print(f"outputs equal to the adapter as trained: {same}")

        rule("2. A CausalLM adapter loaded into AutoModel's bare LlamaModel: plain peft")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            PeftModel.from_pretrained(base(LlamaModel), good)
        for w in caught:
            if "missing adapter keys" in str(w.message):
                print(f"(only a warning) {str(w.message)[:300]} ...")
        print("-> the model runs as if it had no adapter.")

        rule("2. The same load with safe_peft: a clear error before anything is touched")
        report = diagnose(base(LlamaModel), good)
        print(report)

        rule("2. The opt-in fix the report names: remap='auto' (every key must land exactly, or nothing is renamed)")
        fixed, report = safe_load_adapter(base(LlamaModel), good, remap="auto", output_loading_info=True)
        print(f"{len(report.renames)} keys renamed, e.g. {next(iter(report.renames.items()))}")
        with torch.no_grad():
            hidden = fixed(INPUT).last_hidden_state
            trained_hidden = trained.base_model.model.model(INPUT).last_hidden_state
        print(f"hidden states equal to the adapter as trained: {torch.allclose(hidden, trained_hidden, atol=1e-5)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
