"""``inspect_adapter``: what an adapter holds, from its config and safetensors header only."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from safe_peft._files.config import AdapterConfig, read_config
from safe_peft._files.locate import locate_adapter
from safe_peft._files.safetensors_header import read_header
from safe_peft._keys import Role, module_of, pattern_value, role_of, strip_prefix
from safe_peft.report import Diagnosis

__all__ = ["AdapterManifest", "dtype_summary", "inspect_adapter"]


@dataclass(frozen=True)
class TensorEntry:
    key: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class AdapterManifest:
    """An adapter's facts, read without loading tensor data.

    :func:`inspect_adapter` builds it; ``to_dict()`` gives JSON-safe data (the CLI's ``inspect --json``).

    :param path: the adapter's directory.
    :param peft_type: the PEFT method, as adapter_config.json names it (``"LORA"``).
    :param peft_version: the peft version that saved it, when the config records one.
    :param task_type: the config's ``task_type`` (``"CAUSAL_LM"``, ...), or None.
    :param base_model_name_or_path: the base model the config names, or None.
    :param target_modules: the config's ``target_modules``, as written (a list or a regex).
    :param modules_to_save: the config's ``modules_to_save``, or None.
    :param config_r: the config's rank ``r``.
    :param ranks: the rank of each module, read from the tensors' shapes.
    :param rank_agrees: whether those ranks agree with ``r`` and ``rank_pattern``.
    :param tensors: every tensor's key, shape and dtype.
    :param parameters: the number of adapter parameters.
    :param total_bytes: the size of the tensor data.
    :param weights_format: ``"safetensors"`` or ``"pickle"``.
    :param read_data: True when tensor data was read: a pickle (allowed with ``allow_pickle=True``) has no header.
    :param warnings: findings about the files that do not stop a load.

    ```python
    >>> manifest = inspect_adapter(adapter_dir)
    >>> manifest.config_r, manifest.rank_agrees, manifest.parameters, manifest.read_data
    (8, True, 4096, False)

    ```
    """

    path: str
    peft_type: str
    peft_version: str | None
    task_type: str | None
    base_model_name_or_path: str | None
    target_modules: Any
    modules_to_save: list[str] | None
    config_r: int | None
    ranks: dict[str, int]
    rank_agrees: bool
    tensors: list[TensorEntry]
    parameters: int
    total_bytes: int
    weights_format: str
    read_data: bool
    warnings: list[Diagnosis] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        from safe_peft._bounds import json_safe

        data = {k: v for k, v in self.__dict__.items() if k not in {"tensors", "warnings"}}
        data["tensors"] = [{"key": t.key, "shape": list(t.shape), "dtype": t.dtype} for t in self.tensors]
        data["warnings"] = [w.to_dict() for w in self.warnings]
        return json_safe(data)  # type: ignore[no-any-return]


def inspect_adapter(
    model_id: str | os.PathLike[str], *, allow_pickle: bool = False, subfolder: str | None = None
) -> AdapterManifest:
    """Read an adapter's config and weights header: type, version, targets, ranks, sizes.

    It reads ``adapter_config.json`` and the safetensors header only, so it needs no torch and no model.
    A pickle adapter has no header: it is refused unless ``allow_pickle=True``, and then its tensors are read
    with ``torch.load(weights_only=True)`` and ``read_data`` says so.

    :param model_id: a local adapter directory, or a hub id when online.
    :param allow_pickle: read a ``.bin`` adapter (``torch.load(weights_only=True)`` only).
    :param subfolder: the adapter's folder inside ``model_id``, as peft's ``subfolder``.
    :returns: the :class:`AdapterManifest`.
    :raises AdapterFormatError: when a file is unreadable, malformed or a refused pickle
        (:class:`AdapterNotFoundError` when there is no adapter there).

    ```python
    >>> manifest = inspect_adapter(adapter_dir)
    >>> manifest.peft_type, manifest.config_r, manifest.weights_format
    ('LORA', 8, 'safetensors')
    >>> manifest.ranks["model.layers.0.self_attn.q_proj"]
    8

    ```
    """
    files = locate_adapter(model_id, subfolder=subfolder, allow_pickle=allow_pickle)
    if files.config_path:
        config = read_config(files.config_path, adapter=files.location)
    else:  # a weights file without a PEFT config (a kohya LoRA, say): describe what the header shows
        config = AdapterConfig(path="", data={"peft_type": "UNKNOWN (no adapter_config.json)"})
    if files.weights_format == "safetensors":
        header = read_header(files.weights_path)
        tensors = [TensorEntry(t.name, t.shape, t.dtype) for t in header.tensors.values()]
        total = header.total_bytes
    else:
        from safe_peft._files.pickled import load_pickle

        data = load_pickle(files.weights_path)
        tensors = [TensorEntry(k, tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in data.items()]
        total = sum(v.numel() * v.element_size() for v in data.values())
    ranks = {module_of(t.key): t.shape[0] for t in tensors if role_of(t.key) is Role.A and t.shape}
    cfg = config.data
    if files.config_path:  # the values read as every surface reads them: a summary of what peft cannot load says so
        from safe_peft._files.config_values import check_config

        names = sorted({*ranks, *(strip_prefix(t.key) for t in tensors)})
        check_config(cfg, names, path=files.config_path, adapter=files.location)
    pattern = cfg.get("rank_pattern") or {}
    agrees = all(r == pattern_value(pattern, m, cfg.get("r", 8)) for m, r in ranks.items())
    parameters = 0
    for t in tensors:
        n = 1
        for d in t.shape:
            n *= d
        parameters += n
    return AdapterManifest(
        path=files.location,
        peft_type=config.peft_type,
        peft_version=config.peft_version,
        task_type=cfg.get("task_type"),
        base_model_name_or_path=cfg.get("base_model_name_or_path"),
        target_modules=cfg.get("target_modules"),
        modules_to_save=cfg.get("modules_to_save"),
        config_r=cfg.get("r"),
        ranks=ranks,
        rank_agrees=agrees,
        tensors=tensors,
        parameters=parameters,
        total_bytes=total,
        weights_format=files.weights_format,
        read_data=files.weights_format != "safetensors",
        warnings=list(files.warnings) + list(config.warnings),
    )


def dtype_summary(manifest: AdapterManifest) -> dict[str, int]:
    """How many tensors of each dtype."""
    return dict(Counter(t.dtype for t in manifest.tensors))
