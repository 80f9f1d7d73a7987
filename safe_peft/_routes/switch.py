"""The switch for code you do not own: peft's and transformers' adapter-loading entry points through safe_peft.

Under :func:`patch` (the whole process, until :func:`unpatch`) or inside ``with patched():`` (the current thread or
asyncio task), these go through safe_peft, strict and atomic, with an :class:`~safe_peft.AdapterLoadError` on any
failure:

* ``PeftModel.from_pretrained(model, path, ...)`` -> :func:`~safe_peft.safe_load_adapter`;
* ``peft_model.load_adapter(path, name, ...)`` -> a further adapter (a new name) or, for a name the model has, the
  checkpoint's weights written into that adapter (``replace="weights"``): what the transformers ``Trainer``'s resume
  from a PEFT checkpoint and its ``load_best_model_at_end`` call;
* transformers' ``model.load_adapter(path, ...)`` (also reached from ``AutoModelFor*.from_pretrained(adapter_dir)``)
  -> :func:`~safe_peft.safe_load_adapter_inplace`.

Return values are the plain functions' own. Calls the switch cannot check are passed on unchanged: an adapter given
as a state dict (``adapter_state_dict=``), transformers' ``hotswap=True``, and ``PeftModel.from_pretrained`` of a
model that is already a PeftModel. Outside the switch, and in other threads while only a ``with patched():`` block is
active, every function behaves exactly as before: the wrappers call the original, which :func:`unpatch` (or leaving
the last block) puts back (the very objects: ``PeftModel.load_adapter is original``).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from safe_peft._load.plain_calls import in_plain_call
from safe_peft._plan.options import LoadOptions

__all__ = ["SwitchSettings", "is_patched", "patch", "patched", "unpatch"]


@dataclass(frozen=True)
class SwitchSettings:
    """The options every routed call gets (the plain calls have no place for them)."""

    remap: object = None
    repair: tuple[str, ...] = ()
    strict: bool = True
    allow_pickle: bool = False

    def options(self) -> dict[str, Any]:
        return {"remap": self.remap, "repair": self.repair, "strict": self.strict, "allow_pickle": self.allow_pickle}


_LOCK = threading.RLock()
_HOLDERS = 0  # active `with patched()` blocks, plus one for patch()
_PROCESS: SwitchSettings | None = None
_CONTEXT: ContextVar[SwitchSettings | None] = ContextVar("safe_peft_switch", default=None)
_INSTALLED: list[tuple[type, str, Any, Any]] = []  # (owner, attribute, original __dict__ entry, our wrapper)


def patch(
    *, remap: object = None, repair: tuple[str, ...] | list[str] = (), strict: bool = True, allow_pickle: bool = False
) -> None:
    """Route peft's and transformers' adapter loading through safe_peft in the whole process.

    It lasts until :func:`unpatch`. It is for code you do not own, such as trainers and third-party helpers:
    their ``PeftModel.from_pretrained`` and ``model.load_adapter`` calls become strict, atomic and explained.
    Where plain peft raises another builtin class (a ``ValueError``, ...), the error is also one. Calling it again
    replaces the options.

    :param remap: as in :func:`safe_load_adapter`, for every routed call: for example ``"auto"`` for checkpoints
        whose keys a built-in rule fixes exactly.
    :param repair: as in :func:`safe_load_adapter`, for every routed call.
    :param strict: as in :func:`safe_load_adapter`, for every routed call.
    :param allow_pickle: as in :func:`safe_load_adapter`, for every routed call.

    ```python
    >>> patch(remap="auto")
    >>> is_patched()
    True
    >>> unpatch()

    ```
    """
    global _PROCESS, _HOLDERS
    settings = SwitchSettings(remap, tuple(repair), strict, allow_pickle)
    with _LOCK:
        if _PROCESS is None:
            _HOLDERS += 1
            _install()
        _PROCESS = settings


def unpatch() -> None:
    """Undo :func:`patch`.

    The original functions are back once no ``with patched()`` block is active either. Without a :func:`patch`
    it does nothing.

    ```python
    >>> patch()
    >>> unpatch()
    >>> is_patched()
    False

    ```
    """
    global _PROCESS, _HOLDERS
    with _LOCK:
        if _PROCESS is None:
            return
        _PROCESS = None
        _HOLDERS -= 1
        if _HOLDERS == 0:
            _uninstall()


@contextlib.contextmanager
def patched(
    *, remap: object = None, repair: tuple[str, ...] | list[str] = (), strict: bool = True, allow_pickle: bool = False
) -> Iterator[None]:
    """Route peft's and transformers' adapter loading through safe_peft within a ``with`` block.

    It applies in this thread, or asyncio task, only: other threads are not affected. Blocks nest; the innermost
    options apply.

    :param remap: as in :func:`patch`.
    :param repair: as in :func:`patch`.
    :param strict: as in :func:`patch`.
    :param allow_pickle: as in :func:`patch`.

    ```python
    >>> from peft import PeftModel
    >>> with patched():
    ...     PeftModel.from_pretrained(other_base, adapter_dir)
    Traceback (most recent call last):
    ...
    safe_peft.errors.AdapterLoadError: Cannot load adapter '...' into LlamaForCausalLM: ...

    ```
    """
    global _HOLDERS
    settings = SwitchSettings(remap, tuple(repair), strict, allow_pickle)
    with _LOCK:
        _HOLDERS += 1
        if _HOLDERS == 1:
            _install()
    token = _CONTEXT.set(settings)
    try:
        yield
    finally:
        _CONTEXT.reset(token)
        with _LOCK:
            _HOLDERS -= 1
            if _HOLDERS == 0:
                _uninstall()


def is_patched() -> bool:
    """Whether a call made here, now, would go through safe_peft (by :func:`patch` or :func:`patched`).

    ```python
    >>> with patched():
    ...     is_patched()
    True
    >>> is_patched()
    False

    ```
    """
    return _settings() is not None


def _settings() -> SwitchSettings | None:
    if in_plain_call():
        return None
    return _CONTEXT.get() or _PROCESS


# -- installing the wrappers -----------------------------------------------------------------------------------


def _targets() -> list[tuple[type, str, Callable[[Any], Any]]]:
    """(owner class, attribute, wrapper factory) for each entry point the installed packages have."""
    found: list[tuple[type, str, Callable[[Any], Any]]] = []
    from peft import PeftModel

    found.append((PeftModel, "from_pretrained", _wrap_from_pretrained))
    found.append((PeftModel, "load_adapter", _wrap_peft_load_adapter))
    try:
        from transformers.integrations.peft import PeftAdapterMixin
    except ImportError:
        return found
    found.append((PeftAdapterMixin, "load_adapter", _wrap_transformers_load_adapter))
    return found


def _install() -> None:
    for owner, name, factory in _targets():
        original = owner.__dict__[name]
        wrapper = factory(original)
        _INSTALLED.append((owner, name, original, wrapper))
        setattr(owner, name, wrapper)


def _uninstall() -> None:
    while _INSTALLED:
        owner, name, original, wrapper = _INSTALLED.pop()
        if owner.__dict__.get(name) is wrapper:  # someone else's patch on top of ours is left to them
            setattr(owner, name, original)


# -- the wrappers ----------------------------------------------------------------------------------------------


def _own_signature(original: Any, name: str) -> inspect.Signature:
    """The signature of peft's (or transformers') own function under ``original``, which may be another library's
    wrapper (telemetry, tracing) installed before the switch: followed through ``__wrapped__`` (``functools.wraps``)
    and through the closure of a generic ``(*args, **kwargs)`` wrapper to the function of the same name it calls."""
    seen: set[int] = set()
    queue = [original]
    while queue:
        function = queue.pop(0)
        function = getattr(function, "__func__", function)  # classmethod, bound method
        if id(function) in seen:
            continue
        seen.add(id(function))
        try:
            signature = inspect.signature(function, follow_wrapped=False)
        except (TypeError, ValueError):
            signature = None
        if signature is not None and not _generic(signature):
            return signature
        if getattr(function, "__wrapped__", None) is not None:
            queue.append(function.__wrapped__)
        for cell in getattr(function, "__closure__", None) or ():
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if callable(value) and getattr(getattr(value, "__func__", value), "__name__", None) == name:
                queue.append(value)
    return inspect.signature(getattr(original, "__func__", original))


def _generic(signature: inspect.Signature) -> bool:
    """``(self, *args, **kwargs)``: a wrapper's signature, which names none of the arguments."""
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return all(p.kind in variadic for p in list(signature.parameters.values())[1:])


