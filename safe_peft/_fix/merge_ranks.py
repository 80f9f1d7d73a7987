"""Merge the per-rank files of a sharded save into one adapter (``safe-peft fix --merge-ranks``).

Each tensor is decided from the shapes the base model expects: a tensor every rank holds whole is
replicated (and must be identical on every rank: a replica that differs means the ranks trained it
apart), a tensor whose per-rank parts add up to the expected length along one dimension is
concatenated there in rank order. Anything else (a missing rank, parts that do not add up, configs
that differ) is refused and nothing is written. One tensor at a time is read from every rank file
(safetensors), so memory holds the merged adapter and one tensor's parts.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from safe_peft._bounds import MAX_CONFIG_BYTES, open_regular
from safe_peft._catalog import finding
from safe_peft._files.rank_files import RankFile, find_rank_files, missing_ranks, split_dims
from safe_peft.errors import AdapterFormatError, AdapterLoadError
from safe_peft.report import Diagnosis, LoadReport

if TYPE_CHECKING:
    from torch import nn

__all__ = ["merge_rank_shards"]


def merge_rank_shards(
    base_model: nn.Module,
    directory: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    adapter_name: str = "default",
    force: bool = False,
    verify: Callable[[str], object] | None = None,
) -> LoadReport:
    """Merge the per-rank adapter files a sharded save wrote into one adapter in ``out_dir``.

    The per-rank files are ``rank_0/``, ``rank_1/``, ... or ``adapter_model-rank0.safetensors``, ...

    :param base_model: the unsharded model the merged adapter must load into.
    :param directory: the directory holding the per-rank files.
    :param out_dir: a new directory, or one safe-peft wrote earlier (with ``force=True``).
    :param adapter_name: the adapter's name.
    :param force: replace an output safe-peft wrote earlier, atomically.
    :param verify: a further check, ``verify(staging_dir)``, of the written adapter before it is moved into place.
        The command line loads it with plain peft there.
    :returns: the :class:`LoadReport` of the merged adapter.
    :raises AdapterLoadError: when the files are incomplete or inconsistent, or when the merged adapter would not
        load into ``base_model``. Nothing is written then.

    ```python
    >>> report = merge_rank_shards(base, "out/ranks", "out/adapter")  # doctest: +SKIP

    ```
    """
    from safetensors.torch import save_file

    from safe_peft._files.config import build_peft_config, read_config
    from safe_peft._fix.writer import write_output
    from safe_peft._model.view import expected_keys
    from safe_peft._routes.diagnose import diagnose

    source = os.fspath(directory)
    files = _complete_rank_files(source)
    peft_config = build_peft_config(read_config(files[0].config_path, adapter=source), adapter=source).config
    expected = {k: tuple(e.shape) for k, e in expected_keys(base_model, peft_config, adapter_name).expected.items()}
    merged, concatenated, replicated = _merged_tensors(source, files, expected)

    def fill(staging: str) -> None:
        metadata = {"format": "pt", "safe_peft.merged_ranks": str(len(files)), "safe_peft.source": source}
        save_file(merged, os.path.join(staging, "adapter_model.safetensors"), metadata=metadata)
        shutil.copyfile(files[0].config_path, os.path.join(staging, "adapter_config.json"))

    def check(staging: str) -> None:  # the merged adapter must load into the base, before it is moved into place
        report = diagnose(base_model, staging, adapter_name)
        if not report.ok:
            raise AdapterLoadError(report)
        if verify is not None:
            verify(staging)

    record = {"source": source, "merged_ranks": len(files)}
    write_output(out_dir, [source], fill, verify=check, force=force, record=record)
    summary = (
        f"merged the files of {len(files)} ranks: {concatenated} tensors concatenated, {replicated} replicated "
        "(identical on every rank)"
    )
    return LoadReport(ok=True, repairs=[summary], adapter=source, model_class=type(base_model).__name__)


def _complete_rank_files(source: str) -> list[RankFile]:
    """Every rank's files in ``source``, refused unless no rank is missing and every rank's config is the same."""
    files = find_rank_files(source)
    if len(files) < 2:
        raise AdapterFormatError.of(
            "per_rank_shards",
            f"{source}: holds no per-rank adapter files (rank_0/, rank_1/, ... or adapter_model-rank0.safetensors)",
            fix="pass the directory that holds the per-rank files.",
            adapter=source,
        )
    gaps = missing_ranks(files)
    if gaps:
        raise _refusal(
            source,
            finding("shards_incomplete", f"the files of ranks {gaps} are missing"),
        )
    configs = [_unordered(_json(f.config_path)) for f in files]
    if any(c != configs[0] for c in configs[1:]):
        other = next(f.rank for f, c in zip(files, configs, strict=False) if c != configs[0])
        raise _refusal(
            source,
            finding(
                "shard_configs_differ",
                f"rank {other}'s adapter_config.json differs from rank 0's",
            ),
        )
    return files


def _merged_tensors(
    source: str, files: list[RankFile], expected: dict[str, tuple[int, ...]]
) -> tuple[dict[str, Any], int, int]:
    """The merged adapter's tensors, one key at a time from every rank's file: (tensors, how many were concatenated,
    how many replicated). Refused when the ranks hold other keys, a replica differs or the parts do not add up."""
    from safetensors import safe_open

    from safe_peft._files.safetensors_header import read_header

    headers = [read_header(f.weights_path) for f in files]
    keys = list(headers[0].tensors)
    for f, header in zip(files, headers, strict=False):
        if set(header.tensors) != set(keys):
            diff = sorted(set(keys) ^ set(header.tensors))
            raise _refusal(
                source,
                finding("shards_incomplete", f"rank {f.rank} has other keys ({diff[0]!r})"),
            )
    merged: dict[str, Any] = {}
    concatenated = replicated = 0
    handles: list[Any] = [safe_open(f.weights_path, framework="pt") for f in files]
    for key in keys:
        shapes = [tuple(h.tensors[key].shape) for h in headers]
        parts = [handle.get_tensor(key) for handle in handles]
        merged[key], was_replicated = _merged_tensor(source, files, key, shapes, parts, expected.get(key))
        replicated += was_replicated
        concatenated += not was_replicated
    return merged, concatenated, replicated


def _merged_tensor(
    source: str,
    files: list[RankFile],
    key: str,
    shapes: list[tuple[int, ...]],
    parts: list[Any],
    want: tuple[int, ...] | None,
) -> tuple[Any, bool]:
    """One tensor from its per-rank parts, and whether it was replicated (else concatenated)."""
    if all(s == shapes[0] for s in shapes) and (want is None or shapes[0] == want):
        differ = next((f.rank for f, p in zip(files, parts, strict=False) if not _equal(p, parts[0])), None)
        if differ is not None:
            raise _refusal(
                source,
                finding(
                    "replicas_differ",
                    f"{key!r} is replicated (every rank holds it whole) but rank {differ}'s copy differs from "
                    "rank 0's: the ranks trained it apart (its gradients were never reduced across ranks)",
                    fix="train again with the adapter under the model's sharding (safe_load_adapter places it), "
                    "or pick one rank's adapter knowingly.",
                ),
            )
        return parts[0].contiguous(), True
    dim = split_dims(shapes, want) if want is not None else None
    if dim is None:
        raise _refusal(
            source,
            finding(
                "shards_incomplete",
                f"the per-rank parts of {key!r} ({', '.join(map(str, map(list, shapes)))}) do not add up to "
                f"the shape the model expects ({list(want) if want else 'no such key'})",
                fix="check that every rank's file is present and that the base model is the one trained on.",
            ),
        )
    import torch

    return torch.cat(parts, dim=dim).contiguous(), False


def _equal(a: Any, b: Any) -> bool:
    import torch

    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))


def _unordered(value: Any) -> Any:
    """JSON with every list sorted: peft writes sets (target_modules) in a per-process order."""
    if isinstance(value, dict):
        return {k: _unordered(v) for k, v in value.items()}
    if isinstance(value, list):
        return sorted((_unordered(v) for v in value), key=lambda v: json.dumps(v, sort_keys=True))
    return value


def _json(path: str) -> Any:
    """A rank's adapter_config.json: a regular file of at most MAX_CONFIG_BYTES, read as peft reads it."""
    f, size = open_regular(path)
    with f:
        if size > MAX_CONFIG_BYTES:
            raise ValueError(f"{path}: {size} bytes, more than {MAX_CONFIG_BYTES}")
        return json.loads(f.read(size).decode("utf-8"))


def _refusal(source: str, diagnosis: Diagnosis) -> AdapterLoadError:
    from dataclasses import replace

    fix = diagnosis.fix or "find every rank's file, or save the adapter again gathered (see docs/distributed.md)."
    full = replace(diagnosis, message=f"{source}: {diagnosis.message}", fix=fix)
    return AdapterLoadError(LoadReport(ok=False, causes=[full], adapter=source))
