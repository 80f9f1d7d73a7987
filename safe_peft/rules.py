"""Rename rules for checkpoint keys: the rule type, the built-in rules, the rules derived from a model, and the
``remap`` / ``repair`` argument types.

A rule is a compiled regex substitution, matched on full key paths, never on the last component alone. The planner
behind ``remap="auto"`` (which rules, in which combination, make the keys exact) is :mod:`safe_peft._plan.remap`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from safe_peft._catalog import CATALOG, layout_entry, register
from safe_peft._keys import adapter_parts_pattern
from safe_peft.report import Cause

__all__ = [
    "BUILTIN",
    "Remap",
    "RemapRule",
    "Repair",
    "RepairName",
    "model_rules",
    "rename_state_dict",
]

V = TypeVar("V")


@dataclass(frozen=True)
class RemapRule:
    """A regex rename of checkpoint keys: ``re.sub(pattern, replacement, key)`` on every key.

    Pass rules as ``remap=[...]``. A rule set is applied only when every key then lands exactly; otherwise nothing
    is renamed. ``BUILTIN`` lists the rules ``remap="auto"`` tries. ``apply(key)`` gives the renamed key.

    :param name: the rule's name; for a built-in rule, the code of its finding.
    :param pattern: the regex, matched anywhere in the full key.
    :param replacement: as in ``re.sub``.
    :param description: what the rule is for, in the report.
    :param cause: what the rule's success means when ``remap="auto"`` finds it (default ``key_format``).
    :param drop: remove matching keys instead of renaming them (quantization state that is not adapter data).

    ```python
    >>> rule = RemapRule("strip_compile", "_orig_mod[.]", "")
    >>> rule.apply("base_model.model._orig_mod.model.layers.0.self_attn.q_proj.lora_A.weight")
    'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'
    >>> model = safe_load_adapter(make_base(), compiled_adapter_dir, remap=[rule])

    ```
    """

    name: str
    pattern: str
    replacement: str
    description: str = ""
    cause: Cause = Cause.KEY_FORMAT
    drop: bool = False
    regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "regex", re.compile(self.pattern))

    def apply(self, key: str) -> str | None:
        """The renamed key, or None when the rule drops it."""
        if self.drop:
            return None if self.regex.search(key) else key
        return self.regex.sub(self.replacement, key)


Remap = None | Literal["auto"] | Sequence[RemapRule] | Mapping[str, str]
"""The ``remap=`` argument: ``None`` (never rename), ``"auto"`` (the built-in rules, only if every key then lands
exactly), your own :class:`RemapRule` sequence, or a ``{regex: replacement}`` mapping."""
RepairName = Literal["rank", "dora", "targets", "vocab", "config", "legacy"]
"""The names ``repair=`` accepts; each is an opt-in change to the config (``"vocab"``: to the base model)."""
Repair = Sequence[RepairName]
"""The ``repair=`` argument: a sequence of :data:`RepairName`."""

BUILTIN: tuple[RemapRule, ...] = (
    RemapRule("strip_orig_mod", r"(^|\.)_orig_mod\.", r"\1", "drop the `_orig_mod.` segment torch.compile adds"),
    RemapRule("strip_module", r"(^|\.)module\.", r"\1", "drop the `module.` segment DataParallel / DDP add"),
    RemapRule(
        "strip_fsdp",
        r"(^|\.)(_fsdp_wrapped_module|_checkpoint_wrapped_module)\.",
        r"\1",
        "drop FSDP and activation-checkpointing wrapper segments",
    ),
    RemapRule(
        "strip_pretrained_model", r"(^|\.)pretrained_model\.", r"\1", "drop trl's value-head `pretrained_model.`"
    ),
    RemapRule(
        "adapter_name_out",
        adapter_parts_pattern() + r"\.[A-Za-z0-9_\-]+(\.weight|\.bias)?$",
        r"\1\2",
        "remove an adapter name saved inside the keys (`lora_A.default.weight` -> `lora_A.weight`)",
    ),
    RemapRule(
        "old_peft_lora_name",
        r"\.(?!lora_)([^.]+?)_((?:embedding_)?[AB](?:\.weight|\.bias)?|magnitude_vector)(?:(?<=vector)\.weight)?$",
        r".\1.lora_\2",
        "peft <= 0.17 removed an adapter named `lora` with `replace('.lora', '')`, which also cut `.lora` out of "
        "every LoRA part (`q_proj.lora_A.lora.weight` -> `q_proj_A.weight`): put `.lora_` back",
    ),
    RemapRule(
        "old_peft_weight_name",
        r"\.(lora_[AB])$",
        r".\1.weight",
        "peft <= 0.17 removed an adapter named `weight` with `replace('.weight', '')`, which also cut the LoRA "
        "tensors' own `.weight` (`q_proj.lora_A.weight.weight` -> `q_proj.lora_A`): put it back",
    ),
    RemapRule(
        "old_peft_lora_A_name",
        r"^(?!.*\.lora_)(.+)\.weight$",
        r"\1.lora_A.weight",
        "peft <= 0.17 removed an adapter named `lora_A` with `replace('.lora_A', '')`, which also cut `.lora_A` out "
        "of every lora_A key (`q_proj.lora_A.lora_A.weight` -> `q_proj.weight`): put it back",
    ),
    RemapRule(
        "modules_to_save_name_out",
        r"\.modules_to_save\.[A-Za-z0-9_\-]+\.",
        ".",
        "remove `modules_to_save.<name>.` saved from a raw state_dict()",
    ),
    RemapRule(
        "drop_original_module", r"\.original_module\.", "", "drop copies of the frozen original module", drop=True
    ),
    RemapRule("add_peft_prefix", r"^(?!base_model\.)", "base_model.model.", "add the `base_model.model.` prefix"),
    RemapRule(
        "drop_double_peft_prefix",
        r"^base_model\.model\.base_model\.model\.",
        "base_model.model.",
        "remove a doubled `base_model.model.` prefix",
    ),
    RemapRule(
        "vlm_relocation",
        r"^base_model\.model\.language_model\.model\.",
        "base_model.model.model.language_model.",
        "transformers 4.52 moved `language_model.model.*` to `model.language_model.*`",
        cause=Cause.VERSION_SKEW,
    ),
    RemapRule(
        "vlm_lm_head",
        r"^base_model\.model\.language_model\.lm_head\.",
        "base_model.model.lm_head.",
        "transformers 4.52 moved `language_model.lm_head` to `lm_head`",
        cause=Cause.VERSION_SKEW,
    ),
    RemapRule(
        "text_to_vl_nesting",
        r"^base_model\.model\.model\.layers\.",
        "base_model.model.model.language_model.layers.",
        "a text-model adapter on a vision-language wrapper (`model.layers` -> `model.language_model.layers`)",
        cause=Cause.MODEL_CLASS_MISMATCH,
    ),
    RemapRule(
        "vl_to_text_nesting",
        r"^base_model\.model\.model\.language_model\.layers\.",
        "base_model.model.model.layers.",
        "a vision-language adapter on its text model (`model.language_model.layers` -> `model.layers`)",
        cause=Cause.MODEL_CLASS_MISMATCH,
    ),
    RemapRule(
        "quant_state_strip",
        r"\.(absmax|quant_map|nested_absmax|nested_quant_map|quant_state\.[^.]+|SCB|weight_format)$",
        "",
        "drop bitsandbytes quantization-state entries (never `lora_*` keys)",
        drop=True,
    ),
)


def _register_layout_codes() -> None:
    """Each built-in rule's name is a finding code (the keys need that rename): one catalog entry per rule."""
    for rule in (*BUILTIN, *model_rules("model")):
        if rule.name not in CATALOG:
            register(layout_entry(rule.name, rule.cause))


