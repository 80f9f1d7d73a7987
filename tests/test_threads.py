"""No call changes process-global state, so loads and diagnoses in threads give the single-thread results.

The hazards this guards against (issue 16): peft's ``low_cpu_mem_usage`` patches ``nn.Module.register_parameter``
for the whole process while it injects (a load in another thread then gets meta tensors, and two overlapping
patches can leave it patched for good), and ``warnings.catch_warnings()`` swaps ``warnings.filters`` process-wide.
8 threads x 50 calls each on tiny models (about 10 s).
"""

from __future__ import annotations

import copy
import gc
import random
import threading
import warnings
from typing import Any

import pytest
import torch
import torch.utils._device
from peft import IA3Config, LoHaConfig, get_peft_model

from safe_peft import AdapterLoadError, diagnose, safe_load_adapter
from tests.support.helpers import build, derive, outputs

THREADS = 8
CALLS = 50


def process_state() -> dict[str, Any]:
    """The process-global things a load or a diagnosis could change: torch's module-registration and factory
    functions, the default device and dtype, the warnings machinery, the cyclic GC."""
    from torch import nn

    names = ["register_parameter", "register_buffer", "register_module", "__setattr__", "__getattr__", "to"]
    factories = ["empty", "zeros", "ones", "full", "randn", "rand", "tensor", "empty_like", "zeros_like"]
    return {
        **{f"nn.Module.{n}": getattr(nn.Module, n) for n in names},
        **{f"torch.{n}": getattr(torch, n) for n in factories},
        **{f"nn.init.{n}": getattr(nn.init, n) for n in ("kaiming_uniform_", "normal_", "zeros_", "uniform_")},
        "nn.Parameter.__new__": nn.Parameter.__new__,
        "default_dtype": torch.get_default_dtype(),
        "default_device": torch.get_default_device(),
        "torch.utils._device.CURRENT_DEVICE": torch.utils._device.CURRENT_DEVICE,  # set by `with torch.device()`
        "function_modes": torch._C._len_torch_function_stack(),
        "warnings.filters": list(warnings.filters),
        "warnings.showwarning": warnings.showwarning,
        "warnings.warn": warnings.warn,
        "gc": gc.isenabled(),
    }


