"""Stamping: compute the base fingerprint (:mod:`safe_peft._fingerprint.check`) of an adapter's base and store it in the
adapter's safetensors metadata, replacing the weights file atomically (nothing else in the directory is touched).

>>> stamp_adapter("out/adapter", base_model)  # doctest: +SKIP
>>> save_adapter(peft_model, "out/adapter")  # save_pretrained, then stamp  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import TYPE_CHECKING, Any

from safe_peft._fingerprint.check import precision_of, resolve, sample_tensor
from safe_peft._fingerprint.format import KEY, MAX_TENSORS, Fingerprint, FingerprintError, Sampled, grid_for
from safe_peft._model.sharding import is_dtensor

if TYPE_CHECKING:
    from torch import nn

__all__ = ["save_adapter", "saved_adapter_dirs", "stamp_adapter"]

_WRAPPERS = frozenset({"base_layer", "token_adapter", "original_module"})
_PRECISION_ORDER = ("float64", "float32", "float16", "bfloat16", "float8", "int8", "nf4", "fp4")


def stamp_adapter(model_id: str | os.PathLike[str], base_model: nn.Module) -> None:
    """Stamp an adapter with a fingerprint of its base model's weights.

    The fingerprint covers the base weights the adapter modifies. It is stored in the metadata of the adapter's
    ``adapter_model.safetensors`` (key ``safe_peft.base_fingerprint``); the file is replaced atomically. Plain
    peft loads the stamped adapter exactly as before. :func:`safe_load_adapter` and :func:`diagnose` then refuse
    it on a base whose weights differ (``base_weights_differ``).

    :param model_id: a local adapter directory holding ``adapter_model.safetensors``.
    :param base_model: the base the adapter was trained on, with its weights: a bare model, or a ``PeftModel``
        holding the adapter, unmerged.
    :raises ValueError: (:class:`~safe_peft._fingerprint.check.FingerprintError`) for a meta-device or sharded
        base, a base without the adapter's modules, or an adapter that is not a local safetensors file. The file
        is then unchanged.

    ```python
    >>> import shutil
    >>> stamped = shutil.copytree(adapter_dir, os.path.join(tmp, "stamped"))
    >>> stamp_adapter(stamped, base)
    >>> diagnose(base, stamped).ok
    True
    >>> changed = make_base()
    >>> with torch.no_grad():
    ...     changed.model.layers[0].self_attn.q_proj.weight.mul_(2)
    Parameter containing: ...
    >>> diagnose(changed, stamped).primary.code
    'base_weights_differ'

    ```
    """
    from safe_peft._files.safetensors_header import read_header
    from safe_peft._files.source import read_adapter

    source = read_adapter(model_id)
    path = source.files.weights_path
    if source.files.weights_format != "safetensors" or not os.path.isfile(path):
        raise FingerprintError(
            f"{source.location}: only a local adapter_model.safetensors can be stamped (convert a .bin adapter "
            "with `safe-peft fix` first)"
        )
    header = read_header(path)
    stamp = fingerprint_of(base_model, list(header.tensors), where=source.location)
    _write_metadata(path, {KEY: stamp.encode()})
    if read_header(path).metadata.get(KEY) != stamp.encode():  # read back what was written
        raise FingerprintError(f"{path}: the stamp did not read back as written")


def fingerprint_of(base_model: nn.Module, checkpoint_keys: list[str], *, where: str = "") -> Fingerprint:
    """The fingerprint of ``base_model`` for an adapter with these checkpoint keys."""
    tensors = targeted_tensors(base_model, checkpoint_keys)
    if not tensors:
        raise FingerprintError(
            f"{where}: none of the modules the adapter modifies is in {type(base_model).__name__}; stamp it with the "
            "base it was trained on"
        )
    grid = grid_for(len(tensors))
    sampled, precisions = [], set()
    for name, tensor in tensors:
        shape = _global_shape(tensor)
        values = _full_sample(tensor, name, shape, grid, where)
        sampled.append(Sampled(name, shape, values))
        precisions.add(precision_of(tensor))
    coarsest = max(precisions, key=_PRECISION_ORDER.index)
    return Fingerprint(tuple(sampled), grid, coarsest, type(_inner(base_model)).__name__)


def _full_sample(tensor: Any, name: str, shape: tuple[int, ...], grid: int, where: str) -> tuple[float, ...]:
    if is_dtensor(tensor):
        raise FingerprintError(
            f"{where}: {name} is sharded (DTensor); stamp from an unsharded copy of the base (a stamp made so "
            "verifies on the sharded model)"
        )
    values = sample_tensor(tensor, name, shape, grid)
    if values is None or any(v is None for v in values):
        raise FingerprintError(
            f"{where}: {name} holds no values here (meta device or offloaded); stamp with the base's weights loaded "
            "(from_pretrained, not a config-only meta model)"
        )
    return tuple(float(v) for v in values if v is not None)


def targeted_tensors(base_model: nn.Module, checkpoint_keys: list[str]) -> list[tuple[str, Any]]:
    """The base tensors an adapter with these keys modifies or replaces, by their names in the base: each target
    module's own parameters, each saved base tensor's original; thinned to :data:`MAX_TENSORS` by name hash."""
    from safe_peft._keys import base_tensor_name, is_adapter_key, memoised, module_of

    base = _inner(base_model)
    _refuse_merged(base)
    from safe_peft._plan.routes import see_through

    seen = see_through(base)
    params = dict(seen.named_parameters(remove_duplicate=False))
    modules = dict(seen.named_modules(remove_duplicate=False))
    prefix = str(getattr(seen, "base_model_prefix", "") or "")
    names: set[str] = set()
    with memoised():
        for key in checkpoint_keys:
            if is_adapter_key(key):
                module = ".".join(s for s in module_of(key).split(".") if s not in _WRAPPERS)
                found = resolve(modules, module, prefix)
                if found is not None:
                    names.update(f"{found}.{n}" for n, _ in modules[found].named_parameters(recurse=False))
            else:
                found = resolve(params, base_tensor_name(key), prefix)
                if found is not None:
                    names.add(found)
    chosen = sorted(n for n in names if params[n].dim() >= 1 and params[n].numel() > 0)
    if len(chosen) > MAX_TENSORS:
        chosen = sorted(sorted(chosen, key=lambda n: hashlib.sha256(n.encode()).digest())[:MAX_TENSORS])
    return [(n, params[n]) for n in chosen]


def _inner(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) and hasattr(model, "peft_config") else model


def _refuse_merged(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if getattr(module, "merged_adapters", None):
            raise FingerprintError(
                f"{name}: holds a merged adapter, so its base weights are not the base's; call unmerge_adapter() "
                "before stamping"
            )


def _global_shape(tensor: Any) -> tuple[int, ...]:
    state = getattr(tensor, "quant_state", None)
    if type(tensor).__name__ == "Params4bit" and state is not None:
        return tuple(int(d) for d in state.shape)
    return tuple(int(d) for d in tensor.shape)


def _write_metadata(path: str, entries: dict[str, str]) -> None:
    """Rewrite the header of a safetensors file with ``entries`` added to ``__metadata__``; the data region is
    copied byte for byte (tensor offsets are relative to it). Atomic: :func:`safe_peft._fix.writer.replace_file`."""
    from safe_peft._fix.writer import replace_file

    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))  # validated by read_header before
    metadata = {**header.pop("__metadata__", {}), **entries}
    text = json.dumps({"__metadata__": metadata, **header}, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors aligns the data region to 8 bytes

    def write(out: Any) -> None:
        out.write(struct.pack("<Q", len(text)))
        out.write(text)
        with open(path, "rb") as src:
            src.seek(8 + length)
            while chunk := src.read(1 << 24):
                out.write(chunk)

    replace_file(path, write)


def save_adapter(peft_model: nn.Module, save_directory: str | os.PathLike[str], **kwargs: Any) -> None:
    """Save a ``PeftModel``'s adapters and stamp each with the base fingerprint.

    It calls ``peft_model.save_pretrained(save_directory, **kwargs)``, then stamps every adapter it wrote with the
    model's own base weights (see :func:`stamp_adapter`).

    :param peft_model: a ``PeftModel`` on an unsharded base, unmerged.
    :param save_directory: where ``save_pretrained`` writes.
    :param kwargs: ``**kwargs`` go to ``save_pretrained`` unchanged (``selected_adapters``, ...).
    :raises ValueError: as :func:`stamp_adapter` does.

    ```python
    >>> peft_model = safe_load_adapter(make_base(), adapter_dir)
    >>> save_adapter(peft_model, os.path.join(tmp, "saved"))
    >>> diagnose(base, os.path.join(tmp, "saved")).ok
    True

    ```
    """
    peft_model.save_pretrained(save_directory, **kwargs)  # type: ignore[operator]
    for directory in saved_adapter_dirs(peft_model, os.fspath(save_directory), kwargs.get("selected_adapters")):
        stamp_adapter(directory, peft_model)


def saved_adapter_dirs(peft_model: nn.Module, directory: str, selected: Any = None) -> list[str]:
    """Where ``save_pretrained`` put each adapter: ``directory`` for ``default``, ``directory/<name>`` otherwise."""
    names = list(selected) if selected else list(getattr(peft_model, "peft_config", {}) or {})
    out = []
    for name in names:
        where = directory if name == "default" else os.path.join(directory, name)
        if os.path.isfile(os.path.join(where, "adapter_model.safetensors")):
            out.append(where)
    return out
