"""Every surface keeps the core's promises through the shared mechanisms: the one writer, the one planning sequence,
the one set of bounds. Each defect found on a newer surface is held here, where it is tested through the mechanism
(the hostile battery, ``tests/test_hostile.py``, runs every hostile case through every surface; the writer's table,
``tests/test_writer_safety.py``, runs every writer)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import pytest
import torch

import safe_peft
from safe_peft import AdapterLoadError, check_target, diagnose, fix_for_target, safe_load_adapter
from safe_peft._cli import main
from tests.support.helpers import build, derive, outputs, primary

# -- the one planning sequence --------------------------------------------------------------------------------


def test_every_route_plans_with_the_one_sequence() -> None:
    """No route has a planning sequence of its own: each is a set of hooks of plan_load's (make_plan's)."""
    import safe_peft._plan.routes as routes
    from safe_peft._plan.plan import Route

    assert issubclass(routes.CarryingRoute, Route)
    assert not hasattr(routes, "_route_plan")
    own = {name for name in vars(routes) if "plan" in name and callable(getattr(routes, name))}
    assert own <= {"plan_for", "plan_load", "LoadPlan"}, own


def test_every_route_goes_through_the_one_driver() -> None:
    """The routes implement the route contract; none runs the undo (``atomically``) itself."""
    import os

    from safe_peft._load.driver import LoadRoute
    from safe_peft._routes.first_adapter import FirstAdapter
    from safe_peft._routes.hotswap import HotSwap
    from safe_peft._routes.inplace import InPlace
    from safe_peft._routes.peft_model import IntoPeftModel

    for route in (FirstAdapter, IntoPeftModel, InPlace, HotSwap):
        assert issubclass(route, LoadRoute), route
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "safe_peft", "_routes")
    for name in os.listdir(folder):
        if name.endswith(".py"):
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                assert "atomically" not in f.read(), name


@pytest.mark.parametrize("route", ["further", "reload", "inplace"])
def test_a_further_adapter_refuses_a_catastrophic_target_pattern(
    route: str, adapters: dict[str, Any], tmp_path: Any
) -> None:
    """The model-dependent config checks run on every route (a PeftModel's further adapter hung in peft's matcher)."""
    good = adapters["causal"][0]
    hostile = derive(good, str(tmp_path / "slow"), config=lambda c: c.update(target_modules="(a*)*b|model(.*)*x"))
    model = safe_load_adapter(build("causal"), good) if route != "inplace" else build("causal")
    options: dict[str, dict[str, Any]] = {
        "further": {"adapter_name": "b"},
        "reload": {"replace": "weights"},
        "inplace": {"inplace": True},
    }
    assert primary(diagnose(model, hostile, **options[route])).code == "catastrophic_pattern"


# -- the engine checks read the config as every surface does ---------------------------------------------------


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"r": "x"}, "invalid_config_value"),
        ({"lora_alpha": "x"}, "invalid_config_value"),
        ({"r": -1}, "invalid_config_value"),
        ({"rank_pattern": {"(.+)+Z": 4}}, "catastrophic_pattern"),
        ({"alpha_pattern": {"(.+)+Z": 4}}, "catastrophic_pattern"),
        ({"init_lora_weights": "pissa_niter_100000000"}, "config_limit_exceeded"),
    ],
)
def test_the_engine_check_refuses_what_the_peft_check_refuses(
    change: dict[str, Any], code: str, adapters: dict[str, Any], tmp_path: Any
) -> None:
    bad = derive(adapters["causal"][0], str(tmp_path / "bad"), config=lambda c: c.update(change))
    with pytest.raises(AdapterLoadError) as caught:
        check_target(bad, "vllm")
    assert primary(caught.value.report).code == code
    assert primary(diagnose(build("causal"), bad)).code == code


def test_the_engine_check_judges_the_config_s_own_rank(adapters: dict[str, Any], tmp_path: Any) -> None:
    """vLLM validates the config's r against max_lora_rank (PEFTHelper.validate_legal), not only the tensors'."""
    huge = derive(adapters["causal"][0], str(tmp_path / "huge"), config=lambda c: c.update(r=2**40))
    report = check_target(huge, "vllm")
    assert report.verdict == "refuses" and report.findings[0].code == "vllm_max_lora_rank"
    wide = derive(adapters["causal"][0], str(tmp_path / "wide"), config=lambda c: c.update(r=64))
    assert check_target(wide, "vllm").engine_args == {"max_lora_rank": 64}


@pytest.mark.parametrize("rank", [0, -3, 2**40, "16"])
def test_pad_rank_is_a_rank_the_engine_serves(rank: Any, adapters: dict[str, Any], tmp_path: Any) -> None:
    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match="pad_rank_to"):
        fix_for_target(adapters["causal"][0], "vllm", out, pad_rank_to=rank)
    assert not os.path.exists(out)


def test_check_target_json_lists_an_unreadable_adapter(adapters: dict[str, Any], tmp_path: Any, capsys: Any) -> None:
    bad = derive(adapters["causal"][0], str(tmp_path / "bad"), config=lambda c: c.update(r="x"))
    assert main(["check", adapters["causal"][0], bad, "--target", "vllm", "--json"]) == 2
    document = json.loads(capsys.readouterr().out)
    assert [r["verdict"] for r in document["results"]] == ["serves", "unreadable"]
    assert document["results"][1]["findings"][0]["code"] == "invalid_config_value"
    assert document["summary"]["unreadable"] == 1


# -- typed everywhere ------------------------------------------------------------------------------------------


def test_a_base_that_cannot_be_built_is_base_model_unreachable(adapters: dict[str, Any], tmp_path: Any) -> None:
    """A base checkpoint with a wrong-shaped tensor: transformers raises RuntimeError, the Auto route a typed error."""
    from safetensors.torch import load_file, save_file

    base_dir = str(tmp_path / "base")
    model = build("causal")
    model.save_pretrained(base_dir)
    weights = os.path.join(base_dir, "model.safetensors")
    state = load_file(weights)
    key = next(k for k in state if k.endswith("q_proj.weight"))
    state[key] = torch.zeros(3, 3)
    save_file(state, weights, metadata={"format": "pt"})
    adapter = derive(
        adapters["causal"][0], str(tmp_path / "adapter"), config=lambda c: c.update(base_model_name_or_path=base_dir)
    )
    with pytest.raises(AdapterLoadError) as caught:
        safe_peft.from_pretrained(adapter)
    assert primary(caught.value.report).code == "base_model_unreachable"


# -- narrow windows --------------------------------------------------------------------------------------------


def _scratch() -> set[str]:
    return {n for n in os.listdir(tempfile.gettempdir()) if n.startswith("safe_peft_")}


def test_a_failure_while_remapped_weights_are_written_leaves_no_scratch_copy(
    adapters: dict[str, Any], tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safe_peft._load.directory as directory

    good, trained = adapters["causal"][0], adapters["causal"][1]
    compiled = derive(good, str(tmp_path / "compiled"), keys=lambda k: k.replace("layers", "_orig_mod.layers", 1))

    def half_written(source: str, out: str, **kwargs: Any) -> None:
        with open(out, "wb") as f:
            f.write(b"half")
        raise OSError(28, "No space left on device", out)

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # this test's own: other processes use /tmp too
    before = _scratch()
    monkeypatch.setattr(directory, "write_weights", half_written)
    base = build("causal")
    with pytest.raises(AdapterLoadError):
        safe_load_adapter(base, compiled, remap="auto")
    assert _scratch() == before == set()
    monkeypatch.undo()
    assert torch.allclose(outputs(safe_load_adapter(base, compiled, remap="auto")), trained, atol=1e-5)


def test_ctrl_c_while_the_scratch_copy_is_removed_undoes_the_load(
    adapters: dict[str, Any], tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scratch copy is removed inside the undo: a Ctrl-C then leaves the base as it was (the caller can tell),
    never a loaded adapter behind a KeyboardInterrupt."""
    from tests.support.helpers import assert_same_state, model_state

    good = adapters["causal"][0]
    compiled = derive(good, str(tmp_path / "compiled"), keys=lambda k: k.replace("layers", "_orig_mod.layers", 1))
    real = shutil.rmtree
    calls = [0]

    def interrupted(path: Any, *args: Any, **kwargs: Any) -> None:
        calls[0] += 1
        real(path, *args, **kwargs)
        if calls[0] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", interrupted)  # the module the undo (safe_peft._load.atomic) uses
    base = build("causal")
    before = model_state(base)
    with pytest.raises(KeyboardInterrupt):
        safe_load_adapter(base, compiled, remap="auto")
    assert calls[0] >= 1
    assert_same_state(before, base)


