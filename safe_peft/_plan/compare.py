"""Compare a checkpoint's keys and shapes with what the model expects. Pure: no torch."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from safe_peft._keys import ANY, Shape
from safe_peft._model.view import ExpectedKey
from safe_peft.report import MissingKey, SizeMismatch, UnexpectedKey

__all__ = ["KeyDiff", "compare_keys", "shape_fits"]


def shape_fits(have: Shape, want: Shape) -> bool:
    """The checkpoint's shape is the expected one (dimensions marked ``ANY`` match any size)."""
    if have == want:
        return True
    return ANY in want and len(have) == len(want) and all(w == ANY or h == w for h, w in zip(have, want, strict=True))


@dataclass(frozen=True)
class KeyDiff:
    """The three ways a checkpoint and a model can disagree, in checkpoint key order."""

    missing: list[MissingKey]
    unexpected: list[UnexpectedKey]
    size_mismatches: list[SizeMismatch]

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.size_mismatches)


def compare_keys(checkpoint: Mapping[str, Shape], expected: Mapping[str, ExpectedKey]) -> KeyDiff:
    """Missing = required expected keys absent; unexpected = checkpoint keys the model does not take."""
    unexpected = []
    mismatches = []
    for key, shape in checkpoint.items():
        want = expected.get(key)
        if want is None:
            unexpected.append(UnexpectedKey(key, tuple(shape)))
        elif not shape_fits(tuple(shape), want.shape):
            mismatches.append(SizeMismatch(key, tuple(shape), want.shape))
    missing = [MissingKey(k, e.shape) for k, e in expected.items() if e.required and k not in checkpoint]
    return KeyDiff(missing, unexpected, mismatches)
