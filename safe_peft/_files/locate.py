"""Find an adapter's files: a local directory (or a hub snapshot) with config and weights.

Safetensors first; a pickle (``adapter_model.bin``) only with ``allow_pickle=True``. Every
problem with the path is an :class:`AdapterFormatError` naming the path and the fix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from safe_peft._catalog import finding
from safe_peft.errors import AdapterFormatError
from safe_peft.report import Diagnosis

__all__ = ["CONFIG_NAME", "SAFETENSORS_NAME", "AdapterFiles", "locate_adapter", "no_config_error"]

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
_CODE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".py", ".sh", ".so")


@dataclass(frozen=True)
class AdapterFiles:
    """Where an adapter's files are. ``weights_format`` is "safetensors" or "pickle"."""

    location: str
    directory: str
    config_path: str
    weights_path: str
    weights_format: str
    warnings: list[Diagnosis] = field(default_factory=list)


def locate_adapter(
    model_id: str | os.PathLike[str],
    *,
    subfolder: str | None = None,
    allow_pickle: bool = False,
    hub_kwargs: dict[str, Any] | None = None,
) -> AdapterFiles:
    """Resolve ``model_id`` (a directory, or a hub id when it is not one) to the adapter's files."""
    location = os.fspath(model_id)
    beside = os.path.join(os.path.dirname(location) or ".", CONFIG_NAME)
    if location.endswith(".safetensors") and os.path.isfile(location) and not os.path.isfile(beside):
        return AdapterFiles(location, os.path.dirname(location) or ".", "", location, "safetensors")  # foreign?
    if os.path.lexists(location):
        base = _check_directory(location)
    else:
        base = _download(location, subfolder, allow_pickle, hub_kwargs or {})
    directory = _join_subfolder(base, subfolder, location)
    from safe_peft._files.rank_files import distributed_save_error  # hook: per-rank files or a DCP directory

    distributed = distributed_save_error(directory, location)
    if distributed is not None:
        raise distributed
    config_path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(config_path):
        single = _single_foreign_file(directory)
        if single is not None:  # no PEFT config: maybe a foreign LoRA file the plan can recognise
            return AdapterFiles(location, directory, "", single, "safetensors", _stray_files(directory))
        raise _missing_config(location, directory)
    safetensors_path = os.path.join(directory, SAFETENSORS_NAME)
    pickle_path = os.path.join(directory, PICKLE_NAME)
    warnings = _stray_files(directory)
    if os.path.isfile(safetensors_path):
        return AdapterFiles(location, directory, config_path, safetensors_path, "safetensors", warnings)
    if os.path.isfile(pickle_path):
        if not allow_pickle:
            raise AdapterFormatError.of(
                "pickle_refused",
                f"{pickle_path}: the adapter is only saved as a pickle (adapter_model.bin, the default of peft "
                "0.3-0.6); unpickling a file from an untrusted source can run code",
                adapter=location,
                details={"file": pickle_path},
            )
        return AdapterFiles(location, directory, config_path, pickle_path, "pickle", warnings)
    raise AdapterFormatError.of(
        "missing_weights",
        f"{directory}: has {CONFIG_NAME} but neither {SAFETENSORS_NAME} nor {PICKLE_NAME}",
        adapter=location,
        details={"directory": directory, "files": _listdir(directory)[:20]},
    )


def no_config_error(files: AdapterFiles) -> AdapterFormatError:
    """A weights file with no adapter_config.json beside it, in no layout safe-peft converts (``missing_config``)."""
    return AdapterFormatError.of(
        "missing_config",
        f"{files.directory}: has no adapter_config.json, and {os.path.basename(files.weights_path)} is not a "
        "LoRA layout safe_peft can convert",
        fix="pass the directory peft's save_pretrained() wrote.",
        adapter=files.location,
    )


def _check_directory(location: str) -> str:
    try:
        os.stat(location)
    except OSError as exc:
        raise AdapterFormatError.of(
            "unreadable_path",
            f"{location}: cannot be read ({exc.strerror or exc})",
            adapter=location,
        ) from None
    if not os.path.isdir(location):
        parent = os.path.dirname(os.path.abspath(location))
        raise AdapterFormatError.of(
            "not_a_directory",
            f"{location}: is a file; an adapter is a directory holding {CONFIG_NAME} and its weights",
            parent=parent,
            adapter=location,
        )
    return location


