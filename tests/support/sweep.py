"""The breadth sweep: for every transformers architecture that builds tiny and every PEFT method, save a trained
adapter with real peft and check the invariant "whatever plain peft loads exactly, safe_peft loads exactly and
quietly" (outputs equal to the trained adapter's, no report warning, ``diagnose`` ok on the real and on a
meta-device base).

Used by ``tests/test_sweep.py`` (a fixed sample, in ``make test``) and ``tests/support/run_sweep.py``
(``make sweep``: every case, in worker processes, writing docs/sweep.md). A case's result is plain data
(:class:`Result`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from tests.support.tiny import build_tiny, quiet

# mapping -> (transformers' auto mapping, peft task_type, whether the task head goes into modules_to_save)
MAPPINGS: dict[str, tuple[str, str | None, bool]] = {
    "causal_lm": ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "CAUSAL_LM", False),
    "seq2seq_lm": ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "SEQ_2_SEQ_LM", False),
    "seq_cls": ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "SEQ_CLS", True),
    "token_cls": ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "TOKEN_CLS", True),
    "qa": ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "QUESTION_ANS", True),
    "image_cls": ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", None, True),
    "speech_seq2seq": ("MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES", None, False),
    "ctc": ("MODEL_FOR_CTC_MAPPING_NAMES", None, True),
    "audio_cls": ("MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES", None, True),
    "image_text_to_text": ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "CAUSAL_LM", False),
    "bare": ("MODEL_MAPPING_NAMES", None, False),
}
TARGETS = ("default", "all-linear")
CASE_SECONDS = 120

# outcomes: the invariant holds (or does not apply), or it is broken
EXACT = "exact"  # plain peft and safe_peft both load exactly, quietly
PLAIN_INEXACT = "plain_inexact"  # plain peft itself does not reproduce the trained outputs (not ours to match)
EXCLUDED = "excluded"  # the case cannot be built (with the reason)
FALSE_REFUSAL = "false_refusal"
WRONG_RESULT = "wrong_result"
WARNED = "warned"
DIAGNOSE_DISAGREES = "diagnose_disagrees"
FAILURES = (FALSE_REFUSAL, WRONG_RESULT, WARNED, DIAGNOSE_DISAGREES)


@dataclass(frozen=True)
class Case:
    model_type: str
    class_name: str
    mapping: str
    method: str = "LORA"
    targets: str = "default"

    @property
    def name(self) -> str:
        return f"{self.mapping}/{self.model_type}/{self.method.lower()}/{self.targets}"


@dataclass
class Result:
    case: Case
    outcome: str
    detail: str = ""
    compared: str = ""  # "outputs" or "state"
    seconds: float = 0.0
    safe_cause: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "case": asdict(self.case), "name": self.case.name}


def lora_cases(mappings: tuple[str, ...] = tuple(MAPPINGS)) -> list[Case]:
    from transformers.models.auto import modeling_auto

    cases = []
    for mapping in mappings:
        names: dict[str, Any] = getattr(modeling_auto, MAPPINGS[mapping][0])
        for model_type, class_name in sorted(names.items()):
            if isinstance(class_name, (tuple, list)):
                class_name = class_name[0]
            for targets in TARGETS:
                cases.append(Case(model_type, class_name, mapping, "LORA", targets))
    return cases


# -- inputs and outputs ------------------------------------------------------------------------------------------


def _sub(config: Any, *names: str) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def make_inputs(model: torch.nn.Module) -> dict[str, Any]:
    """Inputs for one forward pass, from the model's main input name and its config."""
    config = model.config
    main = getattr(model, "main_input_name", "input_ids")
    g = torch.Generator().manual_seed(0)
    if main == "pixel_values":
        vision = _sub(config, "vision_config") or config
        size = _sub(vision, "image_size") or 32
        size = size if isinstance(size, int) else size[0]
        channels = _sub(vision, "num_channels") or 3
        return {"pixel_values": torch.randn(1, channels, size, size, generator=g)}
    if main == "input_values":
        return {"input_values": torch.randn(1, 4000, generator=g)}
    if main == "input_features":
        bins = _sub(config, "num_mel_bins", "feature_size", "input_feat_per_channel") or 16
        frames = 2 * (_sub(config, "max_source_positions") or 32)
        inputs: dict[str, Any] = {"input_features": torch.randn(1, bins, frames, generator=g)}
        if getattr(config, "is_encoder_decoder", False):
            inputs["decoder_input_ids"] = torch.tensor([[1, 2, 3]])
        return inputs
    text = _sub(config, "text_config") or config
    vocab = _sub(text, "vocab_size") or _sub(config, "vocab_size") or 100
    ids = torch.randint(4, max(5, min(vocab, 100)), (1, 8), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids[:, :4]
    return inputs


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict) or hasattr(value, "to_tuple"):
        items = value.items() if isinstance(value, dict) else zip(value.keys(), value.to_tuple(), strict=False)
        return [t for k, v in items if "past_key_values" not in k and "cache" not in k for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def forward(model: torch.nn.Module, inputs: dict[str, Any]) -> list[torch.Tensor]:
    torch.manual_seed(0)
    with torch.no_grad(), quiet():
        return [t.detach().clone() for t in _tensors(model(**inputs)) if t.is_floating_point()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """The largest absolute difference between two output lists (inf when they do not line up)."""
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b, strict=True)):
        return float("inf")
    return max((float((x - y).abs().max()) for x, y in zip(a, b, strict=True) if x.numel()), default=0.0)


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.device.type != "meta"}


