"""Paths, subfolders and configs: every problem a clear error naming the file, never a deep traceback."""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, cast

import pytest
import torch
from peft import LoraConfig, get_peft_model

from safe_peft import AdapterFormatError, AdapterLoadError, Cause, diagnose, inspect_adapter, safe_load_adapter
from tests.support.helpers import assert_unchanged, build, derive, fingerprint, outputs, primary


def _code(exc: pytest.ExceptionInfo[AdapterFormatError]) -> tuple[Cause, str]:
    top = exc.value.report.primary
    assert top is not None
    return top.cause, top.code


def test_file_instead_of_directory(adapters: dict[str, Any]) -> None:
    path = os.path.join(adapters["causal"][0], "adapter_model.safetensors")
    with pytest.raises(AdapterFormatError) as info:
        safe_load_adapter(build("causal"), path)
    assert _code(info) == (Cause.CORRUPT_CHECKPOINT, "not_a_directory")
    assert repr(adapters["causal"][0]) in str(info.value)


def test_missing_directory_offline(tmp_path: Any) -> None:
    with pytest.raises(AdapterFormatError) as info:
        safe_load_adapter(build("causal"), str(tmp_path / "nope"))
    assert _code(info) == (Cause.CORRUPT_CHECKPOINT, "not_found")


def test_symlink_loop(tmp_path: Any) -> None:
    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    with pytest.raises(AdapterFormatError) as info:
        safe_load_adapter(build("causal"), str(loop))
    assert _code(info) == (Cause.CORRUPT_CHECKPOINT, "unreadable_path")


def test_subfolder_escaping_the_directory(adapters: dict[str, Any], tmp_path: Any) -> None:
    with pytest.raises(AdapterFormatError) as info:
        safe_load_adapter(build("causal"), adapters["causal"][0], subfolder="../../etc")
    assert _code(info) == (Cause.CORRUPT_CHECKPOINT, "subfolder_escapes")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads unreadable files")
def test_unreadable_config(adapters: dict[str, Any], tmp_path: Any) -> None:
    directory = derive(adapters["causal"][0], str(tmp_path / "ro"))
    os.chmod(os.path.join(directory, "adapter_config.json"), 0)
    with pytest.raises(AdapterFormatError) as info:
        safe_load_adapter(build("causal"), directory)
    assert _code(info) == (Cause.CORRUPT_CHECKPOINT, "unreadable_config")


def test_non_default_adapter_name_saved_in_a_subfolder(tmp_path: Any) -> None:
    """peft saves adapter_name='style' into <dir>/style/; the error names the subfolder argument."""
    torch.manual_seed(1)
    model = get_peft_model(
        build("causal"), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False), adapter_name="style"
    )
    directory = str(tmp_path / "multi")
    model.save_pretrained(directory)
    assert os.path.isfile(os.path.join(directory, "style", "adapter_config.json"))
    trained = outputs(model.eval())
    with pytest.raises(AdapterFormatError) as info:
        safe_load_adapter(build("causal"), directory)
    assert _code(info) == (Cause.CORRUPT_CHECKPOINT, "missing_config")
    assert "subfolder='style'" in str(info.value)
    loaded = safe_load_adapter(build("causal"), directory, adapter_name="style", subfolder="style")
    assert torch.allclose(outputs(loaded), trained, atol=1e-5)


def test_model_directory_given_as_adapter(tmp_path: Any) -> None:
    build("causal").save_pretrained(tmp_path / "model")
    with pytest.raises(AdapterFormatError) as info:
        safe_load_adapter(build("causal"), str(tmp_path / "model"))
    assert _code(info) == (Cause.CORRUPT_CHECKPOINT, "missing_config")
    assert "model, not a PEFT adapter" in str(info.value)


