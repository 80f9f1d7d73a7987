"""One rank of the multi-process tests, launched by tests/test_distributed.py through torchrun (gloo, CPU).

Every rank runs the same checks in the same order (FSDP2, tensor parallel via parallelize_module and, where the
installed transformers and peft support it, transformers' tp_plan) and writes what it saw to ``OUT/rank<r>.json``;
the test asserts on those files. A check that raises is recorded as an error, so the other checks still report.

    python -m torch.distributed.run --standalone --nproc-per-node N -m tests.support.distributed_worker DATA OUT
"""

from __future__ import annotations

import faulthandler
import hashlib
import json
import os
import re
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

DATA, OUT = sys.argv[1], sys.argv[2]
faulthandler.dump_traceback_later(240, exit=True)  # a hang shows every rank's stack, then ends the launch
dist.init_process_group("gloo")
RANK, WORLD = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)

from peft import PeftModel  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from safe_peft import AdapterLoadError, diagnose, safe_load_adapter  # noqa: E402
from tests.support.helpers import build  # noqa: E402

MESH = init_device_mesh("cpu", (WORLD,))
REF = torch.load(os.path.join(DATA, "ref.pt"), weights_only=True)
INPUT = REF["input"]
results: dict[str, Any] = {}
SILENT_TIMEOUT = float(REF["silent_timeout"])


def adapter(name: str) -> str:
    return os.path.join(DATA, name)


def base() -> nn.Module:
    """The tiny Llama the test saved in DATA/base: same builder, same seed, same weights (faster than loading)."""
    return build("causal", **REF["model"])


def fsdp() -> nn.Module:
    model = base()
    for layer in model.get_submodule("model.layers").children():
        fully_shard(layer, mesh=MESH)
    fully_shard(model, mesh=MESH)  # in place: the same module, its class swapped for an FSDP one
    return model


def depth(model: nn.Module, layers: str) -> int:
    """How many decoder layers the ModuleList at ``layers`` holds."""
    found = model.get_submodule(layers)
    assert isinstance(found, nn.ModuleList)
    return len(found)


def tensor_parallel() -> nn.Module:
    model = base()
    plan: dict[str, Any] = {}
    for i in range(depth(model, "model.layers")):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            plan[f"model.layers.{i}.{name}"] = ColwiseParallel()
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            plan[f"model.layers.{i}.{name}"] = RowwiseParallel()
    return parallelize_module(model, MESH, plan)


def transformers_tp() -> nn.Module:
    return LlamaForCausalLM.from_pretrained(os.path.join(DATA, "base"), tp_plan="auto").eval()


