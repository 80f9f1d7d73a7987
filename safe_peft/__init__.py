"""safe_peft: load PEFT adapters safely.

Strict (every adapter weight loaded, or an error), atomic (a failed load leaves the base
model as it was) and explained (a typed :class:`LoadReport` with ranked causes and the fix).
Heavy dependencies (torch, peft, transformers) are imported only when a function needs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from safe_peft._versions import SAFE_PEFT_VERSION as __version__
from safe_peft.errors import AdapterFormatError, AdapterLoadError, AdapterNotFoundError
from safe_peft.report import Cause, Diagnosis, LoadReport, MissingKey, SizeMismatch, UnexpectedKey

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
    "safe_load_adapter": "safe_peft._routes.first_adapter",
    "safe_load_state_dict": "safe_peft._routes.state_dict",
    "diagnose": "safe_peft._routes.diagnose",
    "inspect_adapter": "safe_peft._files.manifest",
    "AdapterManifest": "safe_peft._files.manifest",
    "fix_adapter": "safe_peft._fix.writer",
    "merge_rank_shards": "safe_peft._fix.merge_ranks",
    "parse_load_error": "safe_peft._plan.parse_error",
    "RemapRule": "safe_peft.rules",
    "check_target": "safe_peft._engines.check",
    "TargetReport": "safe_peft._engines.check",
    "fix_for_target": "safe_peft._engines.fix",
    "FixReport": "safe_peft._engines.fix",
    # every route an adapter takes into a model
    "from_pretrained": "safe_peft._routes.auto",
    "safe_load_adapter_inplace": "safe_peft._routes.inplace",
    "safe_hotswap_adapter": "safe_peft._routes.hotswap",
    "patch": "safe_peft._routes.switch",
    "unpatch": "safe_peft._routes.switch",
    "patched": "safe_peft._routes.switch",
    "is_patched": "safe_peft._routes.switch",
    # the base fingerprint (docs/fingerprint.md)
    "stamp_adapter": "safe_peft._fingerprint.stamp",
    "save_adapter": "safe_peft._fingerprint.stamp",
    "StampCallback": "safe_peft._fingerprint.callback",
}

if TYPE_CHECKING:
    from safe_peft._engines.check import TargetReport, check_target
    from safe_peft._engines.fix import FixReport, fix_for_target
    from safe_peft._files.manifest import AdapterManifest, inspect_adapter
    from safe_peft._fingerprint.callback import StampCallback
    from safe_peft._fingerprint.stamp import save_adapter, stamp_adapter
    from safe_peft._fix.merge_ranks import merge_rank_shards
    from safe_peft._fix.writer import fix_adapter
    from safe_peft._plan.parse_error import parse_load_error
    from safe_peft._routes.auto import from_pretrained
    from safe_peft._routes.diagnose import diagnose
    from safe_peft._routes.first_adapter import safe_load_adapter
    from safe_peft._routes.hotswap import safe_hotswap_adapter
    from safe_peft._routes.inplace import safe_load_adapter_inplace
    from safe_peft._routes.state_dict import safe_load_state_dict
    from safe_peft._routes.switch import is_patched, patch, patched, unpatch
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