def test_unknown_config_keys_are_a_version_skew_warning(adapters: dict[str, Any], tmp_path: Any) -> None:
    directory = derive(
        adapters["causal"][0],
        str(tmp_path / "newer"),
        config=lambda c: c.update(future_option={}, another_new_field=None),
    )
    model, report = safe_load_adapter(build("causal"), directory, output_loading_info=True)
    assert report.ok
    assert [(w.cause, w.code) for w in report.warnings] == [(Cause.VERSION_SKEW, "unknown_config_keys")]
    assert report.warnings[0].details["keys"] == ["another_new_field", "future_option"]
    assert torch.allclose(outputs(model), adapters["causal"][1], atol=1e-5)


def test_newer_peft_version_is_a_warning_naming_both_versions(adapters: dict[str, Any], tmp_path: Any) -> None:
    import peft

    directory = derive(adapters["causal"][0], str(tmp_path / "future"), config=lambda c: c.update(peft_version="9.1.0"))
    model, report = safe_load_adapter(build("causal"), directory, output_loading_info=True)
    assert report.ok
    newer = [w for w in report.warnings if w.code == "newer_peft_version"]
    assert [w.details for w in newer] == [{"peft_version": "9.1.0", "installed_peft": peft.__version__}]
    assert {w.code for w in report.warnings} <= {"newer_peft_version", "unknown_config_keys"}
    assert torch.allclose(outputs(model), adapters["causal"][1], atol=1e-5)


def test_meaning_changing_unknown_key_is_refused(adapters: dict[str, Any], tmp_path: Any, monkeypatch: Any) -> None:
    """When the installed peft lacks a field whose value changes the adapter, ignoring it is refused; the fix names
    a newer peft and the opt-ins that load it anyway, and both opt-ins work."""
    import peft

    import safe_peft._files.config as adapter_config

    directory = derive(
        adapters["causal"][0],
        str(tmp_path / "meaning"),
        config=lambda c: c.update(use_dora=True, peft_version="9.1.0"),
    )
    # Simulate an older peft that does not know `use_dora` by hiding the field from the known set.
    real_fields = adapter_config.known_fields
    monkeypatch.setattr(adapter_config, "known_fields", lambda cls: real_fields(cls) - {"use_dora"})
    base = build("causal")
    before = fingerprint(base)
    assert primary(diagnose(base, directory)).code == "meaning_changing_config_key"
    with pytest.raises(AdapterLoadError) as info:
        safe_load_adapter(base, directory)
    top = info.value.report.primary
    assert top is not None and (top.cause, top.code) == (Cause.VERSION_SKEW, "meaning_changing_config_key")
    assert "upgrade peft to 9.1.0" in top.fix and top.repair == ("config",)
    assert f"installed: {peft.__version__}" in top.fix
    assert_unchanged(before, base)
    model, report = safe_load_adapter(base, directory, repair=("config",), output_loading_info=True)
    assert report.ok and report.repairs and "use_dora" in report.repairs[0]
    assert torch.allclose(outputs(model), adapters["causal"][1], atol=1e-6)  # use_dora was never real here
    _, lenient = safe_load_adapter(build("causal"), directory, strict=False, output_loading_info=True)
    assert [d.code for d in lenient.causes] == ["meaning_changing_config_key"]


def test_unknown_key_not_written_by_any_peft_is_not_told_to_upgrade(adapters: dict[str, Any], tmp_path: Any) -> None:
    """A hand-added key in an adapter saved by the installed peft: remove it (not "upgrade peft to <installed>")."""
    import peft

    directory = derive(
        adapters["causal"][0],
        str(tmp_path / "hand"),
        config=lambda c: c.update(lora_dtype="bfloat16", peft_version=peft.__version__),
    )
    report = diagnose(build("causal"), directory)
    top = report.primary
    assert top is not None and top.code == "meaning_changing_config_key"
    assert "upgrade" not in top.fix and "remove it from adapter_config.json" in top.fix
    # Diagnosis.repair is typed tuple[str, ...], safe_load_adapter's repair a tuple of the Literal names
    model = safe_load_adapter(build("causal"), directory, repair=cast(Any, top.repair))
    assert torch.allclose(outputs(model), adapters["causal"][1], atol=1e-6)


