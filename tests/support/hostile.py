"""The hostile-input battery (issue 16): real adapter directories, each damaged the way an attacker or an unlucky
user would, run through ``diagnose``, ``safe_load_adapter`` and ``safe-peft check --json``.

Two steps, each its own process (``tests/test_hostile.py`` runs them): ``make ROOT`` writes every case's files (a
2 GB sparse config, 100k-tensor headers, ...), so that building them costs the measured process nothing; ``run ROOT
OUT`` measures: a clean run of a good adapter first (its peak resident memory, VmHWM, is the baseline), then each
case with the wall time of each call, the codes each gives, whether anything raised that is not safe-peft's own
error, whether the JSON is strict, and the peak memory after it.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import shutil
import struct
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

HUGE = 10_000_000  # a 10 MB value
STRESS = bool(os.environ.get("SAFE_PEFT_STRESS"))


@dataclass(frozen=True)
class Case:
    """One damaged adapter. ``code`` is the primary code every route reports (None: it loads); ``kwargs`` go to
    diagnose and the load (the command line has no option for them: ``cli`` False); ``hide`` names modules made
    unimportable for the case (a missing optional dependency)."""

    name: str
    make: Callable[[str, str], str]
    code: str | None
    kwargs: dict[str, Any] = field(default_factory=dict)
    cli: bool = True
    hide: tuple[str, ...] = ()


# -- building blocks ------------------------------------------------------------------------------------------------


def _copy(good: str, directory: str) -> str:
    shutil.copytree(good, directory)
    return directory


def _config(change: Callable[[dict[str, Any]], None], *, raw: bool = False) -> Callable[[str, str], str]:
    """A case whose adapter_config.json is the good one changed (``raw``: ``change`` writes the text itself)."""

    def make(good: str, directory: str) -> str:
        _copy(good, directory)
        path = os.path.join(directory, "adapter_config.json")
        with open(path) as f:
            data = json.load(f)
        if raw:
            change({"path": path, "data": data})
        else:
            change(data)
            with open(path, "w") as f:
                json.dump(data, f)  # allow_nan: NaN / Infinity are written as Python's json writes them
        return directory

    return make


def _set(**values: Any) -> Callable[[str, str], str]:
    return _config(lambda c: c.update(values))


def _drop(key: str) -> Callable[[str, str], str]:
    return _config(lambda c: c.pop(key))


def _text(text: Callable[[dict[str, Any]], str]) -> Callable[[str, str], str]:
    def write(ctx: dict[str, Any]) -> None:
        with open(ctx["path"], "w") as f:
            f.write(text(ctx["data"]))

    return _config(write, raw=True)


def _json_with(key: str, literal: str) -> Callable[[str, str], str]:
    """The config with ``key`` set to a JSON literal written as is (``NaN``, ``1e999``, a 5,000-digit int)."""

    def text(data: dict[str, Any]) -> str:
        data = {**data, key: "__LITERAL__"}
        return json.dumps(data).replace('"__LITERAL__"', literal)

    return _text(text)


def _sparse_config(size: int) -> Callable[[str, str], str]:
    def make(good: str, directory: str) -> str:
        _copy(good, directory)
        with open(os.path.join(directory, "adapter_config.json"), "r+b") as f:
            f.seek(0, os.SEEK_END)
            f.truncate(size)  # a hole: no disk, but a 2 GB file to anyone reading it whole
        return directory

    return make


def _padded_config(size: int) -> Callable[[str, str], str]:
    def text(data: dict[str, Any]) -> str:
        body = json.dumps(data)
        return body[:-1] + " " * size + "}"

    return _text(text)


_SPECIAL = {"dev_zero": "/dev/zero", "kmsg": "/proc/kmsg"}


def _kmsg_code(readable: str, unreadable: str) -> str:
    """/proc/kmsg is a regular file that says it is empty and blocks a reader (root may open it); a container may
    mask it with a device instead."""
    if not os.path.isfile("/proc/kmsg"):
        return "missing_config" if readable == "bad_config_json" else "missing_weights"
    return readable if os.access("/proc/kmsg", os.R_OK) else unreadable


def _special(kind: str) -> Callable[[str, str], str]:
    """adapter_config.json replaced by a FIFO, or by a link to /dev/zero or /proc/kmsg (reading blocks or never
    ends)."""

    def make(good: str, directory: str) -> str:
        _copy(good, directory)
        path = os.path.join(directory, "adapter_config.json")
        os.remove(path)
        if kind == "fifo":
            os.mkfifo(path)
        else:
            os.symlink(_SPECIAL[kind], path)
        return directory

    return make


def _header(
    entries: Callable[[], Iterator[tuple[str, Any]]] | None = None,
    *,
    raw: bytes | None = None,
    data: bytes = b"",
    length: int | None = None,
) -> Callable[[str, str], str]:
    """A case whose adapter_model.safetensors has the given header (entries streamed, or raw bytes)."""

    def make(good: str, directory: str) -> str:
        _copy(good, directory)
        if raw is not None:
            body = raw
        else:
            assert entries is not None
            body = ("{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in entries()) + "}").encode()
        with open(os.path.join(directory, "adapter_model.safetensors"), "wb") as f:
            f.write(struct.pack("<Q", len(body) if length is None else length) + body + data)
        return directory

    return make


def _tiny(count: int, *, names: bool, start: int = 0) -> Callable[[], Iterator[tuple[str, Any]]]:
    """``count`` LoRA entries of 2 bytes each: per layer (``names=False``) or per distinct module (True)."""

    def entries() -> Iterator[tuple[str, Any]]:
        position = 0
        for i in range(start, start + count // 2):
            for part in ("lora_A", "lora_B"):
                module = f"layers.0.self_attn.m{i}" if names else f"layers.{i}.self_attn.q_proj"
                yield (
                    f"base_model.model.model.{module}.{part}.weight",
                    {
                        "dtype": "F16",
                        "shape": [1, 1],
                        "data_offsets": [position, position + 2],
                    },
                )
                position += 2

    return entries


def _tiny_header(count: int, names: bool) -> Callable[[str, str], str]:
    return _header(_tiny(count, names=names), data=b"\0" * (count // 2 * 4))


def _many_empty(count: int) -> Callable[[], Iterator[tuple[str, Any]]]:
    def entries() -> Iterator[tuple[str, Any]]:
        for i in range(count):
            yield f"a{i}", {"dtype": "F16", "shape": [0], "data_offsets": [0, 0]}

    return entries


def _one(name: str, shape: list[Any], dtype: str = "F16", offsets: list[Any] | None = None) -> Any:
    def entries() -> Iterator[tuple[str, Any]]:
        yield name, {"dtype": dtype, "shape": shape, "data_offsets": offsets or [0, 2]}

    return entries


def _weights(change: str) -> Callable[[str, str], str]:
    def make(good: str, directory: str) -> str:
        _copy(good, directory)
        path = os.path.join(directory, "adapter_model.safetensors")
        if change == "missing":
            os.remove(path)
        elif change == "directory":
            os.remove(path)
            os.mkdir(path)
        elif change == "pickle":
            os.remove(path)
            with open(os.path.join(directory, "adapter_model.bin"), "wb") as f:
                f.write(b"\x80\x04K\x01.")
        elif change == "fifo":  # a plain open() of a FIFO with no writer blocks forever
            os.remove(path)
            os.mkfifo(path)
        elif change in _SPECIAL:
            os.remove(path)
            os.symlink(_SPECIAL[change], path)
        return directory

    return make


def _renamed_keys_with_huge_base(good: str, directory: str) -> str:
    from tests.support.helpers import derive

    derive(
        good,
        directory,
        keys=lambda k: k.replace("q_proj", "zz_proj"),
        config=lambda c: c.update(base_model_name_or_path="m" * HUGE),
    )
    return directory


def _huge_key(good: str, directory: str) -> str:
    from tests.support.helpers import derive

    return derive(good, directory, keys=lambda k: k.replace("layers.0.", "layers.0." + "x" * 1_000_000 + ".", 1))


CATASTROPHIC = "(.+)+Z"
QV = {"target_modules": ["q_proj", "v_proj"]}


CASES: list[Case] = [
    Case("control_good", _copy, None),
    Case("control_extra_harmless_key", _set(peft_version="0.99.0", revision="abc"), None),
    # -- target_modules / exclude_modules -------------------------------------------------------------------------
    Case("target_modules_int", _set(target_modules=12345), "invalid_config_value"),
    Case("target_modules_unterminated_class", _set(target_modules="["), "invalid_config_value"),
    Case("target_modules_catastrophic", _set(target_modules=CATASTROPHIC), "catastrophic_pattern"),
    # nested repetition, but fast on this model's names (none is made of a's): tried, accepted, matches nothing
    Case("target_modules_nested_star_fast_here", _set(target_modules="(a*)*b"), "target_modules_not_found"),
    Case("target_modules_nested_star_slow", _set(target_modules="(a*)*b|model(.*)*x"), "catastrophic_pattern"),
    Case("target_modules_10mb_string", _set(target_modules="a" * HUGE), "config_limit_exceeded"),
    Case("target_modules_list_of_ints", _set(target_modules=[123]), "invalid_config_value"),
    Case("target_modules_dict", _set(target_modules={"q_proj": 1}), "invalid_config_value"),
    Case("target_modules_20k_entries", _set(target_modules=[f"m{i}" for i in range(20_000)]), "config_limit_exceeded"),
    Case("target_modules_missing", _drop("target_modules"), None),  # peft's defaults for llama: q_proj, v_proj
    Case("target_modules_regex_real", _set(target_modules=r".*\.(q_proj|v_proj)"), None),
    Case("target_modules_regex_layers", _set(target_modules=r"model\.layers\.\d+\.self_attn\.(q|v)_proj"), None),
    Case("target_modules_regex_optional_prefix", _set(target_modules=r"(.*\.)?(q|v)_proj"), None),
    Case("target_modules_risky_but_fast", _set(target_modules=r"(.*\.)*(q|v)_proj"), None),
    Case("exclude_modules_catastrophic", _set(exclude_modules=CATASTROPHIC), "catastrophic_pattern"),
    Case("exclude_modules_bad_regex", _set(exclude_modules="(unclosed"), "invalid_config_value"),
    Case("exclude_modules_int", _set(exclude_modules=7), "invalid_config_value"),
    # -- rank_pattern / alpha_pattern -----------------------------------------------------------------------------
    Case("rank_pattern_catastrophic", _set(rank_pattern={CATASTROPHIC: 4}), "catastrophic_pattern"),
    Case(
        "rank_pattern_100k_keys", _set(rank_pattern={f"layer{i}": 4 for i in range(100_000)}), "config_limit_exceeded"
    ),
    Case("rank_pattern_5k_keys_fine", _set(rank_pattern={f"model.layers.{i}.mlp": 4 for i in range(2, 5_002)}), None),
    Case("rank_pattern_value_str", _set(rank_pattern={"q_proj": "x"}), "invalid_config_value"),
    Case("rank_pattern_value_zero", _set(rank_pattern={"q_proj": 0}), "invalid_config_value"),
    Case("rank_pattern_not_a_map", _set(rank_pattern="q_proj"), "invalid_config_value"),
    Case("rank_pattern_key_too_long", _set(rank_pattern={"q" * 20_000: 8}), "config_limit_exceeded"),
    Case("alpha_pattern_catastrophic", _set(alpha_pattern={"((.)+)+Z": 4}), "catastrophic_pattern"),
    Case("alpha_pattern_value_str", _set(alpha_pattern={"q_proj": "x"}), "invalid_config_value"),
    Case("alpha_pattern_bad_regex", _set(alpha_pattern={"[": 4}), "invalid_config_value"),
    # -- modules_to_save / layers ---------------------------------------------------------------------------------
    Case("modules_to_save_int_entry", _set(modules_to_save=[123]), "invalid_config_value"),
    Case("modules_to_save_string", _set(modules_to_save="lm_head"), "invalid_config_value"),
    Case("modules_to_save_catastrophic", _set(modules_to_save=[CATASTROPHIC]), "catastrophic_pattern"),
    Case("layers_to_transform_str", _set(layers_to_transform="x"), "invalid_config_value"),
    Case("layers_to_transform_mixed", _set(layers_to_transform=[0, "1"]), "invalid_config_value"),
    Case("layers_pattern_int", _set(layers_to_transform=[0], layers_pattern=5), "invalid_config_value"),
    Case(
        "layers_pattern_catastrophic",
        _set(layers_to_transform=[0], layers_pattern=CATASTROPHIC),
        "catastrophic_pattern",
    ),
    Case("layer_replication_20k", _set(layer_replication=[[0, 1]] * 20_000), "config_limit_exceeded"),
    Case("layer_replication_5000_layers", _set(layer_replication=[[0, 2]] * 2_500), "config_limit_exceeded"),
    Case("layer_replication_bad_pair", _set(layer_replication=[[0, "x"]]), "invalid_config_value"),
    # -- numbers --------------------------------------------------------------------------------------------------
    Case("r_missing_defaults_to_8", _drop("r"), None),  # peft's default r=8 is the weights' rank
    Case("r_null", _set(r=None), "invalid_config_value"),
    Case("r_zero", _set(r=0), "invalid_config_value"),
    Case("r_negative", _set(r=-3), "invalid_config_value"),
    Case("r_string", _set(r="8"), "invalid_config_value"),
    Case("r_float", _set(r=8.0), "invalid_config_value"),
    Case("r_nan", _json_with("r", "NaN"), "invalid_config_value"),
    Case("r_infinity", _json_with("r", "Infinity"), "invalid_config_value"),
    Case("r_overflowing_float", _json_with("r", "1e999"), "invalid_config_value"),
    Case("r_5000_digits", _json_with("r", "9" * 5_000), "bad_config_json"),
    Case("lora_alpha_string", _set(lora_alpha="x"), "invalid_config_value"),
    Case("lora_alpha_nan", _json_with("lora_alpha", "NaN"), "invalid_config_value"),
    Case("lora_alpha_minus_infinity", _json_with("lora_alpha", "-Infinity"), "invalid_config_value"),
    Case("lora_alpha_null", _set(lora_alpha=None), "invalid_config_value"),
    Case("lora_dropout_2", _set(lora_dropout=2.0), "invalid_config_value"),
    Case("lora_dropout_string", _set(lora_dropout="0.1"), "invalid_config_value"),
    Case("nested_nan", _json_with("loftq_config", '{"loftq_bits": NaN}'), "invalid_config_value"),
    # -- other settings -------------------------------------------------------------------------------------------
    Case("bias_unknown", _set(bias="sometimes"), "invalid_config_value"),
    Case("init_corda_unprepared", _set(init_lora_weights="corda"), "invalid_config_value"),
    Case(
        "init_loftq_without_scipy",
        _set(init_lora_weights="loftq", loftq_config={"loftq_bits": 4}),
        "config_needs_package",
        hide=("scipy",),
    ),
    Case("init_loftq_without_config", _set(init_lora_weights="loftq"), "invalid_config"),
    Case("init_int", _set(init_lora_weights=5), "invalid_config_value"),
    Case("init_pissa_niter_x", _set(init_lora_weights="pissa_niter_x"), "invalid_config_value"),
    Case("init_gaussian_fine", _set(init_lora_weights="gaussian"), None),
    Case("init_pissa_niter_huge", _set(init_lora_weights="pissa_niter_100000000"), "config_limit_exceeded"),
    Case(
        "init_loftq_iter_huge",
        _set(init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 10**9}),
        "config_limit_exceeded",
    ),
    Case("loftq_iter_huge_unused_fine", _set(loftq_config={"loftq_bits": 4, "loftq_iter": 10**9}), None),
    Case("peft_version_10mb", _set(peft_version="1" * HUGE), None),
    Case("base_name_10mb_in_a_failure", _renamed_keys_with_huge_base, "unknown_modules"),
    Case("peft_type_unknown", _set(peft_type="NOPE"), "unknown_peft_type"),
    Case("peft_type_missing", _drop("peft_type"), "config_missing_peft_type"),
    Case("peft_type_10mb", _set(peft_type="P" * HUGE), "unknown_peft_type"),
    # -- the config file itself -----------------------------------------------------------------------------------
    Case("config_sparse_2gb", _sparse_config(2 * 1024**3), "config_too_large"),
    Case("config_17mb", _padded_config(17 * 1024 * 1024), "config_too_large"),
    Case("config_not_json", _text(lambda _: "{'r': 8"), "bad_config_json"),
    Case("config_array", _text(lambda _: "[1, 2]"), "bad_config_json"),
    Case("config_nested_200k", _text(lambda _: "[" * 200_000 + "]" * 200_000), "bad_config_json"),
    Case("config_fifo", _special("fifo"), "missing_config"),
    Case("config_link_to_dev_zero", _special("dev_zero"), "missing_config"),
    Case("config_link_to_proc_kmsg", _special("kmsg"), _kmsg_code("bad_config_json", "unreadable_config")),
    # -- the weights file -----------------------------------------------------------------------------------------
    Case("header_50k_tensors_layers", _tiny_header(50_000, names=False), "fewer_layers"),
    Case("header_50k_tensors_modules", _tiny_header(50_000, names=True), "unknown_modules"),
    Case("header_1_1m_tensors", _header(_many_empty(1_100_000)), "too_many_tensors"),
    Case("header_million_dims", _header(_one("x.lora_A.weight", [1] * 1_000_000)), "bad_shape"),
    Case("header_million_dims_absurd", _header(_one("x.lora_A.weight", [7] * 1_000_000, offsets=[0, 0])), "bad_shape"),
    Case("header_huge_numel", _header(_one("x.lora_A.weight", [2**62, 2**62], offsets=[0, 2])), "bad_offsets"),
    Case("header_key_of_1mb", _huge_key, "unknown_modules"),
    Case(
        "header_nan_shape",
        _header(raw=b'{"x":{"dtype":"F16","shape":[NaN],"data_offsets":[0,2]}}', data=b"\0\0"),
        "bad_json",
    ),
    Case("header_claims_90mb", _header(raw=b"{}", length=90_000_000), "truncated_file"),
    Case("header_claims_too_much", _header(raw=b"{}", length=2**40), "header_too_large"),
    Case(
        "header_duplicate_key",
        _header(
            raw=b'{"a":{"dtype":"F16","shape":[1],"data_offsets":[0,2]},'
            b'"a":{"dtype":"F16","shape":[1],"data_offsets":[0,2]}}',
            data=b"\0\0",
        ),
        "duplicate_header_key",
    ),
    Case("header_nested_deep", _header(raw=b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"), "bad_json"),
    Case("header_not_utf8", _header(raw=b'{"\xff\xfe":1}'), "bad_json"),
    Case(
        "header_overlap",
        _header(
            raw=b'{"a":{"dtype":"F16","shape":[1],"data_offsets":[0,2]},'
            b'"b":{"dtype":"F16","shape":[1],"data_offsets":[0,2]}}',
            data=b"\0\0",
        ),
        "bad_offsets",
    ),
    Case("weights_missing", _weights("missing"), "missing_weights"),
    Case("weights_a_directory", _weights("directory"), "missing_weights"),
    Case("weights_pickle_only", _weights("pickle"), "pickle_refused"),
    Case("weights_link_to_dev_zero", _weights("dev_zero"), "missing_weights"),
    Case("weights_fifo", _weights("fifo"), "missing_weights"),
    Case("weights_link_to_proc_kmsg", _weights("kmsg"), _kmsg_code("truncated_file", "unreadable_file")),
    # -- arguments ------------------------------------------------------------------------------------------------
    Case("subfolder_nul", _copy, "invalid_subfolder", {"subfolder": "a\x00b"}, cli=False),
    Case("subfolder_escapes", _copy, "subfolder_escapes", {"subfolder": "../.."}, cli=False),
    Case("adapter_name_path", _copy, "invalid_adapter_name", {"adapter_name": "../evil"}, cli=False),
    Case("adapter_name_empty", _copy, "invalid_adapter_name", {"adapter_name": ""}, cli=False),
    Case("adapter_name_dotted", _copy, "invalid_adapter_name", {"adapter_name": "a.b"}, cli=False),
    Case("adapter_name_weight_fine", _copy, None, {"adapter_name": "weight"}, cli=False),
    Case("adapter_name_base_layer_fine", _copy, None, {"adapter_name": "base_layer"}, cli=False),
]
if STRESS:  # about 4 s a call at 100,000 on a slow shared machine: too close to the bound for every make test
    CASES += [
        Case("header_100k_tensors_layers", _tiny_header(100_000, names=False), "fewer_layers"),
        Case("header_100k_tensors_modules", _tiny_header(100_000, names=True), "unknown_modules"),
        Case("header_300k_tensors_modules", _tiny_header(300_000, names=True), "unknown_modules"),
    ]


# -- the two steps ---------------------------------------------------------------------------------------------


def make_all(root: str) -> None:
    """Write the base model's config, the good adapter and every case's directory under ``root``."""
    import warnings

    from tests.support.helpers import build, save_config, train_adapter

    warnings.simplefilter("ignore")
    model = build("causal")
    save_config(model, os.path.join(root, "base"))
    good = os.path.join(root, "good")
    trained = train_adapter(build("causal"), good)
    with open(os.path.join(root, "trained.json"), "w") as f:
        json.dump(trained.tolist(), f)
    for case in CASES:
        case.make(good, os.path.join(root, "cases", case.name))


def _cpu() -> float:
    """CPU seconds of this process and of its finished children (the regex trial runs): unlike wall time, not
    inflated by other processes on a shared machine."""
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _hwm() -> int:
    """This process's peak resident memory so far (VmHWM), in kB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


