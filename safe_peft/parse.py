"""Turn torch's ``Error(s) in loading state_dict for X`` message (or peft's missing-keys warning)
into a :class:`LoadReport`. Linear time (markers found with ``str.find``, each key read once)
and never raises on odd input."""

from __future__ import annotations

import re

from safe_peft.compare import KeyDiff
from safe_peft.classify import Evidence, classify
from safe_peft.model_view import ExpectedKey, ModelView
from safe_peft.report import Cause, Diagnosis, LoadReport, MissingKey, SizeMismatch, UnexpectedKey
from safe_peft.rules import BUILTIN, plan_remap

__all__ = ["parse_load_error"]

_MISSING = "Missing key(s) in state_dict:"
_UNEXPECTED = "Unexpected key(s) in state_dict:"
_SIZE = "size mismatch for "
_PEFT_WARNING = "Found missing adapter keys while loading the checkpoint:"
_HEADER = "Error(s) in loading state_dict for "
_SHAPE = re.compile(r"torch\.Size\(\[([0-9, ]{0,200})\]\)")
_ADAPTER_INFIX = re.compile(r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)\.[A-Za-z0-9_\-]+(?=\.weight$|\.bias$|$)")


def parse_load_error(error_or_message: BaseException | str) -> LoadReport:
    """Parse a load error (the exception or its text) into a report; unknown text gives an empty one."""
    try:
        text = str(error_or_message)
    except Exception:  # noqa: BLE001 - a broken __str__ must not break the parser
        text = ""
    missing = [MissingKey(k) for k in _quoted_after(text, _MISSING, '"')]
    missing += [MissingKey(k) for k in _quoted_after(text, _PEFT_WARNING, "'")]
    unexpected = [UnexpectedKey(k) for k in _quoted_after(text, _UNEXPECTED, '"')]
    mismatches = list(_size_mismatches(text))
    model_class = _model_class(text)
    found = bool(missing or unexpected or mismatches)
    causes = _classify(missing, unexpected, mismatches) if found else []
    return LoadReport(
        ok=not found, missing=missing, unexpected=unexpected, size_mismatches=mismatches,
        causes=causes, model_class=model_class, base_model_unchanged=False,
    )


def _model_class(text: str) -> str:
    start = text.find(_HEADER)
    if start < 0:
        return ""
    start += len(_HEADER)
    end = text.find(":", start, start + 200)
    return text[start:end].strip() if end > 0 else ""


def _quoted_after(text: str, marker: str, quote: str) -> list[str]:
    """Quoted strings after each ``marker`` up to the end of its line."""
    keys = []
    pos = text.find(marker)
    while pos >= 0:
        line_end = text.find("\n", pos)
        line_end = len(text) if line_end < 0 else line_end
        i = pos + len(marker)
        while True:
            open_q = text.find(quote, i, line_end)
            if open_q < 0:
                break
            close_q = text.find(quote, open_q + 1, line_end)
            if close_q < 0:
                break
            keys.append(text[open_q + 1 : close_q])
            i = close_q + 1
        pos = text.find(marker, line_end)
    return keys


def _size_mismatches(text: str) -> list[SizeMismatch]:
    found = []
    pos = text.find(_SIZE)
    while pos >= 0:
        start = pos + len(_SIZE)
        colon = text.find(": ", start, start + 2000)
        line_end = text.find("\n", start)
        line_end = len(text) if line_end < 0 else line_end
        if 0 <= colon < line_end:
            shapes = [_shape(m.group(1)) for m in _SHAPE.finditer(text, colon, min(line_end, colon + 1000))]
            if len(shapes) >= 2 and shapes[0] is not None and shapes[1] is not None:
                found.append(SizeMismatch(text[start:colon], shapes[0], shapes[1]))
        pos = text.find(_SIZE, start)
    return found


def _shape(body: str) -> tuple[int, ...] | None:
    parts = [p.strip() for p in body.split(",") if p.strip()]
    return tuple(int(p) for p in parts) if all(p.isdigit() for p in parts) else None


def _classify(
    missing: list[MissingKey], unexpected: list[UnexpectedKey], mismatches: list[SizeMismatch]
) -> list[Diagnosis]:
    def plain(key: str) -> str:
        return _ADAPTER_INFIX.sub(r".\1", key)

    lora_missing = [m for m in missing if ".lora_" in m.key]
    lora_unexpected = [u for u in unexpected if ".lora_" in u.key]
    if unexpected and len(lora_unexpected) == len(unexpected) and len(lora_missing) < len(missing):
        return [_wrong_loader("the checkpoint holds only LoRA adapter keys, but the model has no adapter layers")]
    if lora_missing and not lora_unexpected and unexpected and len(lora_missing) == len(missing):
        return [_wrong_loader("the model has adapter layers, but the checkpoint holds plain base-model weights")]
    expected = {plain(m.key): ExpectedKey(plain(m.key), (), "", "other") for m in missing}
    expected.update({plain(s.key): ExpectedKey(plain(s.key), s.model_shape, "", "other") for s in mismatches})
    checkpoint = {plain(u.key): () for u in unexpected}
    checkpoint.update({plain(s.key): s.checkpoint_shape for s in mismatches})
    view = ModelView("", expected, {}, frozenset(), "", (), "parsed")
    plan = plan_remap(checkpoint, expected, BUILTIN, same_shape=lambda _k, a, b: a == b or a == ()) if (
        unexpected and missing and len(unexpected) <= 100_000
    ) else None
    diff = KeyDiff(
        [MissingKey(plain(m.key)) for m in missing],
        [UnexpectedKey(plain(u.key), ()) for u in unexpected],
        [SizeMismatch(plain(s.key), s.checkpoint_shape, s.model_shape) for s in mismatches],
    )
    return classify(Evidence(diff, checkpoint, view, {}, plan))


def _wrong_loader(what: str) -> Diagnosis:
    return Diagnosis(
        Cause.WRONG_LOADER,
        "adapter_into_base_model",
        f"{what}: the adapter was loaded with the wrong function",
        fix="use safe_load_adapter(base_model, adapter_dir) (or PeftModel.from_pretrained) instead of "
        "model.load_state_dict(...).",
    )
