"""Classify a key comparison into ranked causes. Pure: reasons from keys, shapes and config data.

Every finding is a :class:`Diagnosis` with a stable ``code``. Ranking puts unreadable or
foreign data first, then the finding that explains the most disagreeing keys.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from safe_peft._compare import KeyDiff
from safe_peft._model_view import PEFT_PREFIX, ModelView
from safe_peft.report import Cause, Diagnosis
from safe_peft.rules import RemapPlan

__all__ = ["Evidence", "classify", "lora_role", "module_of"]

Shape = tuple[int, ...]
_SUFFIXES = (
    (".lora_A.weight", "lora_A"),
    (".lora_B.weight", "lora_B"),
    (".lora_B.bias", "lora_bias"),
    (".lora_embedding_A", "lora_embedding_A"),
    (".lora_embedding_B", "lora_embedding_B"),
    (".lora_magnitude_vector", "magnitude"),
)
_FOREIGN = (  # most specific first: LyCORIS files use kohya-style module names too
    (re.compile(r"(^|[._])(hada_w\d_[ab]|lokr_w\d)"), "lycoris", "a LyCORIS (LoHa / LoKr) adapter"),
    (
        re.compile(r"(^|\.)lora_(unet|te\d?)_|\.lora_(down|up)\.weight$|\.alpha$"),
        "kohya",
        "a kohya-ss (sd-scripts) LoRA",
    ),
    (re.compile(r"\.processor\.|^(unet|transformer|text_encoder)\.[^.]+.*lora"), "diffusers", "a diffusers LoRA"),
)
_TASK_CLASS = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "FEATURE_EXTRACTION": "AutoModel",
}


def lora_role(key: str) -> str | None:
    """The LoRA tensor a key holds ("lora_A", "lora_B", ...), or None for other keys."""
    for suffix, role in _SUFFIXES:
        if key.endswith(suffix):
            return role
    return None


def module_of(key: str) -> str:
    """The module path a checkpoint key belongs to, without peft's prefix and the LoRA suffix."""
    path = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
    for suffix, _ in _SUFFIXES:
        if path.endswith(suffix):
            return path[: -len(suffix)]
    return path.rsplit(".", 1)[0] if "." in path else path


@dataclass(frozen=True)
class Evidence:
    """What the classifier looks at."""

    diff: KeyDiff
    checkpoint: Mapping[str, Shape]
    view: ModelView
    config: Mapping[str, Any]
    plan: RemapPlan | None = None
    adapter: bool = True  # False for plain state dicts: "no adapter tensors" is then normal


def classify(ev: Evidence) -> list[Diagnosis]:
    """All findings for ``ev``, most likely first. Empty when the checkpoint fits."""
    if ev.diff.ok and ev.view.error is None:
        return []  # corrupt and foreign checkpoints always show up in the key comparison
    ranked: list[tuple[int, int, Diagnosis]] = []  # (tier, -weight, finding)

    def add(tier: int, weight: int, diagnosis: Diagnosis) -> None:
        ranked.append((tier, -weight, diagnosis))

    for weight, d in _corrupt(ev.checkpoint):
        add(0, weight, d)
    if ev.adapter and not any(key in ev.view.expected for key in ev.checkpoint):
        for weight, d in _foreign(ev.checkpoint, ev.view):  # a PEFT method's own keys are never "foreign"
            add(0, weight, d)
    if ev.view.error is not None:
        add(1, len(ev.checkpoint), ev.view.error)
    explained: set[str] = set()
    from safe_peft._shards import shard_findings  # hook: one rank's shards saved as the whole adapter

    for weight, d, keys in shard_findings(ev.diff.size_mismatches):
        add(0, weight, d)
        explained |= keys
    if (ev.plan is not None and ev.plan.renames) or (ev.plan is not None and ev.plan.dropped):
        found = _layout(ev)
        if found is not None:
            weight, d, keys = found
            explained |= keys
            add(1, weight, d)
    if not ev.diff.ok:
        for weight, d in _shapes(ev, explained):
            add(2, weight, d)
        for weight, d in _unexpected(ev, explained):
            add(2, weight, d)
        for weight, d in _missing(ev, explained):
            add(3, weight, d)
    if not ranked and not ev.diff.ok:
        add(
            9,
            0,
            Diagnosis(
                Cause.UNKNOWN,
                "unexplained",
                "the checkpoint and the model disagree in a way no known cause explains",
                fix="compare base_model_name_or_path in adapter_config.json with the model you load.",
            ),
        )
    ranked.sort(key=lambda t: (t[0], t[1]))
    return [d for _, _, d in ranked]


