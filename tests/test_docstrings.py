"""Every public name's docstring carries a runnable example, and every public function documents its parameters.

The examples run with ``doctest`` against real objects: a tiny Llama built from a fixed seed (``base``,
``make_base()`` for a fresh copy an example may change, ``other_base`` of another width for a refused load) and
real adapters saved by real peft (``adapter_dir``; ``compiled_adapter_dir`` with torch.compile's ``_orig_mod.``
in its keys; ``auto_adapter_dir`` whose config names a saved base at ``base_dir``). ``tmp`` is a fresh directory.
"""

from __future__ import annotations

import doctest
import inspect
import os
from typing import Any

import pytest

import safe_peft
from tests.support.helpers import derive

PUBLIC = sorted(n for n in safe_peft.__all__ if n != "__version__")
# Documented in the API reference outside ``safe_peft.__all__``.
EXTRA = {"rename_state_dict": "safe_peft.rules"}
NAMES = PUBLIC + sorted(EXTRA)

# Names whose example skips a line (``# doctest: +SKIP``), and why. At most three.
SKIPS = {
    "StampCallback": "the Trainer that calls it is too slow to build here; the example calls its hook directly",
    "merge_rank_shards": "its input is the per-rank files a sharded save writes on several processes",
}


def _obj(name: str) -> Any:
    if name in EXTRA:
        import importlib

        return getattr(importlib.import_module(EXTRA[name]), name)
    return getattr(safe_peft, name)


def _make_base(hidden_size: int = 64) -> Any:
    """A tiny Llama with fixed weights; ``hidden_size`` 128 gives another base the adapter does not fit."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=128,
    )
    return LlamaForCausalLM(config).eval()


def _save_adapter(base: Any, directory: str) -> str:
    """A trained-looking LoRA (non-zero lora_B) on q_proj / v_proj, saved by peft."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(base, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import torch

    root = tmp_path_factory.mktemp("docstrings")
    adapter_dir = _save_adapter(_make_base(), str(root / "adapter"))
    base_dir = str(root / "base")
    _make_base().save_pretrained(base_dir)
    return {
        "safe_peft": safe_peft,
        **{name: _obj(name) for name in NAMES},
        "os": os,
        "torch": torch,
        "base": _make_base(),
        "make_base": lambda: _make_base(),
        "other_base": _make_base(hidden_size=128),
        "adapter_dir": adapter_dir,
        "compiled_adapter_dir": derive(
            adapter_dir, str(root / "compiled"), keys=lambda k: k.replace("model.layers", "_orig_mod.model.layers")
        ),
        "base_dir": base_dir,
        "auto_adapter_dir": derive(
            adapter_dir,
            str(root / "auto"),
            config=lambda data: data.update(base_model_name_or_path=base_dir, task_type="CAUSAL_LM"),
        ),
    }


def _examples(name: str) -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder(recurse=False)
    return [t for t in finder.find(inspect.unwrap(_obj(name)), name, module=False) if t.examples]


@pytest.mark.parametrize("name", NAMES)
def test_every_public_name_has_an_example(name: str) -> None:
    assert _examples(name), f"{name}: no >>> example in its docstring"


@pytest.mark.parametrize("name", NAMES)
def test_the_examples_run(name: str, world: dict[str, Any], tmp_path: Any) -> None:
    output: list[str] = []
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    skipped = False
    for test in _examples(name):
        test.globs = {**world, "tmp": str(tmp_path)}
        skipped = skipped or any(e.options.get(doctest.SKIP) for e in test.examples)
        runner.run(test, out=output.append)
    assert runner.failures == 0, "".join(output)
    assert skipped == (name in SKIPS), f"{name}: a skipped example needs a reason in SKIPS, and only those"


def test_skips_stay_few() -> None:
    assert len(SKIPS) <= 3


@pytest.mark.parametrize("name", [n for n in NAMES if inspect.isfunction(inspect.unwrap(_obj(n)))])
def test_every_parameter_is_documented(name: str) -> None:
    """``:param name:`` for each parameter; a ``**kwargs`` pass-through may be one line naming it."""
    function = _obj(name)
    doc = inspect.getdoc(function) or ""
    missing = []
    for parameter in inspect.signature(function).parameters.values():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            if f":param {parameter.name}:" not in doc and f"**{parameter.name}" not in doc:
                missing.append(f"**{parameter.name}")
        elif f":param {parameter.name}:" not in doc:
            missing.append(parameter.name)
    assert not missing, f"{name}: undocumented parameters {missing}"
