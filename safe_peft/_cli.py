"""The ``safe-peft`` command: ``inspect``, ``check``, ``fix`` and ``stamp``.

Exit codes: 0 compatible, 1 incompatible, 2 usage error or unreadable input. Errors are one line
(``--debug`` shows the traceback). ``inspect`` never imports torch, transformers or peft.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

from safe_peft._bounds import shorten
from safe_peft._engines.cli import add_target_arguments, run_check_target, run_fix_target, table
from safe_peft._plan.repairs import KNOWN_REPAIRS
from safe_peft.errors import AdapterFormatError, AdapterLoadError
from safe_peft.report import SCHEMA_VERSION, LoadReport

if TYPE_CHECKING:
    from torch import nn

    from safe_peft._files.manifest import AdapterManifest

__all__ = ["Output", "main"]

OK, INCOMPATIBLE, USAGE = 0, 1, 2
MODEL_CLASSES = {
    "auto": None,
    "base": "AutoModel",
    "causal-lm": "AutoModelForCausalLM",
    "seq-cls": "AutoModelForSequenceClassification",
    "token-cls": "AutoModelForTokenClassification",
    "qa": "AutoModelForQuestionAnswering",
    "seq2seq-lm": "AutoModelForSeq2SeqLM",
}
VERIFY_LIMIT = 2_000_000_000  # parameters; above this `fix` verifies from the header instead of a real load


class UsageError(Exception):
    """A problem with the command line or its inputs: exit code 2, one line."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (also the console script's entry point)."""
    parser = _parser()
    args = parser.parse_args(argv)
    out = Output(sys.stdout, color=_color(args))
    try:
        code: int = args.run(args, out)
        return code
    except Exception as exc:
        if args.debug:
            raise
        print(f"safe-peft: error: {error_line(exc)}", file=sys.stderr)
        if isinstance(exc, AdapterLoadError) and not isinstance(exc, AdapterFormatError):
            return INCOMPATIBLE
        return USAGE


INDENTED_ROWS = 10_000  # a --json document listing more keys than this is written compact


def json_document(document: Any, rows: int) -> str:
    """Strict JSON (no NaN / Infinity), indented for reading; compact when it lists more than
    :data:`INDENTED_ROWS` keys (a hostile header's 100,000: Python's indenting encoder is pure Python, 10x slower)."""
    if rows > INDENTED_ROWS:
        return json.dumps(document, separators=(",", ":"), allow_nan=False)
    return json.dumps(document, indent=2, allow_nan=False)


def error_line(exc: BaseException) -> str:
    """One line for a failure: the finding's message and its fix (an error with a report), else the error's own
    text; a failure no finding covers says so and how to see the traceback."""
    if isinstance(exc, AdapterLoadError) and exc.report.primary is not None:
        primary = exc.report.primary
        fix = primary.fix_arguments() or primary.fix
        text = f"{primary.message}; fix: {fix}" if fix else primary.message
    elif isinstance(exc, (UsageError, OSError, ValueError)):
        text = str(exc)
    else:
        text = f"{type(exc).__name__}: {exc} (this is safe-peft's fault: run with --debug and report the traceback)"
    return shorten(" ".join(text.split()), 2_000)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safe-peft", description="Check and fix PEFT adapters before loading them.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--no-color", action="store_true", help="plain text (NO_COLOR is honoured too)")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    inspect = sub.add_parser("inspect", help="summarise an adapter (config and header only)")
    inspect.add_argument("adapter")
    inspect.add_argument("--json", action="store_true")
    inspect.add_argument("--allow-pickle", action="store_true", help="read an adapter_model.bin (weights only)")
    inspect.set_defaults(run=_inspect)

    check = sub.add_parser("check", help="will these adapters load into this base model, and if not, why")
    check.add_argument("adapters", nargs="+", metavar="ADAPTER", help="adapter directories or glob patterns")
    _model_args(check, base_required=False)
    check.add_argument("--json", action="store_true", help="one JSON document (schema in docs/cli.md)")
    check.add_argument(
        "--weights", action="store_true", help="load the base's weights (from_pretrained) to verify base fingerprints"
    )
    add_target_arguments(check)  # serving engines (docs/serving.md)
    check.set_defaults(run=_check)

    fix = sub.add_parser("fix", help="write an adapter that plain peft loads")
    fix.add_argument("adapter")
    _model_args(fix, base_required=False)
    fix.add_argument("--out", required=True, help="a new (or empty) directory")
    fix.add_argument("--force", action="store_true", help="replace a non-empty --out")
    fix.add_argument(
        "--merge-ranks", action="store_true", help="ADAPTER holds one file per rank (rank_0/, ...): merge them"
    )
    add_target_arguments(fix, fix=True)  # serving engines (docs/serving.md)
    fix.set_defaults(run=_fix)

    stamp = sub.add_parser("stamp", help="store the base fingerprint in an adapter (docs/fingerprint.md)")
    stamp.add_argument("adapter")
    stamp.add_argument("--base", required=True, metavar="MODEL", help="model directory with its weights, or hub id")
    stamp.add_argument("--model-class", choices=sorted(MODEL_CLASSES), default="auto", help="as for check")
    stamp.add_argument("--json", action="store_true")
    stamp.set_defaults(run=_stamp)
    return parser


