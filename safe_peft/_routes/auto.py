"""The Auto entry point: ``AutoPeftModelFor*.from_pretrained(adapter)`` and transformers'
``AutoModelFor*.from_pretrained(adapter_dir)``, safely.

Both read ``base_model_name_or_path`` from the adapter's config, build the base model with the right Auto class and
load the adapter into it. Here the class comes from peft's own mapping (``task_type`` -> the PeftModel class -> the
``AutoPeftModelFor*`` class that wraps it -> its transformers Auto class; ``auto_mapping`` with peft's import
allowlist when there is no task type), the base keyword arguments (``dtype``, ``device_map``, ...) go to the base's
``from_pretrained`` as they would, and the adapter is loaded by :func:`~safe_peft.safe_load_adapter` (or, with
``inplace=True``, :func:`~safe_peft.safe_load_adapter_inplace`). A base that is not named, or cannot be built, is an
:class:`~safe_peft.AdapterLoadError` saying so and how to pass the base yourself.
"""

from __future__ import annotations

import os
from typing import Any

from safe_peft._catalog import finding
from safe_peft._files.config import read_config
from safe_peft._files.locate import locate_adapter
from safe_peft._files.source import HUB_KWARGS
from safe_peft._plan.options import LoadOptions
from safe_peft.errors import AdapterLoadError
from safe_peft.report import Diagnosis, LoadReport

__all__ = ["DEFAULT_IMPORT_ALLOWLIST", "auto_class_for", "from_pretrained"]

# peft >= 0.18's default import allowlist for auto_mapping, applied on older peft too (which imported any library)
DEFAULT_IMPORT_ALLOWLIST = ("diffusers", "lerobot", "megatron-core", "transformers")


def from_pretrained(
    model_id: str | os.PathLike[str],
    adapter_name: str = "default",
    *,
    is_trainable: bool = False,
    config: Any = None,
    revision: str | None = None,
    auto_class: Any = None,
    inplace: bool = False,
    import_allowlist: list[str] | None = None,
    remap: object = None,
    repair: tuple[str, ...] | list[str] = (),
    strict: bool = True,
    allow_pickle: bool = False,
    output_loading_info: bool = False,
    verify_base: bool = True,
    **kwargs: Any,
) -> Any:
    """Build the base model an adapter names and load the adapter into it, or fail with an explanation.

    It does what ``AutoPeftModelForCausalLM.from_pretrained(model_id, **kwargs)`` does, for any task. The base is
    the one the adapter config's ``base_model_name_or_path`` names.

    :param model_id: a local adapter directory, or a hub id when online.
    :param adapter_name: the adapter's name in the model.
    :param is_trainable: as in peft: load the adapter for training.
    :param config: as in peft: a config object that replaces adapter_config.json.
    :param revision: the adapter's revision on the hub.
    :param auto_class: the transformers class to build the base with; by default it is chosen from the adapter's
        ``task_type``.
    :param inplace: do what ``AutoModelForCausalLM.from_pretrained(adapter_dir)`` does instead (transformers' PEFT
        integration): return the transformers model with the adapter injected, no ``PeftModel``.
    :param import_allowlist: the libraries a config's ``auto_mapping`` may import, as in peft.
    :param remap: as in :func:`~safe_peft.safe_load_adapter`.
    :param repair: as in :func:`~safe_peft.safe_load_adapter`.
    :param strict: as in :func:`~safe_peft.safe_load_adapter`.
    :param allow_pickle: as in :func:`~safe_peft.safe_load_adapter`.
    :param output_loading_info: return ``(model, report)`` instead of the model alone.
    :param verify_base: as in :func:`~safe_peft.safe_load_adapter`.
    :param kwargs: ``**kwargs`` go to the base model's ``from_pretrained`` and to the adapter load, as peft passes
        them: ``dtype``, ``device_map``, ``token``, ...
    :returns: the ``PeftModel``, or ``(model, report)`` with ``output_loading_info=True``.
    :raises AdapterLoadError: when the base cannot be built (``base_model_unavailable``) or the adapter does not
        fit it.

    ```python
    >>> model = from_pretrained(auto_adapter_dir)
    >>> type(model).__name__, type(model.base_model.model).__name__
    ('PeftModelForCausalLM', 'LlamaForCausalLM')

    ```
    """
    LoadOptions(verify_base=verify_base)  # a bad option is refused before the base is built, as the load refuses it
    location = os.fspath(model_id)
    base = _named_base(model_id, location, revision, auto_class, inplace, import_allowlist, allow_pickle, kwargs)
    options: dict[str, Any] = {
        "remap": remap,
        "repair": tuple(repair),
        "strict": strict,
        "allow_pickle": allow_pickle,
        "output_loading_info": output_loading_info,
        "verify_base": verify_base,
    }
    if inplace:
        from safe_peft._routes.inplace import safe_load_adapter_inplace

        inplace_kwargs = {k: v for k, v in kwargs.items() if k in HUB_KWARGS}
        if revision is not None:
            inplace_kwargs["revision"] = revision
        if config is not None:
            inplace_kwargs["peft_config"] = config
        return safe_load_adapter_inplace(
            base, model_id, adapter_name, is_trainable=is_trainable, **options, **inplace_kwargs
        )
    _resize_to_tokenizer(base, location, revision, kwargs)
    from safe_peft._routes.first_adapter import safe_load_adapter

    return safe_load_adapter(
        base, model_id, adapter_name, is_trainable=is_trainable, config=config, revision=revision, **options, **kwargs
    )


