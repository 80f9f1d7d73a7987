"""The switch for code you do not own: safe_peft.patch() / unpatch() / patched().

Proven on a third-party-style helper module (tests/thirdparty.py: plain peft and transformers calls) and on the real
transformers Trainer resuming a PEFT run from its checkpoints (tiny model, a few CPU steps), including a broken
checkpoint and runs under torch.compile. Off, everything is plain and the original functions are back (`is`).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import thirdparty
import torch
from helpers import assert_same_state, build, derive, model_state, outputs
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers.integrations.peft import PeftAdapterMixin

import safe_peft
from safe_peft import AdapterLoadError
from safe_peft._versions import torch_at_least

# What the oldest supported torch cannot do, plain peft and transformers included (the skips name them):
RESUMES = pytest.mark.skipif(  # transformers >= 4.50 refuses torch.load (the Trainer's optimizer.pt) below torch 2.6
    not torch_at_least(str(torch.__version__), "2.6"),
    reason="transformers refuses to resume a Trainer (torch.load of optimizer.pt) below torch 2.6: CVE-2025-32434",
)
COMPILES = pytest.mark.skipif(  # transformers 4.56's sdpa_mask_older_torch fails to trace: a plain run fails too
    not torch_at_least(str(torch.__version__), "2.5"),
    reason="torch.compile of a transformers Llama training step fails below torch 2.5 (plain peft included)",
)
MISSING = "Found missing adapter keys"  # plain peft's only word about an adapter that did not load


@pytest.fixture(autouse=True)
def _quiet_and_off() -> Iterator[None]:
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)
    safe_peft.unpatch()
    assert not safe_peft.is_patched()


ORIGINALS = {
    (PeftModel, "from_pretrained"): PeftModel.__dict__["from_pretrained"],
    (PeftModel, "load_adapter"): PeftModel.__dict__["load_adapter"],
    (PeftAdapterMixin, "load_adapter"): PeftAdapterMixin.__dict__["load_adapter"],
}


def _originals_in_place() -> bool:
    return all(owner.__dict__[name] is original for (owner, name), original in ORIGINALS.items())


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, adapters: dict[str, Any]) -> dict[str, str]:
    root = tmp_path_factory.mktemp("switch")
    good = adapters["causal"][0]
    return {
        "good": good,
        "other": adapters["all_linear"][0],
        "broken": derive(good, str(root / "broken"), keys=lambda k: None if "v_proj" in k else k),
        "compiled": derive(good, str(root / "compiled"), keys=lambda k: f"_orig_mod.{k}"),
    }


def test_off_the_calls_are_plain_and_the_functions_the_originals(files: dict[str, str]) -> None:
    assert _originals_in_place() and not safe_peft.is_patched()
    with pytest.warns(UserWarning, match=MISSING):
        model = thirdparty.load_for_inference(build("causal"), files["broken"])  # loads, silently wrong
    assert isinstance(model, PeftModel)


def test_inside_the_switch_every_helper_call_goes_through_safe_peft(files: dict[str, str]) -> None:
    plain = thirdparty.load_for_inference(build("causal"), files["good"])
    thirdparty.add_adapters(plain, {"x": files["other"]})
    plain_inplace = thirdparty.load_with_transformers(build("causal"), files["good"])
    with safe_peft.patched():
        assert safe_peft.is_patched() and not _originals_in_place()
        with pytest.raises(AdapterLoadError) as caught:
            thirdparty.load_for_inference(build("causal"), files["broken"])
        assert caught.value.report.primary.code == "targets_without_weights"
        ours = thirdparty.load_for_inference(build("causal"), files["good"])
        before = model_state(ours)
        with pytest.raises(AdapterLoadError):
            thirdparty.add_adapters(ours, {"x": files["broken"]})
        assert_same_state(before, ours)
        thirdparty.add_adapters(ours, {"x": files["other"]})
        model = build("causal")
        before = model_state(model)
        with pytest.raises(AdapterLoadError):
            thirdparty.load_with_transformers(model, files["broken"])
        assert_same_state(before, model)
        ours_inplace = thirdparty.load_with_transformers(model, files["good"])
    assert _originals_in_place()
    for a, b in ((ours, plain), (ours_inplace, plain_inplace)):
        assert a.state_dict().keys() == b.state_dict().keys()
        assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
        assert torch.equal(outputs(a), outputs(b))


def test_patch_and_unpatch_restore_the_very_functions(files: dict[str, str]) -> None:
    safe_peft.patch()
    assert safe_peft.is_patched() and not _originals_in_place()
    with safe_peft.patched(strict=False):  # nested: the inner options apply, the switch stays on after it
        assert safe_peft.is_patched()
    assert safe_peft.is_patched() and not _originals_in_place()
    with pytest.raises(AdapterLoadError):
        thirdparty.load_for_inference(build("causal"), files["broken"])
    safe_peft.unpatch()
    assert _originals_in_place() and not safe_peft.is_patched()
    assert PeftModel.load_adapter is ORIGINALS[(PeftModel, "load_adapter")]
    safe_peft.unpatch()  # a second unpatch is a no-op
    assert _originals_in_place()


def test_options_apply_to_every_routed_call(files: dict[str, str]) -> None:
    """patch(remap='auto'): a checkpoint saved from a compiled model loads exactly, as remap='auto' would."""
    with safe_peft.patched(), pytest.raises(AdapterLoadError) as caught:
        thirdparty.load_for_inference(build("causal"), files["compiled"])
    assert caught.value.report.primary.code == "strip_orig_mod"
    with safe_peft.patched(remap="auto"):
        model = thirdparty.load_for_inference(build("causal"), files["compiled"])
    assert torch.equal(outputs(model), outputs(PeftModel.from_pretrained(build("causal"), files["good"])))


def test_the_switch_of_one_thread_does_not_reach_another(files: dict[str, str]) -> None:
    """While one thread is inside patched(), another thread's plain call stays plain."""
    inside, done = threading.Event(), threading.Event()
    seen: dict[str, Any] = {}

    def guarded() -> None:
        with safe_peft.patched():
            inside.set()
            try:
                thirdparty.load_for_inference(build("causal"), files["broken"])
            except AdapterLoadError as exc:
                seen["guarded"] = exc.report.primary.code
            done.wait(60)

    thread = threading.Thread(target=guarded)
    thread.start()
    assert inside.wait(60)
    with pytest.warns(UserWarning, match=MISSING):
        seen["plain"] = thirdparty.load_for_inference(build("causal"), files["broken"])
    assert not safe_peft.is_patched()
    done.set()
    thread.join(60)
    assert seen["guarded"] == "targets_without_weights" and isinstance(seen["plain"], PeftModel)
    assert _originals_in_place()


