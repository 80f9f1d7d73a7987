"""pytest plugin (entry point ``pytest11``): the ``assert_adapter_loads`` fixture.

Loaded by pytest at start-up, so it imports nothing heavy until the fixture is used.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest


@pytest.fixture
def assert_adapter_loads() -> Callable[..., Any]:
    """``assert_adapter_loads(base_model, adapter_dir, **kwargs)``: the loaded PeftModel, or a test failure
    whose message is safe_peft's report (cause, fix, key sample) instead of a wall of keys."""
    from safe_peft.testing import assert_adapter_loads as check

    return check