def _corrupt(checkpoint: Mapping[str, Shape]) -> list[tuple[int, Diagnosis]]:
    findings = []
    empty = [k for k, s in checkpoint.items() if lora_role(k) in {"lora_A", "lora_B"} and (len(s) < 2 or 0 in s)]
    if empty:
        findings.append(
            (
                len(empty),
                Diagnosis(
                    Cause.CORRUPT_CHECKPOINT,
                    "zero3_empty_tensors",
                    f"{len(empty)} LoRA tensors are empty or flat (e.g. {empty[0]!r} has shape "
                    f"{list(checkpoint[empty[0]])}): a DeepSpeed ZeRO-3 / FSDP save of sharded parameters",
                    fix="save again with the parameters gathered (DeepSpeed: zero3 gathered 16-bit weights / "
                    "GatheredParameters; FSDP: FULL_STATE_DICT), or with accelerator.get_state_dict(model).",
                    details={"keys": empty[:20], "count": len(empty)},
                ),
            )
        )
    by_module: dict[str, set[str]] = defaultdict(set)
    for key in checkpoint:
        role = lora_role(key)
        if role in {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"}:
            by_module[module_of(key)].add(role[-1])
    unpaired = sorted(m for m, halves in by_module.items() if halves != {"A", "B"})
    if unpaired:
        findings.append(
            (
                len(unpaired),
                Diagnosis(
                    Cause.CORRUPT_CHECKPOINT,
                    "unpaired_lora",
                    f"{len(unpaired)} modules have lora_A without lora_B or the reverse (e.g. {unpaired[0]!r}): "
                    "the checkpoint is incomplete",
                    fix="save the adapter again; a partial file cannot be loaded correctly.",
                    details={"modules": unpaired[:20], "count": len(unpaired)},
                ),
            )
        )
    return findings


def _foreign(checkpoint: Mapping[str, Shape], view: ModelView) -> list[tuple[int, Diagnosis]]:
    for regex, code, what in _FOREIGN:
        hits = [k for k in checkpoint if regex.search(k)]
        if hits and not any(lora_role(k) for k in checkpoint):
            return [
                (
                    len(hits),
                    Diagnosis(
                        Cause.FOREIGN_FORMAT,
                        code,
                        f"the weights are {what}, not a PEFT adapter (e.g. {hits[0]!r})",
                        fix="load it with the tool that wrote it (diffusers' load_lora_weights for image models), "
                        "or convert it to PEFT's layout first.",
                        details={"format": code, "keys": hits[:10]},
                    ),
                )
            ]
    plain = [k for k in checkpoint if _is_base_weight(k, view)]
    if len(checkpoint) > 4 and len(plain) * 2 > len(checkpoint):
        sample = next(iter(checkpoint))
        return [
            (
                len(checkpoint),
                Diagnosis(
                    Cause.FOREIGN_FORMAT,
                    "merged_checkpoint",
                    f"the file holds no adapter tensors, only {len(checkpoint)} plain weights (e.g. {sample!r}): "
                    "a merged or full model checkpoint",
                    fix="load it as a model with from_pretrained(); it needs no adapter loading.",
                    details={"format": "full_checkpoint"},
                ),
            )
        ]
    return []


def _is_base_weight(key: str, view: ModelView) -> bool:
    """``model.layers.0.mlp.up_proj.weight`` (optionally under peft's prefix): a parameter of a module the base has."""
    path = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
    module, _, name = path.rpartition(".")
    return name in {"weight", "bias"} and module in view.module_names


def _layout(ev: Evidence) -> tuple[int, Diagnosis, set[str]] | None:
    plan = ev.plan
    assert plan is not None
    names = [r.name for r in plan.rules]
    causes = [r.cause for r in plan.rules]
    cause = (
        Cause.MODEL_CLASS_MISMATCH
        if Cause.MODEL_CLASS_MISMATCH in causes
        else Cause.VERSION_SKEW
        if Cause.VERSION_SKEW in causes
        else Cause.KEY_FORMAT
    )
    lead = next((r for r in plan.rules if r.cause == cause), plan.rules[0])
    steps = "; ".join(r.description for r in plan.rules)
    sample = next(iter(plan.renames.items()), None)
    example = f" (e.g. {sample[0]!r} -> {sample[1]!r})" if sample else ""
    if plan.exact:
        message = f"the checkpoint's keys are laid out differently from the model's: {steps}{example}"
        fix = f"pass remap='auto' (applies {', '.join(names)}); every key then matches exactly."
        task = str(ev.config.get("task_type") or "").upper()
        if lead.name == "head_prefix_remove":
            message = (
                f"the adapter was trained on a model with a task head{f' (task_type={task})' if task else ''}, "
                "whose layers sit "
                f"under `{ev.view.base_model_prefix}.`; {ev.view.model_class} is the bare model (what AutoModel "
                f"returns), so no key matches{example}"
            )
            fix = (
                f"load the base model with {_TASK_CLASS.get(task, 'the task class the adapter was trained with')}, "
                f"or pass remap='auto' to load it into this {ev.view.model_class} (applies {', '.join(names)})."
            )
        elif lead.name == "head_prefix_add":
            message = (
                f"the adapter was trained on the bare model (no task head), but {ev.view.model_class} nests its "
                f"layers under `{ev.view.base_model_prefix}.`, so no key matches{example}"
            )
        diagnosis = Diagnosis(
            cause,
            lead.name,
            message,
            fix=fix,
            remap="auto",
            details={"rules": names, "renamed": len(plan.renames), "dropped": len(plan.dropped)},
        )
        return len(plan.renames) + len(plan.dropped), diagnosis, set(plan.renames) | set(plan.dropped)
    if cause is not Cause.MODEL_CLASS_MISMATCH:
        return None
    left = [k for k in ev.checkpoint if plan.renames.get(k, k) not in ev.view.expected]
    if not left or any(lora_role(k) for k in left) or len(left) * 4 > len(ev.checkpoint):
        return None  # only plain head weights may be left over: anything else is not a class mismatch
    heads = sorted({module_of(k) for k in left})
    task = str(ev.config.get("task_type") or "").upper()
    wanted = _TASK_CLASS.get(task, "the class the adapter was trained with")
    diagnosis = Diagnosis(
        Cause.MODEL_CLASS_MISMATCH,
        "missing_task_head",
        f"the adapter was trained on a model with a task head (task_type={task or None}; trained "
        f"module(s) {', '.join(heads[:5])}), but {ev.view.model_class} has no such module{example}",
        fix=f"load the base model with {wanted}.from_pretrained(...) and pass that model.",
        details={"task_type": task or None, "heads": heads, "rules": names},
    )
    return len(ev.checkpoint), diagnosis, set(ev.checkpoint)


def _axis(key: str, dim: int) -> str:
    role = lora_role(key)
    if role in {"lora_A", "lora_embedding_A"}:
        return "rank" if dim == 0 else ("vocab" if role == "lora_embedding_A" else "in_features")
    if role in {"lora_B", "lora_embedding_B"}:
        return "rank" if dim == 1 else "out_features"
    if role in {"lora_bias", "magnitude"}:
        return "out_features"
    return "rows" if dim == 0 else "columns"


def _shapes(ev: Evidence, explained: set[str] | None = None) -> list[tuple[int, Diagnosis]]:
    rank_keys, vocab_keys, other = [], [], []
    for mm in ev.diff.size_mismatches:
        if explained and mm.key in explained:
            continue
        if len(mm.checkpoint_shape) != len(mm.model_shape):
            other.append((mm, "ndim"))
            continue
        axes = {
            _axis(mm.key, i)
            for i, (a, b) in enumerate(zip(mm.checkpoint_shape, mm.model_shape, strict=False))
            if a != b
        }
        module = module_of(mm.key)
        is_embedding = ev.view.layers.get(module) is not None and ev.view.layers[module].kind == "embedding"
        vocab_rows = axes == {"rows"} and _is_vocab_module(ev, module, is_embedding)
        if axes == {"rank"}:
            rank_keys.append(mm)
        elif axes == {"vocab"} or vocab_rows:
            vocab_keys.append(mm)
        else:
            other.append((mm, "/".join(sorted(axes))))
    findings = []
    if rank_keys:
        ranks = Counter(
            mm.checkpoint_shape[0] if lora_role(mm.key) in {"lora_A", "lora_embedding_A"} else mm.checkpoint_shape[1]
            for mm in rank_keys
        )
        configured = ev.config.get("r")
        pattern = ev.config.get("rank_pattern") or {}
        stored = ", ".join(f"{r} ({n} tensors)" for r, n in sorted(ranks.items()))
        findings.append(
            (
                len(rank_keys),
                Diagnosis(
                    Cause.CONFIG_MISMATCH,
                    "rank_mismatch",
                    f"adapter_config.json says r={configured}"
                    + (f" with rank_pattern {pattern}" if pattern else "")
                    + f", but the weights were saved with rank {stored}",
                    fix="pass repair=('rank',) to rebuild r / rank_pattern from the weights' shapes "
                    "(lora_alpha is kept), or restore the adapter_config.json that was saved with these weights.",
                    repair=("rank",),
                    details={"config_r": configured, "checkpoint_ranks": dict(ranks)},
                ),
            )
        )
    if vocab_keys:
        sizes = _vocab_sizes(vocab_keys)
        findings.append(
            (
                len(vocab_keys),
                Diagnosis(
                    Cause.VOCAB_SIZE_MISMATCH,
                    "resized_embeddings",
                    f"the checkpoint's vocabulary has {sizes[0]} rows, the model's {sizes[1]}: the adapter was "
                    f"trained after resize_token_embeddings({sizes[0]})",
                    fix=f"call model.resize_token_embeddings({sizes[0]}) before loading (with the tokenizer the "
                    "adapter was trained with), or pass repair=('vocab',) to do it as part of the load.",
                    repair=("vocab",),
                    details={"checkpoint_vocab": sizes[0], "model_vocab": sizes[1]},
                ),
            )
        )
    if other:
        first, axis_names = other[0]
        module = module_of(first.key)
        findings.append(
            (
                len(other) * 2,
                Diagnosis(
                    Cause.WRONG_BASE_MODEL,
                    "dimension_mismatch",
                    f"{len(other)} tensors differ in a model dimension, not the rank: {module} has "
                    f"{axis_names} {_dims(first, axis_names)}; the adapter was trained on a different base model "
                    "(other hidden or intermediate size)",
                    fix="load the adapter into the base model it was trained on (base_model_name_or_path="
                    f"{ev.config.get('base_model_name_or_path')!r} in adapter_config.json); no rename or "
                    "repair can make these weights fit.",
                    details={
                        "module": module,
                        "axes": axis_names,
                        "count": len(other),
                        "base_model_name_or_path": ev.config.get("base_model_name_or_path"),
                    },
                ),
            )
        )
    return findings


def _is_vocab_module(ev: Evidence, module: str, is_embedding: bool) -> bool:
    if is_embedding:
        return True
    roles = {e.role for e in ev.view.expected.values() if e.module == module}
    return bool(roles & {"embedding_base"}) or module.split(".")[-1] in {"lm_head", "embed_out", "output"}


def _vocab_sizes(keys: list[Any]) -> tuple[int, int]:
    mm = keys[0]
    dim = 1 if lora_role(mm.key) == "lora_embedding_A" else 0
    return mm.checkpoint_shape[dim], mm.model_shape[dim]


def _dims(mm: Any, axes: str) -> str:
    return f"{list(mm.model_shape)} in the model but {list(mm.checkpoint_shape)} in the checkpoint"


def _unexpected(ev: Evidence, explained: set[str]) -> list[tuple[int, Diagnosis]]:
    keys = [u.key for u in ev.diff.unexpected if u.key not in explained]
    if not keys:
        return []
    findings = []
    magnitude = [k for k in keys if lora_role(k) == "magnitude"]
    if magnitude and not ev.config.get("use_dora"):
        findings.append(
            (
                len(magnitude),
                Diagnosis(
                    Cause.CONFIG_MISMATCH,
                    "dora_flag",
                    f"the checkpoint holds {len(magnitude)} DoRA magnitude vectors but adapter_config.json has "
                    "use_dora=false: plain peft drops them and runs the adapter as plain LoRA",
                    fix="pass repair=('dora',) to set use_dora=true, or set it in adapter_config.json.",
                    repair=("dora",),
                    details={"count": len(magnitude)},
                ),
            )
        )
    biases = [k for k in keys if lora_role(k) == "lora_bias"]
    if biases and not ev.config.get("lora_bias"):
        findings.append(
            (
                len(biases),
                Diagnosis(
                    Cause.CONFIG_MISMATCH,
                    "lora_bias_flag",
                    f"the checkpoint holds {len(biases)} lora_B biases but adapter_config.json has lora_bias=false",
                    fix="set lora_bias=true in adapter_config.json.",
                    details={"count": len(biases)},
                ),
            )
        )
    rest = [k for k in keys if k not in magnitude and k not in biases]
    beyond, untargeted, absent = _where(rest, ev)
    if beyond:
        have, want = beyond
        findings.append(
            (
                len(rest),
                Diagnosis(
                    Cause.WRONG_BASE_MODEL,
                    "fewer_layers",
                    f"the checkpoint has adapter weights for layers up to {want}, the model only has layers up to "
                    f"{have}: it was trained on a deeper model",
                    fix="load the adapter into the base model it was trained on (base_model_name_or_path="
                    f"{ev.config.get('base_model_name_or_path')!r}).",
                    details={"checkpoint_max_layer": want, "model_max_layer": have},
                ),
            )
        )
    elif untargeted:
        modules = sorted({module_of(k) for k in untargeted})
        findings.append(
            (
                len(untargeted),
                Diagnosis(
                    Cause.CONFIG_MISMATCH,
                    "untargeted_modules",
                    f"the checkpoint has weights for {len(modules)} modules that adapter_config.json's target_modules "
                    f"does not name (e.g. {modules[0]}): plain peft silently drops them",
                    fix="add them to target_modules in adapter_config.json (or pass repair=('targets',)).",
                    repair=("targets",),
                    details={"modules": modules[:20]},
                ),
            )
        )
    elif absent:
        modules = sorted({module_of(k) for k in absent})
        findings.append(
            (
                len(absent),
                Diagnosis(
                    Cause.WRONG_BASE_MODEL,
                    "unknown_modules",
                    f"{len(modules)} modules of the checkpoint do not exist in {ev.view.model_class} "
                    f"(e.g. {modules[0]})",
                    fix="check that the base model is the one the adapter was trained on (base_model_name_or_path="
                    f"{ev.config.get('base_model_name_or_path')!r}).",
                    details={"modules": modules[:20]},
                ),
            )
        )
    return findings


_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def _where(keys: list[str], ev: Evidence) -> tuple[tuple[int, int] | None, list[str], list[str]]:
    """Split unexpected keys: beyond the model's last layer / in an existing but untargeted layer / absent."""
    untargeted = [k for k in keys if module_of(k) in ev.view.layers]
    absent = [k for k in keys if module_of(k) not in ev.view.layers]
    model_max = _max_layer(ev.view.module_names)
    ckpt_max = _max_layer(module_of(k) for k in absent)
    if absent and model_max is not None and ckpt_max is not None and ckpt_max > model_max:
        return (model_max, ckpt_max), untargeted, absent
    return None, untargeted, absent


def _max_layer(names: Any) -> int | None:
    best = None
    for name in names:
        m = _LAYER_INDEX.search(f".{name}.")
        if m:
            best = max(best or 0, int(m.group(1)))
    return best


def _missing(ev: Evidence, explained: set[str]) -> list[tuple[int, Diagnosis]]:
    missing = [m.key for m in ev.diff.missing]
    if not missing or explained:
        return []
    present = {module_of(k) for k in ev.checkpoint}
    roles = {ev.view.expected[k].role for k in missing if k in ev.view.expected}
    if roles == {"modules_to_save"}:
        modules = sorted({ev.view.expected[k].module for k in missing})
        return [
            (
                len(missing),
                Diagnosis(
                    Cause.CONFIG_MISMATCH,
                    "missing_modules_to_save",
                    f"adapter_config.json lists modules_to_save {modules} but the checkpoint has no weights for "
                    "them (plain peft fails with a bare KeyError)",
                    fix="remove them from modules_to_save if they were never trained, or save the adapter again.",
                    details={"modules": modules},
                ),
            )
        ]
    partial = [k for k in missing if ev.view.expected[k].module in present]
    if partial:
        return [
            (
                len(partial),
                Diagnosis(
                    Cause.CORRUPT_CHECKPOINT,
                    "incomplete_checkpoint",
                    f"{len(partial)} adapter tensors are missing for modules the checkpoint does have "
                    f"(e.g. {partial[0]!r})",
                    fix="save the adapter again; the file is incomplete.",
                    details={"count": len(partial)},
                ),
            )
        ]
    modules = sorted({ev.view.expected[k].module for k in missing})
    return [
        (
            len(missing),
            Diagnosis(
                Cause.CONFIG_MISMATCH,
                "targets_without_weights",
                f"adapter_config.json targets {len(modules)} modules the checkpoint has no weights for "
                f"(e.g. {modules[0]}): they would run with lora_B at its initial value",
                fix="make target_modules match the weights (repair=('targets',)), or save the adapter again.",
                repair=("targets",),
                details={"modules": modules[:20]},
            ),
        )
    ]
