"""The switch for code you do not own: safe_peft.patch() / unpatch() / patched().

Proven on a third-party-style helper module (tests/support/thirdparty.py: plain peft and transformers calls) and on
the real transformers Trainer resuming a PEFT run from its checkpoints (tiny model, a few CPU steps), including a broken
checkpoint and runs under torch.compile. Off, everything is plain and the original functions are back (`is`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers.integrations.peft import PeftAdapterMixin

import safe_peft
from safe_peft import AdapterLoadError
from safe_peft._versions import torch_at_least
from tests.support import thirdparty
from tests.support.helpers import assert_same_state, build, derive, model_state, outputs, primary, train_adapter

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
        assert primary(caught.value.report).code == "targets_without_weights"
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
    assert primary(caught.value.report).code == "strip_orig_mod"
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
                seen["guarded"] = primary(exc.report).code
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
                        codes.append(primary(exc.report).code)
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
    import safe_peft._routes.peft_model as carried

    checkpoint = os.path.join(run, "checkpoint-2")
    plain = _peft_model()
    _trainer(plain, str(tmp_path / "plain"), 4).train(resume_from_checkpoint=checkpoint)
    routes: list[str] = []
    real = carried.run_load

    def recorded(*a: Any, **k: Any) -> Any:
        routes.append(k["route"])
        return real(*a, **k)

    monkeypatch.setattr(carried, "run_load", recorded)
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
    assert primary(caught.value.report).code == "targets_without_weights"
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
        assert primary(report).code == "strip_orig_mod"
        with safe_peft.patched(remap="auto"):
            model = thirdparty.load_for_inference(build("causal"), checkpoint)
        trained.eval()
        assert torch.allclose(outputs(model), outputs(trained), atol=1e-6)
    else:  # nothing was saved: every expected key is missing
        assert not report.unexpected and len(report.missing) == 8


# -- a drop-in: what callers of plain peft rely on, beyond the loaded weights --------------------------------------


def test_a_config_object_passed_to_from_pretrained_is_the_one_installed(files: dict[str, str]) -> None:
    """peft installs the caller's ``config=`` object itself and sets ``inference_mode`` on it; so does the switch
    (and safe_load_adapter), only once the load committed."""
    config = LoraConfig.from_pretrained(files["good"])
    config.inference_mode = False
    plain = PeftModel.from_pretrained(build("causal"), files["good"], config=config)
    assert plain.peft_config["default"] is config and config.inference_mode
    for trainable in (False, True):
        config = LoraConfig.from_pretrained(files["good"])
        with safe_peft.patched():
            model = thirdparty.load_for_inference(build("causal"), files["good"], config=config, is_trainable=trainable)
        assert model.peft_config["default"] is config and config.inference_mode is not trainable
        assert torch.equal(outputs(model), outputs(plain))
    config = LoraConfig.from_pretrained(files["good"])
    before = dict(vars(config))
    with safe_peft.patched(), pytest.raises(AdapterLoadError):
        thirdparty.load_for_inference(build("causal"), files["broken"], config=config)
    assert vars(config) == before  # a refused load leaves the caller's object as it was


def _adalora(directory: str) -> str:
    from peft import AdaLoraConfig

    config = AdaLoraConfig(total_step=10, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(build("causal"), config).save_pretrained(directory)
    return directory


def test_where_plain_peft_raises_a_value_error_the_switch_raises_one_too(tmp_path: Any) -> None:
    """peft refuses a second trainable AdaLoRA adapter with a ValueError: under the switch the AdapterLoadError is
    also a ValueError (callers' ``except ValueError`` keep working), still a RuntimeError, and survives pickle."""
    import pickle

    path = _adalora(str(tmp_path / "adalora"))
    plain = PeftModel.from_pretrained(build("causal"), path, is_trainable=True)
    with pytest.raises(ValueError, match="only 1 trainable adapter"):
        plain.load_adapter(path, "b", is_trainable=True)
    with safe_peft.patched():
        model = PeftModel.from_pretrained(build("causal"), path, is_trainable=True)
        try:
            model.load_adapter(path, "b", is_trainable=True)
        except ValueError as err:  # a caller's clause, written for plain peft
            caught: Any = err
    assert isinstance(caught, AdapterLoadError) and isinstance(caught, RuntimeError)
    assert "only 1 trainable adapter" in str(caught)  # peft's own refusal, in the report
    again = pickle.loads(pickle.dumps(caught))
    assert type(again) is type(caught) and isinstance(again, ValueError) and again.report == caught.report
    assert list(model.peft_config) == ["default"]
    # predicted before anything is injected, as peft's own check sees it (inference_mode = not is_trainable)
    assert primary(caught.report).code == "adapter_combination_refused"
    assert primary(safe_peft.diagnose(model, path, "b", is_trainable=True)).code == "adapter_combination_refused"
    assert safe_peft.diagnose(model, path, "b").ok  # not trainable: peft combines them


def test_a_refusal_plain_peft_does_not_make_is_no_other_builtin_error(files: dict[str, str]) -> None:
    with safe_peft.patched(), pytest.raises(AdapterLoadError) as caught:
        thirdparty.load_for_inference(build("causal"), files["broken"])  # plain peft: a warning, no exception
    assert type(caught.value) is AdapterLoadError and not isinstance(caught.value, ValueError)


def test_ignore_mismatched_sizes_is_honoured_as_peft_honours_it(tmp_path: Any) -> None:
    """A LoRA on the embedding, trained on a vocabulary of 100, into a base of 128 rows: refused without the
    argument (resized_embeddings), loaded as plain peft loads it with ``ignore_mismatched_sizes=True`` (the
    mismatched tensor keeps its initial value, the same warnings), and the report names the skipped key."""
    import warnings

    path = str(tmp_path / "embedding")
    train_adapter(build("causal"), path, target_modules=["embed_tokens", "q_proj"])

    def resized() -> torch.nn.Module:
        model = build("causal")
        model.resize_token_embeddings(128)
        return model

    with warnings.catch_warnings(record=True) as told:
        warnings.simplefilter("always")
        plain = PeftModel.from_pretrained(resized(), path, ignore_mismatched_sizes=True)
    with safe_peft.patched(), pytest.raises(AdapterLoadError) as caught:
        thirdparty.load_for_inference(resized(), path)
    assert primary(caught.value.report).code == "resized_embeddings"
    for strict in (True, False):
        with warnings.catch_warnings(record=True) as ours, safe_peft.patched(strict=strict):
            warnings.simplefilter("always")
            model = thirdparty.load_for_inference(resized(), path, ignore_mismatched_sizes=True)
        assert [str(w.message) for w in ours] == [str(w.message) for w in told]
        assert torch.equal(outputs(model), outputs(plain))
    with warnings.catch_warnings(record=True):  # peft's, as in the plain load
        warnings.simplefilter("always")
        _, report = safe_peft.safe_load_adapter(resized(), path, ignore_mismatched_sizes=True, output_loading_info=True)
    assert report.ok and [w.code for w in report.warnings] == ["mismatched_sizes_ignored"]
    embedding = "base_model.model.model.embed_tokens"
    assert report.warnings[0].details["keys"] == [f"{embedding}.base_layer.weight", f"{embedding}.lora_embedding_A"]


class _Custom(torch.nn.Module):
    """Not a transformers model: peft finds no embedding layers in it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin0 = torch.nn.Linear(8, 8)
        self.lin1 = torch.nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


def test_a_non_lora_method_on_a_custom_model_warns_as_plain_peft_does(tmp_path: Any) -> None:
    """No notice of safe_peft's own (peft's "Could not identify embedding layer(s)") on a load plain peft makes
    without a word. Recorded, not raised: an error inside safe_peft's own look at the model would be swallowed."""
    import warnings

    from peft import LoKrConfig

    get_peft_model(_Custom(), LoKrConfig(target_modules=["lin0"], init_weights=False)).save_pretrained(tmp_path)
    x = torch.randn(3, 8)
    told: dict[str, list[str]] = {}
    for mode in ("plain", "switch"):
        switch = safe_peft.patched() if mode == "switch" else contextlib.nullcontext()
        with warnings.catch_warnings(record=True) as caught, switch:
            warnings.simplefilter("always")
            model = thirdparty.load_for_inference(_Custom(), str(tmp_path))
        told[mode] = [str(w.message) for w in caught]
        assert torch.equal(model(x), PeftModel.from_pretrained(_Custom(), str(tmp_path))(x))
    assert told["switch"] == told["plain"] == []


