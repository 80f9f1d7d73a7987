"""Families of layouts that real training stacks write, each case rebuilt as the user's stack makes it (the same
peft / transformers calls, the same save, the base loaded from a directory where a real run does).

For each case: plain peft behaves as the case says (loads exactly, or fails); where plain peft loads exactly,
safe_peft must load exactly (a refusal is a false alarm); otherwise safe_peft's primary finding is the expected
code, the refused load leaves the base as it was, and every fix any finding names (``remap=`` / ``repair=``) is
executed and must give the trained adapter's outputs.

Used by ``tests/test_families.py`` (a fixed sample, in ``make test``) and
``python -m tests.support.run_sweep --family NAME`` (the whole of each family; ``make sweep`` runs them all).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from tests.support.sweep import forward, make_inputs, same
from tests.support.tiny import quiet

Make = Callable[[str], "Situation"]

# what can go wrong with a case (the counts docs/sweep.md gives per family)
OK = "ok"
FALSE_REFUSAL = "false_refusal"  # plain peft loads it exactly, safe_peft refuses
WRONG_RESULT = "wrong_result"  # safe_peft loads it, to other outputs
WRONG_CAUSE = "wrong_cause"  # refused, as expected, with another primary finding (or loaded where it must refuse)
FIX_FAILS = "fix_fails"  # a fix a finding names is refused, or loads to other outputs
PREMISE = "premise"  # plain peft does not behave as the case says: the case is wrong, not safe_peft
KINDS = (OK, FALSE_REFUSAL, WRONG_RESULT, WRONG_CAUSE, FIX_FAILS, PREMISE)


@dataclass
class Situation:
    """An adapter as saved, the model it is loaded into, and the outputs it was trained to give."""

    directory: str
    trained: list[torch.Tensor]
    base: Callable[[], torch.nn.Module]
    plain: str = "exact"  # what plain peft does with it: "exact" | "fails" (raises, warns, or other outputs)
    kwargs: dict[str, Any] = field(default_factory=dict)  # adapter_name, allow_pickle, ...
    plain_load: Callable[[torch.nn.Module, str], torch.nn.Module] | None = None  # how plain peft loads it
    load: Callable[..., torch.nn.Module] | None = None  # how safe_peft loads it (default: safe_load_adapter)
    columns: int | None = None  # compare only the first columns of each output (the rows the adapter decides)
    view: Callable[[torch.nn.Module], list[torch.Tensor]] | None = None  # what is compared (default: outputs)

    def differs(self, model: torch.nn.Module) -> float:
        got, want = (self.view or outputs)(model), self.trained
        if self.columns is not None:
            got, want = [t[..., : self.columns] for t in got], [t[..., : self.columns] for t in want]
        return same(got, want)


@dataclass(frozen=True)
class Case:
    family: str
    name: str
    make: Make
    code: str | None  # the expected primary finding; None: plain peft and safe_peft both load it exactly
    fix: tuple[str, ...] = ()  # the opt-ins ("remap", "repair") the report must offer
    predicted: bool = True  # False: only the load can find it (values, which diagnose never reads)

    @property
    def id(self) -> str:
        return f"{self.family}/{self.name}"


@dataclass
class Outcome:
    name: str
    kind: str
    detail: str = ""
    code: str = ""  # safe_peft's primary finding ("" when it loaded)
    fixes_run: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.kind == OK

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "detail": self.detail, "code": self.code, "fixes": self.fixes_run}


def outputs(model: torch.nn.Module) -> list[torch.Tensor]:
    return forward(model, make_inputs(model))


def perturb_trainable(model: torch.nn.Module, seed: int = 1) -> None:
    """Move every trainable tensor away from its initial value, as training would."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad and param.is_floating_point():
                param.add_(torch.randn_like(param) * 0.05)


def train_and_save(
    model: torch.nn.Module, config: Any, directory: str, view: Callable[..., Any] | None = None, **save: Any
) -> list[torch.Tensor]:
    from peft import get_peft_model

    with quiet():
        peft_model = get_peft_model(model, config)
        perturb_trainable(peft_model)
        peft_model.eval()
        trained = (view or outputs)(peft_model)
        peft_model.save_pretrained(directory, **save)
    return trained


# -- running a case --------------------------------------------------------------------------------------------


