"""The grammar of adapter keys: the one place that says what a checkpoint key names.

A key of a saved PEFT adapter is ``base_model.model.<module>.<part>[.<param>]``:

* ``base_model.model.`` is peft's prefix (:data:`PEFT_PREFIX`);
* ``<module>`` is the path of the base layer the adapter sits on (``model.layers.0.self_attn.q_proj``);
* ``<part>`` is a tensor or submodule of the tuner layer, named with its method's prefix (``lora_A``,
  ``lora_embedding_B``, ``hada_w1_a``, ``ia3_l``, ...);
* ``<param>`` is ``weight`` / ``bias`` when the part is a submodule.

Inside the model, the adapter name follows the part (``lora_A.default.weight``); saved files leave it out.
The LoRA parts are listed here (:class:`Role`, with their rank axis); the prefixes of every other method come from
the installed peft's own tuner table, so a new peft method needs no edit here.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import gc
import re
import sys
import threading
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = [
    "ANY",
    "LORA_OWN",
    "PEFT_PREFIX",
    "Role",
    "Shape",
    "adapter_parts_pattern",
    "base_tensor_name",
    "checkpoint_key",
    "gc_paused",
    "is_adapter_key",
    "is_embedding_part",
    "is_method_key",
    "lora_key",
    "memoised",
    "module_of",
    "pattern_key",
    "pattern_keys",
    "pattern_value",
    "rank_axis",
    "role_of",
    "strip_prefix",
    "without_adapter_name",
]

Shape = tuple[int, ...]  # a tensor's shape, as headers, checkpoints and the model view give it
PEFT_PREFIX = "base_model.model."
PROMPT_KEY = "prompt_embeddings"  # the one tensor prompt-learning methods save
ANY = -1  # an expected dimension that depends on the base weights' values (unknown on a meta-device model)


class Role(str, enum.Enum):
    """What a key holds. LoRA's own tensors have their own roles; the rest are told apart by where they sit."""

    A = "lora_A"  # the down projection, [rank, in] (an embedding's: [rank, vocab])
    B = "lora_B"  # the up projection, [out, rank]
    BIAS = "lora_bias"  # lora_B's bias (lora_bias=True), [out]
    MAGNITUDE = "magnitude"  # DoRA's magnitude vector, [out]
    SAVED_MODULE = "modules_to_save"  # a whole module trained and saved (a task head)
    BASE_EMBEDDING = "embedding_base"  # base embedding weights peft saves beside an embedding adapter
    OTHER = "other"  # another method's tensor, or a plain weight

    def __str__(self) -> str:
        return self.value


LORA_OWN = frozenset({Role.A, Role.B, Role.BIAS, Role.MAGNITUDE})  # LoRA's own tensors: never a base tensor

# LoRA part -> (role, whether the part is a parameter of its own rather than a submodule with .weight)
_LORA_PARTS: dict[str, tuple[Role, bool]] = {
    "lora_A": (Role.A, False),
    "lora_B": (Role.B, False),
    "lora_embedding_A": (Role.A, True),
    "lora_embedding_B": (Role.B, True),
    "lora_magnitude_vector": (Role.MAGNITUDE, True),
}
_EMBEDDING_PARTS = frozenset({"lora_embedding_A", "lora_embedding_B"})


def strip_prefix(key: str) -> str:
    """``base_model.model.x.y`` -> ``x.y`` (keys without the prefix are returned unchanged)."""
    return key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key


@functools.lru_cache(maxsize=1 << 16)
def _split(key: str) -> tuple[str, str, str] | None:
    """(module path with prefix, LoRA part, parameter) of a LoRA key, or None."""
    head, _, last = key.rpartition(".")
    if last in _LORA_PARTS and _LORA_PARTS[last][1]:
        return head, last, ""
    stem, _, part = head.rpartition(".")
    if part in _LORA_PARTS and not _LORA_PARTS[part][1] and last in ("weight", "bias"):
        return stem, part, last
    return None


class _Memo(threading.local):
    """This thread's tables inside memoised() (key -> module, key -> role); None outside. A class default, so that
    reading it in a thread that never entered memoised() is a plain lookup, not a caught AttributeError."""

    tables: tuple[dict[str, str], dict[str, Any]] | None = None


_MEMO = _Memo()
_NONE = object()


