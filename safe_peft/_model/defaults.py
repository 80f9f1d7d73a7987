"""The targets peft fills in itself: a LoRA config without ``target_modules`` gets the defaults of the model type.

Mirrors ``LoraModel._prepare_adapter_config`` (peft 0.17.1 to 0.21.2): the model type is read from the model's
config (``"custom"`` without one), looked up in peft's table of default LoRA targets; without a default (and
without ``target_parameters``) peft refuses the config, and so does this, with the same reason.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from safe_peft.errors import AdapterFormatError

if TYPE_CHECKING:
    from torch import nn

__all__ = ["default_targets"]


def default_targets(model: nn.Module, config: Any) -> Any:
    """The ``target_modules`` peft uses for ``config`` on ``model`` when the config names none."""
    from peft.tuners.lora import LoraModel
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    mapping: Any = getattr(LoraModel, "target_module_mapping", None)
    mapping = mapping or TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    model_config = getattr(model, "config", None)
    model_type = getattr(model_config, "model_type", None) if model_config is not None else "custom"
    targets = mapping.get(model_type) if isinstance(model_type, str) else None
    if targets is not None:
        return targets if isinstance(targets, str) else set(targets)
    if getattr(config, "target_parameters", None):
        return None
    raise AdapterFormatError.of(
        "invalid_config_value",
        f"adapter_config.json: target_modules is missing, and peft has no default targets for model_type "
        f"{model_type!r} (peft refuses it: 'Please specify `target_modules`')",
        details={"key": "target_modules", "model_type": str(model_type)},
        key="target_modules",
    )