def state_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    if a.keys() != b.keys():
        return float("inf")
    return max(
        (float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel() and a[k].is_floating_point()),
        default=0.0,
    )


# -- one case ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    def expire(*_: Any) -> None:
        raise TimeoutError(f"case took more than {seconds} s")

    if not hasattr(signal, "SIGALRM"):
        yield
        return
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def head_modules(model: torch.nn.Module) -> list[str]:
    """The task head: top-level children with parameters besides the backbone (``base_model_prefix``)."""
    prefix = getattr(model, "base_model_prefix", "")
    return [
        name
        for name, child in model.named_children()
        if name != prefix and any(True for _ in child.parameters()) and name not in {"lm_head"}
    ]


MethodConfig = Callable[[torch.nn.Module, Case], Any]


def lora_config(model: torch.nn.Module, case: Case) -> Any:
    from peft import LoraConfig

    _, task_type, heads = MAPPINGS[case.mapping]
    kwargs: dict[str, Any] = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, "task_type": task_type}
    if case.targets == "all-linear":
        kwargs["target_modules"] = "all-linear"
    if heads:
        kwargs["modules_to_save"] = head_modules(model) or None
    return LoraConfig(**kwargs)


def perturb(model: torch.nn.Module, seed: int = 1) -> None:
    """Move every trainable tensor away from its initial value, as training would."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.requires_grad and param.is_floating_point():
                param.add_(torch.randn_like(param) * 0.05)


def run_case(
    case: Case,
    make_config: MethodConfig = lora_config,
    train: Callable[[Any], None] | None = None,
    seconds: int = CASE_SECONDS,
) -> Result:
    """Build, train (perturb, or ``train``), save, then load with plain peft and with safe_peft; compare."""
    start = time.perf_counter()
    try:
        with time_limit(seconds), tempfile.TemporaryDirectory() as directory:
            result = _run(case, make_config, train, directory)
    except TimeoutError as exc:
        result = Result(case, EXCLUDED, f"timeout: {exc}")
    result.seconds = round(time.perf_counter() - start, 2)
    return result


def _excluded(case: Case, stage: str, exc: BaseException) -> Result:
    text = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
    return Result(case, EXCLUDED, f"{stage}: {type(exc).__name__}: {text}")


def _run(case: Case, make_config: MethodConfig, train: Callable[[Any], None] | None, directory: str) -> Result:
    from peft import PeftModel, get_peft_model

    from safe_peft import AdapterLoadError, diagnose, safe_load_adapter

    def fresh(device: str = "cpu") -> torch.nn.Module:
        return build_tiny(case.model_type, case.class_name, device=device)

    try:
        base = fresh()
    except Exception as exc:
        return _excluded(case, "build", exc)
    try:
        with quiet():
            config = make_config(base, case)
            trained = get_peft_model(base, config)
            perturb(trained)
            if train is not None:
                train(trained)
            trained.eval()
            trained.save_pretrained(directory)
    except Exception as exc:
        return _excluded(case, "peft", exc)
    inputs = make_inputs(trained)
    try:
        expected: list[torch.Tensor] | None = forward(trained, inputs)
        compared = "outputs"
    except Exception:
        expected, compared = None, "state"
    trained_state = state(trained)
    del trained, base

    def matches(model: torch.nn.Module) -> bool:
        if expected is not None:
            try:
                return same(forward(model, inputs), expected) <= 1e-5
            except Exception:
                return False
        return state_difference(state(model), trained_state) <= 1e-6

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with quiet():
                plain = PeftModel.from_pretrained(fresh(), directory)
        plain_warned = [str(w.message)[:120] for w in caught if "missing adapter keys" in str(w.message)]
        plain_exact = matches(plain) and not plain_warned
        del plain
    except Exception as exc:
        plain_exact, plain_warned = False, [f"{type(exc).__name__}: {str(exc)[:120]}"]

    base = fresh()
    try:
        with quiet():
            predicted = diagnose(base, directory)
            meta = diagnose(fresh("meta"), directory)
    except Exception as exc:
        return Result(case, DIAGNOSE_DISAGREES, f"diagnose raised {type(exc).__name__}: {str(exc)[:200]}", compared)
    try:
        with quiet():
            model, report = safe_load_adapter(base, directory, output_loading_info=True)
    except AdapterLoadError as exc:
        primary = exc.report.primary
        cause = f"{primary.cause.value}/{primary.code}" if primary else "?"
        if not plain_exact:
            return Result(case, PLAIN_INEXACT, f"plain: {plain_warned[:1]}; safe_peft refused", compared, 0, cause)
        return Result(case, FALSE_REFUSAL, (primary.message[:300] if primary else str(exc)[:300]), compared, 0, cause)
    except Exception as exc:
        return Result(case, FALSE_REFUSAL, f"raised {type(exc).__name__}: {str(exc)[:200]}", compared)
    exact = matches(model)
    if not plain_exact:
        return Result(case, PLAIN_INEXACT, f"plain: {plain_warned[:1]}; safe_peft loaded, exact={exact}", compared)
    if not exact:
        return Result(case, WRONG_RESULT, "safe_peft's load differs from the trained adapter", compared)
    if report.warnings:
        codes = ", ".join(f"{w.cause.value}/{w.code}" for w in report.warnings)
        return Result(case, WARNED, f"{codes}: {report.warnings[0].message[:200]}", compared)
    for name, verdict in (("real", predicted), ("meta", meta)):
        if not verdict.ok or verdict.warnings:
            primary = verdict.primary or (verdict.warnings[0] if verdict.warnings else None)
            what = f"{primary.cause.value}/{primary.code}: {primary.message[:200]}" if primary else "not ok"
            return Result(case, DIAGNOSE_DISAGREES, f"diagnose on the {name} base: {what}", compared)
    return Result(case, EXACT, "", compared)


def run_isolated(case: Case) -> dict[str, Any]:
    """Entry point for worker processes (a picklable case in, a dict back)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    if case.targets != "explicit":
        return run_case(case).to_dict()
    from tests.support import methods

    return run_case(case, methods.method_config, methods.train_hook(case)).to_dict()
