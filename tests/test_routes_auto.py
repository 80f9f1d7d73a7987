"""The Auto entry point: safe_peft.from_pretrained(adapter) as AutoPeftModelFor*.from_pretrained(adapter), and with
inplace=True as transformers' AutoModelFor*.from_pretrained(adapter_dir). Local directories only: the base models
are tiny models saved with save_pretrained, and base_model_name_or_path points at them."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification, PeftModel
from transformers.integrations.peft import PeftAdapterMixin

import safe_peft
from safe_peft import AdapterLoadError
from tests.support.helpers import build, derive, outputs, primary


@pytest.fixture(autouse=True)
def _quiet_transformers() -> Iterator[None]:
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


def _edit(directory: str, **changes: Any) -> str:
    path = os.path.join(directory, "adapter_config.json")
    with open(path) as f:
        data = json.load(f)
    data.update(changes)
    with open(path, "w") as f:
        json.dump(data, f)
    return directory


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory, adapters: dict[str, Any]) -> dict[str, str]:
    """A local 'hub': tiny bases saved with save_pretrained, and adapters whose configs name them."""
    root = tmp_path_factory.mktemp("auto")
    made = {}
    for kind in ("causal", "seqcls"):
        made[f"base_{kind}"] = str(root / f"base_{kind}")
        build(kind).save_pretrained(made[f"base_{kind}"])

    def adapter(name: str, source: str, **config: Any) -> None:
        made[name] = str(root / name)
        shutil.copytree(adapters[source][0], made[name])
        _edit(made[name], **config)

    adapter("causal", "causal", base_model_name_or_path=made["base_causal"], task_type="CAUSAL_LM")
    adapter("seqcls", "seqcls", base_model_name_or_path=made["base_seqcls"])
    adapter("no_base", "causal", base_model_name_or_path=None, task_type="CAUSAL_LM")
    adapter("gone", "causal", base_model_name_or_path=str(root / "deleted"), task_type="CAUSAL_LM")
    adapter("hub_id", "causal", base_model_name_or_path="safe-peft-tests/no-such-model", task_type="CAUSAL_LM")
    adapter("no_task", "causal", base_model_name_or_path=made["base_causal"], task_type=None, auto_mapping=None)
    mapping = {"base_model_class": "LlamaForCausalLM", "parent_library": "transformers.models.llama.modeling_llama"}
    adapter("mapped", "causal", base_model_name_or_path=made["base_causal"], task_type=None, auto_mapping=mapping)
    adapter(
        "foreign_lib",
        "causal",
        base_model_name_or_path=made["base_causal"],
        task_type=None,
        auto_mapping={"base_model_class": "Thing", "parent_library": "some_plugin.models"},
    )
    made["r4"] = derive(made["causal"], str(root / "r4"), config=lambda c: c.update(r=4))
    adapter("tokenizer", "causal", base_model_name_or_path=made["base_causal"], task_type="CAUSAL_LM")
    _save_tokenizer(made["tokenizer"], vocab=120)  # more tokens than the base's 100 embedding rows
    return made


def _save_tokenizer(directory: str, vocab: int) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = {"[UNK]": 0, **{f"w{i}": i for i in range(1, vocab)}}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(words, unk_token="[UNK]")))
    tokenizer.save_pretrained(directory)


def _same(ours: torch.nn.Module, plain: torch.nn.Module) -> None:
    assert isinstance(ours, (PeftModel, PeftAdapterMixin)) and isinstance(plain, (PeftModel, PeftAdapterMixin))
    assert type(ours) is type(plain)
    a, b = ours.state_dict(), plain.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    configs = [{k: v.to_dict() for k, v in m.peft_config.items()} for m in (ours, plain)]
    assert configs[0] == configs[1]
    assert torch.equal(outputs(ours), outputs(plain))


@pytest.mark.parametrize(
    ("which", "auto"), [("causal", AutoPeftModelForCausalLM), ("seqcls", AutoPeftModelForSequenceClassification)]
)
def test_it_builds_what_autopeftmodel_builds(which: str, auto: Any, hub: dict[str, str]) -> None:
    plain = auto.from_pretrained(hub[which])
    ours, report = safe_peft.from_pretrained(hub[which], output_loading_info=True)
    assert report.ok
    _same(ours, plain)


def test_base_kwargs_are_passed_on(hub: dict[str, str]) -> None:
    plain = AutoPeftModelForCausalLM.from_pretrained(hub["causal"], dtype=torch.bfloat16, is_trainable=True)
    ours = safe_peft.from_pretrained(hub["causal"], dtype=torch.bfloat16, is_trainable=True)
    assert ours.get_base_model().dtype == torch.bfloat16
    _same(ours, plain)
    assert [(n, p.requires_grad) for n, p in ours.named_parameters()] == [
        (n, p.requires_grad) for n, p in plain.named_parameters()
    ]


def test_a_tokenizer_saved_with_the_adapter_grows_the_embeddings_as_peft_does(hub: dict[str, str]) -> None:
    torch.manual_seed(0)  # the new embedding rows are drawn at random
    plain = AutoPeftModelForCausalLM.from_pretrained(hub["tokenizer"])
    torch.manual_seed(0)
    ours = safe_peft.from_pretrained(hub["tokenizer"])
    assert ours.get_input_embeddings().weight.shape[0] == 120
    _same(ours, plain)


def test_inplace_builds_what_transformers_builds_from_an_adapter_directory(hub: dict[str, str]) -> None:
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(hub["causal"])
    ours = safe_peft.from_pretrained(hub["causal"], inplace=True)
    assert ours._hf_peft_config_loaded and not isinstance(ours, safe_peft.LoadReport)
    _same(ours, plain)


def test_auto_mapping_within_peft_s_allowlist(hub: dict[str, str]) -> None:
    plain = AutoPeftModelForCausalLM.from_pretrained(hub["causal"])
    ours = safe_peft.from_pretrained(hub["mapped"])
    assert torch.equal(outputs(ours), outputs(plain))
    with pytest.raises(AdapterLoadError) as caught:
        safe_peft.from_pretrained(hub["foreign_lib"])
    assert primary(caught.value.report).code == "auto_import_refused"
    assert "import_allowlist=['some_plugin.models']" in primary(caught.value.report).fix


@pytest.mark.parametrize(
    ("which", "code"),
    [
        ("no_base", "base_model_unknown"),
        ("gone", "base_model_unreachable"),
        ("hub_id", "base_model_unreachable"),
        ("no_task", "auto_class_unknown"),
        ("r4", "rank_mismatch"),
    ],
)
def test_what_cannot_be_built_or_loaded_is_a_typed_error_that_says_how(
    which: str, code: str, hub: dict[str, str]
) -> None:
    with pytest.raises(AdapterLoadError) as caught:
        safe_peft.from_pretrained(hub[which])
    top = caught.value.report.primary
    assert top is not None and top.code == code
    if code.startswith("base_model"):
        assert f"safe_load_adapter(AutoModelForCausalLM.from_pretrained(BASE), {hub[which]!r})" in top.fix
        assert "base model was left unchanged" not in str(caught.value)  # there is none: nothing was built


def test_an_explicit_auto_class_builds_an_adapter_without_task_type(hub: dict[str, str]) -> None:
    """peft's AutoPeftModel cannot infer the class here (neither task_type nor auto_mapping); auto_class= says it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with pytest.raises(ValueError, match="Cannot infer the auto class"):
        AutoPeftModelForCausalLM.from_pretrained(hub["no_task"])
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hub["base_causal"]), hub["no_task"])
    ours = safe_peft.from_pretrained(hub["no_task"], auto_class=AutoModelForCausalLM)
    assert torch.equal(outputs(ours), outputs(plain))
