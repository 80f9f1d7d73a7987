"""Turn torch's ``Error(s) in loading state_dict for X`` message (or peft's missing-keys warning)
into a :class:`LoadReport`. Linear time (markers found with ``str.find``, torch's own size-mismatch lines read by
one bounded regular expression, each key read once) and never raises on odd input."""

from __future__ import annotations

import re
from functools import partial
from itertools import repeat

from safe_peft._catalog import finding
from safe_peft._keys import Role, gc_paused, is_adapter_key, memoised, without_adapter_name
from safe_peft._model.view import ExpectedKey, ModelView
from safe_peft._plan.classify import Evidence, classify
from safe_peft._plan.compare import KeyDiff
from safe_peft._plan.remap import plan_remap
from safe_peft.report import Diagnosis, LoadReport, MissingKey, SizeMismatch, UnexpectedKey
from safe_peft.rules import BUILTIN

__all__ = ["parse_load_error"]

_MISSING = "Missing key(s) in state_dict:"
_UNEXPECTED = "Unexpected key(s) in state_dict:"
_SIZE = "size mismatch for "
_PEFT_WARNING = "Found missing adapter keys while loading the checkpoint:"
_HEADER = "Error(s) in loading state_dict for "


def parse_load_error(error_or_message: BaseException | str) -> LoadReport:
    """Turn a load error, or its text, into a :class:`LoadReport`.

    It reads torch's ``Error(s) in loading state_dict for X:`` message (any model, not only PEFT) and peft's
    "Found missing adapter keys" warning. Every key is listed. The causes are inferred from at most
    ``CLASSIFY_SAMPLE`` (1,000) keys of each kind, so a wall of 100,000 keys parses quickly. It never raises:
    text it does not recognise gives an empty report (``ok`` True, no keys).

    :param error_or_message: the exception (for example the ``RuntimeError`` of ``load_state_dict``) or its text.
    :returns: the report: missing, unexpected and size-mismatched keys and the likely causes.

    ```python
    >>> layer = torch.nn.Linear(2, 2)
    >>> try:
    ...     layer.load_state_dict({"weight": torch.ones(2, 3)})
    ... except RuntimeError as err:
    ...     report = parse_load_error(err)
    >>> report.missing, report.size_mismatches
    ([MissingKey(key='bias', expected_shape=None)],
     [SizeMismatch(key='weight', checkpoint_shape=(2, 3), model_shape=(2, 2))])
    >>> parse_load_error("not a load error").ok
    True

    ```
    """
    try:
        text = str(error_or_message)
    except Exception:  # noqa: BLE001 - a broken __str__ must not break the parser
        text = ""
    with gc_paused():  # 100k acyclic tuples would trigger dozens of needless collections
        missing_keys = _quoted_after(text, _MISSING, '"') + _quoted_after(text, _PEFT_WARNING, "'")
        unexpected_keys = _quoted_after(text, _UNEXPECTED, '"')
        missing = list(map(_new_missing, zip(missing_keys, repeat(None))))
        unexpected = list(map(_new_unexpected, zip(unexpected_keys, repeat(None))))
        mismatches = _size_mismatches(text)
        found = bool(missing or unexpected or mismatches)
        with memoised():  # the detectors ask module_of / role_of about the same sampled keys again and again
            causes = _classify(missing_keys, unexpected_keys, mismatches) if found else []
    return LoadReport(
        ok=not found,
        missing=missing,
        unexpected=unexpected,
        size_mismatches=mismatches,
        causes=causes,
        model_class=_model_class(text),
        base_model_unchanged=False,
    )


CLASSIFY_SAMPLE = 1_000
_new_missing = partial(tuple.__new__, MissingKey)
_new_unexpected = partial(tuple.__new__, UnexpectedKey)
_new_size = partial(tuple.__new__, SizeMismatch)


def _model_class(text: str) -> str:
    start = text.find(_HEADER)
    if start < 0:
        return ""
    start += len(_HEADER)
    end = text.find(":", start, start + 200)
    return text[start:end].strip() if end > 0 else ""


def _quoted_after(text: str, marker: str, quote: str) -> list[str]:
    """Quoted strings after each ``marker`` up to the end of its line (an unclosed quote is dropped)."""
    keys: list[str] = []
    pos = text.find(marker)
    while pos >= 0:
        line_end = text.find("\n", pos)
        line_end = len(text) if line_end < 0 else line_end
        parts = text[pos + len(marker) : line_end].split(quote)
        keys.extend(parts[1 : len(parts) - 1 + len(parts) % 2 : 2])
        pos = text.find(marker, line_end)
    return keys


def _size_mismatches(text: str) -> list[SizeMismatch]:
    first = text.find(_SIZE)
    if first < 0:
        return []
    lines = _TORCH_SIZE_LINE.findall(text, first)
    if len(lines) == text.count(_SIZE, first):  # every one in torch's own wording: read in one pass
        return _worded(lines)
    found = []
    pos = first
    while pos >= 0:
        start = pos + len(_SIZE)
        mismatch = _size_mismatch_at(text, start)
        if mismatch is not None:
            found.append(mismatch)
        pos = text.find(_SIZE, start)
    return found


