"""transformers' own adapter route, safely: ``model.load_adapter(path)`` on a transformers model (no PeftModel).

The plan is :func:`safe_peft._plan.routes.route_plan` with route ``inplace`` (transformers' key handling, no PeftModel
wrapper); the load is transformers' own ``load_adapter`` given the checked config, with the model recorded first and
restored on any failure; afterwards every expected adapter tensor is verified, as for ``safe_load_adapter``.
"""

from __future__ import annotations

import copy
import os
from typing import TYPE_CHECKING, Any

from safe_peft._files.rewrite import write_weights
from safe_peft._files.source import HUB_KWARGS
from safe_peft._fingerprint.check import verify_base_keyword
from safe_peft._keys import PEFT_PREFIX
from safe_peft._load.kernel import (
    adapter_tensors,
    atomically,
    is_fatal,
    overwritten_base_tensors,
    settled,
    verify,
)
from safe_peft._load.plain_calls import plain_calls
from safe_peft._load.snapshot import ModuleSnapshot
from safe_peft._plan.plan import LoadPlan
from safe_peft._plan.routes import inplace_conversion, inplace_key_mapping, is_peft_model, route_plan, see_through
from safe_peft.errors import AdapterLoadError
from safe_peft.report import LoadReport

if TYPE_CHECKING:
    from torch import nn

__all__ = ["hub_kwargs", "run_inplace", "safe_load_adapter_inplace"]


@verify_base_keyword  # verify_base=False: skip the base fingerprint check (docs/fingerprint.md)
def safe_load_adapter_inplace(
    model: nn.Module,
    model_id: str | os.PathLike[str],
    adapter_name: str = "default",
    *,
    remap: object = None,
    repair: tuple[str, ...] | list[str] = (),
    strict: bool = True,
    allow_pickle: bool = False,
    output_loading_info: bool = False,
    **load_adapter_kwargs: Any,
) -> Any:
    """Load an adapter into a transformers model itself, like ``model.load_adapter(model_id, adapter_name)``
    (transformers' PEFT integration: no PeftModel wrapper), or fail with an explanation.

    Returns ``model`` with the adapter injected (``(model, report)`` with ``output_loading_info=True``); raises
    :class:`AdapterLoadError` with a :class:`LoadReport` when the adapter does not fit, and ``model`` is then exactly
    as it was (plain transformers has injected the layers by then, or loads a broken adapter without a word).
    Keys load as transformers maps them (with or without ``base_model.model.``; transformers 5 also adds or strips
    the ``base_model_prefix`` level). Other keyword arguments go to ``model.load_adapter`` (``is_trainable``,
    ``low_cpu_mem_usage``, ``adapter_kwargs``, ...). A name the model already has is ``adapter_name_taken``.
    """
    model, report, _ = run_inplace(
        model,
        model_id,
        adapter_name,
        remap=remap,
        repair=tuple(repair),
        strict=strict,
        allow_pickle=allow_pickle,
        kwargs=dict(load_adapter_kwargs),
    )
    return (model, report) if output_loading_info else model


def run_inplace(
    model: nn.Module,
    model_id: str | os.PathLike[str],
    adapter_name: str,
    *,
    remap: object = None,
    repair: tuple[str, ...] = (),
    strict: bool = True,
    allow_pickle: bool = False,
    kwargs: dict[str, Any] | None = None,
) -> tuple[nn.Module, LoadReport, Any]:
    """Plan and execute an in-place load; returns the model, the report and transformers' own return value."""
    kwargs = dict(kwargs or {})  # never mutate the caller's kwargs
    if is_peft_model(model):
        raise TypeError("safe_load_adapter_inplace takes a transformers model; for a PeftModel use safe_load_adapter")
    if not callable(getattr(type(model), "load_adapter", None)) or not hasattr(model, "_hf_peft_config_loaded"):
        raise TypeError(
            f"{type(model).__name__} is not a transformers model with the PEFT integration (PeftAdapterMixin); "
            "use safe_load_adapter(model, path), which wraps any torch module in a PeftModel"
        )
    plan = route_plan(
        model,
        model_id,
        adapter_name,
        route="inplace",
        remap=remap,
        repair=repair,
        allow_pickle=allow_pickle,
        peft_kwargs={**hub_kwargs(kwargs), "config": kwargs.get("peft_config"), "key_mapping": None},
    )
    if not plan.report.ok and (strict or is_fatal(plan.report)):
        raise AdapterLoadError(plan.report)
    return _execute(model, plan, adapter_name, strict, kwargs)


