"""Forensics of distributed saves (one process): slices saved as the whole adapter, per-rank files, DCP, merging."""

from __future__ import annotations

import functools
import json
import os
import shutil
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from safe_peft import AdapterLoadError, diagnose, safe_load_adapter
from safe_peft._cli import main
from safe_peft._files.rank_files import chunk_sizes, shard_findings
from safe_peft._fix.merge_ranks import merge_rank_shards
from safe_peft.report import SizeMismatch
from tests.support.helpers import build, derive, outputs, save_config

COLWISE = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # lora_B cut on its rows
ROWWISE = ("o_proj", "down_proj")  # lora_A cut on its columns


@pytest.mark.parametrize(
    ("length", "world", "sizes"),
    [(64, 2, {32}), (8, 3, {3, 2}), (2, 4, {1, 0}), (7, 7, {1}), (5, 2, {3, 2}), (0, 2, {0})],
)
def test_chunk_sizes_follow_torch_chunk(length: int, world: int, sizes: set[int]) -> None:
    assert chunk_sizes(length, world) == sizes
    if length:
        assert {len(c) for c in torch.arange(length).chunk(world)} | ({0} if length < world else set()) >= sizes


def _mm(key: str, have: tuple[int, ...], want: tuple[int, ...]) -> SizeMismatch:
    return SizeMismatch(key, have, want)


Q = "base_model.model.model.layers.0.self_attn.q_proj"
OUT_PROJ = "base_model.model.model.layers.0.self_attn.o_proj"


@pytest.mark.parametrize(
    ("mismatches", "code", "world"),
    [
        ([_mm(f"{Q}.lora_A.weight", (4, 64), (8, 64)), _mm(f"{Q}.lora_B.weight", (32, 8), (64, 8))], "fsdp", 2),
        ([_mm(f"{Q}.lora_A.weight", (3, 64), (8, 64)), _mm(f"{Q}.lora_B.weight", (22, 8), (64, 8))], "fsdp", 3),
        ([_mm(f"{Q}.lora_B.weight", (16, 8), (64, 8)), _mm(f"{OUT_PROJ}.lora_A.weight", (8, 16), (8, 64))], "tp", 4),
        ([_mm(f"{Q}.lora_B.weight", (32, 8), (64, 8))], "tp", 2),
        # a rank mismatch cuts the rank dimension of both halves: not a sharded save
        ([_mm(f"{Q}.lora_A.weight", (4, 64), (8, 64)), _mm(f"{Q}.lora_B.weight", (64, 4), (64, 8))], None, 0),
        # a base half as wide halves lora_A's columns and lora_B's rows of the same module: not a sharded save
        ([_mm(f"{Q}.lora_A.weight", (8, 32), (8, 64)), _mm(f"{Q}.lora_B.weight", (32, 8), (64, 8))], None, 0),
        # cuts that agree with no single world size
        ([_mm(f"{Q}.lora_B.weight", (32, 8), (64, 8)), _mm(f"{OUT_PROJ}.lora_A.weight", (8, 16), (8, 64))], None, 0),
        ([_mm(f"{Q}.lora_B.weight", (70, 8), (64, 8))], None, 0),
    ],
)
def test_shard_findings_from_shapes(mismatches: list[SizeMismatch], code: str | None, world: int) -> None:
    found = shard_findings(mismatches)
    if code is None:
        assert found == []
        return
    (weight, diagnosis, keys), *rest = found
    assert not rest and keys == {m.key for m in mismatches} and weight == len(mismatches)
    assert diagnosis.code == f"{code}_shard_saved" and diagnosis.details["world_size"] == world


def _slice(key: str, value: torch.Tensor, world: int, rank: int, fsdp: bool) -> torch.Tensor:
    if fsdp:
        return value.chunk(world, dim=0)[rank].clone()
    if ".lora_B." in key and any(f".{m}." in key for m in COLWISE):
        return value.chunk(world, dim=0)[rank].clone()
    if ".lora_A." in key and any(f".{m}." in key for m in ROWWISE):
        return value.chunk(world, dim=1)[rank].clone()
    return value


@pytest.fixture(scope="module")
def good(adapters: dict[str, Any]) -> tuple[str, torch.Tensor]:
    directory, _ = adapters["all_linear"]
    return directory, outputs(safe_load_adapter(build("causal"), directory))


def _per_rank(src: str, dst: str, world: int, *, fsdp: bool, skip: int | None = None) -> str:
    for rank in range(world):
        if rank != skip:
            derive(
                src,
                os.path.join(dst, f"rank_{rank}"),
                tensors=functools.partial(_slice, world=world, rank=rank, fsdp=fsdp),
            )
    return dst


@pytest.mark.parametrize(("fsdp", "code"), [(True, "fsdp_shard_saved"), (False, "tp_shard_saved")])
def test_one_ranks_shard_saved_as_the_whole_adapter_is_named(
    good: tuple[str, torch.Tensor], tmp_path: Any, fsdp: bool, code: str
) -> None:
    shard = derive(good[0], str(tmp_path / "shard"), tensors=lambda k, v: _slice(k, v, 2, 0, fsdp))
    report = diagnose(build("causal"), shard)
    assert [d.code for d in report.causes] == [code]  # no rank_mismatch with a repair that cannot work
    assert report.primary is not None and report.primary.details["world_size"] == 2
    assert "--merge-ranks" in report.primary.fix
    with pytest.raises(AdapterLoadError) as raised:
        safe_load_adapter(build("causal"), shard)
    assert raised.value.report.primary is not None and raised.value.report.primary.code == code


