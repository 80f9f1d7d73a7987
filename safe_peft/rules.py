"""Rename rules for checkpoint keys, and the planner behind ``remap="auto"``.

A rule is a compiled regex substitution. The planner tries the built-in rules alone and in
small combinations and accepts a set only when, afterwards, every checkpoint key lands on a
distinct expected key of the same shape and no required expected key is left missing (the
exactness check). Matching is on full key paths, never on the last component alone.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from safe_peft._bounds import gc_paused
from safe_peft._catalog import CATALOG, layout_entry, register
from safe_peft._keys import Shape, adapter_parts_pattern
from safe_peft._model.view import ExpectedKey
from safe_peft._plan.compare import shape_fits
from safe_peft.report import Cause

__all__ = [
    "BUILTIN",
    "Remap",
    "RemapPlan",
    "RemapRule",
    "Repair",
    "RepairName",
    "apply_rules",
    "check_exact",
    "model_rules",
    "plan_given",
    "plan_remap",
    "rename_state_dict",
    "to_rules",
]

V = TypeVar("V")

ShapeCheck = Callable[[str, Shape, Shape], bool]  # (new key, checkpoint shape, model shape) -> equal enough


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


def to_rules(remap: object) -> tuple[RemapRule, ...]:
    """Normalise a user's ``remap`` argument (rules or a {regex: replacement} mapping)."""
    if isinstance(remap, Mapping):
        return tuple(RemapRule(f"user_{i}", str(p), str(r), "user rule") for i, (p, r) in enumerate(remap.items()))
    if isinstance(remap, Iterable) and not isinstance(remap, (str, bytes)):
        rules = tuple(remap)
        if all(isinstance(r, RemapRule) for r in rules):
            return rules
    raise TypeError("remap must be None, 'auto', a sequence of RemapRule or a {regex: replacement} mapping")


def apply_rules(keys: Iterable[str], rules: Sequence[RemapRule]) -> dict[str, str | None]:
    """old key -> new key (None: dropped), every rule applied to every key in order."""
    result: dict[str, str | None] = {}
    for key in keys:
        new: str | None = key
        for rule in rules:
            new = rule.apply(key if new is None else new)
            if new is None:
                break
        result[key] = new
    return result


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


@dataclass(frozen=True)
class RemapPlan:
    """The outcome of planning: the rules and renames that make the keys exact, or why not."""

    rules: tuple[RemapRule, ...]
    renames: dict[str, str]
    dropped: tuple[str, ...]
    exact: bool
    problems: tuple[str, ...] = ()
    remaining: int = 0


def check_exact(
    mapping: Mapping[str, str | None],
    checkpoint: Mapping[str, Shape],
    expected: Mapping[str, ExpectedKey],
    same_shape: ShapeCheck | None = None,
) -> tuple[str, ...]:
    """The reasons a renaming is not exact (empty when it is). ``same_shape(key, a, b)`` may relax shapes."""
    return _problems(mapping, checkpoint, expected, same_shape)[0]


def _problems(
    mapping: Mapping[str, str | None],
    checkpoint: Mapping[str, Shape],
    expected: Mapping[str, ExpectedKey],
    same_shape: ShapeCheck | None = None,
    shown: int | None = None,
) -> tuple[tuple[str, ...], int]:
    """The problems of a renaming (the first ``shown`` of them spelled out, all when None) and how many there are:
    planning a 300k-key header spells out only what the plan keeps."""
    problems: list[str] = []
    count = 0
    landed: dict[str, str] = {}
    room = len(mapping) + len(expected) if shown is None else shown  # (there are never more problems than that)
    for old, new in mapping.items():
        if new is None:
            continue
        if new in landed:
            count += 1
            if len(problems) < room:
                problems.append(f"{old!r} and {landed[new]!r} both become {new!r}")
            continue
        landed[new] = old
        want = expected.get(new)
        if want is None:
            count += 1
            if len(problems) < room:
                problems.append(f"{new!r} is not a key of the model")
            continue
        have = tuple(checkpoint[old])
        shape = want.shape
        if have == shape or shape_fits(have, shape) or (same_shape is not None and same_shape(new, have, shape)):
            continue
        count += 1
        if len(problems) < room:
            problems.append(f"{new!r} has shape {list(have)}, the model expects {list(shape)}")
    left = [key for key, want in expected.items() if want.required and key not in landed]
    count += len(left)
    problems.extend(f"{key!r} is still missing" for key in left[: max(room - len(problems), 0)])
    return tuple(problems), count