# -- the switch composes with other libraries' wrappers ---------------------------------------------------------


def _telemetry(function: Any, calls: list[str], wraps: bool) -> Any:
    """A tracing library's generic wrapper, with or without functools.wraps."""

    def traced(*args: Any, **kwargs: Any) -> Any:
        calls.append(function.__name__)
        return function(*args, **kwargs)

    return functools.wraps(function)(traced) if wraps else traced


@pytest.mark.parametrize("wraps", [True, False])
@pytest.mark.parametrize("when", ["before", "after"])
def test_a_generic_wrapper_installed_before_or_after_the_switch_keeps_working(
    files: dict[str, str], wraps: bool, when: str
) -> None:
    """A telemetry wrapper ``(*args, **kwargs)`` on PeftModel.load_adapter, installed before or after patch():
    every call still binds peft's arguments (adapter_name positional or by keyword), goes through safe_peft, and
    unpatch() puts back exactly what was there."""
    calls: list[str] = []
    original = PeftModel.__dict__["load_adapter"]
    try:
        if when == "before":
            PeftModel.load_adapter = _telemetry(original, calls, wraps)  # type: ignore[method-assign]
        wrapped = PeftModel.__dict__["load_adapter"]
        safe_peft.patch()
        if when == "after":
            PeftModel.load_adapter = _telemetry(PeftModel.__dict__["load_adapter"], calls, wraps)  # type: ignore[method-assign]
        model = PeftModel.from_pretrained(build("causal"), files["good"])
        model.load_adapter(files["other"], "b")
        model.load_adapter(files["other"], adapter_name="c")
        with pytest.raises(AdapterLoadError) as caught:
            model.load_adapter(files["broken"], "d")
        assert primary(caught.value.report).code == "targets_without_weights"
        assert list(model.peft_config) == ["default", "b", "c"]
        assert len(calls) == (3 if when == "after" else 0)  # before: safe_peft loads these itself, not via peft
        safe_peft.unpatch()
        if when == "before":
            assert PeftModel.__dict__["load_adapter"] is wrapped  # by identity: the other library's wrapper
        calls.clear()
        model.load_adapter(files["broken"], "e")  # off: plain again (loads what matches, silently), via the wrapper
        assert "e" in model.peft_config and calls == ["load_adapter"]
    finally:
        PeftModel.load_adapter = original  # type: ignore[method-assign]


