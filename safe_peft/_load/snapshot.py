"""Take a model back to how it was: the undo behind atomic loading.

peft injects adapters by replacing submodules, adding attributes (``peft_config``), freezing parameters and
registering hooks. All of that lives in module ``__dict__``s and in the dicts, lists and sets inside them (a tuner's
``targeted_module_names`` grows in place when a further adapter is added), so a shallow record of those (no tensor
data) is enough to undo it. Tensors can also change under an unchanged module tree:

* their ``.data`` swapped (PiSSA / OLoRA re-initialisation, ``resize_token_embeddings``): the record keeps each
  parameter's and buffer's data *by reference* (no copy), and puts it back;
* written in place (base biases and embeddings saved with the adapter, loaded by ``copy_``): those tensors are
  cloned first with :meth:`ModuleSnapshot.protect`.

:meth:`ModuleSnapshot.restore` is idempotent and finishes even when a second ``KeyboardInterrupt`` arrives while it
runs (the interrupt is re-raised once everything is back).

:class:`ValueSnapshot` is the same undo for the routes that only write into tensors that are there (a reload or
hot-swap copied into the loaded adapter): clones of those tensors, every module's ``training`` flag and the few dicts
the route sets, at a fraction of the cost; the route decides, from its plan, that nothing else can change.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from safe_peft._model.walk import distinct_tensors, every_module

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["ModuleSnapshot", "ValueSnapshot"]

_CONTAINERS = (dict, list, set)  # each has .copy(), shallow and of its own type; an empty one is recorded as None


class _Undo:
    """What every record shares: clones of the tensors a load overwrites in place, and an interrupt-proof restore."""

    _values: list[tuple[torch.Tensor, torch.Tensor]]

    def protect(self, tensors: list[torch.Tensor]) -> None:
        """Clone tensors a load will overwrite in place, so that :meth:`restore` can put them back."""
        self._values.extend((t, t.detach().clone()) for t in tensors if t.device.type != "meta")

    def restore(self) -> None:
        """Put everything recorded back (interrupt-proof: a second Ctrl-C meanwhile is re-raised after)."""
        interrupted: BaseException | None = None
        while True:
            try:
                self._restore()
                break
            except KeyboardInterrupt as exc:  # a second Ctrl-C while undoing: finish the undo first
                interrupted = exc
        if interrupted is not None:
            raise interrupted

    def _restore(self) -> None:
        raise NotImplementedError

    def _put_values_back(self) -> None:
        import torch

        with torch.no_grad():
            for tensor, saved in self._values:
                tensor.copy_(saved)


class ModuleSnapshot(_Undo):
    """A record of every module's attributes, each tensor's data (by reference), ``requires_grad`` and the config.

    Kept in flat lists, and only the containers that hold something are copied (an empty one is emptied again on
    restore): a load's record of a whole model is a few thousand objects, not tens of thousands, which matters
    beyond its own time because every garbage collection during the load walks them."""

    def __init__(self, model: nn.Module) -> None:
        modules = every_module(model)
        self._modules = modules
        self._states = [module.__dict__.copy() for module in modules]
        filled: list[Any] = []  # container, its copy, container, its copy, ... (non-empty ones only)
        is_container: dict[type, bool] = {}  # issubclass(kind, _CONTAINERS), per type: a module holds a handful
        for state in self._states:
            for value in state.values():
                kind = type(value)
                found = is_container.get(kind)
                if found is None:
                    found = is_container[kind] = issubclass(kind, _CONTAINERS)
                if found and value:
                    filled.append(value)
                    filled.append(value.copy())
        self._filled = filled
        self._is_container = is_container
        seen: set[int] = set()  # parameters then buffers, each once; data by reference, flags of parameters
        tensors: list[torch.Tensor] = distinct_tensors(modules, "_parameters", seen)
        self._params = len(tensors)
        tensors += distinct_tensors(modules, "_buffers", seen)
        self._tensors = tensors
        self._data = [tensor.data for tensor in tensors]
        self._grads = [tensor.requires_grad for tensor in tensors[: self._params]]
        config = getattr(model, "config", None)
        self._config = (config, dict(config.__dict__)) if hasattr(config, "__dict__") else None
        self._values = []

    def _restore(self) -> None:
        import torch

        is_container = self._is_container
        for state in self._states:  # every container emptied, then the ones that held something refilled
            for value in state.values():
                if is_container.get(type(value)):
                    value.clear()
        filled = self._filled
        for i in range(0, len(filled), 2):
            original, items = filled[i], filled[i + 1]
            if isinstance(original, list):
                original[:] = items
            else:
                original.clear()
                original.update(items)
        for module, state in zip(self._modules, self._states, strict=True):
            module.__dict__.clear()
            module.__dict__.update(state)
        with torch.no_grad():
            for tensor, data in zip(self._tensors, self._data, strict=True):
                now = tensor.data
                if now.shape != data.shape or now.dtype != data.dtype or now.data_ptr() != data.data_ptr():
                    tensor.data = data
        self._put_values_back()
        for param, requires_grad in zip(self._tensors, self._grads, strict=False):  # the first _params tensors
            param.requires_grad_(requires_grad)
        if self._config is not None:
            config, state = self._config
            config.__dict__.clear()
            config.__dict__.update(state)


class ValueSnapshot(_Undo):
    """The undo of a load that only writes tensors in place, sets train / eval mode and sets entries of a few dicts
    (a reload or hot-swap into the tensors of an adapter that is there, nothing injected): clones of those tensors,
    every module's ``training`` flag and copies of those dicts (``dicts``: a hot-swap's per-layer scalings).
    The same interface as :class:`ModuleSnapshot`, at a fraction of its cost; used only where the route itself
    guarantees that nothing else changes."""

    def __init__(self, model: nn.Module, dicts: Sequence[dict[str, Any]] = (), *, modes: bool = True) -> None:
        self._training = [(m, m.training) for m in every_module(model)] if modes else []  # modes=False: none is set
        self._dicts = [(d, dict(d)) for d in dicts]
        self._values = []

    def _restore(self) -> None:
        self._put_values_back()
        for module, training in self._training:
            module.training = training
        for original, items in self._dicts:
            original.clear()
            original.update(items)
