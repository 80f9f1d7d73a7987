"""peft's loading steps done by safe_peft (safe_peft._load.assign) against plain peft's.

Each row is a real adapter trained and saved by real peft on a tiny model. Loaded by safe_peft, on either route, it
must give the very model plain peft gives: the same modules, parameters (values, dtypes, devices, requires_grad,
parameter classes), buffers, configs, active adapter and train / eval flags; through the switch, the same returned
result. The row also says whether the checkpoint is written by safe_peft (``assigned``) or left to peft's
``set_peft_model_state_dict`` (a saved head is a wrapper whose keys peft's loader renames).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from safe_peft import safe_load_adapter
from tests.support.helpers import assert_same_state, build, model_state, outputs, train_adapter


@dataclass
class Row:
    name: str
    model: str
    lora: dict[str, Any]
    assigned: bool = True
    dtype: torch.dtype | None = None  # the base model's dtype when loading (the adapter is trained in float32)
    kwargs: dict[str, Any] = field(default_factory=dict)  # what both loads are given
    config: dict[str, Any] = field(default_factory=dict)  # the tiny model's config overrides
    initialises: bool = False  # the meta route is not taken even where it would pay


ROWS = [
    Row("q_v", "causal", {}),
    Row("all_linear", "causal", {"r": 4, "target_modules": "all-linear"}),
    Row("dora", "causal", {"use_dora": True}),
    Row("lora_bias", "causal", {"lora_bias": True}, config={"attention_bias": True}),
    # peft saves the targeted embedding's base weight too: its loader assigns that into the base model
    Row("embedding", "causal", {"target_modules": ["embed_tokens", "q_proj"]}, assigned=False),
    Row("conv1d", "gpt2", {"target_modules": ["c_attn"], "fan_in_fan_out": True}),
    Row("patterns", "causal", {"rank_pattern": {"v_proj": 4}, "alpha_pattern": {"q_proj": 32}}),
    Row("rslora_dropout", "causal", {"use_rslora": True, "lora_dropout": 0.1}),
    Row("trainable", "causal", {}, kwargs={"is_trainable": True}),
    Row("dora_trainable", "causal", {"use_dora": True}, kwargs={"is_trainable": True}),
    Row("bf16_base", "causal", {}, dtype=torch.bfloat16),
    Row("bf16_base_no_autocast", "causal", {}, dtype=torch.bfloat16, kwargs={"autocast_adapter_dtype": False}),
    Row("saved_head", "seqcls", {"task_type": "SEQ_CLS"}, assigned=False),
    Row("bf16_dora_trainable", "causal", {"use_dora": True}, dtype=torch.bfloat16, kwargs={"is_trainable": True}),
    Row("fp16_all_linear", "causal", {"r": 4, "target_modules": "all-linear"}, dtype=torch.float16),
    # more than LoRA's own tensors on a half-precision base: the meta route would assign those in the file's dtype
    Row("bf16_saved_head", "seqcls", {"task_type": "SEQ_CLS"}, assigned=False, dtype=torch.bfloat16, initialises=True),
    Row(
        "bf16_embedding",
        "causal",
        {"target_modules": ["embed_tokens", "q_proj"]},
        assigned=False,
        dtype=torch.bfloat16,
        initialises=True,
    ),
]


@pytest.fixture
def meta_whenever_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    import safe_peft._load.route_choice

    monkeypatch.setattr(safe_peft._load.route_choice, "META_ROUTE_MIN_ELEMENTS_PER_MODULE", 0)


def _base(row: Row) -> torch.nn.Module:
    model = build(row.model, **row.config)
    return model.to(row.dtype) if row.dtype is not None else model


@pytest.mark.parametrize("route", ["meta", "initialising"])
@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.name)
def test_a_first_adapter_is_peft_s_own(row: Row, route: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both routes of a first adapter, where safe_peft writes the checkpoint itself: the model equals plain
    ``PeftModel.from_pretrained``'s with its defaults, whichever route safe_peft took. On a half-precision base with
    autocast, peft's meta route rounds the adapter to the base's dtype before upcasting it: safe_peft's copies the
    file's values in last, and a checkpoint holding more than LoRA's own tensors initialises instead."""
    from peft import PeftModel

    import safe_peft._load.driver
    import safe_peft._load.route_choice

    if route == "meta":  # every exact adapter, however small (by default these tiny ones initialise)
        monkeypatch.setattr(safe_peft._load.route_choice, "META_ROUTE_MIN_ELEMENTS_PER_MODULE", 0)
    directory = str(tmp_path / row.name)
    train_adapter(build(row.model, **row.config), directory, **row.lora)
    plain = PeftModel.from_pretrained(_base(row), directory, **row.kwargs)
    taken = "initialising" if row.initialises else route

    calls = _peft_writes(monkeypatch)
    verified = _verified_state(monkeypatch, safe_peft._load.driver)
    ours, report = safe_load_adapter(_base(row), directory, output_loading_info=True, **row.kwargs)

    assert report.ok and report.route == taken
    assert (not calls) is row.assigned
    _assert_verified_the_model_s_tensors(verified, ours, "default")
    assert_same_state(model_state(plain), ours)
    for (name, mine), (_, theirs) in zip(ours.named_parameters(), plain.named_parameters(), strict=True):
        assert type(mine) is type(theirs), name
    assert torch.equal(outputs(ours), outputs(plain))


