"""The PEFT-method half of the breadth sweep: every ``PeftType`` of the installed peft (and the LoRA features that
change what is saved) on a few architectures. Each entry builds the method's config for a model; methods that
need a training step to reach their saved shape (AdaLoRA's rank pruning) get a ``train`` hook."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tests.support.sweep import Case

# architecture -> (class, mapping, attention targets, MLP targets, embedding module)
ARCHS: dict[str, tuple[str, str, list[str], list[str], str]] = {
    "llama": ("LlamaForCausalLM", "causal_lm", ["q_proj", "v_proj"], ["down_proj"], "embed_tokens"),
    "qwen2": ("Qwen2ForCausalLM", "causal_lm", ["q_proj", "v_proj"], ["down_proj"], "embed_tokens"),
    "gpt2": ("GPT2LMHeadModel", "causal_lm", ["c_attn"], ["c_proj"], "wte"),
    "bert": ("BertForSequenceClassification", "seq_cls", ["query", "value"], ["output.dense"], "word_embeddings"),
    "t5": ("T5ForConditionalGeneration", "seq2seq_lm", ["q", "v"], ["wo"], "shared"),
}
TASK = {"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS", "seq2seq_lm": "SEQ_2_SEQ_LM"}


@dataclass(frozen=True)
class Method:
    name: str
    peft_type: str
    options: Callable[[str], dict[str, Any]]  # architecture -> config kwargs
    archs: tuple[str, ...] = ("llama", "gpt2", "bert", "t5")
    train: Callable[[Any], None] | None = None


def _targets(arch: str, **extra: Any) -> Callable[[str], dict[str, Any]]:
    def options(a: str) -> dict[str, Any]:
        return {"target_modules": ARCHS[a][2], **extra}

    return options


def _prompt(**extra: Any) -> Callable[[str], dict[str, Any]]:
    return lambda _a: {"num_virtual_tokens": 4, **extra}


def _adalora_prune(model: Any) -> None:
    """A few AdaLoRA steps with real gradients and ``update_and_allocate``: ranks get pruned per module."""
    from tests.support.sweep import make_inputs

    inputs = make_inputs(model)
    labels = torch.tensor([1]) if "SEQ_CLS" in str(model.peft_config["default"].task_type) else inputs.get("input_ids")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    model.train()
    for step in range(8):
        out = model(**inputs, labels=labels) if labels is not None else model(**inputs)
        loss = out.loss if getattr(out, "loss", None) is not None else out.logits.float().pow(2).mean()
        loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    model.eval()


def _ia3(a: str) -> dict[str, Any]:
    return {"target_modules": ARCHS[a][2] + ARCHS[a][3], "feedforward_modules": ARCHS[a][3]}


METHODS: tuple[Method, ...] = (
    Method("LORA", "LORA", _targets("", r=4)),
    Method("LORA+dora", "LORA", _targets("", r=4, use_dora=True)),
    Method("LORA+rslora", "LORA", _targets("", r=4, use_rslora=True)),
    Method(
        "LORA+patterns",
        "LORA",
        lambda a: {
            "target_modules": ARCHS[a][2],
            "r": 4,
            "rank_pattern": {ARCHS[a][2][0]: 6},
            "alpha_pattern": {ARCHS[a][2][0]: 3},
        },
    ),
    Method("LORA+bias_all", "LORA", _targets("", r=4, bias="all")),
    Method("LORA+bias_lora_only", "LORA", _targets("", r=4, bias="lora_only")),
    Method("LORA+lora_bias", "LORA", _targets("", r=4, lora_bias=True)),
    Method("LORA+embedding", "LORA", lambda a: {"target_modules": [*ARCHS[a][2], ARCHS[a][4]], "r": 4}),
    Method("LORA+trainable_tokens", "LORA", _targets("", r=4, trainable_token_indices=[1, 2, 3])),
    Method("LORA+layer_replication", "LORA", _targets("", r=4, layer_replication=[[0, 2], [1, 2]]), ("llama",)),
    Method("LORA+pissa", "LORA", _targets("", r=4, init_lora_weights="pissa"), ("llama", "bert")),
    Method("LORA+olora", "LORA", _targets("", r=4, init_lora_weights="olora"), ("llama", "bert")),
    Method(
        "ADALORA",
        "ADALORA",
        _targets("", init_r=6, target_r=3, total_step=10, tinit=1, tfinal=1, deltaT=1),
        ("llama", "bert"),
        _adalora_prune,
    ),
    Method("IA3", "IA3", _ia3),
    Method("LOHA", "LOHA", _targets("", r=4)),
    Method("LOKR", "LOKR", _targets("", r=4)),
    Method("VERA", "VERA", _targets("", r=4)),
    Method("PVERA", "PVERA", _targets("", r=4)),
    Method("FOURIERFT", "FOURIERFT", _targets("", n_frequency=16)),
    Method("WAVEFT", "WAVEFT", _targets("", n_frequency=16)),
    Method("HRA", "HRA", _targets("", r=4)),
    Method("BOFT", "BOFT", _targets("", boft_block_size=4)),
    Method("OFT", "OFT", _targets("", r=0, oft_block_size=8)),
    Method("C3A", "C3A", _targets("", block_size=16)),
    Method("VBLORA", "VBLORA", _targets("", r=4, vector_length=16, num_vectors=32)),
    Method("RANDLORA", "RANDLORA", _targets("", r=4)),
    Method("SHIRA", "SHIRA", _targets("", r=4)),
    Method("MISS", "MISS", _targets("", r=4)),
    Method("ROAD", "ROAD", _targets("")),
    Method("DELORA", "DELORA", _targets("", r=4)),
    Method("GRALORA", "GRALORA", _targets("", r=4)),
    Method("FROD", "FROD", _targets("")),
    Method("ADAMSS", "ADAMSS", _targets("", r=4)),
    Method("OSF", "OSF", _targets("")),
    Method("BEFT", "BEFT", _targets("")),
    Method("LILY", "LILY", _targets("", r=4)),
    Method("GLORA", "GLORA", _targets("", r=4)),
    Method("HIRA", "HIRA", _targets("", r=4)),
    Method("UNILORA", "UNILORA", _targets("", r=4)),
    Method("TINYLORA", "TINYLORA", _targets("", r=4)),
    Method("PSOFT", "PSOFT", _targets("", r=4)),
    Method("PEANUT", "PEANUT", _targets("", r=4)),
    Method("SHADOW", "SHADOW", _targets("", r=4)),
    Method("SUPERTUNING", "SUPERTUNING", _targets("", r=4)),
    Method("DEFT", "DEFT", _targets("", r=4)),
    Method("LN_TUNING", "LN_TUNING", lambda _a: {}),
    Method(
        "TRAINABLE_TOKENS", "TRAINABLE_TOKENS", lambda a: {"target_modules": [ARCHS[a][4]], "token_indices": [1, 2]}
    ),
    Method("POLY", "POLY", _targets("", r=4, n_tasks=2)),
    Method("PROMPT_TUNING", "PROMPT_TUNING", _prompt()),
    Method("MULTITASK_PROMPT_TUNING", "MULTITASK_PROMPT_TUNING", _prompt(num_tasks=2)),
    Method("P_TUNING", "P_TUNING", _prompt(encoder_hidden_size=32)),
    Method("PREFIX_TUNING", "PREFIX_TUNING", _prompt()),
    Method("CPT", "CPT", _prompt(cpt_token_ids=[1, 2, 3, 4], cpt_mask=[1, 1, 1, 1], cpt_tokens_type_mask=[1, 2, 2, 2])),
    Method("CARTRIDGE", "CARTRIDGE", _prompt(), ("llama", "qwen2", "gpt2")),
    Method("ADAPTION_PROMPT", "ADAPTION_PROMPT", lambda _a: {"adapter_layers": 1, "adapter_len": 4}, ("llama",)),
)
BY_NAME = {m.name: m for m in METHODS}
# peft types that cannot be swept here, with the reason (every other type must have an entry above)
NOT_SWEPT = {"XLORA": "X-LoRA mixes previously trained LoRA adapters: it needs those adapters, not a config"}


def method_cases() -> list[Case]:
    cases = []
    for method in METHODS:
        for arch in method.archs:
            class_name, mapping, _, _, _ = ARCHS[arch]
            cases.append(Case(arch, class_name, mapping, method.name, "explicit"))
    return cases


def method_config(model: torch.nn.Module, case: Case) -> Any:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    method = BY_NAME[case.method]
    configs: dict[Any, Any] = dict(PEFT_TYPE_TO_CONFIG_MAPPING)
    options = method.options(case.model_type)
    if method.peft_type == "LORA":
        options.setdefault("init_lora_weights", False)  # lora_B non-zero before the perturbation, as trained
    if case.model_type == "gpt2" and method.peft_type in ("LORA", "ADALORA", "IA3", "LOHA", "LOKR", "VERA"):
        options["fan_in_fan_out"] = True
    return configs[method.peft_type](task_type=TASK[case.mapping], **options)


def train_hook(case: Case) -> Callable[[Any], None] | None:
    return BY_NAME[case.method].train
