"""Classify a key comparison into ranked causes. Pure: reasons from keys, shapes and config data.

Each detector looks at the :class:`Evidence` and returns what it found (the finding, how many keys it explains,
and which keys it accounts for, so that later detectors do not explain them again). Findings are built from the
catalog (:mod:`safe_peft._catalog`), which also ranks them. Adding a cause: a catalog entry and a detector
appended to :data:`DETECTORS` (or given to :func:`register_detector`).
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from safe_peft._catalog import finding, order, rank
from safe_peft._keys import Role, Shape, is_embedding_part, module_of, rank_axis, role_of, strip_prefix
from safe_peft._model.view import ModelView
from safe_peft._plan.compare import KeyDiff
from safe_peft._plan.remap import RemapPlan
from safe_peft._versions import TASK_CLASS
from safe_peft.report import Cause, Diagnosis

__all__ = ["DETECTORS", "Evidence", "Found", "classify", "register_detector"]

_FOREIGN = (  # most specific first: LyCORIS files use kohya-style module names too
    (re.compile(r"(^|[._])(hada_w\d_[ab]|lokr_w\d)"), "lycoris", "a LyCORIS (LoHa / LoKr) adapter"),
    (
        re.compile(r"(^|\.)lora_(unet|te\d?)_|\.lora_(down|up)\.weight$|\.alpha$"),
        "kohya",
        "a kohya-ss (sd-scripts) LoRA",
    ),
    (re.compile(r"\.processor\.|^(unet|transformer|text_encoder)\.[^.]+.*lora"), "diffusers", "a diffusers LoRA"),
)


@dataclass(frozen=True)
class Evidence:
    """What the classifier looks at."""

    diff: KeyDiff
    checkpoint: Mapping[str, Shape]
    view: ModelView
    config: Mapping[str, Any]
    plan: RemapPlan | None = None
    adapter: bool = True  # False for plain state dicts: "no adapter tensors" is then normal
    shapes_known: bool = True  # False for keys read from an error message: shapes are () there, not empty

    @property
    def base(self) -> Any:
        return self.config.get("base_model_name_or_path")


@dataclass(frozen=True)
class Found:
    """A detector's finding: ``weight`` keys it explains; ``explains`` the keys no later detector should explain."""

    diagnosis: Diagnosis
    weight: int
    explains: frozenset[str] = field(default_factory=frozenset)


Detector = Callable[[Evidence, frozenset[str]], list[Found]]


def classify(ev: Evidence) -> list[Diagnosis]:
    """All findings for ``ev``, most likely first. Empty when the checkpoint fits."""
    if ev.diff.ok and ev.view.error is None:
        return []  # corrupt and foreign checkpoints always show up in the key comparison
    found: list[Found] = []
    explained: frozenset[str] = frozenset()
    for detect in DETECTORS:
        new = detect(ev, explained)
        found += new
        for f in new:
            explained |= f.explains
    if not found and not ev.diff.ok:
        found.append(
            Found(finding("unexplained", "the checkpoint and the model disagree in a way no known cause explains"), 0)
        )
    ordered = sorted(enumerate(found), key=lambda t: (rank(t[1].diagnosis), -t[1].weight, t[0]))
    return order([f.diagnosis for _, f in ordered])


def register_detector(detector: Detector) -> Detector:
    """Add a detector (run after the built-in ones); returns it, so it can decorate."""
    DETECTORS.append(detector)
    return detector


# -- the data itself -------------------------------------------------------------------------------------------


