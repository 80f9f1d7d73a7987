"""Version facts as data: which peft release introduced each config key, and known breaking changes.

Kept as plain tables so that the diagnosis (and tests) can vary them; rendered in docs/compatibility.md.
Comparisons use ``packaging.version``.
"""

from __future__ import annotations

from dataclasses import dataclass

from packaging.version import InvalidVersion, Version

SAFE_PEFT_VERSION = "0.1.0.dev0"  # this package's own release (pyproject.toml says the same; a test holds them equal)

__all__ = [
    "CONFIG_KEY_SINCE",
    "KNOWN_CHANGES",
    "SAFE_PEFT_VERSION",
    "SHARDED_LOAD_TORCH_SINCE",
    "TASK_CLASS",
    "TASK_HEADS",
    "TASK_NEEDS",
    "hotswap_copies",
    "introduced_in",
    "is_newer",
    "load_adapter_facts",
    "torch_at_least",
]

# peft's hot-swap writes a tensor of the same shape with copy_ from this release on; before it, it swapped the new
# tensor object in (torch.utils.swap_tensors) on a model that is not compiled, so the module then holds a plain tensor
# of the file's dtype without requires_grad (utils/hotswap.py, hotswap_adapter_from_state_dict; checked in 0.17.1,
# 0.18.0, 0.18.1, 0.19.0 and 0.20.0).
HOTSWAP_COPIES_SINCE = "0.20.0"

# PeftModel.load_adapter for a new adapter name, release by release (read in the 0.17.1, 0.18.0, 0.18.1, 0.19.0,
# 0.20.0, 0.21.0, 0.21.1 and 0.21.2 wheels): it passes autocast_adapter_dtype on to add_adapter from 0.19.0, and
# calls set_requires_grad(adapter_name) for a trainable load from 0.21.0; the rest of it is the same in all of them.
# safe_peft does those steps itself (safe_peft._load.assign) only for the releases it read, below
# LOAD_ADAPTER_READ_BELOW.
LOAD_ADAPTER_PASSES_AUTOCAST_SINCE = "0.19.0"
LOAD_ADAPTER_SETS_REQUIRES_GRAD_SINCE = "0.21.0"
LOAD_ADAPTER_READ_BELOW = "0.22"

# The torch release that loading into a sharded model needs (safe_peft._model.sharding): the oldest on which the sharded
# suite (tests/test_distributed.py: FSDP2 and parallelize_module, loads, training, failures) passes, with peft 0.17.1
# and transformers 4.56.2: it passes on 2.9.0, 2.10.0 and 2.13.0. On 2.7.0 and 2.8.0 the loads and refusals pass but
# an adapter placed under FSDP2 then trains to other values than in one process. torch 2.6 lacks
# fully_shard(..., ignored_params=) and parallelize_module(..., src_data_rank=), which the placement calls; FSDP2
# became public (torch.distributed.fsdp.fully_shard) in 2.6, DTensor in 2.5. Older torch gets a load_before_sharding
# refusal naming this release.
SHARDED_LOAD_TORCH_SINCE = "2.9"

# peft task_type -> the transformers Auto class a model of that task is loaded with
TASK_CLASS: dict[str, str] = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "FEATURE_EXTRACTION": "AutoModel",
}
# peft task_type -> the heads its PeftModel class adds to modules_to_save by itself
TASK_HEADS: dict[str, tuple[str, ...]] = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}
# peft task_type -> what its PeftModel class takes from the base model when it wraps it (peft_model.py: the
# PeftModelForCausalLM / ForSeq2SeqLM constructors read these attributes, so a model without them cannot be wrapped).
# peft <= 0.17 also read `_prepare_encoder_decoder_kwargs_for_generation` for Seq2SeqLM, which every transformers 4
# generating model has; peft >= 0.18 reads only what is listed here, and transformers 5 models lack the other.
TASK_NEEDS: dict[str, tuple[str, ...]] = {
    "CAUSAL_LM": ("prepare_inputs_for_generation",),
    "SEQ_2_SEQ_LM": ("prepare_inputs_for_generation",),
}