def _peft_writes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record each call of peft's ``set_peft_model_state_dict`` (the checkpoint left to peft to write)."""
    import peft.utils.save_and_load

    calls: list[int] = []
    original = peft.utils.save_and_load.set_peft_model_state_dict

    def recorded(*a: Any, **k: Any) -> Any:
        calls.append(1)
        return original(*a, **k)

    monkeypatch.setattr(peft.utils.save_and_load, "set_peft_model_state_dict", recorded)
    return calls


def _verified_state(monkeypatch: pytest.MonkeyPatch, owner: Any) -> list[Any]:
    """Record the tensors the post-load verification is handed (None: it looks for them itself)."""
    seen: list[Any] = []
    original = owner.verify

    def verify(model: Any, plan: Any, adapter_name: str, state: Any = None) -> Any:
        seen.append(state)
        return original(model, plan, adapter_name, state=state)

    monkeypatch.setattr(owner, "verify", verify)
    return seen


def _assert_verified_the_model_s_tensors(seen: list[Any], model: Any, adapter_name: str) -> None:
    """What the verification checked is the adapter's tensors as the model now holds them (the very objects)."""
    from safe_peft._load.adapter_tensors import adapter_tensors

    assert len(seen) == 1
    if seen[0] is not None:
        held = adapter_tensors(model, adapter_name, True)
        assert seen[0].keys() == held.keys()
        assert all(seen[0][k] is held[k] for k in held)


