"""Tiny models of (nearly) every transformers architecture, built from their config classes alone.

No weights and no test configs are downloaded: each config class is instantiated with its defaults and then
shrunk by a fixed table of size attributes (widths, depths, heads, vocabularies, image and audio sizes), recursing
into sub-configs (``text_config``, ``vision_config``, ...). A model is "tiny" when it builds with at most
``MAX_PARAMETERS`` parameters; anything else is an exclusion with its reason.
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from collections.abc import Iterator
from typing import Any

import torch

MAX_PARAMETERS = 8_000_000

# attribute -> tiny value (ints), applied wherever the attribute exists with an int value
_SIZES: dict[str, int] = {
    "hidden_size": 64,
    "d_model": 64,
    "n_embd": 64,
    "embed_dim": 64,
    "dim": 64,
    "word_embed_proj_dim": 64,
    "projection_dim": 32,
    "text_embed_dim": 64,
    "vision_embed_dim": 64,
    "hidden_dim": 64,
    "d_kv": 16,
    "num_hidden_layers": 2,
    "n_layer": 2,
    "n_layers": 2,
    "num_layers": 2,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "num_decoder_layers": 2,
    "num_encoder_layers": 2,
    "text_layers": 2,
    "vision_layers": 2,
    "num_attention_heads": 4,
    "n_head": 4,
    "n_heads": 4,
    "num_heads": 4,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "num_key_value_heads": 2,
    "n_kv_heads": 2,
    "multi_query_group_num": 2,
    "intermediate_size": 128,
    "ffn_dim": 128,
    "encoder_ffn_dim": 128,
    "decoder_ffn_dim": 128,
    "n_inner": 128,
    "d_ff": 128,
    "ffn_hidden_size": 128,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "expert_intermediate_size": 32,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "moe_num_experts": 4,
    "num_experts_per_tok": 2,
    "top_k": 2,
    "n_shared_experts": 1,
    "head_dim": 16,
    "kv_lora_rank": 16,
    "q_lora_rank": 32,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    "max_position_embeddings": 128,
    "n_positions": 128,
    "max_source_positions": 64,
    "max_target_positions": 64,
    "image_size": 32,
    "patch_size": 8,
    "num_mel_bins": 16,
    "conv_dim_last": 32,
    "num_labels": 3,
}
# list attributes whose entries become 1 (one block per stage); the number of stages is kept, since other lists of
# the same config (heads, widths, ratios per stage) must keep their length
_QUARTER = ("hidden_sizes", "embed_dims", "dims", "channels")  # per-stage widths: a quarter, divisibility kept
_ONES = ("depths", "num_layers_per_stage", "layers_per_stage", "encoder_layers_per_stage")


def _shrink(config: Any, seen: set[int]) -> None:
    if id(config) in seen:
        return
    seen.add(id(config))
    state = vars(config)
    for name, value in list(state.items()):
        if hasattr(value, "to_dict") and hasattr(value, "model_type"):
            _shrink(value, seen)
        elif isinstance(value, bool):
            continue
        elif isinstance(value, int) and name in _SIZES and value > _SIZES[name]:
            setattr(config, name, _SIZES[name])
        elif isinstance(value, int) and name == "vocab_size" and value > 512:
            config.vocab_size = 512
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, int) for v in value):
            if name in _ONES:
                setattr(config, name, type(value)([1] * len(value)))
            elif name in _QUARTER and all(v % 16 == 0 for v in value):
                setattr(config, name, type(value)(v // 4 for v in value))
    for token in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id"):
        value = state.get(token)
        vocab = state.get("vocab_size")
        if isinstance(value, int) and isinstance(vocab, int) and value >= vocab:
            setattr(config, token, vocab - 1)
    if isinstance(state.get("layer_types"), list) and isinstance(state.get("num_hidden_layers"), int):
        config.layer_types = config.layer_types[: config.num_hidden_layers]


def tiny_config(model_type: str) -> Any:
    """The config of ``model_type`` with every known size attribute shrunk (a new object each call)."""
    from transformers import CONFIG_MAPPING

    with quiet():
        config = CONFIG_MAPPING[model_type]()
        _shrink(config, set())
    return config


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No warnings, no prints: transformers' notices while building hundreds of models."""
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        yield


def build_tiny(model_type: str, class_name: str, *, seed: int = 0, device: str = "cpu") -> torch.nn.Module:
    """The tiny model of ``class_name`` for ``model_type``, with fixed weights. Raises ValueError if not tiny."""
    import transformers

    cls = getattr(transformers, class_name)
    config = tiny_config(model_type)
    with quiet(), torch.device("meta"):
        probe = cls(copy.deepcopy(config))
    count = sum(p.numel() for p in probe.parameters())
    if count > MAX_PARAMETERS:
        raise ValueError(f"not tiny: {count:,} parameters after shrinking")
    torch.manual_seed(seed)
    with quiet(), torch.device(device):
        model = cls(config)
    return model.eval()
