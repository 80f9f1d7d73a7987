"""Atomic under any interruption: a load stopped at any point inside peft's load path, by KeyboardInterrupt or by an
exception, leaves the whole model as it was (module tree, every tensor's value and identity, requires_grad, hooks,
config, tying), and a retry then loads exactly. Also the vocabulary repair (transformers swaps ``weight.data`` and
the config), adapters whose saved biases peft writes into the base in place (``bias="all"`` / ``"lora_only"``), and
a Ctrl-C from a timer thread at random moments (``SAFE_PEFT_STRESS=1``: many more rounds)."""

from __future__ import annotations

import _thread
import contextlib
import copy
import dataclasses
import os
import random
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from safe_peft import AdapterLoadError, safe_load_adapter
from tests.support.helpers import build, derive, outputs, train_adapter

pytestmark = pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")  # peft, tied vocab
ROUNDS = 200 if os.environ.get("SAFE_PEFT_STRESS") else 24
_HOOKS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def whole_model(model: torch.nn.Module) -> dict[str, Any]:
    """Everything a failed load must leave as it was, down to object identity."""
    tensors = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        tensors[name] = (id(t), t.data_ptr(), t.dtype, t.device, tuple(t.shape), t.requires_grad, t.detach().clone())
    config = getattr(model, "config", None)
    return {
        "tree": [(n, type(m), sorted(m.__dict__)) for n, m in model.named_modules(remove_duplicate=False)],
        "tensors": tensors,
        "hooks": [[(h, list(getattr(m, h).items())) for h in _HOOKS] for m in model.modules()],
        "training": [m.training for m in model.modules()],
        "config": config.to_dict() if config is not None else None,
        "config_attrs": sorted(vars(config)) if config is not None else None,
        "peft_config": [hasattr(m, "peft_config") for m in model.modules()],
    }


def assert_same_model(before: dict[str, Any], model: torch.nn.Module) -> None:
    after = whole_model(model)
    for part in ("tree", "hooks", "training", "config", "config_attrs", "peft_config"):
        assert after[part] == before[part], part
    assert after["tensors"].keys() == before["tensors"].keys()
    for name, (ident, ptr, dtype, device, shape, grad, value) in before["tensors"].items():
        now = after["tensors"][name]
        assert now[:6] == (ident, ptr, dtype, device, shape, grad), name
        assert torch.equal(now[6], value), name


def _perturb_biases(key: str, value: torch.Tensor) -> torch.Tensor:
    return value + 0.5 if key.endswith(".bias") and "lora_" not in key else value


