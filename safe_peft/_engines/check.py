"""``check_target``: will a serving engine serve this adapter, and serve it right?

Reads the adapter config and the safetensors header (no tensor data, no torch), optionally the base model's
``config.json``, finds the adapter features that matter to engines (DoRA, saved heads, rsLoRA and per-module
scales, ranks, tied heads, MoE layouts, VLM prefixes, ...) and looks each up in the engine's rule set
(:mod:`safe_peft._engines.rulesets`). Each finding is a :class:`~safe_peft.report.Diagnosis` with cause
``engine_incompatible``, the engine's rule, whether the engine refuses loudly or serves wrong silently, the
engine arguments to use and the fix.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from safe_peft._bounds import MAX_CONFIG_BYTES, json_safe, open_regular
from safe_peft._catalog import finding
from safe_peft._engines.rule_types import BEHAVIOURS, CONVERSIONS, FEATURES, EngineRule, RuleSet
from safe_peft._engines.rules import rule_set
from safe_peft._files.config import read_config
from safe_peft._files.locate import locate_adapter, no_config_error
from safe_peft._files.safetensors_header import read_header
from safe_peft._keys import Role, module_of, pattern_value, role_of, strip_prefix
from safe_peft.errors import AdapterFormatError, AdapterLoadError
from safe_peft.report import Diagnosis

__all__ = ["AdapterFacts", "TargetReport", "check_target", "pattern_name", "unreadable"]

_BASE_REWRITING = ("pissa", "olora", "corda", "loftq")
_HALF = frozenset({"F16", "BF16"})


@dataclass(frozen=True)
class LoraModule:
    """One LoRA-adapted module (or fused parameter) of the adapter: its name without peft's prefix and its rank."""

    name: str
    rank: int
    embedding: bool = False


@dataclass(frozen=True)
class AdapterFacts:
    """What engines care about in an adapter, from its config and header only."""

    path: str
    config: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    modules: tuple[LoraModule, ...]
    weights_path: str = ""  # where a conversion reads the tensors
    directory: str = ""  # the adapter's directory (a hub id's snapshot): what a writer must not touch
    metadata: Mapping[str, str] = field(default_factory=dict)  # the header's __metadata__ (a base fingerprint, say)

    @classmethod
    def read(cls, adapter: str | os.PathLike[str]) -> AdapterFacts:
        files = locate_adapter(adapter)
        if not files.config_path and not _is_kohya_file(files.weights_path):
            raise no_config_error(files)  # as the peft check says it
        if not files.config_path:
            raise AdapterFormatError.of(
                "no_peft_config",
                f"{files.location}: has no adapter_config.json; serving engines load PEFT adapters",
                fix="convert it to a PEFT adapter first (safe-peft fix --remap auto).",
                adapter=files.location,
            )
        config = read_config(files.config_path, adapter=files.location).data
        if files.weights_format != "safetensors":
            raise AdapterFormatError.of(
                "pickle_not_checked",
                f"{files.weights_path}: engine checks read the safetensors header only",
                fix="convert the adapter to adapter_model.safetensors with `safe-peft fix` first.",
                adapter=files.location,
            )
        header = read_header(files.weights_path)
        shapes = {t.name: t.shape for t in header.tensors.values()}
        dtypes = {t.name: t.dtype for t in header.tensors.values()}
        modules = _modules(shapes)
        from safe_peft._files.config_values import check_config  # the values and patterns, bounded as on every surface

        names = {m.name for m in modules} | {_module(k) for k in shapes}
        check_config(config, sorted(names), path=files.config_path, adapter=files.location)
        return cls(
            str(files.location),
            config,
            shapes,
            dtypes,
            modules,
            files.weights_path,
            files.directory,
            dict(header.metadata),
        )

    @property
    def peft_type(self) -> str:
        return str(self.config.get("peft_type", ""))

    @property
    def max_rank(self) -> int:
        """The rank an engine must serve: the largest of the weights' ranks and the config's own ``r`` (vLLM's
        ``PEFTHelper.validate_legal``, vllm/lora/peft_helper.py, checks ``r`` against ``max_lora_rank``)."""
        r = self.config.get("r", 8)
        own = [r] if isinstance(r, int) and not isinstance(r, bool) else []
        return max([m.rank for m in self.modules] + own + [0])


