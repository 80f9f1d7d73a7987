"""The catalog of findings: every code safe_peft can report, with its cause, rank, fatality, fix and opt-in.

A finding is built from its entry (:func:`finding`), so the cause, the fix text and the opt-in that fixes it are
written once, here. Classification ranks findings by :attr:`Entry.rank`; lenient loading (``strict=False``) stops
only at :attr:`Entry.fatal` ones; the docs have a section per code under its cause's page, and their test
iterates this catalog. Adding a cause: one entry here and one detector (see ``_classify.DETECTORS``).

Ranks: 0 the data cannot be read or is not a PEFT adapter; 1 the model or the layout is the problem (wrong class,
wrong wrapper, keys laid out differently); 2 shapes and keys the model does not take; 3 keys the checkpoint lacks;
9 nothing known explains it. Within a rank, the finding that explains more keys comes first.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from safe_peft.report import Cause, Diagnosis

__all__ = [
    "CATALOG",
    "Entry",
    "entry",
    "fatal",
    "finding",
    "layout_entry",
    "order",
    "rank",
    "register",
    "without_spent_fix",
]


@dataclass(frozen=True)
class Entry:
    """One finding code. ``fix`` is a ``str.format`` template over the finding's details."""

    code: str
    cause: Cause
    rank: int
    fatal: bool = False
    fix: str = ""
    remap: str | None = None
    repair: tuple[str, ...] = ()
    warning: bool = False  # reported in LoadReport.warnings, never a cause
    missing: bool = False  # "the adapter is not there": raised as AdapterNotFoundError (a FileNotFoundError)


_C = Cause
_REINSTALL = "save the adapter again with save_pretrained(), or restore adapter_config.json from its source."
_SAVE_AGAIN = "save the adapter again with peft's save_pretrained(); this file is malformed."
_TRAINED_BASE = "load the adapter into the base model it was trained on (base_model_name_or_path={base!r})."

