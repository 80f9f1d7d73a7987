"""Ollama's rules (its adapter converter, then llama.cpp), read from their sources."""

from __future__ import annotations

from safe_peft._engines.rule_types import MERGE_FIX, Release, RuleSet, Scaling, source_rule
from safe_peft._engines.rulesets.llama_cpp import lcpp

__all__ = ["OLLAMA_FB30760"]

_o = Release("ollama", "fb30760", "Ollama", folder="convert/")


OLLAMA_FB30760 = RuleSet(
    _o,
    Scaling("global_alpha_over_tensor_rank", _o("convert.go", 171, '"adapter.lora.alpha": alpha'), verified="source"),
    how_tested="read from ollama's convert/ at fb30760 (ADAPTER in a Modelfile; runs on llama.cpp's adapter "
    "loader); tested against hand-built cases",
    architectures=("llama", "gemma2"),
    architectures_source=_o("convert.go", 264, 'return errors.New("unsupported architecture")'),
    rules=(
        source_rule(
            "dora",
            "refuses",
            "ollama_dora",
            "tensors other than lora_a / lora_b are written as they are, and "
            "llama.cpp refuses them: LoRA tensor ... has unexpected suffix",
            MERGE_FIX,
            _o("convert.go", 267, "ts, err := parseTensors(fsys, strings.NewReplacer(conv.Replacements()...))"),
        ),
        source_rule(
            "saved_module",
            "refuses",
            "ollama_modules_to_save",
            "a full head is written as it is; llama.cpp: LoRA tensor ... has unexpected suffix",
            MERGE_FIX,
            _o("convert.go", 267),
        ),
        source_rule(
            "saved_norm",
            "refuses",
            "ollama_saved_norm",
            "norm weights keep their Hugging Face names; llama.cpp: LoRA tensor ... has unexpected suffix",
            MERGE_FIX,
            _o("convert.go", 267),
        ),
        source_rule(
            "lora_bias",
            "refuses",
            "ollama_lora_bias",
            "a lora_B.bias is written as it is; llama.cpp: unexpected suffix",
            MERGE_FIX,
            _o("convert.go", 267),
        ),
        source_rule(
            "base_bias",
            "refuses",
            "ollama_bias",
            "a bias is written as it is; llama.cpp: unexpected suffix",
            MERGE_FIX,
            _o("convert.go", 267),
        ),
        source_rule(
            "trainable_tokens",
            "refuses",
            "ollama_trainable_tokens",
            "written as it is; llama.cpp: unexpected suffix",
            MERGE_FIX,
            _o("convert.go", 267),
        ),
        source_rule(
            "rslora",
            "serves_wrong",
            "ollama_rslora",
            "only lora_alpha is written (adapter.lora.alpha); llama.cpp scales by alpha / rank",
            "safe-peft fix --target ollama folds the rsLoRA scale into lora_B",
            _o("convert.go", 171),
            conversion="fold_scaling",
        ),
        source_rule(
            "alpha_pattern",
            "serves_wrong",
            "ollama_alpha_pattern",
            "only lora_alpha is written",
            "safe-peft fix --target ollama folds each module's alpha into lora_B",
            _o("convert.go", 171),
            conversion="fold_scaling",
        ),
        source_rule(
            "rank_pattern",
            "serves",
            "ollama_rank_pattern",
            "llama.cpp's scale uses each tensor's rank",
            "",
            lcpp("src/llama-adapter.h", 54),
        ),
        source_rule(
            "half_precision",
            "serves",
            "ollama_half_precision",
            "tensors are repacked to float32 / float16",
            "",
            _o("convert_llama_adapter.go", 40),
        ),
    ),
)
