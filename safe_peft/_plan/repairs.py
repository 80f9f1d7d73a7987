"""Opt-in config repairs: each rebuilds one part of the adapter config from the checkpoint.

A repair runs only when named in ``repair=``; each returns a description of the change
(old and new values) for ``LoadReport.repairs``. None touches the model; ``"vocab"`` only
records the size the loader resizes the embeddings to.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from safe_peft._keys import Role, Shape, module_of, rank_axis, role_of
from safe_peft._model.view import ExpectedKey, ModelView

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "KNOWN_REPAIRS",
    "changed_fields",
    "rank_relaxed",
    "repair_config",
    "resized_view",
    "vocab_rows",
    "vocab_target",
]

KNOWN_REPAIRS = ("rank", "dora", "targets", "vocab", "config", "legacy")  # "legacy": see safe_peft._files.legacy
# "config" (drop config keys the installed peft does not know, refusing meaning-changing ones) is what every
# load does anyway, since plain peft drops them too; the name is accepted so that asking for it is explicit.


def repair_config(
    config: Any, names: tuple[str, ...], checkpoint: Mapping[str, Shape], module_names: frozenset[str] = frozenset()
) -> tuple[Any, list[str]]:
    """Apply the config repairs in ``names``; return a new config and what changed."""
    unknown = [n for n in names if n not in KNOWN_REPAIRS]
    if unknown:
        raise ValueError(f"unknown repair {unknown[0]!r}; known: {', '.join(KNOWN_REPAIRS)}")
    new = copy.deepcopy(config)
    done: list[str] = []
    if "targets" in names:
        modules = sorted({module_of(k) for k in checkpoint if role_of(k) is Role.A})
        if modules and set(modules) != set(_as_list(new.target_modules)):
            done.append(f"targets: target_modules {_show(new.target_modules)} -> {modules}")
            new.target_modules = modules
        heads = sorted(
            {m for k in checkpoint if role_of(k) is None and (m := module_of(k)) in module_names} - set(modules)
        )
        if heads and set(heads) != set(_as_list(new.modules_to_save)):
            done.append(f"targets: modules_to_save {_show(new.modules_to_save)} -> {heads}")
            new.modules_to_save = heads
    if "rank" in names:
        ranks = {module_of(k): s[0] for k, s in checkpoint.items() if role_of(k) is Role.A and s}
        if ranks:
            r = Counter(ranks.values()).most_common(1)[0][0]
            pattern = {m: v for m, v in sorted(ranks.items()) if v != r}
            if r != new.r or pattern != dict(new.rank_pattern or {}):
                done.append(f"rank: r {new.r} -> {r}, rank_pattern {dict(new.rank_pattern or {})} -> {pattern}")
                new.r, new.rank_pattern = r, pattern
    has_magnitudes = any(role_of(k) is Role.MAGNITUDE for k in checkpoint)
    if "dora" in names and not getattr(new, "use_dora", False) and has_magnitudes:
        done.append("dora: use_dora False -> True (the checkpoint holds DoRA magnitude vectors)")
        new.use_dora = True
    return new, done


def vocab_target(view: ModelView, checkpoint: Mapping[str, Shape]) -> int | None:
    """The vocabulary size the checkpoint's embedding tensors were saved with, if it differs."""
    for key, want in view.expected.items():
        have = checkpoint.get(key)
        if have is None or have == want.shape or len(have) != len(want.shape):
            continue
        layer = view.layers.get(want.module)
        if want.role is Role.A and layer is not None and layer.kind == "embedding":
            return have[1]
        if want.role in (Role.BASE_EMBEDDING, Role.SAVED_MODULE) and have[1:] == want.shape[1:]:
            return have[0]
    return None


def rank_relaxed() -> Any:
    """The shape check of ``repair=("rank",)``: LoRA tensors may differ in their rank dimension only."""

    def same(key: str, have: Shape, want: Shape) -> bool:
        if have == want:
            return True
        rank_dim = rank_axis(role_of(key))
        if len(have) != len(want) or rank_dim is None:
            return False
        return all(a == b for i, (a, b) in enumerate(zip(have, want, strict=False)) if i != rank_dim)

    return same


def vocab_rows(model: nn.Module) -> int | None:
    getter = getattr(model, "get_input_embeddings", None)
    layer = getter() if callable(getter) else None
    weight = getattr(layer, "weight", None)
    return int(weight.shape[0]) if weight is not None else None


def changed_fields(config: Any) -> dict[str, Any]:
    return {k: getattr(config, k) for k in ("r", "rank_pattern", "use_dora", "target_modules", "modules_to_save")}


def resized_view(view: ModelView, checkpoint: Mapping[str, Shape], vocab: int) -> ModelView:
    """The view after ``resize_token_embeddings(vocab)``: vocabulary-sized dims take the new size."""
    expected: dict[str, ExpectedKey] = {}
    for key, want in view.expected.items():
        have = checkpoint.get(key)
        if have is not None and len(have) == len(want.shape) and have != want.shape:
            dims = [h if (h == vocab and w != h) else w for h, w in zip(have, want.shape, strict=False)]
            want = replace(want, shape=tuple(dims))
        expected[key] = want
    return replace(view, expected=expected)


def _as_list(value: Any) -> list[str]:
    if isinstance(value, str) or value is None:
        return [] if value is None else [value]
    return [str(v) for v in value]


def _show(value: object) -> object:
    return sorted(value) if isinstance(value, (set, frozenset)) else value