_ENTRIES: tuple[Entry, ...] = (
    # -- files: where the adapter is and whether it can be read (rank 0, fatal) ---------------------------------
    Entry(
        "not_found",
        _C.CORRUPT_CHECKPOINT,
        0,
        True,
        "check the path or the repository id (and network access, revision and token).",
        missing=True,
    ),
    Entry(
        "unreadable_path",
        _C.CORRUPT_CHECKPOINT,
        0,
        True,
        "check the path: it may be a broken symbolic link, a link loop or not readable by this user.",
    ),
    Entry("not_a_directory", _C.CORRUPT_CHECKPOINT, 0, True, "pass the directory instead: {parent!r}."),
    Entry(
        "subfolder_escapes",
        _C.CORRUPT_CHECKPOINT,
        0,
        True,
        "pass a subfolder inside the adapter directory, or the other directory itself as model_id.",
    ),
    Entry("missing_subfolder", _C.CORRUPT_CHECKPOINT, 0, True, "check the subfolder name; {hint}", missing=True),
    Entry("missing_config", _C.CORRUPT_CHECKPOINT, 0, True, "{hint}", missing=True),
    Entry(
        "missing_weights",
        _C.CORRUPT_CHECKPOINT,
        0,
        True,
        "save the adapter again with save_pretrained(), or copy its weights file into the directory.",
        missing=True,
    ),
    Entry(
        "pickle_refused",
        _C.UNSAFE_FORMAT,
        0,
        True,
        "if you trust its source, pass allow_pickle=True (it is then "
        "read with torch.load(weights_only=True), which runs no code), or convert it once with `safe-peft fix` "
        "to adapter_model.safetensors.",
    ),
    Entry(
        "pickle_payload_refused",
        _C.UNSAFE_FORMAT,
        0,
        True,
        "do not load this file: it is not a plain adapter state dict.",
    ),
    Entry(
        "stray_code_files",
        _C.UNSAFE_FORMAT,
        0,
        False,
        "delete them unless you know what they are; they are not part of a PEFT adapter.",
        warning=True,
    ),
    Entry("unreadable_pickle", _C.CORRUPT_CHECKPOINT, 0, True, "download or save the adapter again."),
    Entry("not_a_state_dict", _C.CORRUPT_CHECKPOINT, 0, True, "save the adapter with peft's save_pretrained()."),
    # -- adapter_config.json ---------------------------------------------------------------------------------------
    *(
        Entry(code, _C.CORRUPT_CHECKPOINT, 0, True, _REINSTALL)
        for code in ("unreadable_config", "bad_config_json", "config_missing_peft_type", "invalid_config")
    ),
    Entry(
        "model_config_as_adapter_config",
        _C.FOREIGN_FORMAT,
        0,
        True,
        "use the adapter_config.json that peft's save_pretrained() wrote next to the adapter weights.",
    ),
    Entry("runtime_config_ignored", _C.VERSION_SKEW, 0, False, warning=True),
    Entry(
        "unknown_peft_type",
        _C.VERSION_SKEW,
        0,
        True,
        "upgrade peft to the version that saved the adapter (peft_version={peft_version!r} in the config).",
    ),
    Entry(
        "legacy_merged_linear",
        _C.VERSION_SKEW,
        0,
        True,
        "pass repair=('legacy',) to convert it to plain LoRA "
        "(block-diagonal lora_B, r and lora_alpha scaled together so the scaling is unchanged).",
        repair=("legacy",),
    ),
    Entry("meaning_changing_config_key", _C.VERSION_SKEW, 0, False, "{advice}", repair=("config",)),
    Entry("unknown_config_keys", _C.VERSION_SKEW, 0, False, warning=True),
    Entry("other_adapter_copies", _C.VERSION_SKEW, 0, False, warning=True),
    # -- hostile input: values peft cannot compute with, and the bounds of safe_peft._bounds -------------------
    Entry(
        "config_too_large",
        _C.CORRUPT_CHECKPOINT,
        0,
        True,
        "restore the adapter_config.json that peft's save_pretrained() wrote (a few kilobytes).",
    ),
    Entry(
        "invalid_config_value",
        _C.CORRUPT_CHECKPOINT,
        0,
        True,
        "correct {key} in adapter_config.json (the value "
        "peft saved with these weights), or save the adapter again with save_pretrained().",
    ),
    Entry(
        "config_limit_exceeded",
        _C.CORRUPT_CHECKPOINT,
        0,
        True,
        "restore {key} as peft saved it; no real adapter comes near this limit (docs/security.md lists them).",
    ),
    Entry(
        "catastrophic_pattern",
        _C.UNSAFE_FORMAT,
        0,
        True,
        "rewrite {key} without nested repetition (e.g. "
        r"`.*\.(q_proj|v_proj)`), or list the module names instead of a pattern.",
    ),
    Entry("config_needs_package", _C.CONFIG_MISMATCH, 0, True, "install the package named above."),
    Entry(
        "too_many_tensors",
        _C.CORRUPT_CHECKPOINT,
        0,
        True,
        "an adapter with this many tensors is not a PEFT adapter of any real model; check the file's source.",
    ),
    Entry(
        "invalid_subfolder",
        _C.CORRUPT_CHECKPOINT,
        0,
        True,
        "pass subfolder= as the name of a directory inside the adapter directory.",
    ),
    Entry(
        "check_failed",
        _C.UNKNOWN,
        9,
        True,
        "run `safe-peft --debug check` on this adapter alone and report the traceback to safe_peft.",
    ),
    Entry(
        "invalid_adapter_name",
        _C.CONFIG_MISMATCH,
        0,
        True,
        "pick a non-empty name without '.' that is not a torch module attribute, e.g. adapter_name={suggestion!r}.",
    ),
    Entry(
        "newer_peft_version",
        _C.VERSION_SKEW,
        0,
        False,
        "if the load misbehaves, upgrade peft to {peft_version} or later.",
        warning=True,
    ),
    # -- safetensors header ----------------------------------------------------------------------------------------
    Entry(
        "truncated_file", _C.CORRUPT_CHECKPOINT, 0, True, "download or copy the adapter again; the file is incomplete."
    ),
    Entry(
        "not_safetensors",
        _C.CORRUPT_CHECKPOINT,
        0,
        True,
        "rename it to adapter_model.bin and load with allow_pickle=True if you trust its source.",
    ),
    *(
        Entry(code, _C.CORRUPT_CHECKPOINT, 0, True, _SAVE_AGAIN)
        for code in (
            "header_too_large",
            "bad_json",
            "duplicate_header_key",
            "bad_metadata",
            "bad_entry",
            "bad_dtype",
            "bad_shape",
            "bad_offsets",
            "trailing_bytes",
            "unreadable_file",
        )
    ),
    # -- formats that are not a PEFT adapter (rank 0) --------------------------------------------------------------
    Entry("kohya", _C.FOREIGN_FORMAT, 0, True, "{advice}"),
    *(
        Entry(
            code,
            _C.FOREIGN_FORMAT,
            0,
            True,
            "load it with the tool that wrote it (diffusers' load_lora_weights "
            "for image models), or convert it to PEFT's layout first.",
        )
        for code in ("lycoris", "diffusers")
    ),
    Entry(
        "merged_checkpoint",
        _C.FOREIGN_FORMAT,
        0,
        True,
        "load it as a model with from_pretrained(); it needs no adapter loading.",
    ),
    Entry(
        "zero3_empty_tensors",
        _C.CORRUPT_CHECKPOINT,
        0,
        True,
        "save again with the parameters gathered "
        "(DeepSpeed: zero3 gathered 16-bit weights / GatheredParameters; FSDP: FULL_STATE_DICT), or with "
        "accelerator.get_state_dict(model).",
    ),
    Entry(
        "empty_checkpoint",
        _C.CORRUPT_CHECKPOINT,
        0,
        True,
        "save the adapter again from the trained model, with its tensors gathered: under DeepSpeed ZeRO-3, "
        "with accelerator.get_state_dict(model) or zero3 gathered 16-bit weights; without a patched "
        "model.state_dict that filters the adapter's tensors a second time. A Trainer checkpoint saved this way "
        "holds nothing to resume from.",
    ),
    Entry(
        "unpaired_lora",
        _C.CORRUPT_CHECKPOINT,
        0,
        True,
        "save the adapter again; a partial file cannot be loaded correctly.",
    ),
    # -- the model, its class, its wrapper (rank 1) ----------------------------------------------------------------
    Entry(
        "target_modules_not_found",
        _C.WRONG_BASE_MODEL,
        1,
        True,
        "load the adapter into the base model it was trained on (see base_model_name_or_path in adapter_config.json).",
    ),
    Entry(
        "injection_rejected",
        _C.CONFIG_MISMATCH,
        1,
        False,
        "check target_modules and the layer types they name against the base model.",
    ),
    Entry("task_type_mismatch", _C.MODEL_CLASS_MISMATCH, 1, True, "{advice}"),
    Entry(
        "compiled_base",
        _C.MODEL_CLASS_MISMATCH,
        1,
        True,
        "pass the uncompiled module (model._orig_mod) and "
        "compile the PeftModel after loading: torch.compile(safe_load_adapter(model._orig_mod, ...)).",
    ),
    Entry(
        "missing_task_head",
        _C.MODEL_CLASS_MISMATCH,
        1,
        False,
        "load the base model with {wanted}.from_pretrained(...) and pass that model.",
    ),
    Entry(
        "vl_adapter_on_text_model",
        _C.MODEL_CLASS_MISMATCH,
        1,
        True,
        "load the adapter into the vision-language model it was trained with (its *ForConditionalGeneration "
        "class); the text-only model has no {where} for its weights.",
    ),
    Entry("base_config_differs", _C.WRONG_BASE_MODEL, 1, True, _TRAINED_BASE),
    Entry(
        "base_weights_differ",
        _C.WRONG_BASE_MODEL,
        1,
        True,
        "load the adapter into the base it was stamped on (the checkpoint itself, not a chat / newer / merged or "
        "fine-tuned variant); pass verify_base=False only if this base is the one you mean.",
    ),
    Entry("base_not_verified", _C.WRONG_BASE_MODEL, 1, False, warning=True),
    Entry(
        "bad_fingerprint",
        _C.CORRUPT_CHECKPOINT,
        0,
        True,
        "stamp the adapter again on its base (safe-peft stamp ADAPTER --base BASE), or pass verify_base=False.",
    ),
    Entry(
        "replicated_base",
        _C.WRONG_BASE_MODEL,
        1,
        False,
        "build the base model from its original config (e.g. "
        "from_pretrained(base_model_name_or_path) again, or a config object get_peft_model was not given) and "
        "load into that; strict=False loads it as plain peft does.",
    ),
    Entry("converted_layout", _C.VERSION_SKEW, 1, False, warning=True),
    Entry("conversion_breaks_keys", _C.VERSION_SKEW, 1, True, "{advice}"),
    Entry("remap_not_exact", _C.KEY_FORMAT, 1, False, "see the other causes below; a rename cannot fix them."),
    Entry("user_remap", _C.KEY_FORMAT, 1, False, "pass the same remap= rules together with the fix above."),
    # -- shapes and keys (ranks 2, 3) ------------------------------------------------------------------------------
    Entry(
        "rank_mismatch",
        _C.CONFIG_MISMATCH,
        2,
        True,
        "pass repair=('rank',) to rebuild r / rank_pattern from the "
        "weights' shapes (lora_alpha is kept), or restore the adapter_config.json that was saved with these "
        "weights.",
        repair=("rank",),
    ),
    Entry(
        "resized_embeddings",
        _C.VOCAB_SIZE_MISMATCH,
        2,
        True,
        "call model.resize_token_embeddings({vocab}) before "
        "loading (with the tokenizer the adapter was trained with), or pass repair=('vocab',) to do it as part of "
        "the load.",
        repair=("vocab",),
    ),
    Entry("mismatched_sizes_ignored", _C.VOCAB_SIZE_MISMATCH, 2, False, warning=True),
    Entry(
        "token_indices_out_of_range",
        _C.VOCAB_SIZE_MISMATCH,
        1,
        True,
        "resize the base model's embeddings to the "
        "vocabulary the adapter was trained with (model.resize_token_embeddings(len(tokenizer)), with the tokenizer "
        "saved with the adapter) before loading.",
    ),
    Entry(
        "dimension_mismatch",
        _C.WRONG_BASE_MODEL,
        2,
        True,
        _TRAINED_BASE[:-1] + "; no rename or repair can make these weights fit.",
    ),
    Entry(
        "dora_flag",
        _C.CONFIG_MISMATCH,
        2,
        False,
        "pass repair=('dora',) to set use_dora=true, or set it in adapter_config.json.",
        repair=("dora",),
    ),
    Entry("lora_bias_flag", _C.CONFIG_MISMATCH, 2, False, "set lora_bias=true in adapter_config.json."),
    *(Entry(code, _C.WRONG_BASE_MODEL, 2, False, _TRAINED_BASE) for code in ("fewer_layers", "more_layers")),
    Entry(
        "untargeted_modules",
        _C.CONFIG_MISMATCH,
        2,
        False,
        "add them to target_modules in adapter_config.json (or pass repair=('targets',)).",
        repair=("targets",),
    ),
    Entry(
        "unknown_modules",
        _C.WRONG_BASE_MODEL,
        2,
        True,
        "check that the base model is the one the adapter was trained on (base_model_name_or_path={base!r}).",
    ),
    Entry(
        "missing_modules_to_save",
        _C.CONFIG_MISMATCH,
        3,
        False,
        "remove them from modules_to_save if they were never trained, or save the adapter again.",
    ),
    Entry("incomplete_checkpoint", _C.CORRUPT_CHECKPOINT, 3, True, "save the adapter again; the file is incomplete."),
    Entry(
        "targets_without_weights",
        _C.CONFIG_MISMATCH,
        3,
        False,
        "make target_modules match the weights (repair=('targets',)), or save the adapter again.",
        repair=("targets",),
    ),
    Entry(
        "unexplained",
        _C.UNKNOWN,
        9,
        False,
        "compare base_model_name_or_path in adapter_config.json with the model you load.",
    ),
    # -- after loading (the loader's verification) -----------------------------------------------------------------
    Entry("left_on_meta", _C.CORRUPT_CHECKPOINT, 0, True, "save the adapter again; it lacks these tensors."),
    Entry(
        "non_finite_values",
        _C.CORRUPT_CHECKPOINT,
        0,
        True,
        "use an earlier checkpoint of the adapter, or train again with a lower learning rate.",
    ),
    Entry(
        "all_zero_lora_B",
        _C.CORRUPT_CHECKPOINT,
        0,
        False,
        "check that the adapter was saved after training.",
        warning=True,
    ),
    Entry(
        "verification_failed",
        _C.UNKNOWN,
        9,
        True,
        "report this to safe_peft with the adapter's config; the pre-check missed it.",
    ),
    Entry("load_failed", _C.UNKNOWN, 9, True, "see the causes above; the base model was restored."),
    # -- distributed saves and sharded loads ------------------------------------------------------------------------
    Entry(
        "fsdp_shard_saved",
        _C.CORRUPT_CHECKPOINT,
        0,
        True,
        "save again with the tensors gathered (full state "
        "dict on every rank, save_pretrained on rank 0), or merge the per-rank files: safe-peft fix DIR "
        "--merge-ranks --out OUT.",
    ),
    Entry(
        "tp_shard_saved",
        _C.CORRUPT_CHECKPOINT,
        0,
        True,
        "merge the per-rank files: safe-peft fix DIR --merge-ranks --out OUT; or save with full tensors.",
    ),
    Entry(
        "per_rank_shards",
        _C.CORRUPT_CHECKPOINT,
        0,
        True,
        "merge them into one adapter: safe-peft fix DIR --merge-ranks --out OUT.",
    ),
    Entry(
        "dcp_checkpoint",
        _C.CORRUPT_CHECKPOINT,
        0,
        True,
        "convert it to one state dict first, load it into the PeftModel and save_pretrained() the adapter.",
    ),
    Entry(
        "shards_incomplete",
        _C.CORRUPT_CHECKPOINT,
        0,
        True,
        "find the missing ranks' files; the others alone do not hold the whole adapter.",
    ),
    Entry(
        "replicas_differ",
        _C.CORRUPT_CHECKPOINT,
        0,
        True,
        "the ranks trained apart: use one rank's adapter, or "
        "train again with the adapter sharded (load it before sharding the model).",
    ),
    Entry(
        "shard_configs_differ",
        _C.CORRUPT_CHECKPOINT,
        0,
        True,
        "the files come from different runs: merge files saved by one run.",
    ),
    Entry(
        "load_before_sharding",
        _C.DISTRIBUTED,
        1,
        True,
        "load the adapter into the model before sharding it, then shard the PeftModel.",
    ),
    Entry(
        "rank_timeout",
        _C.DISTRIBUTED,
        0,
        True,
        "every rank must call safe_load_adapter with the same adapter at "
        "the same point of the program; if a rank is only slow, pass a larger collective_timeout=.",
    ),
    Entry(
        "ranks_disagree",
        _C.DISTRIBUTED,
        0,
        True,
        "give every rank the same adapter (one shared directory, or identical copies).",
    ),
    Entry("rank_failed", _C.DISTRIBUTED, 0, True, "see the error raised on that rank."),
    Entry(
        "adapter_not_placed",
        _C.DISTRIBUTED,
        1,
        True,
        "load the adapter into the model before sharding it, then shard the PeftModel.",
    ),
    # -- routes: further adapters, in-place loads, the Auto entry point, hot-swaps (safe_peft._plan.routes) ----
    Entry("adapter_name_taken", _C.CONFIG_MISMATCH, 0, True, "pass another adapter_name."),
    Entry(
        "adapter_type_mismatch",
        _C.CONFIG_MISMATCH,
        1,
        True,
        "load it into a separate model, or combine methods with peft's PeftMixedModel.",
    ),
    Entry("adapter_combination_refused", _C.CONFIG_MISMATCH, 1, True, "{advice}"),
    Entry(
        "reload_mismatch",
        _C.CONFIG_MISMATCH,
        1,
        True,
        "pass replace=True to replace the adapter with this "
        "checkpoint's own config (done only if it loads), or load it under another adapter_name.",
    ),
    Entry(
        "repair_not_on_route",
        _C.CONFIG_MISMATCH,
        0,
        True,
        "resize the embeddings of the base model before any "
        "adapter is loaded (model.resize_token_embeddings(n)), then load the adapters.",
    ),
    Entry(
        "not_injectable",
        _C.CONFIG_MISMATCH,
        0,
        True,
        "load it with safe_load_adapter(model, path), which wraps the model in a PeftModel.",
    ),
    Entry(
        "base_model_unknown",
        _C.BASE_MODEL_UNAVAILABLE,
        0,
        True,
        "load the base model yourself and pass it: safe_load_adapter({auto_class}.from_pretrained(BASE), {adapter!r}).",
    ),
    Entry(
        "base_model_unreachable",
        _C.BASE_MODEL_UNAVAILABLE,
        0,
        True,
        "check the name and network access (or "
        "HF_HUB_OFFLINE), or load the base model yourself and pass it: safe_load_adapter({auto_class}"
        ".from_pretrained(BASE), {adapter!r}).",
    ),
    Entry(
        "auto_class_unknown",
        _C.BASE_MODEL_UNAVAILABLE,
        0,
        True,
        "pass auto_class= (e.g. auto_class="
        "AutoModelForCausalLM), or load the base model yourself and pass it to safe_load_adapter.",
    ),
    Entry(
        "auto_import_refused",
        _C.BASE_MODEL_UNAVAILABLE,
        0,
        True,
        "if you trust that library, pass import_allowlist=[{library!r}].",
    ),
    Entry(
        "hotswap_not_loaded",
        _C.HOTSWAP_INCOMPATIBLE,
        0,
        True,
        "load the first adapter under that name "
        "(safe_load_adapter), then hot-swap; or pass the name of a loaded adapter ({loaded}).",
    ),
    Entry(
        "hotswap_unsupported",
        _C.HOTSWAP_INCOMPATIBLE,
        0,
        True,
        "load it as a further adapter (safe_load_adapter(model, path, adapter_name=...)) and switch with set_adapter.",
    ),
    Entry(
        "hotswap_merged", _C.HOTSWAP_INCOMPATIBLE, 0, True, "unmerge first (model.unmerge_adapter()), then hot-swap."
    ),
    Entry(
        "hotswap_config_differs",
        _C.HOTSWAP_INCOMPATIBLE,
        1,
        True,
        "hot-swap only adapters trained with the same {fields}; load this one as a further adapter instead.",
    ),
    Entry(
        "hotswap_new_targets",
        _C.HOTSWAP_INCOMPATIBLE,
        1,
        True,
        "hot-swap adapters whose target modules are a "
        "subset of the loaded one's (train them with the same target_modules), or load it as a further adapter.",
    ),
    Entry(
        "hotswap_rank_too_large",
        _C.HOTSWAP_INCOMPATIBLE,
        2,
        True,
        "call peft.utils.hotswap."
        "prepare_model_for_compiled_hotswap(model, target_rank={rank}) before compiling the model, then hot-swap.",
    ),
    Entry("hotswap_scaling_corrected", _C.HOTSWAP_INCOMPATIBLE, 2, False, warning=True),
    # -- state dicts given to the wrong loader ---------------------------------------------------------------------
    Entry(
        "adapter_into_base_model",
        _C.WRONG_LOADER,
        0,
        True,
        "use safe_load_adapter(base_model, adapter_dir) (or "
        "PeftModel.from_pretrained) with the directory peft saved, not model.load_state_dict(...).",
    ),
    Entry(
        "base_weights_into_peft_model",
        _C.WRONG_LOADER,
        0,
        True,
        "load base weights into the base model before "
        "wrapping it (or use peft_model.get_base_model().load_state_dict(...)); load adapters with "
        "safe_load_adapter.",
    ),
)