@contextlib.contextmanager
def _hidden(names: tuple[str, ...]) -> Iterator[None]:
    saved = {n: sys.modules.get(n) for n in names}
    for n in names:
        sys.modules[n] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        for n, module in saved.items():
            if module is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = module


def strict_json(text: str) -> Any:
    def refuse(literal: str) -> Any:
        raise ValueError(f"{literal} is not JSON")

    return json.loads(text, parse_constant=refuse)


@dataclass
class Surfaces:
    """What every surface needs besides the case: the base (and its config-only directory), the trained outputs, a
    PeftModel holding the good adapter (for the routes into a model that carries one) and a scratch directory."""

    base: Any
    base_dir: str
    trained: Any
    peft_model: Any
    scratch: str


def run_case(case: Case, directory: str, on: Surfaces) -> dict[str, Any]:
    """Every surface on one case: what each said, how long each took, what escaped."""
    result: dict[str, Any] = {"name": case.name, "expected": case.code, "raw": [], "seconds": {}, "cpu": {}}
    result["codes"], result["unchanged"] = {}, {}
    result["input_bytes"] = sum(e.stat(follow_symlinks=False).st_size for e in os.scandir(directory))

    @contextlib.contextmanager
    def timed(call: str) -> Iterator[None]:  # the call alone: not the battery's own checks of what it returned
        started, cpu = time.perf_counter(), _cpu()
        try:
            yield
        finally:
            result["seconds"][call] = time.perf_counter() - started
            result["cpu"][call] = _cpu() - cpu

    with _hidden(case.hide):
        _python_surfaces(case, directory, on, result, timed)
        if case.cli:
            _cli_surfaces(case, directory, on, result, timed)
    return result


