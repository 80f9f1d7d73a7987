"""The module walks equal torch's: the same modules, paths and order, shared modules included, and torch's own walk
wherever a module class walks its own way."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from safe_peft._model.walk import every_module, every_parameter, named_modules, named_paths
from tests.support.helpers import build


class _OwnWalk(torch.nn.Sequential):
    def named_modules(self, *args: Any, **kwargs: Any) -> Any:  # a class that hides a child from walks
        for name, module in super().named_modules(*args, **kwargs):
            if not name.endswith("hidden"):
                yield name, module


def _shared() -> torch.nn.Module:
    shared = torch.nn.Linear(2, 2)
    inner = torch.nn.Sequential(shared, torch.nn.ReLU())
    model = torch.nn.Sequential(inner, shared, torch.nn.Sequential(inner, shared))
    model.add_module("empty", None)
    return model


def _own_walk() -> torch.nn.Module:
    model = _OwnWalk(torch.nn.Linear(2, 2))
    model.add_module("hidden", torch.nn.ReLU())
    return model


def _causal() -> torch.nn.Module:
    return build("causal")


def _peft_model() -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(build("causal"), LoraConfig(target_modules="all-linear", modules_to_save=["lm_head"]))


@pytest.mark.parametrize("make", [_shared, _own_walk, _causal, _peft_model], ids=lambda f: f.__name__)
def test_walks_equal_torchs(make: Any) -> None:
    model = make()
    assert [id(m) for m in every_module(model)] == [id(m) for m in model.modules()]
    assert [(n, id(m)) for n, m in named_modules(model)] == [(n, id(m)) for n, m in model.named_modules()]
    assert [id(p) for p in every_parameter(model)] == [id(p) for p in model.parameters()]
    ours = [(n, id(m)) for n, m in named_paths(model)]
    assert ours == [(n, id(m)) for n, m in model.named_modules(remove_duplicate=False)]
