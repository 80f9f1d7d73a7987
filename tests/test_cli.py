"""The real `safe-peft` console script, run in subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from typing import Any

import pytest
import torch

from tests.support.helpers import build, derive, outputs

BIN = os.path.join(os.path.dirname(sys.executable), "safe-peft")


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BIN, *args], capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, adapters: dict[str, Any]) -> dict[str, str]:
    root = tmp_path_factory.mktemp("cli")
    build("causal").save_pretrained(root / "base_causal")  # config.json names LlamaForCausalLM
    for name in ("model.safetensors",):
        os.remove(root / "base_causal" / name)  # config.json alone suffices
    paths = {"base": str(root / "base_causal"), "good": adapters["causal"][0], "wide": adapters["wide"][0]}
    paths["rank4"] = derive(adapters["causal"][0], str(root / "rank4"), config=lambda c: c.update(r=4))
    paths["compiled"] = derive(
        adapters["causal"][0],
        str(root / "compiled"),
        keys=lambda k: k.replace("model.layers", "_orig_mod.model.layers"),
    )
    broken = root / "broken"
    shutil.copytree(adapters["causal"][0], broken)
    os.truncate(broken / "adapter_model.safetensors", 100)
    paths["broken"] = str(broken)
    paths["root"] = str(root)
    return paths


def test_inspect(workspace: dict[str, str]) -> None:
    result = run("inspect", workspace["good"])
    assert result.returncode == 0, result.stderr
    assert "LORA" in result.stdout and "8 in the weights" in result.stdout
    data = json.loads(run("inspect", workspace["good"], "--json").stdout)
    assert data["peft_type"] == "LORA" and data["config_r"] == 8 and len(data["tensors"]) == 8


def test_inspect_imports_no_torch(workspace: dict[str, str]) -> None:
    code = (
        "import sys; from safe_peft._cli import main; main(['inspect', sys.argv[1]]); "
        "assert not {'torch', 'peft', 'transformers'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code, workspace["good"]], check=True, capture_output=True)


def test_check_table_and_exit_codes(workspace: dict[str, str]) -> None:
    ok = run("check", workspace["good"], "--base", workspace["base"])
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "1 of 1 adapters compatible" in ok.stdout
    bad = run(
        "check",
        workspace["good"],
        workspace["rank4"],
        workspace["wide"],
        workspace["compiled"],
        "--base",
        workspace["base"],
    )
    assert bad.returncode == 1
    lines = bad.stdout.splitlines()
    assert any(
        "rank4" in line and "config_mismatch/rank_mismatch" in line and "repair=('rank',)" in line for line in lines
    )
    assert any("compiled" in line and "key_format/strip_orig_mod" in line and "remap='auto'" in line for line in lines)
    assert any(workspace["wide"] in line and "wrong_base_model/dimension_mismatch" in line for line in lines)
    assert "\033[" not in bad.stdout  # not a terminal: no colour
    unreadable = run("check", workspace["good"], workspace["broken"], "--base", workspace["base"])
    assert unreadable.returncode == 2
    assert "corrupt_checkpoint/truncated_file" in unreadable.stdout


def test_check_json_document(workspace: dict[str, str]) -> None:
    result = run("check", workspace["good"], workspace["rank4"], "--base", workspace["base"], "--json")
    doc = json.loads(result.stdout)
    assert result.returncode == 1
    assert doc["schema_version"] == 1 and doc["model_class"] == "LlamaForCausalLM"
    assert doc["summary"] == {"adapters": 2, "compatible": 1, "incompatible": 1, "unreadable": 0}
    verdicts = {
        r["adapter"]: (r["verdict"], r["report"]["causes"][0]["code"] if r["report"]["causes"] else None)
        for r in doc["results"]
    }
    assert verdicts == {workspace["good"]: ("compatible", None), workspace["rank4"]: ("incompatible", "rank_mismatch")}


def test_check_globs_and_opt_ins(workspace: dict[str, str]) -> None:
    pattern = os.path.join(workspace["root"], "rank*")
    result = run("check", pattern, "--base", workspace["base"], "--repair", "rank", "--json")
    doc = json.loads(result.stdout)
    assert result.returncode == 0
    assert doc["results"][0]["report"]["repairs"] == ["rank: r 4 -> 8, rank_pattern {} -> {}"]


def test_model_class_option(workspace: dict[str, str]) -> None:
    result = run("check", workspace["good"], "--base", workspace["base"], "--model-class", "base", "--json")
    doc = json.loads(result.stdout)
    assert doc["model_class"] == "LlamaModel"
    assert doc["results"][0]["report"]["causes"][0]["code"] == "head_prefix_remove"


def test_fix_writes_an_adapter_plain_peft_loads(
    workspace: dict[str, str], adapters: dict[str, Any], tmp_path: Any
) -> None:
    from peft import PeftModel

    out = str(tmp_path / "fixed")
    result = run("fix", workspace["compiled"], "--base", workspace["base"], "--out", out, "--remap", "auto")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Verified: plain PeftModel.from_pretrained loaded it with no warning" in result.stdout
    model = PeftModel.from_pretrained(build("causal"), out)
    assert torch.allclose(outputs(model), adapters["causal"][1], atol=1e-5)
    again = run("fix", workspace["compiled"], "--base", workspace["base"], "--out", out, "--remap", "auto")
    assert again.returncode == 2 and "not empty" in again.stderr
    assert (
        run(
            "fix", workspace["compiled"], "--base", workspace["base"], "--out", out, "--remap", "auto", "--force"
        ).returncode
        == 0
    )


def test_fix_refuses_what_no_opt_in_fixes(workspace: dict[str, str], tmp_path: Any) -> None:
    result = run("fix", workspace["wide"], "--base", workspace["base"], "--out", str(tmp_path / "x"), "--remap", "auto")
    assert result.returncode == 1
    assert "dimension_mismatch" in result.stdout and not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["inspect", "/nonexistent/adapter"], "no such local directory"),
        (["check", "/nonexistent/*", "--base", "x"], "matches no adapter"),
        (["check", "{good}", "--base", "/nonexistent/model"], "cannot read a model config"),
    ],
)
def test_errors_are_one_line(workspace: dict[str, str], args: list[str], message: str) -> None:
    result = run(*[a.format(**workspace) for a in args], env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_debug_shows_the_traceback() -> None:
    result = run("--debug", "inspect", "/nonexistent/adapter", env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_usage_error_exit_code() -> None:
    assert run("check").returncode == 2
    assert run("frobnicate").returncode == 2


def test_python_dash_m(workspace: dict[str, str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "safe_peft", "inspect", workspace["good"], "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(result.stdout)["peft_type"] == "LORA"


def test_colour_only_on_request_of_a_terminal(workspace: dict[str, str]) -> None:
    from safe_peft._cli import Output

    assert Output(sys.stdout, color=True).good("ok") == "\033[32mok\033[0m"
    result = run("check", workspace["good"], "--base", workspace["base"], env={"NO_COLOR": "1"})
    assert "\033[" not in result.stdout


pytest_plugins = ["pytester"]


def test_pytest_plugin_fixture(pytester: pytest.Pytester, adapters: dict[str, Any]) -> None:
    pytester.makepyfile(f"""
        from tests.support.helpers import build

        def test_good(assert_adapter_loads):
            assert_adapter_loads(build("causal"), {adapters["causal"][0]!r})

        def test_bad(assert_adapter_loads):
            assert_adapter_loads(build("causal"), {adapters["wide"][0]!r})
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where `tests.support` is importable from
    options = ("-p", "no:cacheprovider", "-W", "ignore::FutureWarning", "-o", f"pythonpath={root}")
    result = pytester.runpytest_subprocess(*options)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*Most likely cause [[]wrong_base_model/dimension_mismatch[]]*"])
