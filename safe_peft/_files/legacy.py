"""Adapters of peft <= 0.2: LoRA on fused projections (``MergedLinear``, ``enable_lora`` in the config).

There, ``lora_A`` is ``[r * k, in]`` for the ``k`` enabled parts, and ``lora_B`` a grouped ``Conv1d`` weight
``[out_part * k, r, 1]`` whose outputs are scattered into the enabled slices of the fused output. The same
computation as plain LoRA: ``lora_B`` becomes a dense, block-diagonal ``[out, r * k]`` (zero rows for the
disabled parts), and ``r`` and ``lora_alpha`` are both multiplied by ``k`` so the scaling is unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from safe_peft._keys import Shape

__all__ = ["convert_config", "convert_lora_b", "convert_shapes", "enabled_parts"]


def enabled_parts(data: Mapping[str, Any]) -> tuple[bool, ...] | None:
    """The config's ``enable_lora`` when it describes a MergedLinear adapter, else None."""
    value = data.get("enable_lora")
    if isinstance(value, (list, tuple)) and value and any(value):
        return tuple(bool(v) for v in value)
    return None


def convert_config(data: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """The config for the converted adapter, and a description of the change."""
    parts = enabled_parts(data)
    assert parts is not None
    k = sum(parts)
    new = {key: value for key, value in data.items() if key not in {"enable_lora", "merge_weights"}}
    new["r"] = data["r"] * k
    new["lora_alpha"] = data.get("lora_alpha", 8) * k
    return new, (
        f"legacy: MergedLinear (enable_lora={list(parts)}) converted to plain LoRA: r {data['r']} -> {new['r']}, "
        f"lora_alpha {data.get('lora_alpha', 8)} -> {new['lora_alpha']} (scaling unchanged), lora_B made block-diagonal"
    )


def convert_shapes(shapes: Mapping[str, Shape], parts: Sequence[bool]) -> dict[str, Shape]:
    """Checkpoint shapes after conversion: each 3-D lora_B ``[out_part * k, r, 1]`` becomes ``[out, r * k]``."""
    k = sum(parts)
    out: dict[str, Shape] = {}
    for key, shape in shapes.items():
        if key.endswith(".lora_B.weight") and len(shape) == 3:
            out[key] = (shape[0] // k * len(parts), shape[1] * k)
        else:
            out[key] = tuple(shape)
    return out


def convert_lora_b(weight: Any, parts: Sequence[bool]) -> Any:
    """The dense, block-diagonal lora_B equivalent to a MergedLinear grouped-conv lora_B."""
    import torch

    k = sum(parts)
    out_part, r = weight.shape[0] // k, weight.shape[1]
    dense = torch.zeros(out_part * len(parts), r * k, dtype=weight.dtype)
    group = 0
    for position, enabled in enumerate(parts):
        if enabled:
            rows = slice(position * out_part, (position + 1) * out_part)
            dense[rows, group * r : (group + 1) * r] = weight[group * out_part : (group + 1) * out_part, :, 0]
            group += 1
    return dense
