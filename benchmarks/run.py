"""Benchmarks: run with `make bench`; results are written to docs/performance.md.

Ratios are measured against plain peft in the same process, alternating the two, because these machines
are noisy; medians of several runs are reported.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import platform
import statistics
import struct
import sys
import tempfile
import time
import tracemalloc
import warnings
from typing import Any

import torch

warnings.filterwarnings("ignore")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The models of the load benchmarks: Llamas from configs with a fixed seed, each with its all-linear adapter.
SIZES: dict[str, dict[str, Any]] = {
    "33M": {
        "hidden": 512,
        "intermediate": 1376,
        "layers": 8,
        "heads": 8,
        "vocab": 8000,
        "dtype": "float32",
        "r": 16,
        "repeats": 15,
    },
    "119M": {
        "hidden": 1024,
        "intermediate": 2752,
        "layers": 8,
        "heads": 16,
        "vocab": 8000,
        "dtype": "float32",
        "r": 64,
        "repeats": 7,
    },
    "1B": {
        "hidden": 2048,
        "intermediate": 5504,
        "layers": 16,
        "heads": 16,
        "vocab": 32000,
        "dtype": "bfloat16",
        "r": 16,
        "repeats": 7,
    },
}


def bench_base(size: str = "33M") -> torch.nn.Module:
    """The Llama of one load benchmark (``SIZES``), fixed seed; the default is the ~33M one (hidden 512, 8 layers,
    vocab 8000)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = SIZES[size]
    config = LlamaConfig(
        hidden_size=spec["hidden"],
        intermediate_size=spec["intermediate"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["heads"],
        vocab_size=spec["vocab"],
    )
    torch.manual_seed(0)
    dtype = getattr(torch, spec["dtype"])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype: a 1B model is never materialised in float32
    try:
        return LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)


