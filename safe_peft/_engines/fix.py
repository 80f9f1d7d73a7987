"""``safe-peft fix --target ENGINE``: exact, output-preserving conversions of an adapter for a serving engine.

Only conversions that keep peft's outputs exactly (up to float rounding) are made:

- ``fold_scaling``: peft scales module m's product by ``alpha_m / r_m`` (``/ sqrt(r_m)`` with rsLoRA), with
  ``alpha_pattern`` / ``rank_pattern`` overrides. An engine that knows one global ``lora_alpha`` (llama.cpp) uses
  another scale; multiplying ``lora_B`` by ``peft_scale / engine_scale`` and writing a config without rsLoRA and
  alpha_pattern gives the same ``scale * B @ A`` in the engine and in peft.
- ``pad_rank``: zero rows in ``lora_A`` and zero columns in ``lora_B`` add nothing to ``B @ A``; the scale change
  (``alpha / r``) is folded into ``lora_B`` as above.

Anything that has no exact LoRA form (DoRA, full ``modules_to_save`` heads, lora_B biases, trained base biases,
trainable tokens, base-rewriting inits) is refused with the engine's rule and the reason; nothing is approximated.
torch and safetensors are imported only here, when a fix runs.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from safe_peft._catalog import finding
from safe_peft._engines.check import AdapterFacts, TargetReport, check_target, pattern_name
from safe_peft._keys import Role, module_of, pattern_value, role_of
from safe_peft.errors import AdapterFormatError, AdapterLoadError
from safe_peft.report import Diagnosis, LoadReport

__all__ = ["FixReport", "fix_for_target"]

_NOT_EXACT = {
    "dora": "DoRA rescales every output column by a norm of the merged weight: no LoRA product equals it",
    "saved_module": "a full saved head or embedding is not a low-rank update of the base weight",
    "saved_norm": "a full normalisation weight is not a LoRA update",
    "lora_bias": "a bias on lora_B has no place in an A/B pair",
    "base_bias": "trained base biases are not a LoRA update",
    "trainable_tokens": "trainable token rows are not a LoRA update",
    "base_rewriting_init": "the init rewrote the base weights; converting needs the initial model "
    "(peft's path_initial_model_for_weight_conversion)",
    "tied_lm_head_lora": "the engine drops a LoRA on a tied lm_head; no renaming keeps it",
    "rank": "a rank above the engine's limit cannot be lowered exactly",
}


@dataclass(frozen=True)
class FixReport:
    """What :func:`fix_for_target` wrote, and the engine's check of it.

    ``to_dict()`` gives JSON-safe data.

    :param adapter: the input adapter's path.
    :param out_dir: where the fixed adapter was written.
    :param engine: the engine's name.
    :param conversions: the conversions applied, e.g. ``("pad_rank",)``.
    :param factors: the per-module scale factors the conversions applied.
    :param before: the engine's :class:`TargetReport` on the input.
    :param after: the engine's :class:`TargetReport` on the output.

    ```python
    >>> fixed = fix_for_target(adapter_dir, "vllm", os.path.join(tmp, "padded"), pad_rank_to=16)
    >>> fixed.conversions, fixed.after.verdict
    (('pad_rank',), 'serves')

    ```
    """

    adapter: str
    out_dir: str
    engine: str
    conversions: tuple[str, ...]
    factors: dict[str, float]
    before: TargetReport
    after: TargetReport

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter,
            "out_dir": self.out_dir,
            "engine": self.engine,
            "conversions": list(self.conversions),
            "factors": dict(self.factors),
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
        }


def fix_for_target(
    adapter: str | os.PathLike[str],
    target: str,
    out_dir: str | os.PathLike[str],
    *,
    base: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    version: str | None = None,
    pad_rank_to: int | None = None,
    force: bool = False,
) -> FixReport:
    """Write to ``out_dir`` an adapter that engine ``target`` serves with peft's outputs, or raise.

    It applies the exact conversions :func:`check_target` names, then checks the output before moving it into
    place.

    :param adapter: a local adapter directory.
    :param target: the engine: ``"vllm"``, ``"sglang"``, ``"llamacpp"``, ...
    :param out_dir: a new directory, or one safe-peft wrote earlier (with ``force=True``).
    :param base: as in :func:`check_target`.
    :param version: as in :func:`check_target`.
    :param pad_rank_to: also pad every module to this rank.
    :param force: replace an output safe-peft wrote earlier, atomically.
    :returns: the :class:`FixReport`.
    :raises AdapterLoadError: when some engine finding has no exact conversion; its report lists each, with the
        reason. Nothing is written then.

    ```python
    >>> fixed = fix_for_target(adapter_dir, "vllm", os.path.join(tmp, "vllm"), pad_rank_to=16)
    >>> inspect_adapter(os.path.join(tmp, "vllm")).config_r
    16

    ```
    """
    before = check_target(adapter, target, base, version)
    refused = [d for d in before.findings if not d.details.get("conversion")]
    if refused:
        raise AdapterLoadError(_refusal(before, refused))
    conversions = list(before.conversions)
    if pad_rank_to is not None:
        _check_pad_rank(pad_rank_to, before)
        conversions.append("pad_rank")
    facts = AdapterFacts.read(adapter)
    from safe_peft._engines.rules import rule_set
    from safe_peft._fix.writer import write_output

    rules = rule_set(target, version)
    past = _pattern_past_bounds(facts, rules.scaling.model, pad_rank_to)
    if past is not None:  # decided from the header, before a tensor is read
        raise AdapterLoadError(_refusal(before, [past]))
    checked: list[TargetReport] = []
    factors: dict[str, float] = {}

    def fill(staging: str) -> None:
        tensors, config, found = _convert(facts, rules.scaling.model, pad_rank_to)
        factors.update(found)
        if "vlm_prefix" in conversions:
            tensors, config = _vlm_prefix(tensors, config)
        _write(staging, tensors, config, facts, conversions)

    def verify(staging: str) -> None:  # the engine's own check of the output, before it is moved into place
        try:
            after = check_target(staging, target, base, version)
        except AdapterFormatError as exc:  # the conversion itself is past a bound (a 25,000-entry rank_pattern)
            raise AdapterLoadError(exc.report) from None
        if not after.ok:
            raise AdapterLoadError(_refusal(after, list(after.findings)))
        checked.append(replace(after, adapter=os.fspath(out_dir)))

    record = {"source": facts.path, "target": before.engine, "conversions": conversions}
    write_output(out_dir, [facts.directory], fill, verify=verify, force=force, record=record)
    return FixReport(facts.path, os.fspath(out_dir), before.engine, tuple(conversions), factors, before, checked[0])


def _pattern_past_bounds(facts: AdapterFacts, scaling: str, pad_rank_to: int | None) -> Diagnosis | None:
    """The finding when the converted config's rank_pattern would hold more entries than any reader takes."""
    from safe_peft._bounds import MAX_PATTERN_ENTRIES

    base_rank, ranks = _ranks(facts, scaling, pad_rank_to)
    entries = sum(1 for rank in ranks.values() if rank != base_rank)
    if entries <= MAX_PATTERN_ENTRIES:
        return None
    return finding(
        "config_limit_exceeded",
        f"the converted adapter_config.json would list {entries:,} modules in rank_pattern (limit "
        f"{MAX_PATTERN_ENTRIES:,}): their ranks differ from r={base_rank}",
        fix="pad every module to one rank (pad_rank_to / --pad-rank at the adapter's largest rank), or serve the "
        "merged model.",
        details={"entries": entries, "limit": MAX_PATTERN_ENTRIES},
    )