def _model_args(parser: argparse.ArgumentParser, *, base_required: bool = True) -> None:
    parser.add_argument(
        "--base",
        required=base_required,
        metavar="MODEL",
        help="model directory (config.json suffices) or hub id (required unless --target)",
    )
    parser.add_argument(
        "--model-class",
        choices=sorted(MODEL_CLASSES),
        default="auto",
        help="transformers Auto class (default: config.json's architectures, else the bare model)",
    )
    parser.add_argument("--remap", choices=["auto"], default=None, help="apply the built-in rename rules")
    parser.add_argument(
        "--repair",
        action="append",
        default=[],
        metavar="NAME",
        choices=list(KNOWN_REPAIRS),  # every repair a finding can suggest
        help="opt-in config repair (repeat)",
    )
    parser.add_argument("--allow-pickle", action="store_true", help="read adapter_model.bin (weights only)")


# --- inspect -------------------------------------------------------------------------------------------------


def _inspect(args: argparse.Namespace, out: Output) -> int:
    from safe_peft._files.manifest import inspect_adapter

    manifest = inspect_adapter(args.adapter, allow_pickle=args.allow_pickle)
    if args.json:
        out.write(json_document(manifest.to_dict(), len(manifest.tensors)))
    else:
        out.write(render_manifest(manifest, out))
    return OK


def render_manifest(m: AdapterManifest, out: Output | None = None) -> str:
    """A readable summary of an adapter manifest."""
    from safe_peft._files.manifest import dtype_summary

    style = out or Output(sys.stdout, color=False)
    ranks = sorted(set(m.ranks.values()))
    agree = style.good("agrees") if m.rank_agrees else style.bad(f"DISAGREES with config r={m.config_r}")
    dtypes = dtype_summary(m)
    lines = [
        f"{m.path}",
        f"  type          {m.peft_type}" + (f" (saved by peft {m.peft_version})" if m.peft_version else ""),
        f"  task          {m.task_type or '-'}",
        f"  base model    {m.base_model_name_or_path or '-'}",
        f"  targets       {m.target_modules}",
        f"  saved heads   {m.modules_to_save or '-'}",
        f"  rank          {', '.join(map(str, ranks)) or '-'} in the weights ({len(m.ranks)} modules); {agree}",
        f"  tensors       {len(m.tensors)} ({', '.join(f'{n} {d}' for d, n in sorted(dtypes.items()))})",
        f"  size          {m.parameters:,} parameters, {_bytes(m.total_bytes)}"
        + (" (read from a pickle)" if m.read_data else ""),
    ]
    lines.extend(f"  warning       [{w.cause.value}/{w.code}] {w.message}" for w in m.warnings)
    return "\n".join(lines)


# --- check ---------------------------------------------------------------------------------------------------


def _check(args: argparse.Namespace, out: Output) -> int:
    adapters = _expand(args.adapters)
    if args.target:  # --- serving engines: safe_peft._engines.cli
        return run_check_target(args, adapters, out)
    if args.base is None:
        raise UsageError("check: --base MODEL is required (or --target ENGINE)")
    model = (
        load_base_weights(args.base, args.model_class)
        if args.weights
        else build_base_model(args.base, args.model_class)
    )
    results: list[tuple[str, LoadReport, bool]] = []
    progress = Progress(len(adapters), enabled=len(adapters) >= 20 and sys.stderr.isatty() and not args.json)
    for path in adapters:
        report, unreadable = _check_one(model, path, args)
        results.append((path, report, unreadable))
        progress.step()
    progress.done()
    if args.json:
        listed = sum(len(r.missing) + len(r.unexpected) + len(r.size_mismatches) for _, r, _ in results)
        out.write(json_document(check_document(args.base, type(model).__name__, results), listed))
    else:
        out.write(render_check(results, out))
        out.write(render_stamps(results))
    if any(unreadable for _, _, unreadable in results):
        return USAGE
    return OK if all(r.ok for _, r, _ in results) else INCOMPATIBLE