def _plain(s: Situation) -> str:
    from peft import PeftModel

    try:
        with warnings.catch_warnings(record=True) as caught, quiet():
            warnings.simplefilter("always")
            load = s.plain_load or (lambda base, d: PeftModel.from_pretrained(base, d, **s.kwargs))
            model = load(s.base(), s.directory)
            if s.kwargs.get("adapter_name"):
                model.set_adapter(s.kwargs["adapter_name"])
            difference = s.differs(model)
    except Exception:  # plain peft raising, or a model it left unable to run
        return "fails"
    if any("missing adapter keys" in str(w.message) for w in caught):
        return "fails"
    return "exact" if difference <= 1e-5 else "fails"


def _load(s: Situation, **fix: Any) -> torch.nn.Module:
    from safe_peft import safe_load_adapter

    with quiet():
        load = s.load or (lambda base, d, **kw: safe_load_adapter(base, d, **kw))
        model = load(s.base(), s.directory, **s.kwargs, **fix)
        if s.kwargs.get("adapter_name"):
            model.set_adapter(s.kwargs["adapter_name"])
        return model


def _state(model: torch.nn.Module) -> Any:
    return [(n, type(m).__name__) for n, m in model.named_modules()], {
        k: v.detach().clone() for k, v in model.state_dict().items()
    }


def _unchanged(before: Any, model: torch.nn.Module) -> bool:
    types, state = _state(model)
    return (
        types == before[0]
        and state.keys() == before[1].keys()
        and all(torch.equal(state[k], before[1][k]) for k in state)
    )


def run(case: Case) -> Outcome:
    with tempfile.TemporaryDirectory() as directory:
        try:
            return _run(case, directory)
        except Exception as exc:
            return Outcome(case.id, WRONG_CAUSE, f"raised {type(exc).__name__}: {str(exc)[:200]}")


def _run(case: Case, directory: str) -> Outcome:
    from safe_peft import AdapterLoadError, diagnose

    s = case.make(directory)
    plain = _plain(s)
    if plain != s.plain:
        return Outcome(case.id, PREMISE, f"plain peft: {plain}, the case says {s.plain}")
    with quiet():  # a route of its own (a resume into the PeftModel being trained) is diagnosed by its load
        report = None if s.load or not case.predicted else diagnose(s.base(), s.directory, **s.kwargs)
    base = s.base()
    before = _state(base)
    try:
        model = _load(s) if s.load else _load_into(s, base)
    except AdapterLoadError as exc:
        refused = exc.report
    else:
        if case.code is not None:
            return Outcome(case.id, WRONG_CAUSE, f"loaded, expected {case.code}")
        if s.differs(model) > 1e-5:
            return Outcome(case.id, WRONG_RESULT, "safe_peft's load differs from the trained adapter")
        if report is not None and not report.ok:
            return Outcome(case.id, FALSE_REFUSAL, f"diagnose: {report.primary.code if report.primary else '?'}")
        return Outcome(case.id, OK)
    primary = refused.primary
    code = primary.code if primary else "?"
    if case.code is None:
        return Outcome(case.id, FALSE_REFUSAL, primary.message[:200] if primary else "", code)
    report = report or refused
    predicted = report.primary.code if report.primary else "?"
    if code != case.code or predicted != code:
        return Outcome(case.id, WRONG_CAUSE, f"load {code}, diagnose {predicted}, expected {case.code}", code)
    if not s.load and not _unchanged(before, base):
        return Outcome(case.id, WRONG_RESULT, "the refused load changed the base model", code)
    return _fixes(case, s, report, code)


def _load_into(s: Situation, base: torch.nn.Module) -> torch.nn.Module:
    from safe_peft import safe_load_adapter

    with quiet():
        model = safe_load_adapter(base, s.directory, **s.kwargs)
        if s.kwargs.get("adapter_name"):
            model.set_adapter(s.kwargs["adapter_name"])
        return model


