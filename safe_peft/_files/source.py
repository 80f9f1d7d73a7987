"""Read an adapter: the first stage of the flow, and the only one that touches the adapter's files.

:func:`read_adapter` locates the files (a directory, a hub snapshot, a subfolder), reads and checks
``adapter_config.json``, builds the installed peft's config object from it, and reads the weights' keys and shapes
(the safetensors header; a pickle only when allowed). Everything later works on the frozen :class:`AdapterSource`
it returns, and nothing later opens a file again (the writer and the loader read tensor data from
``source.files`` when they need it).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from safe_peft._files.config import AdapterConfig, build_peft_config, read_config
from safe_peft._files.legacy import convert_config, convert_shapes, enabled_parts
from safe_peft._files.locate import AdapterFiles, locate_adapter
from safe_peft._files.pickled import load_pickle
from safe_peft._files.safetensors_header import SafetensorsHeader, read_header
from safe_peft._keys import Shape
from safe_peft.report import Diagnosis

__all__ = ["HUB_KWARGS", "AdapterSource", "read_adapter", "read_checkpoint_shapes"]

HUB_KWARGS = ("subfolder", "revision", "cache_dir", "token", "use_auth_token", "local_files_only")


@dataclass(frozen=True)
class AdapterSource:
    """An adapter as read from its files.

    ``config`` is None for a weights file without a PEFT config (a kohya LoRA, say); then ``header`` holds its
    safetensors header for the foreign-format conversion. ``legacy`` holds the enabled parts of a peft <= 0.2
    MergedLinear adapter being converted (``repair=("legacy",)``), whose ``shapes`` are already the converted ones.
    """

    location: str
    files: AdapterFiles
    raw: AdapterConfig | None
    peft_config: Any
    config_data: Mapping[str, Any]
    shapes: dict[str, Shape]
    warnings: tuple[Diagnosis, ...] = ()
    causes: tuple[Diagnosis, ...] = ()
    repairs: tuple[str, ...] = ()
    legacy: tuple[bool, ...] | None = None
    header: SafetensorsHeader | None = field(default=None, repr=False)
    metadata: Mapping[str, str] = field(default_factory=dict)  # the weights header's __metadata__ (a stamp, say)


def read_adapter(
    model_id: str | os.PathLike[str],
    *,
    repair: tuple[str, ...] = (),
    allow_pickle: bool = False,
    peft_kwargs: Mapping[str, Any] | None = None,
) -> AdapterSource:
    """Read config and weights' header of ``model_id`` (raises :class:`AdapterFormatError` for bad files)."""
    kwargs = dict(peft_kwargs or {})
    location = os.fspath(model_id)
    files = locate_adapter(
        model_id,
        subfolder=kwargs.get("subfolder"),
        allow_pickle=allow_pickle,
        hub_kwargs={k: kwargs[k] for k in HUB_KWARGS if k in kwargs},
    )
    if not files.config_path:  # no PEFT config: the plan decides whether it is a format it can convert
        header = read_header(files.weights_path)
        shapes = {k: t.shape for k, t in header.tensors.items()}
        return AdapterSource(location, files, None, None, {}, shapes, tuple(files.warnings), header=header)
    raw = read_config(files.config_path, adapter=location)
    warnings = [*files.warnings, *raw.warnings]
    causes: list[Diagnosis] = []
    repairs: list[str] = []
    if kwargs.get("config") is not None:  # the caller's own config object wins, as in peft
        peft_config = copy.deepcopy(kwargs["config"])
        config_data: Mapping[str, Any] = peft_config.to_dict()
    else:
        built = build_peft_config(raw, adapter=location, repair=repair)
        peft_config, config_data = built.config, raw.data
        warnings += built.warnings
        causes += built.causes
        repairs += built.repairs
    metadata: Mapping[str, str] = {}
    if files.weights_format == "safetensors":  # one read of the header: its shapes and its metadata
        header = read_header(files.weights_path)
        shapes = {k: t.shape for k, t in header.tensors.items()}
        metadata = header.metadata
    else:
        shapes = read_checkpoint_shapes(files)
    legacy = enabled_parts(raw.data) if "legacy" in repair and kwargs.get("config") is None else None
    if legacy is not None:
        shapes = convert_shapes(shapes, legacy)
        repairs.insert(0, convert_config(raw.data)[1])
    return AdapterSource(
        location,
        files,
        raw,
        peft_config,
        config_data,
        shapes,
        tuple(warnings),
        tuple(causes),
        tuple(repairs),
        legacy,
        metadata=metadata,
    )


def read_checkpoint_shapes(files: AdapterFiles) -> dict[str, Shape]:
    """Key -> shape of the adapter weights: from the safetensors header, or (allowed pickles) the file."""
    if files.weights_format == "safetensors":
        return {k: t.shape for k, t in read_header(files.weights_path).tensors.items()}
    return {k: tuple(v.shape) for k, v in load_pickle(files.weights_path).items()}
