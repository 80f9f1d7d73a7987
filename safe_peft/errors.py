"""Exceptions. Each carries the whole :class:`LoadReport`; ``str(err)`` is rendered from it.

Each also is the builtin exception callers already catch: ``AdapterLoadError`` is a ``RuntimeError`` (what torch
raises for a failed ``load_state_dict``), and ``AdapterNotFoundError`` a ``FileNotFoundError`` (what peft raises
for a missing adapter), so existing ``except`` clauses keep working.

Where plain peft (or transformers) would have raised an exception of its own for the same call, the error is also
of that exception's builtin class: a finding made from peft's own refusal records the class in its details
(``details["raised"]``, e.g. ``"ValueError"``; see :func:`raised_by`), and ``AdapterLoadError(report)`` is then an
instance of a subclass of both (one per pair, cached; it pickles as the report), so ``except ValueError`` keeps
catching what it caught before the switch.
"""

from __future__ import annotations

import builtins
import threading
from typing import Any

from safe_peft.report import LoadReport

__all__ = ["AdapterFormatError", "AdapterLoadError", "AdapterNotFoundError"]

RAISED = "raised"  # the details key of a finding made from peft's own exception: that exception's builtin class


def raised_by(exc: BaseException) -> dict[str, str]:
    """The details that record which builtin exception class plain peft raised (``{}`` if none but Exception)."""
    for kind in type(exc).__mro__:
        if kind.__module__ == "builtins" and kind not in (Exception, BaseException, object):
            return {RAISED: kind.__name__}
    return {}


def _plainly_raised(report: LoadReport) -> type[Exception] | None:
    """The builtin class plain peft raises for this load: the first finding that records one."""
    for diagnosis in report.causes:
        kind = getattr(builtins, str(diagnosis.details.get(RAISED, "")), None)
        if isinstance(kind, type) and issubclass(kind, Exception):
            return kind
    return None


_COMPATIBLE: dict[tuple[type, type], type] = {}
_COMPATIBLE_LOCK = threading.Lock()


def _compatible(cls: type[AdapterLoadError], plain: type[Exception] | None) -> type[AdapterLoadError]:
    """``cls``, or its subclass that is also ``plain`` (created once per pair)."""
    if plain is None or issubclass(cls, plain):
        return cls
    with _COMPATIBLE_LOCK:
        kind = _COMPATIBLE.get((cls, plain))
        if kind is None:
            names = {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "__doc__": cls.__doc__}
            try:
                kind = type(cls.__name__, (cls, plain), {**names, "_declared": cls})
            except TypeError:  # two builtin classes whose instances cannot share a layout: keep ours
                kind = cls
            _COMPATIBLE[(cls, plain)] = kind
    return kind


class AdapterLoadError(RuntimeError):
    """An adapter does not fit the model, or could not be loaded. ``.report`` says why.

    It is a ``RuntimeError``, so code that already catches torch's load errors keeps working. Plain peft raises
    other builtin classes for some calls: a ``ValueError`` for a second trainable AdaLoRA adapter, or for a target
    module that does not exist. For those calls the error is also an instance of that class, so an
    ``except ValueError`` written for plain peft keeps catching it; the finding records the class.
    The error survives ``pickle``, report included.

    :param report: the :class:`LoadReport` of the failed load; ``err.report`` gives it back.

    ```python
    >>> try:
    ...     safe_load_adapter(other_base, adapter_dir)
    ... except AdapterLoadError as err:
    ...     print(isinstance(err, RuntimeError), err.report.primary.code)
    True dimension_mismatch

    ```

    ``str(err)`` is the rendered report::

        Cannot load adapter 'out/adapter' into LlamaForCausalLM: 0 missing, 0 unexpected, 8 size-mismatched keys.
        Most likely cause [config_mismatch/rank_mismatch]: adapter_config.json says r=32, but the weights were
        saved with rank 64 (8 tensors)
        Fix: pass repair=('rank',) to rebuild r / rank_pattern from the weights' shapes (lora_alpha is kept), ...
        Size mismatches (8):
          base_model.model.model.layers.{0...1}.self_attn.q_proj.lora_A.weight: checkpoint [64, 64], model [32, 64]
        The base model was left unchanged.
        Docs: https://github.com/safe-peft/safe-peft/blob/main/docs/causes/config_mismatch.md#rank_mismatch
    """

    _declared: type[AdapterLoadError] | None = None  # on a compatible subclass: the class it was made from

    def __new__(cls, report: LoadReport, *args: Any, **kwargs: Any) -> AdapterLoadError:
        kind = _compatible(cls._declared or cls, _plainly_raised(report))
        # the builtin base that lays the instance out (OSError's for a FileNotFoundError) creates it
        solid: Any = max((b for b in kind.__mro__ if b.__module__ == "builtins"), key=lambda b: b.__basicsize__)
        error: AdapterLoadError = solid.__new__(kind, report)
        return error

    def __init__(self, report: LoadReport) -> None:
        self.report = report
        super().__init__(str(report))

    __str__ = BaseException.__str__  # the report as given (KeyError's would quote it)

    def __reduce__(self) -> tuple[Any, ...]:
        return (self._declared or type(self), (self.report,))


