"""Check the values of an adapter config before peft computes with them.

peft reads ``adapter_config.json`` values with little checking: ``target_modules=12345`` raises a bare
``TypeError`` deep in its matcher, ``lora_alpha: "x"`` one while it builds the layers, ``lora_dropout: 2.0`` a
``ValueError`` from ``nn.Dropout``, a catastrophic regular expression hangs it. Every such value is refused here,
first, as an :class:`AdapterFormatError` that names the key (code ``invalid_config_value``; ``config_limit_exceeded``
for a value over one of :mod:`safe_peft._bounds`' caps; ``catastrophic_pattern`` for a regular expression that does
not finish on the model's module names; ``config_needs_package`` for an option whose package is not installed),
so that :func:`~safe_peft.diagnose` says what the load would say.

Only values plain peft cannot load are refused: a type peft computes with (``r``, ``lora_alpha``, the module
lists), never metadata (``base_model_name_or_path``, ``peft_version`` of any size is fine, it is only not echoed
whole). :func:`check_values` needs no model; :func:`check_against_model` runs the model-dependent part (the trial
runs of suspicious patterns, CorDA's precondition).
"""

from __future__ import annotations

import importlib.util
import numbers
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from safe_peft._bounds import (
    MAX_INIT_ITERATIONS,
    MAX_PATTERN_CHARS,
    MAX_PATTERN_ENTRIES,
    MAX_REPLICATED_LAYERS,
    TRIAL_SECONDS,
    shorten,
)
from safe_peft._files.patterns import Pattern, slow_patterns, static_fault
from safe_peft.errors import AdapterFormatError

if TYPE_CHECKING:
    from torch import nn

__all__ = ["check_against_model", "check_config", "check_values"]

# How peft wraps each pattern-valued setting before matching module names (peft 0.17.1 to 0.21.2;
# tuners_utils.check_target_module_exists, utils.other.get_pattern_key).
_WRAPPERS: dict[str, tuple[tuple[str, str], ...]] = {
    "target_modules": (("{}", "fullmatch"),),
    "exclude_modules": (("{}", "fullmatch"),),
    "rank_pattern": ((r"(.*\.)?({})$", "match"),),
    "alpha_pattern": ((r"(.*\.)?({})$", "match"),),
    "modules_to_save": ((r"(^|.*\.){}($|\..*)", "match"),),
    "layers_pattern": ((r"(?:^|.*?\.){}\.(?P<idx>\d+)\.", "match"), (r".*\.{}\.(\d+)\.", "match")),
}


class _Bad(Exception):
    """A value peft cannot take: why (the key is added by the caller)."""

    def __init__(self, why: str, code: str = "invalid_config_value", fix: str | None = None) -> None:
        super().__init__(why)
        self.why, self.code, self.fix = why, code, fix


def _show(value: Any) -> str:
    return shorten(repr(value), 120)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _positive_int(value: Any) -> None:
    if not _is_int(value) or value <= 0:
        raise _Bad(f"is {_show(value)}; peft needs a positive integer rank")


def _number(value: Any) -> None:
    if not _is_number(value):
        raise _Bad(f"is {_show(value)}; peft needs a number (it computes lora_alpha / r)")


def _dropout(value: Any) -> None:
    if not _is_number(value) and not isinstance(value, bool):
        raise _Bad(f"is {_show(value)}; peft needs a probability (a number)")
    if value > 1:
        raise _Bad(f"is {_show(value)}; a dropout probability is at most 1 (torch's nn.Dropout refuses it)")


