"""A transformers ``TrainerCallback`` that stamps every checkpoint's adapter with the base fingerprint.

>>> trainer = Trainer(model=peft_model, args=args, callbacks=[StampCallback()])  # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import Any

from transformers import TrainerCallback

from safe_peft._fingerprint.stamp import saved_adapter_dirs, stamp_adapter

__all__ = ["StampCallback"]


class StampCallback(TrainerCallback):
    """After each checkpoint save, stamp the adapters the Trainer wrote (``checkpoint-<step>/``, on the main
    process) with the model's own base weights, so that resuming, evaluating or serving that checkpoint on another
    base is refused. The model must be a PeftModel on an unsharded base."""

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> Any:
        if model is None or not getattr(state, "is_world_process_zero", True):
            return control
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        directory = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        inner = getattr(model, "module", model)  # a wrapper (DDP) holds the PeftModel as .module
        for where in saved_adapter_dirs(inner, directory):
            stamp_adapter(where, inner)
        return control
