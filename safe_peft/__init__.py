"""safe_peft: load PEFT adapters safely.

Strict (every adapter weight loaded, or an error), atomic (a failed load leaves the base
model as it was) and explained (a typed :class:`LoadReport` with ranked causes and the fix).
Heavy dependencies (torch, peft, transformers) are imported only when a function needs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from safe_peft.errors import AdapterFormatError, AdapterLoadError, AdapterNotFoundError
from safe_peft.report import Cause, Diagnosis, LoadReport, MissingKey, SizeMismatch, UnexpectedKey

__version__ = "0.1.0.dev0"

__all__ = [
    "AdapterFormatError",
    "AdapterLoadError",
    "AdapterManifest",
    "AdapterNotFoundError",
    "Cause",
    "Diagnosis",
    "FixReport",
    "LoadReport",
    "MissingKey",
    "RemapRule",
    "SizeMismatch",
    "StampCallback",
    "TargetReport",
    "UnexpectedKey",
    "__version__",
    "check_target",
    "diagnose",
    "fix_adapter",
    "fix_for_target",
    "from_pretrained",
    "inspect_adapter",
    "is_patched",
    "merge_rank_shards",
    "parse_load_error",
    "patch",
    "patched",
    "safe_hotswap_adapter",
    "safe_load_adapter",
    "safe_load_adapter_inplace",
    "safe_load_state_dict",
    "save_adapter",
    "stamp_adapter",
    "unpatch",
]

_LAZY = {
    "safe_load_adapter": "safe_peft._loader",
    "safe_load_state_dict": "safe_peft._state_dict",
    "diagnose": "safe_peft._diagnose",
    "inspect_adapter": "safe_peft._manifest",
    "AdapterManifest": "safe_peft._manifest",
    "fix_adapter": "safe_peft._writer",
    "merge_rank_shards": "safe_peft._merge",
    "parse_load_error": "safe_peft._parse",
    "RemapRule": "safe_peft.rules",
    "check_target": "safe_peft._engines",
    "TargetReport": "safe_peft._engines",
    "fix_for_target": "safe_peft._engine_fix",
    "FixReport": "safe_peft._engine_fix",
    # every route an adapter takes into a model
    "from_pretrained": "safe_peft._auto",
    "safe_load_adapter_inplace": "safe_peft._inplace",
    "safe_hotswap_adapter": "safe_peft._hotswap",
    "patch": "safe_peft._patch",
    "unpatch": "safe_peft._patch",
    "patched": "safe_peft._patch",
    "is_patched": "safe_peft._patch",
    # the base fingerprint (docs/fingerprint.md)
    "stamp_adapter": "safe_peft._stamp",
    "save_adapter": "safe_peft._stamp",
    "StampCallback": "safe_peft._callback",
}

if TYPE_CHECKING:
    from safe_peft._auto import from_pretrained
    from safe_peft._callback import StampCallback
    from safe_peft._diagnose import diagnose
    from safe_peft._engine_fix import FixReport, fix_for_target
    from safe_peft._engines import TargetReport, check_target
    from safe_peft._hotswap import safe_hotswap_adapter
    from safe_peft._inplace import safe_load_adapter_inplace
    from safe_peft._loader import safe_load_adapter
    from safe_peft._manifest import AdapterManifest, inspect_adapter
    from safe_peft._merge import merge_rank_shards
    from safe_peft._parse import parse_load_error
    from safe_peft._patch import is_patched, patch, patched, unpatch
    from safe_peft._stamp import save_adapter, stamp_adapter
    from safe_peft._state_dict import safe_load_state_dict
    from safe_peft._writer import fix_adapter
    from safe_peft.rules import RemapRule


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'safe_peft' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
