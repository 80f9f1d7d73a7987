"""The serving-engine corpus: tiny base models and adapters, each rebuilt deterministically from a name and builder
parameters (never downloaded), and peft's reference outputs for them.

Used by the tests (which rebuild the adapters and compare ``check_target``'s predictions with the verdicts the real
engines gave, recorded in ``recorded.json``) and by ``make engines`` (``tools/engines/run.py``), which rebuilds
everything, runs the real engines and rewrites ``recorded.json``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
RECORDED = os.path.join(HERE, "recorded.json")

# Prompts are token ids: the tiny models have no tokenizer. Greedy generation of NEW_TOKENS tokens per prompt.
PROMPTS: tuple[tuple[int, ...], ...] = ((5, 17, 42, 99, 123, 7), (250, 3, 77, 310, 11, 64, 200), (31, 402, 8, 150))
NEW_TOKENS = 6

_DIMS = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2}
_TEXT = {
    **_DIMS,
    "num_key_value_heads": 1,
    "head_dim": 64,
    "vocab_size": 512,
    "max_position_embeddings": 256,
    "initializer_range": 0.15,
}

# name -> (transformers config class, model class, config kwargs)
MODELS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {**_TEXT, "tie_word_embeddings": False}),
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM", {**_TEXT, "tie_word_embeddings": True}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {**_TEXT, "tie_word_embeddings": False}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {**_TEXT, "tie_word_embeddings": False, "sliding_window": None}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {**_TEXT, "tie_word_embeddings": True}),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        {
            **_TEXT,
            "tie_word_embeddings": False,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "sliding_window": None,
        },
    ),
}

ENGINES = ("vllm", "llamacpp")


@dataclass(frozen=True)
class Case:
    """One adapter of the corpus: the base model it is trained on, peft's LoraConfig arguments, how it is saved.

    ``tweak`` names a post-processing step applied after the random initialisation (see ``_TWEAKS``);
    ``engines`` lists the engines it is run on; ``engine_args`` holds the engine settings the real run used
    (for example a vLLM ``max_lora_rank`` below the adapter's rank), the same that ``check_target`` is given.
    """

    name: str
    model: str
    lora: dict[str, Any]
    dtype: str = "float32"
    engines: tuple[str, ...] = ENGINES
    engine_args: dict[str, dict[str, Any]] = field(default_factory=dict)
    fixes: tuple[str, ...] = ()  # engines for which `fix --target` must produce an adapter that serves exactly
    pad_rank: int | None = None  # the fix also pads every module to this rank (`--pad-rank`)
    note: str = ""


QV = ["q_proj", "v_proj"]
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CASES: tuple[Case, ...] = (
    Case("plain_r8_qv", "llama", {"r": 8, "lora_alpha": 16, "target_modules": QV}),
    Case("all_linear_r16", "llama", {"r": 16, "lora_alpha": 32, "target_modules": ALL_LINEAR}),
    Case(
        "rank12",
        "llama",
        {"r": 12, "lora_alpha": 24, "target_modules": QV},
        fixes=ENGINES,
        pad_rank=16,
        note="a rank between vLLM's ranks; the fix pads it to 16 with zeros",
    ),
    Case("rank64", "llama", {"r": 64, "lora_alpha": 64, "target_modules": QV}),
    Case(
        "rank64_default_max",
        "llama",
        {"r": 64, "lora_alpha": 64, "target_modules": QV},
        engines=("vllm",),
        engine_args={"vllm": {"max_lora_rank": 16}},
        note="served with vLLM's default max_lora_rank",
    ),
    Case("rank128_all", "llama", {"r": 128, "lora_alpha": 128, "target_modules": ALL_LINEAR}),
    Case("rslora_r16", "llama", {"r": 16, "lora_alpha": 16, "use_rslora": True, "target_modules": QV}, fixes=ENGINES),
    Case(
        "alpha_pattern",
        "llama",
        {"r": 8, "lora_alpha": 16, "alpha_pattern": {"v_proj": 64}, "target_modules": QV},
        fixes=ENGINES,
    ),
    Case("rank_pattern", "llama", {"r": 8, "lora_alpha": 16, "rank_pattern": {"v_proj": 4}, "target_modules": QV}),
    Case(
        "rank_alpha_pattern",
        "llama",
        {
            "r": 8,
            "lora_alpha": 16,
            "rank_pattern": {"v_proj": 4, "o_proj": 16},
            "alpha_pattern": {"o_proj": 8},
            "target_modules": ["q_proj", "v_proj", "o_proj"],
        },
        fixes=ENGINES,
    ),
    Case(
        "rslora_rank_pattern",
        "llama",
        {"r": 16, "lora_alpha": 8, "use_rslora": True, "rank_pattern": {"q_proj": 4}, "target_modules": QV},
        fixes=ENGINES,
    ),
    Case(
        "deploy_targets_disjoint",
        "llama",
        {"r": 8, "lora_alpha": 16, "target_modules": QV},
        engines=("vllm",),
        engine_args={"vllm": {"lora_target_modules": ["o_proj"]}},
        note="served with --lora-target-modules o_proj",
    ),
    Case(
        "deploy_targets_partial",
        "llama",
        {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "o_proj", "down_proj"]},
        engines=("vllm",),
        engine_args={"vllm": {"lora_target_modules": ["o_proj", "k_proj"]}},
        note="served with --lora-target-modules o_proj k_proj: q_proj rides on qkv_proj, down_proj is dropped",
    ),
    Case("dora", "llama", {"r": 8, "lora_alpha": 16, "use_dora": True, "target_modules": QV}),
    Case("mts_lm_head", "llama", {"r": 8, "lora_alpha": 16, "target_modules": QV, "modules_to_save": ["lm_head"]}),
    Case("mts_norm", "llama", {"r": 8, "lora_alpha": 16, "target_modules": QV, "modules_to_save": ["norm"]}),
    Case("lora_bias", "llama", {"r": 8, "lora_alpha": 16, "lora_bias": True, "target_modules": QV}),
    Case("embed_tokens", "llama", {"r": 8, "lora_alpha": 16, "target_modules": ["embed_tokens", "q_proj"]}),
    Case("lm_head", "llama", {"r": 8, "lora_alpha": 16, "target_modules": ["lm_head", "q_proj"]}),
    Case("bf16", "llama", {"r": 8, "lora_alpha": 16, "target_modules": QV}, dtype="bfloat16"),
    Case("fp16", "llama", {"r": 8, "lora_alpha": 16, "target_modules": ALL_LINEAR}, dtype="float16"),
    Case("layers_to_transform", "llama", {"r": 8, "lora_alpha": 16, "target_modules": QV, "layers_to_transform": [1]}),
    Case("regex_targets", "llama", {"r": 8, "lora_alpha": 16, "target_modules": r".*\.(k_proj|down_proj)"}),
    Case("pissa", "llama", {"r": 8, "lora_alpha": 8, "target_modules": QV, "init_lora_weights": "pissa"}),
    Case(
        "trainable_tokens", "llama", {"r": 8, "lora_alpha": 16, "target_modules": QV, "trainable_token_indices": [3, 5]}
    ),
    Case("tied_plain", "llama_tied", {"r": 8, "lora_alpha": 16, "target_modules": ALL_LINEAR}),
    Case("tied_lm_head", "llama_tied", {"r": 8, "lora_alpha": 16, "target_modules": ["lm_head", "q_proj"]}),
    Case("tied_embed_tokens", "llama_tied", {"r": 8, "lora_alpha": 16, "target_modules": ["embed_tokens", "v_proj"]}),
    Case(
        "qwen2_plain", "qwen2", {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    ),
    Case("qwen2_bias_lora_only", "qwen2", {"r": 8, "lora_alpha": 16, "target_modules": QV, "bias": "lora_only"}),
    Case("qwen2_bias_all", "qwen2", {"r": 8, "lora_alpha": 16, "target_modules": ["o_proj"], "bias": "all"}),
    Case(
        "qwen2_rslora",
        "qwen2",
        {"r": 32, "lora_alpha": 8, "use_rslora": True, "target_modules": ALL_LINEAR},
        fixes=ENGINES,
    ),
    Case("mistral_plain", "mistral", {"r": 16, "lora_alpha": 16, "target_modules": ALL_LINEAR}),
    Case(
        "mistral_alpha_pattern",
        "mistral",
        {"r": 8, "lora_alpha": 8, "alpha_pattern": {"down_proj": 32, "q_proj": 2}, "target_modules": ALL_LINEAR},
        fixes=ENGINES,
    ),
    Case("gemma_plain", "gemma", {"r": 8, "lora_alpha": 16, "target_modules": ALL_LINEAR}),
    Case("gemma_rslora", "gemma", {"r": 4, "lora_alpha": 4, "use_rslora": True, "target_modules": QV}, fixes=ENGINES),
    Case("moe_attention", "mixtral", {"r": 8, "lora_alpha": 16, "target_modules": QV}),
    Case(
        "moe_target_parameters",
        "mixtral",
        {
            "r": 8,
            "lora_alpha": 16,
            "target_modules": [],
            "target_parameters": ["experts.gate_up_proj", "experts.down_proj"],
        },
    ),
    Case("moe_router", "mixtral", {"r": 8, "lora_alpha": 16, "target_modules": ["gate", "q_proj"]}),
)

CASE_BY_NAME = {c.name: c for c in CASES}


def load_recorded() -> dict[str, Any]:
    with open(RECORDED, encoding="utf-8") as f:
        data: dict[str, Any] = json.load(f)
    return data


# --- builders (torch, transformers and peft are imported here only) -----------------------------------------


def build_model(name: str, directory: str | None = None) -> Any:
    """The tiny base model ``name``, float32, weights from a fixed seed; saved to ``directory`` when given."""
    import torch
    import transformers

    config_cls, model_cls, kwargs = MODELS[name]
    config = getattr(transformers, config_cls)(**kwargs)
    torch.manual_seed(1234)
    model = getattr(transformers, model_cls)(config).eval()
    if directory is not None:
        model.save_pretrained(directory)
    return model


def build_adapter(case: Case, directory: str, model: Any = None) -> Any:
    """Create ``case``'s adapter with peft (random, non-zero weights from a fixed seed) and save it."""
    import copy
    import warnings

    import torch
    from peft import LoraConfig, get_peft_model

    base = copy.deepcopy(model) if model is not None else build_model(case.model)
    config = LoraConfig(**case.lora)
    with warnings.catch_warnings():  # peft's notices about the very features a case exercises (lora_bias, tied heads)
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(sum(map(ord, case.name)))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if not param.requires_grad:
                continue
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.3 * torch.rand(param.shape, generator=gen))
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * _std(name, param))
    with warnings.catch_warnings():  # peft's save-time notices (embedding layers saved, 1-D lora_B.bias "shards")
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(directory)
    _cast_saved(directory, getattr(torch, case.dtype), case.name)
    return peft_model