@dataclass(frozen=True)
class BaseFacts:
    """The base model facts engines care about, from its ``config.json`` (no transformers needed)."""

    tie_word_embeddings: bool | None = None
    vision_language: bool = False
    num_experts: int | None = None
    model_type: str = ""

    @classmethod
    def read(cls, base: str | os.PathLike[str] | Mapping[str, Any] | None) -> BaseFacts | None:
        if base is None:
            return None
        if isinstance(base, Mapping):
            config: dict[str, Any] = dict(base)
        else:
            path = os.fspath(base)
            path = os.path.join(path, "config.json") if os.path.isdir(path) else path
            try:
                f, size = open_regular(path)
                with f:
                    if size > MAX_CONFIG_BYTES:
                        raise ValueError(f"{size} bytes, more than {MAX_CONFIG_BYTES}")
                    config = json.loads(f.read(size).decode("utf-8"))
            except (OSError, ValueError) as exc:
                raise ValueError(f"base {os.fspath(base)!r}: cannot read a model config.json ({exc})") from None
        text = config.get("text_config") or {}
        tie = config.get("tie_word_embeddings", text.get("tie_word_embeddings"))
        experts = config.get("num_local_experts") or config.get("num_experts") or text.get("num_experts")
        return cls(
            tie_word_embeddings=bool(tie) if tie is not None else True,  # transformers' default
            vision_language="vision_config" in config,
            num_experts=int(experts) if isinstance(experts, int) else None,
            model_type=str(config.get("model_type", "")),
        )


@dataclass(frozen=True)
class Feature:
    """An adapter feature found, with the modules or keys that show it."""

    name: str
    evidence: tuple[str, ...] = ()
    detail: str = ""


@dataclass(frozen=True)
class TargetReport:
    """The verdict of one serving engine on one adapter.

    :func:`check_target` builds it. ``ok`` is True when the verdict is ``serves``. ``fixable`` says whether
    :func:`fix_for_target` turns the adapter into one the engine serves exactly. ``str(report)`` renders it;
    ``to_dict()`` gives JSON-safe data.

    :param adapter: the adapter's path.
    :param engine: the engine's name (``"vllm"``, ``"sglang"``, ``"llamacpp"``, ...).
    :param version: the version of the engine's rule set.
    :param verdict: ``serves``: outputs equal peft's. ``serves_wrong``: the engine loads it with exit code 0 and
        serves different outputs. ``refuses``: a loud error. ``unknown``: a feature no rule covers. On the command
        line also ``unreadable``: the adapter's files cannot be read, and the findings say why.
    :param findings: the coded findings (:class:`Diagnosis`, cause ``engine_incompatible``).
    :param notes: remarks that change nothing.
    :param engine_args: the settings the engine needs, e.g. ``{"max_lora_rank": 64}``.
    :param command: the same settings as command-line flags.
    :param conversions: the exact ``safe-peft fix --target`` conversions that make it serve.

    ```python
    >>> report = check_target(adapter_dir, "vllm", engine_args={"max_lora_rank": 4})
    >>> report.verdict, [finding.code for finding in report.findings]
    ('refuses', ['vllm_max_lora_rank'])
    >>> report.command
    ('--enable-lora', '--max-lora-rank', '4')

    ```
    """

    adapter: str
    engine: str
    version: str
    verdict: str
    findings: tuple[Diagnosis, ...] = ()
    notes: tuple[str, ...] = ()
    engine_args: dict[str, Any] = field(default_factory=dict)
    command: tuple[str, ...] = ()
    conversions: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.verdict == "serves"

    @property
    def fixable(self) -> bool:
        """Whether ``safe-peft fix --target`` turns this adapter into one the engine serves exactly."""
        return not self.ok and bool(self.findings) and all(d.details.get("conversion") for d in self.findings)

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter,
            "engine": self.engine,
            "engine_version": self.version,
            "verdict": self.verdict,
            "fixable": self.fixable,
            "conversions": list(self.conversions),
            "engine_args": json_safe(self.engine_args),
            "command": list(self.command),
            "findings": [d.to_dict() for d in self.findings],
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        lines = [f"{self.adapter} on {self.engine} {self.version}: {self.verdict}"]
        for d in self.findings:
            how = d.details.get("behaviour", "")
            lines.append(f"  [{d.code}] {how}: {d.message}")
            lines.append(f"    rule: {d.details.get('rule', '')} ({d.details.get('source', '')})")
            if d.fix:
                lines.append(f"    fix: {d.fix}")
        if self.command:
            lines.append(f"  engine arguments: {' '.join(self.command)}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def check_target(
    adapter: str | os.PathLike[str],
    target: str = "vllm",
    base: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    version: str | None = None,
    *,
    engine_args: Mapping[str, Any] | None = None,
) -> TargetReport:
    """Predict what serving engine ``target`` does with ``adapter``, before deploying it.

    It reads the adapter config and safetensors header only: no torch, no tensor data.

    :param adapter: a local adapter directory.
    :param target: the engine: ``"vllm"``, ``"sglang"``, ``"llamacpp"``, ...
    :param base: the base model's config: a model directory holding config.json, its path, or the config as a
        dict. It lets the check see tied embeddings, vision-language wrappers and MoE experts; without it those are
        judged conservatively.
    :param version: the engine version whose rule set applies (default: the newest known).
    :param engine_args: the settings the engine will run with, e.g. ``{"max_lora_rank": 16}``. By default the
        check says which ones are needed.
    :returns: the engine's :class:`TargetReport`.
    :raises ValueError: for an engine or version it has no rules for.

    ```python
    >>> report = check_target(adapter_dir, "vllm")
    >>> report.verdict, report.command
    ('serves', ('--enable-lora',))

    ```
    """
    rules = rule_set(target, version)
    facts = AdapterFacts.read(adapter)
    base_facts = BaseFacts.read(base)
    return evaluate(facts, rules, base_facts, dict(engine_args or {}))