def test_threads_entering_and_leaving_together(files: dict[str, str]) -> None:
    errors: list[BaseException] = []
    codes: list[str] = []
    barrier = threading.Barrier(4)

    def worker() -> None:
        try:
            barrier.wait(60)
            for _ in range(3):
                with safe_peft.patched():
                    try:
                        thirdparty.load_for_inference(build("causal"), files["broken"])
                    except AdapterLoadError as exc:
                        codes.append(exc.report.primary.code)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and codes == ["targets_without_weights"] * 12
    assert _originals_in_place()


# -- the real transformers Trainer -------------------------------------------------------------------------------


class _Data(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.tensor([(i * 7 + j) % 100 for j in range(8)])
        return {"input_ids": ids, "labels": ids}


def _peft_model() -> PeftModel:
    torch.manual_seed(0)
    return get_peft_model(build("causal"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))


def _trainer(model: Any, out: str, steps: int, **args: Any) -> Any:
    from transformers import Trainer, TrainingArguments

    arguments = TrainingArguments(
        out,
        max_steps=steps,
        save_strategy="steps",
        save_steps=2,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        logging_strategy="no",
        **args,
    )
    return Trainer(model=model, args=arguments, train_dataset=_Data())


def _lora(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A PEFT training run of 2 steps, checkpointed at step 2."""
    out = str(tmp_path_factory.mktemp("run"))
    _trainer(_peft_model(), out, 2).train()
    return out


@RESUMES
def test_the_trainer_resumes_through_safe_peft_as_it_resumes_plainly(
    run: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safe_peft._carried as carried

    checkpoint = os.path.join(run, "checkpoint-2")
    plain = _peft_model()
    _trainer(plain, str(tmp_path / "plain"), 4).train(resume_from_checkpoint=checkpoint)
    routes: list[str] = []
    real = carried.run_load
    monkeypatch.setattr(carried, "run_load", lambda *a, **k: routes.append(k["route"]) or real(*a, **k))
    ours = _peft_model()
    with safe_peft.patched():
        _trainer(ours, str(tmp_path / "ours"), 4).train(resume_from_checkpoint=checkpoint)
    assert routes == ["reload"]  # the Trainer's model.load_adapter(checkpoint, "default", is_trainable=True)
    a, b = _lora(ours), _lora(plain)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@RESUMES
def test_the_trainer_refuses_to_resume_from_a_checkpoint_whose_adapter_did_not_load(run: str, tmp_path: Any) -> None:
    """Plain: the Trainer resumes from v_proj's initial weights, without a word. Switched: a strict error, and the
    adapter is as it was before the resume."""
    checkpoint = str(tmp_path / "checkpoint-2")
    shutil.copytree(os.path.join(run, "checkpoint-2"), checkpoint)
    derive(os.path.join(run, "checkpoint-2"), str(tmp_path / "cut"), keys=lambda k: None if "v_proj" in k else k)
    weights = "adapter_model.safetensors"
    shutil.copyfile(str(tmp_path / "cut" / weights), os.path.join(checkpoint, weights))
    plain = _peft_model()
    start = _lora(plain)
    _trainer(plain, str(tmp_path / "plain"), 3).train(resume_from_checkpoint=checkpoint)  # no error
    ours = _peft_model()
    trainer = _trainer(ours, str(tmp_path / "ours"), 3)
    with safe_peft.patched(), pytest.raises(AdapterLoadError) as caught:
        trainer.train(resume_from_checkpoint=checkpoint)
    assert caught.value.report.primary.code == "targets_without_weights"
    after = _lora(ours)
    assert all(torch.equal(after[k], v) for k, v in start.items())
    assert not os.path.isdir(str(tmp_path / "ours" / "checkpoint-3"))  # it did not train on


@RESUMES
@COMPILES
def test_a_run_under_the_trainer_s_torch_compile_resumes_through_safe_peft(tmp_path: Any) -> None:
    """torch_compile=True: the Trainer compiles for the steps and saves the uncompiled model's keys (checked), so
    the resume loads them exactly, switched or not."""
    options = {"torch_compile": True, "torch_compile_backend": "eager"}
    _trainer(_peft_model(), str(tmp_path / "run"), 2, **options).train()
    checkpoint = str(tmp_path / "run" / "checkpoint-2")
    with safe_open(os.path.join(checkpoint, "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not any("_orig_mod" in k for k in keys)
    plain = _peft_model()
    _trainer(plain, str(tmp_path / "plain"), 3, **options).train(resume_from_checkpoint=checkpoint)
    ours = _peft_model()
    with safe_peft.patched():
        _trainer(ours, str(tmp_path / "ours"), 3, **options).train(resume_from_checkpoint=checkpoint)
    a, b = _lora(ours), _lora(plain)
    assert all(torch.allclose(a[k], b[k]) for k in a)


@COMPILES
def test_a_checkpoint_of_a_compiled_peft_model_is_refused_and_remap_auto_loads_it(tmp_path: Any) -> None:
    """A PeftModel compiled by the user and trained by the Trainer: transformers 4.x saves its keys with
    `_orig_mod.` (plain peft then loads nothing, with one warning); transformers 5.24 saves an adapter file without
    a single tensor. Either way a third-party PeftModel.from_pretrained under the switch is a strict error; the
    `_orig_mod.` save loads exactly under patched(remap='auto')."""
    trained = _peft_model()
    compiled = torch.compile(trained, backend="eager")
    _trainer(compiled, str(tmp_path / "run"), 2, remove_unused_columns=False).train()
    checkpoint = str(tmp_path / "run" / "checkpoint-2")
    with safe_open(os.path.join(checkpoint, "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert not keys or all(k.startswith("_orig_mod.") for k in keys)
    with pytest.warns(UserWarning, match=MISSING):
        thirdparty.load_for_inference(build("causal"), checkpoint)
    with safe_peft.patched(), pytest.raises(AdapterLoadError) as caught:
        thirdparty.load_for_inference(build("causal"), checkpoint)
    report = caught.value.report
    if keys:
        assert report.primary.code == "strip_orig_mod"
        with safe_peft.patched(remap="auto"):
            model = thirdparty.load_for_inference(build("causal"), checkpoint)
        trained.eval()
        assert torch.allclose(outputs(model), outputs(trained), atol=1e-6)
    else:  # nothing was saved: every expected key is missing
        assert not report.unexpected and len(report.missing) == 8
