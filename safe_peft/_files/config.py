"""Read ``adapter_config.json`` and turn it into the installed peft's config object.

Keys the installed peft does not know are dropped and listed as ``VERSION_SKEW`` warnings,
unless dropping one would change what the adapter computes: then loading is refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from safe_peft._catalog import finding
from safe_peft._files.legacy import convert_config, enabled_parts
from safe_peft._versions import introduced_in, is_newer
from safe_peft.errors import AdapterFormatError, raised_by
from safe_peft.report import Diagnosis

if TYPE_CHECKING:
    from peft import PeftConfig

__all__ = ["AdapterConfig", "build_peft_config", "changes_meaning", "read_config"]

# Config keys whose non-default value changes what an adapter computes: ignoring them is not safe.
# key -> the values that are harmless to ignore (the defaults).
MEANING_KEYS: dict[str, tuple[Any, ...]] = {
    "use_dora": (False, None),
    "lora_bias": (False, None),
    "use_rslora": (False, None),
    "layer_replication": (None, []),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "target_parameters": (None, []),
    "trainable_token_indices": (None, [], {}),
    "alora_invocation_tokens": (None, []),
    "use_qalora": (False, None),
    "arrow_config": (None,),
    "enable_lora": (None,),
    "fan_in_fan_out": (False, None),
}


# Keys whose value never changes what a loaded adapter computes: metadata, and settings used only to initialise
# weights before training (the saved weights already reflect them).
HARMLESS_KEYS = frozenset(
    {
        "peft_version",
        "revision",
        "auto_mapping",
        "base_model_name_or_path",
        "inference_mode",
        "runtime_config",
        "megatron_core",
        "qalora_group_size",
        "loftq_config",
        "eva_config",
        "corda_config",
        "lora_ga_config",
        "init_lora_weights",
    }
)
_EMPTY: tuple[Any, ...] = (None, False, {}, [], "")


def changes_meaning(key: str, value: Any) -> bool:
    """Whether ignoring config ``key`` (unknown to the installed peft) could change what the adapter computes.

    Empty or false values are harmless, and so are the keys in ``HARMLESS_KEYS``. Any other value of an unknown
    key is assumed to matter: safe_peft cannot know what a newer peft does with it.
    """
    if key in MEANING_KEYS:
        return value not in MEANING_KEYS[key]
    return key not in HARMLESS_KEYS and value not in _EMPTY


@dataclass(frozen=True)
class AdapterConfig:
    """The raw JSON of an adapter config, with the facts the diagnosis needs."""

    path: str
    data: dict[str, Any]
    warnings: list[Diagnosis] = field(default_factory=list)

    @property
    def peft_type(self) -> str:
        return str(self.data["peft_type"])

    @property
    def peft_version(self) -> str | None:
        value = self.data.get("peft_version")
        return value if isinstance(value, str) else None


def read_config(path: str, *, adapter: str = "") -> AdapterConfig:
    """Parse and sanity-check an adapter config file (at most ``MAX_CONFIG_BYTES`` are read; NaN and Infinity,
    which Python's json module accepts but JSON does not, are refused naming their key)."""
    from safe_peft._bounds import MAX_CONFIG_BYTES, open_regular

    try:
        f, size = open_regular(path)
        with f:
            raw = f.read(size) if size <= MAX_CONFIG_BYTES else b""  # never more than it says it holds
    except OSError as exc:
        raise _bad(path, adapter, "unreadable_config", f"cannot read the file ({exc.strerror or exc})") from None
    if size > MAX_CONFIG_BYTES or len(raw) > MAX_CONFIG_BYTES:
        raise AdapterFormatError.of(
            "config_too_large",
            f"{path}: is {max(size, len(raw)):,} bytes, more than the {MAX_CONFIG_BYTES:,} bytes safe-peft reads "
            "from an adapter config (peft writes a few kilobytes)",
            adapter=adapter,
            details={"file": path, "bytes": max(size, len(raw)), "limit": MAX_CONFIG_BYTES},
        )
    if not raw:
        raise _bad(path, adapter, "bad_config_json", "is empty (0 bytes)")
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_NonFinite, parse_float=_finite_float)
    except (ValueError, RecursionError) as exc:
        raise _bad(path, adapter, "bad_config_json", f"is not valid JSON ({str(exc)[:200]})") from None
    where = _non_finite(data)
    if where is not None:
        raise AdapterFormatError.of(
            "invalid_config_value",
            f"{path}: {where[0]} is {where[1]}, which is not a JSON number (Python's json module reads it, peft would "
            "compute with it: a non-finite lora_alpha makes every output NaN)",
            adapter=adapter,
            details={"key": where[0]},
            key=where[0],
        )
    if not isinstance(data, dict):
        raise _bad(path, adapter, "bad_config_json", f"holds a JSON {type(data).__name__}, not an object")
    if "peft_type" not in data:
        if "architectures" in data or "model_type" in data:
            raise AdapterFormatError.of(
                "model_config_as_adapter_config",
                f"{path}: is a model's config.json (it has 'architectures'/'model_type'), not a PEFT adapter config",
                adapter=adapter,
            )
        raise _bad(path, adapter, "config_missing_peft_type", "has no 'peft_type' key")
    warnings = []
    if "runtime_config" in data:
        data = {k: v for k, v in data.items() if k != "runtime_config"}
        warnings.append(finding("runtime_config_ignored", f"{path}: 'runtime_config' is ignored on load"))
    return AdapterConfig(path=path, data=data, warnings=warnings)