def _fixes(case: Case, s: Situation, report: Any, code: str) -> Outcome:
    from safe_peft import AdapterLoadError

    offered = [d for d in report.causes if d.remap or d.repair]
    kinds = {k for d in offered for k, v in (("remap", d.remap), ("repair", d.repair)) if v}
    if kinds != set(case.fix):
        return Outcome(
            case.id, FIX_FAILS, f"offers {sorted(d.fix_arguments() for d in offered)}, expected {case.fix}", code
        )
    run_fixes = []
    for diagnosis in offered:
        arguments = {k: v for k, v in (("remap", diagnosis.remap), ("repair", diagnosis.repair)) if v}
        try:
            model = _load(s, **arguments)
        except AdapterLoadError as exc:
            again = exc.report.primary.code if exc.report.primary else "?"
            return Outcome(case.id, FIX_FAILS, f"{diagnosis.fix_arguments()} refused: {again}", code)
        if s.differs(model) > 1e-5:
            return Outcome(case.id, FIX_FAILS, f"{diagnosis.fix_arguments()} loads other outputs", code)
        run_fixes.append(diagnosis.fix_arguments())
    return Outcome(case.id, OK, "", code, run_fixes)


# -- family: a vocabulary resized before training --------------------------------------------------------------

_NEW_ROWS = 103


def llama_base(directory: str, from_dir: bool) -> Callable[[], torch.nn.Module]:
    """The tiny Llama as a real run gets it: saved and loaded back with from_pretrained, or built in code."""
    from tests.support.helpers import build

    if not from_dir:
        return lambda: build("causal")
    from transformers import LlamaForCausalLM

    path = os.path.join(directory, "base")
    with quiet():
        build("causal").save_pretrained(path)

    def load() -> torch.nn.Module:
        with quiet():
            return LlamaForCausalLM.from_pretrained(path).eval()

    return load


def resized(model: torch.nn.Module, pad: int | None) -> torch.nn.Module:
    torch.manual_seed(0)  # the new rows are drawn alike in training and in loading (rows the adapter does not save)
    with quiet():
        model.resize_token_embeddings(_NEW_ROWS, pad_to_multiple_of=pad)
    return model


_TRAINED: dict[str, dict[str, Any]] = {
    "modules_to_save": {"modules_to_save": ["embed_tokens", "lm_head"]},
    "trainable_tokens": {"trainable_token_indices": [1, 100, 102]},
    "lora_lm_head": {"target_modules": ["q_proj", "v_proj", "lm_head"]},
    "lora_embedding": {"target_modules": ["q_proj", "v_proj", "embed_tokens"]},
}


def _resize_case(trained: str, pad: int | None, from_dir: bool, into_resized: bool) -> Make:
    def make(directory: str) -> Situation:
        from peft import LoraConfig

        fresh = llama_base(directory, from_dir)
        options: dict[str, Any] = {"r": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}
        options.update(_TRAINED[trained])
        adapter = os.path.join(directory, "adapter")
        outputs_ = train_and_save(resized(fresh(), pad), LoraConfig(**options), adapter)
        # a LoRA on the input embedding alone leaves the resized head's new rows untrained and unsaved: no load can
        # give them the values they had in training, so only the original vocabulary's logits are compared
        columns = 100 if trained == "lora_embedding" else None
        if into_resized:
            return Situation(adapter, outputs_, lambda: resized(fresh(), pad), columns=columns)
        return Situation(adapter, outputs_, fresh, plain="fails", columns=columns)

    return make


def resize_cases() -> list[Case]:
    cases = []
    for trained in _TRAINED:
        for pad in (None, 8):
            for from_dir in (True, False):
                for into in (True, False):
                    name = (
                        f"{trained}/pad{pad or 1}/{'dir' if from_dir else 'code'}/{'resized' if into else 'original'}"
                    )
                    code, fix = (None, ()) if into else ("resized_embeddings", ("repair",))
                    if not into and trained == "trainable_tokens" and not from_dir:
                        # peft saves no embedding weights for a base built in code: nothing records the vocabulary
                        code, fix = "token_indices_out_of_range", ()
                    cases.append(Case("resize", name, _resize_case(trained, pad, from_dir, into), code, fix))
    return cases


# -- family: checkpoints with no tensors at all -----------------------------------------------------------------


def _lora(**options: Any) -> Any:
    from peft import LoraConfig

    return LoraConfig(**{"r": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False, **options})