def _corrupt(ev: Evidence, _: frozenset[str]) -> list[Found]:
    checkpoint = ev.checkpoint
    if ev.adapter and not checkpoint and ev.diff.missing:
        return [_empty(ev)]
    findings = []
    known = ev.shapes_known
    empty = [k for k, s in checkpoint.items() if known and role_of(k) in (Role.A, Role.B) and (len(s) < 2 or 0 in s)]
    if empty:
        findings.append(
            Found(
                finding(
                    "zero3_empty_tensors",
                    f"{len(empty)} LoRA tensors are empty or flat (e.g. {empty[0]!r} has shape "
                    f"{list(checkpoint[empty[0]])}): a DeepSpeed ZeRO-3 / FSDP save of sharded parameters",
                    details={"keys": empty[:20], "count": len(empty)},
                ),
                len(empty),
            )
        )
    by_module: dict[str, set[Role]] = defaultdict(set)
    for key in checkpoint:
        role = role_of(key)
        if role in (Role.A, Role.B):
            by_module[module_of(key)].add(role)
    unpaired = sorted(m for m, halves in by_module.items() if len(halves) != 2)
    if unpaired:
        findings.append(
            Found(
                finding(
                    "unpaired_lora",
                    f"{len(unpaired)} modules have lora_A without lora_B or the reverse (e.g. {unpaired[0]!r}): "
                    "the checkpoint is incomplete",
                    details={"modules": unpaired[:20], "count": len(unpaired)},
                ),
                len(unpaired),
            )
        )
    return findings


def _empty(ev: Evidence) -> Found:
    """No tensors at all: no rename or config repair can give the model what the file does not hold."""
    missing = [m.key for m in ev.diff.missing]
    return Found(
        finding(
            "empty_checkpoint",
            f"the adapter file holds no tensors at all, where the model expects {len(missing)} (e.g. {missing[0]!r}): "
            "it was saved without its weights (DeepSpeed ZeRO-3 without gathering the parameters, or a patched "
            "model.state_dict that filtered the adapter's tensors twice)",
            details={"expected": len(missing)},
        ),
        len(missing),
        frozenset(missing),
    )


def _own_method_keys(ev: Evidence) -> bool:
    """Whether the checkpoint holds tensors of the method its config names (peft's LoHa keys are LoHa's)."""
    from safe_peft._keys import is_method_key

    peft_type = ev.config.get("peft_type")
    return bool(peft_type) and any(is_method_key(k, str(peft_type)) for k in ev.checkpoint)


def _foreign(ev: Evidence, _: frozenset[str]) -> list[Found]:
    if not ev.adapter or any(key in ev.view.expected for key in ev.checkpoint) or _own_method_keys(ev):
        return []  # a PEFT method's own keys are never "foreign"
    checkpoint = ev.checkpoint
    for regex, code, what in _FOREIGN:
        hits = [k for k in checkpoint if regex.search(k)]
        if hits and not any(role_of(k) for k in checkpoint):
            return [
                Found(
                    finding(
                        code,
                        f"the weights are {what}, not a PEFT adapter (e.g. {hits[0]!r})",
                        details={"format": code, "keys": hits[:10]},
                        advice="load it with the tool that wrote it (diffusers' load_lora_weights for image models), "
                        "or convert it to PEFT's layout first.",
                    ),
                    len(hits),
                )
            ]
    plain = [k for k in checkpoint if _is_base_weight(k, ev.view)]
    if len(checkpoint) > 4 and len(plain) * 2 > len(checkpoint):
        sample = next(iter(checkpoint))
        return [
            Found(
                finding(
                    "merged_checkpoint",
                    f"the file holds no adapter tensors, only {len(checkpoint)} plain weights (e.g. {sample!r}): "
                    "a merged or full model checkpoint",
                    details={"format": "full_checkpoint"},
                ),
                len(checkpoint),
            )
        ]
    return []


def _is_base_weight(key: str, view: ModelView) -> bool:
    """``model.layers.0.mlp.up_proj.weight`` (optionally under peft's prefix): a parameter of a module the base has."""
    module, _, name = strip_prefix(key).rpartition(".")
    return name in {"weight", "bias"} and module in view.module_names


def _shard_saves(ev: Evidence, _: frozenset[str]) -> list[Found]:
    """One rank's shards saved as the whole adapter (FSDP / tensor parallel): the shapes are 1/N of the model's."""
    from safe_peft._files.rank_files import shard_findings

    return [Found(d, weight, frozenset(keys)) for weight, d, keys in shard_findings(ev.diff.size_mismatches)]


def _view_error(ev: Evidence, _: frozenset[str]) -> list[Found]:
    return [] if ev.view.error is None else [Found(ev.view.error, len(ev.checkpoint))]