def save_bench_adapter(directory: str, size: str = "33M") -> None:
    """The all-linear LoRA of one load benchmark, with non-zero weights, on ``bench_base(size)``."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=SIZES[size]["r"], target_modules="all-linear", init_lora_weights=False)
    get_peft_model(bench_base(size), lora).save_pretrained(directory)


VARIANTS = ("plain", "plain_low_cpu", "safe")


def load_variant(variant: str, model: torch.nn.Module, directory: str) -> Any:
    """One load: plain peft's default route, plain peft's ``low_cpu_mem_usage=True`` route, or safe_load_adapter
    with its defaults."""
    from peft import PeftModel

    from safe_peft import safe_load_adapter

    if variant == "plain":
        return PeftModel.from_pretrained(model, directory)
    if variant == "plain_low_cpu":
        return PeftModel.from_pretrained(model, directory, low_cpu_mem_usage=True)
    return safe_load_adapter(model, directory)


def load_speed(size: str) -> dict[str, Any]:
    """The three variants on one model, alternating (the order rotates every round), a fresh copy of the base for
    each load (copied outside the timing); medians."""
    base = bench_base(size)
    params = sum(p.numel() for p in base.parameters())
    directory = tempfile.mkdtemp(prefix=f"bench_adapter_{size}_")
    save_bench_adapter(directory, size)
    repeats = SIZES[size]["repeats"]
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for variant in VARIANTS:  # warm-up, untimed
        load_variant(variant, copy.deepcopy(base), directory)
    from safe_peft import safe_load_adapter

    route = safe_load_adapter(copy.deepcopy(base), directory, output_loading_info=True)[1].route
    for round_ in range(repeats):
        for i in range(len(VARIANTS)):
            variant = VARIANTS[(round_ + i) % len(VARIANTS)]
            model = copy.deepcopy(base)
            gc.collect()
            start = time.perf_counter()
            loaded = load_variant(variant, model, directory)
            times[variant].append(time.perf_counter() - start)
            del loaded, model
    medians = {v: statistics.median(t) for v, t in times.items()}
    return {
        "size": size,
        "parameters": params,
        "r": SIZES[size]["r"],
        "dtype": SIZES[size]["dtype"],
        "repeats": repeats,
        "route": route,
        **{f"{v}_ms": m * 1e3 for v, m in medians.items()},
        "ratio_default": _round_ratio(times["safe"], times["plain"]),
        "ratio_low_cpu": _round_ratio(times["safe"], times["plain_low_cpu"]),
    }


def fingerprint_cost(size: str = "33M", repeats: int = 11) -> dict[str, Any]:
    """The base fingerprint's check (docs/fingerprint.md) against a whole load: ``safe_load_adapter`` of a stamped
    and of an unstamped copy of the same adapter, alternating, and the check alone (header read, sampled elements
    read, compared); medians."""
    import shutil

    from safe_peft import safe_load_adapter, stamp_adapter
    from safe_peft._files.locate import locate_adapter
    from safe_peft._files.safetensors_header import read_header
    from safe_peft._fingerprint.check import base_check
    from safe_peft._fingerprint.format import KEY

    base = bench_base(size)
    plain = tempfile.mkdtemp(prefix=f"bench_fingerprint_{size}_")
    save_bench_adapter(plain, size)
    stamped = plain + "-stamped"
    shutil.copytree(plain, stamped)
    start = time.perf_counter()
    stamp_adapter(stamped, base)
    stamp_s = time.perf_counter() - start
    files = locate_adapter(stamped)
    metadata = read_header(files.weights_path).metadata
    times: dict[str, list[float]] = {"plain": [], "stamped": [], "check": []}
    for round_ in range(repeats):
        for which in ("plain", "stamped") if round_ % 2 else ("stamped", "plain"):
            model = copy.deepcopy(base)
            gc.collect()
            start = time.perf_counter()
            safe_load_adapter(model, plain if which == "plain" else stamped)
            times[which].append(time.perf_counter() - start)
            del model
        start = time.perf_counter()
        assert not base_check(base, files, metadata).causes
        times["check"].append(time.perf_counter() - start)
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {
        "size": size,
        "stamp_ms": stamp_s * 1e3,
        "stamp_bytes": len(metadata[KEY]),
        **{f"{k}_ms": v * 1e3 for k, v in medians.items()},
        "check_share": medians["check"] / medians["plain"],
        "ratio": _round_ratio(times["stamped"], times["plain"]),
    }


def _round_ratio(ours: list[float], theirs: list[float]) -> float:
    """The median of each round's ratio: a round's loads run back to back, so a slow spell of this noisy machine
    (seconds long, and it moves plain peft's own time by up to 1.7x) falls on both sides of it."""
    return statistics.median(a / b for a, b in zip(ours, theirs, strict=True))


def load_memory(size: str, repeats: int = 3) -> dict[str, Any]:
    """Peak RSS (VmHWM) of a fresh process that builds the model and loads its adapter, per variant; medians."""
    import subprocess

    directory = tempfile.mkdtemp(prefix=f"bench_rss_{size}_")
    save_bench_adapter(directory, size)
    script = os.path.join(ROOT, "benchmarks", "peak_rss.py")
    peaks: dict[str, list[int]] = {v: [] for v in VARIANTS}
    added: dict[str, list[int]] = {v: [] for v in VARIANTS}
    for _ in range(repeats):
        for variant in VARIANTS:
            out = subprocess.run(
                [sys.executable, script, variant, directory, size], capture_output=True, text=True, check=True
            )
            before, after = (int(v) for v in out.stdout.split())
            peaks[variant].append(after)
            added[variant].append(after - before)
    mb = {v: statistics.median(p) / 1024 for v, p in peaks.items()}
    return {
        "size": size,
        **{f"{v}_mb": m for v, m in mb.items()},
        **{f"{v}_added_mb": statistics.median(a) / 1024 for v, a in added.items()},
        "ratio": mb["safe"] / mb["plain"],
    }


def planning(sizes: tuple[int, ...] = (1_000, 10_000, 100_000)) -> dict[str, Any]:
    """remap="auto" planning with all built-in rules: keys saved through torch.compile with the adapter name."""
    from safe_peft._model.view import ExpectedKey
    from safe_peft._plan.remap import plan_remap
    from safe_peft.rules import BUILTIN, model_rules

    out = {}
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for n in sizes:
        expected, checkpoint = {}, {}
        for i in range(n):
            layer, rest = divmod(i, 14)
            module, half = modules[rest // 2], "AB"[rest % 2]
            key = f"base_model.model.model.layers.{layer}.self_attn.{module}.lora_{half}.weight"
            expected[key] = ExpectedKey(key, (16, 64), "", f"lora_{half}")
            saved = key.replace("model.layers", "_orig_mod.model.layers").replace(".weight", ".default.weight")
            checkpoint[saved] = (16, 64)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            plan = plan_remap(checkpoint, expected, BUILTIN + model_rules("model"))
            times.append(time.perf_counter() - start)
        assert plan.exact
        out[str(n)] = statistics.median(times)
    return out


def remapped_memory(repeats: int = 3) -> dict[str, Any]:
    """Peak RSS of a remapped load (keys saved through torch.compile) vs a plain load of the same adapter."""
    import subprocess

    from safetensors.torch import load_file, save_file

    directory = tempfile.mkdtemp(prefix="bench_remap_")
    plain_dir, remap_dir = os.path.join(directory, "plain"), os.path.join(directory, "compiled")
    save_bench_adapter(plain_dir)
    os.makedirs(remap_dir)
    state = load_file(os.path.join(plain_dir, "adapter_model.safetensors"))
    save_file(
        {k.replace("model.layers", "_orig_mod.model.layers"): v for k, v in state.items()},
        os.path.join(remap_dir, "adapter_model.safetensors"),
    )
    import shutil

    shutil.copy(os.path.join(plain_dir, "adapter_config.json"), remap_dir)
    script = os.path.join(ROOT, "benchmarks", "peak_rss.py")
    peaks: dict[str, list[int]] = {"plain": [], "remap": []}
    for _ in range(repeats):
        for mode, path in (("plain", plain_dir), ("remap", remap_dir)):
            out = subprocess.run([sys.executable, script, mode, path], capture_output=True, text=True, check=True)
            peaks[mode].append(int(out.stdout.split()[1]))
    plain, remap = statistics.median(peaks["plain"]), statistics.median(peaks["remap"])
    return {"plain_mb": plain / 1024, "remap_mb": remap / 1024, "ratio": remap / plain}


def cli_check(count: int = 200) -> dict[str, Any]:
    """`safe-peft check` of many small adapters against one config-only base directory."""
    import shutil
    import subprocess

    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tempfile.mkdtemp(prefix="bench_cli_")
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        architectures=["LlamaForCausalLM"],
    )
    config.save_pretrained(os.path.join(root, "base"))
    torch.manual_seed(0)
    first = os.path.join(root, "adapters", "a000")
    get_peft_model(LlamaForCausalLM(config), LoraConfig(r=8, target_modules=["q_proj", "v_proj"])).save_pretrained(
        first
    )
    for i in range(1, count):
        shutil.copytree(first, os.path.join(root, "adapters", f"a{i:03d}"))
    command = os.path.join(os.path.dirname(sys.executable), "safe-peft")

    def timed(*paths: str) -> float:
        start = time.perf_counter()
        subprocess.run(
            [command, "check", *paths, "--base", os.path.join(root, "base"), "--json"], capture_output=True, check=True
        )
        return time.perf_counter() - start

    one = statistics.median(timed(first) for _ in range(3))  # start-up: imports, model build, one adapter
    from contextlib import redirect_stdout
    from io import StringIO

    from safe_peft._cli import main as cli_main

    args = ["check", os.path.join(root, "adapters", "*"), "--base", os.path.join(root, "base"), "--json"]
    with redirect_stdout(StringIO()):
        cli_main(args)  # warm: imports done, as after start-up
        batch = []
        for _ in range(3):
            start = time.perf_counter()
            cli_main(args)
            batch.append(time.perf_counter() - start)
    many = statistics.median(batch)
    start = time.perf_counter()
    subprocess.run([command, "inspect", first], capture_output=True, check=True)
    inspect = time.perf_counter() - start
    return {
        "adapters": count,
        "startup_s": one,
        "total_s": many,
        "per_second": count / many,
        "inspect_s": inspect,
    }


def parse_message(keys: int = 100_000, mismatches: int = 10_000) -> str:
    """A real-shaped torch message with all three sections: ``keys`` missing keys, ``keys`` unexpected keys saved
    through ``torch.compile`` (``_orig_mod.``), and ``mismatches`` size mismatches."""

    def key(i: int) -> str:
        layer, module = divmod(i, 14)
        name = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")[module // 2]
        return f"base_model.model.model.layers.{layer}.self_attn.{name}.lora_{'AB'[module % 2]}.weight"

    missing = ", ".join(f'"{key(i)}"' for i in range(keys))
    unexpected = ", ".join(f'"{key(i).replace("model.model.", "model._orig_mod.model.")}"' for i in range(keys))
    sizes = "".join(  # keys of their own, further down the model: a key is in one section only
        f"\n\tsize mismatch for {key(keys + i)}: copying a param with shape torch.Size([16, 1024]) from checkpoint, "
        "the shape in current model is torch.Size([8, 1024])."
        for i in range(mismatches)
    )
    return (
        "Error(s) in loading state_dict for PeftModelForCausalLM:\n"
        f"\tMissing key(s) in state_dict: {missing}. \n\tUnexpected key(s) in state_dict: {unexpected}. {sizes}"
    )


def parse_speed(keys: int = 100_000, mismatches: int = 10_000, repeats: int = 7) -> dict[str, Any]:
    from safe_peft import parse_load_error

    message = parse_message(keys, mismatches)
    small = parse_message(keys // 10, mismatches // 10)
    times, small_times = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        report = parse_load_error(message)
        times.append(time.perf_counter() - start)
        start = time.perf_counter()
        parse_load_error(small)
        small_times.append(time.perf_counter() - start)
    assert len(report.missing) == keys and len(report.unexpected) == keys
    assert len(report.size_mismatches) == mismatches
    return {
        "keys": keys,
        "mismatches": mismatches,
        "chars": len(message),
        "ms": statistics.median(times) * 1e3,
        "tenth_ms": statistics.median(small_times) * 1e3,
        "code": report.primary.code if report.primary else None,
    }


def diagnose_70b(repeats: int = 5) -> dict[str, Any]:
    """diagnose on a Llama-3-70B-shaped meta model with an all-linear r=16 adapter in a sparse file."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    from safe_peft import diagnose

    config = LlamaConfig(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=128256,
    )
    build = []
    for _ in range(3):
        start = time.perf_counter()
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        build.append(time.perf_counter() - start)
    directory = tempfile.mkdtemp(prefix="bench_70b_")
    header: dict[str, Any] = {}
    offset = 0
    kv = 8192 // 64 * 8
    dims = {
        "self_attn.q_proj": (8192, 8192),
        "self_attn.k_proj": (8192, kv),
        "self_attn.v_proj": (8192, kv),
        "self_attn.o_proj": (8192, 8192),
        "mlp.gate_proj": (8192, 28672),
        "mlp.up_proj": (8192, 28672),
        "mlp.down_proj": (28672, 8192),
    }
    for layer in range(80):
        for name, (fan_in, fan_out) in dims.items():
            stem = f"base_model.model.model.layers.{layer}.{name}"
            for suffix, shape in (("lora_A.weight", [16, fan_in]), ("lora_B.weight", [fan_out, 16])):
                size = shape[0] * shape[1] * 2
                header[f"{stem}.{suffix}"] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
                offset += size
    body = json.dumps(header).encode()
    path = os.path.join(directory, "adapter_model.safetensors")
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(body)) + body)
    os.truncate(path, 8 + len(body) + offset)
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(
            {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": "all-linear", "task_type": "CAUSAL_LM"},
            f,
        )
    report = diagnose(model, directory)
    assert report.ok, str(report)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        diagnose(model, directory)
        times.append(time.perf_counter() - start)
    gc.collect()
    tracemalloc.start()
    diagnose(model, directory)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    start = time.perf_counter()
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    get_peft_model(skeleton, LoraConfig(r=16, target_modules="all-linear"))
    peft_meta = time.perf_counter() - start
    return {
        "tensors": len(header),
        "adapter_bytes": offset,
        "diagnose_s": statistics.median(times),
        "peak_mb": peak / 2**20,
        "meta_build_s": statistics.median(build),
        "get_peft_model_meta_s": peft_meta,
    }


HISTORY = "## Measured when each change landed"


def main() -> None:
    torch.set_num_threads(2)
    sizes = sys.argv[1:] or list(SIZES)
    parse = parse_speed()  # first: a heap churned by the model copies below slows it down
    results: dict[str, Any] = {"parse": parse, "speed": {}, "memory": {}}
    for size in sizes:
        results["speed"][size] = load_speed(size)
        print(json.dumps(results["speed"][size]), flush=True)
        results["memory"][size] = load_memory(size)
        print(json.dumps(results["memory"][size]), flush=True)
    results.update(diagnose=diagnose_70b(), planning=planning(), remap_memory=remapped_memory(), cli=cli_check())
    results["fingerprint"] = fingerprint_cost()
    from routes import routes_overhead  # the other routes, on the 33M model

    results["routes"] = routes_overhead(11)
    page = os.path.join(ROOT, "docs", "performance.md")
    with open(page, encoding="utf-8") as f:  # the hand-written history below the tables is kept as it is
        history = f.read().partition(HISTORY)[2]
    with open(page, "w", encoding="utf-8") as f:
        f.write(render(results).rstrip() + "\n\n" + HISTORY + history)
    json.dump(results, sys.stdout, indent=1)


def fingerprint_row(row: dict[str, Any] | None) -> str:
    """The base fingerprint's row of the "Checking without loading" table."""
    if not row:
        return ""
    return (
        f"| base fingerprint check of a stamped adapter ({row['size']} model, all-linear r=16; stamp "
        f"{row['stamp_bytes']:,} bytes, stamping {row['stamp_ms']:.0f} ms) vs its load (docs/fingerprint.md) | "
        f"**{row['check_ms']:.2f} ms**, {row['check_share'] * 100:.1f}% of a load ({row['plain_ms']:.0f} ms); "
        f"stamped / unstamped load {row['ratio']:.3f}x | a few % of a load |"
    )


def render(results: dict[str, Any]) -> str:
    parse, diag = results["parse"], results["diagnose"]
    plans, remap, cli = results["planning"], results["remap_memory"], results["cli"]
    targets = {"33M": ("<= 1.0x", "<= 1.05x"), "119M": ("<= 0.35x", "<= 1.05x"), "1B": ("<= 0.35x", "<= 1.05x")}
    speed_rows, memory_rows = [], []
    for size, row in results["speed"].items():
        spec = SIZES[size]
        model = (
            f"Llama {row['parameters'] / 1e6:,.0f}M ({spec['dtype']}, hidden {spec['hidden']}, {spec['layers']} layers, "
            f"vocab {spec['vocab']}), all-linear r={row['r']}"
        )
        speed_rows.append(
            f"| {model} | {row['plain_ms']:,.0f} ms | {row['plain_low_cpu_ms']:,.0f} ms | {row['safe_ms']:,.0f} ms "
            f"(`{row.get('route', '?')}`) | "
            f"**{row['ratio_default']:.3f}x** ({targets[size][0]}) | **{row['ratio_low_cpu']:.3f}x** "
            f"({targets[size][1]}) | {row['repeats']} |"
        )
        mem = results["memory"][size]
        memory_rows.append(
            f"| {size} | {mem['plain_mb']:,.0f} MB (+{mem['plain_added_mb']:,.1f}) | {mem['plain_low_cpu_mb']:,.0f} MB "
            f"(+{mem['plain_low_cpu_added_mb']:,.1f}) | {mem['safe_mb']:,.0f} MB (+{mem['safe_added_mb']:,.1f}) | "
            f"**{mem['ratio']:.3f}x** (<= 1.0x) |"
        )
    route_rows = "\n".join(
        f"| {r['route']} | {r['plain_ms']:.1f} ms | {r['safe_ms']:.1f} ms | **{r['ratio']:.3f}x** | "
        f"{r['fastest_ratio']:.3f}x |"
        for r in results.get("routes", [])
    )
    speed = "\n".join(speed_rows)
    memory = "\n".join(memory_rows)
    return f"""# Performance

Produced by `make bench` (`python benchmarks/run.py`) on {platform.machine()}, {os.cpu_count()} cores, Python
{platform.python_version()}, torch {torch.__version__}; {time.strftime("%Y-%m-%d")}. Ratios are against plain peft in the
same process, alternating (the order rotates every round); times are medians, ratios the median of each round's
ratio (a slow spell of this noisy machine falls on both sides of a round); each load gets a fresh copy of the
base, made outside the timing.

## Loading an adapter

`safe_load_adapter` with its defaults against `PeftModel.from_pretrained` with its defaults, and against plain
peft's `low_cpu_mem_usage=True` route. When the plan proves the checkpoint complete and exact, safe_peft can take the
meta route (the adapter is created on the meta device and the checkpoint assigned to it; `LoadReport.route` is
`"meta"`), which plain peft cannot make its default: a key missing from the checkpoint would leave a tensor on meta.
It takes it where it is the faster one: skipping the initialisation saves about 5 ns per adapter element here, and
the per-thread meta device context costs about 0.3 ms per adapted module (every torch call of the injection goes
through it), so from about 64k elements per adapted module (`META_ROUTE_MIN_ELEMENTS_PER_MODULE`); below that it takes
peft's initialising route. On a float16 / bfloat16 base (the 1B model) peft's meta route rounds a float32 adapter to
the base's dtype before upcasting it; safe_peft's copies the file's values in last (one copy of the adapter's tensors), as
peft's default route holds them. The route each safe load took is in brackets.

On either route, for plain LoRA proven exact, safe_peft writes the checkpoint into the adapter itself (a `copy_` per
tensor, or on the meta route a new `Parameter` of the file's tensor) where peft's `set_peft_model_state_dict` walks
the whole model four times (`state_dict()`, `load_state_dict`, `named_modules`, `named_parameters`): on the 119M
model those walks were about a quarter of plain peft's `low_cpu_mem_usage` load (47 of 181 ms, timed by a wrapper).
The model is plain peft's, tensor for tensor (`tests/test_assign.py`).

On peft 0.21 the random initialisation is a small part of a load (on the 33M model plain peft's `low_cpu_mem_usage`
route is no faster than its default), so the targets set against an older peft's default route (0.35x) cannot come
from the route alone: most of a load is peft's injection itself, which both routes pay.

| model and adapter | plain peft | plain peft, `low_cpu_mem_usage=True` | safe_load_adapter | vs plain default (target) | vs plain `low_cpu_mem_usage` (target) | rounds |
|---|---|---|---|---|---|---|
{speed}

Peak resident memory (VmHWM) of a fresh process that builds the model and loads its adapter, median of 3; in
brackets what the load itself added:

| model | plain peft | plain peft, `low_cpu_mem_usage=True` | safe_load_adapter | vs plain default (target) |
|---|---|---|---|---|
{memory}

What the checks cost on top of peft's own work: reading the config and safetensors header once, computing the
expected keys with peft's matching, the structural snapshot for undo (references, no tensor copies), and after loading
one fused pass over the adapter tensors (finite values, all-zero `lora_B`) plus the key verification.

## Checking without loading

| benchmark | result | target |
|---|---|---|
| `parse_load_error`, real-shaped message with all three sections: {parse["keys"]:,} missing, {parse["keys"]:,} unexpected (`_orig_mod.`), {parse["mismatches"]:,} size mismatches ({parse["chars"] / 1e6:.1f} MB) | **{parse["ms"]:.0f} ms** (a tenth of it: {parse["tenth_ms"]:.1f} ms) | < 100 ms, linear |
| `diagnose`, Llama-3-70B shape on meta, all-linear r=16 ({diag["tensors"]} tensors, {diag["adapter_bytes"] / 2**20:.0f} MB sparse file) | **{diag["diagnose_s"] * 1e3:.0f} ms**, {diag["peak_mb"]:.1f} MB peak Python allocations | < 250 ms, < 100 MB |
| ... building that meta model with transformers (the floor a user pays first) | {diag["meta_build_s"] * 1e3:.0f} ms | |
| ... `get_peft_model` on the same meta model (what a user would try) | {diag["get_peft_model_meta_s"] * 1e3:.0f} ms | |
| `remap="auto"` planning, all built-in rules, keys with `_orig_mod.` and the adapter name | 1k keys {plans["1000"] * 1e3:.1f} ms, 10k {plans["10000"] * 1e3:.0f} ms, **100k {plans["100000"] * 1e3:.0f} ms** | < 500 ms at 100k, linear |
| peak RSS of a remapped load vs a plain load of the same adapter (separate processes, median of 3) | plain {remap["plain_mb"]:.0f} MB, remapped {remap["remap_mb"]:.0f} MB: **{remap["ratio"]:.3f}x** | <= 1.05x |
| `safe-peft check` of {cli["adapters"]} small adapters against one config-only base directory | start-up with one adapter {cli["startup_s"]:.2f} s (a fresh process); the batch of {cli["adapters"]} after start-up {cli["total_s"]:.2f} s: **{cli["per_second"]:.0f} adapters/s** | >= 50/s |
| `safe-peft inspect` (imports no torch) | **{cli["inspect_s"] * 1e3:.0f} ms** | < 300 ms |
{fingerprint_row(results.get("fingerprint"))}

## The other routes

Success-path time of each route against the plain call it stands for (`benchmarks/routes.py`, the 33M model and
adapter, 11 rounds, alternating; the ratio is the median of each round's safe / plain, the times are medians, the last
column compares each side's fastest run). The target is the bound `safe_load_adapter` is held to (<= 1.10x). A reload
(`replace="weights"`) and a hot-swap of the same shapes copy into the loaded adapter's tensors (`"in_place"`), with
only what they write recorded for the undo (those tensors, the scalings, the train / eval flags); a further adapter and
transformers' route inject new layers, so they record the whole model first and verify after. The checks of a further
adapter cost about 15 ms on this model's 673-module PeftModel (each part timed by a wrapper inside the load, median
of 21: the plan 5.3 ms, the whole-model record 4.6 ms, the verification 4.9 ms, the temporary directory with the
checked config 0.9 ms). For plain LoRA they are paid back: safe_peft does peft's `load_adapter` steps itself
(`safe_peft._load.assign`: peft's config read, checks and `add_adapter`, then the checkpoint written without peft's four
walks of the whole model, about 35 ms of a plain call here), so the further adapter is faster than plain peft.

| route | plain (median) | safe (median) | ratio (median of the rounds) | ratio of the fastest runs |
|---|---|---|---|---|
{route_rows}
"""


if __name__ == "__main__":
    main()