def test_stray_pickle_beside_safetensors_is_reported(adapters: dict[str, Any], tmp_path: Any) -> None:
    directory = derive(adapters["causal"][0], str(tmp_path / "stray"))
    torch.save({"x": torch.zeros(1)}, os.path.join(directory, "training_args.bin"))
    report = diagnose(build("causal"), directory)
    assert report.ok
    assert [(w.cause, w.code) for w in report.warnings] == [(Cause.UNSAFE_FORMAT, "stray_code_files")]


def test_inspect_adapter(adapters: dict[str, Any], tmp_path: Any) -> None:
    manifest = inspect_adapter(adapters["causal"][0])
    assert manifest.peft_type == "LORA"
    assert manifest.config_r == 8
    assert set(manifest.ranks.values()) == {8} and manifest.rank_agrees
    assert len(manifest.tensors) == 8
    assert manifest.parameters == 2 * (8 * 64 + 64 * 8) + 2 * (8 * 64 + 32 * 8)
    assert manifest.total_bytes == manifest.parameters * 4
    assert manifest.read_data is False
    json.dumps(manifest.to_dict())
    bad = derive(adapters["causal"][0], str(tmp_path / "r4"), config=lambda c: c.update(r=4))
    assert not inspect_adapter(bad).rank_agrees


def test_inspect_pickle_needs_permission(adapters: dict[str, Any], tmp_path: Any) -> None:
    from safetensors.torch import load_file

    directory = str(tmp_path / "bin")
    shutil.copytree(adapters["causal"][0], directory)
    weights = os.path.join(directory, "adapter_model.safetensors")
    torch.save(load_file(weights), os.path.join(directory, "adapter_model.bin"))
    os.remove(weights)
    with pytest.raises(AdapterFormatError):
        inspect_adapter(directory)
    manifest = inspect_adapter(directory, allow_pickle=True)
    assert manifest.read_data and manifest.weights_format == "pickle" and len(manifest.tensors) == 8


def test_testing_helper(adapters: dict[str, Any], tmp_path: Any) -> None:
    from safe_peft.testing import assert_adapter_loads

    model = assert_adapter_loads(build("causal"), adapters["causal"][0])
    assert torch.allclose(outputs(model), adapters["causal"][1], atol=1e-5)
    with pytest.raises(AssertionError, match=r"Most likely cause \[wrong_base_model/dimension_mismatch\]"):
        assert_adapter_loads(build("causal"), adapters["wide"][0])


@pytest.mark.parametrize(
    "name, code", [("adapter_config.json", "missing_config"), ("adapter_model.safetensors", "missing_weights")]
)
def test_fifo_in_place_of_a_file_never_blocks(adapters: dict[str, Any], tmp_path: Any, name: str, code: str) -> None:
    directory = derive(adapters["causal"][0], str(tmp_path / "fifo"))
    os.remove(os.path.join(directory, name))
    os.mkfifo(os.path.join(directory, name))  # opening it for reading would block forever
    with pytest.raises(AdapterFormatError) as info:
        safe_load_adapter(build("causal"), directory)
    assert _code(info) == (Cause.CORRUPT_CHECKPOINT, code)


@pytest.mark.parametrize(
    "key, value, refused",
    [
        ("future_flag", True, True),  # unknown key, a value that may matter
        ("future_scale", 0.5, True),
        ("future_flag", False, False),  # empty / false: harmless
        ("future_config", None, False),
        ("future_list", [], False),
        ("use_dora", True, True),  # known meaning-changing key
        ("use_dora", False, False),
        ("peft_version", "9.0.0", False),  # metadata
        ("eva_config", {"rho": 2.0}, False),  # initialisation only
    ],
)
def test_changes_meaning_table(key: str, value: Any, refused: bool) -> None:
    from safe_peft._files.config import changes_meaning

    assert changes_meaning(key, value) is refused
