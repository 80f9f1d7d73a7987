"""Further adapters into a PeftModel: safe_load_adapter(peft_model, path, adapter_name="second", replace=...).

Each success equals plain ``peft_model.load_adapter``; each failure gives the typed report (and diagnose predicts it)
and leaves the PeftModel exactly as it was: its adapters, their weights and configs, the active adapter, flags.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model

from safe_peft import AdapterLoadError, diagnose, safe_load_adapter
from tests.support.helpers import INPUT, assert_same_state, build, derive, model_state, outputs, train_adapter


@pytest.fixture(scope="module")
def extra(tmp_path_factory: pytest.TempPathFactory, adapters: dict[str, Any]) -> dict[str, str]:
    """More adapters for the tiny causal Llama: a second LoRA, broken copies of it, other methods."""
    root = tmp_path_factory.mktemp("further")
    made: dict[str, str] = {}

    def make(name: str, **lora: Any) -> str:
        made[name] = str(root / name)
        train_adapter(build("causal"), made[name], **lora)
        return made[name]

    second = make("second", seed=2, r=4, target_modules=["q_proj", "k_proj", "o_proj"])
    make("alpha", seed=3, lora_alpha=32)
    make("head", seed=4, modules_to_save=["lm_head"])
    make("bias", seed=5, bias="lora_only")
    make("bias2", seed=6, bias="lora_only", r=4)
    made["ia3"] = str(root / "ia3")
    torch.manual_seed(7)
    ia3 = IA3Config(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"])
    get_peft_model(build("causal"), ia3).save_pretrained(made["ia3"])
    made["r2"] = derive(second, str(root / "r2"), config=lambda c: c.update(r=2))
    made["dropped"] = derive(second, str(root / "dropped"), keys=lambda k: None if "o_proj" in k else k)
    compiled = lambda k: k.replace("model.layers", "_orig_mod.model.layers")  # noqa: E731
    made["compiled"] = derive(second, str(root / "compiled"), keys=compiled)
    made["wide"] = adapters["wide"][0]
    nan = lambda k, v: v.fill_(float("nan")) if "layers.1.self_attn.k_proj.lora_A" in k else v  # noqa: E731
    made["nan"] = derive(second, str(root / "nan"), tensors=nan)
    return made


def _peft_model(adapters: dict[str, Any], name: str = "causal") -> PeftModel:
    return PeftModel.from_pretrained(build("causal"), adapters[name][0])


def _adapter_keys(model: PeftModel, name: str) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> shape of adapter ``name``'s tensors, found by the name's own key segment (peft 0.17's
    get_peft_model_state_dict also returns other adapters' tensors whose keys contain the name as a substring)."""
    keys = {}
    for key, tensor in model.state_dict().items():
        parts = key.split(".")
        if name not in parts:
            continue
        at = parts.index(name)
        drop = 2 if at and parts[at - 1] == "modules_to_save" else 1
        keys[".".join(parts[: at + 1 - drop] + parts[at + 1 :])] = tuple(tensor.shape)
    return {k[: -len(".weight")] if k.endswith("lora_magnitude_vector.weight") else k: s for k, s in keys.items()}


def _same_adapter(ours: PeftModel, plain: PeftModel, name: str) -> None:
    a = {k: v for k, v in ours.state_dict().items() if name in k.split(".")}
    b = {k: v for k, v in plain.state_dict().items() if name in k.split(".")}
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert ours.peft_config[name].to_dict() == plain.peft_config[name].to_dict()
    assert [(n, p.requires_grad) for n, p in ours.named_parameters()] == [
        (n, p.requires_grad) for n, p in plain.named_parameters()
    ]