def _empty_case(producer: str) -> Make:
    def make(directory: str) -> Situation:
        from safetensors.torch import save_file

        fresh = llama_base(directory, True)
        adapter = os.path.join(directory, "adapter")
        trained = train_and_save(fresh(), _lora(), adapter)
        weights = os.path.join(adapter, "adapter_model.safetensors")
        if producer == "patched_state_dict":
            _patched_state_dict_save(fresh(), adapter)
            return Situation(adapter, trained, fresh, plain="fails", kwargs={"allow_pickle": True})
        if producer == "zero3_partitions":  # ZeRO-3 without gathering, per tensor: each one torch.Size([0])
            from safetensors.torch import load_file

            save_file({k: torch.empty(0) for k in load_file(weights)}, weights, metadata={"format": "pt"})
            return Situation(adapter, trained, fresh, plain="fails")
        os.remove(weights)
        save_file({}, weights, metadata={"format": "pt"})  # what ZeRO-3 + SFTTrainer writes: 40 bytes
        if producer == "zero3":
            return Situation(adapter, trained, fresh, plain="fails")
        return _resume(adapter, trained, fresh)

    return make


def _patched_state_dict_save(model: torch.nn.Module, adapter: str) -> None:
    """alpaca-lora's ``model.state_dict`` patch, then ``save_pretrained``: peft <= 0.17 filters the filtered state
    dict again and writes an empty ``adapter_model.bin``; later peft no longer reads ``state_dict()`` there, so the
    file peft 0.17 wrote is written directly."""
    from peft import get_peft_model, get_peft_model_state_dict

    os.remove(os.path.join(adapter, "adapter_model.safetensors"))
    peft_model = get_peft_model(model, _lora())
    old_state_dict = peft_model.state_dict
    patched = (lambda self, *_, **__: get_peft_model_state_dict(self, old_state_dict())).__get__(peft_model)
    peft_model.state_dict = patched
    with quiet():
        peft_model.save_pretrained(adapter, safe_serialization=False)
    path = os.path.join(adapter, "adapter_model.bin")
    if torch.load(path, weights_only=True):
        torch.save({}, path)


def _resume(adapter: str, trained: list[torch.Tensor], fresh: Callable[[], torch.nn.Module]) -> Situation:
    """A Trainer resuming from the checkpoint: ``model.load_adapter(checkpoint, "default", is_trainable=True)`` on
    the PeftModel it trains, through the switch (the code is Trainer's, not the user's)."""
    from peft import PeftModel, get_peft_model

    def peft_model() -> torch.nn.Module:
        with quiet():
            return get_peft_model(fresh(), _lora())

    def resume(model: torch.nn.Module, directory: str, **options: Any) -> torch.nn.Module:
        assert isinstance(model, PeftModel)
        model.load_adapter(directory, "default", is_trainable=True)
        return model

    def safe(model: PeftModel, directory: str, **options: Any) -> torch.nn.Module:
        import safe_peft

        with safe_peft.patched(**options):
            return resume(model, directory)

    return Situation(adapter, trained, peft_model, plain="fails", plain_load=resume, load=safe)


def empty_cases() -> list[Case]:
    cases = [Case("empty", p, _empty_case(p), "empty_checkpoint") for p in ("zero3", "patched_state_dict", "resume")]
    return [*cases, Case("empty", "zero3_partitions", _empty_case("zero3_partitions"), "zero3_empty_tensors")]


# -- family: peft <= 0.17 keys of adapters with unusual names ----------------------------------------------------


def _old_peft_case(name: str, variant: str, load_as: str) -> Make:
    """An adapter with an unusual name saved by peft <= 0.17, whose ``k.replace(f".{name}", "")`` also cut the name
    out of the keys' other segments (``lora``: ``q_proj_A.weight``; ``weight``: ``q_proj.lora_A``; ``lora_A``:
    ``q_proj.weight``). Saved by the installed peft itself where it is that old; otherwise its file is rewritten
    the way peft 0.17's save wrote it."""

    def make(directory: str) -> Situation:
        import re

        from peft import get_peft_model
        from safetensors.torch import load_file, save_file

        from tests.support.helpers import build

        by_variant: dict[str, dict[str, Any]] = {
            "dora": {"use_dora": True},
            "embedding": {"target_modules": ["q_proj", "embed_tokens"], "modules_to_save": ["lm_head"]},
        }
        options = by_variant.get(variant, {})
        with quiet():
            peft_model = get_peft_model(build("causal"), _lora(**options), adapter_name=name)
            perturb_trainable(peft_model)
            peft_model.eval()
            trained = outputs(peft_model)
            peft_model.save_pretrained(os.path.join(directory, "adapter"))
        adapter = os.path.join(directory, "adapter", name)  # peft saves a named adapter in a subfolder
        weights = os.path.join(adapter, "adapter_model.safetensors")
        if not _saves_like_old_peft():  # a newer peft: write what 0.17 wrote
            state = load_file(weights)
            named = r"\.(lora_(?:A|B|embedding_A|embedding_B))(\.|$)"
            state = {re.sub(named, rf".\1.{name}\2", k): v for k, v in state.items()}  # the model's keys
            state = {
                re.sub(r"\.lora_magnitude_vector$", f".lora_magnitude_vector.{name}", k): v for k, v in state.items()
            }
            state = {k.replace(f".{name}", ""): v for k, v in state.items()}
            save_file(state, weights)
        kwargs = {"adapter_name": load_as} if load_as != "default" else {}
        return Situation(adapter, trained, lambda: build("causal"), plain="fails", kwargs=kwargs)

    return make