def plan_remap(
    checkpoint: Mapping[str, Shape],
    expected: Mapping[str, ExpectedKey],
    candidates: Sequence[RemapRule],
    *,
    max_rules: int = 3,
    same_shape: ShapeCheck | None = None,
) -> RemapPlan:
    """Find the smallest combination of ``candidates`` that makes the keys exact.

    Rules apply in their given order; a combination is tried only if each of its rules changes
    something after the ones before it (so a rule made applicable by another is found). Keys are
    grouped by template (numeric path segments collapsed), so each combination is
    tried on one representative per group; only a combination whose representatives all land
    on expected keys is expanded to every key and held to the full exactness check. Time is
    linear in the number of keys. When none is exact, the closest plan (fewest problems
    among those checked) is returned with ``exact=False``.
    """
    with gc_paused():
        return _plan_remap(checkpoint, expected, candidates, max_rules, same_shape)


# The combination search looks at this many key templates at most; on more (a header whose keys do not collapse
# into per-layer templates: hostile, or without numbered layers) it searches a sample holding the first templates,
# evenly spaced ones and, for each rule, a few of those it applies to. Every plan is still held to the full
# exactness check on every key, and the full checks of one search are bounded by _FULL_CHECK_KEYS in all.
_SEARCH_TEMPLATES = 2_048
_SHOWN = 20  # problems a plan spells out
_SAMPLE_PER_RULE = 16
_FULL_CHECK_KEYS = 4_000_000


def _plan_remap(
    checkpoint: Mapping[str, Shape],
    expected: Mapping[str, ExpectedKey],
    candidates: Sequence[RemapRule],
    max_rules: int,
    same_shape: ShapeCheck | None,
) -> RemapPlan:
    groups = _Templates(checkpoint)
    if len(groups.templates) > _SEARCH_TEMPLATES:  # a hostile-size header: first what counting alone settles
        drops = [rule.regex.search for rule in candidates if rule.drop]
        kept = sum(1 for key in checkpoint if not any(drop(key) for drop in drops))
        if kept > len(expected):  # renames are one to one: more keys than the model has can never all land
            why = (
                f"the checkpoint has {kept:,} keys no rule drops and the model expects {len(expected):,}: no "
                "renaming fits them"
            )
            return RemapPlan((), {}, (), False, (why,), kept - len(expected))
    search = groups.sample(_SEARCH_TEMPLATES, candidates)
    budget = _FULL_CHECK_KEYS
    closest: tuple[tuple[int, int], tuple[RemapRule, ...]] | None = None
    checked: tuple[dict[str, str | None], tuple[str, ...], int] | None = None  # the closest's full check, if it had one
    for size in range(1, min(max_rules, len(candidates)) + 1):
        for combo in itertools.combinations(candidates, size):
            mapped = search.map_templates(combo)
            if mapped is None:
                continue
            score = (search.misses(mapped, expected), 0)  # keys landing nowhere first, then other problems
            full_check = None
            if score[0] == 0:
                if budget < len(checkpoint):
                    score = (0, len(checkpoint) + 1)  # not checked in full any more: ranked after those that were
                else:
                    budget -= len(checkpoint)
                    full = mapped if search is groups else groups.map_templates(combo)
                    if full is None:
                        continue
                    mapping = groups.expand(full)
                    problems, count = _problems(mapping, checkpoint, expected, same_shape, _SHOWN)
                    if not count:
                        return _plan(combo, mapping, problems)
                    score = (0, count)
                    full_check = (mapping, problems, count)
            if closest is None or score < closest[0]:
                closest, checked = (score, combo), full_check
    if closest is None:
        return RemapPlan((), {}, (), False, ("no built-in rule changes any key",), 0)
    _, combo = closest
    if checked is not None:  # the same renaming and check as below, already done
        return _plan(combo, *checked)
    full = groups.map_templates(combo)
    mapping = groups.expand(full) if full is not None else apply_rules(checkpoint, combo)
    return _plan(combo, mapping, *_problems(mapping, checkpoint, expected, same_shape, _SHOWN))


_DIGITS = re.compile(r"(?<![^.])(\d+)(?![^.])")  # a whole numeric path segment: layers.{17}.mlp
_GONE: Any = object()  # a dropped key in the planner's caches