def _named_base(
    model_id: str | os.PathLike[str],
    location: str,
    revision: str | None,
    auto_class: Any,
    inplace: bool,
    import_allowlist: list[str] | None,
    allow_pickle: bool,
    kwargs: dict[str, Any],
) -> Any:
    """The base model the adapter's config names, built with its auto class, or a typed refusal."""
    hub = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
    if revision is not None:
        hub["revision"] = revision
    files = locate_adapter(model_id, subfolder=hub.get("subfolder"), allow_pickle=allow_pickle, hub_kwargs=hub)
    if not files.config_path:
        raise _error(
            finding("auto_class_unknown", f"{location}: has no adapter_config.json to name a base model"), location
        )
    data = read_config(files.config_path, adapter=location).data
    target = auto_class if auto_class is not None else auto_class_for(data, import_allowlist, location)
    base_path, base_revision = _base_location(data, files.directory, location, inplace)
    if not base_path:
        raise _error(
            finding(
                "base_model_unknown",
                f"adapter_config.json of {location} has no base_model_name_or_path: it does not say which model it "
                "was trained on",
                auto_class=target.__name__,
                adapter=location,
            ),
            location,
        )
    try:
        base = target.from_pretrained(base_path, revision=base_revision, **kwargs)
    except Exception as exc:  # a name it cannot reach (OSError), a damaged checkpoint (RuntimeError), ...
        raise _error(
            finding(
                "base_model_unreachable",
                f"the base model {base_path!r} named by {location} could not be loaded with {target.__name__}: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}",
                details={"base_model_name_or_path": base_path},
                auto_class=target.__name__,
                adapter=location,
            ),
            location,
        ) from exc
    return base


def auto_class_for(data: dict[str, Any], import_allowlist: list[str] | None = None, location: str = "") -> Any:
    """The class ``AutoPeftModel*`` builds the base with, from an adapter config's ``task_type`` (peft's own mapping)
    or ``auto_mapping`` (within peft's import allowlist)."""
    import importlib

    from peft import auto

    allowlist: Any = getattr(auto, "get_default_import_allowlist", lambda: list(DEFAULT_IMPORT_ALLOWLIST))
    is_allowed: Any = getattr(auto, "check_import_allowlist", _allowed)

    task = data.get("task_type")
    if task:
        peft_cls = auto.MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(str(task))
        for cls in vars(auto).values():
            if (
                isinstance(cls, type)
                and issubclass(cls, auto._BaseAutoPeftModel)
                and getattr(cls, "_target_class", None) is not None
                and getattr(cls, "_target_peft_class", None) is peft_cls
            ):
                return cls._target_class
        raise _error(
            finding(
                "auto_class_unknown",
                f"{location}: task_type={task!r} has no AutoPeftModel class in the installed peft",
                details={"task_type": str(task)},
            ),
            location,
        )
    mapping = data.get("auto_mapping")
    if isinstance(mapping, dict) and mapping.get("base_model_class") and mapping.get("parent_library"):
        library = str(mapping["parent_library"])
        allowed = import_allowlist if import_allowlist is not None else allowlist()
        if not is_allowed(allowed, library):
            raise _error(
                finding(
                    "auto_import_refused",
                    f"{location}: auto_mapping wants to import {library!r}, which is not in the import allowlist "
                    f"({', '.join(allowed)})",
                    details={"library": library},
                ),
                location,
            )
        return getattr(importlib.import_module(library), str(mapping["base_model_class"]))
    raise _error(
        finding(
            "auto_class_unknown",
            f"{location}: adapter_config.json has neither task_type nor auto_mapping, so the model class to build "
            "the base with is unknown",
        ),
        location,
    )


def _allowed(allowlist: list[str], library: str) -> bool:
    """peft's rule: the library is in the allowlist, or inside a package that is."""
    return library in allowlist or any(library.startswith(f"{allowed}.") for allowed in allowlist)


def _base_location(data: dict[str, Any], directory: str, location: str, inplace: bool) -> tuple[str, str | None]:
    """Where the base model is: the config's ``base_model_name_or_path`` (transformers' route: the adapter directory
    itself when it also holds a full model's config.json) and ``revision``."""
    if inplace and os.path.isfile(os.path.join(directory, "config.json")) and os.path.isdir(location):
        return location, None
    path = data.get("base_model_name_or_path")
    revision = data.get("revision")
    return (str(path) if path else ""), (str(revision) if revision else None)


def _resize_to_tokenizer(base: Any, location: str, revision: str | None, kwargs: dict[str, Any]) -> None:
    """As ``AutoPeftModel`` does: a tokenizer saved with the adapter that has more tokens than the base's
    embeddings grows them first."""
    from peft.utils.constants import TOKENIZER_CONFIG_NAME

    if os.path.isdir(location):
        exists = os.path.isfile(os.path.join(location, TOKENIZER_CONFIG_NAME))
    else:
        from peft.utils.other import check_file_exists_on_hf_hub

        token = kwargs.get("token", kwargs.get("use_auth_token"))
        exists = bool(
            check_file_exists_on_hf_hub(
                repo_id=location,
                filename=TOKENIZER_CONFIG_NAME,
                revision=revision,
                repo_type=kwargs.get("repo_type"),
                token=token,
            )
        )
    if not exists or not hasattr(base, "get_input_embeddings"):
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        location, revision=revision, token=kwargs.get("token"), trust_remote_code=kwargs.get("trust_remote_code", False)
    )
    rows = base.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        base.resize_token_embeddings(len(tokenizer))


def _error(diagnosis: Diagnosis, location: str) -> AdapterLoadError:
    return AdapterLoadError(LoadReport(ok=False, causes=[diagnosis], adapter=location, base_model_unchanged=False))