def _saves_like_old_peft() -> bool:
    """Whether the installed peft removes the adapter name with ``str.replace`` (0.17 and before)."""
    from peft.tuners.tuners_utils import BaseTuner

    return not hasattr(BaseTuner, "_remove_adapter_name_from_key")


def old_peft_cases() -> list[Case]:
    cases = [
        Case("old_peft", f"lora/{v}/as_{n}", _old_peft_case("lora", v, n), "old_peft_lora_name", ("remap",))
        for v in ("plain", "dora", "embedding")
        for n in ("default", "lora")
    ]
    cases += [
        Case("old_peft", f"{name}/plain/as_default", _old_peft_case(name, "plain", "default"), code, ("remap",))
        for name, code in (("weight", "old_peft_weight_name"), ("lora_A", "old_peft_lora_A_name"))
    ]
    # an adapter named like a targeted module: its name cut out of the module paths, no rename can tell which
    # module a key was (`self_attn.q_proj.lora_A.q_proj.weight` -> `self_attn.lora_A.weight`)
    cases.append(
        Case("old_peft", "q_proj/plain/as_default", _old_peft_case("q_proj", "plain", "default"), "unknown_modules")
    )
    return cases


# -- family: vision-language wrappers and their text models -------------------------------------------------------


def _text_of(vl: torch.nn.Module, directory: str) -> Callable[[], torch.nn.Module]:
    """The text model whose weights the VL wrapper's language model has (Qwen2.5-VL's is a Qwen2), saved and loaded
    back from a directory, as a real run gets it."""
    import transformers

    assert isinstance(vl, transformers.PreTrainedModel)
    values = {k: v for k, v in vl.config.text_config.to_dict().items() if k not in ("model_type", "architectures")}
    for generation in ("top_k", "top_p", "temperature", "do_sample"):  # sampling flags do not belong to the model
        values.pop(generation, None)
    for where in ("rope_parameters", "rope_scaling"):
        if isinstance(values.get(where), dict):
            values[where] = {k: v for k, v in values[where].items() if k not in ("mrope_section", "type")} or None
    path = os.path.join(directory, "text")
    with quiet():
        text = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**values))
        text.model.load_state_dict(vl.get_submodule("model.language_model").state_dict())
        text.lm_head.load_state_dict(vl.get_submodule("lm_head").state_dict())
        text.save_pretrained(path)

    def load() -> torch.nn.Module:
        with quiet():
            return transformers.Qwen2ForCausalLM.from_pretrained(path).eval()

    return load