def unreadable(adapter: str, target: str, version: str | None, error: AdapterLoadError) -> TargetReport:
    """The report on an adapter whose files cannot be read (verdict ``unreadable``): the reading error's findings."""
    rules = rule_set(target, version)
    return TargetReport(os.fspath(adapter), rules.engine, rules.version, "unreadable", tuple(error.report.causes))


def evaluate(facts: AdapterFacts, rules: RuleSet, base: BaseFacts | None, engine_args: dict[str, Any]) -> TargetReport:
    """The pure part of ``check_target``: facts and rules in, verdict out."""
    findings: list[Diagnosis] = []
    notes: list[str] = []
    if not rules.reads_peft:
        source = rules.reads_peft_source
        rule = EngineRule(
            "peft_layout",
            "refuses",
            f"{rules.prefix}_no_peft_adapters",
            f"{rules.title} loads "
            "adapters in its own format only (not adapter_config.json + adapter_model.safetensors)",
            _MERGE_FIX,
            source if source is not None else rules.scaling.source,
            "source",
            refuses_when="load",
        )
        findings.append(_from_rule(rules, rule, Feature("peft_layout")))
        return TargetReport(facts.path, rules.engine, rules.version, "refuses", tuple(findings))
    if rules.architectures is not None:
        arch = _architecture(rules, base)
        if arch is not None:
            findings.append(arch)
    if facts.peft_type.upper() != "LORA":
        findings.append(
            _finding(
                rules,
                None,
                "refuses",
                f"{rules.prefix}_not_lora",
                f"peft_type {facts.peft_type!r}: serving engines load LoRA adapters only",
                "serve the merged model",
            )
        )
    features = detect_features(facts, base)
    if base is None:  # tied or not decides some verdicts: without the base, judge both and keep the worse
        for untied, tied in (("lm_head_lora", "tied_lm_head_lora"), ("embedding_lora", "tied_embedding_lora")):
            if any(f.name == untied for f in features):
                features.append(
                    Feature(
                        tied,
                        detail="without base= the check cannot tell whether the embeddings "
                        "are tied, and assumes the worse case",
                    )
                )
                notes.append("pass base= (the model directory) to tell tied embeddings from untied ones")
    for feature in features:
        found = rules.rule_for(feature.name)
        if found is None:
            findings.append(_unknown(rules, feature))
        elif found.behaviour == "serves":
            notes.append(f"{FEATURES[feature.name]}: {found.rule}")
        else:
            findings.append(_from_rule(rules, found, feature))
    findings.extend(_scaling(facts, rules))
    findings.extend(_deploy_targets(facts, rules, engine_args))
    args, command, rank_finding = _rank(facts, rules, engine_args)
    if rank_finding is not None:
        findings.append(rank_finding)
    verdict = _verdict(findings)
    conversions = tuple(dict.fromkeys(str(d.details["conversion"]) for d in findings if d.details.get("conversion")))
    return TargetReport(
        adapter=facts.path,
        engine=rules.engine,
        version=rules.version,
        verdict=verdict,
        findings=tuple(sorted(findings, key=lambda d: -_severity(d))),
        notes=tuple(notes),
        engine_args=args,
        command=command,
        conversions=conversions,
    )


