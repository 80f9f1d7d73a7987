"""Quantized bases (QLoRA and friends), for real, on CPU: one row per quantization backend.

For each backend the tiny causal Llama is loaded by transformers with the backend's ``quantization_config``, a q/v
LoRA is trained on (saved from) that quantized base, and then:

* the good adapter loads with plain peft's outputs (``PeftModel.from_pretrained`` on an identical quantized copy);
* a broken one (its config's ``r`` disagreeing with the weights) is refused as ``rank_mismatch``, the quantized base
  left exactly as it was;
* ``diagnose`` says the same of both;
* ``safe-peft check --base DIR`` gives the same verdicts from a config-only base directory whose config.json carries
  the ``quantization_config``.

Each backend is skipped where its package is not installed (the CI's newest environment installs them:
``pip install -e ".[test,quant-tests]"``). HQQ and GPTQ / AWQ have no row: see docs/compatibility.md.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from peft import PeftModel

from safe_peft import AdapterLoadError, diagnose, safe_load_adapter
from safe_peft._cli import main
from tests.support.helpers import assert_same_state, build, derive, model_state, outputs, primary, train_adapter


@dataclass(frozen=True)
class Backend:
    module: str  # what pytest.importorskip imports
    config: Callable[[], Any]  # the transformers quantization config
    layer: str  # the class transformers puts in place of q_proj (a name: the backend is imported lazily)


def _bnb(**kwargs: Any) -> Any:
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(**kwargs)


def _torchao() -> Any:
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    return TorchAoConfig(Int8WeightOnlyConfig())


def _quanto() -> Any:
    from transformers import QuantoConfig

    return QuantoConfig(weights="int8")


BACKENDS = {
    "bnb_4bit": Backend(
        "bitsandbytes",
        lambda: _bnb(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
        "Linear4bit",
    ),
    "bnb_8bit": Backend("bitsandbytes", lambda: _bnb(load_in_8bit=True), "Linear8bitLt"),
    "torchao_int8": Backend("torchao", _torchao, "Linear"),  # an nn.Linear whose weight is torchao's tensor subclass
    "quanto_int8": Backend("optimum.quanto", _quanto, "QLinear"),
}

pytestmark = [
    # bitsandbytes' 8-bit matmul says on CPU that it computes in float16; the outputs are compared with plain peft's
    pytest.mark.filterwarnings("ignore:MatMul8bitLt. inputs will be cast:UserWarning"),
]


@pytest.fixture(scope="module", params=list(BACKENDS))
def quantized(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    backend = BACKENDS[request.param]
    pytest.importorskip(backend.module)
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp(request.param)
    base = str(root / "base")
    build("causal").save_pretrained(base)

    def make() -> Any:
        model = LlamaForCausalLM.from_pretrained(
            base, quantization_config=backend.config(), device_map="cpu", dtype=torch.float32
        )
        layer = model.model.layers[0].self_attn.q_proj
        assert type(layer).__name__ == backend.layer, type(layer)
        assert type(layer.weight) is not torch.nn.Parameter or layer.weight.dtype != torch.float32  # quantized
        return model.eval()

    good = str(root / "good")
    trained = make()
    train_adapter(trained, good)
    config_only = str(root / "config_only")
    trained.config.save_pretrained(config_only)  # config.json alone, quantization_config included
    return {
        "name": request.param,
        "make": make,
        "good": good,
        "broken": derive(good, str(root / "rank4"), config=lambda c: c.update(r=4)),
        "config_only": config_only,
    }


def test_a_good_adapter_loads_with_plain_peft_outputs(quantized: dict[str, Any]) -> None:
    loaded = safe_load_adapter(quantized["make"](), quantized["good"])
    plain = PeftModel.from_pretrained(quantized["make"](), quantized["good"])
    assert torch.equal(outputs(loaded), outputs(plain))
    base_layer = loaded.get_submodule("base_model.model.model.layers.0.self_attn.q_proj.base_layer")
    assert type(base_layer).__name__ == BACKENDS[quantized["name"]].layer  # the adapter sits on the quantized layer


def test_a_rank_broken_adapter_is_refused_and_the_base_untouched(quantized: dict[str, Any]) -> None:
    model = quantized["make"]()
    logits = outputs(model)  # first: bitsandbytes repacks 4-bit weights for its CPU kernel at the first forward
    before = model_state(model)
    with pytest.raises(AdapterLoadError) as caught:
        safe_load_adapter(model, quantized["broken"])
    assert primary(caught.value.report).code == "rank_mismatch"
    assert_same_state(before, model)
    assert torch.equal(outputs(model), logits)


def test_diagnose_agrees(quantized: dict[str, Any]) -> None:
    assert diagnose(quantized["make"](), quantized["good"]).ok
    report = diagnose(quantized["make"](), quantized["broken"])
    assert not report.ok and primary(report).code == "rank_mismatch"


def test_check_from_a_config_only_quantized_base(quantized: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    directory = quantized["config_only"]
    assert os.listdir(directory) == ["config.json"]
    with open(os.path.join(directory, "config.json")) as f:
        assert "quantization_config" in json.load(f)
    code = main(["check", "--json", "--base", directory, quantized["good"], quantized["broken"]])
    document = json.loads(capsys.readouterr().out)
    assert code == 1
    verdicts = [(r["verdict"], [c["code"] for c in r["report"]["causes"]][:1]) for r in document["results"]]
    assert verdicts == [("compatible", []), ("incompatible", ["rank_mismatch"])]
