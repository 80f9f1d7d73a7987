"""Walks of a module tree: the modules ``nn.Module.modules()`` / ``named_modules()`` yield, in the same order, as
lists built without recursion (and without names when none are asked for). The checks walk the whole model several
times per load; torch's recursive generators cost about twice as much. A tree with a module whose class walks its
own way (overrides ``named_modules``) is walked by torch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

__all__ = ["distinct_tensors", "every_module", "every_parameter", "named_modules", "named_paths"]


def every_module(model: nn.Module) -> list[nn.Module]:
    """``list(model.modules())``: each module once, at its first place."""
    seen: set[int] = set()
    out = []
    stack = [model]
    while stack:
        module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        if _walks_itself(module):
            return list(model.modules())
        out.append(module)
        stack.extend(reversed([c for c in module._modules.values() if c is not None]))
    return out


def named_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``list(model.named_modules())``: each module once, at its first path."""
    return _named(model, remove_duplicate=True)


def every_parameter(model: nn.Module) -> list[nn.Parameter]:
    """``list(model.parameters())``: each parameter once."""
    return distinct_tensors(every_module(model), "_parameters")


def distinct_tensors(modules: list[nn.Module], kind: str, seen: set[int] | None = None) -> list[Any]:
    """The tensors in each module's own ``kind`` dict (``"_parameters"`` or ``"_buffers"``), each once, in order;
    ``seen``: ids already taken (it is updated), to take each tensor once across calls."""
    seen = set() if seen is None else seen
    out = []
    for module in modules:
        for tensor in getattr(module, kind).values():
            if tensor is not None and id(tensor) not in seen:
                seen.add(id(tensor))
                out.append(tensor)
    return out


def named_paths(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``list(model.named_modules(remove_duplicate=False))``: every path to every module (``state_dict``'s view)."""
    return _named(model, remove_duplicate=False)


def _named(model: nn.Module, *, remove_duplicate: bool) -> list[tuple[str, nn.Module]]:
    seen: set[int] = set()
    out = []
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        prefix, module = stack.pop()
        if remove_duplicate:
            if id(module) in seen:
                continue
            seen.add(id(module))
        if _walks_itself(module):
            return list(model.named_modules(remove_duplicate=remove_duplicate))
        out.append((prefix, module))
        children = module._modules
        if children:
            dot = prefix + "." if prefix else ""
            stack.extend(reversed([(dot + name, c) for name, c in children.items() if c is not None]))
    return out


_OWN_WALK: dict[type, bool] = {}


def _walks_itself(module: nn.Module) -> bool:
    kind = type(module)
    found = _OWN_WALK.get(kind)
    if found is None:
        from torch import nn

        own = kind.named_modules is not nn.Module.named_modules or kind.modules is not nn.Module.modules
        found = _OWN_WALK[kind] = own
    return found
