"""Serving-engine pre-flight against the real engines' recorded behaviour.

Every adapter of the corpus is rebuilt here (real peft, fixed seeds); ``check_target`` must predict exactly what
the real engine did with it (tests/engines/recorded.json, written by ``make engines``), and never "serves" where
the engine refused or served wrong. Every ``fix --target`` output must be one the real engine served with peft's
outputs, and must give peft's outputs in peft too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from safe_peft._engines.check import check_target
from safe_peft._engines.fix import fix_for_target
from safe_peft._engines.rule_types import FEATURES
from safe_peft._engines.rules import RULE_SETS, rule_set
from safe_peft.errors import AdapterLoadError
from tests.engines import corpus

HERE = os.path.dirname(os.path.abspath(__file__))

RECORDED = corpus.load_recorded()
PAIRS = [(case, engine) for case in corpus.CASES for engine in case.engines]
FIXES = [(case, engine) for case in corpus.CASES for engine in case.fixes]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Bases and adapters, built once per module on first use."""
    root = tmp_path_factory.mktemp("engines")
    models: dict[str, Any] = {}
    adapters: dict[str, str] = {}

    def get(case: corpus.Case) -> tuple[str, str]:
        mdir = str(root / "models" / case.model)
        if case.model not in models:
            models[case.model] = corpus.build_model(case.model, mdir)
        if case.name not in adapters:
            adapters[case.name] = str(root / "adapters" / case.name)
            try:
                corpus.build_adapter(case, adapters[case.name], models[case.model])
            except ValueError as exc:  # e.g. target_parameters on a transformers whose MoE experts are not fused
                if "target_parameters" not in case.lora:
                    raise
                adapters[case.name] = f"unbuildable: {exc}"
        if adapters[case.name].startswith("unbuildable: "):
            pytest.skip(f"the installed peft / transformers cannot build this case ({adapters[case.name][13:80]})")
        return mdir, adapters[case.name]

    return get


def test_corpus_covers_the_done_criteria() -> None:
    for engine in corpus.ENGINES:
        recorded = [c for c in corpus.CASES if engine in RECORDED["cases"].get(c.name, {})]
        assert len(recorded) >= 30, (engine, len(recorded))
    features = {f for c in corpus.CASES for f in _features(c)}
    assert {
        "dora",
        "saved_module",
        "rslora",
        "alpha_pattern",
        "rank_pattern",
        "embedding_lora",
        "tied_lm_head_lora",
        "moe_target_parameters",
        "base_bias",
        "half_precision",
    } <= features