def check_document(base: str, model_class: str, results: list[tuple[str, LoadReport, bool]]) -> dict[str, Any]:
    """The ``check --json`` document (schema in docs/cli.md)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "base": base,
        "model_class": model_class,
        "summary": {
            "adapters": len(results),
            "compatible": sum(1 for _, r, _ in results if r.ok),
            "incompatible": sum(1 for _, r, u in results if not r.ok and not u),
            "unreadable": sum(1 for _, _, u in results if u),
        },
        "results": [
            {"adapter": path, "verdict": _verdict(r, u), "stamp": stamp_status(path, r), "report": r.to_dict()}
            for path, r, u in results
        ],
    }


def render_check(results: list[tuple[str, LoadReport, bool]], out: Output) -> str:
    """The summary table of a ``check`` run: adapter, verdict, primary cause, fix."""
    rows = [("ADAPTER", "VERDICT", "CAUSE", "FIX")]
    for path, report, unreadable in results:
        primary = report.primary
        cause = f"{primary.cause.value}/{primary.code}" if primary else "-"
        fix = (primary.fix_arguments() or primary.fix) if primary else ""
        if report.ok and (report.renames or report.repairs):
            fix = f"{len(report.renames)} renames, {len(report.repairs)} repairs applied"
        rows.append((path, _verdict(report, unreadable), cause, _shorten(fix, 70)))
    lines = table(rows, out, good="compatible")
    ok = sum(1 for _, r, _ in results if r.ok)
    lines.append(f"\n{ok} of {len(results)} adapters compatible.")
    return "\n".join(lines)


def _check_one(model: nn.Module, path: str, args: argparse.Namespace) -> tuple[LoadReport, bool]:
    """The verdict on one adapter, and whether it is unreadable: a file fault that no opt-in fixes."""
    from safe_peft._catalog import finding
    from safe_peft._plan.plan import make_plan

    try:
        plan = make_plan(model, path, remap=args.remap, repair=tuple(args.repair), allow_pickle=args.allow_pickle)
    except AdapterFormatError as exc:
        primary = exc.report.primary
        return exc.report, primary is None or (primary.remap is None and not primary.repair)
    except Exception as exc:
        if args.debug:
            raise
        failed = finding("check_failed", f"{path}: safe-peft failed on this adapter ({error_line(exc)})")
        return LoadReport(ok=False, causes=[failed], adapter=path), True
    return plan.report, False


def _verdict(report: LoadReport, unreadable: bool) -> str:
    return "compatible" if report.ok else ("unreadable" if unreadable else "incompatible")


def render_stamps(results: list[tuple[str, LoadReport, bool]]) -> str:
    """One line per stamped adapter: whether its base fingerprint matches this base (docs/fingerprint.md)."""
    lines = [f"  {path}: {status}" for path, r, _ in results if (status := stamp_status(path, r)) != "not stamped"]
    return "Base fingerprints:\n" + "\n".join(lines) if lines else ""


def stamp_status(path: str, report: LoadReport) -> str:
    """``not stamped``, ``stamped, matches``, ``stamped, differs``, ``stamped, not verified (meta base)``, ... for
    one adapter, from its header and the report's findings."""
    codes = {d.code: d for d in [*report.causes, *report.warnings]}
    if "bad_fingerprint" in codes:
        return "stamp malformed"
    if "base_weights_differ" in codes:
        return f"stamped, differs ({codes['base_weights_differ'].details.get('kind', '')})"
    note = codes.get("base_not_verified")
    if note is not None:
        return (
            "stamped, not verified (meta base)" if note.details.get("reason") == "meta" else "stamped, partly verified"
        )
    from safe_peft._files.locate import locate_adapter
    from safe_peft._fingerprint.check import read_stamp
    from safe_peft._fingerprint.format import FingerprintError

    try:
        files = locate_adapter(path)
        stamped = files.weights_format == "safetensors" and read_stamp(files.weights_path) is not None
    except (AdapterLoadError, FingerprintError, OSError):
        return "not stamped"
    return "stamped, matches" if stamped and report.ok else "stamped" if stamped else "not stamped"