def _vl_case(direction: str) -> Make:
    def make(directory: str) -> Situation:
        from tests.support.tiny import tiny_config

        def vl() -> torch.nn.Module:
            import transformers

            config = tiny_config("qwen2_5_vl")
            text = config.text_config
            head = text.hidden_size // text.num_attention_heads
            sections = [head // 8, head // 8 + (head // 2 - 3 * (head // 8)) // 2, head // 8 + 1]
            where = "rope_parameters" if hasattr(text, "rope_parameters") else "rope_scaling"  # transformers 5 / 4
            setattr(text, where, {**(getattr(text, where) or {"rope_type": "default"}), "mrope_section": sections})
            for token in ("vision_start_token_id", "image_token_id", "video_token_id"):  # transformers 4's defaults
                if getattr(config, token, None) is None:
                    setattr(config, token, 90 + len(token) % 7)
            with quiet():
                torch.manual_seed(0)
                return transformers.Qwen2_5_VLForConditionalGeneration(config).eval()

        text = _text_of(vl(), directory)
        adapter = os.path.join(directory, "adapter")
        # on text alone, the VL wrapper and its text model compute the same logits: either's trained outputs serve
        if direction == "text_into_vl":
            plain = "exact" if _vl_maps_text_keys() else "fails"
            return Situation(adapter, train_and_save(text(), _lora(), adapter), vl, plain=plain)
        targets = ["q_proj", "v_proj", "qkv"] if direction == "vision_too_into_text" else ["q_proj", "v_proj"]
        trained = train_and_save(vl(), _lora(target_modules=targets), adapter)
        return Situation(adapter, trained, text, plain="fails")

    return make


def _vl_maps_text_keys() -> bool:
    """transformers 4's VL classes map ``model.`` onto ``model.language_model.`` on load
    (``_checkpoint_conversion_mapping``, which peft applies too): there a text adapter loads into the wrapper."""
    import transformers

    return int(transformers.__version__.split(".")[0]) < 5


def vl_cases() -> list[Case]:
    plain = _vl_maps_text_keys()
    return [
        Case(
            "vl",
            "text_into_vl",
            _vl_case("text_into_vl"),
            None if plain else "text_to_vl_nesting",
            () if plain else ("remap",),
        ),
        Case("vl", "text_only_into_text", _vl_case("text_only_into_text"), "vl_to_text_nesting", ("remap",)),
        Case("vl", "vision_too_into_text", _vl_case("vision_too_into_text"), "vl_adapter_on_text_model"),
    ]


# -- family: kohya-ss text-encoder LoRAs of Stable Diffusion -------------------------------------------------------

# kohya's prefix per text encoder, and the transformers class it is loaded into: SD1 and SD2 have one text encoder
# (lora_te_), SDXL two (lora_te1_: CLIPTextModel, lora_te2_: CLIPTextModelWithProjection)
_KOHYA: dict[str, tuple[str, str]] = {
    "sd1": ("lora_te_", "CLIPTextModel"),
    "sd2": ("lora_te_", "CLIPTextModel"),
    "sdxl_te1": ("lora_te1_", "CLIPTextModel"),
    "sdxl_te2": ("lora_te2_", "CLIPTextModelWithProjection"),
}


def _kohya_case(variant: str) -> Make:
    """A kohya LoRA of a Stable Diffusion text encoder: module names as kohya's sd-scripts wrote them from
    transformers 4's CLIP text model (``text_model.encoder.layers.0...``, dots as ``_``), ``lora_down`` /
    ``lora_up`` / ``alpha``, no adapter_config.json."""

    def make(directory: str) -> Situation:
        import re

        import transformers
        from safetensors.torch import load_file, save_file

        prefix, class_name = _KOHYA[variant]
        act = "gelu" if variant == "sd2" else "quick_gelu"  # SD2's OpenCLIP encoder uses gelu

        def clip() -> torch.nn.Module:
            config = transformers.CLIPTextConfig(
                hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, vocab_size=99
            )
            config.hidden_act = act
            torch.manual_seed(0)
            with quiet():
                return getattr(transformers, class_name)(config).eval()

        peft_dir, kohya_dir = os.path.join(directory, "peft"), os.path.join(directory, "kohya")
        trained = train_and_save(clip(), _lora(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1"]), peft_dir)
        state = {}
        for key, value in load_file(os.path.join(peft_dir, "adapter_model.safetensors")).items():
            module = re.sub(r"^base_model\.model\.", "", key).rsplit(".", 2)[0]
            flat = prefix + "text_model_" + module.removeprefix("text_model.").replace(".", "_")
            state[f"{flat}.{'lora_down' if '.lora_A.' in key else 'lora_up'}.weight"] = value
            state[f"{flat}.alpha"] = torch.tensor(8.0)
        os.makedirs(kohya_dir)
        save_file(state, os.path.join(kohya_dir, "pytorch_lora_weights.safetensors"))
        return Situation(kohya_dir, trained, clip, plain="fails")

    return make


def kohya_cases() -> list[Case]:
    return [Case("kohya", v, _kohya_case(v), "kohya", ("remap",)) for v in _KOHYA]


# -- family: negative controls (the task class, the task head, values) ---------------------------------------------


def _tiny(model_type: str, class_name: str) -> Callable[[], torch.nn.Module]:
    from tests.support.tiny import build_tiny

    def build() -> torch.nn.Module:
        with quiet():
            return build_tiny(model_type, class_name).eval()

    return build


def _decoder_states(model: torch.nn.Module) -> list[torch.Tensor]:
    """T5's decoder hidden states: what T5ForConditionalGeneration and the bare T5Model share."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    ids = torch.tensor([[4, 9, 13, 21, 2]])
    with torch.no_grad(), quiet():
        encoded = inner.encoder(input_ids=ids).last_hidden_state
        return [inner.decoder(input_ids=ids[:, :3], encoder_hidden_states=encoded).last_hidden_state.clone()]


def _bare_t5() -> torch.nn.Module:
    """T5Model with the weights of the T5ForConditionalGeneration the adapter was trained on (the bare model of the
    same checkpoint, as from_pretrained gives it)."""
    import transformers

    trained_on = _tiny("t5", "T5ForConditionalGeneration")()
    with quiet():
        bare = transformers.T5Model(cast(transformers.T5Config, trained_on.config)).eval()
        bare.load_state_dict({k: v for k, v in trained_on.state_dict().items() if not k.startswith("lm_head.")})
    return bare


def _control_case(name: str) -> Make:
    def make(directory: str) -> Situation:
        from peft import PromptTuningConfig, TrainableTokensConfig

        adapter = os.path.join(directory, "adapter")
        if name == "roberta_seq_cls_into_lm":
            config = _lora(target_modules=["query", "value"], task_type="SEQ_CLS")
            trained = train_and_save(_tiny("roberta", "RobertaForSequenceClassification")(), config, adapter)
            return Situation(adapter, trained, _tiny("roberta", "RobertaForMaskedLM"), plain="fails")
        if name == "prompt_tuning_into_bare":
            config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
            trained = train_and_save(_tiny("llama", "LlamaForCausalLM")(), config, adapter)
            return Situation(adapter, trained, _tiny("llama", "LlamaModel"), plain="fails")
        if name == "t5_seq2seq_into_bare":
            config = _lora(target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM")
            trained = train_and_save(_tiny("t5", "T5ForConditionalGeneration")(), config, adapter, _decoder_states)
            return Situation(adapter, trained, _bare_t5, plain="fails", view=_decoder_states)
        arch, cls, tied = {
            "gpt2": ("gpt2", "GPT2LMHeadModel", "transformer.wte"),
            "t5": ("t5", "T5ForConditionalGeneration", "shared"),
        }[name.rsplit("_", 1)[1]]
        trained = train_and_save(_tiny(arch, cls)(), TrainableTokensConfig(token_indices=[1, 2, 3]), adapter)
        _nan_in(os.path.join(adapter, "adapter_model.safetensors"), f"base_model.model.{tied}.trainable_tokens_delta")
        return Situation(adapter, trained, _tiny(arch, cls), plain="exact")

    return make


def _nan_in(path: str, key: str) -> None:
    """A NaN in one saved tensor (a diverged step): here the input embedding's token delta, which a tied copy saved
    after it (lm_head's) hides from the model after loading."""
    from safetensors.torch import load_file, save_file

    state = load_file(path)
    state[key][0, 0] = float("nan")
    save_file(state, path)


def control_cases() -> list[Case]:
    return [
        Case("controls", "roberta_seq_cls_into_lm", _control_case("roberta_seq_cls_into_lm"), "missing_task_head"),
        Case("controls", "prompt_tuning_into_bare", _control_case("prompt_tuning_into_bare"), "task_type_mismatch"),
        Case(
            "controls", "t5_seq2seq_into_bare", _control_case("t5_seq2seq_into_bare"), "task_type_mismatch", ("remap",)
        ),
        *(
            Case(
                "controls",
                f"trainable_tokens_nan_{a}",
                _control_case(f"trainable_tokens_nan_{a}"),
                "non_finite_values",
                predicted=False,
            )
            for a in ("gpt2", "t5")
        ),
    ]


FAMILIES: dict[str, Callable[[], list[Case]]] = {
    "controls": control_cases,
    "kohya": kohya_cases,
    "vl": vl_cases,
    "resize": resize_cases,
    "empty": empty_cases,
    "old_peft": old_peft_cases,
}


def cases(families: tuple[str, ...] = ()) -> list[Case]:
    return [c for name, make in FAMILIES.items() if not families or name in families for c in make()]


def run_all(families: tuple[str, ...] = (), progress: Callable[[Outcome], None] = lambda _o: None) -> list[Outcome]:
    outcomes = []
    for case in cases(families):
        outcome = run(case)
        outcomes.append(outcome)
        progress(outcome)
    return outcomes