_MERGE_FIX = "merge the adapter with peft (merge_and_unload) and serve the merged model"


def _architecture(rules: RuleSet, base: BaseFacts | None) -> Diagnosis | None:
    allowed = rules.architectures or ()
    source = rules.architectures_source or rules.scaling.source
    if base is None or not base.model_type:
        rule = EngineRule(
            "architecture",
            "unknown",
            f"{rules.prefix}_architecture_unknown",
            f"adapters only for {', '.join(allowed)} bases",
            "pass base= so the check can see the architecture",
            source,
            "source",
        )
        d = _from_rule(rules, rule, Feature("architecture"))
        return finding(
            d.code,
            f"{rules.title} takes adapters for {', '.join(allowed)} bases only; "
            "without base= the architecture is unknown",
            fix=d.fix,
            details=d.details,
        )
    if base.model_type in allowed:
        return None
    rule = EngineRule(
        "architecture",
        "refuses",
        f"{rules.prefix}_unsupported_architecture",
        f"adapters only for {', '.join(allowed)} bases (unsupported architecture)",
        _MERGE_FIX,
        source,
        "source",
        refuses_when="conversion",
    )
    return _from_rule(rules, rule, Feature("architecture", detail=f"the base is {base.model_type!r}"))


def _is_kohya_file(path: str) -> bool:
    from safe_peft._plan.kohya import is_kohya

    try:
        return is_kohya({k: t.shape for k, t in read_header(path).tensors.items()})
    except AdapterFormatError:
        return False


# --- features ------------------------------------------------------------------------------------------------