@pytest.mark.parametrize("which", ["second", "alpha", "head", "dora", "all_linear"])
@pytest.mark.parametrize("trainable", [False, True])
def test_a_further_adapter_loads_as_plain_load_adapter(
    which: str, trainable: bool, adapters: dict[str, Any], extra: dict[str, str]
) -> None:
    path = extra[which] if which in extra else adapters[which][0]
    plain = _peft_model(adapters)
    plain.load_adapter(path, "second", is_trainable=trainable)
    ours = _peft_model(adapters)
    assert diagnose(ours, path, "second").ok
    model, report = safe_load_adapter(ours, path, "second", is_trainable=trainable, output_loading_info=True)
    assert model is ours and report.ok and not report.causes
    assert list(ours.peft_config) == ["default", "second"] and ours.active_adapters == ["default"]
    _same_adapter(ours, plain, "second")
    assert torch.equal(outputs(ours), outputs(plain))
    ours.set_adapter("second")
    plain.set_adapter("second")
    assert torch.equal(outputs(ours), outputs(plain))


@pytest.mark.parametrize(
    ("first", "config"),
    [
        ("causal", LoraConfig(r=4, target_modules=["q_proj", "o_proj"])),
        ("causal", LoraConfig(r=4, target_modules="all-linear")),
        ("all_linear", LoraConfig(r=2, target_modules="all-linear")),
        ("all_linear", LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)),
        ("causal", LoraConfig(r=2, target_modules=["v_proj"], modules_to_save=["lm_head"])),
        ("causal", LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"])),
        ("causal", LoraConfig(r=2, target_modules=["q_proj"], bias="lora_only")),
    ],
    ids=["qo", "all-linear", "all-linear-twice", "dora", "head", "embedding", "injection"],
)
def test_expected_keys_are_what_peft_adds(first: str, config: LoraConfig, adapters: dict[str, Any]) -> None:
    """The plan's keys for a model that already carries adapters are exactly those peft's add_adapter creates."""
    from safe_peft._model.view import expected_keys
    from safe_peft._plan.routes import see_through

    model = _peft_model(adapters, first)
    real = copy.deepcopy(model)
    try:
        real.add_adapter("second", copy.deepcopy(config))
    except ValueError:  # peft refuses the combination (peft 0.17: any second adapter with a bias): so does the plan
        from safe_peft._files.source import AdapterSource
        from safe_peft._plan.routes import route_findings

        source = AdapterSource("", None, None, copy.deepcopy(config), {}, {})  # type: ignore[arg-type]
        assert [d.code for d in route_findings(model, source, "second", "add")] == ["adapter_combination_refused"]
        return
    want = _adapter_keys(real, "second")
    view = expected_keys(see_through(model.get_base_model()), copy.deepcopy(config), "second")
    have = {k: e.shape for k, e in view.expected.items() if e.required or k in want}
    assert have == want
    fresh = _peft_model(adapters, first)
    assert [(n, type(m)) for n, m in model.named_modules()] == [(n, type(m)) for n, m in fresh.named_modules()]


def test_see_through_shares_every_tensor_and_changes_nothing(adapters: dict[str, Any]) -> None:
    from safe_peft._plan.routes import see_through

    model = _peft_model(adapters, "all_linear")
    before = model_state(model)
    seen = see_through(model.get_base_model())
    bare = build("causal")
    assert [n for n, _ in seen.named_parameters()] == [n for n, _ in bare.named_parameters()]
    ids = {id(p) for p in model.parameters()}
    assert all(id(p) in ids for p in seen.parameters())
    assert_same_state(before, model)


# case -> (adapter in `extra`, arguments, primary code)
FAILURES: dict[str, tuple[str, dict[str, Any], str]] = {
    "rank_mismatch": ("r2", {}, "rank_mismatch"),
    "missing_keys": ("dropped", {}, "targets_without_weights"),
    "orig_mod_keys": ("compiled", {}, "strip_orig_mod"),
    "other_base": ("wide", {}, "dimension_mismatch"),
    "name_taken": ("second", {"adapter_name": "default"}, "adapter_name_taken"),
    "other_method": ("ia3", {}, "adapter_type_mismatch"),
    "combination": ("bias2", {"first": "bias"}, "adapter_combination_refused"),
    "reload_other_config": ("alpha", {"adapter_name": "default", "replace": "weights"}, "reload_mismatch"),
    "reload_broken": ("r2", {"adapter_name": "default", "replace": "weights"}, "rank_mismatch"),
    "replace_broken": ("dropped", {"adapter_name": "default", "replace": True}, "targets_without_weights"),
    "after_loading": ("nan", {}, "non_finite_values"),
    "replace_after_loading": ("nan", {"adapter_name": "default", "replace": True}, "non_finite_values"),
}
FATAL = ("adapter_name_taken", "adapter_type_mismatch", "reload_mismatch", "rank_mismatch")


