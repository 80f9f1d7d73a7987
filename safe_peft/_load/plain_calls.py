"""The calls the switch (:func:`safe_peft.patch`) leaves alone: those safe_peft itself makes into peft and
transformers, which must reach the plain functions. Standard library only: every loader imports it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

__all__ = ["in_plain_call", "plain_calls"]

_PLAIN: ContextVar[bool] = ContextVar("safe_peft_plain_calls", default=False)


@contextlib.contextmanager
def plain_calls() -> Iterator[None]:
    """Within this block (this thread or task), peft's and transformers' entry points run as they are."""
    token = _PLAIN.set(True)
    try:
        yield
    finally:
        _PLAIN.reset(token)


def in_plain_call() -> bool:
    """Whether the current call comes from safe_peft itself."""
    return _PLAIN.get()
