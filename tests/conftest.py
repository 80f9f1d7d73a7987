from __future__ import annotations

import os
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub

from tests.support.compat_record import recorder_from_environment, write
from tests.support.helpers import build, train_adapter


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


# --- the CI record of this environment (tests/support/compat_record.py; only when SAFE_PEFT_COMPAT_ENV is set) -
_RECORDER = recorder_from_environment()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if _RECORDER is not None:
        _RECORDER.add(report)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _RECORDER is not None and not hasattr(session.config, "workerinput"):
        write(_RECORDER, session, exitstatus)
