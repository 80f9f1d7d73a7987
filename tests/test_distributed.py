"""Sharded models across processes: torchrun launches 2 and 4 CPU ranks (gloo), each running
tests/support/distributed_worker.py.

One launch per world size runs every check (FSDP2, tensor parallel via parallelize_module and transformers'
tp_plan: loads, training on different data, each failure kind, a silent rank, saves); the tests below assert on
what each rank reported, against single-process references computed here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model

from safe_peft import diagnose, safe_load_adapter
from safe_peft._model.sharding import _peft_shards_transformers_tp
from safe_peft._versions import SHARDED_LOAD_TORCH_SINCE, torch_at_least
from tests.support.helpers import build, derive, outputs, train_adapter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODEL = {"num_key_value_heads": 4}  # 4 key/value heads: every projection splits over 4 tensor-parallel ranks
STEPS = 2
SILENT_TIMEOUT = 1.0  # seconds the others wait for a rank that never calls
BIG: dict[str, Any] = dict(  # for the memory measurement: a base of 24 MB, an adapter of 0.4 MB
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=4096,
    max_position_embeddings=64,
)
ENGINES = ["fsdp", "tp", "tp_plan"]
TP_PLAN = _peft_shards_transformers_tp()

pytestmark = [
    pytest.mark.skipif(
        not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
        reason="needs torch.distributed with the gloo backend",
    ),
    pytest.mark.skipif(  # the refusal on an older torch: tests/test_torch_versions.py
        not torch_at_least(str(torch.__version__), SHARDED_LOAD_TORCH_SINCE),
        reason=f"loading into a sharded model needs torch >= {SHARDED_LOAD_TORCH_SINCE}: refused on this one",
    ),
]


def _train(model: Any, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(STEPS):
        model(batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return {n.replace(".default", ""): p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The base model, the adapters the ranks load, and the single-process references."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: extra threads only contend on a busy machine
    try:
        yield _workspace(tmp_path_factory)
    finally:
        torch.set_num_threads(threads)


def _workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("distributed")
    build("causal", **MODEL).save_pretrained(root / "base")
    good = str(root / "good")
    train_adapter(build("causal", **MODEL), good, target_modules=TARGETS)
    derive(good, str(root / "empty"), tensors=lambda k, v: torch.empty(0) if ".lora_A." in k else v)
    derive(
        good,
        str(root / "nan"),
        tensors=lambda k, v: torch.full_like(v, float("nan")) if "layers.1.mlp.down_proj.lora_B" in k else v,
    )
    derive(good, str(root / "other_values"), tensors=lambda k, v: v * 2 if ".lora_A." in k else v)
    train_adapter(build("causal", **MODEL), str(root / "heads"), target_modules=TARGETS, modules_to_save=["lm_head"])
    train_adapter(build("causal", **MODEL), str(root / "dora"), target_modules=["q_proj", "v_proj"], use_dora=True)
    torch.manual_seed(1)
    embedding = get_peft_model(
        build("causal", **MODEL), LoraConfig(target_modules=["embed_tokens", "q_proj"], init_lora_weights=False)
    )
    embedding.save_pretrained(str(root / "embedding"), save_embedding_layers=False)
    embedding.save_pretrained(str(root / "embedding_with_base"), save_embedding_layers=True)  # the base rows too
    torch.manual_seed(1)
    ia3 = IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False)
    get_peft_model(build("causal", **MODEL), ia3).save_pretrained(str(root / "ia3"))
    torch.manual_seed(0)
    train_adapter(LlamaForCausalLM(LlamaConfig(**BIG)), str(root / "big"), r=4, target_modules=TARGETS)
    data = torch.randint(1, 100, (4, 2, 6), generator=torch.Generator().manual_seed(3))
    ref: dict[str, Any] = {
        "input": torch.tensor([[1, 5, 9, 13, 17, 21]]),
        "steps": STEPS,
        "data": data,
        "big_config": BIG,
        "model": MODEL,
        "silent_timeout": SILENT_TIMEOUT,
        "tp_plan_supported": TP_PLAN,
        "good": outputs(safe_load_adapter(build("causal", **MODEL), good)),
        **{
            name: outputs(safe_load_adapter(build("causal", **MODEL), str(root / name)))
            for name in ("heads", "embedding", "ia3")
        },
        "trained_tp": _train(PeftModel.from_pretrained(build("causal", **MODEL), good, is_trainable=True), data[0]),
    }
    for world in (2, 4):  # data parallel: the mean loss over every rank's batch
        model = PeftModel.from_pretrained(build("causal", **MODEL), good, is_trainable=True)
        ref[f"trained_fsdp_{world}"] = _train(model, data[:world].reshape(-1, data.shape[-1]))
    torch.save(ref, root / "ref.pt")
    return {"root": str(root), **ref}


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"nproc{n}")
def launch(request: pytest.FixtureRequest, workspace: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Any:
    nproc = request.param
    out = tmp_path_factory.mktemp(f"ranks{nproc}")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "tests.support.distributed_worker",
        workspace["root"],
        str(out),
    ]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=str(out))
    elapsed = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-6000:]
    ranks = []
    for rank in range(nproc):
        with open(out / f"rank{rank}.json") as f:
            ranks.append(json.load(f)["results"])
    return {"nproc": nproc, "ranks": ranks, "out": str(out), "seconds": elapsed, **workspace}


def _results(launch: Any, name: str) -> list[dict[str, Any]]:
    found = [r[name] for r in launch["ranks"]]
    errors = [f"rank {i}: {r['error']}\n{r.get('traceback', '')}" for i, r in enumerate(found) if "error" in r]
    assert not errors, "\n".join(errors)
    return found


def _engine(engine: str) -> None:
    if engine == "tp_plan" and not TP_PLAN:
        pytest.skip("the installed peft does not shard LoRA by transformers' tp_plan (peft >= 0.21 does)")


@pytest.mark.parametrize("engine", ENGINES)
def test_load_equals_the_single_process_load(launch: Any, engine: str) -> None:
    _engine(engine)
    for rank in _results(launch, f"{engine}/load"):
        assert rank["ok"] and rank["diagnose_ok"]
        assert rank["max_diff"] < 1e-5
        placed = rank["placed"]
        if engine == "fsdp":
            assert set(placed.values()) == {"DTensor"}  # every adapter weight sharded with its layer
        else:  # column-parallel layers shard lora_B, row-parallel ones lora_A; the other half is replicated
            for name, kind in placed.items():
                sharded = ("q_proj.lora_B" in name) or ("o_proj.lora_A" in name) or ("down_proj.lora_A" in name)
                assert kind == ("DTensor" if sharded else "Parameter"), name
        assert len(placed) == 6


@pytest.mark.parametrize("engine", ENGINES)
def test_training_keeps_the_adapter_identical_across_ranks(launch: Any, engine: str) -> None:
    """FSDP: different data per rank equals one process on all of it; tensor parallel: one batch for all ranks."""
    _engine(engine)
    for rank in _results(launch, f"{engine}/train"):
        assert rank["keys_equal"]
        assert rank["identical_across_ranks"]
        assert rank["max_diff_vs_single_process"] < 1e-5


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(
    ("case", "code", "failing"),
    [
        ("all_ranks_broken", "zero3_empty_tensors", "all"),
        ("one_rank_broken_plan", "zero3_empty_tensors", [1]),
        ("one_rank_fails_load", "non_finite_values", "last"),
        ("ranks_disagree", "ranks_disagree", [1]),
        ("modules_to_save_refused", "load_before_sharding", "all"),
        ("dora_refused", "load_before_sharding", "all"),
    ],
)
def test_failures_raise_on_every_rank_and_restore_every_rank(
    launch: Any, engine: str, case: str, code: str, failing: Any
) -> None:
    _engine(engine)
    world = launch["nproc"]
    ranks = list(range(world)) if failing == "all" else [world - 1] if failing == "last" else failing
    for rank in _results(launch, f"{engine}/{case}"):
        assert rank["raised"], rank
        assert rank["restored"] and rank["unchanged_flag"]
        assert rank["code"] == code, rank["message"]
        if code != "ranks_disagree":
            assert rank["ranks"] == ranks
            who = f"rank {ranks[0]} of {world}" if len(ranks) == 1 else f"ranks {ranks[0]}"
            assert rank["message"].startswith(who)
        else:
            assert rank["cause"] == "distributed"
        if case == "modules_to_save_refused":
            assert rank["diagnose_code"] == "load_before_sharding"  # the pre-flight predicts the refusal


def test_a_silent_rank_does_not_hang_the_others(launch: Any) -> None:
    world = launch["nproc"]
    results = _results(launch, "silent_rank")
    assert results[-1] == {"skipped": True, "seconds": results[-1]["seconds"]}
    for rank in results[:-1]:
        assert rank["raised"] and rank["restored"]
        assert rank["code"] == "rank_timeout"
        assert f"rank {world - 1} of {world}" in rank["message"]
        assert rank["load_seconds"] < SILENT_TIMEOUT + 3.0  # the timeout, plus the time to plan on a busy machine
    assert results[0]["load_seconds"] >= SILENT_TIMEOUT  # rank 0 waited the whole timeout for the silent rank


def test_fsdp_after_a_forward_other_layers_and_the_documented_way_round(launch: Any) -> None:
    for rank in _results(launch, "fsdp/load_after_forward"):
        assert rank["max_diff_vs_single_process"] < 1e-5
    for rank in _results(launch, "fsdp/other_layers"):
        for name in ("embedding", "ia3"):
            assert rank[name]["max_diff"] < 1e-5 and rank[name]["trainable"] == ["DTensor"], name
        assert rank["embedding_with_base"]["code"] == "load_before_sharding"  # base rows into sharded ones
        assert rank["embedding_with_base"]["restored"]
    for rank in _results(launch, "fsdp/load_before_sharding_works"):
        assert rank["max_diff"] < 1e-5
    for rank in _results(launch, "fsdp/plain_peft_diverges"):
        assert not rank["identical_across_ranks"]  # what plain peft does: the test above would catch it


def test_tensor_parallel_the_documented_way_round_and_an_unsupported_peft(launch: Any) -> None:
    for rank in _results(launch, "tp/load_before_sharding_works"):
        assert rank["max_diff"] < 1e-5
    if not TP_PLAN:  # the oldest supported peft: transformers' tp_plan is refused before anything changes
        for rank in _results(launch, "tp_plan/refused"):
            assert rank["raised"] and rank["restored"] and rank["code"] == "load_before_sharding"
            assert rank["fix"]


def test_the_documented_examples_load_on_every_rank(launch: Any) -> None:
    for name in ("examples/fsdp", "examples/tp"):
        for rank in _results(launch, name):
            assert rank["max_diff"] < 1e-5


def test_the_docs_show_the_examples_as_they_are() -> None:
    import re

    with open(os.path.join(ROOT, "docs", "distributed.md")) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    for name in ("distributed_fsdp.py", "distributed_tp.py"):
        with open(os.path.join(ROOT, "examples", name)) as f:
            assert f.read() in blocks, name


def test_distributed_saves_are_named_and_per_rank_files_merge(launch: Any, tmp_path: Any) -> None:
    from safe_peft._cli import main

    _results(launch, "fsdp/saves")
    _results(launch, "tp/saves")
    world, out, base = launch["nproc"], launch["out"], os.path.join(launch["root"], "base")
    model = build("causal", **MODEL)
    rank0 = diagnose(model, os.path.join(out, "fsdp_rank0_only"))
    assert rank0.primary is not None and rank0.primary.code == "fsdp_shard_saved"
    assert rank0.primary.details["world_size"] == world
    shard = diagnose(model, os.path.join(out, "tp_ranks", "rank_0"))
    assert shard.primary is not None and shard.primary.code == "tp_shard_saved"
    assert shard.primary.details["world_size"] == world
    assert [d.code for d in shard.causes] == ["tp_shard_saved"]  # not also a rank or base-model mismatch
    per_rank = diagnose(model, os.path.join(out, "tp_ranks"))
    assert per_rank.primary is not None and per_rank.primary.code == "per_rank_shards"
    assert per_rank.primary.details["ranks"] == list(range(world))
    gathered = safe_load_adapter(build("causal", **MODEL), os.path.join(out, "fsdp_gathered"))
    assert torch.allclose(outputs(gathered), launch["good"], atol=1e-5)
    for name in ("tp_ranks", "fsdp_ranks"):
        merged = str(tmp_path / name)
        assert main(["fix", os.path.join(out, name), "--base", base, "--out", merged, "--merge-ranks"]) == 0
        loaded = safe_load_adapter(build("causal", **MODEL), merged)
        assert torch.allclose(outputs(loaded), launch["good"], atol=1e-5)
    diverged = str(tmp_path / "diverged")
    assert main(["fix", os.path.join(out, "diverged"), "--base", base, "--out", diverged, "--merge-ranks"]) == 1
    assert not os.path.exists(diverged)


def test_peak_memory_of_a_load_is_the_adapter_not_the_base(launch: Any) -> None:
    for rank in _results(launch, "fsdp/peak_memory"):
        assert rank["base_shard_bytes"] * launch["nproc"] >= rank["base_bytes"] * 0.99
        # the load adds the adapter (read whole on every rank, then sharded), never a copy of the base's shard
        assert rank["load_peak_bytes"] < 4 * rank["adapter_bytes"] + 2**20 < rank["base_shard_bytes"] / 2