class _NonFinite(str):
    """``NaN`` / ``Infinity`` / ``-Infinity`` (or a float that overflows to infinity) where JSON wants a number."""


def _finite_float(text: str) -> float | _NonFinite:
    value = float(text)
    return value if math.isfinite(value) else _NonFinite(text)


def _non_finite(data: Any, path: str = "") -> tuple[str, str] | None:
    """(the key, the text) of the first non-finite number in ``data``."""
    stack = [(path, data)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, _NonFinite):
            return where or "the config", str(value)
        if isinstance(value, dict):
            stack.extend((f"{where}.{k}" if where else str(k), v) for k, v in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", v) for i, v in reversed(list(enumerate(value))))
    return None


@dataclass(frozen=True)
class BuiltConfig:
    """The installed peft's config object, with what was found while building it: warnings (keys dropped
    harmlessly, a newer saving peft), causes (keys whose dropping changes the adapter) and applied repairs."""

    config: PeftConfig
    warnings: list[Diagnosis] = field(default_factory=list)
    causes: list[Diagnosis] = field(default_factory=list)
    repairs: list[str] = field(default_factory=list)


def build_peft_config(config: AdapterConfig, *, adapter: str = "", repair: tuple[str, ...] = ()) -> BuiltConfig:
    """Instantiate the installed peft's config class from the raw JSON.

    Keys the installed peft does not know are dropped (as plain peft drops them). When dropping one changes what
    the adapter computes, that is a cause (``meaning_changing_config_key``), unless ``repair=("config",)`` asks to
    drop it anyway; the config object is built without those keys in either case.
    """
    import peft
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    configs: dict[Any, Any] = dict(PEFT_TYPE_TO_CONFIG_MAPPING)
    config_cls = configs.get(config.peft_type)
    if config_cls is None:
        raise AdapterFormatError.of(
            "unknown_peft_type",
            f"{config.path}: peft_type {config.peft_type!r} is unknown to the installed peft",
            peft_version=config.peft_version,
            adapter=adapter,
        )
    parts = enabled_parts(config.data)
    if parts is not None:
        if "legacy" not in repair:
            raise AdapterFormatError.of(
                "legacy_merged_linear",
                f"{config.path}: a peft <= 0.2 adapter for fused projections (enable_lora={list(parts)}, "
                "MergedLinear), a layout no installable peft loads any more",
                adapter=adapter,
                details={"enable_lora": list(parts)},
            )
        data, _ = convert_config(config.data)
        config = AdapterConfig(path=config.path, data=data, warnings=config.warnings)
    known = known_fields(config_cls)
    from safe_peft._files.config_values import check_values  # values peft cannot compute with

    check_values(config.data, known, peft_type=config.peft_type, path=config.path, adapter=adapter)
    unknown = sorted(k for k in config.data if k not in known)
    kwargs = {k: v for k, v in config.data.items() if k in known}
    meaning = [k for k in unknown if changes_meaning(k, config.data[k])]
    causes: list[Diagnosis] = []
    repairs: list[str] = []
    if meaning and "config" in repair:
        repairs.append(
            f"config: dropped {', '.join(meaning)}, unknown to the installed peft {peft.__version__}; the adapter runs "
            "without what they set"
        )
    elif meaning:
        causes.append(_meaning_changing(config, meaning, peft.__version__))
    try:
        peft_config = config_cls.from_peft_type(**config_cls.check_kwargs(**kwargs))
    except ImportError as exc:  # an option whose package is missing (peft checks some at config time)
        raise AdapterFormatError.of(
            "config_needs_package",
            f"{config.path}: peft cannot build this config: {str(exc)[:300]}",
            fix="install the package named above, which peft needs for an option of this adapter.",
            adapter=adapter,
            details=raised_by(exc),
        ) from None
    except Exception as exc:  # noqa: BLE001 - peft's config classes validate with several exception types
        rejected = f"{config.path}: is rejected by peft: {str(exc)[:300]}"
        raise AdapterFormatError.of("invalid_config", rejected, adapter=adapter, details=raised_by(exc)) from None
    harmless = [k for k in unknown if k not in meaning]
    return BuiltConfig(peft_config, _skew_findings(config, harmless), causes, repairs)


def known_fields(config_cls: Any) -> set[str]:
    """The config keys the installed peft's config class accepts."""
    return {f.name for f in dataclasses.fields(config_cls)}


def _meaning_changing(config: AdapterConfig, keys: list[str], installed: str) -> Diagnosis:
    """Unknown keys whose value matters: upgrade peft when a newer one saved them, else they were never peft's."""
    named = ", ".join(f"{k} (peft {introduced_in(k)})" if introduced_in(k) else k for k in keys)
    anyway = "repair=('config',) drops them and loads the adapter without them (so does strict=False)"
    if is_newer(config.peft_version, installed) or any(introduced_in(k) for k in keys):
        saved = config.peft_version or "the version that saved the adapter"
        fix = f"upgrade peft to {saved} or later (installed: {installed}); or, knowing the outputs change, {anyway}."
        why = "a newer peft"
    else:
        fix = (
            f"{'it is' if len(keys) == 1 else 'they are'} not in the config peft {installed} writes (the adapter says "
            f"peft_version={config.peft_version!r}): remove {'it' if len(keys) == 1 else 'them'} from "
            f"adapter_config.json if added by hand; or {anyway}."
        )
        why = "not the installed peft"
    return finding(
        "meaning_changing_config_key",
        f"{config.path}: the installed peft {installed} does not know {named}; ignoring "
        f"{'it' if len(keys) == 1 else 'them'} would change what the adapter computes (written by {why})",
        details={"keys": keys, "peft_version": config.peft_version, "installed_peft": installed},
        advice=fix,
    )


def _skew_findings(config: AdapterConfig, unknown: list[str]) -> list[Diagnosis]:
    """Warnings about the peft that saved the adapter: ignored keys (and the release each needs), a newer peft."""
    import peft

    findings = []
    if unknown:
        since = {k: introduced_in(k) for k in unknown}
        needs = [f"{k} (peft {v})" if v else k for k, v in since.items()]
        findings.append(
            finding(
                "unknown_config_keys",
                f"{config.path}: keys unknown to the installed peft {peft.__version__} were ignored: "
                f"{', '.join(needs)} (none changes what the adapter computes)",
                details={
                    "keys": unknown,
                    "introduced_in": since,
                    "peft_version": config.peft_version,
                    "installed_peft": peft.__version__,
                },
            )
        )
    if is_newer(config.peft_version, peft.__version__):
        findings.append(
            finding(
                "newer_peft_version",
                f"{config.path}: saved by peft {config.peft_version}, newer than the installed {peft.__version__}",
                details={"peft_version": config.peft_version, "installed_peft": peft.__version__},
            )
        )
    return findings


def _bad(path: str, adapter: str, code: str, what: str) -> AdapterFormatError:
    return AdapterFormatError.of(code, f"{path}: {what}", adapter=adapter)