@contextlib.contextmanager
def memoised() -> Iterator[None]:
    """Within the block, :func:`module_of` and :func:`role_of` compute each key once, in this thread only (a plan
    asks them about every key of the checkpoint several times: a 100,000-tensor header, millions of calls). The
    tables go with the block, so nothing outlives the call."""
    if _MEMO.tables is not None:  # nested: the outer block's tables serve
        yield
        return
    _MEMO.tables = ({}, {})
    try:
        yield
    finally:
        _MEMO.tables = None


_GC_LOCK = threading.Lock()
_GC_PAUSES = [0, False]  # how many threads are inside gc_paused(), and whether the GC was enabled before the first


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic GC around bulk building of acyclic strings and tuples.

    The GC is process-wide, so the pause is counted: the first thread in records whether it was enabled and
    disables it, the last one out restores that state, whatever the interleaving of threads (a plain
    disable/enable pair could leave it disabled for good). Nothing else is changed."""
    with _GC_LOCK:
        if _GC_PAUSES[0] == 0:
            _GC_PAUSES[1] = gc.isenabled()
            gc.disable()
        _GC_PAUSES[0] += 1
    try:
        yield
    finally:
        with _GC_LOCK:
            _GC_PAUSES[0] -= 1
            if _GC_PAUSES[0] == 0 and _GC_PAUSES[1]:
                gc.enable()


def role_of(key: str) -> Role | None:
    """The LoRA tensor a key holds (``Role.A``, ``Role.B``, ...), or None for any other key."""
    tables = _MEMO.tables
    if tables is None:
        return _role_of(key)
    got = tables[1].get(key, _NONE)
    if got is _NONE:
        got = tables[1][key] = _role_of(key)
    return got  # type: ignore[no-any-return]


def _role_of(key: str) -> Role | None:
    parts = _split(key)
    if parts is None:
        return None
    _, part, param = parts
    if param == "bias":
        return Role.BIAS if part == "lora_B" else None
    return _LORA_PARTS[part][0]


def is_embedding_part(key: str) -> bool:
    """A LoRA key of an embedding layer (``lora_embedding_A`` / ``lora_embedding_B``)."""
    parts = _split(key)
    return parts is not None and parts[1] in _EMBEDDING_PARTS


def rank_axis(role: Role | None) -> int | None:
    """The dimension that holds the rank: 0 for ``lora_A``, 1 for ``lora_B``; None for other tensors."""
    return 0 if role is Role.A else 1 if role is Role.B else None


def module_of(key: str) -> str:
    """The module path a key belongs to, without peft's prefix and the adapter part (or the parameter name)."""
    tables = _MEMO.tables
    if tables is None:
        return _module_of(key)
    got = tables[0].get(key)
    if got is None:
        got = tables[0][key] = _module_of(key)
    return got


def _module_of(key: str) -> str:
    path = strip_prefix(key)
    parts = _split(path)
    if parts is not None:
        return parts[0]
    segments = path.split(".")
    prefixes = adapter_prefixes()
    for i, segment in enumerate(segments):
        if i and segment.startswith(prefixes):
            return ".".join(segments[:i])
    return path.rsplit(".", 1)[0] if "." in path else path


_WRAPPERS = frozenset({"base_layer", "token_adapter"})  # segments peft's wrappers put in front of a base tensor


def base_tensor_name(key: str) -> str:
    """The base model's own name for a checkpoint key of a base tensor: the prefix and the segments of peft's
    wrappers (a tuner layer's ``base_layer.``, trainable tokens' ``token_adapter.``) removed."""
    return ".".join(s for s in strip_prefix(key).split(".") if s not in _WRAPPERS)


def lora_key(module: str, part: str, param: str = "weight") -> str:
    """The checkpoint key of a LoRA tensor: ``lora_key("m.q", "lora_A")`` -> ``base_model.model.m.q.lora_A.weight``."""
    own = _LORA_PARTS[part][1]
    return f"{PEFT_PREFIX}{module}.{part}" if own else f"{PEFT_PREFIX}{module}.{part}.{param}"


