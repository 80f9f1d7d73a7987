"""The caller's options of one load, taken once at a public entry point: what the plan reads (``remap``, ``repair``,
``allow_pickle``, ``verify_base``, peft's own arguments) and how the load goes (``strict``, ``replace``, ...)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = ["LoadOptions"]


@dataclass(frozen=True)
class LoadOptions:
    """One call's options. ``peft_kwargs`` is a read-only copy: the caller's dict is never changed, and each use
    takes its own ``dict(options.peft_kwargs)``."""

    adapter_name: str = "default"
    remap: object = None
    repair: tuple[str, ...] = ()
    strict: bool = True
    allow_pickle: bool = False
    output_loading_info: bool = False
    replace: object = False  # a name already taken: False (refused), True (a new adapter), "weights" (a reload)
    collective_timeout: float | None = None  # seconds a sharded load waits for the other ranks (None: 600)
    verify_base: bool = True  # False: a stamped adapter's base fingerprint is not compared (docs/fingerprint.md)
    peft_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.verify_base, bool):
            raise TypeError(f"verify_base must be True or False, not {self.verify_base!r}")
        object.__setattr__(self, "repair", tuple(self.repair))
        object.__setattr__(self, "peft_kwargs", MappingProxyType(dict(self.peft_kwargs)))

    def returned(self, model: Any, report: Any) -> Any:
        """What a public entry point returns: the model, or ``(model, report)`` with ``output_loading_info``."""
        return (model, report) if self.output_loading_info else model
