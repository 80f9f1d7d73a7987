"""``safe_load_adapter``: check first, load with peft, verify, and undo everything on failure."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Literal, overload

from safe_peft._fingerprint.check import verify_base_keyword
from safe_peft._load.kernel import execute, is_fatal
from safe_peft._plan.plan import make_plan
from safe_peft.errors import AdapterLoadError

if TYPE_CHECKING:
    from peft import PeftModel
    from torch import nn

    from safe_peft.report import LoadReport
    from safe_peft.rules import Remap, Repair

__all__ = ["safe_load_adapter"]


@overload
def safe_load_adapter(
    base_model: nn.Module,
    model_id: str | os.PathLike[str],
    adapter_name: str = ...,
    *,
    replace: bool | Literal["weights"] = ...,
    remap: Remap = ...,
    repair: Repair = ...,
    strict: bool = ...,
    allow_pickle: bool = ...,
    output_loading_info: Literal[False] = ...,
    collective_timeout: float | None = ...,
    **peft_kwargs: Any,
) -> PeftModel: ...


@overload
def safe_load_adapter(
    base_model: nn.Module,
    model_id: str | os.PathLike[str],
    adapter_name: str = ...,
    *,
    replace: bool | Literal["weights"] = ...,
    remap: Remap = ...,
    repair: Repair = ...,
    strict: bool = ...,
    allow_pickle: bool = ...,
    output_loading_info: Literal[True],
    collective_timeout: float | None = ...,
    **peft_kwargs: Any,
) -> tuple[PeftModel, LoadReport]: ...


@verify_base_keyword  # verify_base=False: skip the base fingerprint check (docs/fingerprint.md)
def safe_load_adapter(
    base_model: nn.Module,
    model_id: str | os.PathLike[str],
    adapter_name: str = "default",
    *,
    replace: bool | Literal["weights"] = False,
    remap: Remap = None,
    repair: Repair = (),
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

    Given a ``PeftModel``, it loads a further adapter into it, as ``peft_model.load_adapter(model_id,
    adapter_name)`` does, and returns the same ``PeftModel``; a failure leaves it exactly as it was (its adapters,
    their weights, the active adapter, ``requires_grad`` flags, ``peft_config``). A name it already has is an error
    (``adapter_name_taken``) unless ``replace=True`` (the new adapter, config and weights, takes that name, only if
    it loads; it is active if the old one was) or ``replace="weights"`` (the checkpoint's weights are written into
    the adapter as it is, as peft and the Trainer's resume do; its config must compute the same way). See
    docs/routes.md.

    An adapter stamped with its base's fingerprint (``stamp_adapter``) is refused on a base whose weights differ
    (``base_weights_differ``); ``verify_base=False`` skips that comparison (docs/fingerprint.md).
    """
    kwargs = dict(peft_kwargs)  # never mutate the caller's kwargs
    from safe_peft._plan.routes import is_peft_model  # hook: further adapters into a PeftModel (issue 12, _carried)

    if is_peft_model(base_model):
        from safe_peft._routes.peft_model import load_into

        return load_into(
            base_model,  # type: ignore[arg-type]
            model_id,
            adapter_name,
            replace=replace,
            remap=remap,
            repair=tuple(repair),
            strict=strict,
            allow_pickle=allow_pickle,
            output_loading_info=output_loading_info,
            peft_kwargs=kwargs,
        )
    from safe_peft._distributed.load import is_sharded, load_sharded  # hook: sharded models load collectively

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