@pytest.mark.parametrize("case", list(FAILURES))
def test_every_failure_is_typed_and_leaves_the_peft_model_as_it_was(
    case: str, adapters: dict[str, Any], extra: dict[str, str]
) -> None:
    which, arguments, code = FAILURES[case]
    path, arguments = extra[which], dict(arguments)
    first = arguments.pop("first", None)
    model = PeftModel.from_pretrained(build("causal"), extra[first]) if first else _peft_model(adapters)
    name = arguments.pop("adapter_name", "second")
    model.train()  # flags a load would change (peft's load_adapter ends with eval())
    before = model_state(model)
    predicted = diagnose(model, path, name, replace=arguments.get("replace", False))
    if code != "non_finite_values":  # values only the load reads
        assert not predicted.ok and predicted.causes[0].code == code
    with pytest.raises(AdapterLoadError) as caught:
        safe_load_adapter(model, path, name, **arguments)
    assert caught.value.report.causes[0].code == code
    assert caught.value.report.model_class == type(model).__name__
    assert_same_state(before, model)
    if code in FATAL:  # strict=False cannot get past these either
        with pytest.raises(AdapterLoadError):
            safe_load_adapter(model, path, name, strict=False, **arguments)
        assert_same_state(before, model)


def test_an_interrupt_during_the_load_restores_the_peft_model(
    adapters: dict[str, Any], extra: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C after peft injected the new adapter and its weights were written (by peft, or by safe_peft's own steps
    for plain LoRA): everything is undone, then re-raised."""
    import peft.peft_model
    import peft.utils.save_and_load

    import safe_peft._load.assign

    model = _peft_model(adapters)
    before = model_state(model)
    written = ((peft.peft_model, "set_peft_model_state_dict"), (peft.utils.save_and_load, "set_peft_model_state_dict"))
    for owner, name in (*written, (safe_peft._load.assign, "_write")):
        real = getattr(owner, name)

        def interrupted(*args: Any, _real: Any = real, **kwargs: Any) -> Any:
            _real(*args, **kwargs)
            raise KeyboardInterrupt("written")

        monkeypatch.setattr(owner, name, interrupted)
    with pytest.raises(KeyboardInterrupt, match="written"):
        safe_load_adapter(model, extra["second"], "second")
    assert_same_state(before, model)


def test_replace_swaps_config_and_weights_and_keeps_the_roles(adapters: dict[str, Any], extra: dict[str, str]) -> None:
    """replace=True: the new adapter (its own config) under the old name; active if the old one was; the other
    adapters untouched. Equal to a model that loaded the new adapter in the first place."""
    model = _peft_model(adapters)
    safe_load_adapter(model, extra["alpha"], "second")
    untouched = {k: v.clone() for k, v in model.state_dict().items() if "second" in k.split(".")}
    safe_load_adapter(model, extra["second"], "default", replace=True)
    assert list(model.peft_config) == ["second", "default"] and model.active_adapters == ["default"]
    fresh = PeftModel.from_pretrained(build("causal"), extra["second"])
    assert model.peft_config["default"].to_dict() == fresh.peft_config["default"].to_dict()
    assert torch.equal(outputs(model), outputs(fresh))
    after = model.state_dict()
    assert untouched and all(torch.equal(after[k], v) for k, v in untouched.items())
    assert all(not p.requires_grad for p in model.parameters())


def test_replace_weights_is_plain_load_adapter_into_the_same_adapter(adapters: dict[str, Any], tmp_path: Any) -> None:
    """replace='weights': the checkpoint's weights written into the adapter, as plain load_adapter with an existing
    name (the Trainer's resume) does; the tensors are the same objects, updated in place."""
    other = str(tmp_path / "retrained")
    train_adapter(build("causal"), other, seed=11)  # same config as adapters["causal"], other weights
    plain = _peft_model(adapters)
    plain.load_adapter(other, "default")
    ours = _peft_model(adapters)
    tensors = {n: p for n, p in ours.named_parameters() if "lora_" in n}
    report = safe_load_adapter(ours, other, "default", replace="weights", output_loading_info=True)[1]
    assert report.ok
    _same_adapter(ours, plain, "default")
    assert all(p is tensors[n] for n, p in ours.named_parameters() if "lora_" in n)
    assert torch.equal(outputs(ours), outputs(plain))


# first adapter -> (retrained adapter: LoRA kwargs, how the first is loaded, the route the reload takes)
RELOADS: dict[str, tuple[dict[str, Any], dict[str, Any], str]] = {
    "lora": ({}, {}, "in_place"),
    "saved_head": ({"modules_to_save": ["lm_head"]}, {}, "in_place"),
    "dora": ({"use_dora": True}, {}, "in_place"),
    "lora_bias": ({"lora_bias": True}, {}, "in_place"),
    # saved base biases are base tensors written in place: peft's own route, under the whole-model snapshot
    "base_biases": ({"bias": "lora_only"}, {}, "initialising"),
    # the loaded adapter kept in bf16: peft's reload upcasts it (autocast), so peft's own route is taken
    "bf16_kept": ({}, {"autocast_adapter_dtype": False, "dtype": torch.bfloat16}, "initialising"),
}


@pytest.mark.parametrize("case", list(RELOADS))
@pytest.mark.parametrize("trainable", [False, True])
def test_a_reload_equals_plain_load_adapter_on_every_route(case: str, trainable: bool, tmp_path: Any) -> None:
    """replace='weights' on each kind of adapter, as plain ``load_adapter`` with the existing name: the same tensor
    objects with the same values, dtypes, flags and train / eval modes; the report says which route ran (a copy
    into the adapter's tensors where that is all peft does, peft's own load_adapter otherwise)."""
    lora, loading, route = RELOADS[case]
    dtype = loading.get("dtype")
    first_kwargs = {k: v for k, v in loading.items() if k != "dtype"}
    biased = {"attention_bias": True} if "bias" in case else {}  # layers with a bias for the bias options
    first, retrained = str(tmp_path / "first"), str(tmp_path / "retrained")
    train_adapter(build("causal", **biased), first, seed=12, **lora)
    train_adapter(build("causal", **biased), retrained, seed=13, **lora)

    def loaded() -> PeftModel:
        base = build("causal", **biased) if dtype is None else build("causal", **biased).to(dtype)
        model = PeftModel.from_pretrained(base, first, **first_kwargs)
        model.train()  # peft's load_adapter ends with eval() unless trainable: both must do the same
        return model

    plain, ours = loaded(), loaded()
    plain.load_adapter(retrained, "default", is_trainable=trainable)
    tensors = {n: p for n, p in ours.named_parameters()}
    report = safe_load_adapter(
        ours, retrained, "default", replace="weights", is_trainable=trainable, output_loading_info=True
    )[1]
    assert report.ok and not report.warnings and report.route == route
    _same_adapter(ours, plain, "default")
    assert [m.training for m in ours.modules()] == [m.training for m in plain.modules()]
    assert [(n, p.dtype) for n, p in ours.named_parameters()] == [(n, p.dtype) for n, p in plain.named_parameters()]
    if route == "in_place":
        assert all(p is tensors[n] for n, p in ours.named_parameters())
    assert torch.equal(outputs(ours), outputs(plain))


@pytest.mark.parametrize("names", [("default",), ("default", "default2"), ("q", "other")])
def test_a_reload_returns_what_peft_s_load_adapter_returns(names: tuple[str, ...], tmp_path: Any) -> None:
    """Under the switch, ``load_adapter`` with an existing name returns peft's result: with other adapters whose keys
    hold the name ("default2", or a module path such as ``q_proj`` for an adapter named "q"), peft lists their keys
    as missing, so those reloads take peft's own route; the only adapter in a model is copied in place."""
    import safe_peft

    first, other = str(tmp_path / "first"), str(tmp_path / "retrained")
    train_adapter(build("causal"), first, seed=12)
    train_adapter(build("causal"), other, seed=13)

    def loaded() -> PeftModel:
        model = PeftModel.from_pretrained(build("causal"), first, adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(first, name)
        return model

    plain, ours = loaded(), loaded()
    expected = plain.load_adapter(other, names[0])
    with safe_peft.patched():
        result = ours.load_adapter(other, names[0])
    assert sorted(result.missing_keys) == sorted(expected.missing_keys)
    assert sorted(result.unexpected_keys) == sorted(expected.unexpected_keys)
    for name in names:
        _same_adapter(ours, plain, name)
    route = safe_load_adapter(loaded(), other, names[0], replace="weights", output_loading_info=True)[1].route
    assert route == ("in_place" if len(names) == 1 else "initialising")


@pytest.mark.parametrize("stage", ["after_read", "mid_copy", "eval", "verification"])
@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_an_interrupted_in_place_reload_restores_the_peft_model(
    stage: str, error: type[BaseException], adapters: dict[str, Any], tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The in-place reload stopped at each of its steps (half of the tensors copied, in ``mid_copy``): every tensor,
    flag and mode as it was; then the same reload succeeds."""
    import peft.utils.save_and_load as save_and_load

    import safe_peft._load.driver as driver

    other = str(tmp_path / "retrained")
    train_adapter(build("causal"), other, seed=11)
    model = _peft_model(adapters)
    model.train()
    before = model_state(model)

    def stop(*_: Any, **__: Any) -> Any:
        raise error(f"interrupted at {stage}")

    real_read = save_and_load.load_peft_weights

    class HalfThenStop(dict):  # type: ignore[type-arg]
        def items(self) -> Any:
            pairs = list(super().items())
            yield from pairs[: len(pairs) // 2]
            stop()

    if stage == "after_read":
        monkeypatch.setattr(save_and_load, "load_peft_weights", stop)
    elif stage == "mid_copy":
        monkeypatch.setattr(save_and_load, "load_peft_weights", lambda *a, **k: HalfThenStop(real_read(*a, **k)))
    elif stage == "eval":
        monkeypatch.setattr(PeftModel, "eval", stop, raising=False)
    else:
        monkeypatch.setattr(driver, "verify", stop)
    with pytest.raises(KeyboardInterrupt if error is KeyboardInterrupt else AdapterLoadError):
        safe_load_adapter(model, other, "default", replace="weights")
    assert_same_state(before, model)
    monkeypatch.undo()
    plain = _peft_model(adapters)
    plain.load_adapter(other, "default")
    report = safe_load_adapter(model, other, "default", replace="weights", output_loading_info=True)[1]
    assert report.route == "in_place"
    assert torch.equal(outputs(model), outputs(plain))


def test_a_free_name_with_replace_just_adds(adapters: dict[str, Any], extra: dict[str, str]) -> None:
    model = _peft_model(adapters)
    safe_load_adapter(model, extra["second"], "second", replace=True)
    assert list(model.peft_config) == ["default", "second"]


def test_opt_in_fixes_work_on_further_adapters(adapters: dict[str, Any], extra: dict[str, str]) -> None:
    """remap= and repair= as for a first adapter: the compiled save loads with remap='auto', equal to the good one."""
    good = _peft_model(adapters)
    safe_load_adapter(good, extra["second"], "second")
    model = _peft_model(adapters)
    report = safe_load_adapter(model, extra["compiled"], "second", remap="auto", output_loading_info=True)[1]
    assert report.renames
    _same_adapter(model, good, "second")
    model = _peft_model(adapters)
    report = safe_load_adapter(model, extra["r2"], "second", repair=("rank",), output_loading_info=True)[1]
    config = model.peft_config["second"]
    assert report.repairs and isinstance(config, LoraConfig) and config.r == 4


def test_the_input_kwargs_are_not_mutated(adapters: dict[str, Any], extra: dict[str, str]) -> None:
    kwargs: dict[str, Any] = {"is_trainable": True}
    safe_load_adapter(_peft_model(adapters), extra["second"], "second", **kwargs)
    assert kwargs == {"is_trainable": True}
    assert os.path.isfile(os.path.join(extra["second"], "adapter_config.json"))
    assert INPUT.shape == (1, 6)