def without_adapter_name(key: str) -> str:
    """A model key with peft's adapter-name infix dropped (whatever the name): ``...lora_A.default.weight`` ->
    ``...lora_A.weight``, ``...lora_embedding_A.default`` -> ``...lora_embedding_A``."""
    head, _, last = key.rpartition(".")
    if last in ("weight", "bias"):
        stem, _, _name = head.rpartition(".")
        if stem.rpartition(".")[2] in _LORA_PARTS:
            return f"{stem}.{last}"
    elif head.rpartition(".")[2] in _LORA_PARTS:
        return head
    return key


def checkpoint_key(model_key: str, adapter_name: str) -> str:
    """The saved key of one of an adapter's own tensors, from its key in the model: the adapter-name segment
    dropped where peft puts it (last for a parameter entry, ``lora_embedding_A.<name>``; second to last for a
    module entry, ``lora_A.<name>.weight``). Only for tensors known to belong to the adapter."""
    head, _, last = model_key.rpartition(".")
    if last == adapter_name:
        return head
    stem, _, name = head.rpartition(".")
    return f"{stem}.{last}" if name == adapter_name else model_key


def adapter_parts_pattern() -> str:
    """A regex group matching any LoRA part name (for rename rules)."""
    return "(" + "|".join(sorted(_LORA_PARTS, key=len, reverse=True)) + ")"


def _prefix_table() -> dict[str, str]:
    """peft type -> tensor-name prefix, from the installed peft's own table. Read only once peft is imported (by
    whatever needs it: a load, a diagnosis): reading a message or a header alone never imports torch; until then
    the grammar knows LoRA's names, which it spells out itself."""
    if "peft" not in sys.modules:
        return {"LORA": "lora_"}
    return _peft_prefix_table()


@functools.lru_cache(maxsize=1)
def _peft_prefix_table() -> dict[str, str]:
    try:
        from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING
    except ImportError:
        return {"LORA": "lora_"}
    mapping: dict[Any, Any] = dict(PEFT_TYPE_TO_PREFIX_MAPPING)
    return {str(k).rsplit(".", 1)[-1]: str(v) for k, v in mapping.items() if v}


def adapter_prefixes() -> tuple[str, ...]:
    """The tensor-name prefixes of every PEFT method the installed peft knows (``lora_``, ``hada_``, ...)."""
    return tuple(sorted(set(_prefix_table().values())))


def is_method_key(key: str, peft_type: str) -> bool:
    """Whether ``key`` holds a tensor of the PEFT method ``peft_type`` (``LOHA`` keys are ``hada_*``)."""
    prefix = _prefix_table().get(str(peft_type).rsplit(".", 1)[-1].upper())
    return prefix is not None and any(s.startswith(prefix) for s in strip_prefix(key).split(".")[1:])


def is_adapter_key(key: str) -> bool:
    """Whether a key holds a PEFT method's own tensor (any method the installed peft knows), not a base weight."""
    if role_of(key) is not None or key.endswith(PROMPT_KEY):
        return True
    prefixes = adapter_prefixes()
    return any(segment.startswith(prefixes) for segment in strip_prefix(key).split(".")[1:])


# -- rank_pattern / alpha_pattern keys ---------------------------------------------------------------------------


def pattern_keys(pattern: Mapping[str, Any] | None) -> list[tuple[str, re.Pattern[str]]]:
    """The keys of a rank_pattern / alpha_pattern, each compiled once as peft's ``get_pattern_key`` matches it
    (peft compiles each key again for every module: past ``re``'s 512-entry cache, thousands of keys take seconds).
    The config's values were checked before (:mod:`safe_peft._files.config_values`): every key is a valid expression."""
    from safe_peft._files.patterns import compiled

    return [(str(key), compiled(rf"(.*\.)?({key})$")) for key in (pattern or {})]


def pattern_key(keys: list[tuple[str, re.Pattern[str]]], name: str) -> str:
    """peft's ``get_pattern_key(keys, name)``: the first key matching ``name`` as a dotted suffix, else ``name``.

    >>> pattern_key(pattern_keys({"q_proj": 4}), "model.layers.0.self_attn.q_proj")
    'q_proj'
    """
    return next((key for key, regex in keys if regex.match(name)), name)


def pattern_value(pattern: Mapping[str, Any] | None, name: str, default: Any = None) -> Any:
    """The value a rank_pattern / alpha_pattern gives module ``name`` (``default`` when no key matches it)."""
    if not pattern:
        return default
    return pattern.get(pattern_key(pattern_keys(pattern), name), default)