_PLAIN = object()  # what a routed call returns for a call the switch cannot check: the original runs instead


def _switched(original: Any, name: str, routed: Callable[[Any, inspect.BoundArguments, SwitchSettings], Any]) -> Any:
    """A wrapper of ``original`` (a plain function taking the instance or class first) that, under the switch, hands
    the bound call to ``routed``; outside it, or when ``routed`` returns :data:`_PLAIN`, the original runs."""
    signature = _own_signature(original, name)

    @functools.wraps(original)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        settings = _settings()
        if settings is not None:
            result = routed(self, signature.bind(self, *args, **kwargs), settings)
            if result is not _PLAIN:
                return result
        return original(self, *args, **kwargs)

    return wrapper


def _wrap_from_pretrained(original: Any) -> Any:
    return classmethod(_switched(original.__func__, "from_pretrained", _from_pretrained))


def _wrap_peft_load_adapter(original: Any) -> Any:
    return _switched(original, "load_adapter", _peft_load_adapter)


def _wrap_transformers_load_adapter(original: Any) -> Any:
    return _switched(original, "load_adapter", _transformers_load_adapter)


def _from_pretrained(cls: Any, bound: inspect.BoundArguments, settings: SwitchSettings) -> Any:
    """``PeftModel.from_pretrained`` -> ``safe_load_adapter`` (a model that is already a PeftModel: plain)."""
    from safe_peft._plan.routes import is_peft_model

    model = bound.arguments.get("model")
    if is_peft_model(model):
        return _PLAIN
    rest = _rest(bound, ("cls", "model", "model_id", "adapter_name"))
    from safe_peft._routes.first_adapter import safe_load_adapter

    name = bound.arguments.get("adapter_name", "default")
    return safe_load_adapter(model, bound.arguments["model_id"], name, **settings.options(), **rest)  # type: ignore[arg-type]


