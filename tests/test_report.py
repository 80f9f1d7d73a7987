"""The report data model, its rendering and the exceptions that carry it."""

from __future__ import annotations

import json
import pickle

import pytest

from safe_peft import (
    AdapterFormatError,
    AdapterLoadError,
    AdapterNotFoundError,
    Cause,
    Diagnosis,
    LoadReport,
    MissingKey,
    SizeMismatch,
)
from safe_peft.report import _collapse_keys as collapse_keys
from safe_peft.report import _render_report as render_report

REPORT = LoadReport(
    ok=False,
    size_mismatches=[
        SizeMismatch(f"base_model.model.model.layers.{i}.self_attn.{p}_proj.lora_A.weight", (8, 64), (4, 64))
        for i in range(80)
        for p in "qkvo"
    ],
    missing=[MissingKey(f"base_model.model.layers.{i}.mlp.up_proj.lora_B.weight", (64, 4)) for i in range(3)],
    causes=[
        Diagnosis(
            Cause.CONFIG_MISMATCH,
            "rank_mismatch",
            "adapter_config.json says r=4, weights have rank 8",
            fix="pass repair=('rank',)",
            repair=("rank",),
            details={"config_r": 4},
        ),
        Diagnosis(Cause.CORRUPT_CHECKPOINT, "incomplete_checkpoint", "3 tensors are missing"),
    ],
    adapter="/adapters/a",
    model_class="LlamaForCausalLM",
)

GOLDEN = """\
Cannot load adapter '/adapters/a' into LlamaForCausalLM: 3 missing, 0 unexpected, 320 size-mismatched keys.
Most likely cause [config_mismatch/rank_mismatch]: adapter_config.json says r=4, weights have rank 8
Fix: pass repair=('rank',)
Also [corrupt_checkpoint/incomplete_checkpoint]: 3 tensors are missing
Missing keys (in the model, not in the checkpoint) (3):
  base_model.model.layers.{0...2}.mlp.up_proj.lora_B.weight: [64, 4]
Size mismatches (320):
  base_model.model.model.layers.{0...79}.self_attn.q_proj.lora_A.weight: checkpoint [8, 64], model [4, 64]
  base_model.model.model.layers.{0...79}.self_attn.k_proj.lora_A.weight: checkpoint [8, 64], model [4, 64]
  base_model.model.model.layers.{0...79}.self_attn.v_proj.lora_A.weight: checkpoint [8, 64], model [4, 64]
  base_model.model.model.layers.{0...79}.self_attn.o_proj.lora_A.weight: checkpoint [8, 64], model [4, 64]
The base model was left unchanged.
Docs: https://github.com/safe-peft/safe-peft/blob/main/docs/causes/config_mismatch.md#rank_mismatch"""


def test_rendered_message_golden() -> None:
    assert render_report(REPORT) == GOLDEN
    assert str(AdapterLoadError(REPORT)) == GOLDEN


def test_key_samples_are_bounded() -> None:
    many = LoadReport(ok=False, missing=[MissingKey(f"m{i}.w") for i in range(1000)])
    text = render_report(many, sample_size=10)
    assert "... and 990 more lines" in text
    assert len(text.splitlines()) < 20


@pytest.mark.parametrize(
    "keys, expected",
    [
        (["h.0.a", "h.1.a", "h.2.a"], ["h.{0...2}.a"]),
        (["h.0.a", "h.2.a", "h.5.a"], ["h.{0,2,5}.a"]),
        (["h.0.a", "h.0.b"], ["h.0.a", "h.0.b"]),
        (["x"], ["x"]),
        ([f"l.{i}.w" for i in range(0, 40, 2)], ["l.{0,2,4,...,38}.w"]),
    ],
)
def test_collapse_keys(keys: list[str], expected: list[str]) -> None:
    assert [k for k, _ in collapse_keys([(k, "") for k in keys])] == expected


def test_to_dict_is_json_and_versioned() -> None:
    data = json.loads(json.dumps(REPORT.to_dict()))
    assert data["schema_version"] == 1
    assert data["causes"][0]["cause"] == "config_mismatch"
    assert data["causes"][0]["repair"] == ["rank"]
    assert data["causes"][0]["url"].endswith("config_mismatch.md#rank_mismatch")
    assert data["size_mismatches"][0]["checkpoint_shape"] == [8, 64]


@pytest.mark.parametrize("cls", [AdapterLoadError, AdapterFormatError])
def test_errors_survive_pickle(cls: type[AdapterLoadError]) -> None:
    err = cls(REPORT)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cls
    assert back.report == err.report
    assert str(back) == str(err)
    assert isinstance(back, RuntimeError)


@pytest.mark.parametrize("cls", [AdapterLoadError, AdapterFormatError, AdapterNotFoundError])
@pytest.mark.parametrize("plain", [ValueError, TypeError, KeyError, IndexError, NotImplementedError])
def test_an_error_is_also_the_builtin_class_peft_raised(cls: type[AdapterLoadError], plain: type[Exception]) -> None:
    """A finding made from peft's own exception records its builtin class; the error is then also that class (one
    cached subclass per pair), still ours and a RuntimeError, its text the report (KeyError's would quote it), and
    it pickles as the report."""
    from safe_peft._catalog import finding
    from safe_peft.errors import raised_by

    class PeftOwn(plain):  # type: ignore[valid-type,misc]  # peft's own subclass (NoMatchingPeftModuleError)
        pass

    cause = finding("load_failed", "peft failed while loading", details=raised_by(PeftOwn("x")))
    report = LoadReport(ok=False, causes=[cause])
    err = cls(report)
    assert isinstance(err, plain) and isinstance(err, cls) and isinstance(err, RuntimeError)
    assert type(err) is type(cls(report)) and type(err).__name__ == cls.__name__
    assert str(err) == str(report)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err) and back.report == report
    assert type(cls(REPORT)) is cls  # nothing recorded: only ours


def test_cause_values_are_stable_strings() -> None:
    assert Cause.WRONG_BASE_MODEL.value == "wrong_base_model"
    assert f"{Cause.VERSION_SKEW}" == "version_skew"
    assert {c.value for c in Cause} >= {
        "wrong_base_model",
        "model_class_mismatch",
        "key_format",
        "config_mismatch",
        "vocab_size_mismatch",
        "corrupt_checkpoint",
        "wrong_loader",
        "version_skew",
        "unsafe_format",
        "foreign_format",
        "unknown",
    }
