"""The negative sweep: adapters from another width, depth, task class or architecture, and adapters with a broken
layout or config, on a dozen architectures. For each, the primary cause must be the right one, a refused load
must leave the base exactly as it was, and every fix any finding of the report names (a ``remap=`` / ``repair=``
argument) is executed and must give the trained adapter's outputs. A report may not name a fix this sweep has
not executed on that scenario.

Used by ``tests/test_negative.py`` (a fixed sample, in ``make test``) and
``python -m tests.support.run_sweep --negative``.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from tests.support.sweep import make_inputs, perturb, same
from tests.support.tiny import quiet, tiny_config

# architecture -> (causal-LM class, bare class, sequence-classification class or None, the config's depth and width
# attribute names)
ARCHS: dict[str, tuple[str, str, str | None]] = {
    "llama": ("LlamaForCausalLM", "LlamaModel", "LlamaForSequenceClassification"),
    "mistral": ("MistralForCausalLM", "MistralModel", "MistralForSequenceClassification"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Model", "Qwen2ForSequenceClassification"),
    "gemma": ("GemmaForCausalLM", "GemmaModel", "GemmaForSequenceClassification"),
    "phi": ("PhiForCausalLM", "PhiModel", "PhiForSequenceClassification"),
    "gpt2": ("GPT2LMHeadModel", "GPT2Model", "GPT2ForSequenceClassification"),
    "gpt_neox": ("GPTNeoXForCausalLM", "GPTNeoXModel", "GPTNeoXForSequenceClassification"),
    "opt": ("OPTForCausalLM", "OPTModel", "OPTForSequenceClassification"),
    "falcon": ("FalconForCausalLM", "FalconModel", "FalconForSequenceClassification"),
    "bloom": ("BloomForCausalLM", "BloomModel", "BloomForSequenceClassification"),
    "olmo2": ("Olmo2ForCausalLM", "Olmo2Model", None),
    "starcoder2": ("Starcoder2ForCausalLM", "Starcoder2Model", None),
}
_DEPTH = ("num_hidden_layers", "n_layer", "num_layers")
_WIDTH = ("hidden_size", "n_embd", "d_model")


@dataclass(frozen=True)
class Scenario:
    """Train with ``train`` (a model kind and config changes), load with ``load``; the expected primary finding."""

    name: str
    cause: str
    code: str
    train: tuple[str, dict[str, Any]] = ("causal", {})
    load: tuple[str, dict[str, Any]] = ("causal", {})
    lora: dict[str, Any] = field(default_factory=dict)
    edit: str = ""  # a change to the saved adapter: see _EDITS
    fixed_by: tuple[str, ...] = ()  # the opt-ins the report must offer (and that must then load exactly)


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("wider_base", "wrong_base_model", "dimension_mismatch", train=("causal", {"width": 2})),
    Scenario("deeper_base", "wrong_base_model", "fewer_layers", train=("causal", {"depth": 4})),
    # targets by name (peft's defaults for the architecture): with all-linear, peft saves full module paths, which
    # name only the trained layers, so a deeper model takes the adapter as it is
    Scenario(
        "shallower_base",
        "wrong_base_model",
        "more_layers",
        load=("causal", {"depth": 4}),
        lora={"target_modules": None},
    ),
    Scenario(
        "causal_into_bare",
        "model_class_mismatch",
        "head_prefix_remove",
        load=("bare", {}),
        lora={"task_type": "CAUSAL_LM"},
        fixed_by=("remap",),
    ),
    Scenario("bare_into_causal", "model_class_mismatch", "head_prefix_add", train=("bare", {}), fixed_by=("remap",)),
    Scenario(
        "seqcls_into_causal",
        "model_class_mismatch",
        "missing_task_head",
        train=("seqcls", {}),
        lora={"task_type": "SEQ_CLS"},
    ),
    Scenario("rank_edited", "config_mismatch", "rank_mismatch", edit="rank", fixed_by=("repair",)),
    Scenario("compiled_keys", "key_format", "strip_orig_mod", edit="orig_mod", fixed_by=("remap",)),
    Scenario("truncated", "corrupt_checkpoint", "truncated_file", edit="truncate"),
    Scenario(
        "dora_flag_lost", "config_mismatch", "dora_flag", lora={"use_dora": True}, edit="dora_off", fixed_by=("repair",)
    ),
)
# cross-architecture pairs: the adapter of the first, loaded into the second
CROSS: tuple[tuple[str, str], ...] = (("gpt2", "llama"), ("llama", "gpt_neox"), ("opt", "bloom"), ("qwen2", "phi"))


@dataclass
class Outcome:
    name: str
    ok: bool
    detail: str = ""
    fixes_run: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail, "fixes_run": self.fixes_run}


def _config(arch: str, depth: int = 1, width: int = 1) -> Any:
    config = tiny_config(arch)
    for name in _DEPTH:
        if isinstance(getattr(config, name, None), int):
            setattr(config, name, getattr(config, name) * depth)
    for name in _WIDTH:
        if isinstance(getattr(config, name, None), int):
            setattr(config, name, getattr(config, name) * width)
    if hasattr(config, "layer_types") and isinstance(config.layer_types, list):
        config.layer_types = [config.layer_types[0]] * next(getattr(config, n) for n in _DEPTH if hasattr(config, n))
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = 0
    return config


def build(arch: str, kind: str, depth: int = 1, width: int = 1, seed: int = 0) -> torch.nn.Module:
    import transformers

    causal, bare, seqcls = ARCHS[arch]
    cls = getattr(transformers, {"causal": causal, "bare": bare, "seqcls": seqcls or causal}[kind])
    torch.manual_seed(seed)
    with quiet():
        return cls(_config(arch, depth, width)).eval()


def _backbone(model: torch.nn.Module) -> list[torch.Tensor]:
    """Hidden states of the transformer body: comparable across the causal LM, the bare model and PeftModels."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    prefix = getattr(inner, "base_model_prefix", "")
    body = getattr(inner, prefix, inner) if prefix and hasattr(inner, prefix) else inner
    inputs = make_inputs(body)
    with torch.no_grad(), quiet():
        out = body(**inputs)
    return [out.last_hidden_state.detach().clone()]