def test_saved_targets_of_another_class_are_refused_when_the_keys_fit_as_they_are(tmp_path: Any) -> None:
    """Keys that fit the bare model, targets saved as the causal LM's full paths: nothing renames the targets, so
    peft finds none of them. The plan says so before anything is injected (it said ok, then the load failed)."""
    from peft import PeftModel

    from tests.support.helpers import assert_same_state, model_state, train_adapter

    directory = str(tmp_path / "bare")
    train_adapter(build("bare"), directory, target_modules=["q_proj", "v_proj"])
    causal_paths = [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")]
    shifted = derive(directory, str(tmp_path / "shifted"), config=lambda c: c.update(target_modules=causal_paths))
    with pytest.raises(ValueError):
        PeftModel.from_pretrained(build("bare"), shifted)  # plain peft: no module matches the targets
    assert primary(diagnose(build("bare"), shifted)).code == "target_modules_not_found"
    base = build("bare")
    before = model_state(base)
    with pytest.raises(AdapterLoadError) as caught:
        safe_load_adapter(base, shifted)
    assert primary(caught.value.report).code == "target_modules_not_found"
    assert_same_state(before, base)


@pytest.mark.parametrize("engine", ["vllm", "llamacpp"])
def test_padding_a_conv_lora_keeps_peft_s_outputs(engine: str, tmp_path: Any) -> None:
    """lora_B of a convolution is [out, r, 1, 1]: the rank is padded on its second dimension (it was padded on the
    kernel's last one, and the engine check of the output did not see it)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors import safe_open

    def base() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3))

    trained = get_peft_model(base(), LoraConfig(target_modules=["0"], r=4, lora_alpha=8, init_lora_weights=False))
    trained.save_pretrained(str(tmp_path / "conv"))
    x = torch.randn(1, 4, 6, 6)
    out = str(tmp_path / "padded")
    fix_for_target(str(tmp_path / "conv"), engine, out, pad_rank_to=8)
    with safe_open(os.path.join(out, "adapter_model.safetensors"), "pt") as f:
        shapes = {k.rsplit(".", 2)[-2]: tuple(f.get_tensor(k).shape) for k in f.keys()}  # noqa: SIM118
    assert shapes == {"lora_A": (8, 4, 3, 3), "lora_B": (8, 8, 1, 1)}
    assert torch.allclose(PeftModel.from_pretrained(base(), out)(x), trained(x), atol=1e-5)


def test_the_vl_prefix_conversion_renames_rank_pattern_keys_too(adapters: dict[str, Any], tmp_path: Any) -> None:
    from safe_peft._engines.fix import _vlm_prefix

    tensors = {"base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight": 1, "base_model.model.lm_head.x": 2}
    cfg = {"rank_pattern": {"model.layers.1.self_attn.q_proj": 16, "v_proj": 4}}
    moved, config = _vlm_prefix(tensors, cfg)
    assert set(moved) == {"base_model.model.model.language_model.layers.1.self_attn.q_proj.lora_A.weight",
                          "base_model.model.lm_head.x"}  # fmt: skip
    assert config["rank_pattern"] == {"model.language_model.layers.1.self_attn.q_proj": 16, "v_proj": 4}


@pytest.mark.parametrize("count", ["²", "١٢"])
def test_a_non_ascii_iteration_count_is_a_typed_refusal(count: str, adapters: dict[str, Any], tmp_path: Any) -> None:
    bad = derive(
        adapters["causal"][0],
        str(tmp_path / "bad"),
        config=lambda c: c.update(init_lora_weights=f"pissa_niter_{count}"),
    )
    with pytest.raises(AdapterLoadError) as caught:
        check_target(bad, "vllm")
    assert primary(caught.value.report).code == "invalid_config_value"


def test_a_commit_that_fails_is_undone_with_the_load(adapters: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A route's commit (a caller's config= object installed) runs inside the undo: if it fails, the base is back."""
    import safe_peft._routes.first_adapter as first_adapter
    from tests.support.helpers import assert_same_state, model_state

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the commit failed")

    monkeypatch.setattr(first_adapter, "install_given_config", broken)
    base = build("causal")
    before = model_state(base)
    with pytest.raises(RuntimeError):
        safe_load_adapter(base, adapters["causal"][0])
    assert_same_state(before, base)
    assert not hasattr(base, "peft_config")