@pytest.fixture(scope="module")
def kinds(adapters: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """name -> (base builder, adapter directory, load kwargs, reference outputs of a clean load)."""
    root = tmp_path_factory.mktemp("interrupts")
    made: dict[str, Any] = {"plain": (lambda: build("causal"), adapters["causal"][0], {})}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's and transformers' notices while building the adapters
        embedding = str(root / "embedding")  # peft saves the base embedding beside its LoRA: written in place
        train_adapter(build("causal", seed=5), embedding, target_modules=["embed_tokens", "q_proj"])
        made["embedding"] = (lambda: build("causal"), embedding, {})
        for bias in ("all", "lora_only"):  # the saved biases (changed here) are copied into the base in place
            directory = str(root / f"bias_{bias}")
            train_adapter(build("causal", attention_bias=True), directory, bias=bias)
            derive(directory, directory + "_changed", tensors=_perturb_biases)
            made[f"bias_{bias}"] = (lambda: build("causal", attention_bias=True), directory + "_changed", {})
        tied = build("causal", tie_word_embeddings=True)  # vocab repair on a tied model: rows, config and tying
        tied.resize_token_embeddings(120)
        train_adapter(tied, str(root / "vocab"), target_modules=["q_proj", "v_proj", "embed_tokens"])
        made["vocab"] = (lambda: build("causal", tie_word_embeddings=True), str(root / "vocab"), {"repair": ("vocab",)})
        for name, (make, directory, kwargs) in list(made.items()):
            reference = outputs(safe_load_adapter(make(), directory, **kwargs))
            made[name] = (make, directory, kwargs, reference)
    return made


class Boom(RuntimeError):
    pass


@contextlib.contextmanager
def interrupted_at(stage: str, error: type[BaseException], monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make the load stop with ``error`` at ``stage`` (a point inside peft's load path, or safe_peft's own)."""
    import peft.peft_model
    from peft.tuners.lora import LoraModel
    from transformers import PreTrainedModel

    import safe_peft._load.assign
    import safe_peft._load.driver

    def stop(*_: Any, **__: Any) -> Any:
        raise error("interrupted at " + stage)

    def around(owner: Any, name: str, *, before: bool = False, after: bool = False, on_call: int = 1) -> None:
        original = getattr(owner, name)
        calls = [0]

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            if before and calls[0] == on_call:
                stop()
            result = original(*args, **kwargs)
            if after and calls[0] == on_call:
                stop()
            return result

        monkeypatch.setattr(owner, name, wrapper)

    # Each stage on both paths of a load: peft's own load_adapter, and the steps safe_peft does itself for plain
    # LoRA (safe_peft._load.assign: it reads the file through save_and_load and writes the tensors in _write).
    if stage == "before_weight_read":
        around(peft.peft_model, "load_peft_weights", before=True)
        around(peft.utils.save_and_load, "load_peft_weights", before=True)
    elif stage == "after_weight_read":
        around(peft.peft_model, "load_peft_weights", after=True)
        around(peft.utils.save_and_load, "load_peft_weights", after=True)
    elif stage == "mid_injection":  # after some of the targeted layers were replaced
        around(LoraModel, "_create_and_replace", before=True, on_call=3)
    elif stage == "after_injection":
        around(peft.peft_model.PeftModel, "load_adapter", before=True)
        around(safe_peft._load.assign, "load_checkpoint", before=True)
    elif stage == "inside_load_state_dict":  # half of the tensors written, then stopped
        original = torch.nn.Module.load_state_dict

        def half(self: torch.nn.Module, state_dict: Any, *args: Any, **kwargs: Any) -> Any:
            if not isinstance(self, peft.peft_model.PeftModel):
                return original(self, state_dict, *args, **kwargs)
            keys = list(state_dict)
            original(self, {k: state_dict[k] for k in keys[: len(keys) // 2]}, *args, **kwargs)
            stop()

        write = safe_peft._load.assign._write

        def half_written(model: Any, survey: Any, *args: Any) -> Any:
            slots = list(survey.slots.items())
            write(model, dataclasses.replace(survey, slots=dict(slots[: len(slots) // 2])), *args)
            stop()

        monkeypatch.setattr(torch.nn.Module, "load_state_dict", half)
        monkeypatch.setattr(safe_peft._load.assign, "_write", half_written)
    elif stage == "after_load_state_dict":
        around(peft.peft_model, "set_peft_model_state_dict", after=True)
        around(peft.utils.save_and_load, "set_peft_model_state_dict", after=True)
        around(safe_peft._load.assign, "_write", after=True)
    elif stage == "verification":
        around(safe_peft._load.driver, "verify", before=True)
    elif stage == "after_verification":
        around(safe_peft._load.driver, "verify", after=True)
    elif stage == "after_resize":  # the vocabulary repair: transformers has swapped weight.data and the config
        around(PreTrainedModel, "resize_token_embeddings", after=True)
    else:
        raise AssertionError(stage)
    yield


STAGES = [
    "before_weight_read",
    "after_weight_read",
    "mid_injection",
    "after_injection",
    "inside_load_state_dict",
    "after_load_state_dict",
    "verification",
    "after_verification",
]
TABLE = [
    *[(kind, stage) for kind in ("plain", "embedding") for stage in STAGES],
    *[(kind, stage) for kind in ("bias_all", "bias_lora_only") for stage in ("after_load_state_dict", "verification")],
    *[("vocab", stage) for stage in ("after_resize", "mid_injection", "after_load_state_dict", "verification")],
]


@pytest.mark.parametrize("error", [KeyboardInterrupt, Boom], ids=["ctrl_c", "exception"])
@pytest.mark.parametrize("kind, stage", TABLE, ids=[f"{k}-{s}" for k, s in TABLE])
def test_interrupted_load_leaves_the_model_exactly_as_it_was(
    kind: str, stage: str, error: type[BaseException], kinds: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    make, directory, kwargs, reference = kinds[kind]
    base = make()
    before = whole_model(base)
    with monkeypatch.context() as patch, interrupted_at(stage, error, patch):
        if error is KeyboardInterrupt:
            with pytest.raises(KeyboardInterrupt, match=f"interrupted at {stage}"):  # the original, unchanged
                safe_load_adapter(base, directory, **kwargs)
        else:
            with pytest.raises(AdapterLoadError) as info:
                safe_load_adapter(base, directory, **kwargs)
            assert isinstance(info.value.__cause__, Boom)
            assert [d.code for d in info.value.report.causes] == ["load_failed"]
    assert_same_model(before, base)
    retried = safe_load_adapter(base, directory, **kwargs)  # the same base, loaded again: exact
    assert torch.equal(outputs(retried), reference)


def test_a_second_ctrl_c_during_the_undo_still_finishes_it(
    kinds: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from safe_peft._load.snapshot import ModuleSnapshot

    make, directory, _, reference = kinds["embedding"]
    base = make()
    before = whole_model(base)
    original = ModuleSnapshot._restore
    calls = [0]

    def impatient(self: ModuleSnapshot) -> None:
        calls[0] += 1
        if calls[0] == 1:
            original(self)  # half-way through a second time: the loop runs the (idempotent) undo again
            raise KeyboardInterrupt("again")
        original(self)

    monkeypatch.setattr(ModuleSnapshot, "_restore", impatient)
    with (
        monkeypatch.context() as patch,
        interrupted_at("after_load_state_dict", KeyboardInterrupt, patch),
        pytest.raises(KeyboardInterrupt, match="again"),
    ):
        safe_load_adapter(base, directory)
    assert calls[0] == 2
    assert_same_model(before, base)
    monkeypatch.undo()
    assert torch.equal(outputs(safe_load_adapter(base, directory)), reference)


def _injected(model: torch.nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


@pytest.mark.skipif(signal.getsignal(signal.SIGINT) is not signal.default_int_handler, reason="SIGINT is handled")
# A Ctrl-C that lands between open() returning and its `with` taking the file leaves the file object to the GC, which
# closes it with a ResourceWarning: Python's own limit for any `with open(...)`, not a modified model.
@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("kind", ["plain", "embedding", "vocab"])
def test_ctrl_c_at_random_moments(kind: str, kinds: dict[str, Any]) -> None:
    """Ctrl-C (``_thread.interrupt_main``) at a random moment of a load, round after round, into the same base:
    whenever it lands inside the load, the base is as it was and the next load is exact. The moment is the N-th
    Python function call of the load (N drawn from a count of one whole load), not a time: the same rounds land
    inside the load on a fast machine and on a busy one."""
    make, directory, kwargs, reference = kinds[kind]
    pristine = make()
    # a warm load's count (the first one also fills caches): nearly every round then lands inside the load
    calls = min(_calls_in(lambda: safe_load_adapter(copy.deepcopy(pristine), directory, **kwargs)) for _ in range(2))
    rng = random.Random(16)
    base = copy.deepcopy(pristine)
    before = whole_model(base)
    landed = 0
    for _ in range(ROUNDS // 3):
        model = None
        try:
            with _interrupt_at_call(rng.randint(1, calls)):
                model = safe_load_adapter(base, directory, **kwargs)
            time.sleep(0.002)  # an interrupt already on its way lands here, not in the next round
        except KeyboardInterrupt:
            pass
        except AdapterLoadError as exc:  # safetensors' Rust reader turns a Ctrl-C inside it into a ValueError
            assert exc.report.primary is not None and exc.report.primary.code == "load_failed"
        with contextlib.suppress(KeyboardInterrupt):  # one that arrives during the bookkeeping
            time.sleep(0.002)
        if model is None and not _injected(base):  # stopped inside the load: undone
            landed += 1
            assert_same_model(before, base)
        elif model is None:  # stopped after the load had completed (on its way out): loaded, exactly
            assert torch.equal(outputs(base), reference)
            base = copy.deepcopy(pristine)
            before = whole_model(base)
        else:
            assert torch.equal(outputs(model), reference)
            base = copy.deepcopy(pristine)  # loaded: start the next round from a fresh copy
            before = whole_model(base)
    assert landed >= ROUNDS // 6, landed  # most rounds really landed inside a load
    assert torch.equal(outputs(safe_load_adapter(base, directory, **kwargs)), reference)


def _calls_in(run: Any) -> int:
    """How many Python function calls ``run()`` makes (the profiler's ``call`` events)."""
    count = [0]

    def trace(frame: Any, event: str, arg: Any) -> None:
        count[0] += event == "call"

    sys.setprofile(trace)
    try:
        run()
    finally:
        sys.setprofile(None)
    return count[0]


@contextlib.contextmanager
def _interrupt_at_call(n: int) -> Iterator[None]:
    """Ctrl-C delivered at the ``n``-th Python function call inside the block (if it makes that many)."""
    left = [n]

    def trace(frame: Any, event: str, arg: Any) -> None:
        left[0] -= event == "call"
        if left[0] == 0:
            sys.setprofile(None)
            _thread.interrupt_main()

    sys.setprofile(trace)
    try:
        yield
    finally:
        sys.setprofile(None)


def _hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
    return output


def _swap_data(model: torch.nn.Module) -> None:
    weight = model.get_submodule("0.0").weight
    weight.data = torch.zeros(3, 2, dtype=torch.float64)


# What a load can do to a model's objects, each undone by the whole-model record (identity of every container kept)
_CHANGES = {
    "hook into an empty dict": lambda m: m.get_submodule("0.0").register_forward_hook(_hook),
    "child replaced": lambda m: m.get_submodule("0").__setattr__("1", torch.nn.Tanh()),
    "child added": lambda m: m.get_submodule("1").add_module("extra", torch.nn.Linear(2, 2)),
    "parameter added": lambda m: m.get_submodule("0.0").register_parameter("extra", torch.nn.Parameter(torch.ones(1))),
    "buffer added": lambda m: m.get_submodule("1").register_buffer("seen", torch.ones(1)),
    "attribute added": lambda m: setattr(m.get_submodule("1"), "peft_config", {"a": 1}),
    "list grown in place": lambda m: m.get_submodule("1").names.append("b"),
    "set emptied in place": lambda m: m.get_submodule("1").tags.clear(),
    "data swapped": _swap_data,
    "values written": lambda m: m.get_submodule("0.0").weight.data.add_(1.0),
    "requires_grad": lambda m: m.get_submodule("0.0").weight.requires_grad_(False),
    "train / eval": lambda m: m.eval(),
}


@pytest.mark.parametrize("change", list(_CHANGES))
def test_the_whole_model_record_undoes_each_kind_of_change(change: str) -> None:
    from safe_peft._load.snapshot import ModuleSnapshot

    torch.manual_seed(0)
    shared = torch.nn.Linear(2, 3)
    model = torch.nn.Sequential(torch.nn.Sequential(shared, torch.nn.ReLU()), torch.nn.Sequential(shared))
    setattr(model.get_submodule("1"), "names", ["a"])  # plain attributes (a Module types its own as tensors)
    setattr(model.get_submodule("1"), "tags", {"x"})
    kinds = (dict, list, set)
    containers = [(m, k, id(v)) for m in model.modules() for k, v in vars(m).items() if isinstance(v, kinds)]
    before = whole_model(model)
    snapshot = ModuleSnapshot(model)
    snapshot.protect([shared.weight])
    _CHANGES[change](model)
    with pytest.raises(AssertionError):  # the change is there to be undone
        assert_same_model(before, model)
        assert model.get_submodule("1").names == ["a"] and model.get_submodule("1").tags == {"x"}
    snapshot.restore()
    assert_same_model(before, model)
    assert [(m, k, id(vars(m)[k])) for m, k, _ in containers] == containers
    assert model.get_submodule("1").names == ["a"] and model.get_submodule("1").tags == {"x"}