# LoraConfig keys and the peft releases that accept them (older peft raises TypeError on them or drops them).
# Exact releases where checked against peft's history; "> 0.17.1" where all that is verified (by this project's
# fixtures) is that 0.17.1 lacks the key and 0.21.2 has it.
CONFIG_KEY_SINCE: dict[str, str] = {
    "rank_pattern": ">= 0.6.0",
    "alpha_pattern": ">= 0.6.0",
    "loftq_config": ">= 0.7.0",
    "use_rslora": ">= 0.8.0",
    "megatron_config": ">= 0.8.0",
    "megatron_core": ">= 0.8.0",
    "use_dora": ">= 0.9.0",
    "layer_replication": ">= 0.10.0",
    "runtime_config": ">= 0.11.0",
    "exclude_modules": ">= 0.14.0",
    "eva_config": ">= 0.14.0",
    "lora_bias": ">= 0.14.0",
    "corda_config": ">= 0.15.0",
    "trainable_token_indices": ">= 0.15.0",
    "target_parameters": ">= 0.17.0",
    "qalora_group_size": ">= 0.17.0",
    "use_qalora": ">= 0.17.0",
    "alora_invocation_tokens": "> 0.17.1",
    "arrow_config": "> 0.17.1",
    "ensure_weight_tying": "> 0.17.1",
    "peft_version": "> 0.17.1",
    "kasa_config": "> 0.17.1",
    "lora_ga_config": "> 0.17.1",
    "monteclora_config": "> 0.17.1",
    "use_bdlora": "> 0.17.1",
    "velora_config": "> 0.17.1",
}


@dataclass(frozen=True)
class KnownChange:
    """A release that changed how adapters are saved or loaded, and what fixes adapters from before it."""

    package: str
    version: str
    what: str
    fix: str


KNOWN_CHANGES: tuple[KnownChange, ...] = (
    KnownChange(
        "peft",
        "0.3.0",
        "LoRA for fused attention (MergedLinear, `enable_lora`, 3-D lora_B) was removed; "
        "adapters of peft <= 0.2 no longer load",
        "convert the weights to plain LoRA (block-diagonal lora_B)",
    ),
    KnownChange(
        "peft",
        "0.6.0",
        "adapters are saved as adapter_model.safetensors by default (before: .bin pickles)",
        "allow_pickle=True, or `safe-peft fix` to convert",
    ),
    KnownChange(
        "peft",
        "0.9.0",
        "DoRA: `lora_magnitude_vector` tensors and `use_dora` in the config",
        "repair=('dora',) when the flag was lost",
    ),
    KnownChange(
        "transformers",
        "4.52.0",
        "vision-language models moved `language_model.model.*` to "
        "`model.language_model.*` and `language_model.lm_head` to `lm_head`",
        "remap='auto' (vlm_relocation)",
    ),
    KnownChange(
        "transformers",
        "5.0.0",
        "MoE experts fused (e.g. Mixtral `block_sparse_moe` -> `mlp.experts`); peft converts LoRA keys on load",
        "load with peft >= 0.18 (it converts the keys)",
    ),
)


def hotswap_copies(peft_version: str) -> bool:
    """Whether this peft's hot-swap copies same-shape tensors into place on a model that is not compiled."""
    try:
        return Version(peft_version) >= Version(HOTSWAP_COPIES_SINCE)
    except InvalidVersion:
        return False


@dataclass(frozen=True)
class LoadAdapterFacts:
    """What the installed peft's ``load_adapter`` does for a new adapter name (see LOAD_ADAPTER_*)."""

    read: bool  # a release whose load_adapter was read (safe_peft may then do its steps itself)
    passes_autocast: bool
    sets_requires_grad: bool


def load_adapter_facts(peft_version: str | None = None) -> LoadAdapterFacts:
    """The facts for ``peft_version`` (default: the installed peft)."""
    if peft_version is None:
        import peft

        peft_version = peft.__version__
    try:
        version = Version(peft_version)
    except InvalidVersion:
        return LoadAdapterFacts(read=False, passes_autocast=True, sets_requires_grad=True)
    released = Version(version.base_version)  # a dev build of 0.22 (peft's main branch) is not 0.21's code
    return LoadAdapterFacts(
        read=not version.is_devrelease and Version("0.17.1") <= released < Version(LOAD_ADAPTER_READ_BELOW),
        passes_autocast=version >= Version(LOAD_ADAPTER_PASSES_AUTOCAST_SINCE),
        sets_requires_grad=version >= Version(LOAD_ADAPTER_SETS_REQUIRES_GRAD_SINCE),
    )


def torch_at_least(torch_version: str, since: str) -> bool:
    """Whether ``torch_version`` (``torch.__version__``, local tag and pre-release included) is release ``since`` or
    later; a version that does not parse counts as recent (a source build of torch's main branch)."""
    try:
        return Version(Version(torch_version).base_version) >= Version(since)
    except InvalidVersion:
        return True


def introduced_in(key: str) -> str | None:
    """The peft releases that accept a config key (``">= 0.14.0"``), if known."""
    return CONFIG_KEY_SINCE.get(key)


def is_newer(saved: str | None, installed: str) -> bool:
    """Whether ``saved`` is a newer release than ``installed`` (False when either does not parse)."""
    if not saved or not isinstance(saved, str) or len(saved) > 64:  # no release string is longer (hostile ones are)
        return False
    try:
        return Version(saved).release[:2] > Version(installed).release[:2]
    except (InvalidVersion, ValueError):  # ValueError: a release number beyond int()'s digit limit
        return False
