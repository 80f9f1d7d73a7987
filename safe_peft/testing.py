"""Helpers for downstream test suites."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from safe_peft.errors import AdapterLoadError

if TYPE_CHECKING:
    from torch import nn

__all__ = ["assert_adapter_loads"]


def assert_adapter_loads(base_model: nn.Module, model_id: str | os.PathLike[str], **kwargs: Any) -> Any:
    """Load the adapter strictly; fail the test with the report's explanation, not a wall of keys.

    Returns the loaded PeftModel. Keyword arguments go to :func:`safe_peft.safe_load_adapter`.
    """
    from safe_peft._routes.first_adapter import safe_load_adapter

    __tracebackhide__ = True
    try:
        return safe_load_adapter(base_model, model_id, **kwargs)
    except AdapterLoadError as exc:
        raise AssertionError(str(exc)) from None