def _python_surfaces(case: Case, directory: str, on: Surfaces, result: dict[str, Any], timed: Any) -> None:
    """diagnose and load on a base; diagnose and a further adapter on a PeftModel; transformers' in-place route."""
    import torch

    from safe_peft import AdapterLoadError, diagnose, safe_hotswap_adapter, safe_load_adapter, safe_load_adapter_inplace
    from tests.support.helpers import outputs

    further = {"adapter_name": "b", **case.kwargs}
    loads: list[tuple[str, Any, Any, dict[str, Any]]] = [
        ("load", on.base, safe_load_adapter, case.kwargs),
        ("load_further", on.peft_model, safe_load_adapter, further),
        ("inplace", on.base, safe_load_adapter_inplace, case.kwargs),
    ]
    if not case.kwargs:  # a hot-swap replaces the weights of the adapter that is there: no name of its own
        loads.append(("hotswap", on.peft_model, safe_hotswap_adapter, {}))
    for surface, model, call, kwargs in (
        ("diagnose", on.base, diagnose, case.kwargs),
        ("diagnose_peft", on.peft_model, diagnose, further),
    ):
        try:
            with timed(surface):
                report = call(model, directory, **kwargs)
            result["codes"][surface] = report.primary.code if report.primary else None
            result.setdefault("message_chars", 0)
            result["message_chars"] = max(
                [result["message_chars"], len(str(report))] + [len(d.message) for d in report.causes]
            )
            result["diagnose_json_chars"] = len(json.dumps(report.to_dict(), allow_nan=False))
        except Exception as exc:
            result["raw"].append(f"{surface}: {type(exc).__name__}: {str(exc)[:300]}")
    for surface, model, call, kwargs in loads:
        fresh = copy.deepcopy(model)
        before = {k: v.clone() for k, v in fresh.state_dict().items()}
        try:
            with timed(surface):
                loaded = call(fresh, directory, **kwargs)
            result["codes"][surface] = None
            if surface == "load":
                result["outputs_exact"] = bool(torch.allclose(outputs(loaded), on.trained, atol=1e-5))
        except AdapterLoadError as exc:
            result["codes"][surface] = exc.report.primary.code if exc.report.primary else "?"
            result["load_message_chars"] = max(result.get("load_message_chars", 0), len(str(exc)))
            after = fresh.state_dict()
            result["unchanged"][surface] = before.keys() == after.keys() and all(
                torch.equal(before[k], after[k]) for k in before
            )
        except Exception as exc:
            result["raw"].append(f"{surface}: {type(exc).__name__}: {str(exc)[:300]}")