def _edit(directory: str, how: str) -> None:
    from safetensors.torch import load_file, save_file

    weights = os.path.join(directory, "adapter_model.safetensors")
    config_path = os.path.join(directory, "adapter_config.json")
    if how == "truncate":
        with open(weights, "rb+") as f:
            f.truncate(os.path.getsize(weights) - 64)
        return
    with open(config_path) as f:
        config = json.load(f)
    if how == "rank":
        config["r"] = config["r"] // 2
    elif how == "dora_off":
        config["use_dora"] = False
    elif how == "orig_mod":
        state = load_file(weights)
        moved = {re.sub(r"^base_model\.model\.", "base_model.model._orig_mod.", k): v for k, v in state.items()}
        save_file(moved, weights)
    with open(config_path, "w") as f:
        json.dump(config, f)


def _fingerprint(model: torch.nn.Module) -> Any:
    return (
        [(n, type(m).__name__) for n, m in model.named_modules()],
        {n: p.detach().clone() for n, p in model.state_dict().items()},
        sorted(model.__dict__),
    )


def _unchanged(before: Any, model: torch.nn.Module) -> bool:
    types, state, attrs = _fingerprint(model)
    return (
        types == before[0]
        and attrs == before[2]
        and state.keys() == before[1].keys()
        and all(torch.equal(state[k], before[1][k]) for k in state)
    )


