"""transformers' own adapter route, safely: ``model.load_adapter(path)`` on a transformers model (no PeftModel).

The plan is :func:`safe_peft._plan.plan.plan_load` with the hooks of route ``inplace``: transformers' key handling,
no PeftModel wrapper. The load is transformers' own ``load_adapter`` given the checked config. The one driver records
the model first, restores it on any failure, and verifies every expected adapter tensor, as for ``safe_load_adapter``.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from safe_peft._files.rewrite import write_weights
from safe_peft._files.source import HUB_KWARGS
from safe_peft._keys import PEFT_PREFIX
from safe_peft._load.adapter_tensors import adapter_tensors, overwritten_base_tensors
from safe_peft._load.driver import Loaded, LoadRoute, Outcome, Protected, drive
from safe_peft._load.plain_calls import plain_calls
from safe_peft._load.snapshot import ModuleSnapshot
from safe_peft._plan.options import LoadOptions
from safe_peft._plan.plan import LoadPlan, plan_load
from safe_peft._plan.routes import CarryingRoute, inplace_conversion, inplace_key_mapping, is_peft_model, see_through

if TYPE_CHECKING:
    from torch import nn

__all__ = ["InPlace", "hub_kwargs", "run_inplace", "safe_load_adapter_inplace"]


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
    verify_base: bool = True,
    **load_adapter_kwargs: Any,
) -> Any:
    """Load an adapter into a transformers model itself, like ``model.load_adapter(model_id, adapter_name)``.

    This is transformers' PEFT integration: no ``PeftModel`` wrapper. When the adapter does not fit, it raises
    :class:`AdapterLoadError` and ``model`` is exactly as it was. Plain transformers has injected the layers by
    then, or loads a broken adapter without a word. Keys load as transformers maps them: with or without
    ``base_model.model.``; transformers 5 also adds or strips the ``base_model_prefix`` level.

    :param model: a transformers model (not a ``PeftModel``: use :func:`safe_load_adapter` for that).
    :param model_id: a local adapter directory, or a hub id when online.
    :param adapter_name: the adapter's name; a name the model already has is an error (``adapter_name_taken``).
    :param remap: as in :func:`safe_load_adapter`.
    :param repair: as in :func:`safe_load_adapter`.
    :param strict: as in :func:`safe_load_adapter`.
    :param allow_pickle: as in :func:`safe_load_adapter`.
    :param output_loading_info: return ``(model, report)`` instead of the model alone.
    :param verify_base: as in :func:`safe_load_adapter`.
    :param load_adapter_kwargs: ``**load_adapter_kwargs`` go to ``model.load_adapter``: ``is_trainable``,
        ``low_cpu_mem_usage``, ``adapter_kwargs``, ...
    :returns: ``model`` with the adapter injected, or ``(model, report)`` with ``output_loading_info=True``.
    :raises AdapterLoadError: with a :class:`LoadReport` when the adapter does not fit.

    ```python
    >>> model = safe_load_adapter_inplace(make_base(), adapter_dir)
    >>> type(model).__name__, list(model.peft_config)
    ('LlamaForCausalLM', ['default'])

    ```
    """
    options = LoadOptions(  # the caller's kwargs are copied, never changed
        adapter_name=adapter_name,
        remap=remap,
        repair=tuple(repair),
        strict=strict,
        allow_pickle=allow_pickle,
        output_loading_info=output_loading_info,
        verify_base=verify_base,
        peft_kwargs=load_adapter_kwargs,
    )
    outcome = run_inplace(model, model_id, options)
    return options.returned(outcome.model, outcome.report)


def run_inplace(model: nn.Module, model_id: str | os.PathLike[str], options: LoadOptions) -> Outcome:
    """Plan and load in place (``options.peft_kwargs``: transformers' ``load_adapter`` arguments); the outcome's
    ``result`` is transformers' own return value."""
    if is_peft_model(model):
        raise TypeError("safe_load_adapter_inplace takes a transformers model; for a PeftModel use safe_load_adapter")
    if not callable(getattr(type(model), "load_adapter", None)) or not hasattr(model, "_hf_peft_config_loaded"):
        raise TypeError(
            f"{type(model).__name__} is not a transformers model with the PEFT integration (PeftAdapterMixin); "
            "use safe_load_adapter(model, path), which wraps any torch module in a PeftModel"
        )
    return drive(InPlace(model, model_id, options))


class InPlace(LoadRoute):
    """transformers' own ``load_adapter`` into the model itself, given the checked config; the whole model is
    recorded first. The plan reads the adapter where transformers finds it (:func:`hub_kwargs`)."""

    def plan(self) -> LoadPlan:
        kwargs = self.options.peft_kwargs
        planned = {**hub_kwargs(kwargs), "config": kwargs.get("peft_config"), "key_mapping": None}
        options = dataclasses.replace(self.options, peft_kwargs=planned)
        return plan_load(self.model, self.model_id, options, CarryingRoute("inplace"))

    def protect(self, plan: LoadPlan) -> Protected:
        snapshot = ModuleSnapshot(self.model)
        snapshot.protect(overwritten_base_tensors(self.model, plan, through=see_through))
        return Protected(snapshot)

    def load(self, plan: LoadPlan, protected: Protected, temporary: list[str | None]) -> Loaded:
        model, adapter_name, kwargs = self.model, self.options.adapter_name, self.options.peft_kwargs
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
        state = {PEFT_PREFIX + k: v for k, v in adapter_tensors(model, adapter_name, analytic).items()}
        return Loaded(model, state, result=result)


def hub_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Where transformers' ``load_adapter`` finds the adapter: its own arguments, ``adapter_kwargs`` and (from
    ``from_pretrained``) ``load_config.download_kwargs``."""
    load_config = kwargs.get("load_config")
    found: dict[str, Any] = dict(getattr(load_config, "download_kwargs", None) or {})
    found.update(kwargs.get("adapter_kwargs") or {})
    found.update(kwargs)
    return {k: found[k] for k in HUB_KWARGS if found.get(k) is not None}


def _directory(model: nn.Module, plan: LoadPlan, kwargs: Mapping[str, Any]) -> tuple[str, str | None]:
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