# --- stamp ---------------------------------------------------------------------------------------------------


def _stamp(args: argparse.Namespace, out: Output) -> int:
    from safe_peft._files.locate import locate_adapter
    from safe_peft._files.safetensors_header import read_header
    from safe_peft._fingerprint.check import read_stamp
    from safe_peft._fingerprint.format import KEY
    from safe_peft._fingerprint.stamp import stamp_adapter

    model = load_base_weights(args.base, args.model_class)
    stamp_adapter(args.adapter, model)
    path = locate_adapter(args.adapter).weights_path
    stamp = read_stamp(path)
    assert stamp is not None  # stamp_adapter read it back
    size = len(read_header(path).metadata[KEY])
    facts = {"adapter": args.adapter, "base": args.base, "model_class": type(model).__name__, "key": KEY}
    facts |= {"tensors": len(stamp.tensors), "grid": stamp.grid, "precision": stamp.precision, "bytes": size}
    if args.json:
        out.write(json.dumps(facts, indent=2))
    else:
        out.write(
            f"Stamped {args.adapter}: {len(stamp.tensors)} tensors of {type(model).__name__} sampled "
            f"({stamp.grid}x{stamp.grid} each, {stamp.precision}), {size:,} bytes in __metadata__[{KEY!r}]."
        )
    return OK


def load_base_weights(base: str, model_class: str = "auto") -> nn.Module:
    """The base model with its weights (``from_pretrained``), on the CPU: a fingerprint needs real values."""

    if os.path.isdir(base) and not glob.glob(os.path.join(base, "*.safetensors")) + glob.glob(
        os.path.join(base, "*.bin")
    ):
        raise UsageError(
            f"--base {base}: holds no weights (a config-only directory builds a meta-device model, which has no "
            "values to fingerprint); pass the directory from_pretrained loads the base from"
        )
    cls: Any = type(build_base_model(base, model_class))
    return cls.from_pretrained(base).eval()  # type: ignore[no-any-return]


# --- fix -----------------------------------------------------------------------------------------------------


def _fix(args: argparse.Namespace, out: Output) -> int:
    if args.target:  # --- serving engines: safe_peft._engines.cli
        return run_fix_target(args, out)
    if args.base is None:
        raise UsageError("fix: --base MODEL is required (or --target ENGINE)")
    from safe_peft._fix.writer import write_fix
    from safe_peft._plan.plan import make_plan

    model = build_base_model(args.base, args.model_class)
    if args.merge_ranks:  # hook: per-rank shards of a sharded save (safe_peft/_fix/merge_ranks.py)
        from safe_peft._fix.merge_ranks import merge_rank_shards

        if args.remap or args.repair:
            raise UsageError("--merge-ranks takes no --remap / --repair: merge first, then fix the merged adapter")
        checked: list[str] = []
        report = merge_rank_shards(  # verified in its staging directory, as every fix
            model,
            args.adapter,
            args.out,
            force=args.force,
            verify=lambda staging: checked.append(verify_written(args.base, args.model_class, staging, model)),
        )
        out.write(f"Wrote {args.out}: {report.repairs[0]}.")
        out.write(out.good(f"Verified: {checked[0]}."))
        return OK
    verified: list[str] = []
    try:
        plan = make_plan(
            model, args.adapter, remap=args.remap, repair=tuple(args.repair), allow_pickle=args.allow_pickle
        )
        if not plan.report.ok:
            raise AdapterLoadError(plan.report)
        report = write_fix(  # verified in its staging directory: a fix that fails verification is never written
            plan,
            args.out,
            force=args.force,
            verify=lambda staging: verified.append(
                verify_written(args.base, args.model_class, staging, model, plan.vocab_size)
            ),
        )
    except AdapterFormatError:
        raise
    except AdapterLoadError as exc:  # a readable adapter that no opt-in given makes fit
        out.write(str(exc))
        out.write(out.bad("\nNothing was written: no opt-in given makes this adapter fit."))
        return INCOMPATIBLE
    out.write(f"Wrote {args.out}: {len(report.renames)} keys renamed, {len(report.repairs)} repairs.")
    out.write("\n".join(f"  repaired: {r}" for r in report.repairs))
    out.write(out.good(f"Verified: {verified[0]}."))
    if plan.vocab_size is not None:
        out.write(
            f"Before loading it, resize the base model's token embeddings as the fix was verified with: "
            f"model.resize_token_embeddings({plan.vocab_size}) (a vocabulary size cannot be stored in an adapter)."
        )
    return OK


