"""TensorRT-LLM's rules, read from its source."""

from __future__ import annotations

from safe_peft._engines.rule_types import MERGE_FIX, RankLimit, Release, RuleSet, Scaling, Source, source_rule

__all__ = ["TRTLLM_007E181"]

_trt = Release("tensorrt-llm", "007e181", "TensorRT-LLM", folder="tensorrt_llm/", project="TensorRT-LLM")


def _t(line: int | None, quote: str) -> Source:
    """A line of lora_manager.py, the one file its rules come from."""
    return _trt("lora_manager.py", line, quote)


TRTLLM_007E181 = RuleSet(
    _trt,
    Scaling(
        "global_alpha_over_tensor_rank_rslora",
        _t(None, 'scale = float(hf_config["lora_alpha"]) / np.sqrt(effective_rank)'),
        verified="source",
    ),
    how_tested="read from tensorrt_llm/lora_manager.py at 007e181 (not run here: it needs a GPU); tested against "
    "hand-built cases",
    rank_limit=RankLimit(
        allowed=tuple(range(1, 1025)),
        default=64,
        setting="max_lora_rank",
        flag="--max_lora_rank",
        source=_t(None, "max_lora_rank: int = 64"),
        verified="source",
    ),
    rules=(
        source_rule(
            "dora",
            "serves",
            "trtllm_dora",
            "lora_magnitude_vector is read and normalised (not for MoE)",
            "",
            _t(None, "def norm_dora_magnitude("),
        ),
        source_rule(
            "rslora",
            "serves",
            "trtllm_rslora",
            "use_rslora: lora_alpha / sqrt(rank)",
            "",
            _t(None, 'rs_lora = bool(hf_config.get("use_rslora", False))'),
        ),
        source_rule(
            "rank_pattern",
            "serves",
            "trtllm_rank_pattern",
            "the scale uses each module's own rank (effective_rank = the tensor's)",
            "",
            _t(None, "effective_rank = t_in.shape[rank_dim]"),
        ),
        source_rule(
            "alpha_pattern",
            "serves_wrong",
            "trtllm_alpha_pattern",
            "the global lora_alpha only",
            "safe-peft fix --target tensorrt-llm folds each module's alpha into lora_B",
            _t(None, 'scale = float(hf_config["lora_alpha"]) / effective_rank'),
            conversion="fold_scaling",
        ),
        source_rule(
            "saved_module",
            "serves",
            "trtllm_modules_to_save_head",
            "modules_to_save lm_head / embed_tokens "
            "replace the engine's head or embedding (at build time, for every request)",
            "",
            _t(None, 'if "lm_head" in adapter_config["modules_to_save"]:'),
        ),
        source_rule(
            "saved_norm",
            "refuses",
            "trtllm_unsupported_key",
            "unsupported key ... from HF LoRA weights (KeyError: only lora_A/B and magnitude keys of numbered layers)",
            MERGE_FIX,
            _t(None, 'raise KeyError(f"unsupported key {key} from HF LoRA weights")'),
        ),
        source_rule(
            "lora_bias",
            "refuses",
            "trtllm_lora_bias",
            "unsupported key ...lora_B.bias (KeyError)",
            MERGE_FIX,
            _t(None, 'raise KeyError(f"unsupported key {key} from HF LoRA weights")'),
        ),
        source_rule(
            "base_bias",
            "refuses",
            "trtllm_bias",
            "unsupported key ...bias (KeyError)",
            MERGE_FIX,
            _t(None, 'raise KeyError(f"unsupported key {key} from HF LoRA weights")'),
        ),
        source_rule(
            "embedding_lora",
            "serves_wrong",
            "trtllm_embedding_lora_skipped",
            "keys with embed_tokens that are not layer LoRA keys are skipped without a word",
            MERGE_FIX,
            _t(None, 'if "lm_head" not in key and "embed_tokens" not in key:'),
        ),
        source_rule(
            "lm_head_lora",
            "serves_wrong",
            "trtllm_lm_head_lora_skipped",
            "keys with lm_head that are not layer LoRA keys are skipped without a word",
            MERGE_FIX,
            _t(None, 'if "lm_head" not in key and "embed_tokens" not in key:'),
        ),
        source_rule(
            "tied_lm_head_lora",
            "serves_wrong",
            "trtllm_tied_lm_head_lora_skipped",
            "keys with lm_head that are not layer LoRA keys are skipped without a word",
            MERGE_FIX,
            _t(None, 'if "lm_head" not in key and "embed_tokens" not in key:'),
        ),
        source_rule(
            "trainable_tokens",
            "serves_wrong",
            "trtllm_trainable_tokens_skipped",
            "embed_tokens.token_adapter keys are skipped without a word",
            MERGE_FIX,
            _t(None, 'if "lm_head" not in key and "embed_tokens" not in key:'),
        ),
        source_rule(
            "moe_target_parameters",
            "refuses",
            "trtllm_moe_target_parameters",
            "experts.base_layer is not in "
            "the supported module list (AssertionError); per-expert experts.N.w1/w2/w3 are",
            MERGE_FIX,
            _t(None, "assert hf_module in hf_modules"),
        ),
        source_rule(
            "half_precision",
            "serves",
            "trtllm_half_precision",
            "weights are cast to the model dtype",
            "",
            _t(None, "t_in = t_in.to(str_dtype_to_torch(model_config.dtype))"),
        ),
    ),
)