def _check_pad_rank(rank: object, report: TargetReport) -> None:
    """``pad_rank_to`` is a rank the engine serves: a positive integer, at most its largest rank setting."""
    from safe_peft._engines.rules import rule_set

    limit = rule_set(report.engine, report.version).rank_limit
    largest = limit.allowed[-1] if limit is not None else _MAX_PAD_RANK
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= largest:
        raise ValueError(
            f"pad_rank_to={rank!r}: pad to a positive rank of at most {largest:,} "
            f"({report.engine} {report.version} serves no larger one)"
        )


_MAX_PAD_RANK = 4_096  # an engine without a rank setting: far above any real LoRA rank, far below an allocation error


def _refusal(report: TargetReport, findings: list[Diagnosis]) -> LoadReport:
    causes = []
    for d in findings:
        why = _NOT_EXACT.get(str(d.details.get("feature")), "no exact conversion is known")
        causes.append(
            finding(d.code, f"{d.message}. Not converted: {why}.", fix=d.fix, details={**d.details, "not_exact": why})
        )
    return LoadReport(ok=False, causes=causes, adapter=report.adapter, model_class=f"{report.engine} {report.version}")


def _ranks(facts: AdapterFacts, scaling: str, pad_rank_to: int | None) -> tuple[int, dict[str, int]]:
    """The ranks a conversion writes, from the header: the config's ``r`` and each module's (padded) rank. An engine
    with one scale ``alpha / r`` for every module gets every module padded to one rank."""
    pad = pad_rank_to or 0
    one_rank = scaling == "global_alpha_over_r"
    if one_rank:
        pad = max([pad] + [m.rank for m in facts.modules])
    base_rank = pad if one_rank and pad else max(int(facts.config.get("r", 8)), pad)
    return base_rank, {m.name: max(m.rank, pad) for m in facts.modules}