# -- peft's own layouts load through the switch as they load plainly ---------------------------------------------


class _MLP(torch.nn.Module):
    """peft's test model: lin0 (10 -> 20), lin1 (20 -> 40), lin2 (40 -> 30); fixed weights."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin0, self.lin1, self.lin2 = torch.nn.Linear(10, 20), torch.nn.Linear(20, 40), torch.nn.Linear(40, 30)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


def _variant(name: str) -> Any:
    """A LoRA variant that saves tensors beyond lora_A / lora_B (or other shapes), as peft's tests configure it."""
    from peft.tuners.lora import config as lora

    needed = {"kasa": "Kasa", "velora": "Velora", "monteclora": "Monteclora", "bdlora": "BdLora"}[name] + "Config"
    if not hasattr(lora, needed):
        pytest.skip(f"the installed peft has no {needed}")
    options: dict[str, Any] = {
        "kasa": {"target_modules": ["lin0"], "kasa_config": lora.KasaConfig(), "r": 4},
        "velora": {"target_modules": ["lin0"], "velora_config": lora.VeloraConfig(num_groups=2, init_type="random")},
        "monteclora": {"target_modules": ["lin0"], "monteclora_config": lora.MontecloraConfig(num_samples=2)},
        "bdlora": {
            "target_modules": ["lin0", "lin1"],
            "use_bdlora": lora.BdLoraConfig(target_modules_bd_a=["lin0"], target_modules_bd_b=["lin1"], nblocks=2),
        },
    }[name]
    return LoraConfig(init_lora_weights=False, **options)