@pytest.mark.parametrize("fsdp", [True, False], ids=["fsdp", "tp"])
@pytest.mark.parametrize("world", [2, 4])
def test_complete_per_rank_files_merge_to_the_trained_adapter(
    good: tuple[str, torch.Tensor], tmp_path: Any, fsdp: bool, world: int
) -> None:
    ranks = _per_rank(good[0], str(tmp_path / "ranks"), world, fsdp=fsdp)
    report = diagnose(build("causal"), ranks)
    assert report.primary is not None and report.primary.code == "per_rank_shards"
    assert report.primary.details["ranks"] == list(range(world)) and "--merge-ranks" in report.primary.fix
    merged = merge_rank_shards(build("causal"), ranks, str(tmp_path / "merged"))
    assert merged.ok and "concatenated" in merged.repairs[0]
    assert torch.equal(
        load_file(str(tmp_path / "merged" / "adapter_model.safetensors"))[_any_key(good[0])],
        load_file(os.path.join(good[0], "adapter_model.safetensors"))[_any_key(good[0])],
    )
    assert torch.allclose(outputs(safe_load_adapter(build("causal"), str(tmp_path / "merged"))), good[1], atol=1e-6)


def _any_key(directory: str) -> str:
    return sorted(load_file(os.path.join(directory, "adapter_model.safetensors")))[0]


def test_merge_refuses_incomplete_or_inconsistent_files(good: tuple[str, torch.Tensor], tmp_path: Any) -> None:
    gap = _per_rank(good[0], str(tmp_path / "gap"), 4, fsdp=False, skip=2)
    report = diagnose(build("causal"), gap)
    assert report.primary is not None and report.primary.details["missing_ranks"] == [2]
    out = str(tmp_path / "out")
    with pytest.raises(AdapterLoadError) as raised:
        merge_rank_shards(build("causal"), gap, out)
    assert raised.value.report.primary is not None and raised.value.report.primary.code == "shards_incomplete"
    diverged = _per_rank(good[0], str(tmp_path / "diverged"), 2, fsdp=False)
    path = os.path.join(diverged, "rank_1", "adapter_model.safetensors")
    tensors = load_file(path)
    replicated = next(k for k in tensors if ".q_proj.lora_A." in k)  # replicated on every rank
    tensors[replicated] = tensors[replicated] + 1
    save_file(tensors, path)
    with pytest.raises(AdapterLoadError) as raised:
        merge_rank_shards(build("causal"), diverged, out)
    assert raised.value.report.primary is not None and raised.value.report.primary.code == "replicas_differ"
    odd = _per_rank(good[0], str(tmp_path / "odd"), 2, fsdp=False)
    config = os.path.join(odd, "rank_1", "adapter_config.json")
    with open(config) as f:
        data = json.load(f)
    data["lora_alpha"] = 99
    with open(config, "w") as f:
        json.dump(data, f)
    with pytest.raises(AdapterLoadError) as raised:
        merge_rank_shards(build("causal"), odd, out)
    assert raised.value.report.primary is not None and raised.value.report.primary.code == "shard_configs_differ"
    assert not os.path.exists(out)


def test_fix_merge_ranks_on_the_command_line(good: tuple[str, torch.Tensor], tmp_path: Any) -> None:
    base = str(tmp_path / "base")
    model = build("causal")
    save_config(model, base)
    ranks = _per_rank(good[0], str(tmp_path / "ranks"), 2, fsdp=True)
    assert main(["check", ranks, "--base", base]) == 2  # unreadable as one adapter: the table names per_rank_shards
    assert main(["fix", ranks, "--base", base, "--out", str(tmp_path / "m"), "--merge-ranks", "--remap", "auto"]) == 2
    assert main(["fix", ranks, "--base", base, "--out", str(tmp_path / "m"), "--merge-ranks"]) == 0
    assert torch.allclose(outputs(safe_load_adapter(build("causal"), str(tmp_path / "m"))), good[1], atol=1e-6)
    assert main(["fix", good[0], "--base", base, "--out", str(tmp_path / "n"), "--merge-ranks"]) == 2


def test_a_dcp_directory_is_named(tmp_path: Any) -> None:
    for name in (".metadata", "__0_0.distcp", "__1_0.distcp"):
        (tmp_path / name).write_bytes(b"")
    report = diagnose(build("causal"), str(tmp_path))
    assert report.primary is not None and report.primary.code == "dcp_checkpoint"
    assert report.primary.details["files"] == ["__0_0.distcp", "__1_0.distcp"]


def test_an_adapter_beside_rank_folders_is_still_the_adapter(good: tuple[str, torch.Tensor], tmp_path: Any) -> None:
    directory = str(tmp_path / "adapter")
    shutil.copytree(good[0], directory)
    _per_rank(good[0], directory, 2, fsdp=True)
    assert diagnose(build("causal"), directory).ok