def _peft_load_adapter(self: Any, bound: inspect.BoundArguments, settings: SwitchSettings) -> Any:
    """``peft_model.load_adapter`` -> a further adapter, or a reload for a name the model has."""
    from safe_peft._plan.routes import resolve_route
    from safe_peft._routes.peft_model import run_load

    name = bound.arguments["adapter_name"]
    rest = _rest(bound, ("self", "model_id", "adapter_name"))
    options = LoadOptions(name, replace="weights", peft_kwargs=rest, **settings.options())
    route = resolve_route(self, name, "weights", False)
    return run_load(self, bound.arguments["model_id"], options, route=route).result


def _transformers_load_adapter(self: Any, bound: inspect.BoundArguments, settings: SwitchSettings) -> Any:
    """transformers' ``model.load_adapter`` -> the in-place route (a state dict or a hot-swap: plain)."""
    arguments = bound.arguments
    path = arguments.get("peft_model_id")
    name = arguments.get("adapter_name") or "default"
    hotswap = arguments.get("hotswap", False)
    if hotswap == "auto":
        taken = getattr(self, "_hf_peft_config_loaded", False) and name in getattr(self, "peft_config", {})
        hotswap = bool(getattr(self, "_hotswap_enabled", False) and taken)
    load_config = arguments.get("load_config")
    if path is None and load_config is not None:
        path = getattr(load_config, "pretrained_model_name_or_path", None)
    if path is None or arguments.get("adapter_state_dict") is not None or hotswap:
        return _PLAIN  # not a file-based load safe_peft can check
    rest = _rest(bound, ("self", "peft_model_id", "adapter_name"))
    if "hotswap" in rest:
        rest["hotswap"] = False
    from safe_peft._routes.inplace import run_inplace

    return run_inplace(self, path, LoadOptions(name, peft_kwargs=rest, **settings.options())).result


def _rest(bound: inspect.BoundArguments, taken: tuple[str, ...]) -> dict[str, Any]:
    """The call's other arguments as keywords (``**kwargs`` spread)."""
    rest: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        if name in taken:
            continue
        if bound.signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            rest.update(value)
        else:
            rest[name] = value
    return rest