def _cli_surfaces(case: Case, directory: str, on: Surfaces, result: dict[str, Any], timed: Any) -> None:
    """safe-peft check (peft and an engine, --json), inspect --json and fix (plain and --target), as a user runs
    them."""
    for surface, extra in (("check", ["--base", on.base_dir]), ("check_target", ["--target", "vllm"])):
        document, exit_code = _cli(surface, ["check", directory, *extra, "--json"], result, timed)
        if document is None:
            continue
        row = document["results"][0]
        causes = row["report"]["causes"] if surface == "check" else row["findings"]
        result["codes"][surface] = causes[0]["code"] if causes else None
        result.setdefault("verdicts", {})[surface] = row["verdict"]
        result.setdefault("exits", {})[surface] = exit_code
        result["json_chars"] = max(result.get("json_chars", 0), len(json.dumps(document)))
    document, exit_code = _cli("inspect", ["inspect", directory, "--json"], result, timed)
    result.setdefault("exits", {})["inspect"] = exit_code
    for surface, extra in (("fix", ["--base", on.base_dir]), ("fix_target", ["--target", "llamacpp"])):
        out = os.path.join(on.scratch, f"{case.name}-{surface}")
        _, exit_code = _cli(surface, ["fix", directory, *extra, "--out", out], result, timed)
        result.setdefault("exits", {})[surface] = exit_code
        result.setdefault("written", {})[surface] = os.path.exists(out)
        shutil.rmtree(out, ignore_errors=True)


