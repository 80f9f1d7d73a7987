"""What loading into a sharded model needs from torch, as data (safe_peft._versions), and what an older torch gets:
a ``load_before_sharding`` refusal that names the torch release, before the model is touched.

The sharded model is a one-rank tensor-parallel Llama (gloo, this process), built with the APIs of whichever torch
is installed, so the floor torch of the oldest CI environment runs the refusal for real.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from peft import LoraConfig

from safe_peft import AdapterLoadError, diagnose, safe_load_adapter
from safe_peft._model.sharding import is_sharded, sharding_findings
from safe_peft._model.view import expected_keys
from safe_peft._versions import SHARDED_LOAD_TORCH_SINCE, torch_at_least
from tests.support.helpers import assert_same_state, build, model_state, primary, train_adapter

INSTALLED = str(torch.__version__)


@pytest.mark.parametrize(
    ("version", "since", "expected"),
    [
        ("2.4.1", "2.6", False),
        ("2.4.1+cu121", "2.4", True),
        ("2.6.0", "2.6", True),
        ("2.6.0", "2.7", False),
        ("2.7.0a0+git1234", "2.7", True),  # a pre-release of 2.7 has its APIs
        ("2.13.0+cpu", "2.7", True),
        ("not a version", "2.7", True),  # a source build of torch's main branch
    ],
)
def test_torch_at_least(version: str, since: str, expected: bool) -> None:
    assert torch_at_least(version, since) is expected


@pytest.fixture
def tensor_parallel(tmp_path: Any) -> Iterator[tuple[Any, str]]:
    """A tiny causal Llama whose q/v projections are column-parallel and o_proj row-parallel on a one-rank mesh,
    and a q/v LoRA trained on the same (unsharded) model."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with the gloo backend")
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    adapter = str(tmp_path / "adapter")
    train_adapter(build("causal"), adapter)
    store = dist.HashStore()  # type: ignore[attr-defined]  # torch.distributed re-exports it, no __all__
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        model = build("causal")
        plan = {"q_proj": ColwiseParallel(), "v_proj": ColwiseParallel(), "o_proj": RowwiseParallel()}
        for layer in model.get_submodule("model.layers").children():
            parallelize_module(layer.get_submodule("self_attn"), mesh, plan)
        assert is_sharded(model)
        yield model, adapter
    finally:
        dist.destroy_process_group()


def _needs_placing_torch() -> None:
    if not torch_at_least(INSTALLED, SHARDED_LOAD_TORCH_SINCE):
        pytest.skip(f"torch {INSTALLED}: a sharded model is refused before its layers are read")


def _findings(model: Any, adapter: str, torch_version: str) -> list[Any]:
    config = LoraConfig.from_pretrained(adapter)
    return sharding_findings(model, config, expected_keys(model, config).expected, (), None, torch_version)


@pytest.mark.parametrize("version", ["2.4.1", "2.5.1", "2.6.0+cu124", "2.7.0"])
def test_an_older_torch_is_refused_naming_the_release_it_needs(tensor_parallel: tuple[Any, str], version: str) -> None:
    model, adapter = tensor_parallel
    (found,) = _findings(model, adapter, version)
    assert found.code == "load_before_sharding"
    assert f"torch >= {SHARDED_LOAD_TORCH_SINCE}" in found.message and f"torch {version}" in found.message
    assert found.details["needs_torch"] == f">= {SHARDED_LOAD_TORCH_SINCE}" and found.fix


def test_a_torch_with_every_api_places_it(tensor_parallel: tuple[Any, str]) -> None:
    _needs_placing_torch()
    model, adapter = tensor_parallel
    assert _findings(model, adapter, SHARDED_LOAD_TORCH_SINCE + ".0") == []


def test_the_installed_torch_decides(tensor_parallel: tuple[Any, str]) -> None:
    """On a torch without the APIs (the oldest CI environment) the real load is refused and changes nothing; on one
    with them, the verdict is the placement's (loading itself runs in tests/test_distributed.py)."""
    model, adapter = tensor_parallel
    if torch_at_least(INSTALLED, SHARDED_LOAD_TORCH_SINCE):
        assert diagnose(model, adapter).ok
        return
    assert not diagnose(model, adapter).ok
    assert primary(diagnose(model, adapter)).code == "load_before_sharding"
    before = model_state(model)
    with pytest.raises(AdapterLoadError) as caught:
        safe_load_adapter(model, adapter)
    assert primary(caught.value.report).code == "load_before_sharding"
    assert f"torch {INSTALLED}" in primary(caught.value.report).message
    assert_same_state(before, model)


def test_the_gloo_group_is_gone() -> None:
    import torch.distributed as dist

    assert not (dist.is_available() and dist.is_initialized())  # the fixture leaves no process group behind