# -- layout: the keys would fit after renames ------------------------------------------------------------------


def _layout(ev: Evidence, _: frozenset[str]) -> list[Found]:
    plan = ev.plan
    if plan is None or not (plan.renames or plan.dropped):
        return []
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
    task = str(ev.config.get("task_type") or "").upper()
    if plan.exact:
        message = f"the checkpoint's keys are laid out differently from the model's: {steps}{example}"
        fix = None
        if lead.name == "head_prefix_remove":
            message = (
                f"the adapter was trained on a model with a task head{f' (task_type={task})' if task else ''}, "
                "whose layers sit "
                f"under `{ev.view.base_model_prefix}.`; {ev.view.model_class} is the bare model (what AutoModel "
                f"returns), so no key matches{example}"
            )
            fix = (
                f"load the base model with {TASK_CLASS.get(task, 'the task class the adapter was trained with')}, "
                f"or pass remap='auto' to load it into this {ev.view.model_class} (applies {', '.join(names)})."
            )
        elif lead.name == "head_prefix_add":
            message = (
                f"the adapter was trained on the bare model (no task head), but {ev.view.model_class} nests its "
                f"layers under `{ev.view.base_model_prefix}.`, so no key matches{example}"
            )
        diagnosis = finding(
            lead.name,
            message,
            fix=fix,
            details={"rules": names, "renamed": len(plan.renames), "dropped": len(plan.dropped), "proven": True},
            rules=", ".join(names),
        )
        return [Found(diagnosis, len(plan.renames) + len(plan.dropped), frozenset(plan.renames) | set(plan.dropped))]
    if cause is not Cause.MODEL_CLASS_MISMATCH:
        return []
    left = [k for k in ev.checkpoint if plan.renames.get(k, k) not in ev.view.expected]
    vision = _vision_part(ev, plan, left, names)
    if vision:
        return [Found(vision, len(ev.checkpoint), frozenset(ev.checkpoint) | {m.key for m in ev.diff.missing})]
    if not left or any(role_of(k) for k in left) or len(left) * 4 > len(ev.checkpoint):
        return []  # only plain head weights may be left over: anything else is not a class mismatch
    heads = sorted({module_of(k) for k in left})
    return [Found(_missing_head(ev, heads, task, example, names), len(ev.checkpoint), frozenset(ev.checkpoint))]


def _vision_part(ev: Evidence, plan: RemapPlan, left: list[str], rules: list[str]) -> Diagnosis | None:
    """A vision-language adapter on its text model: the language model's keys all land by the VL-to-text rename,
    and what is left are the adapter's tensors of the parts a text-only model does not have (the vision tower,
    the projector). No rename can load them, and leaving them out would not be the trained adapter."""
    if "vl_to_text_nesting" not in rules or not left or any(module_of(k) in ev.view.module_names for k in left):
        return None
    landed = {plan.renames.get(k, k) for k in ev.checkpoint if k not in left}
    if not {k for k, e in ev.view.expected.items() if e.required} <= landed:
        return None
    parts = sorted({".".join(module_of(k).split(".")[:2]) for k in left})
    return finding(
        "vl_adapter_on_text_model",
        f"a vision-language adapter on the text-only {ev.view.model_class}: its language-model weights fit after "
        f"the VL-to-text rename, but {len(left)} tensors of {', '.join(parts)} have no module here",
        details={"parts": parts, "keys": left[:20], "count": len(left), "rules": rules},
        where=", ".join(parts),
    )


def _missing_head(ev: Evidence, heads: list[str], task: str, example: str, rules: list[str]) -> Diagnosis:
    wanted = TASK_CLASS.get(task, "the class the adapter was trained with")
    return finding(
        "missing_task_head",
        f"the adapter was trained on a model with a task head (task_type={task or None}; trained "
        f"module(s) {', '.join(heads[:5])}), but {ev.view.model_class} has no such module{example}",
        details={"task_type": task or None, "heads": heads, "rules": rules},
        wanted=wanted,
    )


# -- shapes ----------------------------------------------------------------------------------------------------


