"""The serving-engine rules gathered: every engine version's rule set, looked up by engine name and version, and
their finding codes, which join the findings catalog when this module is first imported (a load never imports it:
an engine check does). The rule types are in :mod:`safe_peft._engines.rule_types`, the data, one module per engine,
in :mod:`safe_peft._engines.rulesets`.
"""

from __future__ import annotations

from safe_peft._engines.rule_types import RuleSet, canonical_engine
from safe_peft._engines.rulesets.llama_cpp import LLAMACPP_0C1E570
from safe_peft._engines.rulesets.mlx_lm import MLXLM_D78BF58
from safe_peft._engines.rulesets.ollama import OLLAMA_FB30760
from safe_peft._engines.rulesets.sglang import SGLANG_0_5_23
from safe_peft._engines.rulesets.tensorrt_llm import TRTLLM_007E181
from safe_peft._engines.rulesets.vllm import VLLM_0_32

__all__ = ["RULE_SETS", "engine_codes", "rule_set"]

RULE_SETS: tuple[RuleSet, ...] = (
    VLLM_0_32,
    LLAMACPP_0C1E570,
    SGLANG_0_5_23,
    TRTLLM_007E181,
    OLLAMA_FB30760,
    MLXLM_D78BF58,
)


def engine_codes() -> dict[str, tuple[str, str]]:
    """code -> (what it means, the fix), for every code an engine check can emit (the findings catalog registers
    them under ``engine_incompatible``; docs/causes/engine_incompatible.md has a section for each)."""
    out: dict[str, tuple[str, str]] = {}
    for s in RULE_SETS:
        for code, what, fix in s.codes():
            out.setdefault(code, (what, fix))
    return out


def rule_set(engine: str, version: str | None = None) -> RuleSet:
    """The rule set for ``engine`` at ``version`` (None: the newest known); unknown names raise ValueError."""
    name = canonical_engine(engine)
    sets = [s for s in RULE_SETS if s.engine == name]
    if version is None:
        return sets[-1]
    for s in sets:
        if s.version == version:
            return s
    known = ", ".join(s.version for s in sets)
    raise ValueError(f"no rules for {name} {version}; known versions: {known}")


def _register_codes() -> None:
    """The engine checks' finding codes join the findings catalog when the engine rules are first imported (a load
    never imports this data): one code per engine rule under ``engine_incompatible``, and the two reading refusals."""
    from safe_peft._catalog import CATALOG, Entry
    from safe_peft.report import Cause

    entries = [
        Entry(code, Cause.ENGINE_INCOMPATIBLE, 2, False, fix.replace("{", "{{").replace("}", "}}"))
        for code, (_, fix) in engine_codes().items()
    ]
    entries.append(
        Entry(
            "no_peft_config",
            Cause.FOREIGN_FORMAT,
            0,
            True,
            "convert it to a PEFT adapter first (safe-peft fix --remap auto).",
        )
    )
    entries.append(
        Entry(
            "pickle_not_checked",
            Cause.UNSAFE_FORMAT,
            0,
            True,
            "convert the adapter to adapter_model.safetensors with `safe-peft fix` first.",
        )
    )
    for entry in entries:
        CATALOG.setdefault(entry.code, entry)


_register_codes()