def _convert(
    facts: AdapterFacts, scaling: str, pad_rank_to: int | None
) -> tuple[dict[str, Any], dict[str, Any], dict[str, float]]:
    import torch
    from safetensors.torch import load_file

    tensors = load_file(facts.weights_path)
    cfg = dict(facts.config)
    r, alpha = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    base_rank, planned = _ranks(facts, scaling, pad_rank_to)
    new_ranks: dict[str, int] = {}
    factors: dict[str, float] = {}
    for key in sorted(tensors):
        if role_of(key) is not Role.B:
            continue
        module = module_of(key)
        a_key = key.replace(".lora_B.weight", ".lora_A.weight").replace(".lora_embedding_B", ".lora_embedding_A")
        rank = int(tensors[a_key].shape[0])
        name = pattern_name(module)
        r_m = pattern_value(rank_pattern, name) or r
        a_m = pattern_value(alpha_pattern, name)
        a_m = alpha if a_m is None else float(a_m)
        peft = a_m / math.sqrt(r_m) if cfg.get("use_rslora") else a_m / r_m
        target_rank = planned[name]
        # Once rsLoRA and alpha_pattern are folded, every scaling model gives alpha / the module's (padded) rank.
        engine = alpha / target_rank if alpha else 1.0
        factor = peft / engine
        b = tensors[key]
        work = b.to(torch.float64) * factor
        a = tensors[a_key]
        if target_rank > rank:
            pad = target_rank - rank
            work = torch.cat([work, work.new_zeros(work.shape[0], pad, *work.shape[2:])], dim=1)  # B: [out, r, ...]
            a = torch.cat([a, a.new_zeros(pad, *a.shape[1:])], dim=0)
        dtype = torch.float32 if b.dtype in (torch.float16, torch.bfloat16) else b.dtype  # no rounding to half
        tensors[key] = work.to(dtype).contiguous()
        tensors[a_key] = a.to(dtype).contiguous()
        factors[module] = factor
        new_ranks[name] = target_rank
    cfg["r"] = base_rank
    cfg["use_rslora"] = False
    cfg["alpha_pattern"] = {}
    cfg["rank_pattern"] = {name: k for name, k in sorted(new_ranks.items()) if k != base_rank}
    if not alpha:
        cfg["lora_alpha"] = 0
    return tensors, cfg, factors


_TEXT_PREFIX = "base_model.model.model."
_WRAPPER_PARTS = ("language_model.", "vision_tower.", "multi_modal_projector.", "visual.")


def _vlm_prefix(tensors: dict[str, Any], cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Text-model keys (``model.layers.*``) to the vision-language wrapper's layout (``model.language_model.*``,
    transformers >= 4.52, which the engines map), and the config's ``rank_pattern`` keys with them; keys already in
    the wrapper's layout and lm_head stay."""
    out = {_vlm_name(key, _TEXT_PREFIX): value for key, value in tensors.items()}
    pattern = {_vlm_name(str(name), "model."): rank for name, rank in (cfg.get("rank_pattern") or {}).items()}
    return out, {**cfg, "rank_pattern": pattern}


def _vlm_name(name: str, prefix: str) -> str:
    if name.startswith(prefix) and not name[len(prefix) :].startswith(_WRAPPER_PARTS):
        return prefix + "language_model." + name[len(prefix) :]
    return name


def _write(out: str, tensors: dict[str, Any], cfg: dict[str, Any], facts: AdapterFacts, conversions: list[str]) -> None:
    from safetensors.torch import save_file

    from safe_peft._fingerprint.format import KEY

    source = facts.metadata
    metadata = {
        "format": "pt",
        "safe_peft_fix": ",".join(conversions),
        "safe_peft_source": os.path.basename(facts.path.rstrip(os.sep)),
        **({KEY: source[KEY]} if KEY in source else {}),  # the base is the same: its fingerprint still holds
    }
    save_file(tensors, os.path.join(out, "adapter_model.safetensors"), metadata=metadata)
    with open(os.path.join(out, "adapter_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