@pytest.fixture(scope="module")
def corpus(adapters: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Good and bad adapters on both ways of computing the expected keys (analytic LoRA, peft's injection)."""
    root = tmp_path_factory.mktemp("threads")
    good, trained = adapters["causal"]
    made: dict[str, Any] = {"good": (good, trained)}
    made["rank4"] = (derive(good, str(root / "rank4"), config=lambda c: c.update(r=4)), None)
    made["hostile"] = (derive(good, str(root / "hostile"), config=lambda c: c.update(target_modules=12345)), None)
    for name, config in {
        "ia3": IA3Config(target_modules=["q_proj", "v_proj"], feedforward_modules=[], task_type="CAUSAL_LM"),
        "loha": LoHaConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    }.items():
        torch.manual_seed(3)
        model = get_peft_model(build("causal"), config)
        with torch.no_grad():
            for _, param in model.named_parameters():
                if param.requires_grad:
                    param.add_(torch.randn_like(param) * 0.05)
        directory = str(root / name)
        model.eval().save_pretrained(directory)
        made[name] = (directory, outputs(model))
    made["loha_wide"] = (made["loha"][0], None)  # the injection path refusing a wider base
    return made


def _operations(corpus: dict[str, Any]) -> list[tuple[str, str]]:
    kinds = [("diagnose", name) for name in ("good", "rank4", "hostile", "ia3", "loha", "loha_wide")]
    kinds += [("load", name) for name in ("good", "rank4", "hostile", "ia3", "loha")]
    return kinds


def _run(op: tuple[str, str], corpus: dict[str, Any], bases: dict[str, torch.nn.Module]) -> Any:
    """One call; its result as plain data (codes, outputs), comparable across runs."""
    kind, name = op
    directory, _ = corpus[name]
    base = bases["wide"] if name == "loha_wide" else bases["base"]
    if kind == "diagnose":
        report = diagnose(base, directory)
        return report.ok, [d.code for d in report.causes], len(report.missing), len(report.unexpected)
    copy_ = copy.deepcopy(base)
    before = {k: v.clone() for k, v in copy_.state_dict().items()}
    try:
        model = safe_load_adapter(copy_, directory)
    except AdapterLoadError as exc:
        after = copy_.state_dict()
        unchanged = before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
        on_meta = any(t.device.type == "meta" for t in after.values())
        return "refused", [d.code for d in exc.report.causes], unchanged, on_meta
    tensors = dict(model.named_parameters())
    meta_keys = [k for k, t in tensors.items() if t.device.type == "meta"]
    return "loaded", meta_keys, outputs(model)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b)


def test_concurrent_loads_and_diagnoses_match_one_thread(corpus: dict[str, Any]) -> None:
    bases = {"base": build("causal"), "wide": build("causal", hidden_size=128, intermediate_size=256)}
    ops = _operations(corpus)
    expected = {op: _run(op, corpus, bases) for op in ops}  # one thread first: the reference
    assert expected[("load", "good")][0] == "loaded" and expected[("load", "good")][1] == []
    assert torch.allclose(expected[("load", "good")][2], corpus["good"][1], atol=1e-5)
    assert expected[("load", "ia3")][0] == "loaded" and torch.allclose(expected[("load", "ia3")][2], corpus["ia3"][1])
    assert expected[("diagnose", "loha_wide")][0] is False
    assert expected[("load", "rank4")][:3] == ("refused", ["rank_mismatch"], True)
    assert expected[("diagnose", "hostile")][1] == ["invalid_config_value"]
    before = process_state()
    failures: list[str] = []
    start = threading.Barrier(THREADS)

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        plan = [rng.choice(ops) for _ in range(CALLS)]
        start.wait()
        for op in plan:
            try:
                got = _run(op, corpus, bases)
            except BaseException as exc:  # a thread must report, never die silently
                failures.append(f"{op}: raised {type(exc).__name__}: {exc}")
                continue
            if not _same(got, expected[op]):
                failures.append(f"{op}: {got!r:.300} != {expected[op]!r:.300}")

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures[:5]
    after = process_state()
    assert {k: v for k, v in after.items() if v != before[k]} == {}
    assert torch.nn.Linear(4, 4).weight.device.type == "cpu"  # nothing left patched onto meta


@pytest.mark.parametrize("name", ["ia3", "loha", "good"])
def test_a_diagnosis_changes_no_process_state(name: str, corpus: dict[str, Any]) -> None:
    """Each call alone, too: the injection path included (ia3, loha), warnings filters untouched."""
    base = build("causal")
    before = process_state()
    report = diagnose(base, corpus[name][0])
    assert report.ok
    assert process_state() == before


def test_meta_construction_elsewhere_does_not_reach_this_thread(corpus: dict[str, Any]) -> None:
    """While another thread builds peft layers on meta (diagnose's injection), tensors made here stay real."""
    stop = threading.Event()
    seen: list[str] = []

    def build_here() -> None:
        while not stop.is_set():
            seen.append(torch.nn.Linear(8, 8).weight.device.type)

    thread = threading.Thread(target=build_here)
    thread.start()
    try:
        for _ in range(3):
            assert diagnose(build("causal"), corpus["loha"][0]).ok
    finally:
        stop.set()
        thread.join()
    assert seen and set(seen) == {"cpu"}


def _warned(call: Any) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return sorted(f"{w.category.__name__}: {w.message}" for w in caught)


@pytest.mark.parametrize("name", ["good", "ia3", "loha"])
def test_a_load_warns_exactly_as_plain_peft(name: str, corpus: dict[str, Any]) -> None:
    """Quietly: the injection on the meta copy adds no notice of its own (every warning shown, none filtered),
    for a fresh base and for one that already carries peft's `peft_config` (a model peft wrapped before)."""
    from peft import PeftModel

    directory = corpus[name][0]
    assert _warned(lambda: safe_load_adapter(build("causal"), directory)) == _warned(
        lambda: PeftModel.from_pretrained(build("causal"), directory)
    )
    wrapped = build("causal")
    PeftModel.from_pretrained(wrapped, corpus["good"][0])
    assert "peft_config" in wrapped.__dict__
    assert _warned(lambda: diagnose(wrapped, directory)) == []
