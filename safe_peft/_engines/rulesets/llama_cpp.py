"""llama.cpp's rules (its LoRA converter and loader), read from its source and observed by running it."""

from __future__ import annotations

from safe_peft._engines.rule_types import EngineRule, Release, RuleSet, Scaling

__all__ = ["LLAMACPP_0C1E570", "lcpp"]

lcpp = Release("llamacpp", "0c1e570", "llama.cpp", build="vendored in llama-cpp-python 0.3.36", project="llama.cpp")


LLAMACPP_0C1E570 = RuleSet(
    lcpp,
    Scaling(
        "global_alpha_over_tensor_rank",
        lcpp("src/llama-adapter.h", 55, "scale = alpha ? adapter_scale * alpha / rank : adapter_scale"),
    ),
    how_tested="convert_lora_to_gguf.py (run from vendor/llama.cpp), then llama-cpp-python 0.3.36 built from "
    "source: greedy tokens and logits compared with PeftModel.from_pretrained",
    rules=(
        EngineRule(
            "dora",
            "refuses",
            "llamacpp_dora",
            "Unexpected name '...lora_magnitude_vector': Not a lora_A or lora_B tensor",
            "merge the adapter with peft (merge_and_unload) and convert the merged model with "
            "convert_hf_to_gguf.py; DoRA has no exact LoRA form",
            lcpp("convert_lora_to_gguf.py", 479),
            refuses_when="conversion (convert_lora_to_gguf.py exits 1)",
        ),
        EngineRule(
            "saved_module",
            "refuses",
            "llamacpp_modules_to_save",
            "Unexpected name '...lm_head.weight': Not a lora_A or lora_B tensor (embeddings in the adapter)",
            "merge the adapter with peft (merge_and_unload) and convert the merged model",
            lcpp("convert_lora_to_gguf.py", 479),
            refuses_when="conversion (convert_lora_to_gguf.py exits 1)",
        ),
        EngineRule(
            "saved_norm",
            "serves_wrong",
            "llamacpp_norm_dropped",
            "the converter keeps '_layernorm' / '.norm' tensors, and llama.cpp then skips every '_norm.weight' "
            "adapter tensor ('TODO: add support for norm vector'): the trained norms are silently not applied",
            "merge the adapter with peft (merge_and_unload) and convert the merged model",
            lcpp("src/llama-adapter.cpp", 290),
        ),
        EngineRule(
            "lora_bias",
            "refuses",
            "llamacpp_lora_bias",
            "Unexpected name '...lora_B.bias': Not a lora_A or lora_B tensor",
            "merge the adapter with peft (merge_and_unload) and convert the merged model",
            lcpp("convert_lora_to_gguf.py", 479),
            refuses_when="conversion (convert_lora_to_gguf.py exits 1)",
        ),
        EngineRule(
            "base_bias",
            "refuses",
            "llamacpp_adapter_bias",
            "Unexpected name '...q_proj.bias': Not a lora_A or lora_B tensor",
            "merge the adapter with peft (merge_and_unload) and convert the merged model",
            lcpp("convert_lora_to_gguf.py", 479),
            refuses_when="conversion (convert_lora_to_gguf.py exits 1)",
        ),
        EngineRule(
            "trainable_tokens",
            "refuses",
            "llamacpp_trainable_tokens",
            "Unexpected name '...trainable_tokens_delta': Not a lora_A or lora_B tensor",
            "merge the adapter with peft (merge_and_unload) and convert the merged model",
            lcpp("convert_lora_to_gguf.py", 479),
            refuses_when="conversion (convert_lora_to_gguf.py exits 1)",
        ),
        EngineRule(
            "tied_lm_head_lora",
            "refuses",
            "llamacpp_tied_lm_head",
            "the converter's guard ('lm_head is present in adapter, but is ignored in base model') does not fire "
            "for a tied Llama: it writes an output.lora_a/b pair for a tensor the tied base does not have, and "
            "llama.cpp then crashes (SIGSEGV) when it loads or applies the adapter",
            "retrain without lm_head in target_modules, or merge with peft and convert the merged model",
            lcpp("convert_lora_to_gguf.py", 507, 'if name == "lm_head.weight" and len(dest) == 0:'),
            kills_engine=True,
            refuses_when="load (the process dies with SIGSEGV)",
        ),
        EngineRule(
            "tied_embedding_lora",
            "refuses",
            "llamacpp_tied_embedding",
            "a token_embd LoRA on a tied base aborts llama.cpp: GGML_ASSERT(ggml_can_mul_mat(a, b)) failed",
            "merge the adapter with peft (merge_and_unload) and convert the merged model",
            lcpp("ggml/src/ggml.c", 3354, "GGML_ASSERT(ggml_can_mul_mat(a, b))"),
            kills_engine=True,
            refuses_when="first decode (the process aborts with SIGABRT)",
        ),
        EngineRule(
            "embedding_lora",
            "serves",
            "llamacpp_embedding",
            "lora_embedding_A/B become token_embd.lora_a (transposed) / lora_b",
            "",
            lcpp("convert_lora_to_gguf.py", 522, 'if "token_embd.weight" in dest_name:'),
        ),
        EngineRule(
            "lm_head_lora",
            "serves",
            "llamacpp_lm_head",
            "an untied lm_head LoRA becomes output.lora_a / output.lora_b",
            "",
            lcpp("convert_lora_to_gguf.py", 525),
        ),
        EngineRule(
            "moe_target_parameters",
            "refuses",
            "llamacpp_moe_target_parameters",
            "Can not map tensor 'model.layers.N.mlp.experts.base_layer.weight' (the fused-expert LoRA keys of "
            "target_parameters have no llama.cpp tensor)",
            "merge the adapter with peft (merge_and_unload) and convert the merged model",
            lcpp("convert_lora_to_gguf.py", 463, "base_name = get_base_tensor_name(name)"),
            refuses_when="conversion (convert_lora_to_gguf.py raises ValueError)",
        ),
        EngineRule(
            "moe_base",
            "serves",
            "llamacpp_moe_base",
            "a mixture-of-experts base (Mixtral) with an attention or router LoRA",
            "",
            lcpp("convert_lora_to_gguf.py", 501, "def modify_tensors(self, data_torch, name, bid)"),
        ),
        EngineRule(
            "moe_router_lora",
            "serves",
            "llamacpp_moe_router",
            "a LoRA on the router (mlp.gate) becomes ffn_gate_inp.lora_a / lora_b",
            "",
            lcpp("convert_lora_to_gguf.py", 525),
        ),
        EngineRule(
            "base_rewriting_init",
            "serves_wrong",
            "llamacpp_base_rewriting_init",
            "the converter reads only lora_alpha from the config: an init that rewrote the base weights "
            "(PiSSA, OLoRA, ...) is ignored, so the LoRA is added to the unmodified base",
            "convert the adapter with peft's path_initial_model_for_weight_conversion first",
            lcpp("convert_lora_to_gguf.py", 528, 'alpha: float = lparams["lora_alpha"]'),
        ),
        EngineRule(
            "rslora",
            "serves_wrong",
            "llamacpp_rslora",
            "only the global lora_alpha is written; llama.cpp scales by alpha / rank, not alpha / sqrt(rank)",
            "safe-peft fix --target llamacpp folds the rsLoRA scale into lora_B",
            lcpp("convert_lora_to_gguf.py", 528, 'alpha: float = lparams["lora_alpha"]'),
            conversion="fold_scaling",
        ),
        EngineRule(
            "alpha_pattern",
            "serves_wrong",
            "llamacpp_alpha_pattern",
            "only the global lora_alpha is written: alpha_pattern is ignored",
            "safe-peft fix --target llamacpp folds each module's alpha into lora_B",
            lcpp("convert_lora_to_gguf.py", 528, 'alpha: float = lparams["lora_alpha"]'),
            conversion="fold_scaling",
        ),
        EngineRule(
            "rank_pattern",
            "serves",
            "llamacpp_rank_pattern",
            "the scale uses each tensor's own rank (lora_b ne[0]), so rank_pattern alone is honoured",
            "",
            lcpp("src/llama-adapter.h", 54, "const float rank  = (float) b->ne[0];"),
        ),
        EngineRule(
            "half_precision",
            "serves",
            "llamacpp_half_precision",
            "the converter writes --outtype (f32 by default) whatever the stored dtype",
            "",
            lcpp("convert_lora_to_gguf.py", 287),
        ),
    ),
)