# torch's line, ``size mismatch for <key>: copying a param with shape torch.Size([16, 1024]) from checkpoint, the
# shape in current model is torch.Size([8, 1024])``, within the bounds the general reader keeps (a key of at most
# 1,998 characters, shapes of at most 198). Its key holds no colon, space or newline: the marker has spaces, so the
# match never runs past the next one (linear), and no other occurrence of the marker can start inside a match, so
# as many matches as markers means each marker starts one, and they read as the general reader reads them.
_TORCH_SIZE_LINE = re.compile(
    re.escape(_SIZE)
    + r"([^\n: ]{0,1998}): copying a param with shape torch\.Size\(\[([0-9, ]{0,198})\]\) from checkpoint, "
    r"the shape in current model is torch\.Size\(\[([0-9, ]{0,198})\]\)"
)


def _worded(lines: list[tuple[str, str, str]]) -> list[SizeMismatch]:
    """The mismatches of torch's lines (key, checkpoint shape, model shape); each distinct shape is read once."""
    keys, have, want = zip(*lines, strict=True)
    shapes = {body: _shape(body) for body in {*have, *want}}
    if None in shapes.values():  # "1,,2" or "1 2": not a shape, and not a mismatch
        pairs = zip(keys, map(shapes.__getitem__, have), map(shapes.__getitem__, want), strict=True)
        return [_new_size(t) for t in pairs if t[1] is not None and t[2] is not None]
    return list(map(_new_size, zip(keys, map(shapes.__getitem__, have), map(shapes.__getitem__, want), strict=True)))


def _size_mismatch_at(text: str, start: int) -> SizeMismatch | None:
    """The mismatch whose key starts at ``start`` (after the marker): the key up to the first ``": "`` on its line,
    then two shapes within 1,000 characters of it."""
    colon = text.find(": ", start, start + 2000)
    if colon < 0:
        return None
    line_end = text.find("\n", start, colon + 1000)  # a newline past that changes nothing: look no further
    if line_end < 0:
        line_end = min(len(text), colon + 1000)
    elif line_end <= colon:
        return None
    shapes = _two_shapes(text, colon, min(line_end, colon + 1000))
    return None if shapes is None else SizeMismatch(text[start:colon], *shapes)


_OPEN, _CLOSE = "torch.Size([", "])"


def _two_shapes(text: str, start: int, end: int) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The first two ``torch.Size([...])`` between ``start`` and ``end`` (found with str.find, no regex)."""
    shapes: list[tuple[int, ...]] = []
    pos = text.find(_OPEN, start, end)
    while pos >= 0 and len(shapes) < 2:
        body_start = pos + len(_OPEN)
        close = text.find(_CLOSE, body_start, min(end, body_start + 200))
        if close < 0:
            return None
        shape = _shape(text[body_start:close])
        if shape is None:
            return None
        shapes.append(shape)
        pos = text.find(_OPEN, close, end)
    return (shapes[0], shapes[1]) if len(shapes) == 2 else None


def _shape(body: str) -> tuple[int, ...] | None:
    if body.strip(_SHAPE_CHARS):  # anything but digits, commas and spaces
        return None
    parts = body.split(",")
    try:
        return tuple(map(int, parts)) if body.strip() else ()
    except ValueError:  # an empty part ("1,,2"): not a shape
        return None


_SHAPE_CHARS = "0123456789, "


def _classify(missing_keys: list[str], unexpected_keys: list[str], mismatches: list[SizeMismatch]) -> list[Diagnosis]:
    missing_keys = missing_keys[:CLASSIFY_SAMPLE]
    unexpected_keys = unexpected_keys[:CLASSIFY_SAMPLE]
    mismatches = mismatches[:CLASSIFY_SAMPLE]
    lora_missing = [k for k in missing_keys if is_adapter_key(k)]
    lora_unexpected = [k for k in unexpected_keys if is_adapter_key(k)]
    if unexpected_keys and len(lora_unexpected) == len(unexpected_keys) and len(lora_missing) < len(missing_keys):
        return [_wrong_loader("the checkpoint holds only adapter keys, but the model has no adapter layers")]
    if lora_missing and not lora_unexpected and unexpected_keys and len(lora_missing) == len(missing_keys):
        return [_wrong_loader("the model has adapter layers, but the checkpoint holds plain base-model weights")]
    missing = [without_adapter_name(k) for k in missing_keys]
    unexpected = [without_adapter_name(k) for k in unexpected_keys]
    sized = [SizeMismatch(without_adapter_name(s.key), s.checkpoint_shape, s.model_shape) for s in mismatches]
    expected = {k: ExpectedKey(k, (), "", Role.OTHER) for k in missing}
    expected.update({s.key: ExpectedKey(s.key, s.model_shape, "", Role.OTHER) for s in sized})
    checkpoint: dict[str, tuple[int, ...]] = dict.fromkeys(unexpected, ())
    checkpoint.update({s.key: s.checkpoint_shape for s in sized})
    view = ModelView("", expected, {}, frozenset(), "", (), "parsed")
    plan = (
        plan_remap(checkpoint, expected, BUILTIN, same_shape=lambda _k, a, b: a == b or a == ())
        if (unexpected and missing)
        else None
    )
    diff = KeyDiff([MissingKey(k) for k in missing], [UnexpectedKey(k, ()) for k in unexpected], sized)
    return classify(Evidence(diff, checkpoint, view, {}, plan, shapes_known=False))


def _wrong_loader(what: str) -> Diagnosis:
    return finding("adapter_into_base_model", f"{what}: the adapter was loaded with the wrong function")
