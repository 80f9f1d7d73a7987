"""Forensics of distributed saves: one rank's shards saved as the whole adapter, per-rank files, DCP directories.

Pure: reasons from shapes and file names only (no torch). Sharded tensors are cut as ``torch.chunk``
cuts them (FSDP2 on dim 0 of every parameter; tensor parallelism on ``lora_B``'s output rows of
column-parallel layers and ``lora_A``'s input columns of row-parallel ones), so a tensor that holds
one rank's part has, in exactly one dimension, one of the chunk sizes of the full length for some
world size N.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from safe_peft._catalog import finding
from safe_peft._keys import Role, Shape, module_of, role_of
from safe_peft.errors import AdapterFormatError
from safe_peft.report import Diagnosis

__all__ = [
    "RankFile",
    "chunk_sizes",
    "distributed_save_error",
    "find_rank_files",
    "missing_ranks",
    "shard_findings",
    "split_dims",
]

_MAX_WORLD = 4096
_RANK = re.compile(r"(?:^|[._-])(?:tp_rank|mp_rank|tp|rank)[_-]?(\d+)(?:$|[._-])")
_MERGE = "safe-peft fix {dir} --base MODEL --out {dir}-merged --merge-ranks"
# code -> (message, fix) of a finding of one rank's shards saved as the whole adapter: str.format templates over its
# details (world_size, keys, dims, example) and others / last_rank (world_size - 1), merge (the merge command)
_SHARD_SAVED: dict[str, tuple[str, str]] = {
    "fsdp_shard_saved": (
        "{keys} tensors hold 1/{world_size} of their rows (dim 0; e.g. {example!r}): one rank's FSDP shards were "
        "saved as the whole adapter (FSDP2 adapter_only saves, accelerate#4206), so the other {others} ranks' rows "
        "are not in this file; loaded as it is, (N-1)/N of the adapter would fall back to its initial values",
        "save again with the tensors gathered: on every rank, state = get_model_state_dict(model, "
        "options=StateDictOptions(full_state_dict=True, cpu_offload=True)) (torch.distributed.checkpoint."
        "state_dict), then on rank 0 model.save_pretrained(out, state_dict=state). If every rank saved its own file "
        "(rank_0/ ... rank_{last_rank}/), merge them: {merge}.",
    ),
    "tp_shard_saved": (
        "{keys} tensors hold 1/{world_size} of a tensor-parallel dimension (lora_B rows of column-parallel layers, "
        "lora_A columns of row-parallel ones; e.g. {example!r}): one tensor-parallel rank's shard saved as the "
        "whole adapter",
        "merge the per-rank files (a directory with rank_0/ ... rank_{last_rank}/): {merge}; or save with full "
        "tensors: peft >= 0.21's save_pretrained gathers DTensor adapter weights (call it on every rank).",
    ),
}


def chunk_sizes(length: int, world: int) -> set[int]:
    """The sizes ``torch.chunk(tensor, world)`` gives along a dimension of ``length`` (empty ranks included)."""
    size = -(-length // world)
    if size == 0:
        return {0}
    sizes = {size} if length // size else set()
    if length % size:
        sizes.add(length % size)
    if -(-length // size) < world:
        sizes.add(0)
    return sizes


def _worlds(length: int, part: int) -> set[int]:
    """World sizes N >= 2 for which ``part`` is one rank's chunk of ``length``."""
    if not 0 < part < length:
        return set()
    return {n for n in range(2, min(length, _MAX_WORLD) + 1) if part in chunk_sizes(length, n)}


def _role(key: str) -> str | None:
    """ "A" / "B" for the two LoRA halves (the key grammar's roles), None otherwise."""
    role = role_of(key)
    return {Role.A: "A", Role.B: "B"}.get(role) if role is not None else None


def shard_findings(mismatches: Iterable[Any]) -> list[tuple[int, Diagnosis, set[str]]]:
    """One rank's shards saved as the whole adapter, from the size mismatches (key, checkpoint_shape,
    model_shape): ``[(weight, finding, keys it explains)]``, empty when the shapes tell another story."""
    cut: dict[str, int] = {}  # key -> the dimension cut
    common: set[int] | None = None  # world sizes every cut agrees with
    for mm in mismatches:
        have, want = tuple(mm.checkpoint_shape), tuple(mm.model_shape)
        dims = [i for i, (a, b) in enumerate(zip(have, want, strict=False)) if a != b]
        if len(have) != len(want) or len(dims) != 1:
            return []
        dim = dims[0]
        if common is None:
            common = _worlds(want[dim], have[dim])
        else:
            common = {n for n in common if 0 < have[dim] < want[dim] and have[dim] in chunk_sizes(want[dim], n)}
        if not common:
            return []
        cut[mm.key] = dim
    if not cut or not common:
        return []
    world = min(common)
    by_role = {(_role(k), d) for k, d in cut.items()}
    halves: dict[str, set[str]] = {}
    for key in cut:
        halves.setdefault(module_of(key), set()).add(_role(key) or "")
    keys = set(cut)
    example = next(iter(cut))
    dims = sorted(set(cut.values()))
    details = {"world_size": world, "keys": len(cut), "dims": dims, "example": example}
    if by_role <= {("A", 0), ("B", 0), (None, 0)} and {("A", 0), ("B", 0)} <= by_role:  # FSDP cuts dim 0 of all
        return [(len(cut), _shard_saved("fsdp_shard_saved", details), keys)]
    if by_role <= {("A", 1), ("B", 0)} and all(len(h) == 1 for h in halves.values()):
        return [(len(cut), _shard_saved("tp_shard_saved", details), keys)]
    return []