CATALOG: dict[str, Entry] = {e.code: e for e in _ENTRIES}


def register(new: Entry) -> Entry:
    """Add an entry (a new cause); codes are unique."""
    if new.code in CATALOG:
        raise ValueError(f"finding code {new.code!r} is already in the catalog")
    CATALOG[new.code] = new
    return new


def layout_entry(rule_name: str, cause: Cause) -> Entry:
    """The entry of a built-in rename rule: its name is the code of the finding "the keys need this rename"."""
    return Entry(
        rule_name, cause, 1, False, "pass remap='auto' (applies {rules}); every key then matches exactly.", remap="auto"
    )


def entry(code: str) -> Entry:
    """The entry of ``code`` (built-in rename rules register theirs when :mod:`safe_peft.rules` is imported)."""
    found = CATALOG.get(code)
    if found is None:
        raise KeyError(f"finding code {code!r} is not in the catalog")
    return found


def finding(
    code: str,
    message: str,
    *,
    fix: str | None = None,
    details: Mapping[str, Any] | None = None,
    remap: str | None = None,
    repair: tuple[str, ...] | None = None,
    **fill: Any,
) -> Diagnosis:
    """The :class:`Diagnosis` of ``code``: cause, opt-in and fix from the catalog (the fix template is filled with
    ``fill`` and ``details``); ``fix`` / ``remap`` / ``repair`` override the entry where a finding knows better."""
    from safe_peft._bounds import bounded_details, shorten  # findings echo input: bounded

    e = entry(code)
    facts = bounded_details(dict(details or {}))
    text = fix if fix is not None else e.fix.format(**{**facts, **bounded_details(fill)}) if e.fix else ""
    return Diagnosis(
        cause=e.cause,
        code=code,
        message=shorten(message),
        fix=shorten(text),
        remap=e.remap if remap is None else remap,
        repair=e.repair if repair is None else repair,
        details=facts,
    )