class AdapterFormatError(AdapterLoadError):
    """An adapter file is unreadable, malformed or unsafe: a refused pickle, a bad header, a bad config.

    A subclass of :class:`AdapterLoadError`; ``err.code`` is its finding's code.

    :param report: the :class:`LoadReport` holding the finding about the file.

    ```python
    >>> import shutil
    >>> broken = shutil.copytree(adapter_dir, os.path.join(tmp, "broken"))
    >>> os.truncate(os.path.join(broken, "adapter_model.safetensors"), 1000)
    >>> try:
    ...     inspect_adapter(broken)
    ... except AdapterFormatError as err:
    ...     print(err.code)
    truncated_file

    ```

    ``str(err)`` names the file and what is wrong with it::

        Cannot load adapter 'out/adapter': 0 missing, 0 unexpected, 0 size-mismatched keys.
        Most likely cause [corrupt_checkpoint/truncated_file]: out/adapter/adapter_model.safetensors: tensor
        'base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight' ends at byte 2048 of the data region,
        which has only 1024 bytes (an incomplete download or copy?)
        Fix: download or copy the adapter again; the file is incomplete.
    """

    @classmethod
    def of(
        cls,
        code: str,
        message: str,
        *,
        fix: str | None = None,
        adapter: str = "",
        details: dict[str, Any] | None = None,
        **fill: Any,
    ) -> AdapterFormatError:
        """The error for a single finding about a file: cause, fix and opt-in come from the catalog entry of
        ``code`` (``fix`` overrides; ``fill`` fills the entry's fix template). A code the catalog marks as "the
        adapter is not there" gives an :class:`AdapterNotFoundError`."""
        from safe_peft._catalog import entry, finding

        diagnosis = finding(code, message, fix=fix, details=details, **fill)
        kind = AdapterNotFoundError if entry(code).missing and issubclass(AdapterNotFoundError, cls) else cls
        return kind(LoadReport(ok=False, causes=[diagnosis], adapter=adapter))

    @property
    def code(self) -> str:
        primary = self.report.primary
        return primary.code if primary is not None else ""


class AdapterNotFoundError(AdapterFormatError, FileNotFoundError):
    """There is no adapter where ``model_id`` points.

    That is: no such directory or hub repository, no ``adapter_config.json`` or weights file in it, or no such
    ``subfolder``. It is also a ``FileNotFoundError``.

    :param report: the :class:`LoadReport` holding the ``not_found`` finding.

    ```python
    >>> try:
    ...     inspect_adapter(os.path.join(tmp, "missing"))
    ... except FileNotFoundError as err:
    ...     print(type(err).__name__, err.code)
    AdapterNotFoundError not_found

    ```

    ``str(err)``::

        Cannot load adapter 'out/missing': 0 missing, 0 unexpected, 0 size-mismatched keys.
        Most likely cause [corrupt_checkpoint/not_found]: 'out/missing': no such local directory, and the hub did
        not provide adapter_config.json (LocalEntryNotFoundError)
        Fix: check the path or the repository id (and network access, revision and token).
    """

    def __init__(self, report: LoadReport) -> None:
        AdapterLoadError.__init__(self, report)
