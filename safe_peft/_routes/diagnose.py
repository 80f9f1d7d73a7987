"""``diagnose``: the plan of whichever route the arguments name, as a report, without loading anything.

It sits above the plan (:mod:`safe_peft._plan.plan`) and the routes (:mod:`safe_peft._plan.routes`), which it
chooses between.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from safe_peft._plan.options import LoadOptions
from safe_peft._plan.routes import plan_for
from safe_peft.errors import AdapterFormatError

if TYPE_CHECKING:
    from torch import nn

    from safe_peft.report import LoadReport
    from safe_peft.rules import Remap, Repair

__all__ = ["diagnose"]


def diagnose(
    base_model: nn.Module,
    model_id: str | os.PathLike[str],
    adapter_name: str = "default",
    *,
    remap: Remap = None,
    repair: Repair = (),
    allow_pickle: bool = False,
    replace: bool | str = False,
    inplace: bool = False,
    verify_base: bool = True,
    **peft_kwargs: Any,
) -> LoadReport:
    """Predict what ``safe_load_adapter`` with the same arguments would do, without loading.

    Reads ``adapter_config.json`` and the safetensors header only (no tensor data), works on
    a model built on the meta device, and never modifies ``base_model``. Data faults that
    only the tensor values show (NaN / Inf, an all-zero lora_B) are found by the load alone.
    Format faults are reported too (not raised), so one call answers for any adapter.

    Given a ``PeftModel`` it predicts a further adapter (``replace=`` as in ``safe_load_adapter``);
    ``inplace=True`` predicts ``safe_load_adapter_inplace`` (transformers' own route). A stamped adapter's base
    fingerprint is compared with a real ``base_model`` (``verify_base=False`` skips it; docs/fingerprint.md).
    """
    options = LoadOptions(
        adapter_name,
        remap,
        tuple(repair),
        allow_pickle=allow_pickle,
        replace=replace,
        verify_base=verify_base,
        peft_kwargs=peft_kwargs,
    )
    try:
        return plan_for(base_model, model_id, options, inplace=inplace).report
    except AdapterFormatError as exc:
        return exc.report
