"""``safe_load_adapter``: check first, load with peft, verify, and undo everything on failure."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Literal, overload

from safe_peft._files.source import HUB_KWARGS
from safe_peft._load.adapter_tensors import overwritten_base_tensors
from safe_peft._load.directory import load_directory
from safe_peft._load.driver import Loaded, LoadRoute, Protected, drive
from safe_peft._load.route_choice import load_route, own_route, proven_exact, rounds_on_meta
from safe_peft._load.snapshot import ModuleSnapshot
from safe_peft._plan.options import LoadOptions
from safe_peft._plan.plan import FIRST_ADAPTER, LoadPlan, plan_load

if TYPE_CHECKING:
    from peft import PeftModel
    from torch import nn

    from safe_peft.report import LoadReport
    from safe_peft.rules import Remap, Repair

__all__ = ["FirstAdapter", "install_given_config", "safe_load_adapter"]


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
    verify_base: bool = ...,
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
    verify_base: bool = ...,
    **peft_kwargs: Any,
) -> tuple[PeftModel, LoadReport]: ...


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
    verify_base: bool = True,
    **peft_kwargs: Any,
) -> Any:
    """Load a PEFT adapter like ``PeftModel.from_pretrained``, or fail with an explanation.

    On success it returns the same ``PeftModel`` peft would. When the adapter does not fit, it raises
    :class:`AdapterLoadError` and ``base_model`` is left exactly as it was given. Nothing is renamed or repaired
    unless ``remap`` / ``repair`` ask for it.

    Given a ``PeftModel``, it loads a further adapter into it, as ``peft_model.load_adapter(model_id,
    adapter_name)`` does, and returns the same ``PeftModel``. A failure then leaves it exactly as it was: its
    adapters, their weights, the active adapter, ``requires_grad`` flags and ``peft_config`` (docs/routes.md).

    On a sharded model (FSDP2, tensor parallel) every rank must call it. The ranks agree on one verdict before
    anything changes, and restore together if any rank fails (docs/distributed.md).

    :param base_model: the model, as ``PeftModel.from_pretrained`` takes it, or a ``PeftModel``.
    :param model_id: a local adapter directory, or a hub id when online.
    :param adapter_name: the adapter's name in the model.
    :param replace: for a name a ``PeftModel`` already has; otherwise that is an error (``adapter_name_taken``).
        ``True``: the new adapter, config and weights take that name, only if it loads; it is active if the old
        one was. ``"weights"``: the checkpoint's weights are written into the adapter as it is, as peft and the
        Trainer's resume do; its config must compute the same way.
    :param remap: None never renames keys. ``"auto"`` applies the built-in rules only if every key then lands
        exactly. Or your own :class:`RemapRule` sequence, or a ``{regex: replacement}`` mapping.
    :param repair: opt-in repairs, e.g. ``("rank",)`` to rebuild r / rank_pattern from the weights' shapes.
    :param strict: missing adapter keys are an error. ``False`` keeps peft's lenient handling but still reports
        them.
    :param allow_pickle: accept a ``.bin`` adapter, read with ``torch.load(weights_only=True)`` only.
    :param output_loading_info: return ``(model, report)`` instead of the model alone.
    :param collective_timeout: on a sharded model, how long to wait for the other ranks, in seconds (default
        600).
    :param verify_base: refuse an adapter stamped by :func:`stamp_adapter` on a base whose weights differ
        (``base_weights_differ``). False skips that comparison (docs/fingerprint.md).
    :param peft_kwargs: ``**peft_kwargs`` go to peft unchanged: ``is_trainable``, ``config``, ``revision``,
        ``torch_device``, ...
    :returns: the ``PeftModel``, or ``(model, report)`` with ``output_loading_info=True``.
    :raises AdapterLoadError: (a ``RuntimeError``) with a :class:`LoadReport` when the adapter does not fit.

    ```python
    >>> model, report = safe_load_adapter(make_base(), adapter_dir, output_loading_info=True)
    >>> type(model).__name__, report.ok
    ('PeftModel', True)
    >>> try:
    ...     safe_load_adapter(other_base, adapter_dir)
    ... except AdapterLoadError as err:
    ...     print(err.report.primary.code)
    dimension_mismatch
    >>> model = safe_load_adapter(make_base(), compiled_adapter_dir, remap="auto")

    ```
    """
    options = LoadOptions(  # the caller's peft_kwargs are copied, never changed; positional in field order
        adapter_name,
        remap,
        tuple(repair),
        strict,
        allow_pickle,
        output_loading_info,
        replace,
        collective_timeout,
        verify_base,
        peft_kwargs,
    )
    from safe_peft._plan.routes import is_peft_model  # a PeftModel takes a further adapter

    if is_peft_model(base_model):
        from safe_peft._routes.peft_model import load_into

        return load_into(base_model, model_id, options)  # type: ignore[arg-type]
    from safe_peft._distributed.load import is_sharded, load_sharded  # hook: sharded models load collectively

    route = FirstAdapter(base_model, model_id, options)
    if is_sharded(base_model):
        return load_sharded(route)
    outcome = drive(route)
    return options.returned(outcome.model, outcome.report)


class FirstAdapter(LoadRoute):
    """The first adapter into a bare model (``PeftModel.from_pretrained``): the whole base model is recorded, the
    load is safe_peft's own assignment of the checkpoint or peft's ``from_pretrained`` (:mod:`safe_peft._load.
    route_choice`), and a caller's ``config=`` object becomes the adapter's config once the load committed."""

    def plan(self) -> LoadPlan:
        return plan_load(self.model, self.model_id, self.options, FIRST_ADAPTER)

    def protect(self, plan: LoadPlan) -> Protected:
        snapshot = ModuleSnapshot(self.model)
        snapshot.protect(overwritten_base_tensors(self.model, plan))
        return Protected(snapshot)

    def load(self, plan: LoadPlan, protected: Protected, temporary: list[str | None]) -> Loaded:
        from peft import PeftModel

        base_model, adapter_name, strict = self.model, self.options.adapter_name, self.options.strict
        kwargs = dict(self.options.peft_kwargs)
        if plan.vocab_size is not None:
            base_model.resize_token_embeddings(plan.vocab_size)
        directory, workdir = load_directory(plan, with_config=False)
        temporary.append(workdir)
        passthrough = {k: v for k, v in kwargs.items() if k not in HUB_KWARGS and k != "config"}
        route = load_route(base_model, plan, strict, kwargs)
        from safe_peft._load.plain_calls import (
            plain_calls,  # hook: under safe_peft.patch(), these calls stay plain peft
        )

        with plain_calls():
            state = None
            own = route == "meta" or (route == "initialising" and "low_cpu_mem_usage" not in kwargs)
            if own and proven_exact(base_model, plan, strict, kwargs):
                on_meta = route == "meta"
                exact = on_meta and rounds_on_meta(base_model, plan, kwargs)
                config, rest = plan.peft_config, dict(passthrough)
                model, state = own_route(base_model, directory, adapter_name, config, rest, on_meta, exact)
            else:
                config = plan.peft_config
                model = PeftModel.from_pretrained(base_model, directory, adapter_name, config=config, **passthrough)
        return Loaded(model, state, route)

    def commit(self, loaded: Loaded) -> None:
        install_given_config(loaded.model, self.options.adapter_name, self.options.peft_kwargs.get("config"))


def install_given_config(model: Any, adapter_name: str, given: Any) -> None:
    """A caller's ``config=`` object is the adapter's config after the load, as peft installs it: it takes what
    the load set on the checked copy (``inference_mode = not is_trainable``, filled-in ``target_modules``, ...).
    Only after the load committed: on a failure the caller's object is untouched."""
    if given is None:
        return
    installed = model.peft_config[adapter_name]
    if installed is not given:
        given.__dict__.update(installed.__dict__)
        model.peft_config[adapter_name] = given