def without_spent_fix(diagnosis: Diagnosis, remap: object, repair: tuple[str, ...]) -> Diagnosis:
    """A finding never offers a fix that, applied, ends in the same finding again: one still found with its own
    opt-in already given (every repair it names among ``repair``, its remap the ``remap`` given) offers none."""
    if not diagnosis.remap and not diagnosis.repair:
        return diagnosis
    if not set(diagnosis.repair) <= set(repair) or (diagnosis.remap is not None and diagnosis.remap != remap):
        return diagnosis
    spent = diagnosis.fix_arguments()
    return replace(
        diagnosis,
        remap=None,
        repair=(),
        fix=f"{spent} was given and does not resolve this; {diagnosis.fix}",
        details={**diagnosis.details, "spent_fix": spent},
    )


# -- the order of findings when several apply ---------------------------------------------------------------------

# code -> the codes of the findings it explains: the trained base's config names the dimension the keys' story shows;
# a task model's adapter on a model its task's wrapper cannot take is why peft's injection fails
EXPLAINS: dict[str, frozenset[str]] = {
    "task_type_mismatch": frozenset(
        {"injection_rejected", "unknown_modules", "targets_without_weights", "unexplained"}
    ),
    "base_config_differs": frozenset(
        {
            "dimension_mismatch",
            "fewer_layers",
            "more_layers",
            "unknown_modules",
            "untargeted_modules",
            "targets_without_weights",
            "incomplete_checkpoint",
            "unexplained",
            "target_modules_not_found",
            "replicated_base",
        }
    ),
}


