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
    """Predict what :func:`safe_load_adapter` with the same arguments would do, without loading.

    It reads ``adapter_config.json`` and the safetensors header only, no tensor data. It works on a model built
    on the meta device, and it never modifies ``base_model``. Faults that only the tensor values show (NaN / Inf,
    an all-zero lora_B) are found by the load alone. Format faults are reported, not raised, so one call answers
    for any adapter.

    :param base_model: the model, as ``safe_load_adapter`` takes it. Given a ``PeftModel``, it predicts loading a
        further adapter into it.
    :param model_id: a local adapter directory, or a hub id when online.
    :param adapter_name: the name the adapter would get.
    :param remap: as in ``safe_load_adapter``: None, ``"auto"``, rules, or a ``{regex: replacement}`` mapping.
    :param repair: as in ``safe_load_adapter``: opt-in repairs such as ``("rank",)``.
    :param allow_pickle: as in ``safe_load_adapter``: accept a ``.bin`` adapter.
    :param replace: as in ``safe_load_adapter``, for a name a ``PeftModel`` already has.
    :param inplace: predict :func:`safe_load_adapter_inplace` (transformers' own route) instead.
    :param verify_base: compare a stamped adapter's base fingerprint with a real ``base_model``
        (docs/fingerprint.md); False skips that.
    :param peft_kwargs: ``**peft_kwargs``: as in ``safe_load_adapter``.
    :returns: the predicted :class:`LoadReport`; ``ok`` agrees with what the real load then does.

    ```python
    >>> diagnose(base, adapter_dir).ok
    True
    >>> report = diagnose(other_base, adapter_dir)
    >>> report.ok, report.primary.cause.value
    (False, 'wrong_base_model')

    ```
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