def run(arch: str, scenario: Scenario | None = None, other: str | None = None) -> Outcome:
    """One scenario on one architecture (or, with ``other``, ``arch``'s adapter loaded into ``other``)."""
    from peft import LoraConfig, get_peft_model

    from safe_peft import AdapterLoadError, diagnose, safe_load_adapter

    name = f"{arch}/{scenario.name}" if scenario else f"{arch}->{other}"
    train_kind, train_opts = scenario.train if scenario else ("causal", {})
    load_kind, load_opts = scenario.load if scenario else ("causal", {})
    load_arch = other or arch
    if "seqcls" in (train_kind, load_kind) and ARCHS[arch][2] is None:
        return Outcome(name, True, "skipped: no sequence-classification class")
    with tempfile.TemporaryDirectory() as directory, quiet():
        options: dict[str, Any] = {"r": 4, "target_modules": "all-linear", "init_lora_weights": False}
        options.update(scenario.lora if scenario else {})
        model = build(arch, train_kind, **train_opts)
        try:
            trained = get_peft_model(model, LoraConfig(**options))
        except ValueError:  # peft has no default targets for this architecture: its attention by name
            trained = get_peft_model(model, LoraConfig(**{**options, "target_modules": ["q_proj", "v_proj"]}))
        perturb(trained)
        trained.eval()
        expected = _backbone(trained)
        trained.save_pretrained(directory)
        if scenario is not None and scenario.edit:
            _edit(directory, scenario.edit)
        base = build(load_arch, load_kind, **load_opts)
        before = _fingerprint(base)
        report = diagnose(base, directory)
        primary = report.primary
        got = f"{primary.cause.value}/{primary.code}" if primary else "ok"
        want = f"{scenario.cause}/{scenario.code}" if scenario else ""
        if scenario is not None and got != want:
            return Outcome(name, False, f"primary {got}, expected {want}: {primary.message[:200] if primary else ''}")
        if scenario is None and (report.ok or primary is None or primary.cause.value not in ("wrong_base_model",)):
            return Outcome(name, False, f"cross-architecture adapter: primary {got}")
        try:
            safe_load_adapter(base, directory)
            return Outcome(name, False, "loaded, though diagnose refused it")
        except AdapterLoadError as exc:
            if [d.code for d in exc.report.causes][:1] != [primary.code if primary else None]:
                return Outcome(name, False, f"load and diagnose disagree: {exc.report.primary}")
        if not _unchanged(before, base):
            return Outcome(name, False, "the refused load changed the base model")
        offered = {d.fix_arguments() for d in report.causes if d.fix_arguments()}
        kinds = {k for k in ("remap", "repair") if any(a.startswith(k) or f", {k}" in a for a in offered)}
        if scenario is not None and kinds != set(scenario.fixed_by):
            return Outcome(name, False, f"the report offers {sorted(offered)}, expected fixes by {scenario.fixed_by}")
        run_fixes = []
        for diagnosis in report.causes:
            arguments: dict[str, Any] = {
                k: v for k, v in (("remap", diagnosis.remap), ("repair", diagnosis.repair)) if v
            }
            if not arguments:
                continue
            fixed = build(load_arch, load_kind, **load_opts)
            try:
                model = safe_load_adapter(fixed, directory, **arguments)
            except AdapterLoadError as exc:
                return Outcome(name, False, f"the named fix {diagnosis.fix_arguments()} fails: {exc.report.primary}")
            difference = same(_backbone(model), expected)
            if difference > 1e-5:
                return Outcome(name, False, f"the named fix {diagnosis.fix_arguments()} loads, off by {difference:.3g}")
            run_fixes.append(diagnosis.fix_arguments())
        return Outcome(name, True, got, run_fixes)


def cases() -> list[tuple[str, Scenario | None, str | None]]:
    out: list[tuple[str, Scenario | None, str | None]] = [(a, s, None) for a in ARCHS for s in SCENARIOS]
    out += [(a, None, b) for a, b in CROSS]
    return out


def run_all(progress: Callable[[Outcome], None] = lambda _o: None) -> list[Outcome]:
    """Every negative case, in order (``make sweep``)."""
    outcomes = []
    for arch, scenario, other in cases():
        name = f"{arch}/{scenario.name}" if scenario else f"{arch}->{other}"
        try:
            outcome = run(arch, scenario, other)
        except Exception as exc:  # a crash is a failed case, with its reason
            outcome = Outcome(name, False, f"raised {type(exc).__name__}: {str(exc)[:200]}")
        outcomes.append(outcome)
        progress(outcome)
    return outcomes
