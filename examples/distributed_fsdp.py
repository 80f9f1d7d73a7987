"""Load a LoRA adapter into a model sharded with FSDP2, then train it: the adapter stays one adapter on all ranks.

    torchrun --nproc-per-node 2 examples/distributed_fsdp.py [ADAPTER_DIR]

Without ADAPTER_DIR, rank 0 first saves a demo adapter for a tiny Llama built from a config (nothing downloaded).
"""

from __future__ import annotations

import sys
import tempfile

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard

from safe_peft import safe_load_adapter


def shard_and_load(model: nn.Module, adapter: str, mesh: DeviceMesh, **kwargs: object) -> nn.Module:
    """Shard the base with FSDP2 (each decoder layer, then the root), then load the adapter on every rank.

    safe_peft makes each LoRA layer an FSDP unit on the same mesh, so its weights are sharded and its gradients
    reduced like the base's; if any rank cannot load the adapter, every rank raises and keeps its base as it was.
    """
    for layer in model.model.layers:  # type: ignore[union-attr]
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
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


def _demo_adapter(directory: str) -> None:
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], init_lora_weights=False)
    get_peft_model(_tiny_llama(), lora).save_pretrained(directory)


def main() -> None:
    dist.init_process_group("gloo")  # "nccl" on GPUs; the mesh's device type then "cuda"
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    adapter = sys.argv[1] if len(sys.argv) > 1 else tempfile.gettempdir() + "/safe_peft_demo_adapter"
    if len(sys.argv) == 1 and rank == 0:
        _demo_adapter(adapter)
    dist.barrier()
    model = shard_and_load(_tiny_llama(), adapter, mesh, is_trainable=True)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    batch = torch.randint(1, 100, (2, 8), generator=torch.Generator().manual_seed(rank))  # other data per rank
    model(batch, labels=batch).loss.backward()
    optimizer.step()
    lora_b = model.base_model.model.model.layers[0].self_attn.q_proj.lora_B.default.weight  # type: ignore[union-attr]
    if rank == 0:
        print(f"lora_B is a {type(lora_b).__name__} sharded as {lora_b.placements} over {world} ranks")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
