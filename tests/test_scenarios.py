"""One table from real failure scenarios to the expected verdict, checked three ways:
``diagnose`` predicts it, ``safe_load_adapter`` raises it (leaving the base model untouched),
and where an opt-in fix exists, the fixed load gives the outputs of the adapter as trained."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from safe_peft import AdapterFormatError, AdapterLoadError, Cause, diagnose, safe_load_adapter
from tests.support.helpers import assert_unchanged, build, derive, fingerprint, outputs


@dataclass
class Scenario:
    name: str
    adapter: str  # key of the `adapters` fixture
    model: str  # build() kind
    cause: Cause | None  # None: loads
    code: str | None = None
    fix: dict[str, Any] = field(default_factory=dict)  # the opt-in that fixes it
    derive: dict[str, Callable[..., Any]] = field(default_factory=dict)
    model_overrides: dict[str, Any] = field(default_factory=dict)


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(cfg: dict[str, Any]) -> None:
        cfg[key] = value

    return edit


def _drop_lora_b(key: str) -> str | None:
    return None if "lora_B" in key and "layers.1." in key else key


SCENARIOS = [
    Scenario("ok", "causal", "causal", None),
    Scenario("ok_gpt2_conv1d", "gpt2", "gpt2", None),
    Scenario("ok_dora", "dora", "causal", None),
    Scenario("ok_all_linear", "all_linear", "causal", None),
    Scenario("ok_seqcls", "seqcls", "seqcls", None),
    Scenario(
        "rank_in_config",
        "causal",
        "causal",
        Cause.CONFIG_MISMATCH,
        "rank_mismatch",
        {"repair": ("rank",)},
        {"config": _set("r", 4)},
    ),
    Scenario(
        "causal_adapter_into_bare_model",
        "causal",
        "bare",
        Cause.MODEL_CLASS_MISMATCH,
        "head_prefix_remove",
        {"remap": "auto"},
    ),
    Scenario(
        "bare_adapter_into_causal_model",
        "bare",
        "causal",
        Cause.MODEL_CLASS_MISMATCH,
        "head_prefix_add",
        {"remap": "auto"},
    ),
    Scenario("seqcls_adapter_into_bare_model", "seqcls", "bare", Cause.MODEL_CLASS_MISMATCH, "missing_task_head"),
    Scenario(
        "causal_lm_task_adapter_into_bare_model",
        "causal_task",
        "bare",
        Cause.MODEL_CLASS_MISMATCH,
        "head_prefix_remove",
        {"remap": "auto"},
    ),
    Scenario(
        "all_linear_task_adapter_into_bare_model",
        "all_linear_task",
        "bare",
        Cause.MODEL_CLASS_MISMATCH,
        "head_prefix_remove",
        {"remap": "auto"},
    ),
    Scenario(
        "causal_lm_adapter_into_seqcls_model", "causal_task", "seqcls", Cause.MODEL_CLASS_MISMATCH, "task_type_mismatch"
    ),
    Scenario("other_hidden_size", "wide", "causal", Cause.WRONG_BASE_MODEL, "dimension_mismatch"),
    Scenario("deeper_model", "deep", "causal", Cause.WRONG_BASE_MODEL, "fewer_layers"),
    Scenario("targets_not_in_model", "gpt2", "causal", Cause.WRONG_BASE_MODEL, "target_modules_not_found"),
    Scenario(
        "orig_mod_prefix",
        "causal",
        "causal",
        Cause.KEY_FORMAT,
        "strip_orig_mod",
        {"remap": "auto"},
        {"keys": lambda k: k.replace("model.layers", "_orig_mod.model.layers")},
    ),
    Scenario(
        "ddp_module_prefix",
        "causal",
        "causal",
        Cause.KEY_FORMAT,
        "strip_module",
        {"remap": "auto"},
        {"keys": lambda k: k.replace("base_model.model.", "base_model.model.module.")},
    ),
    Scenario(
        "adapter_name_in_keys",
        "causal",
        "causal",
        Cause.KEY_FORMAT,
        "adapter_name_out",
        {"remap": "auto"},
        {"keys": lambda k: re.sub(r"\.(lora_[AB])\.weight$", r".\1.other.weight", k)},
    ),
    Scenario(
        "no_peft_prefix",
        "causal",
        "causal",
        Cause.KEY_FORMAT,
        "add_peft_prefix",
        {"remap": "auto"},
        {"keys": lambda k: k.removeprefix("base_model.model.")},
    ),
    Scenario(
        "unpaired_lora", "causal", "causal", Cause.CORRUPT_CHECKPOINT, "unpaired_lora", derive={"keys": _drop_lora_b}
    ),
    Scenario(
        "zero3_empty_tensors",
        "causal",
        "causal",
        Cause.CORRUPT_CHECKPOINT,
        "zero3_empty_tensors",
        derive={"tensors": lambda k, v: torch.empty(0)},
    ),
    Scenario(
        "dora_flag_lost",
        "dora",
        "causal",
        Cause.CONFIG_MISMATCH,
        "dora_flag",
        {"repair": ("dora",)},
        {"config": _set("use_dora", False)},
    ),
    Scenario(
        "untargeted_modules",
        "causal",
        "causal",
        Cause.CONFIG_MISMATCH,
        "untargeted_modules",
        {"repair": ("targets",)},
        {"config": _set("target_modules", ["q_proj"])},
    ),
]


@pytest.fixture
def scenario_dir(adapters: dict[str, Any], tmp_path: Any, request: pytest.FixtureRequest) -> Callable[[Scenario], str]:
    def make(s: Scenario) -> str:
        src = adapters[s.adapter][0]
        return derive(src, str(tmp_path / s.name), **s.derive) if s.derive else src

    return make


@pytest.mark.parametrize("s", SCENARIOS, ids=lambda s: s.name)
def test_diagnose_and_load_agree(s: Scenario, adapters: dict[str, Any], scenario_dir: Any) -> None:
    directory = scenario_dir(s)
    base = build(s.model, **s.model_overrides)
    before = fingerprint(base)
    predicted = diagnose(base, directory)
    assert_unchanged(before, base)
    if s.cause is None:
        assert predicted.ok, str(predicted)
        model, report = safe_load_adapter(base, directory, output_loading_info=True)
        assert report.ok and report.causes == []
        assert torch.allclose(outputs(model), adapters[s.adapter][1], atol=1e-5)
        return
    assert not predicted.ok
    assert predicted.primary is not None
    assert (predicted.primary.cause, predicted.primary.code) == (s.cause, s.code), str(predicted)
    with pytest.raises(AdapterLoadError) as info:
        safe_load_adapter(base, directory)
    real = info.value.report
    assert [(d.cause, d.code) for d in real.causes] == [(d.cause, d.code) for d in predicted.causes]
    assert real.missing == predicted.missing
    assert real.unexpected == predicted.unexpected
    assert real.size_mismatches == predicted.size_mismatches
    assert_unchanged(before, base)
    if s.fix:
        assert predicted.primary.fix_arguments() == ", ".join(f"{k}={v!r}" for k, v in s.fix.items())


FIXABLE = [s for s in SCENARIOS if s.fix]


@pytest.mark.parametrize("s", FIXABLE, ids=lambda s: s.name)
def test_opt_in_fix_gives_trained_outputs(s: Scenario, adapters: dict[str, Any], scenario_dir: Any) -> None:
    directory = scenario_dir(s)
    base = build(s.model, **s.model_overrides)
    assert diagnose(base, directory, **s.fix).ok
    model, report = safe_load_adapter(base, directory, output_loading_info=True, **s.fix)
    assert report.ok
    assert report.renames or report.repairs
    reference = safe_load_adapter(build(TRAINED_ON[s.adapter]), adapters[s.adapter][0])
    assert torch.allclose(backbone(model), backbone(reference), atol=1e-5)
    if TRAINED_ON[s.adapter] == s.model:
        assert torch.allclose(outputs(model), adapters[s.adapter][1], atol=1e-5)


TRAINED_ON = {
    "causal": "causal",
    "bare": "bare",
    "dora": "causal",
    "seqcls": "seqcls",
    "causal_task": "causal",
    "all_linear_task": "causal",
}


def backbone(model: Any) -> torch.Tensor:
    """Hidden states of the transformer body, comparable across *ForCausalLM and the bare model."""
    inner = model.get_base_model()
    body = getattr(inner, "model", inner)
    with torch.no_grad():
        return body(torch.tensor([[1, 5, 9, 13, 17, 21]])).last_hidden_state


def test_failures_never_modify_adapter_files(adapters: dict[str, Any], tmp_path: Any) -> None:
    directory = derive(adapters["causal"][0], str(tmp_path / "r4"), config=_set("r", 4))

    def files() -> dict[str, bytes]:
        return {n: (tmp_path / "r4" / n).read_bytes() for n in sorted(os.listdir(directory))}

    before = files()
    with pytest.raises(AdapterLoadError):
        safe_load_adapter(build("causal"), directory)
    safe_load_adapter(build("causal"), directory, repair=("rank",))
    assert files() == before


def test_retry_after_failure_loads_cleanly(adapters: dict[str, Any], tmp_path: Any) -> None:
    """Plain peft leaves injected layers behind after a failed load; a retry then works on a damaged model."""
    base = build("causal")
    bad = derive(adapters["causal"][0], str(tmp_path / "bad"), config=_set("r", 4))
    with pytest.raises(AdapterLoadError):
        safe_load_adapter(base, bad)
    model = safe_load_adapter(base, adapters["causal"][0])
    assert torch.allclose(outputs(model), adapters["causal"][1], atol=1e-5)


def test_vocab_resized_adapter(tmp_path: Any) -> None:
    from tests.support.helpers import train_adapter

    trained_base = build("causal")
    trained_base.resize_token_embeddings(120)
    directory = str(tmp_path / "vocab")
    trained = train_adapter(trained_base, directory, modules_to_save=["embed_tokens", "lm_head"])
    base = build("causal")
    before = fingerprint(base)
    report = diagnose(base, directory)
    assert report.primary is not None
    assert (report.primary.cause, report.primary.code) == (Cause.VOCAB_SIZE_MISMATCH, "resized_embeddings")
    assert report.primary.repair == ("vocab",)
    with pytest.raises(AdapterLoadError):
        safe_load_adapter(base, directory)
    assert_unchanged(before, base)
    model, fixed = safe_load_adapter(base, directory, repair=("vocab",), output_loading_info=True)
    assert any("vocab" in r and "120" in r for r in fixed.repairs)
    assert torch.allclose(outputs(model), trained, atol=1e-5)


@pytest.mark.parametrize(
    "damage, code, cause",
    [
        ("truncate", "truncated_file", Cause.CORRUPT_CHECKPOINT),
        ("no_config", "missing_config", Cause.CORRUPT_CHECKPOINT),
        ("pickle_only", "pickle_refused", Cause.UNSAFE_FORMAT),
        ("bad_json", "bad_config_json", Cause.CORRUPT_CHECKPOINT),
        ("model_config", "model_config_as_adapter_config", Cause.FOREIGN_FORMAT),
        ("no_weights", "missing_weights", Cause.CORRUPT_CHECKPOINT),
    ],
)
def test_unreadable_adapters_are_format_errors(
    damage: str, code: str, cause: Cause, adapters: dict[str, Any], tmp_path: Any
) -> None:
    directory = str(tmp_path / damage)
    shutil.copytree(adapters["causal"][0], directory)
    weights = os.path.join(directory, "adapter_model.safetensors")
    config = os.path.join(directory, "adapter_config.json")
    if damage == "truncate":
        os.truncate(weights, os.path.getsize(weights) - 100)
    elif damage == "no_config":
        os.remove(config)
    elif damage == "pickle_only":
        from safetensors.torch import load_file

        torch.save(load_file(weights), os.path.join(directory, "adapter_model.bin"))
        os.remove(weights)
    elif damage == "bad_json":
        with open(config, "w") as f:
            f.write("{not json")
    elif damage == "model_config":
        with open(config, "w") as f:
            json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, f)
    elif damage == "no_weights":
        os.remove(weights)
    base = build("causal")
    before = fingerprint(base)
    with pytest.raises(AdapterFormatError) as info:
        safe_load_adapter(base, directory)
    err = info.value
    assert isinstance(err, RuntimeError)
    assert err.report.primary is not None
    assert (err.report.primary.cause, err.report.primary.code) == (cause, code)
    assert directory in str(err)
    assert_unchanged(before, base)
    assert diagnose(base, directory).primary == err.report.primary


def test_allowed_pickle_loads_with_weights_only(adapters: dict[str, Any], tmp_path: Any) -> None:
    from safetensors.torch import load_file

    directory = str(tmp_path / "bin")
    shutil.copytree(adapters["causal"][0], directory)
    weights = os.path.join(directory, "adapter_model.safetensors")
    torch.save(load_file(weights), os.path.join(directory, "adapter_model.bin"))
    os.remove(weights)
    model = safe_load_adapter(build("causal"), directory, allow_pickle=True)
    assert torch.allclose(outputs(model), adapters["causal"][1], atol=1e-5)


def test_malicious_pickle_never_runs(tmp_path: Any, adapters: dict[str, Any]) -> None:
    import pickle

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self) -> Any:
            return (open, (str(marker), "w"))

    directory = str(tmp_path / "evil")
    shutil.copytree(adapters["causal"][0], directory)
    os.remove(os.path.join(directory, "adapter_model.safetensors"))
    with open(os.path.join(directory, "adapter_model.bin"), "wb") as f:
        pickle.dump({"x": Payload()}, f)
    for allow in (False, True):
        with pytest.raises(AdapterFormatError) as info:
            safe_load_adapter(build("causal"), directory, allow_pickle=allow)
        assert info.value.report.primary is not None
        assert info.value.report.primary.cause is Cause.UNSAFE_FORMAT
    assert not marker.exists()


def test_strict_false_keeps_peft_leniency_and_reports(adapters: dict[str, Any]) -> None:
    base = build("bare")
    with pytest.warns(UserWarning, match="missing adapter keys"):
        model, report = safe_load_adapter(base, adapters["causal"][0], strict=False, output_loading_info=True)
    assert not report.ok
    assert report.primary is not None and report.primary.cause is Cause.MODEL_CLASS_MISMATCH
    assert len(report.missing) == len(report.unexpected) == 8
    assert type(model).__name__.startswith("PeftModel")


def test_nan_adapter_is_refused_after_loading_and_undone(adapters: dict[str, Any], tmp_path: Any) -> None:
    directory = derive(
        adapters["causal"][0],
        str(tmp_path / "nan"),
        tensors=lambda k, v: v.fill_(float("nan")) if "layers.1.self_attn.q_proj.lora_B" in k else v,
    )
    base = build("causal")
    before = fingerprint(base)
    assert diagnose(base, directory).ok  # values are invisible to a header-only diagnosis
    with pytest.raises(AdapterLoadError) as info:
        safe_load_adapter(base, directory)
    assert info.value.report.primary is not None
    assert info.value.report.primary.code == "non_finite_values"
    assert_unchanged(before, base)


def test_all_zero_lora_b_is_a_warning(tmp_path: Any) -> None:
    from peft import LoraConfig, get_peft_model

    directory = str(tmp_path / "untrained")
    get_peft_model(build("causal"), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(directory)
    _model, report = safe_load_adapter(build("causal"), directory, output_loading_info=True)
    assert report.ok
    assert [w.code for w in report.warnings] == ["all_zero_lora_B"]


def test_peft_kwargs_pass_through_unchanged(adapters: dict[str, Any]) -> None:
    kwargs: dict[str, Any] = {"is_trainable": True}
    model = safe_load_adapter(build("causal"), adapters["causal"][0], **kwargs)
    assert kwargs == {"is_trainable": True}
    assert any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("s", [s for s in FIXABLE if "vocab" not in s.fix.get("repair", ())], ids=lambda s: s.name)
def test_written_fix_loads_in_plain_peft_without_warning(
    s: Scenario, adapters: dict[str, Any], scenario_dir: Any, tmp_path: Any
) -> None:
    import warnings

    from peft import PeftModel
    from safetensors import safe_open

    from safe_peft._fix.writer import fix_adapter

    directory = scenario_dir(s)
    source = {n: open_bytes(directory, n) for n in os.listdir(directory)}
    out = str(tmp_path / "fixed")
    report = fix_adapter(build(s.model), directory, out, **s.fix)
    assert report.ok and (report.renames or report.repairs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "loads with no warning"...
        warnings.filterwarnings("ignore", category=FutureWarning)  # ...but transformers' deprecation notices
        model = PeftModel.from_pretrained(build(s.model), out)
    reference = safe_load_adapter(build(TRAINED_ON[s.adapter]), adapters[s.adapter][0])
    assert torch.allclose(backbone(model), backbone(reference), atol=1e-5)
    if TRAINED_ON[s.adapter] == s.model:
        assert torch.allclose(outputs(model), adapters[s.adapter][1], atol=1e-5)
    with safe_open(os.path.join(out, "adapter_model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert bool(meta["safe_peft.rules"]) == bool(report.renames)
    assert meta["safe_peft.renamed"] == str(len(report.renames))
    assert json.loads(meta["safe_peft.repairs"]) == report.repairs
    assert len(meta["safe_peft.source_keys_sha256"]) == 64
    assert {n: open_bytes(directory, n) for n in os.listdir(directory)} == source


def open_bytes(directory: str, name: str) -> bytes:
    with open(os.path.join(directory, name), "rb") as f:
        return f.read()


def test_rename_only_fix_streams_the_data_region_unchanged(adapters: dict[str, Any], tmp_path: Any) -> None:
    from safe_peft._files.safetensors_header import read_header
    from safe_peft._fix.writer import fix_adapter

    directory = derive(
        adapters["causal"][0],
        str(tmp_path / "compiled"),
        keys=lambda k: k.replace("model.layers", "_orig_mod.model.layers"),
    )
    fix_adapter(build("causal"), directory, str(tmp_path / "out"), remap="auto")
    old = read_header(os.path.join(directory, "adapter_model.safetensors"))
    new = read_header(str(tmp_path / "out" / "adapter_model.safetensors"))
    data = open_bytes(directory, "adapter_model.safetensors")[old.data_start :]
    assert open_bytes(str(tmp_path / "out"), "adapter_model.safetensors")[new.data_start :] == data
    assert sorted(t.begin for t in new.tensors.values()) == sorted(t.begin for t in old.tensors.values())


def test_fix_refuses_unfixable_existing_and_in_place(adapters: dict[str, Any], tmp_path: Any) -> None:
    from safe_peft._fix.writer import fix_adapter

    with pytest.raises(AdapterLoadError):
        fix_adapter(build("causal"), adapters["wide"][0], str(tmp_path / "never"), remap="auto")
    assert not (tmp_path / "never").exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    bad = derive(adapters["causal"][0], str(tmp_path / "r4"), config=_set("r", 4))
    with pytest.raises(FileExistsError):
        fix_adapter(build("causal"), bad, str(tmp_path / "busy"), repair=("rank",))
    assert (tmp_path / "busy" / "keep.txt").read_text() == "x"
    with pytest.raises(ValueError, match="own directory"):
        fix_adapter(build("causal"), bad, bad, repair=("rank",))
    with pytest.raises(FileExistsError, match="did not write"):  # force replaces only what safe-peft wrote
        fix_adapter(build("causal"), bad, str(tmp_path / "busy"), repair=("rank",), force=True)
    assert (tmp_path / "busy" / "keep.txt").read_text() == "x"
    fix_adapter(build("causal"), bad, str(tmp_path / "ours"), repair=("rank",))
    fix_adapter(build("causal"), bad, str(tmp_path / "ours"), repair=("rank",), force=True)
    assert sorted(os.listdir(tmp_path / "ours")) == [
        ".safe-peft-fix.json",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


def test_refused_auto_remap_keeps_the_real_cause_first(adapters: dict[str, Any], tmp_path: Any) -> None:
    report = diagnose(build("causal"), adapters["wide"][0], remap="auto")
    assert [d.code for d in report.causes] == ["dimension_mismatch"]  # nothing to rename: shapes only
    compiled = derive(
        adapters["wide"][0],
        str(tmp_path / "wide_compiled"),
        keys=lambda k: k.replace("model.layers", "_orig_mod.model.layers"),
    )
    for remap in (None, "auto"):
        report = diagnose(build("causal"), compiled, remap=remap)
        codes = [d.code for d in report.causes]
        assert codes[0] == "dimension_mismatch", codes
        assert ("remap_not_exact" in codes) == (remap == "auto")
        assert report.renames == {}


def test_vocab_repair_says_grow_or_shrink(tmp_path: Any) -> None:
    from tests.support.helpers import train_adapter

    trained_base = build("causal")
    trained_base.resize_token_embeddings(80)  # axolotl-style shrunk vocabulary
    directory = str(tmp_path / "shrunk")
    trained = train_adapter(trained_base, directory, modules_to_save=["embed_tokens", "lm_head"])
    model, report = safe_load_adapter(build("causal"), directory, repair=("vocab",), output_loading_info=True)
    assert report.repairs[-1] == "vocab: shrink the base model's token embeddings from 100 to 80 rows"
    assert torch.allclose(outputs(model), trained, atol=1e-5)


@pytest.mark.parametrize("kwarg", ["low_cpu_mem_usage", "torch_device", "config", "autocast_adapter_dtype"])
def test_peft_kwargs_are_honoured_and_never_mutated(kwarg: str, adapters: dict[str, Any]) -> None:
    import copy

    from peft import PeftConfig

    value: Any = {"low_cpu_mem_usage": True, "torch_device": "cpu", "autocast_adapter_dtype": False}.get(kwarg)
    if kwarg == "config":
        value = PeftConfig.from_pretrained(adapters["causal"][0])
        value.inference_mode = False
    kwargs = {kwarg: value}
    snapshot = copy.deepcopy(kwargs)
    model, report = safe_load_adapter(build("causal"), adapters["causal"][0], output_loading_info=True, **kwargs)
    assert report.ok
    assert torch.allclose(outputs(model), adapters["causal"][1], atol=1e-5)
    assert kwargs.keys() == snapshot.keys()
    if kwarg == "config":  # the one exception, as in peft: the caller's config is installed itself, and set
        assert model.peft_config["default"] is value and value.inference_mode is True


LOADABLE = [s for s in SCENARIOS if s.cause is None] + FIXABLE


@pytest.fixture
def meta_whenever_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    """The meta route for every adapter the plan proves complete and exact, however small (by default a small
    adapter takes peft's initialising route, which is then the faster one)."""
    import safe_peft._load.route_choice

    monkeypatch.setattr(safe_peft._load.route_choice, "META_ROUTE_MIN_ELEMENTS_PER_MODULE", 0)


@pytest.mark.parametrize("s", LOADABLE, ids=lambda s: s.name)
@pytest.mark.usefixtures("meta_whenever_exact")
def test_both_load_routes_give_identical_outputs(s: Scenario, adapters: dict[str, Any], scenario_dir: Any) -> None:
    """The meta route (adapter created on meta, checkpoint assigned: the plan proved it complete) and peft's
    initialising route (what plain peft does by default) give the very same model."""
    directory = scenario_dir(s)
    fast, fast_report = safe_load_adapter(
        build(s.model, **s.model_overrides), directory, output_loading_info=True, **s.fix
    )
    slow, slow_report = safe_load_adapter(
        build(s.model, **s.model_overrides), directory, output_loading_info=True, low_cpu_mem_usage=False, **s.fix
    )
    assert slow_report.route == "initialising"
    assert fast_report.route in ("meta", "initialising")  # meta where the plan proves it exact
    assert torch.equal(outputs(fast), outputs(slow))
    fast_state, slow_state = fast.state_dict(), slow.state_dict()
    assert fast_state.keys() == slow_state.keys()
    assert all(torch.equal(fast_state[k], slow_state[k]) for k in fast_state)
    assert all(p.device.type != "meta" for p in fast.parameters())
    assert [n for n, p in fast.named_parameters() if p.requires_grad] == [
        n for n, p in slow.named_parameters() if p.requires_grad
    ]


def test_the_meta_route_is_taken_where_it_is_the_faster_one(
    adapters: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exact plain LoRA takes the meta route when its tensors are large for the number of adapted modules (skipping
    their initialisation saves more than the meta device context costs), peft's initialising route when small."""
    import safe_peft._load.route_choice

    _, report = safe_load_adapter(build("causal"), adapters["all_linear"][0], output_loading_info=True)
    assert report.route == "initialising"  # a tiny adapter: a few thousand elements per module
    monkeypatch.setattr(safe_peft._load.route_choice, "META_ROUTE_MIN_ELEMENTS_PER_MODULE", 100)
    _, report = safe_load_adapter(build("causal"), adapters["all_linear"][0], output_loading_info=True)
    assert report.route == "meta" and report.to_dict()["route"] == "meta"
    _, report = safe_load_adapter(build("causal"), adapters["causal"][0], output_loading_info=True, strict=False)
    assert report.route == "initialising"  # lenient loads keep peft's own route