ENGINES: dict[str, Callable[[], nn.Module]] = {"fsdp": fsdp, "tp": tensor_parallel, "tp_plan": transformers_tp}
available = {"fsdp": True, "tp": True, "tp_plan": bool(REF["tp_plan_supported"])}


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def state_digest(model: nn.Module) -> str:
    """Structure, flags and this rank's local values of every parameter and buffer (no collective)."""
    digest = hashlib.sha256()
    for name, module in model.named_modules():
        digest.update(f"{name}:{type(module).__name__}:{len(module._forward_hooks)}".encode())
    for name, param in model.named_parameters():
        digest.update(f"{name}:{param.requires_grad}:{type(param).__name__}".encode())
        digest.update(local(param).detach().contiguous().view(torch.uint8).numpy().tobytes())
    digest.update(str(hasattr(model, "peft_config")).encode())
    return digest.hexdigest()


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT).logits


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def full_adapter(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's full tensors (a collective for DTensors), without the adapter name."""
    return {
        n.replace(".default", ""): (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for n, p in model.named_parameters()
        if "lora_" in n
    }


def same_everywhere(value: str) -> bool:
    gathered: list[Any] = [None] * WORLD
    dist.all_gather_object(gathered, value)
    return len(set(gathered)) == 1


def check(name: str) -> Callable[[Callable[[], dict[str, Any]]], None]:
    def run(fn: Callable[[], dict[str, Any]]) -> None:
        print(f"[rank {RANK}] {name}", file=sys.stderr, flush=True)
        started = time.perf_counter()
        try:
            results[name] = fn()
        except Exception as exc:  # recorded for the test to report; the next checks still run
            results[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
        results[name]["seconds"] = round(time.perf_counter() - started, 3)
        dist.barrier()

    return run


def refused(make: Callable[[], nn.Module], path: str | Callable[[int], str], **kwargs: Any) -> dict[str, Any]:
    """Load an adapter that must fail; report the error on this rank and whether the base is as it was."""
    model = make()
    before = state_digest(model)
    started = time.perf_counter()
    try:
        safe_load_adapter(model, path(RANK) if callable(path) else path, **kwargs)
    except AdapterLoadError as exc:
        primary = exc.report.primary
        assert primary is not None
        return {
            "raised": True,
            "code": primary.code,
            "cause": primary.cause.value,
            "codes": [d.code for d in exc.report.causes],
            "ranks": primary.details.get("ranks"),
            "message": primary.message,
            "restored": state_digest(model) == before,
            "unchanged_flag": exc.report.base_model_unchanged,
            "load_seconds": round(time.perf_counter() - started, 3),
        }
    return {"raised": False, "restored": state_digest(model) == before}


def train(model: nn.Module, batch: torch.Tensor) -> None:
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(int(REF["steps"])):
        model(batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def save_local(model: nn.Module, directory: str) -> None:
    """What a naive per-rank save writes: this rank's local tensors under peft's keys (no gathering)."""
    from safetensors.torch import save_file

    tensors = {
        n.replace(".default", ""): local(p).detach().contiguous() for n, p in model.named_parameters() if "lora_" in n
    }
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, "adapter_model.safetensors"))
    assert isinstance(model, PeftModel)  # sharded in place: FSDP2 and parallelize_module keep the class
    model.peft_config["default"].save_pretrained(directory)


def engine_checks(engine: str) -> None:
    make = ENGINES[engine]

    @check(f"{engine}/load")
    def _() -> dict[str, Any]:
        model = make()
        report = diagnose(model, adapter("good"))
        started = time.perf_counter()
        loaded, load_report = safe_load_adapter(model, adapter("good"), output_loading_info=True)
        seconds = time.perf_counter() - started
        placed = {
            n: type(p).__name__
            for n, p in loaded.named_parameters()
            if re.search(r"layers\.0\.(self_attn\.(q|o)_proj|mlp\.down_proj)\.lora_[AB]\.", n)
        }
        return {
            "diagnose_ok": report.ok,
            "ok": load_report.ok,
            "max_diff": diff(logits(loaded), REF["good"]),
            "placed": placed,
            "load_seconds": round(seconds, 3),
        }

    @check(f"{engine}/train")
    def _() -> dict[str, Any]:
        model = safe_load_adapter(make(), adapter("good"), is_trainable=True)
        data = REF["data"][RANK] if engine == "fsdp" else REF["data"][0]  # tensor parallel: one batch for all
        train(model, data)
        weights = full_adapter(model)
        expected = REF[f"trained_fsdp_{WORLD}"] if engine == "fsdp" else REF["trained_tp"]
        digest = hashlib.sha256(b"".join(w.numpy().tobytes() for _, w in sorted(weights.items()))).hexdigest()
        return {
            "max_diff_vs_single_process": max(diff(weights[k], expected[k]) for k in expected),
            "keys_equal": sorted(weights) == sorted(expected),
            "identical_across_ranks": same_everywhere(digest),
        }

    @check(f"{engine}/all_ranks_broken")
    def _() -> dict[str, Any]:
        return refused(make, adapter("empty"))

    @check(f"{engine}/one_rank_broken_plan")
    def _() -> dict[str, Any]:
        return refused(make, lambda r: adapter("empty" if r == 1 else "good"))

    @check(f"{engine}/one_rank_fails_load")
    def _() -> dict[str, Any]:
        return refused(make, lambda r: adapter("nan" if r == WORLD - 1 else "good"))

    @check(f"{engine}/ranks_disagree")
    def _() -> dict[str, Any]:
        return refused(make, lambda r: adapter("other_values" if r == 1 else "good"))

    @check(f"{engine}/modules_to_save_refused")
    def _() -> dict[str, Any]:
        predicted = diagnose(make(), adapter("heads"))
        result = refused(make, adapter("heads"))
        result["diagnose_code"] = predicted.primary.code if predicted.primary else None
        return result

    @check(f"{engine}/dora_refused")
    def _() -> dict[str, Any]:
        return refused(make, adapter("dora"))


def fsdp_extras() -> None:
    @check("fsdp/load_after_forward")
    def _() -> dict[str, Any]:
        model = fsdp()
        logits(model)  # FSDP2's lazy init has run: the adapter must still join the root
        loaded = safe_load_adapter(model, adapter("good"), is_trainable=True)
        train(loaded, REF["data"][RANK])
        weights = full_adapter(loaded)
        expected = REF[f"trained_fsdp_{WORLD}"]
        return {"max_diff_vs_single_process": max(diff(weights[k], expected[k]) for k in expected)}

    @check("fsdp/other_layers")
    def _() -> dict[str, Any]:
        """Beyond LoRA on linear layers: LoRA on the embeddings, and IA3 (whose view peft computes by injection)."""
        found = {}
        for name in ("embedding", "ia3"):
            loaded = safe_load_adapter(fsdp(), adapter(name), is_trainable=True)
            kinds = sorted({type(p).__name__ for p in loaded.parameters() if p.requires_grad})
            found[name] = {"max_diff": diff(logits(loaded), REF[name]), "trainable": kinds}
        found["embedding_with_base"] = refused(fsdp, adapter("embedding_with_base"))
        return found

    @check("fsdp/load_before_sharding_works")
    def _() -> dict[str, Any]:
        """The fix load_before_sharding names: load into the unsharded model, then shard the PeftModel."""
        model = safe_load_adapter(base(), adapter("heads"))
        for layer in model.get_submodule("base_model.model.model.layers").children():
            fully_shard(layer, mesh=MESH)
        fully_shard(model, mesh=MESH)
        return {"max_diff": diff(logits(model), REF["heads"])}

    @check("fsdp/plain_peft_diverges")
    def _() -> dict[str, Any]:
        """The bug this issue is about: plain peft's LoRA weights beside DTensors train apart on every rank."""
        from peft import PeftModel

        model = PeftModel.from_pretrained(fsdp(), adapter("good"), is_trainable=True)
        train(model, REF["data"][RANK])
        save_local(model, os.path.join(OUT, "diverged", f"rank_{RANK}"))
        weights = full_adapter(model)
        digest = hashlib.sha256(b"".join(w.numpy().tobytes() for _, w in sorted(weights.items()))).hexdigest()
        return {"identical_across_ranks": same_everywhere(digest)}

    @check("fsdp/saves")
    def _() -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        model = safe_load_adapter(fsdp(), adapter("good"))
        save_local(model, os.path.join(OUT, "fsdp_ranks", f"rank_{RANK}"))  # every rank its own shards
        if RANK == 0:  # accelerate#4206: rank 0's shards written as the whole adapter
            save_local(model, os.path.join(OUT, "fsdp_rank0_only"))
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if RANK == 0:  # the fix fsdp_shard_saved names
            model.save_pretrained(os.path.join(OUT, "fsdp_gathered"), state_dict=state)
        return {}

    @check("fsdp/peak_memory")
    def _() -> dict[str, Any]:
        """Peak resident memory added by the load, against this rank's shard of the base and the adapter."""
        torch.manual_seed(0)
        big = LlamaForCausalLM(_big_config())
        for layer in big.model.layers:
            fully_shard(layer, mesh=MESH)
        fully_shard(big, mesh=MESH)
        shard = sum(local(p).numel() * local(p).element_size() for p in big.parameters())
        full = sum(p.numel() * p.element_size() for p in big.parameters())
        size = os.path.getsize(os.path.join(adapter("big"), "adapter_model.safetensors"))
        import ctypes
        import gc

        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed memory back, so the load's allocations must show
        before = _rss("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current size
        loaded = safe_load_adapter(big, adapter("big"))
        peak = _rss("VmHWM") - before
        held = sum(local(p).numel() * local(p).element_size() for p in loaded.parameters())
        return {
            "base_shard_bytes": shard,
            "base_bytes": full,
            "adapter_bytes": size,
            "load_peak_bytes": peak,
            "held_bytes_after": held,
        }


def _big_config() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**REF["big_config"])


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        found = re.search(rf"{field}:\s+(\d+)", f.read())
    assert found is not None, field
    return int(found.group(1)) * 1024


def tp_extras() -> None:
    @check("tp/load_before_sharding_works")
    def _() -> dict[str, Any]:
        """The fix load_before_sharding names for tensor parallelism: load first, then a plan naming the LoRA parts."""
        model = safe_load_adapter(base(), adapter("heads"))
        plan: dict[str, Any] = {}
        for i in range(depth(model, "base_model.model.model.layers")):
            for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
                plan[f"model.layers.{i}.{name}.base_layer"] = ColwiseParallel()
                plan[f"model.layers.{i}.{name}.lora_B.default"] = ColwiseParallel()
            for name in ("self_attn.o_proj", "mlp.down_proj"):
                plan[f"model.layers.{i}.{name}.base_layer"] = RowwiseParallel()
                plan[f"model.layers.{i}.{name}.lora_A.default"] = RowwiseParallel()
        parallelize_module(model.get_submodule("base_model.model"), MESH, plan)
        return {"max_diff": diff(logits(model), REF["heads"])}

    if not available["tp_plan"]:

        @check("tp_plan/refused")
        def refused_by_peft() -> dict[str, Any]:  # named: mypy reads a conditional `_` as an overload
            """An installed peft that cannot shard LoRA by transformers' tp_plan: refused, nothing changed."""
            result = refused(transformers_tp, adapter("good"))
            result["fix"] = "upgrade peft" in diagnose(transformers_tp(), adapter("good")).causes[0].fix
            return result

    @check("tp/saves")
    def _() -> dict[str, Any]:
        model = safe_load_adapter(tensor_parallel(), adapter("good"))
        save_local(model, os.path.join(OUT, "tp_ranks", f"rank_{RANK}"))
        return {}


def documented_examples() -> None:
    """The runnable examples docs/distributed.md shows (examples/distributed_*.py), on this launch's ranks."""
    from examples.distributed_fsdp import shard_and_load
    from examples.distributed_tp import parallelize_and_load

    @check("examples/fsdp")
    def _() -> dict[str, Any]:
        return {"max_diff": diff(logits(shard_and_load(base(), adapter("good"), MESH)), REF["good"])}

    @check("examples/tp")
    def _() -> dict[str, Any]:
        return {"max_diff": diff(logits(parallelize_and_load(base(), adapter("good"), MESH)), REF["good"])}


def silent_rank() -> None:
    """Last: one rank never calls safe_load_adapter; the others must raise after the timeout, not hang."""

    @check("silent_rank")
    def _() -> dict[str, Any]:
        if RANK == WORLD - 1:
            time.sleep(SILENT_TIMEOUT + 1.0)
            return {"skipped": True}
        return refused(fsdp, adapter("good"), collective_timeout=SILENT_TIMEOUT)


for engine in ENGINES:
    if available[engine]:
        engine_checks(engine)
fsdp_extras()
tp_extras()
documented_examples()
silent_rank()
with open(os.path.join(OUT, f"rank{RANK}.json"), "w") as f:
    json.dump({"rank": RANK, "world": WORLD, "results": results}, f, indent=1)
dist.destroy_process_group()