def _axis(key: str, dim: int) -> str:
    role = role_of(key)
    if rank_axis(role) == dim:
        return "rank"
    if role is Role.A:
        return "vocab" if is_embedding_part(key) else "in_features"
    if role is Role.B:
        return "out_features"
    if role in (Role.BIAS, Role.MAGNITUDE):
        return "out_features"
    return "rows" if dim == 0 else "columns"


def _shapes(ev: Evidence, explained: frozenset[str]) -> list[Found]:
    rank_keys, vocab_keys, other = [], [], []
    for mm in ev.diff.size_mismatches:
        if mm.key in explained:
            continue
        if len(mm.checkpoint_shape) != len(mm.model_shape):
            other.append((mm, "ndim"))
            continue
        axes = {
            _axis(mm.key, i)
            for i, (a, b) in enumerate(zip(mm.checkpoint_shape, mm.model_shape, strict=False))
            if a != b
        }
        want = ev.view.expected.get(mm.key)
        module = want.module if want is not None and want.module else module_of(mm.key)
        is_embedding = ev.view.layers.get(module) is not None and ev.view.layers[module].kind == "embedding"
        base_rows = want is not None and want.role is Role.BASE_EMBEDDING  # the saved base embedding weights
        vocab_rows = axes == {"rows"} and (base_rows or _is_vocab_module(ev, module, is_embedding))
        # a LoRA on the output embedding (lm_head): its out_features are the vocabulary
        vocab_rows |= axes == {"out_features"} and not is_embedding and _is_vocab_module(ev, module, is_embedding)
        if axes == {"rank"}:
            rank_keys.append(mm)
        elif axes == {"vocab"} or vocab_rows:
            vocab_keys.append(mm)
        else:
            other.append((mm, "/".join(sorted(axes))))
    findings = []
    if rank_keys:
        ranks = Counter(mm.checkpoint_shape[rank_axis(role_of(mm.key)) or 0] for mm in rank_keys)
        configured = ev.config.get("r")
        pattern = ev.config.get("rank_pattern") or {}
        stored = ", ".join(f"{r} ({n} tensors)" for r, n in sorted(ranks.items()))
        findings.append(
            Found(
                finding(
                    "rank_mismatch",
                    f"adapter_config.json says r={configured}"
                    + (f" with rank_pattern {pattern}" if pattern else "")
                    + f", but the weights were saved with rank {stored}",
                    details={"config_r": configured, "checkpoint_ranks": dict(ranks)},
                ),
                len(rank_keys),
            )
        )
    if vocab_keys:
        sizes = _vocab_sizes(vocab_keys)
        findings.append(
            Found(
                finding(
                    "resized_embeddings",
                    f"the checkpoint's vocabulary has {sizes[0]} rows, the model's {sizes[1]}: the adapter was "
                    f"trained after resize_token_embeddings({sizes[0]})",
                    details={"checkpoint_vocab": sizes[0], "model_vocab": sizes[1]},
                    vocab=sizes[0],
                ),
                len(vocab_keys),
            )
        )
    if other:
        first, axis_names = other[0]
        module = module_of(first.key)
        findings.append(
            Found(
                finding(
                    "dimension_mismatch",
                    f"{len(other)} tensors differ in a model dimension, not the rank: {module} has "
                    f"{axis_names} {_dims(first)}; the adapter was trained on a different base model "
                    "(other hidden or intermediate size)",
                    details={
                        "module": module,
                        "axes": axis_names,
                        "count": len(other),
                        "base_model_name_or_path": ev.base,
                    },
                    base=ev.base,
                ),
                len(other) * 2,
            )
        )
    return findings


def _is_vocab_module(ev: Evidence, module: str, is_embedding: bool) -> bool:
    if is_embedding:
        return True
    roles = {e.role for e in ev.view.expected.values() if e.module == module}
    return bool(roles & {Role.BASE_EMBEDDING}) or module.split(".")[-1] in {"lm_head", "embed_out", "output"}


def _vocab_sizes(keys: list[Any]) -> tuple[int, int]:
    mm = keys[0]
    dim = 1 if is_embedding_part(mm.key) and role_of(mm.key) is Role.A else 0
    return mm.checkpoint_shape[dim], mm.model_shape[dim]