def _cli(surface: str, argv: list[str], result: dict[str, Any], timed: Any) -> tuple[Any, int | None]:
    """One command through the console script's ``main``: its parsed --json document (strict) and exit code."""
    from safe_peft._cli import main

    out, err = io.StringIO(), io.StringIO()
    try:
        with timed(surface), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            exit_code = main(argv)
        if "Traceback" in err.getvalue() or "safe-peft's fault" in err.getvalue():
            result["raw"].append(f"{surface}: {err.getvalue()[-300:]}")
        wants_json = "--json" in argv and (exit_code == 0 or argv[0] != "inspect")  # inspect fails with one line
        return (strict_json(out.getvalue()) if wants_json else None), exit_code
    except BaseException as exc:
        result["raw"].append(f"{surface}: {type(exc).__name__}: {str(exc)[:300]}")
        return None, None


def run_all(root: str, out: str) -> None:
    import warnings

    import torch

    from tests.support.helpers import build

    warnings.simplefilter("ignore")  # peft's notices are not the battery's subject (one process, no threads)
    base_dir = os.path.join(root, "base")
    with open(os.path.join(root, "trained.json")) as f:
        trained = torch.tensor(json.load(f))
    from safe_peft import safe_load_adapter

    good = os.path.join(root, "cases", "control_good")
    scratch = os.path.join(root, "scratch")
    os.makedirs(scratch, exist_ok=True)
    on = Surfaces(build("causal"), base_dir, trained, safe_load_adapter(build("causal"), good), scratch)
    for _ in range(2):  # the clean run, twice: imports and caches warm, its peak is the baseline
        clean = run_case(CASES[0], good, on)
    baseline = _hwm()
    results = []
    for case in CASES:
        result = run_case(case, os.path.join(root, "cases", case.name), on)
        result["hwm_kb"] = _hwm()
        results.append(result)
    worst = max(r["hwm_kb"] for r in results) / baseline
    slowest = max(max(r["seconds"].values()) for r in results)
    busiest = max(max(r["cpu"].values()) for r in results)
    summary = {"baseline_kb": baseline, "slowest_s": slowest, "busiest_cpu_s": busiest, "peak_ratio": worst}
    with open(out, "w") as f:
        json.dump({**summary, "clean": clean, "results": results}, f, indent=1, allow_nan=False)
    print(
        f"{len(results)} cases, slowest call {slowest:.2f} s wall, {busiest:.2f} s CPU, peak memory {worst:.3f} x "
        "the clean run"
    )


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make_all(sys.argv[2])
    else:
        run_all(sys.argv[2], sys.argv[3])
