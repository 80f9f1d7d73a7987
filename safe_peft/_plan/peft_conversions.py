"""The key conversions peft itself applies to a checkpoint on load, mirrored so that the prediction follows peft.

These are not safe_peft's renames (those are opt-in, see :mod:`safe_peft.rules`): whatever the installed peft and
transformers do to keys when they load an adapter happens here too, and a plain load that works stays quiet.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from safe_peft._catalog import finding
from safe_peft._keys import PEFT_PREFIX, Role, Shape, without_adapter_name
from safe_peft._model.view import ExpectedKey, has_weight_conversions
from safe_peft.report import Diagnosis

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "conversion_breaks_keys",
    "named_keys_peft_accepts",
    "other_adapters_copies",
    "peft_conversions",
    "sizes_peft_ignores",
]


def peft_conversions(
    model: nn.Module, config: Any, checkpoint: dict[str, Shape], adapter_name: str, key_mapping: Any = None
) -> tuple[dict[str, Shape], list[Diagnosis]]:
    """Apply the key conversions peft itself applies on load, so the prediction follows peft.

    transformers 4.52-4.x: the model's ``_checkpoint_conversion_mapping`` (or the caller's ``key_mapping``),
    first matching pattern per key, under the ``base_model.model.`` prefix, as ``load_peft_weights`` does;
    transformers 5: peft's own conversion for architectures with a registered weight conversion.
    """
    converted = dict(checkpoint)
    mapping = key_mapping if key_mapping else getattr(model, "_checkpoint_conversion_mapping", None)
    if mapping and not getattr(config, "is_prompt_learning", False):
        converted = {_map_key(k, mapping): s for k, s in converted.items()}
    if has_weight_conversions(model):
        import torch
        from peft.utils.transformers_weight_conversion import convert_peft_adapter_state_dict_for_transformers

        fake = {k: torch.empty(s, device="meta") for k, s in converted.items()}
        try:
            result = convert_peft_adapter_state_dict_for_transformers(model, config, fake, adapter_name)
            converted = {k: tuple(v.shape) for k, v in result.items()}
        except Exception:  # noqa: BLE001 - the real load will raise with context if conversion fails
            pass
    changed = [k for k in checkpoint if k not in converted]
    if not changed:
        return converted, []
    new = next(k for k in converted if k not in checkpoint)
    return converted, [
        finding(
            "converted_layout",
            f"{len(changed)} keys were saved in an older transformers layout and are converted by peft on load "
            f"(e.g. {changed[0]!r} -> {new!r})",
            details={"converted": len(changed)},
        )
    ]


def conversion_breaks_keys(
    model: nn.Module, original: Mapping[str, Shape], converted: Mapping[str, Shape], expected: Mapping[str, ExpectedKey]
) -> Diagnosis | None:
    """peft's own load-time conversion renaming keys that already fit this model into keys that do not (an adapter
    saved in the current layout, converted again): the modules would silently load without their weights."""
    changed = [k for k in original if k not in converted]
    new = [k for k in converted if k not in original]
    if not changed or not all(k in expected for k in changed) or any(k in expected for k in new):
        return None
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return finding(
        "conversion_breaks_keys",
        f"{len(changed)} keys already fit {type(model).__name__}, but peft's load-time conversion for model_type "
        f"{model_type!r} renames them to keys the model does not have (e.g. {changed[0]!r} -> {new[0]!r}): "
        "plain peft loads those modules without their weights",
        details={"model_type": model_type, "converted": len(changed), "example": [changed[0], new[0]]},
        advice="this is peft's conversion, not the adapter: load with a peft / transformers pair whose conversion "
        "leaves these keys alone, and report it to peft (peft.utils.transformers_weight_conversion).",
    )


def named_keys_peft_accepts(
    checkpoint: dict[str, Shape], expected: Mapping[str, ExpectedKey], adapter_name: str
) -> dict[str, Shape]:
    """Keys saved with the adapter name inside (``lora_A.default.weight``, from a raw ``state_dict()``) that the
    installed peft loads as they are: since peft maps checkpoint keys onto the model's keys structurally, a key
    that already *is* a model key passes through. Older peft inserts the name a second time, so only then do
    these keys stay unexpected (and ``remap='auto'`` offers ``adapter_name_out``)."""
    from peft.tuners.tuners_utils import BaseTuner

    if not hasattr(BaseTuner, "_remap_adapter_state_dict_for_load"):
        return checkpoint
    from peft.tuners.tuners_utils import _remove_adapter_name_from_state_dict_key as remove

    moved = {}
    for key in checkpoint:
        if key not in expected and f".{adapter_name}" in key:
            plain = remove(key, adapter_name)
            fits = plain in expected and plain not in checkpoint and expected[plain].role is not Role.SAVED_MODULE
            if plain != key and fits:
                moved[key] = plain
    if not moved:
        return checkpoint
    return {moved.get(k, k): s for k, s in checkpoint.items()}


def other_adapters_copies(
    checkpoint: dict[str, Shape], expected: Mapping[str, ExpectedKey], adapter_name: str
) -> tuple[tuple[str, ...], bool]:
    """Copies of another adapter's tensors that peft wrote into this adapter's file, and whether the installed peft
    would load them.

    peft 0.17 saves, with ``lora_bias=True``, every adapter's ``lora_B`` bias into each adapter's file:
    ``...lora_B.default.bias`` beside the adapter's own ``...lora_B.bias``. Only a key that carries an adapter name,
    whose name-free form is one of the adapter's own keys present in the checkpoint with the same shape, counts.
    peft 0.17 ignores them on load; a peft that passes keys naming a model tensor through as they are
    (``_remap_adapter_state_dict_for_load``) writes the copy over the adapter's own tensor when it is loaded under the
    name the copy carries."""
    from peft.tuners.tuners_utils import BaseTuner

    stray = tuple(
        key
        for key, shape in checkpoint.items()
        if key not in expected
        and (own := without_adapter_name(key)) != key
        and own in expected
        and checkpoint.get(own) == shape
    )
    passes_through = hasattr(BaseTuner, "_remap_adapter_state_dict_for_load")
    loaded = passes_through and any(f".{adapter_name}." in key or key.endswith(f".{adapter_name}") for key in stray)
    return stray, loaded


def sizes_peft_ignores(checkpoint: Mapping[str, Shape], expected: Mapping[str, ExpectedKey]) -> tuple[str, ...]:
    """The checkpoint keys peft leaves out when the caller passes ``ignore_mismatched_sizes=True``: each whose shape
    differs from the model's tensor of that key (``_find_mismatched_keys``), except what peft takes for a packed
    4-bit weight (the model's last dimension 1, half the checkpoint's elements)."""
    found = []
    for key, shape in checkpoint.items():
        want = expected.get(key)
        if want is None or want.shape == shape:
            continue
        if want.shape and want.shape[-1] == 1 and math.prod(want.shape) * 2 == math.prod(shape):
            continue
        found.append(key)
    return tuple(found)


def _map_key(key: str, mapping: Mapping[str, str]) -> str:
    prefix = PEFT_PREFIX if key.startswith(PEFT_PREFIX) else "base_model." if key.startswith("base_model.") else ""
    if not prefix:
        return key
    rest = key[len(prefix) :]
    for pattern, replacement in mapping.items():
        new, count = re.subn(pattern, replacement, rest)
        if count:
            return prefix + new
    return key
