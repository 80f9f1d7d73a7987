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
    """A transformers ``TrainerCallback`` that stamps every checkpoint's adapter with the base fingerprint.

    After each checkpoint save, it stamps the adapters the Trainer wrote (``checkpoint-<step>/``, on the main
    process) with the model's own base weights. Resuming, evaluating or serving that checkpoint on another base is
    then refused. The model must be a ``PeftModel`` on an unsharded base. It takes no arguments.

    ```python
    >>> trainer = Trainer(model=peft_model, args=args, callbacks=[StampCallback()])  # doctest: +SKIP

    ```

    What the Trainer does after saving step 10, by hand:

    ```python
    >>> from types import SimpleNamespace
    >>> peft_model = safe_load_adapter(make_base(), adapter_dir)
    >>> peft_model.save_pretrained(os.path.join(tmp, "checkpoint-10"))
    >>> args, state = SimpleNamespace(output_dir=tmp), SimpleNamespace(global_step=10)
    >>> control = StampCallback().on_save(args, state, "control", model=peft_model)
    >>> from safetensors import safe_open
    >>> with safe_open(os.path.join(tmp, "checkpoint-10", "adapter_model.safetensors"), "pt") as f:
    ...     "safe_peft.base_fingerprint" in f.metadata()
    True

    ```
    """

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> Any:
        if model is None or not getattr(state, "is_world_process_zero", True):
            return control
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        directory = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        inner = getattr(model, "module", model)  # a wrapper (DDP) holds the PeftModel as .module
        for where in saved_adapter_dirs(inner, directory):
            stamp_adapter(where, inner)
        return control