def _features(case: corpus.Case) -> set[str]:
    lora = case.lora
    out = {k for k in ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern") if lora.get(k)}
    names = {"use_dora": "dora", "use_rslora": "rslora"}
    out = {names.get(k, k) for k in out}
    if lora.get("modules_to_save"):
        out.add("saved_module")
    targets = lora.get("target_modules") or []
    if "embed_tokens" in targets:
        out.add("embedding_lora")
    if "lm_head" in targets and case.model.endswith("tied"):
        out.add("tied_lm_head_lora")
    if lora.get("target_parameters"):
        out.add("moe_target_parameters")
    if lora.get("bias", "none") != "none":
        out.add("base_bias")
    if case.dtype != "float32":
        out.add("half_precision")
    return out


@pytest.mark.parametrize(("case", "engine"), PAIRS, ids=[f"{c.name}-{e}" for c, e in PAIRS])
def test_prediction_matches_the_real_engine(case: corpus.Case, engine: str, built: Any) -> None:
    real = RECORDED["cases"][case.name][engine]
    base, adapter = built(case)
    report = check_target(adapter, engine, base=base, engine_args=case.engine_args.get(engine))
    assert report.verdict == real["verdict"], (report.verdict, real, [d.code for d in report.findings])
    if real["verdict"] != "serves":
        assert report.findings and not report.ok
    for finding in report.findings:
        assert finding.cause.value == "engine_incompatible"
        assert finding.details["behaviour"] in ("refuses", "serves_wrong", "unknown")
        if finding.details["behaviour"] != "unknown":  # an unknown feature has no rule, hence no source
            assert finding.details["source"], finding.code
    if real.get("kills_engine"):
        assert any(d.details["kills_engine"] for d in report.findings)
    if engine == "vllm" and real["verdict"] == "serves":  # the settings the real run used suffice
        needed = report.engine_args.get("max_lora_rank", 16)
        assert needed <= real["engine_args"]["max_lora_rank"]


@pytest.mark.parametrize(("case", "engine"), FIXES, ids=[f"{c.name}-{e}" for c, e in FIXES])
def test_fix_output_serves_exactly(case: corpus.Case, engine: str, built: Any, tmp_path: Any) -> None:
    real = RECORDED["fixes"][case.name][engine]
    assert real["verdict"] == "serves" and real["tokens_equal"] and real["peft_equal"], real
    base, adapter = built(case)
    before = check_target(adapter, engine, base=base)
    fixed = fix_for_target(adapter, engine, tmp_path / "fixed", base=base, pad_rank_to=case.pad_rank)
    assert fixed.after.ok
    if RECORDED["cases"][case.name][engine]["verdict"] != "serves":  # a fix was needed: the fold made it
        assert not before.ok and fixed.conversions == ("fold_scaling",)
    if case.pad_rank:
        assert "pad_rank" in fixed.conversions and fixed.after.engine_args.get("max_lora_rank", 16) >= case.pad_rank
    with open(tmp_path / "fixed" / "adapter_config.json") as f:
        config = json.load(f)
    assert not config["use_rslora"] and not config["alpha_pattern"]


@pytest.mark.parametrize("engine", corpus.ENGINES)
def test_fixed_adapter_gives_peft_outputs_in_peft(engine: str, built: Any, tmp_path: Any) -> None:
    case = corpus.CASE_BY_NAME["rank_alpha_pattern"]
    base, adapter = built(case)
    fix_for_target(adapter, engine, tmp_path / "fixed", base=base)
    want, got = corpus.reference_outputs(base, adapter), corpus.reference_outputs(base, str(tmp_path / "fixed"))
    assert got["tokens"] == want["tokens"]
    assert max(abs(a - b) for x, y in zip(got["logprobs"], want["logprobs"]) for a, b in zip(x, y)) < 1e-4


def test_pad_rank_is_exact(built: Any, tmp_path: Any) -> None:
    case = corpus.CASE_BY_NAME["rank12"]
    base, adapter = built(case)
    report = fix_for_target(adapter, "llamacpp", tmp_path / "padded", base=base, pad_rank_to=16)
    assert "pad_rank" in report.conversions
    with open(tmp_path / "padded" / "adapter_config.json") as f:
        assert json.load(f)["r"] == 16
    want, got = corpus.reference_outputs(base, adapter), corpus.reference_outputs(base, str(tmp_path / "padded"))
    assert got["tokens"] == want["tokens"]
    assert max(abs(a - b) for x, y in zip(got["logprobs"], want["logprobs"]) for a, b in zip(x, y)) < 1e-4


@pytest.mark.parametrize(
    ("name", "engine", "codes"),
    [
        ("dora", "vllm", {"vllm_dora"}),
        ("dora", "llamacpp", {"llamacpp_dora"}),
        ("mts_lm_head", "llamacpp", {"llamacpp_modules_to_save"}),
        ("pissa", "llamacpp", {"llamacpp_base_rewriting_init"}),
    ],
)
def test_fix_refuses_what_has_no_exact_form(name: str, engine: str, codes: set[str], built: Any, tmp_path: Any) -> None:
    base, adapter = built(corpus.CASE_BY_NAME[name])
    with pytest.raises(AdapterLoadError) as info:
        fix_for_target(adapter, engine, tmp_path / "out", base=base)
    assert {d.code for d in info.value.report.causes} >= codes
    assert all(d.details["not_exact"] for d in info.value.report.causes)
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_without_base_a_tied_head_is_judged_the_worse_way(built: Any) -> None:
    _, adapter = built(corpus.CASE_BY_NAME["lm_head"])
    assert check_target(adapter, "llamacpp").verdict == "refuses"
    assert check_target(adapter, "llamacpp", base={"tie_word_embeddings": False}).verdict == "serves"


def test_engine_args_are_checked_when_given(built: Any) -> None:
    _, adapter = built(corpus.CASE_BY_NAME["rank64"])
    report = check_target(adapter, "vllm")
    assert report.ok and report.engine_args == {"max_lora_rank": 64}
    assert report.command == ("--enable-lora", "--max-lora-rank", "64")
    refused = check_target(adapter, "vllm", engine_args={"max_lora_rank": 32})
    assert refused.verdict == "refuses" and refused.findings[0].code == "vllm_max_lora_rank"


def test_every_rule_cites_its_source_and_names_a_known_feature() -> None:
    for rules in RULE_SETS:
        for rule in rules.rules:
            assert rule.feature in FEATURES, rule
            assert rule.source.file and rule.source.ref, rule
            assert rule.behaviour in ("serves", "serves_wrong", "refuses"), rule
            assert rule.conversion is None or rule.behaviour == "serves_wrong", rule
        assert len({r.feature for r in rules.rules}) == len(rules.rules), rules.engine
    assert rule_set("llama.cpp").engine == "llamacpp"
    with pytest.raises(ValueError, match="unknown engine"):
        rule_set("tgi")


def test_check_target_imports_no_torch(built: Any) -> None:
    _, adapter = built(corpus.CASE_BY_NAME["plain_r8_qv"])
    code = (
        "import sys; from safe_peft import check_target; r = check_target(sys.argv[1], 'llamacpp'); "
        "assert r.ok, r; assert 'torch' not in sys.modules, 'torch imported'"
    )
    root = os.path.dirname(os.path.dirname(HERE))
    subprocess.run([sys.executable, "-c", code, adapter], check=True, cwd=root)
