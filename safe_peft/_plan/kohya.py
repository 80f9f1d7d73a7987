"""Foreign adapter layouts that map onto a transformers model by renames alone: kohya-ss LoRAs.

kohya names a module by its dotted path with ``_`` for ``.`` under a ``lora_te_`` / ``lora_unet_`` prefix, and
stores ``lora_down`` (= lora_A), ``lora_up`` (= lora_B) and a scalar ``alpha`` per module. The conversion
resolves each name against the model's own module paths (it refuses a name that is ambiguous or absent),
renames the tensors to peft's keys, drops the ``alpha`` scalars and writes their values into the config's
``alpha_pattern``. The result is then held to the same exactness check as any remap.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from safe_peft._keys import lora_key

__all__ = ["convert_kohya", "is_kohya"]

_KOHYA = re.compile(
    r"^(lora_(?:te\d?|unet|transformer)_)?(?P<module>[A-Za-z0-9_]+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)$"
)
_PREFIXES = ("lora_te1_", "lora_te2_", "lora_te_", "lora_unet_", "lora_transformer_")


def is_kohya(keys: Iterable[str]) -> bool:
    """Every key is a kohya LoRA key (``<name>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``)."""
    keys = list(keys)
    return bool(keys) and all(_KOHYA.match(k) for k in keys) and any(k.endswith(".lora_down.weight") for k in keys)


@dataclass(frozen=True)
class KohyaConversion:
    """Renames onto peft keys, the dropped alpha scalars, the LoraConfig fields, and what could not be resolved."""

    renames: dict[str, str]
    dropped: tuple[str, ...]
    config: dict[str, Any]
    unresolved: list[str] = field(default_factory=list)


def convert_kohya(
    shapes: Mapping[str, tuple[int, ...]], module_names: Iterable[str], read_scalar: Callable[[str], float]
) -> KohyaConversion:
    """Plan the conversion of a kohya checkpoint onto a model with ``module_names``."""
    by_flat: dict[str, list[str]] = {}
    for name in module_names:
        if name:
            by_flat.setdefault(name.replace(".", "_"), []).append(name)
    renames: dict[str, str] = {}
    dropped: list[str] = []
    unresolved: list[str] = []
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    flats = {k: _strip_prefix(k.rsplit(".", 2 if k.endswith(".weight") else 1)[0]) for k in shapes if _KOHYA.match(k)}
    wrapper = _gone_wrapper(set(flats.values()), by_flat)
    for key, shape in shapes.items():
        match = _KOHYA.match(key)
        if match is None:
            unresolved.append(key)
            continue
        flat = flats[key].removeprefix(wrapper)
        candidates = by_flat.get(flat, [])
        if len(candidates) != 1:
            unresolved.append(key)
            continue
        module = candidates[0]
        part = match.group("part")
        if part == "alpha":
            dropped.append(key)
            alphas[module] = read_scalar(key)
        elif part == "lora_down.weight":
            renames[key] = lora_key(module, "lora_A")
            ranks[module] = shape[0]
        else:
            renames[key] = lora_key(module, "lora_B")
    r = Counter(ranks.values()).most_common(1)[0][0] if ranks else 0
    for module, rank in ranks.items():
        alphas.setdefault(module, float(rank))  # kohya's default: no alpha means alpha = rank (scale 1)
    common_alpha = Counter(alphas.values()).most_common(1)[0][0] if alphas else float(r)
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": _number(common_alpha),
        "target_modules": sorted(ranks),
        "rank_pattern": {m: v for m, v in sorted(ranks.items()) if v != r},
        "alpha_pattern": {m: _number(a) for m, a in sorted(alphas.items()) if a != common_alpha},
        "lora_dropout": 0.0,
        "bias": "none",
    }
    return KohyaConversion(renames, tuple(dropped), config, unresolved)


def _gone_wrapper(flats: set[str], by_flat: Mapping[str, list[str]]) -> str:
    """A leading wrapper module every name has and the model no longer has, so that without it every name
    resolves to exactly one module: kohya's SD1 / SD2 names come from transformers 4's ``CLIPTextModel``, whose
    layers sat under ``text_model.`` (``lora_te_text_model_encoder_layers_0_...``); transformers 5's has no such
    wrapper. '' when the names resolve as they are, or no single wrapper makes all of them resolve."""
    if not flats or all(len(by_flat.get(f, [])) == 1 for f in flats):
        return ""
    first = min(flats)
    for cut in (i + 1 for i, c in enumerate(first) if c == "_"):
        wrapper = first[:cut]
        if all(f.startswith(wrapper) and len(by_flat.get(f[cut:], [])) == 1 for f in flats):
            return wrapper
    return ""


def _strip_prefix(name: str) -> str:
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name.removeprefix("lora_")


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value