def _std(name: str, param: Any) -> float:
    if "lora_A" in name or "lora_embedding_A" in name:
        return 1.0 / float(param.shape[-1]) ** 0.5
    if "lora_B" in name or "lora_embedding_B" in name:
        return 0.08
    return 0.15  # modules_to_save copies, biases, trainable tokens: visibly different from the base


def _cast_saved(directory: str, dtype: Any, name: str) -> None:
    """Store the weights in ``dtype``, with the case's name in the metadata."""
    from safetensors.torch import load_file, save_file

    path = os.path.join(directory, "adapter_model.safetensors")
    tensors = {k: v.to(dtype).contiguous() for k, v in load_file(path).items()}
    save_file(tensors, path, metadata={"format": "pt", "safe_peft_case": name})


def reference_outputs(base_dir: str, adapter_dir: str | None) -> dict[str, Any]:
    """Greedy tokens and the log-probabilities of the chosen tokens, from plain transformers / peft.

    The adapter is loaded with plain ``PeftModel.from_pretrained`` (what training produced), so that every engine,
    and every converted adapter, is compared with the adapter as peft runs it.
    """
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    out: dict[str, Any] = {"tokens": [], "logprobs": [], "margins": []}
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = list(prompt)
            tokens, logprobs, margins = [], [], []
            for _ in range(NEW_TOKENS):
                logits = model(torch.tensor([ids])).logits[0, -1].double()
                lp = torch.log_softmax(logits, -1)
                top = torch.topk(lp, 2)
                token = int(top.indices[0])
                tokens.append(token)
                logprobs.append(float(top.values[0]))
                margins.append(float(top.values[0] - top.values[1]))
                ids.append(token)
            out["tokens"].append(tokens)
            out["logprobs"].append(logprobs)
            out["margins"].append(margins)
    return out
