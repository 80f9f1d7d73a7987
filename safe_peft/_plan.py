"""The load plan: read the adapter, view the model, compare, (opt-in) remap and repair, diagnose.

:func:`make_plan` is shared by :func:`diagnose` (which only returns the report) and by the
loader (which executes the plan), so that the prediction and the load cannot drift apart.
It reads headers and configs only, and never modifies the model.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from safe_peft._adapter_config import build_peft_config, read_config
from safe_peft._adapter_files import AdapterFiles, locate_adapter
from safe_peft._catalog import finding
from safe_peft._classify import Evidence, classify
from safe_peft._compare import compare_keys
from safe_peft._keys import rank_axis, role_of
from safe_peft._legacy import convert_config, convert_shapes, enabled_parts
from safe_peft._model_view import ExpectedKey, ModelView, expected_keys
from safe_peft._repairs import repair_config, vocab_target
from safe_peft._safetensors_header import read_header
from safe_peft.errors import AdapterFormatError
from safe_peft.report import Diagnosis, LoadReport
from safe_peft.rules import BUILTIN, RemapPlan, model_rules, plan_given, plan_remap, to_rules

if TYPE_CHECKING:
    from torch import nn

__all__ = ["LoadPlan", "diagnose", "make_plan", "read_checkpoint_shapes"]

Shape = tuple[int, ...]
HUB_KWARGS = ("subfolder", "revision", "cache_dir", "token", "use_auth_token", "local_files_only")


@dataclass(frozen=True)
class LoadPlan:
    """What the loader will do: which files, which config, which renames, and the verdict."""

    report: LoadReport
    files: AdapterFiles
    peft_config: Any
    checkpoint: dict[str, Shape]
    renames: dict[str, str] = field(default_factory=dict)
    dropped: tuple[str, ...] = ()
    vocab_size: int | None = None
    view: ModelView | None = None
    rules: tuple[str, ...] = ()  # names of the remap rules applied
    legacy: tuple[bool, ...] | None = None  # MergedLinear parts converted (repair="legacy")


def diagnose(
    base_model: nn.Module,
    model_id: str | os.PathLike[str],
    adapter_name: str = "default",
    *,
    remap: object = None,
    repair: tuple[str, ...] | list[str] = (),
    allow_pickle: bool = False,
    **peft_kwargs: Any,
) -> LoadReport:
    """Predict what ``safe_load_adapter`` with the same arguments would do, without loading.

    Reads ``adapter_config.json`` and the safetensors header only (no tensor data), works on
    a model built on the meta device, and never modifies ``base_model``. Data faults that
    only the tensor values show (NaN / Inf, an all-zero lora_B) are found by the load alone.
    Format faults are reported too (not raised), so one call answers for any adapter.
    """
    try:
        return make_plan(
            base_model,
            model_id,
            adapter_name,
            remap=remap,
            repair=tuple(repair),
            allow_pickle=allow_pickle,
            peft_kwargs=peft_kwargs,
        ).report
    except AdapterFormatError as exc:
        return exc.report


def make_plan(
    model: nn.Module,
    model_id: str | os.PathLike[str],
    adapter_name: str = "default",
    *,
    remap: object = None,
    repair: tuple[str, ...] = (),
    allow_pickle: bool = False,
    peft_kwargs: Mapping[str, Any] | None = None,
) -> LoadPlan:
    """Build the plan for loading ``model_id`` into ``model`` (raises AdapterFormatError for bad files)."""
    kwargs = dict(peft_kwargs or {})
    location = os.fspath(model_id)
    files = locate_adapter(
        model_id,
        subfolder=kwargs.get("subfolder"),
        allow_pickle=allow_pickle,
        hub_kwargs={k: kwargs[k] for k in HUB_KWARGS if k in kwargs},
    )
    warnings: list[Diagnosis] = list(files.warnings)
    if not files.config_path:
        return _foreign_plan(model, files, adapter_name, remap, location, warnings)
    raw = read_config(files.config_path, adapter=location)
    warnings += raw.warnings
    config_causes: list[Diagnosis] = []
    config_repairs: list[str] = []
    if kwargs.get("config") is not None:
        peft_config = copy.deepcopy(kwargs["config"])
        config_data = peft_config.to_dict()
    else:
        built = build_peft_config(raw, adapter=location, repair=tuple(repair))
        peft_config, config_causes, config_repairs = built.config, built.causes, built.repairs
        warnings += built.warnings
        config_data = raw.data
    original = read_checkpoint_shapes(files)
    legacy = enabled_parts(raw.data) if "legacy" in repair and kwargs.get("config") is None else None
    if legacy is not None:
        original = convert_shapes(original, legacy)
    checkpoint, converted = _convert_for_transformers(
        model, peft_config, original, adapter_name, kwargs.get("key_mapping")
    )
    warnings += converted
    view = expected_keys(model, peft_config, adapter_name)
    checkpoint = _named_keys_peft_accepts(checkpoint, view.expected, adapter_name)
    diff = compare_keys(checkpoint, view.expected)
    relaxed = _rank_relaxed(view) if "rank" in repair else None
    candidates = BUILTIN + model_rules(view.base_model_prefix)
    plan: RemapPlan | None = None
    renames: dict[str, str] = {}
    dropped: tuple[str, ...] = ()
    findings: list[Diagnosis] = []
    if remap is not None and remap != "auto":
        plan = plan_given(to_rules(remap), checkpoint, view.expected, relaxed)
        if not plan.exact:
            findings.append(_remap_refused(plan, "the given remap rules"))
    elif diff.missing or diff.unexpected:
        plan = plan_remap(checkpoint, view.expected, candidates, same_shape=relaxed)
        if remap == "auto" and not plan.exact:
            findings.append(_remap_refused(plan, "no combination of the built-in rules"))
    applied: tuple[str, ...] = ()
    if remap is not None and plan is not None and plan.exact:
        renames, dropped, applied = plan.renames, plan.dropped, tuple(r.name for r in plan.rules)
        checkpoint = {renames.get(k, k): s for k, s in checkpoint.items() if k not in set(dropped)}
        diff = compare_keys(checkpoint, view.expected)
        plan = None
    repairs: list[str] = [convert_config(raw.data)[1]] if legacy is not None else []
    repairs += config_repairs
    vocab_size = None
    if repair:
        peft_config, repaired = repair_config(peft_config, tuple(repair), checkpoint, view.module_names)
        repairs += repaired
        if repairs:
            config_data = {**config_data, **_changed(peft_config)}
            view = expected_keys(model, peft_config, adapter_name)
        if "vocab" in repair:
            vocab_size = vocab_target(view, checkpoint)
            if vocab_size is not None:
                view = _resized(view, checkpoint, vocab_size)
                current = _vocab_rows(model)
                change = "grow" if current is None or vocab_size > current else "shrink"
                repairs.append(f"vocab: {change} the base model's token embeddings from {current} to {vocab_size} rows")
        diff = compare_keys(checkpoint, view.expected)
    evidence = Evidence(diff, checkpoint, view, config_data, plan)
    if plan is not None and not plan.exact and _only_shapes_differ(plan, checkpoint, view):
        # the keys line up after the closest renames: the shapes are what is wrong, so classify those
        moved = {plan.renames.get(k, k): s for k, s in checkpoint.items() if k not in set(plan.dropped)}
        evidence = Evidence(compare_keys(moved, view.expected), moved, view, config_data, None)
        causes = _with_layout(classify(evidence), plan, given=remap is not None and remap != "auto") + findings
    else:
        causes = classify(evidence) + findings  # the real cause first
    causes = config_causes + causes
    from safe_peft._sharding import sharding_findings  # hook: layouts a sharded model cannot take

    causes += sharding_findings(model, peft_config, view.expected, tuple(repair), checkpoint)
    report = LoadReport(
        ok=not causes and diff.ok,
        missing=diff.missing,
        unexpected=diff.unexpected,
        size_mismatches=diff.size_mismatches,
        causes=causes,
        warnings=warnings,
        renames=dict(renames),
        repairs=repairs,
        adapter=location,
        model_class=view.model_class,
        adapter_name=adapter_name,
    )
    return LoadPlan(report, files, peft_config, checkpoint, dict(renames), dropped, vocab_size, view, applied, legacy)


def _foreign_plan(
    model: nn.Module, files: AdapterFiles, adapter_name: str, remap: object, location: str, warnings: list[Diagnosis]
) -> LoadPlan:
    """A weights file without a PEFT config: convert a kohya LoRA (with remap='auto'), refuse anything else."""
    from safe_peft._foreign import convert_kohya, is_kohya

    header = read_header(files.weights_path)
    shapes = {k: t.shape for k, t in header.tensors.items()}
    if not is_kohya(shapes):
        raise AdapterFormatError.of(
            "missing_config",
            f"{files.directory}: has no adapter_config.json, and {os.path.basename(files.weights_path)} is not a "
            "LoRA layout safe_peft can convert",
            fix="pass the directory peft's save_pretrained() wrote.",
            adapter=location,
        )
    conversion = convert_kohya(shapes, (n for n, _ in model.named_modules()), lambda k: _read_scalar(header, k))
    configs: dict[Any, Any] = {}
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    configs.update(PEFT_TYPE_TO_CONFIG_MAPPING)
    peft_config = configs["LORA"](**conversion.config)
    moved = {conversion.renames.get(k, k): s for k, s in shapes.items() if k not in set(conversion.dropped)}
    view = expected_keys(model, peft_config, adapter_name)
    diff = compare_keys(moved, view.expected)
    exact = not conversion.unresolved and diff.ok and view.error is None
    kohya = finding(
        "kohya",
        f"{files.weights_path}: a kohya-ss LoRA ({len(conversion.renames) // 2} modules, no adapter_config.json), "
        + (
            "whose modules all map onto this model"
            if exact
            else f"which does not map onto {type(model).__name__} ({len(conversion.unresolved)} names unresolved)"
        ),
        remap="auto" if exact else None,
        details={"format": "kohya", "unresolved": conversion.unresolved[:20], "config": conversion.config},
        advice="pass remap='auto' to convert it (lora_down -> lora_A, lora_up -> lora_B, alpha -> alpha_pattern)"
        if exact
        else "load it with the tool that wrote it (diffusers' load_lora_weights for image models).",
    )
    converted = remap == "auto" and exact
    report = LoadReport(
        ok=converted,
        causes=[] if converted else [kohya],
        warnings=warnings,
        renames=dict(conversion.renames) if converted else {},
        repairs=[f"config: synthesized from the kohya file: {conversion.config}"] if converted else [],
        adapter=location,
        model_class=view.model_class,
        adapter_name=adapter_name,
    )
    if not converted:
        return LoadPlan(report, files, peft_config, shapes, view=view)
    return LoadPlan(
        report, files, peft_config, moved, dict(conversion.renames), conversion.dropped, None, view, ("kohya",)
    )


def _read_scalar(header: Any, key: str) -> float:
    """The value of a one-element tensor (a kohya ``alpha``): a few bytes read at its offset."""
    import struct

    info = header.tensors[key]
    formats = {"F32": "<f", "F64": "<d", "F16": "<e", "I64": "<q", "I32": "<i"}
    with open(header.path, "rb") as f:
        f.seek(header.data_start + info.begin)
        raw = f.read(info.end - info.begin)
    if info.dtype == "BF16" and len(raw) == 2:
        return float(struct.unpack("<f", b"\x00\x00" + raw)[0])
    if info.dtype not in formats or len(raw) != struct.calcsize(formats[info.dtype]):
        raise AdapterFormatError.of(
            "bad_entry", f"{header.path}: {key!r} is not a scalar alpha", adapter=header.path
        )
    return float(struct.unpack(formats[info.dtype], raw)[0])


def read_checkpoint_shapes(files: AdapterFiles) -> dict[str, Shape]:
    """Key -> shape of the adapter weights: from the safetensors header, or (allowed pickles) the file."""
    if files.weights_format == "safetensors":
        return {k: t.shape for k, t in read_header(files.weights_path).tensors.items()}
    return {k: tuple(v.shape) for k, v in load_pickle(files.weights_path).items()}


def load_pickle(path: str) -> dict[str, Any]:
    """``torch.load(weights_only=True)``: a pickle that asks for anything but tensors is refused."""
    import pickle

    import torch

    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for refused or damaged pickles
        foreign = _pickle_globals(path)
        if not foreign and not isinstance(exc, pickle.UnpicklingError):
            raise AdapterFormatError.of(
            "unreadable_pickle",
                f"{path}: cannot be read ({type(exc).__name__}: {str(exc)[:200]})",
                adapter=path,
            ) from None
        raise AdapterFormatError.of(
            "pickle_payload_refused",
            f"{path}: the pickle asks to run code or build objects that are not tensors; it was refused "
            f"without running ({str(exc).splitlines()[0][:200]})",
            adapter=path,
            details={"globals": foreign[:20]},
        ) from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and hasattr(v, "shape") for k, v in data.items()):
        raise AdapterFormatError.of(
            "not_a_state_dict",
            f"{path}: does not hold a dict of tensors",
            adapter=path,
        )
    return data


_SAFE_GLOBAL_PREFIXES = ("torch.", "collections.OrderedDict", "builtins.set", "builtins.frozenset")


def _pickle_globals(path: str) -> list[str]:
    """Globals a pickle would import, found by reading its opcodes (nothing is executed).

    Only names outside torch's own tensor-rebuilding helpers are returned.
    """
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                member = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                if member is None:
                    return []
                data = archive.read(member)
        else:
            with open(path, "rb") as f:
                data = f.read(64 * 1024 * 1024)
    except (OSError, zipfile.BadZipFile):
        return []
    names: list[str] = []
    strings: list[str] = []
    try:
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name == "GLOBAL" and isinstance(arg, str):
                names.append(arg.replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
            if isinstance(arg, str):
                strings.append(arg)
    except Exception:  # noqa: BLE001 - a damaged stream ends the scan; what was found still counts
        pass
    return [n for n in names if not n.startswith(_SAFE_GLOBAL_PREFIXES)]


def _convert_for_transformers(
    model: nn.Module, config: Any, checkpoint: dict[str, Shape], adapter_name: str, key_mapping: Any = None
) -> tuple[dict[str, Shape], list[Diagnosis]]:
    """Apply the key conversions peft itself applies on load, so the prediction follows peft.

    transformers 4.52-4.x: the model's ``_checkpoint_conversion_mapping`` (or the caller's ``key_mapping``),
    first matching pattern per key, under the ``base_model.model.`` prefix, as ``load_peft_weights`` does;
    transformers 5: peft's own conversion for architectures with a registered weight conversion.
    """
    converted = dict(checkpoint)
    mapping = key_mapping if key_mapping else getattr(model, "_checkpoint_conversion_mapping", None)
    if mapping and not getattr(config, "is_prompt_learning", False):
        converted = {_map_key(k, mapping): s for k, s in converted.items()}
    from safe_peft._model_view import _has_weight_conversions

    if _has_weight_conversions(model):
        import torch
        from peft.utils.transformers_weight_conversion import convert_peft_adapter_state_dict_for_transformers

        fake = {k: torch.empty(s, device="meta") for k, s in converted.items()}
        try:
            result = convert_peft_adapter_state_dict_for_transformers(model, config, fake, adapter_name)
            converted = {k: tuple(v.shape) for k, v in result.items()}
        except Exception:  # noqa: BLE001 - the real load will raise with context if conversion fails
            pass
    changed = [k for k in checkpoint if k not in converted]
    if not changed:
        return converted, []
    new = next(k for k in converted if k not in checkpoint)
    return converted, [
        finding(
            "converted_layout",
            f"{len(changed)} keys were saved in an older transformers layout and are converted by peft on load "
            f"(e.g. {changed[0]!r} -> {new!r})",
            details={"converted": len(changed)},
        )
    ]


def _named_keys_peft_accepts(
    checkpoint: dict[str, Shape], expected: Mapping[str, ExpectedKey], adapter_name: str
) -> dict[str, Shape]:
    """Keys saved with the adapter name inside (``lora_A.default.weight``, from a raw ``state_dict()``) that the
    installed peft loads as they are: since peft maps checkpoint keys onto the model's keys structurally, a key
    that already *is* a model key passes through. Older peft inserts the name a second time, so only then do
    these keys stay unexpected (and ``remap='auto'`` offers ``adapter_name_out``)."""
    from peft.tuners.tuners_utils import BaseTuner

    if not hasattr(BaseTuner, "_remap_adapter_state_dict_for_load"):
        return checkpoint
    from peft.tuners.tuners_utils import _remove_adapter_name_from_state_dict_key as remove

    moved = {}
    for key in checkpoint:
        if key not in expected and f".{adapter_name}" in key:
            plain = remove(key, adapter_name)
            fits = plain in expected and plain not in checkpoint and expected[plain].role != "modules_to_save"
            if plain != key and fits:
                moved[key] = plain
    if not moved:
        return checkpoint
    return {moved.get(k, k): s for k, s in checkpoint.items()}


def _map_key(key: str, mapping: Mapping[str, str]) -> str:
    import re

    prefix = (
        "base_model.model."
        if key.startswith("base_model.model.")
        else "base_model."
        if key.startswith("base_model.")
        else ""
    )
    if not prefix:
        return key
    rest = key[len(prefix) :]
    for pattern, replacement in mapping.items():
        new, count = re.subn(pattern, replacement, rest)
        if count:
            return prefix + new
    return key


def _rank_relaxed(view: ModelView) -> Any:
    def same(key: str, have: Shape, want: Shape) -> bool:
        if have == want:
            return True
        rank_dim = rank_axis(role_of(key))
        if len(have) != len(want) or rank_dim is None:
            return False
        return all(a == b for i, (a, b) in enumerate(zip(have, want, strict=False)) if i != rank_dim)

    return same


def _remap_refused(plan: RemapPlan, what: str) -> Diagnosis:
    closest = ", ".join(r.name for r in plan.rules) or "none"
    return finding(
        "remap_not_exact",
        f"{what} makes every key match exactly, so nothing was renamed; closest: {closest}, "
        f"{plan.remaining} problems left (e.g. {plan.problems[0] if plan.problems else '-'})",
        details={"closest_rules": [r.name for r in plan.rules], "problems": list(plan.problems)},
    )


def _with_layout(causes: list[Diagnosis], plan: RemapPlan, given: bool) -> list[Diagnosis]:
    """The shape findings of renamed keys, plus the renames they need: one fix naming both opt-ins. The
    renames are the caller's own rules (``given``) or built-in ones (then ``remap='auto'`` applies them)."""
    names = ", ".join(r.name for r in plan.rules)
    how = "the same remap= rules" if given else f"remap='auto' (applies {names})"
    layout = finding(
        "user_remap" if given else plan.rules[0].name,
        f"the keys are also laid out differently: {'; '.join(r.description for r in plan.rules)}",
        fix=f"pass {how} together with the fix above.",
        remap=None if given else "auto",
        details={"rules": [r.name for r in plan.rules], "renamed": len(plan.renames)},
    )
    if causes and causes[0].repair:
        first = causes[0]
        combined = replace(first, remap=layout.remap, fix=f"{first.fix} The keys also need {how}.")
        return [combined, *causes[1:], layout]
    return [*causes, layout]