def verify_written(
    base: str, model_class: str, directory: str, meta_model: nn.Module, vocab_size: int | None = None
) -> str:
    """Load the written adapter with plain peft into an uninitialised copy of the base (small models), or check
    it from its header (large ones); with ``vocab_size``, into the base resized to that many token rows, as the
    user must resize it. Raises on any loading warning or mismatch."""
    import warnings

    from safe_peft._routes.diagnose import diagnose

    report = diagnose(meta_model, directory, repair=("vocab",) if vocab_size is not None else ())
    if not report.ok:
        raise AdapterLoadError(report)
    parameters = sum(p.numel() for p in meta_model.parameters())
    if parameters > VERIFY_LIMIT:
        return f"plain-peft keys and shapes checked from the header ({parameters / 1e9:.0f}B-parameter base)"
    from peft import PeftModel

    model = build_base_model(base, model_class).to_empty(device="cpu")  # memory, no initialisation
    if vocab_size is not None:
        model.resize_token_embeddings(vocab_size, mean_resizing=False)  # type: ignore[operator]
    with warnings.catch_warnings(record=True) as caught:  # the CLI owns its process: filters may change here
        warnings.simplefilter("always")
        PeftModel.from_pretrained(model, directory)
    loading = [w for w in caught if issubclass(w.category, UserWarning)]
    if loading:
        raise ValueError(f"plain peft warned while loading {directory}: {loading[0].message}")
    resized = f" into the base resized to {vocab_size} token rows" if vocab_size is not None else ""
    return f"plain PeftModel.from_pretrained loaded it with no warning{resized}"


def build_base_model(base: str, model_class: str = "auto") -> nn.Module:
    """The base model from its config alone, on the meta device: no weights read, no memory taken."""
    import torch
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(base)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--base {base}: cannot read a model config ({str(exc).splitlines()[0][:200]})") from None
    name = MODEL_CLASSES[model_class]
    # The model class is resolved, and its modeling module imported, before the meta device is set: some releases
    # compute tensors while importing (transformers 4.56's generation utilities call .item() under torch 2.6).
    if name is None and getattr(config, "architectures", None):
        cls = getattr(transformers, config.architectures[0], None)
        if cls is None:
            raise UsageError(f"--base {base}: transformers has no class {config.architectures[0]!r}")
        make = cls._from_config
    else:
        auto = getattr(transformers, name or "AutoModel")
        mapping = getattr(auto, "_model_mapping", None)
        try:
            if mapping is not None and type(config) in mapping:
                mapping[type(config)]  # imports the modeling module; from_config below raises what is wrong
        except (KeyError, ImportError, AttributeError, ValueError):
            pass
        make = auto.from_config
    with torch.device("meta"):
        model = make(config)
    return model.eval()  # type: ignore[no-any-return]


# --- output --------------------------------------------------------------------------------------------------


class Output:
    """Where the command writes, with colour only on a terminal and never under NO_COLOR."""

    def __init__(self, stream: TextIO, *, color: bool) -> None:
        self.stream, self.color = stream, color

    def write(self, text: str) -> None:
        if text:
            print(text, file=self.stream)

    def good(self, text: str) -> str:
        return f"\033[32m{text}\033[0m" if self.color else text

    def bad(self, text: str) -> str:
        return f"\033[31m{text}\033[0m" if self.color else text


class Progress:
    """A one-line counter on stderr for long batches on a terminal."""

    def __init__(self, total: int, *, enabled: bool) -> None:
        self.total, self.enabled, self.count = total, enabled, 0

    def step(self) -> None:
        self.count += 1
        if self.enabled:
            sys.stderr.write(f"\rchecking {self.count}/{self.total}")
            sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * 30 + "\r")


def _color(args: argparse.Namespace) -> bool:
    return not args.no_color and "NO_COLOR" not in os.environ and sys.stdout.isatty()


def _expand(patterns: list[str]) -> list[str]:
    paths: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise UsageError(f"{pattern}: matches no adapter")
        paths.extend(matches)
    return paths


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    return f"{n} B"
