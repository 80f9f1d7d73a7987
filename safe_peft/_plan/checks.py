"""Checks on the arguments and on the model itself, before any key is compared.

Each returns findings (never raises): an adapter name peft cannot use, a ``torch.compile``d base, and a model
that the PeftModel class of the config's task type cannot wrap (a ``CAUSAL_LM`` adapter needs a model that
generates). They are the same in :func:`~safe_peft.diagnose` and in the load, so both agree.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from safe_peft._bounds import open_regular
from safe_peft._catalog import finding
from safe_peft._versions import TASK_CLASS, TASK_NEEDS
from safe_peft.report import Diagnosis

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "adapter_name_findings",
    "base_config_findings",
    "model_findings",
    "replication_findings",
    "token_index_findings",
    "wrapper_findings",
    "wrapper_needs",
]

# config.json fields that say what a transformer's shape is (depth, width, heads); the vocabulary is left out, since
# resizing it is normal and has its own cause
_SHAPE_FIELDS = (
    "model_type",
    "hidden_size",
    "n_embd",
    "d_model",
    "num_hidden_layers",
    "n_layer",
    "num_layers",
    "intermediate_size",
    "num_attention_heads",
    "n_head",
    "num_key_value_heads",
)
_MAX_BASE_CONFIG = 4_000_000  # bytes of a base model's config.json read for the comparison

MAX_NAME = 256


def adapter_name_findings(adapter_name: Any) -> list[Diagnosis]:
    """peft's rule for an adapter name: it becomes a key of the tuner layers' ``nn.ModuleDict``s, so it is a
    non-empty string without ``.`` that is not an attribute of ``nn.ModuleDict`` (``training``, ``keys``, ...)."""
    from torch import nn

    name = adapter_name
    why = None
    if not isinstance(name, str):
        why = f"is a {type(name).__name__}, not a string"
    elif not name:
        why = "is empty"
    elif len(name) > MAX_NAME:
        why = f"has {len(name)} characters (at most {MAX_NAME})"
    elif "." in name:
        why = "contains '.', which separates module names"
    elif hasattr(nn.ModuleDict(), name):
        why = f"is an attribute of every torch module dict ({name!r})"
    if why is None:
        return []
    shown = repr(name)[:80]
    suggestion = re.sub(r"[^A-Za-z0-9_-]+", "_", str(name))[:40].strip("_") or "adapter"
    if hasattr(nn.ModuleDict(), suggestion):
        suggestion = f"{suggestion}_adapter"
    return [
        finding(
            "invalid_adapter_name",
            f"adapter_name={shown} {why}: peft keeps each adapter under its name in the layers' module dicts",
            details={"adapter_name": shown},
            suggestion=suggestion,
        )
    ]


def model_findings(model: nn.Module) -> list[Diagnosis]:
    """What is wrong with the base model as given, whatever the adapter: a compiled module."""
    if type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):
        inner = type(model._orig_mod).__name__
        return [
            finding(
                "compiled_base",
                f"the base model is torch.compile's wrapper (OptimizedModule around {inner}): its modules are named "
                "`_orig_mod.*`, so no adapter key names them, and peft would inject into the wrapper",
                details={"wrapped": inner},
            )
        ]
    return []


def wrapper_needs(model: nn.Module, task_type: Any) -> list[str]:
    """The attributes the PeftModel class of ``task_type`` takes from the model that this model lacks."""
    task = str(task_type or "").rsplit(".", 1)[-1].upper()
    return [name for name in TASK_NEEDS.get(task, ()) if not callable(getattr(model, name, None))]


def wrapper_findings(model: nn.Module, task_type: Any, keys_fit: bool = False) -> list[Diagnosis]:
    """A config whose task type's PeftModel class cannot wrap this model (plain peft fails with AttributeError).
    ``keys_fit``: the adapter's keys fit this model as they are; when it is the bare model of the task's class
    (T5Model for a SEQ_2_SEQ_LM adapter), ``remap='auto'`` loads it as a plain PeftModel."""
    lacking = wrapper_needs(model, task_type)
    if not lacking:
        return []
    task = str(task_type).rsplit(".", 1)[-1].upper()
    wanted = TASK_CLASS.get(task, "the class the adapter was trained with")
    cls = type(model).__name__
    plain = f", or pass remap='auto' to load it into this {cls} as a plain PeftModel (task_type -> None)"
    prefix = str(getattr(model, "base_model_prefix", "") or "")
    keys_fit = keys_fit and not (prefix and hasattr(model, prefix))  # the bare model, not another task's class
    return [
        finding(
            "task_type_mismatch",
            f"the adapter was saved with task_type={task}, so peft wraps the model in the PeftModel class for that "
            f"task, which needs {', '.join(lacking)}; {cls} has no such method (it is not a {wanted} model)",
            details={"task_type": task, "lacking": lacking, "model_class": cls},
            advice=f"load the base model with {wanted}.from_pretrained(...) and pass that model"
            + (plain if keys_fit else "")
            + ".",
            remap="auto" if keys_fit else None,
        )
    ]


def token_index_findings(model: nn.Module, config: Any, vocab_size: int | None = None) -> list[Diagnosis]:
    """Trainable tokens (``trainable_token_indices``, TrainableTokens' ``token_indices``) past the end of the
    embedding they train: the adapter was trained on a resized vocabulary (plain peft fails with an IndexError).
    ``vocab_size`` is the size a vocab repair gives the model, if any."""
    wanted: dict[str, list[int]] = {}
    indices = getattr(config, "trainable_token_indices", None)
    if str(getattr(config, "peft_type", "")).rsplit(".", 1)[-1] == "TRAINABLE_TOKENS":
        targets = getattr(config, "target_modules", None) or []
        names = [targets] if isinstance(targets, str) else list(targets)
        wanted = {str(n): list(getattr(config, "token_indices", None) or []) for n in names}
    elif isinstance(indices, dict):
        wanted = {str(k): list(v) for k, v in indices.items()}
    elif isinstance(indices, (list, tuple)):
        wanted = {"": list(indices)}
    findings = []
    for name, tokens in wanted.items():
        rows = vocab_size if vocab_size is not None else _embedding_rows(model, name)
        numbers = [t for t in tokens if isinstance(t, int) and not isinstance(t, bool)]
        if rows is None or not numbers or max(numbers) < rows:
            continue
        findings.append(
            finding(
                "token_indices_out_of_range",
                f"the adapter trains tokens up to index {max(numbers)}"
                + (f" of {name}" if name else "")
                + f", but the model's embedding has only {rows} rows: it was trained after resize_token_embeddings "
                f"(to at least {max(numbers) + 1} rows)",
                details={"module": name or None, "max_index": max(numbers), "model_rows": rows},
            )
        )
    return findings


def _embedding_rows(model: nn.Module, name: str) -> int | None:
    """Rows of the embedding ``name`` (a module name or suffix; "" for the input embeddings)."""
    layer: Any = None
    if not name:
        getter = getattr(model, "get_input_embeddings", None)
        try:
            layer = getter() if callable(getter) else None
        except (NotImplementedError, AttributeError):
            layer = None
    else:
        layer = next((m for n, m in model.named_modules() if n == name or n.endswith("." + name)), None)
    weight = getattr(layer, "weight", None)
    return int(weight.shape[0]) if weight is not None and getattr(weight, "ndim", 0) == 2 else None


def base_config_findings(model: nn.Module, config: Any) -> list[Diagnosis]:
    """When the adapter's ``base_model_name_or_path`` is a local directory with a ``config.json``, the shape
    fields (depth, width, heads) it names that differ from the model's config: the adapter was trained on another
    base. Hub ids are not fetched."""
    import json
    import os

    path = getattr(config, "base_model_name_or_path", None)
    model_config = getattr(model, "config", None)
    if not isinstance(path, str) or model_config is None or len(path) > 4096 or "\x00" in path:
        return []
    file = os.path.join(path, "config.json")
    try:  # a path the adapter names: never a device or FIFO, never more than the cap
        f, size = open_regular(file)
        with f:
            if size > _MAX_BASE_CONFIG:
                return []
            saved = json.loads(f.read(size).decode("utf-8"))  # as transformers reads it: UTF-8, no BOM
    except (OSError, ValueError, RecursionError):
        return []
    if not isinstance(saved, dict):
        return []
    differ = {}
    for name in _SHAPE_FIELDS:
        theirs, ours = saved.get(name), getattr(model_config, name, None)
        if theirs is not None and ours is not None and type(theirs) is type(ours) and theirs != ours:
            differ[name] = (theirs, ours)
    if not differ:
        return []
    shown = ", ".join(f"{k} {a} there, {b} here" for k, (a, b) in differ.items())
    return [
        finding(
            "base_config_differs",
            f"the adapter was trained on {path} (base_model_name_or_path), whose config.json differs from "
            f"{type(model).__name__}'s: {shown}",
            details={"base_model_name_or_path": path, "differ": {k: list(v) for k, v in differ.items()}},
            base=path,
        )
    ]


def replication_findings(model: nn.Module, config: Any) -> list[Diagnosis]:
    """A ``layer_replication`` adapter on a base that already has the replicated depth. peft's ``get_peft_model``
    writes the new depth into the config object it was given, so a base built from that config again has the
    replicated number of layers with fresh weights, and replicating it once more gives another model; plain peft
    loads it with outputs that are not the trained ones, and says nothing."""
    layer_map = getattr(config, "layer_replication", None)
    depth = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if not layer_map or not isinstance(depth, int):
        return []
    try:
        spans = [(int(a), int(b)) for a, b in layer_map]
    except (TypeError, ValueError):
        return []
    replicated, used = sum(b - a for a, b in spans), max((b for _, b in spans), default=0)
    if depth != replicated or replicated == used:
        return []
    return [
        finding(
            "replicated_base",
            f"layer_replication {layer_map} builds {replicated} layers out of the first {used} layers of the base, "
            f"but {type(model).__name__} already has {replicated} layers: it was built from a config that "
            "get_peft_model had already changed (peft writes the replicated depth into the config it was given), "
            "so replicating it again gives another model than the trained one",
            details={"layer_replication": [list(s) for s in spans], "model_layers": depth, "base_layers": used},
        )
    ]