def _only_shapes_differ(plan: RemapPlan, checkpoint: Mapping[str, Shape], view: ModelView) -> bool:
    landed = {plan.renames.get(k, k) for k in checkpoint if k not in set(plan.dropped)}
    required = {k for k, e in view.expected.items() if e.required}
    return bool(plan.renames) and landed <= view.expected.keys() and required <= landed


def _vocab_rows(model: nn.Module) -> int | None:
    getter = getattr(model, "get_input_embeddings", None)
    layer = getter() if callable(getter) else None
    weight = getattr(layer, "weight", None)
    return int(weight.shape[0]) if weight is not None else None


def _changed(config: Any) -> dict[str, Any]:
    return {k: getattr(config, k) for k in ("r", "rank_pattern", "use_dora", "target_modules", "modules_to_save")}


def _resized(view: ModelView, checkpoint: Mapping[str, Shape], vocab: int) -> ModelView:
    """The view after ``resize_token_embeddings(vocab)``: vocabulary-sized dims take the new size."""
    expected: dict[str, ExpectedKey] = {}
    for key, want in view.expected.items():
        have = checkpoint.get(key)
        if have is not None and len(have) == len(want.shape) and have != want.shape:
            dims = [h if (h == vocab and w != h) else w for h, w in zip(have, want.shape, strict=False)]
            want = replace(want, shape=tuple(dims))
        expected[key] = want
    return replace(view, expected=expected)
