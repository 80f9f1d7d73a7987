"""SGLang's rules, read from its source."""

from __future__ import annotations

from safe_peft._engines.rule_types import MERGE_FIX, Release, RuleSet, Scaling, source_rule

__all__ = ["SGLANG_0_5_23"]

_s = Release("sglang", "0.5.23", "SGLang", folder="sglang/srt/lora/", build="PyPI wheel")


SGLANG_0_5_23 = RuleSet(
    _s,
    Scaling(
        "global_alpha_over_r",
        _s("lora.py", 71, "self.scaling: float = self.config.lora_alpha / self.config.r"),
        verified="source",
    ),
    how_tested="read from the sglang 0.5.23 wheel (not run here: it needs a GPU); tested against hand-built cases",
    rules=(
        source_rule(
            "dora",
            "refuses",
            "sglang_dora",
            "LoRA serving currently doesn't support DoRA adapters",
            MERGE_FIX,
            _s("lora_manager.py", 349, "if lora_config.use_dora:"),
            refuses_when="load_lora_adapter",
        ),
        source_rule(
            "rslora",
            "serves_wrong",
            "sglang_rslora",
            "one scale per adapter, lora_alpha / r: use_rslora is not read",
            "safe-peft fix --target sglang folds the rsLoRA scale into lora_B",
            _s("lora.py", 71),
            conversion="fold_scaling",
        ),
        source_rule(
            "alpha_pattern",
            "serves_wrong",
            "sglang_alpha_pattern",
            "one scale per adapter, lora_alpha / r: alpha_pattern only gates admission",
            "safe-peft fix --target sglang folds each module's scale into lora_B",
            _s("lora.py", 71),
            conversion="fold_scaling",
        ),
        source_rule(
            "rank_pattern",
            "serves_wrong",
            "sglang_rank_pattern",
            "one scale per adapter, lora_alpha / r, whatever the module's rank",
            "safe-peft fix --target sglang folds each module's scale into lora_B (and pads every module to one rank)",
            _s("lora.py", 71),
            conversion="fold_scaling",
        ),
        source_rule(
            "saved_module",
            "serves_wrong",
            "sglang_modules_to_save_skipped",
            "weights that match no target module are skipped with a warning (an error only with --lora-strict-loading)",
            MERGE_FIX,
            _s("mem_pool.py", 951, "if self.strict_loading:"),
        ),
        source_rule(
            "saved_norm",
            "serves_wrong",
            "sglang_norm_skipped",
            "weights that match no target module are skipped with a warning (an error only with --lora-strict-loading)",
            MERGE_FIX,
            _s("mem_pool.py", 951, "if self.strict_loading:"),
        ),
        source_rule(
            "trainable_tokens",
            "serves_wrong",
            "sglang_trainable_tokens_skipped",
            "an embed_tokens weight outside target_modules is skipped",
            MERGE_FIX,
            _s("lora.py", 179),
        ),
        source_rule(
            "half_precision",
            "serves",
            "sglang_half_precision",
            "weights are cast to the model dtype",
            "",
            _s("mem_pool.py", 153),
        ),
    ),
)