def detect_features(facts: AdapterFacts, base: BaseFacts | None) -> list[Feature]:
    """The engine-relevant features of an adapter (order: as in ``FEATURES``)."""
    cfg = facts.config
    keys = list(facts.shapes)
    found: dict[str, Feature] = {}

    def add(name: str, evidence: list[str] | tuple[str, ...] = (), detail: str = "") -> None:
        if name not in found:
            found[name] = Feature(name, tuple(evidence[:5]), detail)

    magnitude = [k for k in keys if k.endswith("lora_magnitude_vector") or ".lora_magnitude_vector." in k]
    if cfg.get("use_dora") or magnitude:
        add("dora", magnitude)
    if cfg.get("use_rslora"):
        add("rslora")
    if cfg.get("rank_pattern"):
        add("rank_pattern", list(cfg["rank_pattern"]))
    if cfg.get("alpha_pattern"):
        add("alpha_pattern", list(cfg["alpha_pattern"]))
    lora_bias = [k for k in keys if k.endswith(".lora_B.bias")]
    if cfg.get("lora_bias") or lora_bias:
        add("lora_bias", lora_bias)
    tokens = [k for k in keys if ".token_adapter." in k or k.endswith("trainable_tokens_delta")]
    if tokens or cfg.get("trainable_token_indices"):
        add("trainable_tokens", tokens)
    plain = [k for k in keys if _role(k) is None and not tokens.count(k) and k not in magnitude and k not in lora_bias]
    biases = [k for k in plain if k.endswith(".bias")]
    if biases or cfg.get("bias", "none") not in ("none", None):
        add("base_bias", biases, detail=f"bias={cfg.get('bias')!r}")
    full = [k for k in plain if k.endswith(".weight") and ".base_layer." not in k]
    norms = [k for k in full if "norm" in _module(k).rsplit(".", 1)[-1]]
    heads = [k for k in full if k not in norms]
    if heads:
        add("saved_module", heads)
    if norms:
        add("saved_norm", norms)
    tied = base.tie_word_embeddings if base is not None else None
    embedding = [m.name for m in facts.modules if m.embedding]
    if embedding:
        add("tied_embedding_lora" if tied else "embedding_lora", embedding)
    heads_lora = [m.name for m in facts.modules if m.name.rsplit(".", 1)[-1] == "lm_head"]
    if heads_lora:
        add("tied_lm_head_lora" if tied else "lm_head_lora", heads_lora)
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING):
        add("base_rewriting_init", detail=f"init_lora_weights={init!r}")
    if cfg.get("layer_replication"):
        add("layer_replication")
    experts = [m.name for m in facts.modules if _is_fused_expert(m.name)]
    expert_params = [p for p in cfg.get("target_parameters") or [] if "expert" in str(p)]
    if experts or expert_params:
        add("moe_target_parameters", experts or expert_params)
    # A router LoRA: peft targets MixtralTopKRouter-style routers through target_parameters ("gate.weight").
    routers = [m.name for m in facts.modules if re.search(r"\.(mlp|block_sparse_moe)\.(gate|router)$", m.name)]
    if routers and (base is None or base.num_experts):
        add("moe_router_lora", routers)
    if base is not None and base.num_experts:
        add("moe_base", detail=f"{base.num_experts} experts")
    if base is not None and base.vision_language:
        text = [m.name for m in facts.modules if ".layers." in m.name and "language_model" not in m.name]
        if text:
            add("vlm_text_layout", text)
    half = sorted({d for k, d in facts.dtypes.items() if _role(k) is not None and d in _HALF})
    if half:
        add("half_precision", detail=", ".join(half))
    order = list(FEATURES)
    return sorted(found.values(), key=lambda f: order.index(f.name))


def _role(key: str) -> str | None:
    """``"A"`` / ``"B"`` for a LoRA down / up projection (linear or embedding), None for any other tensor (the
    grammar is :mod:`safe_peft._keys`')."""
    role = role_of(key)
    return "A" if role is Role.A else "B" if role is Role.B else None


def _module(key: str) -> str:
    """The module a key belongs to, without peft's prefix: a LoRA key's layer, else the tensor's parent."""
    return module_of(key) if _role(key) is not None else strip_prefix(key).rsplit(".", 1)[0]


def _is_fused_expert(name: str) -> bool:
    return name.endswith((".experts.gate_up_proj", ".experts.down_proj"))


def _modules(shapes: Mapping[str, tuple[int, ...]]) -> tuple[LoraModule, ...]:
    out: dict[str, LoraModule] = {}
    for key, shape in shapes.items():
        role = _role(key)
        if role != "A" or not shape:
            continue
        name = pattern_name(_module(key))
        out[name] = LoraModule(name, int(shape[0]), embedding="lora_embedding_A" in key)
    return tuple(out.values())


def pattern_name(module: str) -> str:
    """The name rank_pattern / alpha_pattern keys match for a LoRA's module: peft saves fused-expert LoRAs
    (target_parameters) as ``experts.base_layer`` (the first parameter, gate_up_proj) and ``experts`` (the second,
    down_proj), and patterns match the parameter names."""
    if module.endswith(".experts.base_layer"):
        return module[: -len(".base_layer")] + ".gate_up_proj"
    if module.endswith(".experts"):
        return module + ".down_proj"
    return module


# --- scaling -------------------------------------------------------------------------------------------------


