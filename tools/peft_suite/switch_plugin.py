"""pytest plugin for ``make peft-suite``: runs peft's own tests as peft's repository runs them, with the switch on
when ``SAFE_PEFT_SUITE_SWITCH=1`` (and ``allow_pickle=True`` when ``SAFE_PEFT_SUITE_ALLOW_PICKLE=1``).

peft's ``tests/conftest.py`` is not in the sdist; what it does for a CPU run (skip the ``regression`` tests) is done
here. ``datasets`` and ``diffusers`` are imported at the top of peft's test helpers but used only by tests that
download from the hub (which fail in both runs here, offline); where they are not installed, empty stand-ins let
the files import. The run is offline: every connection attempt fails at once (peft's ``hub_online_once`` turns
the hub's offline mode off for a model's first use, and a connection that is never answered would wait for its
timeout, and the hub client's retries would sleep between attempts: they do not wait here).
"""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
import time
import types
from typing import Any

import pytest


def _stand_in(name: str, **attributes: Any) -> None:
    if importlib.util.find_spec(name) is not None:
        return
    module = types.ModuleType(name)
    for key, value in attributes.items():
        setattr(module, key, value)
    sys.modules[name] = module


def _needs_the_hub(*args: Any, **kwargs: Any) -> Any:
    raise OSError("not installed for make peft-suite: this test needs the hub")


def _offline(*args: Any, **kwargs: Any) -> Any:
    raise OSError("make peft-suite runs offline")


class _NoWait(types.ModuleType):
    """``time`` for the hub client's retry loop, without its waits."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        pass


def pytest_configure(config: pytest.Config) -> None:
    socket.socket.connect = _offline  # type: ignore[method-assign]
    socket.create_connection = _offline
    from huggingface_hub.utils import _http

    _http.time = _NoWait("time")  # type: ignore[attr-defined]
    _stand_in("datasets", load_dataset=_needs_the_hub)
    _stand_in("diffusers", StableDiffusionPipeline=type("StableDiffusionPipeline", (), {}))
    for marker in ("regression", "single_gpu_tests", "multi_gpu_tests", "bitsandbytes"):
        config.addinivalue_line("markers", f"{marker}: peft's marker")
    if os.environ.get("SAFE_PEFT_SUITE_SWITCH") == "1":
        import safe_peft

        safe_peft.patch(allow_pickle=os.environ.get("SAFE_PEFT_SUITE_ALLOW_PICKLE") == "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="peft's regression tests need --regression")
    for item in items:
        if "regression" in item.keywords:
            item.add_marker(skip)