class _Templates:
    """Checkpoint keys grouped by their shape with numeric segments collapsed to ``0``."""

    def __init__(self, keys: Iterable[str]) -> None:
        self.members: dict[str, list[tuple[str, tuple[str, ...]]]] = {}
        split = _DIGITS.split  # one pass: [text, number, text, ..., text]
        for key in keys:
            parts = split(key)
            template = "0".join(parts[::2]) if len(parts) > 1 else key
            self.members.setdefault(template, []).append((key, tuple(parts[1::2])))
        self.templates = list(self.members)
        self._applied: dict[int, dict[Any, Any]] = {}  # id(rule) -> text -> result (_GONE: dropped), one search
        self._digits: dict[str, int] = {}
        self._lands: dict[tuple[str, str], bool] = {}

    def _count(self, text: str) -> int:
        if text not in self._digits:
            self._digits[text] = len(_DIGITS.findall(text))
        return self._digits[text]

    def sample(self, limit: int, rules: Sequence[RemapRule]) -> _Templates:
        """At most about ``limit`` templates (self when there are no more): the first ones, evenly spaced ones,
        and up to :data:`_SAMPLE_PER_RULE` of those each rule's pattern matches. Linear in the templates."""
        if len(self.templates) <= limit:
            return self
        step = max(len(self.templates) // (limit // 2), 1)
        chosen = dict.fromkeys(self.templates[: limit // 2])
        chosen.update(dict.fromkeys(self.templates[limit // 2 :: step]))
        for rule in rules:
            chosen.update(dict.fromkeys(itertools.islice(filter(rule.regex.search, self.templates), _SAMPLE_PER_RULE)))
        part = object.__new__(_Templates)
        part.members = {t: self.members[t] for t in chosen}
        part.templates = list(chosen)
        part._applied, part._digits, part._lands = self._applied, self._digits, self._lands
        return part

    def map_templates(self, rules: Sequence[RemapRule]) -> dict[str, str | None] | None:
        """Templates through ``rules`` in order; None when a rule changes nothing there (the combination is
        not minimal) or changes the numeric segments (only direct application is faithful then)."""
        current: list[Any] = self.templates
        for rule in rules:
            cache = self._applied.get(id(rule))
            if cache is None:
                cache = self._applied[id(rule)] = {_GONE: _GONE}
            for text in current:
                if text not in cache:  # (_GONE is an object: no key string equals it)
                    new = rule.apply(text)
                    cache[text] = _GONE if new is None else new
            after = list(map(cache.__getitem__, current))  # C speed: the same few strings recur in every combination
            if after == current:
                return None
            current = after
        mapped = {t: (None if new is _GONE else new) for t, new in zip(self.templates, current, strict=True)}
        count = self._count
        for template, new in mapped.items():
            if new is not None and new != template and count(new) != count(template):
                return None
        return mapped

    def misses(self, mapped: Mapping[str, str | None], expected: Mapping[str, ExpectedKey]) -> int:
        """How many keys (counted by group) whose representative lands on no expected key."""
        missed = 0
        lands = self._lands
        for template, new in mapped.items():
            if new is None:
                continue
            members = self.members[template]
            hit = lands.get((template, new))
            if hit is None:  # the first and the last key of the group stand for it (layers.{0...N})
                fill = _pattern(new).format
                hit = fill(*members[0][1]) in expected and fill(*members[-1][1]) in expected
                lands[(template, new)] = hit
            if not hit:
                missed += len(members)
        return missed

    def expand(self, mapped: Mapping[str, str | None]) -> dict[str, str | None]:
        result: dict[str, str | None] = {}
        for template, new in mapped.items():
            if new is None:
                result.update(dict.fromkeys((key for key, _ in self.members[template]), None))
                continue
            fill = _pattern(new).format
            for key, numbers in self.members[template]:
                result[key] = fill(*numbers)
        return result


def _pattern(template: str) -> str:
    """``a.0.b`` -> ``a.{}.b``, with literal braces escaped."""
    return _DIGITS.sub("{}", template.replace("{", "{{").replace("}", "}}"))


def plan_given(
    rules: Sequence[RemapRule],
    checkpoint: Mapping[str, Shape],
    expected: Mapping[str, ExpectedKey],
    same_shape: ShapeCheck | None = None,
) -> RemapPlan:
    """The caller's rules applied as given (every rule to every key, in order), held to the exactness check."""
    mapping = apply_rules(checkpoint, rules)
    return _plan(rules, mapping, *_problems(mapping, checkpoint, expected, same_shape, _SHOWN))


def _plan(
    rules: Sequence[RemapRule], mapping: Mapping[str, str | None], problems: Sequence[str], count: int | None = None
) -> RemapPlan:
    renames = {old: new for old, new in mapping.items() if new is not None and new != old}
    dropped = tuple(old for old, new in mapping.items() if new is None)
    total = len(problems) if count is None else count
    return RemapPlan(tuple(rules), renames, dropped, not total, tuple(problems[:_SHOWN]), total)
