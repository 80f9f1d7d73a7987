"""The generated parts of docs/serving.md and docs/causes/engine_incompatible.md, from the engine rule data.

``python -m safe_peft._engines.docs`` rewrites both between their ``<!-- generated -->`` markers; a test checks
that the committed pages are current.
"""

from __future__ import annotations

import os
import sys

from safe_peft._engines.rule_types import CONVERSIONS, FEATURES, SCALING_MODELS, EngineRule, RuleSet
from safe_peft._engines.rules import RULE_SETS, engine_codes

__all__ = ["update"]

BEGIN, END = "<!-- generated: do not edit by hand -->", "<!-- end generated -->"

_CELL = {"serves": "serves", "serves_wrong": "**serves wrong**", "refuses": "**refuses**"}


def _cell(rule: EngineRule | None) -> str:
    if rule is None:
        return "no rule (unknown)"
    text = _CELL[rule.behaviour]
    if rule.kills_engine:
        text += ", kills the engine"
    if rule.conversion:
        text += f"; fix: `{rule.conversion}`"
    if rule.verified != "engine run":
        text += " (read, not run)"
    return text


def _rank_cell(rules: RuleSet) -> str:
    limit = rules.rank_limit
    if limit is None:
        return "any (scale uses the tensor's rank)" if rules.scaling.model == "global_alpha_over_tensor_rank" else "any"
    return (
        f"<= `{limit.flag}` (default {limit.default}; one of {', '.join(map(str, limit.allowed))}); above: **refuses**"
    )


def _scaling_cell(rules: RuleSet) -> str:
    return SCALING_MODELS[rules.scaling.model] + ("" if rules.scaling.verified == "engine run" else " (read, not run)")


def _applies(rules: RuleSet, feature: str) -> bool:
    return feature != "deploy_target_modules" or rules.target_filter is not None


def _all_rules(rules: RuleSet) -> tuple[EngineRule, ...]:
    extra = (rules.target_filter_rule,) if rules.target_filter_rule is not None else ()
    return rules.rules + extra


def render_table() -> str:
    """The engines x features table, then each engine's rules with their sources."""
    head = "| feature | " + " | ".join(f"{s.title} {s.version}" for s in RULE_SETS) + " |"
    lines = [head, "|---|" + "---|" * len(RULE_SETS)]
    lines.append("| LoRA scale | " + " | ".join(_scaling_cell(s) for s in RULE_SETS) + " |")
    lines.append("| rank | " + " | ".join(_rank_cell(s) for s in RULE_SETS) + " |")
    for feature, what in FEATURES.items():
        if feature == "rank":
            continue
        cells = [_cell(s.rule_for(feature)) if _applies(s, feature) else "no such setting" for s in RULE_SETS]
        lines.append(f"| {what} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Conversions (`safe-peft fix --target ENGINE`), each exact:")
    lines.append("")
    lines.extend(f"- `{name}`: {what}." for name, what in CONVERSIONS.items())
    for s in RULE_SETS:
        lines += ["", f"### {s.title} {s.version}", "", f"How it was run: {s.how_tested}.", ""]
        lines.append(f"- scale: {_scaling_cell(s)} ({s.scaling.source.cite()})")
        if s.rank_limit is not None:
            lines.append(f"- rank: {_rank_cell(s)} ({s.rank_limit.source.cite()})")
        for r in _all_rules(s):
            lines.append(
                f"- `{r.code}` ({r.feature}): {_CELL[r.behaviour]}. {_sentence(r.rule)} Source: "
                f"{r.source.cite()}{_quote(r)}; {r.verified}."
            )
        if s.architectures is not None:
            lines.append(f"- adapters only for {', '.join(s.architectures)} bases ({_cite(s.architectures_source)})")
        if not s.reads_peft:
            lines.append(
                f"- reads no PEFT adapter: its own format only; every PEFT adapter is refused "
                f"({_cite(s.reads_peft_source)})"
            )
    return "\n".join(lines)


def _sentence(text: str) -> str:
    return text.rstrip(".") + "."


def _quote(rule: EngineRule) -> str:
    return f" (`{rule.source.quote}`)" if rule.source.quote and not rule.source.line else ""


def _cite(source: object) -> str:
    return source.cite() if hasattr(source, "cite") else ""


def render_codes() -> str:
    """One section per finding code (the catalog's engine_incompatible entries), for the causes page."""
    lines = []
    for code, (what, fix) in engine_codes().items():
        lines += [f"### `{code}`", _sentence(what), f"Fix: {_sentence(fix)}" if fix else "", ""]
    return "\n".join(line for line in lines).rstrip() + "\n"


def _replace(text: str, generated: str) -> str:
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[:start] + "\n" + generated.rstrip() + "\n" + text[end:]


def update(root: str, *, check: bool = False) -> list[str]:
    """Rewrite the generated parts of both pages under ``root``; return the pages that changed (or would)."""
    changed = []
    for page, generated in (
        (os.path.join(root, "docs", "serving.md"), render_table()),
        (os.path.join(root, "docs", "causes", "engine_incompatible.md"), render_codes()),
    ):
        with open(page, encoding="utf-8") as f:
            text = f.read()
        new = _replace(text, generated)
        if new != text:
            changed.append(page)
            if not check:
                with open(page, "w", encoding="utf-8") as f:
                    f.write(new)
    return changed


if __name__ == "__main__":
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
    print("\n".join(update(here, check="--check" in sys.argv)) or "up to date")
