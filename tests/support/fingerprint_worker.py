"""One rank of the base fingerprint's FSDP2 test, launched by tests/test_fingerprint.py through torchrun (gloo, CPU).

Each rank shards the tiny Llama with FSDP2 (the same base, or another seed's), loads a stamped adapter and writes
what it saw to ``OUT/rank<r>.json``: whether the load succeeded, the finding's code, whether the model was restored.

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m tests.support.fingerprint_worker STAMPED OUT
"""

from __future__ import annotations

import faulthandler
import hashlib
import json
import os
import sys
from typing import Any

import torch
import torch.distributed as dist

STAMPED, OUT = sys.argv[1], sys.argv[2]
faulthandler.dump_traceback_later(120, exit=True)  # a hang shows every rank's stack, then ends the launch
dist.init_process_group("gloo")
RANK, WORLD = dist.get_rank(), dist.get_world_size()

from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from safe_peft import AdapterLoadError, safe_load_adapter  # noqa: E402
from tests.support.helpers import build  # noqa: E402

MESH = init_device_mesh("cpu", (WORLD,))


def sharded(seed: int) -> torch.nn.Module:
    model = build("causal", seed=seed)
    for layer in model.get_submodule("model.layers").children():
        fully_shard(layer, mesh=MESH)
    fully_shard(model, mesh=MESH)  # in place: the same module, its class swapped for an FSDP one
    return model


def digest(model: torch.nn.Module) -> str:
    found = hashlib.sha256()
    for name, param in model.named_parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        found.update(name.encode() + local.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return found.hexdigest()


def attempt(seed: int) -> dict[str, Any]:
    model = sharded(seed)
    before = digest(model)
    try:
        safe_load_adapter(model, STAMPED)
    except AdapterLoadError as exc:
        primary = exc.report.primary
        return {"loaded": False, "code": primary.code if primary else None, "restored": digest(model) == before}
    return {"loaded": True}


results = {"same_base": attempt(0), "other_base": attempt(5)}
with open(os.path.join(OUT, f"rank{RANK}.json"), "w") as f:
    json.dump(results, f)
dist.barrier()
dist.destroy_process_group()
