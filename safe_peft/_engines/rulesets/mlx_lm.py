"""MLX-LM's rules: it reads no PEFT adapter (its own format only), read from its source."""

from __future__ import annotations

from safe_peft._engines.rule_types import Release, RuleSet, Scaling

__all__ = ["MLXLM_D78BF58"]

_mlx = Release("mlx-lm", "d78bf58", "MLX-LM", folder="mlx_lm/tuner/")


MLXLM_D78BF58 = RuleSet(
    _mlx,
    Scaling("peft", _mlx("lora.py", 98, "return y + (self.scale * z).astype(x.dtype)"), verified="source"),
    how_tested="read from mlx_lm/tuner/utils.py at d78bf58 (Apple silicon only); tested against hand-built cases",
    reads_peft=False,
    reads_peft_source=_mlx("utils.py", 134, 'config.num_layers, config.lora_parameters ... "adapters.safetensors"'),
    rules=(),
)
