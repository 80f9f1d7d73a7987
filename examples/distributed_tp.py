"""Load a LoRA adapter into a model split with tensor parallelism (``parallelize_module``), on every rank.

    torchrun --nproc-per-node 2 examples/distributed_tp.py [ADAPTER_DIR]

Without ADAPTER_DIR, rank 0 first saves a demo adapter for a tiny Llama built from a config (nothing downloaded).
"""

from __future__ import annotations

import sys
import tempfile

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from safe_peft import safe_load_adapter


def parallelize_and_load(model: nn.Module, adapter: str, mesh: DeviceMesh, **kwargs: object) -> nn.Module:
    """Split attention and MLP projections over the mesh (column-parallel in, row-parallel out), then load.

    safe_peft gives each LoRA layer its base layer's style: lora_B of a column-parallel layer and lora_A of a
    row-parallel one are sharded the same way; the other half stays replicated and autograd reduces its gradient.
    """
    plan: dict[str, ColwiseParallel | RowwiseParallel] = {}
    for i in range(len(model.model.layers)):  # type: ignore[union-attr, arg-type]
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            plan[f"model.layers.{i}.{name}"] = ColwiseParallel()
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            plan[f"model.layers.{i}.{name}"] = RowwiseParallel()
    parallelize_module(model, mesh, plan)  # type: ignore[arg-type]
    return safe_load_adapter(model, adapter, collective_timeout=120, **kwargs)  # type: ignore[no-any-return]


def _tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=100,
    )
    return LlamaForCausalLM(config)


def main() -> None:
    from peft import LoraConfig, get_peft_model

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    adapter = sys.argv[1] if len(sys.argv) > 1 else tempfile.gettempdir() + "/safe_peft_demo_adapter_tp"
    if len(sys.argv) == 1 and rank == 0:
        lora = LoraConfig(r=8, target_modules=["q_proj", "o_proj"], init_lora_weights=False)
        get_peft_model(_tiny_llama(), lora).save_pretrained(adapter)
    dist.barrier()
    model = parallelize_and_load(_tiny_llama(), adapter, mesh)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 13]])).logits  # every rank feeds the same tokens
    attention = model.base_model.model.model.layers[0].self_attn  # type: ignore[union-attr]
    if rank == 0:
        print(
            f"q_proj.lora_B: {attention.q_proj.lora_B.default.weight.placements}, "
            f"o_proj.lora_A: {attention.o_proj.lora_A.default.weight.placements}, logits {tuple(logits.shape)}"
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
