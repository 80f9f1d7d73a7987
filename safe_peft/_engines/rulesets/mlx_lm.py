"""MLX-LM's rules: it reads no PEFT adapter (its own format only), read from its source."""

from __future__ import annotations

from safe_peft._engines.rule_types import RuleSet, Source

__all__ = ["MLXLM_D78BF58"]

_MLX = "mlx-lm d78bf58"


MLXLM_D78BF58 = RuleSet(
    engine="mlx-lm",
    version="d78bf58",
    title="MLX-LM",
    scaling="peft",
    scaling_source=Source("mlx_lm/tuner/lora.py", 98, _MLX, "return y + (self.scale * z).astype(x.dtype)"),
    scaling_verified="source",
    how_tested="read from mlx_lm/tuner/utils.py at d78bf58 (Apple silicon only); tested against hand-built cases",
    reads_peft=False,
    reads_peft_source=Source(
        "mlx_lm/tuner/utils.py", 134, _MLX, 'config.num_layers, config.lora_parameters ... "adapters.safetensors"'
    ),
    rules=(),
)