def _shira_custom_mask() -> Any:
    """SHiRA with a custom mask function (never saved: the file's shira_indices carry the mask)."""
    from peft import ShiraConfig

    def mask_fn(base_layer: torch.nn.Module, r: int, **kwargs: Any) -> torch.Tensor:
        out_f, in_f = base_layer.get_parameter("weight").shape
        generator = torch.Generator().manual_seed(120)
        chosen = torch.randperm(out_f * in_f, generator=generator)[: r * (out_f + in_f)]
        mask = torch.zeros(out_f * in_f)
        mask[chosen] = 1.0
        return mask.view(out_f, in_f)

    # peft annotates mask_type as "random" only and mask_fn as its random_mask; a custom mask_fn is its documented use
    config = ShiraConfig(r=2, mask_type="custom", target_modules=["lin1", "lin2"], init_weights=False)  # type: ignore[arg-type]
    config.mask_fn = mask_fn  # type: ignore[assignment]
    return config


@pytest.mark.filterwarnings("ignore:Argument self.mask_type='custom' is not recognized")  # peft's, on every load
@pytest.mark.filterwarnings("ignore:Sparse invariant checks are implicitly disabled")  # torch's, in SHiRA's forward
@pytest.mark.parametrize("method", ["kasa", "velora", "monteclora", "bdlora", "shira_custom_mask"])
def test_peft_s_own_layouts_load_exactly_as_plain_peft_loads_them(tmp_path: Any, method: str) -> None:
    """LoRA variants whose files hold more than lora_A / lora_B (KaSA's singular values, MonteCLoRA's sampler,
    BD-LoRA's blocks of other shapes) and SHiRA's saved indices of a custom mask: plain peft reloads them exactly,
    and so does the switch (the model view knows their tensors), with the same outputs."""
    config = _shira_custom_mask() if method == "shira_custom_mask" else _variant(method)
    trained = get_peft_model(_MLP(), config).eval()
    x = torch.randn(4, 10)
    with torch.no_grad():
        want = trained(x)
    trained.save_pretrained(tmp_path)
    plain = PeftModel.from_pretrained(_MLP(), str(tmp_path)).eval()
    with safe_peft.patched():
        model = thirdparty.load_for_inference(_MLP(), str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.allclose(model(x), want) and torch.equal(model(x), plain(x))
    assert set(model.state_dict()) == set(plain.state_dict())


def test_a_refused_kasa_load_leaves_the_base_weights_it_truncates(tmp_path: Any) -> None:
    """KaSA truncates the targeted base weight when it is injected: a load refused after that point (here: the
    checkpoint's lora_B holds a NaN, found after peft loaded it) restores the base weight's values too."""
    trained = get_peft_model(_MLP(), _variant("kasa"))
    trained.save_pretrained(tmp_path / "kasa")
    poisoned = lambda k, v: v * torch.nan if "lora_B" in k else v  # noqa: E731
    nan = derive(str(tmp_path / "kasa"), str(tmp_path / "nan"), tensors=poisoned)
    base = _MLP()
    before = base.lin0.weight.detach().clone()
    with safe_peft.patched(), pytest.raises(AdapterLoadError):
        thirdparty.load_for_inference(base, nan)
    assert torch.equal(base.lin0.weight, before)
