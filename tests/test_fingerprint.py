"""The base fingerprint: stamp_adapter stores a sample of the base weights in the adapter's safetensors metadata;
every route refuses a stamped adapter on a base whose weights differ, and loads it on the same base in any float
precision (or quantized); plain peft loads stamped adapters unchanged."""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

import safe_peft
from safe_peft import AdapterLoadError, Cause, diagnose, safe_load_adapter, stamp_adapter
from safe_peft._files.safetensors_header import read_header
from safe_peft._fingerprint.check import read_stamp
from safe_peft._fingerprint.format import KEY, MAX_STAMP_CHARS, Fingerprint, FingerprintError
from safe_peft._fingerprint.stamp import _write_metadata
from safe_peft._fix.writer import replace_file
from safe_peft._versions import SHARDED_LOAD_TORCH_SINCE, torch_at_least
from tests.support.helpers import assert_same_state, build, model_state, outputs, primary, train_adapter

WEIGHTS = "adapter_model.safetensors"


def _files(directory: str) -> dict[str, bytes]:
    found = {}
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as f:
            found[name] = f.read()
    return found


def _merged(seed: int = 7, r: int = 2) -> torch.nn.Module:
    """The base with another LoRA (rank r, on every linear layer) merged into it."""
    torch.manual_seed(seed)
    model = get_peft_model(build("causal"), LoraConfig(r=r, target_modules="all-linear", init_lora_weights=False))
    return model.merge_and_unload().eval()


