"""A fixed sample of the breadth sweep (tests/support/sweep.py; every case: `make sweep`, results in docs/sweep.md):
whatever plain peft loads exactly, safe_peft loads exactly and quietly."""

from __future__ import annotations

import pytest

from tests.support import methods, sweep

# (mapping, model_type, targets): one or two architectures per auto mapping, both target choices
LORA_SAMPLE = [
    ("causal_lm", "llama", "default"),
    ("causal_lm", "gpt2", "all-linear"),
    ("causal_lm", "qwen2", "all-linear"),
    ("causal_lm", "gemma", "default"),
    ("causal_lm", "phi", "all-linear"),
    ("causal_lm", "gpt_neox", "default"),
    ("seq2seq_lm", "t5", "default"),
    ("seq2seq_lm", "bart", "all-linear"),
    ("seq_cls", "bert", "default"),
    ("seq_cls", "roberta", "all-linear"),
    ("token_cls", "bert", "default"),
    ("qa", "bert", "all-linear"),
    ("image_cls", "vit", "all-linear"),
    ("image_cls", "swiftformer", "all-linear"),
    ("speech_seq2seq", "whisper", "all-linear"),
    ("bare", "llama", "default"),
]
METHOD_SAMPLE = [
    ("llama", "IA3"),
    ("llama", "LOHA"),
    ("bert", "VERA"),
    ("llama", "PREFIX_TUNING"),
    ("t5", "PROMPT_TUNING"),
    ("llama", "SHIRA"),
    ("qwen2", "CARTRIDGE"),
    ("gpt2", "LORA+trainable_tokens"),
    ("llama", "LORA+dora"),
    ("llama", "ADALORA"),
    ("t5", "ADAMSS"),  # subspace sizes depend on the weights' values: left open on a meta base, never a refusal
]


def _lora_case(mapping: str, model_type: str, targets: str) -> sweep.Case:
    from transformers.models.auto import modeling_auto

    names = getattr(modeling_auto, sweep.MAPPINGS[mapping][0])
    if model_type not in names:
        pytest.skip(f"the installed transformers has no {mapping} class for {model_type}")
    class_name = names[model_type]
    return sweep.Case(
        model_type, class_name[0] if isinstance(class_name, (tuple, list)) else class_name, mapping, "LORA", targets
    )


def _check(result: sweep.Result) -> None:
    if result.outcome == sweep.EXCLUDED:  # not ours: the installed transformers / peft cannot build the case
        pytest.skip(result.detail)
    assert result.outcome == sweep.EXACT, f"{result.outcome}: {result.detail}"


@pytest.mark.parametrize(("mapping", "model_type", "targets"), LORA_SAMPLE, ids=["/".join(c) for c in LORA_SAMPLE])
def test_lora_loads_exactly_and_quietly(mapping: str, model_type: str, targets: str) -> None:
    _check(sweep.run_case(_lora_case(mapping, model_type, targets)))


@pytest.mark.parametrize(("arch", "method"), METHOD_SAMPLE, ids=[f"{a}/{m}" for a, m in METHOD_SAMPLE])
def test_peft_method_loads_exactly_and_quietly(arch: str, method: str) -> None:
    class_name, mapping, *_ = methods.ARCHS[arch]
    case = sweep.Case(arch, class_name, mapping, method, "explicit")
    _check(sweep.run_case(case, methods.method_config, methods.train_hook(case)))


def test_every_peft_type_is_swept() -> None:
    from peft.utils import PeftType

    swept = {m.peft_type for m in methods.METHODS} | set(methods.NOT_SWEPT)
    assert {p.value for p in PeftType} <= swept | {"BONE"}, {p.value for p in PeftType} - swept