def module_scales(facts: AdapterFacts, scaling: str) -> dict[str, tuple[float, float]]:
    """Module -> (peft's scale, the engine's scale) for the engine scaling model ``scaling``."""
    cfg = facts.config
    r, alpha = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    out = {}
    for m in facts.modules:
        if _is_fused_expert(m.name):  # stored as rank r * experts; judged by the moe_target_parameters rule
            continue
        rank = pattern_value(rank_pattern, m.name) or r
        a = pattern_value(alpha_pattern, m.name)
        a = alpha if a is None else a
        peft = a / math.sqrt(rank) if cfg.get("use_rslora") else a / rank
        if scaling == "peft":
            engine = peft
        elif scaling == "global_alpha_over_tensor_rank":
            engine = alpha / m.rank if alpha else 1.0
        elif scaling == "global_alpha_over_tensor_rank_rslora":
            engine = alpha / (math.sqrt(m.rank) if cfg.get("use_rslora") else m.rank)
        elif scaling == "global_alpha_over_r":
            engine = alpha / r
        else:
            raise ValueError(f"unknown scaling model {scaling!r}")
        out[m.name] = (float(peft), float(engine))
    return out


def _scaling(facts: AdapterFacts, rules: RuleSet) -> list[Diagnosis]:
    scales = module_scales(facts, rules.scaling.model)
    wrong = {m: s for m, s in scales.items() if not math.isclose(s[0], s[1], rel_tol=1e-6)}
    if not wrong:
        return []
    cfg = facts.config
    if cfg.get("use_rslora"):
        feature = "rslora"
    elif any(pattern_value(cfg.get("alpha_pattern"), m) is not None for m in wrong):
        feature = "alpha_pattern"
    else:
        feature = "rank_pattern"
    rule = rules.rule_for(feature)
    sample = sorted(wrong)[:3]
    detail = "; ".join(f"{m}: peft {wrong[m][0]:.4g}, engine {wrong[m][1]:.4g}" for m in sample)
    more = f" (+{len(wrong) - len(sample)} more)" if len(wrong) > len(sample) else ""
    message = f"{len(wrong)} of {len(scales)} modules would be scaled differently from peft: {detail}{more}"
    if rule is None or rule.behaviour == "serves":
        rule = EngineRule(
            feature,
            "serves_wrong",
            f"{rules.prefix}_scaling",
            f"{rules.engine} scales LoRA products as {rules.scaling.model}",
            "safe-peft fix --target folds the peft scale into lora_B",
            rules.scaling.source,
            verified=rules.scaling.verified,
            conversion="fold_scaling",
        )
    d = _from_rule(rules, rule, Feature(feature, tuple(sample)))
    return [finding(d.code, message, fix=d.fix, details={**d.details, "scales": {m: list(wrong[m]) for m in sample}})]


# --- deployment-time target filter ---------------------------------------------------------------------------


def _deploy_targets(facts: AdapterFacts, rules: RuleSet, engine_args: Mapping[str, Any]) -> list[Diagnosis]:
    """Modules a deployment-time filter (vLLM's --lora-target-modules) leaves without their LoRA."""
    rule, setting = rules.target_filter_rule, rules.target_filter
    if rule is None or setting is None or engine_args.get(setting) is None:
        return []
    listed = set(engine_args[setting])
    parent = {child: p for p, children in rules.packed_modules for child in children}
    children = dict(rules.packed_modules)

    def kept(module: str) -> bool:
        suffix = module.rsplit(".", 1)[-1]
        runtime = parent.get(suffix, suffix)
        return suffix in listed or runtime in listed or any(c in listed for c in children.get(runtime, ()))

    dropped = sorted({m.name.rsplit(".", 1)[-1] for m in facts.modules if not kept(m.name)})
    if not dropped:
        return []
    everything = all(not kept(m.name) for m in facts.modules)
    what = "the base model (no module of the adapter is listed)" if everything else "the adapter without them"
    feature = Feature("deploy_target_modules", tuple(dropped), f"{setting}={sorted(listed)}: serves {what}")
    return [_from_rule(rules, rule, feature)]


# --- rank ----------------------------------------------------------------------------------------------------


def _rank(
    facts: AdapterFacts, rules: RuleSet, engine_args: dict[str, Any]
) -> tuple[dict[str, Any], tuple[str, ...], Diagnosis | None]:
    args = dict(engine_args)
    limit = rules.rank_limit
    if limit is None:
        return args, _command(rules, args), None
    rank = facts.max_rank
    needed = limit.needed(rank)
    given = engine_args.get(limit.setting)
    finding = None
    if needed is None:
        finding = _rank_finding(
            rules,
            rank,
            f"rank {rank} is above the largest {limit.setting} ({limit.allowed[-1]})",
            "retrain with a smaller rank, or serve the merged model",
        )
    elif given is not None and int(given) < rank:
        finding = _rank_finding(
            rules,
            rank,
            f"LoRA rank {rank} is greater than {limit.setting} {given}",
            f"start the engine with {limit.flag} {needed}",
        )
    elif given is None and needed > limit.default:
        args[limit.setting] = needed
    return args, _command(rules, args), finding