def hub_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Where transformers' ``load_adapter`` finds the adapter: its own arguments, ``adapter_kwargs`` and (from
    ``from_pretrained``) ``load_config.download_kwargs``."""
    load_config = kwargs.get("load_config")
    found: dict[str, Any] = dict(getattr(load_config, "download_kwargs", None) or {})
    found.update(kwargs.get("adapter_kwargs") or {})
    found.update(kwargs)
    return {k: found[k] for k in HUB_KWARGS if found.get(k) is not None}


def _execute(
    model: nn.Module, plan: LoadPlan, adapter_name: str, strict: bool, kwargs: dict[str, Any]
) -> tuple[nn.Module, LoadReport, Any]:
    snapshot = ModuleSnapshot(model)
    snapshot.protect(overwritten_base_tensors(model, plan, through=see_through))
    with atomically(snapshot, plan.report) as temporary:
        directory, workdir = _directory(model, plan, kwargs)
        temporary.append(workdir)
        config = copy.deepcopy(plan.peft_config)
        if hasattr(config, "inference_mode"):
            config.inference_mode = not kwargs.get("is_trainable", False)  # what transformers does with its own
        own = (*HUB_KWARGS, "peft_config", "adapter_name")
        passthrough = {k: v for k, v in kwargs.items() if k not in own}
        extra = passthrough.pop("adapter_kwargs", None) or {}
        adapter_kwargs = {k: v for k, v in extra.items() if k not in HUB_KWARGS}
        if adapter_kwargs:
            passthrough["adapter_kwargs"] = adapter_kwargs
        load: Any = getattr(type(model), "load_adapter")  # noqa: B009 - typed as a plain torch module here
        with plain_calls():
            result = load(model, directory, adapter_name=adapter_name, peft_config=config, **passthrough)
        analytic = plan.view is not None and plan.view.method == "analytic"
        state = {PEFT_PREFIX + k: v for k, v in adapter_tensors(model, adapter_name, analytic).items()}  # type: ignore[arg-type]
        report = verify(model, plan, adapter_name, state)  # type: ignore[arg-type]
        return model, settled(plan, report, strict), result


def _directory(model: nn.Module, plan: LoadPlan, kwargs: dict[str, Any]) -> tuple[str, str | None]:
    """The adapter's own directory, or (opt-in renames) a temporary one whose keys are already the model's."""
    if not (plan.renames or plan.dropped or plan.legacy is not None):
        return plan.files.directory, None
    from safe_peft._files.source import read_checkpoint_shapes

    assert plan.view is not None
    keys = list(read_checkpoint_shapes(plan.files))
    converted = inplace_conversion(model, keys, plan.view.expected, inplace_key_mapping(model, kwargs))
    gone = set(plan.dropped)
    renames = {k: plan.renames.get(c, c) for k, c in converted.items() if c not in gone}
    from safe_peft._fix.writer import temporary_directory

    with temporary_directory() as workdir:  # removed if writing into it fails half-way
        write_weights(
            plan.files.weights_path,
            os.path.join(workdir, "adapter_model.safetensors"),
            weights_format=plan.files.weights_format,
            renames={k: v for k, v in renames.items() if k != v},
            dropped=[k for k, c in converted.items() if c in gone],
            legacy=plan.legacy,
        )
        plan.peft_config.save_pretrained(workdir)
    return workdir, workdir
