"""parse_load_error on messages produced by real torch and real peft calls, and on hostile input."""

from __future__ import annotations

import time
import warnings
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import PeftModel

from safe_peft import Cause, parse_load_error
from safe_peft._plan.parse_error import _SIZE, _size_mismatch_at, _size_mismatches
from tests.support.helpers import build, derive


def _torch_error(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> RuntimeError:
    with pytest.raises(RuntimeError) as info:
        module.load_state_dict(state)
    return info.value


def test_all_three_sections_of_a_real_torch_error() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    state = {"0.weight": torch.zeros(5, 4), "0.bias": torch.zeros(3), "extra.weight": torch.zeros(1)}
    report = parse_load_error(_torch_error(model, state))
    assert not report.ok
    assert report.model_class == "Sequential"
    assert [m.key for m in report.missing] == ["1.weight", "1.bias"]
    assert [u.key for u in report.unexpected] == ["extra.weight"]
    assert [(s.key, s.checkpoint_shape, s.model_shape) for s in report.size_mismatches] == [
        ("0.weight", (5, 4), (3, 4))
    ]


def test_real_peft_rank_error_is_a_config_mismatch(adapters: dict[str, Any], tmp_path: Any) -> None:
    directory = derive(adapters["causal"][0], str(tmp_path / "r4"), config=lambda c: c.update(r=4))
    with pytest.raises(RuntimeError) as info:
        PeftModel.from_pretrained(build("causal"), directory)
    report = parse_load_error(info.value)
    assert len(report.size_mismatches) == 8
    assert report.primary is not None
    assert (report.primary.cause, report.primary.code) == (Cause.CONFIG_MISMATCH, "rank_mismatch")


def test_real_peft_missing_keys_warning(adapters: dict[str, Any]) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PeftModel.from_pretrained(build("bare"), adapters["causal"][0])
    message = next(str(w.message) for w in caught if "missing adapter keys" in str(w.message))
    report = parse_load_error(message)
    assert len(report.missing) == 8
    assert all(".lora_" in m.key for m in report.missing)


def test_adapter_into_bare_model_is_wrong_loader(adapters: dict[str, Any]) -> None:
    from safetensors.torch import load_file

    state = load_file(f"{adapters['causal'][0]}/adapter_model.safetensors")
    report = parse_load_error(_torch_error(build("causal"), state))
    assert report.primary is not None and report.primary.cause is Cause.WRONG_LOADER


def test_100k_keys() -> None:
    keys = ", ".join(f'"layers.{i}.w"' for i in range(100_000))
    message = f"Error(s) in loading state_dict for M:\n\tMissing key(s) in state_dict: {keys}. "
    report = parse_load_error(message)
    assert len(report.missing) == 100_000
    assert report.missing[-1].key == "layers.99999.w"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Error(s) in loading state_dict for",
        'Missing key(s) in state_dict: "unterminated',
        "size mismatch for x: copying a param with shape torch.Size([1, 2",
        "size mismatch for " * 1000,
        "\x00\xff" * 100,
        "Unexpected key(s) in state_dict: " + '"' * 10_001,
    ],
)
def test_odd_input_never_raises(text: str) -> None:
    report = parse_load_error(text)
    assert report.size_mismatches == [] or all(s.checkpoint_shape for s in report.size_mismatches)


class _BadStr(Exception):
    def __str__(self) -> str:
        raise ValueError("broken")


def test_exception_with_broken_str() -> None:
    assert parse_load_error(_BadStr()).ok


@pytest.mark.parametrize(
    "pattern",
    [
        "size mismatch for a" * 50_000,
        "a" * 1_000_000,
        '"' * 1_000_000,
        "torch.Size([" * 80_000,
        "Missing key(s) in state_dict:" + " " * 1_000_000,
    ],
)
def test_adversarial_megabyte_inputs_stay_linear(pattern: str) -> None:
    start = time.perf_counter()
    parse_load_error(pattern)
    assert time.perf_counter() - start < 5  # quadratic behaviour would take minutes


@pytest.mark.property
@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    st.lists(
        st.sampled_from(
            [
                *list('ab".:,[]()\n 1'),
                "size mismatch for ",
                "torch.Size([",
                ": copying",
                "Missing key(s) in state_dict:",
                "Error(s) in loading",
            ]
        ),
        max_size=120,
    )
)
def test_parse_never_raises_property(parts: list[str]) -> None:
    report = parse_load_error("".join(parts))
    assert report.ok == (not (report.missing or report.unexpected or report.size_mismatches))


def _read_one_by_one(text: str) -> list[Any]:
    """The general reader at every marker: what _size_mismatches must give, whichever way it reads."""
    found, pos = [], text.find(_SIZE)
    while pos >= 0:
        found.append(_size_mismatch_at(text, pos + len(_SIZE)))
        pos = text.find(_SIZE, pos + len(_SIZE))
    return [m for m in found if m is not None]


_LINE = (
    "size mismatch for {}: copying a param with shape torch.Size([{}]) from checkpoint, "
    "the shape in current model is torch.Size([{}])."
)


@pytest.mark.parametrize(
    "text",
    [
        "\n\t".join(_LINE.format(f"m.{i}.lora_A.weight", "16, 64", "8, 64") for i in range(50)),
        _LINE.format("a", "1", "2") + _LINE.format("b", "3", "4"),  # two on one line
        _LINE.format("a", "1,,2", "2") + "\n" + _LINE.format("b", "", "4"),  # not a shape / a scalar
        _LINE.format("a:b", "1", "2") + "\n" + _LINE.format("b", "3", "4"),  # a colon in a key: read one by one
        _LINE.format("k" * 1998, "1", "2") + "\n" + _LINE.format("k" * 1999, "1", "2"),  # the key length bound
        _LINE.format("a", "1" * 198, "2") + "\n" + _LINE.format("a", "1" * 199, "2"),  # the shape length bound
        _LINE.format("size mismatch for a", "1", "2"),  # a marker inside a key
    ],
)
def test_torch_worded_lines_read_as_one_by_one(text: str) -> None:
    assert _size_mismatches(text) == _read_one_by_one(text)


@pytest.mark.property
@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    st.lists(
        st.sampled_from(
            [
                *list("ab.:, 1\n"),
                "size mismatch for ",
                ": copying a param with shape torch.Size([",
                "]) from checkpoint, the shape in current model is torch.Size([",
                "])",
                "16, 64",
                _LINE.format("x.lora_A.weight", "8, 4", "4, 4"),
            ]
        ),
        max_size=60,
    )
)
def test_size_mismatches_read_as_one_by_one_property(parts: list[str]) -> None:
    text = "".join(parts)
    assert _size_mismatches(text) == _read_one_by_one(text)