def _dims(mm: Any) -> str:
    return f"{list(mm.model_shape)} in the model but {list(mm.checkpoint_shape)} in the checkpoint"


# -- keys the model does not take ------------------------------------------------------------------------------


# The key roles a config flag turns on: (role, the flag, the finding when the flag is off, what the keys are, and
# what plain peft then does with them)
_FLAGGED_ROLES = (
    (
        Role.MAGNITUDE,
        "use_dora",
        "dora_flag",
        "DoRA magnitude vectors",
        ": plain peft drops them and runs the adapter as plain LoRA",
    ),
    (Role.BIAS, "lora_bias", "lora_bias_flag", "lora_B biases", ""),
)


def _flag_off(ev: Evidence, keys: list[str]) -> tuple[list[Found], set[str]]:
    """The keys of a role a config flag turns on (DoRA magnitudes, lora_B biases), with a finding for each role whose
    flag the config leaves off: the findings, and every key of those roles (explained here, flag on or off)."""
    findings = []
    told: set[str] = set()
    for role, flag, code, what, effect in _FLAGGED_ROLES:
        held = [k for k in keys if role_of(k) is role]
        told.update(held)
        if held and not ev.config.get(flag):
            message = f"the checkpoint holds {len(held)} {what} but adapter_config.json has {flag}=false{effect}"
            findings.append(Found(finding(code, message, details={"count": len(held)}), len(held)))
    return findings, told


def _unexpected(ev: Evidence, explained: frozenset[str]) -> list[Found]:
    keys = [u.key for u in ev.diff.unexpected if u.key not in explained]
    if not keys:
        return []
    findings, told = _flag_off(ev, keys)
    rest = [k for k in keys if k not in told]
    beyond, untargeted, absent = _where(rest, ev)
    if beyond:
        have, want = beyond
        message = (
            f"the checkpoint has adapter weights for layers up to {want}, the model only has layers up to {have}: it "
            "was trained on a deeper model"
        )
        findings.append(_depth_differs(ev, "fewer_layers", message, want, have, len(rest)))
    elif untargeted:
        modules = sorted({module_of(k) for k in untargeted})
        findings.append(
            Found(
                finding(
                    "untargeted_modules",
                    f"the checkpoint has weights for {len(modules)} modules that adapter_config.json's target_modules "
                    f"does not name (e.g. {modules[0]}): plain peft silently drops them",
                    details={"modules": modules[:20]},
                ),
                len(untargeted),
            )
        )
    elif absent:
        modules = sorted({module_of(k) for k in absent})
        heads = _saved_heads(ev)
        if heads and set(modules) <= heads and not any(role_of(k) for k in absent):
            task = str(ev.config.get("task_type") or "").upper()
            findings.append(Found(_missing_head(ev, modules, task, "", []), len(absent), frozenset(absent)))
        else:
            findings.append(
                Found(
                    finding(
                        "unknown_modules",
                        f"{len(modules)} modules of the checkpoint do not exist in {ev.view.model_class} "
                        f"(e.g. {modules[0]})",
                        details={"modules": modules[:20]},
                        base=ev.base,
                    ),
                    len(absent),
                )
            )
    return findings


def _saved_heads(ev: Evidence) -> set[str]:
    """The modules the adapter saved whole as its task head: its modules_to_save, and the heads peft adds by
    itself for the config's task type."""
    from safe_peft._versions import TASK_HEADS

    saved = ev.config.get("modules_to_save") or []
    names = {str(m) for m in saved} if isinstance(saved, (list, tuple, set)) else set()
    names |= set(TASK_HEADS.get(str(ev.config.get("task_type") or "").upper(), ()))
    return {m for name in names for m in _matching_modules(ev, name)}


def _matching_modules(ev: Evidence, name: str) -> set[str]:
    """The checkpoint's modules a saved-module name covers: the module itself and every module inside it (a head
    with submodules: RoBERTa's ``classifier.dense`` / ``classifier.out_proj``)."""
    return {m for k in ev.checkpoint if _within(m := module_of(k), name)} | {name}