def _rank_finding(rules: RuleSet, rank: int, message: str, fix: str) -> Diagnosis:
    limit = rules.rank_limit
    assert limit is not None
    rule = EngineRule(
        "rank",
        "refuses",
        f"{rules.prefix}_max_lora_rank",
        f"rank <= {limit.setting}",
        fix,
        limit.source,
        limit.verified,
        kills_engine=limit.kills_engine,
        refuses_when="first request with the adapter",
    )
    d = _from_rule(rules, rule, Feature("rank", detail=str(rank)))
    return finding(d.code, message, fix=fix, details={**d.details, "rank": rank})


def _command(rules: RuleSet, args: Mapping[str, Any]) -> tuple[str, ...]:
    if rules.engine == "vllm":
        flags = ["--enable-lora"]
        for key, value in sorted(args.items()):
            flags += [f"--{key.replace('_', '-')}", str(value)]
        return tuple(flags)
    return tuple(f"--{k.replace('_', '-')}={v}" for k, v in sorted(args.items()))


# --- findings ------------------------------------------------------------------------------------------------


def _from_rule(rules: RuleSet, rule: EngineRule, feature: Feature) -> Diagnosis:
    what = {
        "refuses": f"{rules.title} refuses it"
        + (", and the error kills the engine for every user" if rule.kills_engine else ""),
        "serves_wrong": f"{rules.title} loads it without an error and serves outputs that differ from peft's",
        "unknown": f"{rules.title} may refuse it",
    }[rule.behaviour]
    where = (
        f" ({', '.join(feature.evidence[:3])}{', ...' if len(feature.evidence) > 3 else ''})"
        if feature.evidence
        else ""
    )
    message = f"{FEATURES.get(feature.name, feature.name)}{where}: {what}"
    if feature.detail:
        message += f"; {feature.detail}"
    return finding(
        rule.code,
        message,
        fix=rule.fix,
        details={
            "engine": rules.engine,
            "engine_version": rules.version,
            "feature": feature.name,
            "behaviour": rule.behaviour,
            "kills_engine": rule.kills_engine,
            "refuses_when": rule.refuses_when,
            "rule": rule.rule,
            "source": rule.source.cite(),
            "verified": rule.verified,
            "conversion": rule.conversion,
            "conversion_does": CONVERSIONS.get(rule.conversion or "", ""),
            "evidence": list(feature.evidence),
        },
    )


def _finding(rules: RuleSet, feature: str | None, behaviour: str, code: str, message: str, fix: str) -> Diagnosis:
    return finding(
        code,
        message,
        fix=fix,
        details={
            "engine": rules.engine,
            "engine_version": rules.version,
            "feature": feature,
            "behaviour": behaviour,
            "rule": message,
            "source": "",
            "verified": "",
            "conversion": None,
        },
    )


def _unknown(rules: RuleSet, feature: Feature) -> Diagnosis:
    return _finding(
        rules,
        feature.name,
        "unknown",
        f"{rules.prefix}_unverified_feature",
        f"{FEATURES.get(feature.name, feature.name)}: no rule for {rules.title} {rules.version} (not run, not read)",
        "test it on the engine before deploying, or serve the merged model",
    )


def _severity(d: Diagnosis) -> int:
    behaviour = d.details.get("behaviour", "")
    return {"refuses": 3, "unknown": 2, "serves_wrong": 1}.get(behaviour, 0)


def _verdict(findings: list[Diagnosis]) -> str:
    behaviours = {str(d.details.get("behaviour")) for d in findings}
    if "refuses" in behaviours:
        return "refuses"
    if "unknown" in behaviours:
        return "unknown"
    if "serves_wrong" in behaviours:
        return "serves_wrong"
    assert set(BEHAVIOURS) >= {"serves"}
    return "serves"