def _entries(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise _Bad(f"is {_show(value)}; peft needs {what}")
    if len(value) > MAX_PATTERN_ENTRIES:
        raise _Bad(
            f"has {len(value):,} entries (limit {MAX_PATTERN_ENTRIES:,})",
            "config_limit_exceeded",
        )
    return value


def _names(value: Any, *, allow_str: bool = True) -> None:
    """None, a regular expression (a string), or a list of module names."""
    if value is None or (allow_str and isinstance(value, str)):
        return
    what = "a list of module names or a regular expression (a string)" if allow_str else "a list of names"
    for item in _entries(value, what):
        if not isinstance(item, str):
            raise _Bad(f"holds {_show(item)}; peft needs {what}")
        if len(item) > MAX_PATTERN_CHARS:
            raise _Bad(
                f"holds a name of {len(item):,} characters (limit {MAX_PATTERN_CHARS:,})", "config_limit_exceeded"
            )


def _layer_indexes(value: Any) -> None:
    if value is None or _is_int(value):
        return
    for item in _entries(value, "a layer index or a list of them"):
        if not _is_int(item):
            raise _Bad(f"holds {_show(item)}; peft needs layer indexes (integers)")


def _pattern_map(check: Callable[[Any], None]) -> Callable[[Any], None]:
    def checked(value: Any) -> None:
        if value is None:
            return
        if not isinstance(value, Mapping):
            raise _Bad(f"is {_show(value)}; peft needs a map from module patterns to values")
        if len(value) > MAX_PATTERN_ENTRIES:
            raise _Bad(f"has {len(value):,} entries (limit {MAX_PATTERN_ENTRIES:,})", "config_limit_exceeded")
        fault = _fault_of(check)
        for pattern, item in value.items():
            bad = fault(item)
            if bad is not None:
                raise _Bad(f"[{_show(pattern)}] {bad.why}", bad.code)

    return checked


def _fault_of(check: Callable[[Any], None]) -> Callable[[Any], _Bad | None]:
    def fault(value: Any) -> _Bad | None:
        try:
            check(value)
        except _Bad as bad:
            return bad
        return None

    return fault


def _replication(value: Any) -> None:
    if value is None:
        return
    total = 0
    for item in _entries(value, "a list of [start, end] layer ranges"):
        if not (isinstance(item, list) and len(item) == 2 and all(_is_int(i) and i >= 0 for i in item)):
            raise _Bad(f"holds {_show(item)}; peft needs [start, end] pairs of layer indexes")
        total += max(item[1] - item[0], 0)
        if total > MAX_REPLICATED_LAYERS:
            raise _Bad(
                f"builds more than {MAX_REPLICATED_LAYERS:,} layers (limit {MAX_REPLICATED_LAYERS:,})",
                "config_limit_exceeded",
            )


def _lora_bias_mode(value: Any) -> None:
    if value not in ("none", "all", "lora_only"):
        raise _Bad(f"is {_show(value)}; peft knows 'none', 'all' and 'lora_only'")


def _init(value: Any) -> None:
    """peft's ``init_lora_weights``: a bool, or the name of an initialisation the installed peft knows."""
    if value is None or isinstance(value, bool):
        return
    if not isinstance(value, str):
        raise _Bad(f"is {_show(value)}; peft needs true, false or the name of an initialisation")
    name = value.lower()
    if name.startswith("pissa_niter_"):
        count = name[len("pissa_niter_") :]
        if not (count.isascii() and count.isdigit()):
            raise _Bad(f"is {_show(value)}; peft reads the iterations after 'pissa_niter_' as an integer")
        _iterations(count, "pissa_niter_")
    if value == "loftq" and importlib.util.find_spec("scipy") is None:
        raise _Bad(
            "is 'loftq', whose initialisation needs scipy, which is not installed",
            "config_needs_package",
            "install scipy (pip install scipy), which peft needs for init_lora_weights='loftq'.",
        )


def _iterations(count: str | int, what: str) -> None:
    """An iteration count peft runs on load is bounded by :data:`MAX_INIT_ITERATIONS` (each one is SVD work over
    every targeted weight: a count of 10**8 keeps the load busy for days)."""
    if len(str(count)) > 12 or int(count) > MAX_INIT_ITERATIONS:
        raise _Bad(
            f"asks for {shorten(str(count), 40)} iterations of {what} (limit {MAX_INIT_ITERATIONS:,}; peft's docs use "
            "4 to 16)",
            "config_limit_exceeded",
        )


def _loftq(value: Any) -> None:
    """peft's ``loftq_config``: ``{}`` or ``loftq_bits`` / ``loftq_iter`` positive integers, the iterations bounded."""
    if value is None:
        return
    if not isinstance(value, Mapping):
        raise _Bad(f"is {_show(value)}; peft needs a mapping (loftq_bits, loftq_iter)")
    for key in ("loftq_bits", "loftq_iter"):
        if key in value and (not _is_int(value[key]) or value[key] <= 0):
            raise _Bad(f"entry {key} is {_show(value[key])}; peft needs a positive integer")
    if "loftq_iter" in value:
        _iterations(value["loftq_iter"], "loftq_iter")


# key -> check, for the settings peft computes with; a key the installed peft does not know is dropped before
# (adapter_config.build_peft_config), so it is never checked here.
_COMMON: dict[str, Callable[[Any], None]] = {
    "target_modules": _names,
    "exclude_modules": _names,
    "modules_to_save": lambda v: _names(v, allow_str=False),
    "layers_to_transform": _layer_indexes,
    "layers_pattern": _names,
    "target_parameters": lambda v: _names(v, allow_str=False),
}
_LORA: dict[str, Callable[[Any], None]] = {
    "r": _positive_int,
    "lora_alpha": _number,
    "lora_dropout": _dropout,
    "rank_pattern": _pattern_map(_positive_int),
    "alpha_pattern": _pattern_map(_number),
    "layer_replication": _replication,
    "bias": _lora_bias_mode,
    "init_lora_weights": _init,
}


def check_values(data: Mapping[str, Any], known: Iterable[str], *, peft_type: str, path: str, adapter: str) -> None:
    """Refuse values of ``data`` (the config's JSON) that peft cannot compute with; only ``known`` keys."""
    checks = dict(_COMMON)
    if peft_type == "LORA":
        checks.update(_LORA)
    for key in known:
        check = checks.get(key)
        if check is None or key not in data:
            continue
        try:
            check(data[key])
        except _Bad as bad:
            raise _error(path, adapter, key, bad) from None
    if str(data.get("init_lora_weights", "")).lower() == "loftq" and "loftq_config" in data:  # only then peft runs it
        try:
            _loftq(data["loftq_config"])
        except _Bad as bad:
            raise _error(path, adapter, "loftq_config", bad) from None
    for pattern in config_patterns(data):
        code, fault, _ = static_fault(pattern)
        if fault:
            raise _error(path, adapter, pattern.key, _Bad(_entry(pattern) + fault, code))


def config_patterns(data: Mapping[str, Any]) -> list[Pattern]:
    """Every regular expression peft builds from ``data``, as it builds it (its wrapper around the value)."""
    found: list[Pattern] = []
    for key, wrappers in _WRAPPERS.items():
        value = data.get(key)
        if isinstance(value, str):
            fragments = [value] if key != "modules_to_save" else []
        elif isinstance(value, list):
            fragments = [v for v in value if isinstance(v, str)] if key in ("modules_to_save", "layers_pattern") else []
        elif isinstance(value, Mapping):
            fragments = [str(k) for k in value]
        else:
            fragments = []
        for fragment in fragments:
            for wrapper, how in wrappers:
                found.append(Pattern(key, fragment, wrapper.replace("{}", fragment), how))
    return found


def check_against_model(model: nn.Module, data: Mapping[str, Any], *, path: str, adapter: str) -> None:
    """The model-dependent checks: suspicious patterns run on the model's module names within a deadline, and
    CorDA's precondition (peft's ``preprocess_corda`` ran on the targeted layers)."""
    check_patterns_on((name for name, _ in model.named_modules()), data, path=path, adapter=adapter)
    init = data.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith("corda") and str(data.get("peft_type")) == "LORA":
        _check_corda(model, data, path, adapter)


def check_patterns_on(names: Iterable[str], data: Mapping[str, Any], *, path: str, adapter: str) -> None:
    """Refuse a suspicious pattern of ``data`` that does not finish matching ``names`` (the model's module names,
    or the adapter's own where there is no model) within :data:`TRIAL_SECONDS`, as ``catastrophic_pattern``."""
    suspicious = []
    for pattern in config_patterns(data):
        _, fault, risky = static_fault(pattern)
        if risky and not fault:
            suspicious.append(pattern)
    if not suspicious:
        return
    listed = list(names)
    slow = slow_patterns(suspicious, listed)
    if slow:
        why = (
            f"{_entry(slow[0])}is a regular expression that did not finish matching the "
            f"{len(listed):,} module names within {TRIAL_SECONDS:g} s: it backtracks catastrophically, and peft "
            "matches it against every module name, so plain peft would hang on it too"
        )
        raise _error(path, adapter, slow[0].key, _Bad(why, "catastrophic_pattern"))


def check_config(data: Mapping[str, Any], names: Iterable[str], *, path: str, adapter: str) -> None:
    """Every check of a config's values that needs no peft and no model: :func:`check_values` on each key, then
    the trial of suspicious patterns on ``names``. Surfaces without a model (the engine checks) use this."""
    check_values(data, list(data), peft_type=str(data.get("peft_type", "")), path=path, adapter=adapter)
    check_patterns_on(names, data, path=path, adapter=adapter)


def _check_corda(model: nn.Module, data: Mapping[str, Any], path: str, adapter: str) -> None:
    """peft's CorDA initialisation reads ``eigens`` that ``preprocess_corda`` attached to each targeted layer."""
    try:
        from peft.tuners.lora.layer import LoraLayer
    except ImportError:
        return
    if not hasattr(LoraLayer, "corda_init"):
        return  # this peft does not know CorDA: its own error says so
    from torch import nn

    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if linear and not any(hasattr(m, "eigens") for m in linear):
        why = (
            f"is {_show(data['init_lora_weights'])}: peft then re-runs CorDA's initialisation, which reads the "
            "covariance `preprocess_corda` attaches to each targeted layer, and the base model has none"
        )
        fix = (
            "run peft's preprocess_corda on the base model before loading (as before training), or load the "
            "adapter converted to plain LoRA."
        )
        raise _error(path, adapter, "init_lora_weights", _Bad(why, fix=fix))


def _entry(pattern: Pattern) -> str:
    """How a message names the pattern after its key: ``rank_pattern entry '(.+)+Z' is ...``."""
    whole = pattern.key in ("target_modules", "exclude_modules") or pattern.entry == pattern.regex
    return "" if whole else f"entry {_show(pattern.entry)} "


def _error(path: str, adapter: str, key: str, bad: _Bad) -> AdapterFormatError:
    return AdapterFormatError.of(
        bad.code,
        f"{path}: {key} {bad.why}",
        fix=bad.fix,
        adapter=adapter,
        details={"key": key},
        key=key,
    )