def _join_subfolder(base: str, subfolder: str | None, location: str) -> str:
    if not subfolder:
        return base
    if not isinstance(subfolder, str) or "\x00" in subfolder or len(subfolder) > 4096:
        what = "holds a NUL byte" if isinstance(subfolder, str) and "\x00" in subfolder else "is not a directory name"
        raise AdapterFormatError.of(
            "invalid_subfolder",
            f"subfolder={subfolder!r:.200} {what}",
            adapter=location,
        )
    directory = os.path.join(base, subfolder)
    root = os.path.realpath(base)
    if os.path.isabs(subfolder) or os.path.commonpath([root, os.path.realpath(directory)]) != root:
        raise AdapterFormatError.of(
            "subfolder_escapes",
            f"subfolder={subfolder!r} points outside the adapter directory {base!r}",
            adapter=location,
        )
    if not os.path.isdir(directory):
        raise AdapterFormatError.of(
            "missing_subfolder",
            f"{directory}: subfolder {subfolder!r} does not exist",
            hint=_subfolder_hint(base),
            adapter=location,
        )
    return directory


def _single_foreign_file(directory: str) -> str | None:
    files = _listdir(directory)
    weights = [n for n in files if n.endswith(".safetensors")]
    if len(weights) != 1 or "config.json" in files:
        return None
    path = os.path.join(directory, weights[0])
    return path if os.path.isfile(path) else None


def _missing_config(location: str, directory: str) -> AdapterFormatError:
    hint = _subfolder_hint(directory)
    files = _listdir(directory)
    if "config.json" in files:
        what = f"{directory}: has no {CONFIG_NAME}; its config.json says it is a model, not a PEFT adapter"
        fix = "load it with transformers' from_pretrained, or pass the directory of the adapter."
    else:
        what = f"{directory}: has no {CONFIG_NAME}"
        fix = hint or "save the adapter with peft's save_pretrained(), which writes the config beside the weights."
    return AdapterFormatError.of(
        "missing_config",
        what,
        fix=fix,
        adapter=location,
        details={"directory": directory, "subfolders": _adapter_subfolders(directory)},
    )


def _subfolder_hint(directory: str) -> str:
    names = _adapter_subfolders(directory)
    if not names:
        return ""
    listed = ", ".join(repr(n) for n in names[:5])
    return (
        f"peft saves an adapter with a non-default name into a subfolder; found {listed}: "
        f"pass subfolder={names[0]!r} (and adapter_name={names[0]!r})."
    )


def _adapter_subfolders(directory: str) -> list[str]:
    return sorted(name for name in _listdir(directory) if os.path.isfile(os.path.join(directory, name, CONFIG_NAME)))


def _listdir(directory: str) -> list[str]:
    try:
        return sorted(os.listdir(directory))
    except OSError:
        return []


def _stray_files(directory: str) -> list[Diagnosis]:
    stray = [n for n in _listdir(directory) if n.endswith(_CODE_SUFFIXES) and n != PICKLE_NAME]
    if not stray:
        return []
    return [
        finding(
            "stray_code_files",
            f"{directory}: holds pickle or executable files that safe_peft does not read: {', '.join(stray[:10])}",
            details={"files": stray},
        )
    ]


def _download(repo_id: str, subfolder: str | None, allow_pickle: bool, hub_kwargs: dict[str, Any]) -> str:
    """Fetch config and weights of a hub adapter into the local cache; return the snapshot directory."""
    from huggingface_hub import hf_hub_download

    allowed = {k: v for k, v in hub_kwargs.items() if k in {"revision", "cache_dir", "token", "local_files_only"}}
    try:
        config_file = hf_hub_download(repo_id, CONFIG_NAME, subfolder=subfolder, **allowed)
    except Exception as exc:  # noqa: BLE001 - the hub client raises many types; all mean "not available"
        raise AdapterFormatError.of(
            "not_found",
            f"{repo_id!r}: no such local directory, and the hub did not provide {CONFIG_NAME} ({type(exc).__name__})",
            adapter=repo_id,
        ) from None
    for name in (SAFETENSORS_NAME, PICKLE_NAME) if allow_pickle else (SAFETENSORS_NAME,):
        try:
            hf_hub_download(repo_id, name, subfolder=subfolder, **allowed)
            break
        except Exception:  # noqa: BLE001 - a missing file is reported by locate_adapter with context
            continue
    relative = os.path.join(subfolder, CONFIG_NAME) if subfolder else CONFIG_NAME
    return config_file[: -len(relative)].rstrip(os.sep) or os.sep