@pytest.mark.usefixtures("meta_whenever_exact")
def test_a_broken_assignment_leaves_the_base_model_as_it_was(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The assignment fails half-way (here: the move to the base layer's device raises on the third layer): the base
    model is restored exactly, and the error names the load."""
    from peft.tuners.lora import LoraLayer

    import safe_peft
    import safe_peft._load.assign
    from tests.support.helpers import assert_unchanged, fingerprint

    directory = str(tmp_path / "adapter")
    train_adapter(build("causal"), directory, target_modules="all-linear")
    base = build("causal")
    before = fingerprint(base)
    seen = []

    def move(self: Any, adapter_name: str, device: Any = None) -> None:
        seen.append(self)
        if len(seen) == 3:
            raise RuntimeError("device lost")

    monkeypatch.setattr(safe_peft._load.assign, "_in_place", lambda layer, held: False)
    monkeypatch.setattr(LoraLayer, "_move_adapter_to_device_of_base_layer", move)
    with pytest.raises(safe_peft.AdapterLoadError, match="device lost"):
        safe_load_adapter(base, directory)
    assert len(seen) == 3
    assert_unchanged(before, base)


# A further adapter: (name, adapter's LoRA settings, load kwargs, written by safe_peft). The model already carries
# an adapter "default" on q_proj / v_proj.
FURTHER = [
    ("q_v", {}, {}, True),
    ("all_linear", {"r": 4, "target_modules": "all-linear"}, {}, True),
    ("new_targets", {"target_modules": ["k_proj", "o_proj"]}, {}, True),
    ("dora", {"use_dora": True}, {}, True),
    ("trainable", {}, {"is_trainable": True}, True),
    ("low_cpu_mem_usage", {}, {"low_cpu_mem_usage": True}, True),
    ("low_cpu_trainable", {"r": 4}, {"low_cpu_mem_usage": True, "is_trainable": True}, True),
    ("no_autocast", {}, {"autocast_adapter_dtype": False}, True),
    ("torch_device", {}, {"torch_device": "cpu"}, True),
    ("saved_head", {"modules_to_save": ["lm_head"]}, {}, False),
]


# every row under the name "b" (peft's result then lists the first adapter's keys: they hold a "b"), two under a
# name no key holds
NAMED = [(*row, "b") for row in FURTHER] + [(*FURTHER[0], "other"), (*FURTHER[5], "other")]


@pytest.mark.parametrize(
    ("name", "lora", "kwargs", "written", "adapter_name"), NAMED, ids=[f"{row[0]}-{row[4]}" for row in NAMED]
)
def test_a_further_adapter_is_peft_s_own(
    name: str,
    lora: dict[str, Any],
    kwargs: dict[str, Any],
    written: bool,
    adapter_name: str,
    tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``safe_load_adapter(peft_model, path, name)`` where peft's own steps are done by safe_peft: the model equals
    plain ``peft_model.load_adapter(path, name)``'s, and, through the switch, so does the returned result (its
    missing keys name the first adapter's keys holding the name "b", as peft's do)."""
    import copy

    from peft import PeftModel

    import safe_peft
    import safe_peft._load.driver

    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    train_adapter(build("causal"), first)
    train_adapter(build("causal"), second, seed=2, **lora)
    carrying = PeftModel.from_pretrained(build("causal"), first)
    plain = copy.deepcopy(carrying)
    expected = plain.load_adapter(second, adapter_name, **kwargs)

    calls = _peft_writes(monkeypatch)
    ours = copy.deepcopy(carrying)
    verified = _verified_state(monkeypatch, safe_peft._load.driver)
    with safe_peft.patched():
        result = ours.load_adapter(second, adapter_name, **kwargs)
    assert (not calls) is written
    _assert_verified_the_model_s_tensors(verified, ours, adapter_name)
    assert (list(result.missing_keys), list(result.unexpected_keys)) == (
        list(expected.missing_keys),
        list(expected.unexpected_keys),
    )
    assert_same_state(model_state(plain), ours)
    for (key, mine), (_, theirs) in zip(ours.named_parameters(), plain.named_parameters(), strict=True):
        assert type(mine) is type(theirs), key
    plain.set_adapter(adapter_name)
    ours.set_adapter(adapter_name)
    assert torch.equal(outputs(ours), outputs(plain))


@pytest.mark.parametrize(
    ("version", "read", "passes_autocast", "sets_requires_grad"),
    [
        ("0.17.1", True, False, False),
        ("0.18.1", True, False, False),
        ("0.19.0", True, True, False),
        ("0.20.0", True, True, False),
        ("0.21.0", True, True, True),
        ("0.21.2", True, True, True),
        ("0.22.0", False, True, True),  # not read: peft's own load_adapter runs
        ("0.22.0.dev0", False, True, True),  # peft's main branch after 0.21
        ("0.21.0.dev0", False, True, False),
        ("0.17.0", False, False, False),
        ("not-a-version", False, True, True),
    ],
)
def test_load_adapter_facts_per_release(
    version: str, read: bool, passes_autocast: bool, sets_requires_grad: bool
) -> None:
    """What each peft release's ``load_adapter`` does for a new name (read in its wheel), as _versions states it."""
    from safe_peft._versions import load_adapter_facts

    facts = load_adapter_facts(version)
    assert (facts.read, facts.passes_autocast, facts.sets_requires_grad) == (read, passes_autocast, sets_requires_grad)


def test_a_peft_release_not_read_keeps_peft_s_own_load_adapter(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A further adapter under a peft release whose load_adapter safe_peft has not read goes through peft's own."""
    import peft
    from peft import PeftModel

    import safe_peft

    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    train_adapter(build("causal"), first)
    train_adapter(build("causal"), second, seed=2)
    carrying = PeftModel.from_pretrained(build("causal"), first)
    calls: list[tuple[Any, ...]] = []
    original = PeftModel.load_adapter

    def recorded(self: PeftModel, *a: Any, **k: Any) -> Any:
        calls.append(a)
        return original(self, *a, **k)

    monkeypatch.setattr(PeftModel, "load_adapter", recorded)
    monkeypatch.setattr(peft, "__version__", "0.22.0")
    safe_peft.safe_load_adapter(carrying, second, "b")
    assert len(calls) == 1 and calls[0][1] == "b"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_further_adapter_on_a_half_precision_base_keeps_the_file_s_values(
    dtype: torch.dtype, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The meta route for a further adapter on a half-precision base (autocast on): the model equals plain
    ``load_adapter``'s with its defaults (the file's float32 values, not rounded to the base's dtype)."""
    import copy

    from peft import PeftModel

    import safe_peft._load.route_choice

    monkeypatch.setattr(safe_peft._load.route_choice, "META_ROUTE_MIN_ELEMENTS_PER_MODULE", 0)
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    train_adapter(build("causal"), first)
    train_adapter(build("causal"), second, seed=2, r=4, target_modules="all-linear")
    carrying = PeftModel.from_pretrained(build("causal").to(dtype), first)
    plain = copy.deepcopy(carrying)
    plain.load_adapter(second, "b")
    ours = copy.deepcopy(carrying)
    _, report = safe_load_adapter(ours, second, "b", output_loading_info=True)
    assert report.route == "meta"
    assert_same_state(model_state(plain), ours)
