"""``safe_load_state_dict``: a drop-in for ``module.load_state_dict`` that checks before writing."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from safe_peft._catalog import finding
from safe_peft._keys import Role, is_adapter_key
from safe_peft._model.view import ExpectedKey, ModelView
from safe_peft._plan.classify import Evidence, classify
from safe_peft._plan.compare import compare_keys
from safe_peft._plan.remap import plan_given, plan_remap, to_rules
from safe_peft.errors import AdapterLoadError
from safe_peft.report import Diagnosis, LoadReport
from safe_peft.rules import BUILTIN, Remap, rename_state_dict

if TYPE_CHECKING:
    from torch import nn

__all__ = ["safe_load_state_dict"]


def safe_load_state_dict(
    module: nn.Module, state_dict: Mapping[str, Any], strict: bool = True, *, remap: Remap = None
) -> LoadReport:
    """Load ``state_dict`` into ``module`` like ``module.load_state_dict(state_dict, strict)``.

    The keys and shapes are compared first. On a mismatch nothing is written, and :class:`AdapterLoadError`
    explains it. Plain torch, by the time it raises, has already overwritten every matching parameter. It
    recognises a PEFT adapter's state dict loaded into a bare model, and the reverse, and points to
    :func:`safe_load_adapter`. ``state_dict`` itself is never modified.

    :param module: any ``torch.nn.Module``.
    :param state_dict: the tensors to load, by key.
    :param strict: as in torch: missing and unexpected keys are an error. ``False`` loads what matches and lists
        the rest in the report; size mismatches are always an error.
    :param remap: None never renames keys. ``"auto"`` applies the built-in rules only if every key then lands
        exactly. Or a :class:`RemapRule` sequence, or a ``{regex: replacement}`` mapping.
    :returns: the :class:`LoadReport` of the load.
    :raises AdapterLoadError: when the keys or shapes do not match; ``module`` is then unchanged.

    ```python
    >>> layer = torch.nn.Linear(2, 2)
    >>> safe_load_state_dict(layer, {"weight": torch.zeros(2, 2), "bias": torch.zeros(2)}).ok
    True
    >>> try:
    ...     safe_load_state_dict(layer, {"weight": torch.ones(2, 2)})
    ... except AdapterLoadError as err:
    ...     print(err.report.missing, bool((layer.weight == 0).all()))
    [MissingKey(key='bias', expected_shape=(2,))] True

    ```
    """
    own = module.state_dict(keep_vars=True)
    expected = {k: ExpectedKey(k, tuple(v.shape), k.rsplit(".", 1)[0], Role.OTHER) for k, v in own.items()}
    shapes = {k: tuple(getattr(v, "shape", ())) for k, v in state_dict.items()}
    renames: dict[str, str] = {}
    dropped: tuple[str, ...] = ()
    tried = None
    if remap is not None:
        tried = (
            plan_remap(shapes, expected, BUILTIN) if remap == "auto" else plan_given(to_rules(remap), shapes, expected)
        )
        if tried.exact:
            renames, dropped = dict(tried.renames), tried.dropped
            gone = set(dropped)
            shapes = {renames.get(k, k): s for k, s in shapes.items() if k not in gone}
    diff = compare_keys(shapes, expected)
    if not strict:
        diff = type(diff)([], [], diff.size_mismatches)
    causes: list[Diagnosis] = []
    if not diff.ok:
        view = ModelView(type(module).__name__, expected, {}, frozenset(), "", (), "state_dict")
        # a remap already asked for and refused is not offered again: say why it was refused instead
        plan = plan_remap(shapes, expected, BUILTIN) if tried is None else None
        causes = _wrong_loader(shapes, own) or classify(Evidence(diff, shapes, view, {}, plan, adapter=False))
        if tried is not None and not tried.exact:
            causes.append(
                finding(
                    "remap_not_exact",
                    f"the {'built-in' if remap == 'auto' else 'given'} remap rules make no key set match exactly, "
                    f"so nothing was renamed ({tried.remaining} problems left, e.g. "
                    f"{tried.problems[0] if tried.problems else '-'})",
                    details={"closest_rules": [r.name for r in tried.rules], "problems": list(tried.problems)},
                )
            )
    report = LoadReport(
        ok=diff.ok,
        missing=diff.missing,
        unexpected=diff.unexpected,
        size_mismatches=diff.size_mismatches,
        causes=causes,
        renames=renames,
        model_class=type(module).__name__,
        adapter="state_dict",
    )
    if not report.ok:
        raise AdapterLoadError(report)
    renamed = rename_state_dict(state_dict, renames, dropped)
    result = module.load_state_dict(renamed, strict=strict)
    if not strict and (result.missing_keys or result.unexpected_keys):
        lenient = compare_keys(shapes, expected)
        return LoadReport(
            ok=True,
            missing=lenient.missing,
            unexpected=lenient.unexpected,
            renames=renames,
            model_class=type(module).__name__,
            adapter="state_dict",
        )
    return report


def _wrong_loader(shapes: Mapping[str, Any], own: Mapping[str, Any]) -> list[Diagnosis]:
    ckpt_lora = [k for k in shapes if is_adapter_key(k)]
    model_lora = [k for k in own if is_adapter_key(k)]
    if ckpt_lora and len(ckpt_lora) == len(shapes) and not model_lora:
        return [
            finding(
                "adapter_into_base_model",
                f"all {len(shapes)} keys are PEFT adapter weights (e.g. {ckpt_lora[0]!r}), but the model has no "
                "adapter layers: load_state_dict cannot apply an adapter",
            )
        ]
    if model_lora and not ckpt_lora and shapes:
        return [
            finding(
                "base_weights_into_peft_model",
                "the model carries PEFT adapter layers but the state dict holds only plain base-model weights",
            )
        ]
    return []