def _within(module: str, name: str) -> bool:
    dotted = f".{module}."
    return f".{name}." in dotted


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


# -- keys the checkpoint lacks ---------------------------------------------------------------------------------


def _missing(ev: Evidence, explained: frozenset[str]) -> list[Found]:
    missing = [m.key for m in ev.diff.missing]
    if not missing or explained:
        return []
    present = {module_of(k) for k in ev.checkpoint}
    roles = {ev.view.expected[k].role for k in missing if k in ev.view.expected}
    if roles == {Role.SAVED_MODULE}:
        modules = sorted({ev.view.expected[k].module for k in missing})
        return [
            Found(
                finding(
                    "missing_modules_to_save",
                    f"adapter_config.json lists modules_to_save {modules} but the checkpoint has no weights for "
                    "them (plain peft fails with a bare KeyError)",
                    details={"modules": modules},
                ),
                len(missing),
            )
        ]
    partial = [k for k in missing if ev.view.expected[k].module in present]
    if partial:
        return [
            Found(
                finding(
                    "incomplete_checkpoint",
                    f"{len(partial)} adapter tensors are missing for modules the checkpoint does have "
                    f"(e.g. {partial[0]!r})",
                    details={"count": len(partial)},
                ),
                len(partial),
            )
        ]
    deeper = _trailing_layers(ev, missing)
    if deeper is not None:
        have, want = deeper
        message = (
            f"the checkpoint has adapter weights for layers 0 to {have} only, but the model's targeted layers go up "
            f"to {want}: it was trained on a shallower model of the same width"
        )
        return [_depth_differs(ev, "more_layers", message, have, want, len(missing))]
    modules = sorted({ev.view.expected[k].module for k in missing})
    # the targets repair takes target_modules from the checkpoint's lora_A stems: it can help only when every stem
    # is a layer of this model (a stem that is not, peft's injection refuses)
    stems = {module_of(k) for k in ev.checkpoint if role_of(k) is Role.A}
    repairable = bool(stems) and stems <= ev.view.layers.keys()
    return [
        Found(
            finding(
                "targets_without_weights",
                f"adapter_config.json targets {len(modules)} modules the checkpoint has no weights for "
                f"(e.g. {modules[0]}): they would run with lora_B at its initial value",
                details={"modules": modules[:20]},
                repair=None if repairable else (),
                fix=None if repairable else "save the adapter again, with its weights for these modules.",
            ),
            len(missing),
        )
    ]


def _trailing_layers(ev: Evidence, missing: list[str]) -> tuple[int, int] | None:
    """(checkpoint's last layer, model's last layer) when every missing key sits in a layer past the
    checkpoint's last one, and the checkpoint covers layers 0 to its last: a shallower model's adapter."""
    lacking = _layers(ev.view.expected[k].module for k in missing if k in ev.view.expected)
    if not lacking or None in lacking or len(lacking) != len(missing):
        return None
    have = _layers(module_of(k) for k in ev.checkpoint if role_of(k) is not None or k in ev.view.expected)
    if not have:
        return None
    top = max(h for h in have if h is not None)
    layers = sorted({h for h in have if h is not None})
    if layers != list(range(top + 1)) or min(lacking) <= top:  # type: ignore[type-var,operator]
        return None
    return top, max(lacking)  # type: ignore[type-var,return-value]


def _layers(modules: Any) -> list[int | None]:
    found = []
    for name in modules:
        m = _LAYER_INDEX.search(f".{name}.")
        found.append(int(m.group(1)) if m else None)
    return found


DETECTORS: list[Detector] = [_corrupt, _foreign, _shard_saves, _view_error, _layout, _shapes, _unexpected, _missing]


def _depth_differs(ev: Evidence, code: str, message: str, checkpoint_max: int, model_max: int, count: int) -> Found:
    """The checkpoint's layers go deeper (``fewer_layers``) or less deep (``more_layers``) than the model's."""
    details = {"checkpoint_max_layer": checkpoint_max, "model_max_layer": model_max}
    return Found(finding(code, message, details=details, base=ev.base), count)
