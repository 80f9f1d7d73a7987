from __future__ import annotations

import os
import sys
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from helpers import build, train_adapter


@pytest.fixture(scope="session")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Real adapters saved by real peft, with the outputs of each as trained."""
    root = tmp_path_factory.mktemp("adapters")
    made: dict[str, Any] = {}

    def make(name: str, kind: str, **lora: Any) -> None:
        directory = str(root / name)
        made[name] = (directory, train_adapter(build(kind, **lora.pop("model", {})), directory, **lora))

    make("causal", "causal")
    make("bare", "bare")
    make("seqcls", "seqcls", task_type="SEQ_CLS")
    make("gpt2", "gpt2", target_modules=["c_attn"], fan_in_fan_out=True)
    make("deep", "causal", model={"num_hidden_layers": 4})
    make("wide", "causal", model={"hidden_size": 128, "intermediate_size": 256})
    make("dora", "causal", use_dora=True)
    make("all_linear", "causal", r=4, target_modules="all-linear")
    make("causal_task", "causal", task_type="CAUSAL_LM")  # what TRL and most tutorials save
    make("all_linear_task", "causal", r=4, target_modules="all-linear", task_type="CAUSAL_LM")
    return made