def _fine_tuned(steps: int = 3, lr: float = 1e-3) -> torch.nn.Module:
    """The base after a few SGD steps on all its weights."""
    model = build("causal").train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    torch.manual_seed(3)
    for _ in range(steps):
        tokens = torch.randint(0, 100, (2, 8))
        model(tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


OTHER_BASES = {
    "other_seed": (lambda: build("causal", seed=5), "other"),
    "lora_merged": (_merged, "low_rank"),
    "fine_tuned": (_fine_tuned, "changed"),
}


@pytest.fixture(scope="module")
def stamped(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An adapter (unstamped original and stamped copy) with its trained outputs."""
    root = tmp_path_factory.mktemp("fingerprint")
    plain = str(root / "plain")
    trained = train_adapter(build("causal"), plain, target_modules=["q_proj", "v_proj", "down_proj"])
    copy_dir = str(root / "stamped")
    shutil.copytree(plain, copy_dir)
    stamp_adapter(copy_dir, build("causal"))
    return {"plain": plain, "stamped": copy_dir, "outputs": trained, "root": root}


def _copy(stamped: dict[str, Any], name: str) -> str:
    target = str(stamped["root"] / name)
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(stamped["stamped"], target)
    return target


# -- stamping ------------------------------------------------------------------------------------------------


def test_stamp_is_small_touches_nothing_else_and_plain_peft_loads_it_unchanged(stamped: dict[str, Any]) -> None:
    before, after = _files(stamped["plain"]), _files(stamped["stamped"])
    assert before.keys() == after.keys()
    assert all(before[n] == after[n] for n in before if n != WEIGHTS)
    metadata = read_header(os.path.join(stamped["stamped"], WEIGHTS)).metadata
    assert metadata["format"] == "pt" and 0 < len(metadata[KEY]) < 8192
    original = load_file(os.path.join(stamped["plain"], WEIGHTS))
    rewritten = load_file(os.path.join(stamped["stamped"], WEIGHTS))
    assert original.keys() == rewritten.keys() and all(torch.equal(original[k], rewritten[k]) for k in original)
    plain = PeftModel.from_pretrained(build("causal"), stamped["stamped"])
    assert torch.equal(outputs(plain), stamped["outputs"])


def test_stamping_is_deterministic_and_independent_of_dtype(stamped: dict[str, Any]) -> None:
    target = _copy(stamped, "again")
    stamp_adapter(target, build("causal"))
    assert _files(target) == _files(stamped["stamped"])
    stamp_adapter(target, build("causal").to(torch.bfloat16))
    fp = read_stamp(os.path.join(target, WEIGHTS))
    assert fp is not None and fp.precision == "bfloat16"
    assert diagnose(build("causal"), target).ok  # a stamp taken in bfloat16 verifies on float32


def test_stamp_covers_targets_and_saved_modules(tmp_path: Any) -> None:
    directory = str(tmp_path / "a")
    train_adapter(build("causal"), directory, target_modules=["q_proj"], modules_to_save=["lm_head"])
    stamp_adapter(directory, build("causal"))
    fp = read_stamp(os.path.join(directory, WEIGHTS))
    assert fp is not None
    names = {t.name for t in fp.tensors}
    assert names == {"lm_head.weight", *(f"model.layers.{i}.self_attn.q_proj.weight" for i in (0, 1))}


def test_a_failed_stamp_or_replace_leaves_the_file_and_no_temporary(stamped: dict[str, Any]) -> None:
    target = _copy(stamped, "failing")
    before = _files(target)
    with torch.device("meta"):
        meta = build("causal")
    with pytest.raises(FingerprintError, match="meta device"):
        stamp_adapter(target, meta)

    def broken(f: Any) -> None:
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        replace_file(os.path.join(target, WEIGHTS), broken)
    assert _files(target) == before


def test_a_merged_peft_model_is_refused_as_a_stamping_base(stamped: dict[str, Any]) -> None:
    model = PeftModel.from_pretrained(build("causal"), stamped["plain"])
    model.merge_adapter()
    with pytest.raises(FingerprintError, match="merged adapter"):
        stamp_adapter(_copy(stamped, "merged_base"), model)


def test_save_adapter_saves_and_stamps(tmp_path: Any) -> None:
    torch.manual_seed(0)
    model = get_peft_model(build("causal"), LoraConfig(r=4, target_modules=["q_proj"]))
    model.add_adapter("second", LoraConfig(r=2, target_modules=["v_proj"]))
    safe_peft.save_adapter(model, str(tmp_path / "out"))
    for where in (tmp_path / "out", tmp_path / "out" / "second"):
        assert read_stamp(str(where / WEIGHTS)) is not None
        assert diagnose(build("causal"), str(where)).ok
        assert not diagnose(build("causal", seed=5), str(where)).ok


def test_the_trainer_callback_stamps_every_checkpoint(tmp_path: Any) -> None:
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model = get_peft_model(build("causal"), LoraConfig(r=4, target_modules=["q_proj"]))
    rows = [{"input_ids": torch.arange(1, 9), "labels": torch.arange(1, 9)} for _ in range(4)]
    args = TrainingArguments(
        str(tmp_path), max_steps=2, save_steps=1, per_device_train_batch_size=2, report_to=[], use_cpu=True
    )
    Trainer(model=model, args=args, train_dataset=rows, callbacks=[safe_peft.StampCallback()]).train()
    for step in (1, 2):
        checkpoint = str(tmp_path / f"checkpoint-{step}")
        assert read_stamp(os.path.join(checkpoint, WEIGHTS)) is not None
        assert diagnose(build("causal"), checkpoint).ok


# -- verifying -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_same_base_verifies_in_any_float_precision(stamped: dict[str, Any], dtype: torch.dtype) -> None:
    model, report = safe_load_adapter(build("causal").to(dtype), stamped["stamped"], output_loading_info=True)
    assert report.ok and not report.warnings
    if dtype == torch.float32:
        assert torch.equal(outputs(model), stamped["outputs"])


@pytest.mark.parametrize("which", sorted(OTHER_BASES))
def test_another_base_is_refused_and_left_unchanged(stamped: dict[str, Any], which: str) -> None:
    make, kind = OTHER_BASES[which]
    base = make()
    before = model_state(base)
    with pytest.raises(AdapterLoadError) as caught:
        safe_load_adapter(base, stamped["stamped"])
    top = caught.value.report.primary
    assert top is not None and top.code == "base_weights_differ" and top.cause is Cause.WRONG_BASE_MODEL
    assert top.details["kind"] == kind and top.details["tensors"]
    assert stamped["stamped"] in top.message and "verify_base=False" in top.fix
    assert_same_state(before, base)
    assert primary(diagnose(make(), stamped["stamped"])).code == "base_weights_differ"
    # the unstamped adapter: behaviour as before the fingerprint (it loads), and verify_base=False is the way past
    assert safe_load_adapter(make(), stamped["plain"], output_loading_info=True)[1].ok
    assert safe_load_adapter(make(), stamped["stamped"], verify_base=False, output_loading_info=True)[1].ok


@pytest.mark.parametrize("which", sorted(OTHER_BASES))
def test_a_half_precision_copy_of_another_base_is_refused_and_named(stamped: dict[str, Any], which: str) -> None:
    make, kind = OTHER_BASES[which]
    report = diagnose(make().to(torch.bfloat16), stamped["stamped"])
    assert report.primary is not None and report.primary.code == "base_weights_differ"
    assert report.primary.details["kind"] == kind


def test_a_meta_base_is_not_verified_with_a_note(stamped: dict[str, Any]) -> None:
    with torch.device("meta"):
        meta = build("causal")
    report = diagnose(meta, stamped["stamped"])
    assert report.ok and [w.code for w in report.warnings] == ["base_not_verified"]
    assert report.warnings[0].details["reason"] == "meta"


def test_every_route_refuses_a_mismatch_and_leaves_the_model_unchanged(stamped: dict[str, Any]) -> None:
    from safe_peft import patched, safe_hotswap_adapter, safe_load_adapter_inplace

    other = build("causal", seed=5)
    peft_model = PeftModel.from_pretrained(other, stamped["plain"])
    routes = {
        "further": lambda m: safe_load_adapter(m, stamped["stamped"], "b"),
        "hotswap": lambda m: safe_hotswap_adapter(m, stamped["stamped"], "default"),
        "diagnose": lambda m: _raise(diagnose(m, stamped["stamped"], "b")),
    }
    for name, route in routes.items():
        before = model_state(peft_model)
        with pytest.raises(AdapterLoadError) as caught:
            route(peft_model)
        assert primary(caught.value.report).code == "base_weights_differ", name
        assert_same_state(before, peft_model)
    inplace = build("causal", seed=5)
    before = model_state(inplace)
    with pytest.raises(AdapterLoadError, match="base_weights_differ"):
        safe_load_adapter_inplace(inplace, stamped["stamped"])
    assert_same_state(before, inplace)
    assert safe_load_adapter_inplace(inplace, stamped["stamped"], verify_base=False) is inplace
    switched = build("causal", seed=5)
    before = model_state(switched)
    with patched(), pytest.raises(AdapterLoadError, match="base_weights_differ"):
        PeftModel.from_pretrained(switched, stamped["stamped"])
    assert_same_state(before, switched)
    # the same routes on the right base load
    right = PeftModel.from_pretrained(build("causal"), stamped["plain"])
    safe_load_adapter(right, stamped["stamped"], "b")
    safe_hotswap_adapter(right, stamped["stamped"], "b")
    with patched():
        PeftModel.from_pretrained(build("causal"), stamped["stamped"])


def _raise(report: Any) -> None:
    if not report.ok:
        raise AdapterLoadError(report)


def test_the_auto_route_verifies_against_the_base_it_loads(stamped: dict[str, Any]) -> None:
    other = str(stamped["root"] / "other_base")
    build("causal", seed=5).save_pretrained(other)
    target = _copy(stamped, "auto")
    config_path = os.path.join(target, "adapter_config.json")
    with open(config_path) as f:
        data = json.load(f)
    data["base_model_name_or_path"] = other
    with open(config_path, "w") as f:
        json.dump(data, f)
    with pytest.raises(AdapterLoadError, match="base_weights_differ"):
        safe_peft.from_pretrained(target)
    assert safe_peft.from_pretrained(target, verify_base=False) is not None


def test_fix_keeps_the_stamp(stamped: dict[str, Any], tmp_path: Any) -> None:
    from safe_peft import fix_adapter

    fix_adapter(build("causal"), stamped["stamped"], str(tmp_path / "fixed"))
    stamp = read_header(os.path.join(stamped["stamped"], WEIGHTS)).metadata[KEY]
    assert read_header(str(tmp_path / "fixed" / WEIGHTS)).metadata[KEY] == stamp
    assert not diagnose(build("causal", seed=5), str(tmp_path / "fixed")).ok


def test_fix_target_keeps_the_stamp(stamped: dict[str, Any], tmp_path: Any) -> None:
    """An engine conversion rescales lora_B, never the base: the base's fingerprint still holds."""
    from safe_peft import fix_for_target

    fix_for_target(stamped["stamped"], "llamacpp", str(tmp_path / "gguf_ready"))
    stamp = read_header(os.path.join(stamped["stamped"], WEIGHTS)).metadata[KEY]
    assert read_header(str(tmp_path / "gguf_ready" / WEIGHTS)).metadata[KEY] == stamp


# -- a tampered or malformed stamp ---------------------------------------------------------------------------


def _valid(stamped: dict[str, Any]) -> Fingerprint:
    fp = read_stamp(os.path.join(stamped["stamped"], WEIGHTS))
    assert fp is not None
    return fp


def _payload(fp: Fingerprint, **changes: Any) -> str:
    import base64
    import zlib

    text = fp.encode()
    data = json.loads(zlib.decompress(base64.b64decode(text[3:])))
    data.update(changes)
    return "v1." + base64.b64encode(zlib.compress(json.dumps(data).encode())).decode()


TAMPERED: dict[str, Any] = {
    "not_base64": lambda fp: "v1.!!!",
    "unknown_version": lambda fp: "v9." + fp.encode()[3:],
    "not_zlib": lambda fp: "v1.aGVsbG8=",
    "not_json": lambda fp: "v1." + __import__("base64").b64encode(__import__("zlib").compress(b"{nope")).decode(),
    "wrong_types": lambda fp: _payload(fp, grid="8"),
    "bad_shape": lambda fp: _payload(fp, tensors=[["x", [-1, 2]]]),
    "wrong_length": lambda fp: _payload(fp, values="AAAAAA=="),
    "huge": lambda fp: "v1." + "A" * (MAX_STAMP_CHARS + 8),
    "zip_bomb": lambda fp: "v1." + __import__("base64").b64encode(__import__("zlib").compress(b" " * 10**7)).decode(),
    "not_finite": lambda fp: _payload(fp, tensors=[["x", [2]]], grid=2, values="AADAfwAAwH8="),  # two NaN
}


@pytest.mark.parametrize("how", sorted(TAMPERED))
def test_a_tampered_stamp_is_a_clear_finding_naming_the_file(stamped: dict[str, Any], how: str) -> None:
    target = _copy(stamped, f"tampered_{how}")
    path = os.path.join(target, WEIGHTS)
    _write_metadata(path, {KEY: TAMPERED[how](_valid(stamped))})
    report = diagnose(build("causal"), target)
    assert not report.ok and report.primary is not None and report.primary.code == "bad_fingerprint"
    assert path in report.primary.message and "malformed" in report.primary.message
    base = build("causal")
    before = model_state(base)
    with pytest.raises(AdapterLoadError, match="bad_fingerprint"):
        safe_load_adapter(base, target)
    assert_same_state(before, base)
    assert safe_load_adapter(build("causal"), target, verify_base=False) is not None
    assert torch.equal(outputs(PeftModel.from_pretrained(build("causal"), target)), stamped["outputs"])


# -- quantized bases (bitsandbytes, where it runs on this machine) ----------------------------------------------


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_a_quantized_base_verifies_both_ways_and_another_is_refused(stamped: dict[str, Any], kind: str) -> None:
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    saved = str(stamped["root"] / "base_fp32")
    if not os.path.isdir(saved):
        build("causal").save_pretrained(saved)
    four_bit = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    config = four_bit if kind == "nf4" else BitsAndBytesConfig(load_in_8bit=True)
    quantized = LlamaForCausalLM.from_pretrained(saved, quantization_config=config, device_map="cpu")
    assert diagnose(quantized, stamped["stamped"]).ok  # stamped on float32, verified on the quantized base
    target = _copy(stamped, f"stamped_{kind}")
    stamp_adapter(target, quantized)
    fp = read_stamp(os.path.join(target, WEIGHTS))
    assert fp is not None and fp.precision == kind
    assert diagnose(build("causal"), target).ok  # stamped on the quantized base, verified on float32
    assert primary(diagnose(build("causal", seed=5), target)).code == "base_weights_differ"


# -- the command line --------------------------------------------------------------------------------------------


def test_cli_stamp_and_check(stamped: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    from safe_peft._cli import main

    base = str(stamped["root"] / "cli_base")
    build("causal").save_pretrained(base)
    target = str(stamped["root"] / "cli_adapter")
    shutil.copytree(stamped["plain"], target)
    assert main(["stamp", target, "--base", base, "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["key"] == KEY and facts["tensors"] == 6 and facts["bytes"] < 8192
    assert (
        read_header(os.path.join(target, WEIGHTS)).metadata[KEY]
        == read_header(os.path.join(stamped["stamped"], WEIGHTS)).metadata[KEY]
    )
    assert main(["check", target, "--base", base]) == 0
    assert "stamped, not verified (meta base)" in capsys.readouterr().out
    assert main(["check", target, "--base", base, "--weights", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["stamp"] == "stamped, matches"
    other = str(stamped["root"] / "cli_other")
    build("causal", seed=5).save_pretrained(other)
    assert main(["check", target, "--base", other, "--weights"]) == 1
    assert "stamped, differs (other)" in capsys.readouterr().out
    config_only = str(stamped["root"] / "cli_config_only")
    os.makedirs(config_only)
    shutil.copy(os.path.join(base, "config.json"), config_only)
    assert main(["stamp", target, "--base", config_only]) == 2
    assert "holds no weights" in capsys.readouterr().err


def test_positions_depend_on_name_and_shape_only() -> None:
    from safe_peft._fingerprint.format import positions

    assert positions("a.weight", (64, 32), 4) == positions("a.weight", (64, 32), 4)
    assert positions("a.weight", (64, 32), 4) != positions("b.weight", (64, 32), 4)
    rows, cols = positions("a.weight", (3, 2), 4)
    assert rows == (0, 1, 2) and cols == (0, 1)


# -- a sharded base (FSDP2 on 2 CPU ranks) -------------------------------------------------------------------------


@pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with the gloo backend",
)
@pytest.mark.skipif(  # the refusal on an older torch: tests/test_torch_versions.py
    not torch_at_least(str(torch.__version__), SHARDED_LOAD_TORCH_SINCE),
    reason=f"loading into a sharded model needs torch >= {SHARDED_LOAD_TORCH_SINCE}: refused on this one",
)
def test_fsdp2_ranks_verify_the_stamp_on_their_own_shards(stamped: dict[str, Any], tmp_path: Any) -> None:
    """Every rank compares the sampled elements it holds (no collective): the same base loads on both ranks, another
    seed's is refused on both, each rank's shards restored."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    worker = ["-m", "tests.support.fingerprint_worker"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *worker]
    done = subprocess.run(
        [*command, stamped["stamped"], str(tmp_path)], env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-4000:]
    for rank in range(2):
        with open(tmp_path / f"rank{rank}.json") as f:
            seen = json.load(f)
        assert seen["same_base"] == {"loaded": True}, rank
        assert seen["other_base"] == {"loaded": False, "code": "base_weights_differ", "restored": True}, rank