def model_rules(base_model_prefix: str) -> tuple[RemapRule, ...]:
    """Task-head shift rules derived from the model's own ``base_model_prefix`` (model, transformer, bert...)."""
    if not base_model_prefix or not re.fullmatch(r"[A-Za-z0-9_]+", base_model_prefix):
        return ()
    p = re.escape(base_model_prefix)
    return (
        RemapRule(
            "head_prefix_remove",
            rf"^base_model\.model\.{p}\.",
            "base_model.model.",
            f"an adapter trained with a task head (e.g. *ForCausalLM) on the bare model: drop `{base_model_prefix}.`",
            cause=Cause.MODEL_CLASS_MISMATCH,
        ),
        RemapRule(
            "head_prefix_add",
            rf"^base_model\.model\.(?!{p}\.)",
            f"base_model.model.{base_model_prefix}.",
            f"an adapter trained on the bare model loaded under a task head: add `{base_model_prefix}.`",
            cause=Cause.MODEL_CLASS_MISMATCH,
        ),
    )


_register_layout_codes()


def rename_state_dict(
    state_dict: Mapping[str, V], renames: Mapping[str, str], dropped: Iterable[str] = ()
) -> dict[str, V]:
    """A new dict with keys renamed and dropped. The values are the very same objects: no tensor is copied.

    :param state_dict: the tensors, by key; it is not modified.
    :param renames: old key to new key (a report's ``renames``); other keys are kept as they are.
    :param dropped: keys to leave out.
    :returns: the new dict.

    ```python
    >>> from safe_peft.rules import rename_state_dict
    >>> rename_state_dict({"a.weight": 1, "b.weight": 2}, {"a.weight": "x.weight"}, dropped=["b.weight"])
    {'x.weight': 1}

    ```
    """
    gone = set(dropped)
    return {renames.get(k, k): v for k, v in state_dict.items() if k not in gone}
