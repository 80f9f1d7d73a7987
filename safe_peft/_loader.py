"""``safe_load_adapter``: check first, load with peft, verify, and undo everything on failure."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from safe_peft._execute import execute, is_fatal
from safe_peft._plan import make_plan
from safe_peft.errors import AdapterLoadError

if TYPE_CHECKING:
    from torch import nn

__all__ = ["safe_load_adapter"]


def safe_load_adapter(
    base_model: nn.Module,
    model_id: str | os.PathLike[str],
    adapter_name: str = "default",
    *,
    remap: object = None,
    repair: tuple[str, ...] | list[str] = (),
    strict: bool = True,
    allow_pickle: bool = False,
    output_loading_info: bool = False,
    collective_timeout: float | None = None,
    **peft_kwargs: Any,
) -> Any:
    """Load a PEFT adapter like ``PeftModel.from_pretrained``, or fail with an explanation.

    Returns the same ``PeftModel`` peft would (``(model, report)`` with
    ``output_loading_info=True``). Raises :class:`AdapterLoadError` (a ``RuntimeError``) with
    a :class:`LoadReport` when the adapter does not fit; ``base_model`` is then left exactly
    as it was given. ``strict=False`` keeps peft's lenient handling of missing keys but still
    reports them. Nothing is renamed or repaired unless ``remap`` / ``repair`` ask for it.

    On a sharded model (FSDP2, tensor parallel) every rank must call it: the ranks agree on one verdict
    before anything changes, and restore together if any rank fails; ``collective_timeout`` (seconds,
    default 600) bounds the wait for the other ranks. See docs/distributed.md.
    """
    kwargs = dict(peft_kwargs)  # never mutate the caller's kwargs
    from safe_peft._distributed import is_sharded, load_sharded  # hook: sharded models load collectively

    if is_sharded(base_model):
        return load_sharded(
            base_model,
            model_id,
            adapter_name,
            remap=remap,
            repair=tuple(repair),
            strict=strict,
            allow_pickle=allow_pickle,
            output_loading_info=output_loading_info,
            collective_timeout=collective_timeout,
            peft_kwargs=kwargs,
        )
    plan = make_plan(
        base_model,
        model_id,
        adapter_name,
        remap=remap,
        repair=tuple(repair),
        allow_pickle=allow_pickle,
        peft_kwargs=kwargs,
    )
    if not plan.report.ok and (strict or is_fatal(plan.report)):
        raise AdapterLoadError(plan.report)
    model, report = execute(base_model, plan, adapter_name, strict, kwargs)
    return (model, report) if output_loading_info else model