def _shard_saved(code: str, details: dict[str, Any]) -> Diagnosis:
    """The finding ``code`` (a key of ``_SHARD_SAVED``) for one rank's shards saved as the whole adapter."""
    message, fix = _SHARD_SAVED[code]
    world = details["world_size"]
    fill = {**details, "others": world - 1, "last_rank": world - 1, "merge": _MERGE.format(dir="DIR")}
    return finding(code, message.format(**fill), fix=fix.format(**fill), details=details)


# --- per-rank files and DCP directories --------------------------------------------------------------------


@dataclass(frozen=True)
class RankFile:
    """One rank's adapter files inside a per-rank save."""

    rank: int
    config_path: str
    weights_path: str


def find_rank_files(directory: str) -> list[RankFile]:
    """The per-rank adapters in ``directory``, in rank order: subdirectories named like ``rank_0`` /
    ``tp_rank_00`` / ``mp_rank_01`` holding an adapter, or weights files named like
    ``adapter_model-rank0.safetensors`` beside one ``adapter_config.json``. Empty when there are none."""
    names = _listdir(directory)
    found: dict[int, RankFile] = {}
    for name in names:
        match = _RANK.search(name)
        if match is None:
            continue
        path = os.path.join(directory, name)
        rank = int(match.group(1))
        if os.path.isdir(path):
            config = os.path.join(path, "adapter_config.json")
            weights = os.path.join(path, "adapter_model.safetensors")
            if os.path.isfile(config) and os.path.isfile(weights):
                found.setdefault(rank, RankFile(rank, config, weights))
        elif name.endswith(".safetensors") and os.path.isfile(os.path.join(directory, "adapter_config.json")):
            found.setdefault(rank, RankFile(rank, os.path.join(directory, "adapter_config.json"), path))
    return [found[r] for r in sorted(found)]


def missing_ranks(files: list[RankFile]) -> list[int]:
    """Ranks absent between 0 and the highest rank found."""
    have = {f.rank for f in files}
    return [r for r in range(max(have) + 1) if r not in have] if have else []


def distributed_save_error(directory: str, location: str) -> AdapterFormatError | None:
    """The error for a directory that holds a distributed save instead of one adapter (None otherwise)."""
    names = set(_listdir(directory))
    if {"adapter_model.safetensors", "adapter_model.bin"} & names:
        return None
    files = find_rank_files(directory)
    if len(files) >= 2 or (files and missing_ranks(files)):
        ranks = [f.rank for f in files]
        gaps = missing_ranks(files)
        return AdapterFormatError.of(
            "per_rank_shards",
            f"{directory}: holds one adapter file per rank ({len(files)} files, ranks {_span(ranks)}), a per-rank "
            "save of a sharded adapter, not one adapter" + (f"; ranks {_span(gaps)} are missing" if gaps else ""),
            fix=(
                f"merge them into one adapter: {_MERGE.format(dir=directory)}"
                if not gaps
                else f"find the files of ranks {_span(gaps)}; the others alone do not hold the whole adapter."
            ),
            adapter=location,
            details={"ranks": ranks, "missing_ranks": gaps, "files": [f.weights_path for f in files][:20]},
        )
    if ".metadata" in names and any(n.endswith(".distcp") for n in names):
        parts = sorted(n for n in names if n.endswith(".distcp"))
        return AdapterFormatError.of(
            "dcp_checkpoint",
            f"{directory}: is a torch.distributed.checkpoint (DCP) directory ({len(parts)} .distcp files and "
            ".metadata, as FSDP's SHARDED_STATE_DICT writes), not a PEFT adapter",
            fix=f"convert it to one file first (python -m torch.distributed.checkpoint.format_utils dcp_to_torch "
            f"{directory} state.pt, or accelerate merge-weights {directory} OUT), load that state into the PeftModel, "
            "and save_pretrained() the adapter.",
            adapter=location,
            details={"files": parts[:20]},
        )
    return None


def _span(ranks: list[int]) -> str:
    if not ranks:
        return "-"
    if ranks == list(range(ranks[0], ranks[-1] + 1)) and len(ranks) > 2:
        return f"{ranks[0]}-{ranks[-1]}"
    return ", ".join(map(str, ranks[:10])) + (", ..." if len(ranks) > 10 else "")


def _listdir(directory: str) -> list[str]:
    try:
        return sorted(os.listdir(directory))
    except OSError:
        return []


def split_dims(shapes: list[Shape], want: Shape) -> int | None:
    """The dimension along which ``shapes`` (in rank order) concatenate to ``want``, or None."""
    if not shapes or any(len(s) != len(want) for s in shapes):
        return None
    for dim in range(len(want)):
        others_equal = all(s[i] == want[i] for s in shapes for i in range(len(want)) if i != dim)
        if others_equal and sum(s[dim] for s in shapes) == want[dim]:
            return dim
    return None