def proven(diagnosis: Diagnosis) -> bool:
    """Whether the finding's opt-in fix was proven exact while planning (a rename every key then fits)."""
    return bool(diagnosis.details.get("proven")) and bool(diagnosis.remap or diagnosis.repair)


def order(findings: list[Diagnosis]) -> list[Diagnosis]:
    """The one rule for ordering findings when several apply: a finding whose opt-in fix is proven exact comes
    first (what it fixes, a config difference included, is secondary); then a finding that explains another
    (:data:`EXPLAINS`) comes before the first one it explains; otherwise the order given (by :attr:`Entry.rank`,
    then by how many keys each explains) is kept."""
    result: list[Diagnosis] = [d for d in findings if proven(d)]
    first = len(result)
    for diagnosis in (d for d in findings if not proven(d)):
        explained = EXPLAINS.get(diagnosis.code, frozenset())
        at = next((i for i in range(first, len(result)) if result[i].code in explained), len(result))
        result.insert(at, diagnosis)
    return result


def rank(diagnosis: Diagnosis) -> int:
    """Where a finding sorts (lower first)."""
    try:
        return entry(diagnosis.code).rank
    except KeyError:
        return 9


def fatal(diagnosis: Diagnosis) -> bool:
    """Whether even lenient loading (``strict=False``) cannot get past this finding."""
    try:
        return entry(diagnosis.code).fatal
    except KeyError:
        return True
