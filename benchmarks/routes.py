"""Success-path overhead of every route into a model, against the plain call it stands for.

Run with `python benchmarks/routes.py [repeats]`. Same model and adapters as benchmarks/run.py's load benchmark (a
~33M Llama, all-linear r=16), plain and safe alternating, medians reported; each load gets a fresh copy of its
model (copied outside the timing). The ratio is the median of each round's safe / plain (the two calls of a round run
back to back, so a slow spell of the machine falls on both); the bound is the one safe_load_adapter is held to:
<= 1.10x.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

from run import bench_base, save_bench_adapter  # noqa: E402


def _time(make: Callable[[], Any], load: Callable[[Any], Any]) -> float:
    model = make()
    start = time.perf_counter()
    load(model)
    return time.perf_counter() - start


def _pair(
    name: str, make: Callable[[], Any], plain: Callable[[Any], Any], safe: Callable[[Any], Any], repeats: int
) -> dict[str, Any]:
    _time(make, plain)  # warm up both paths
    _time(make, safe)
    plains, safes = [], []
    for _ in range(repeats):
        plains.append(_time(make, plain))
        safes.append(_time(make, safe))
    p, s = statistics.median(plains), statistics.median(safes)
    return {
        "route": name,
        "plain_ms": p * 1e3,
        "safe_ms": s * 1e3,
        "ratio": statistics.median(b / a for a, b in zip(plains, safes, strict=True)),
        "fastest_ratio": min(safes) / min(plains),
        "repeats": repeats,
    }


def routes_overhead(repeats: int = 9) -> list[dict[str, Any]]:
    """Each route's safe call against its plain counterpart, on the benchmark model and adapter."""
    from peft import AutoPeftModelForCausalLM, PeftModel
    from peft.utils.hotswap import hotswap_adapter

    import safe_peft

    root = tempfile.mkdtemp(prefix="bench_routes_")
    first, second = os.path.join(root, "first"), os.path.join(root, "second")
    save_bench_adapter(first)
    torch.manual_seed(1)
    save_bench_adapter(second)  # the same layout, other weights
    base = bench_base()
    base.save_pretrained(os.path.join(root, "base"))
    auto = os.path.join(root, "auto")
    shutil.copytree(first, auto)
    config_path = os.path.join(auto, "adapter_config.json")
    with open(config_path) as f:
        config = json.load(f)
    config.update(base_model_name_or_path=os.path.join(root, "base"), task_type="CAUSAL_LM")
    with open(config_path, "w") as f:
        json.dump(config, f)
    carrying = PeftModel.from_pretrained(copy.deepcopy(base), first)

    def peft_copy() -> Any:
        return copy.deepcopy(carrying)

    def base_copy() -> Any:
        return copy.deepcopy(base)

    results = [
        _pair(
            "further adapter: safe_load_adapter(peft_model, path, 'b') vs peft_model.load_adapter(path, 'b')",
            peft_copy,
            lambda m: m.load_adapter(second, "b"),
            lambda m: safe_peft.safe_load_adapter(m, second, "b"),
            repeats,
        ),
        _pair(
            "reload: replace='weights' vs load_adapter(path, 'default') (the Trainer's resume)",
            peft_copy,
            lambda m: m.load_adapter(second, "default"),
            lambda m: safe_peft.safe_load_adapter(m, second, "default", replace="weights"),
            repeats,
        ),
        _pair(
            "transformers' route: safe_load_adapter_inplace(model, path) vs model.load_adapter(path)",
            base_copy,
            lambda m: m.load_adapter(first),
            lambda m: safe_peft.safe_load_adapter_inplace(m, first),
            repeats,
        ),
        _pair(
            "hot-swap: safe_hotswap_adapter vs peft.utils.hotswap.hotswap_adapter",
            peft_copy,
            lambda m: hotswap_adapter(m, second, "default", torch_device="cpu"),
            lambda m: safe_peft.safe_hotswap_adapter(m, second, "default", torch_device="cpu"),
            repeats,
        ),
        _pair(
            "Auto: safe_peft.from_pretrained(path) vs AutoPeftModelForCausalLM.from_pretrained(path) (base read)",
            lambda: None,
            lambda _: AutoPeftModelForCausalLM.from_pretrained(auto),
            lambda _: safe_peft.from_pretrained(auto),
            repeats,  # as many rounds as the others: three left the median of round ratios to one slow spell
        ),
        _pair(
            "the switch: PeftModel.from_pretrained inside patched() vs plain",
            base_copy,
            lambda m: PeftModel.from_pretrained(m, first),
            lambda m: _patched(lambda: PeftModel.from_pretrained(m, first)),
            repeats,
        ),
        _pair(
            "the switch installed by another thread: a plain call here, wrapped vs not",
            base_copy,
            lambda m: PeftModel.from_pretrained(m, first),
            lambda m: _installed_elsewhere(lambda: PeftModel.from_pretrained(m, first)),
            repeats,
        ),
    ]
    shutil.rmtree(root, ignore_errors=True)
    return results


def _patched(call: Callable[[], Any]) -> Any:
    import safe_peft

    with safe_peft.patched():
        return call()


def _installed_elsewhere(call: Callable[[], Any]) -> Any:
    """The wrappers are installed (as while another thread is inside patched()), this context is not switched."""
    import safe_peft._routes.switch as switch

    with switch._LOCK:
        switch._HOLDERS += 1
        switch._install()
    try:
        return call()
    finally:
        with switch._LOCK:
            switch._HOLDERS -= 1
            switch._uninstall()


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 9
    for row in routes_overhead(repeats):
        print(
            f"{row['ratio']:.3f}x (fastest {row['fastest_ratio']:.3f}x)  plain {row['plain_ms']:7.1f} ms  safe {row['safe_ms']:7.1f} ms  {row['route']}"
        )


if __name__ == "__main__":
    main()
