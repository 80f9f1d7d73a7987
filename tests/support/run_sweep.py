"""``make sweep``: every case of the breadth sweep in worker processes; results to JSON and docs/sweep.md.

    python -m tests.support.run_sweep [--mapping causal_lm ...] [--methods] [--workers 2] [--only SUBSTRING]
    python -m tests.support.run_sweep --family resize [--family empty ...]   # real-layout families alone

With ``--family``, only those families of tests/support/families.py run, and only their rows of docs/sweep.md's
"Real-layout families" section are rewritten (the rest of the page is left as the last full run wrote it).

Exit code 1 when any case breaks the invariant (false refusal, wrong result, warning, diagnose disagreeing).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.support import families, sweep

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mapping", action="append", choices=sorted(sweep.MAPPINGS), help="default: all")
    parser.add_argument("--methods", action="store_true", help="also every PeftType on a few architectures")
    parser.add_argument("--only-methods", action="store_true", help="only the PeftType sweep")
    parser.add_argument("--only", default="", help="run cases whose name contains this")
    parser.add_argument("--negative", action="store_true", help="also the negative sweep (tests/support/negative.py)")
    parser.add_argument(
        "--family", action="append", choices=sorted(families.FAMILIES), help="only these real-layout families"
    )
    parser.add_argument(
        "--families", action="store_true", help="also every real-layout family (tests/support/families.py)"
    )
    parser.add_argument("--workers", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    parser.add_argument("--json", default=os.path.join(ROOT, "build", "sweep.json"))
    parser.add_argument("--docs", default=os.path.join(ROOT, "docs", "sweep.md"), help="'' to skip")
    args = parser.parse_args(argv)
    if args.family:
        return run_families(tuple(args.family), args.docs)

    jobs: list[sweep.Case] = []
    if not args.only_methods:
        jobs += sweep.lora_cases(tuple(args.mapping or sweep.MAPPINGS))
    if args.methods or args.only_methods:
        from tests.support import methods

        jobs += methods.method_cases()
    jobs = [c for c in jobs if args.only in c.name]
    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    batches = [jobs[i : i + BATCH] for i in range(0, len(jobs), BATCH)]
    with ThreadPoolExecutor(args.workers) as pool:
        futures = [pool.submit(run_batch, batch) for batch in batches]
        for future in as_completed(futures):
            for result in future.result():
                results.append(result)
                n = len(results)
                if result["outcome"] in sweep.FAILURES:
                    print(f"[{n}/{len(jobs)}] {result['outcome']}: {result['name']}: {result['detail']}", flush=True)
                elif n % 50 == 0:
                    print(f"[{n}/{len(jobs)}] {time.perf_counter() - started:.0f} s", flush=True)
    negatives: list[dict[str, Any]] = []
    if args.negative:
        from tests.support import negative

        def report(outcome: Any) -> None:
            if not outcome.ok:
                print(f"negative failed: {outcome.name}: {outcome.detail}", flush=True)

        negatives = [o.to_dict() for o in negative.run_all(report)]
    layouts = [o.to_dict() for o in families.run_all(progress=_report_family)] if args.families else []
    elapsed = time.perf_counter() - started
    results.sort(key=lambda r: r["name"])
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(
            {"seconds": round(elapsed), "results": results, "negative": negatives, "families": layouts}, f, indent=1
        )
    counts = collections.Counter(r["outcome"] for r in results)
    print(f"{len(results)} cases in {elapsed:.0f} s: {dict(counts)}")
    if args.docs and not args.only:
        with open(args.docs, "w") as f:
            f.write(render(results, elapsed, args.workers, negatives, args.mapping, layouts))
    failed = any(r["outcome"] in sweep.FAILURES for r in results) or any(not n["ok"] for n in negatives)
    return 1 if failed or any(o["kind"] != families.OK for o in layouts) else 0


def _report_family(outcome: families.Outcome) -> None:
    if not outcome.ok:
        print(f"family case failed: {outcome.name}: {outcome.kind}: {outcome.detail}", flush=True)


def run_families(names: tuple[str, ...], docs: str) -> int:
    """``--family``: the named real-layout families alone; their rows of docs/sweep.md are rewritten."""
    started = time.perf_counter()
    outcomes = [o.to_dict() for o in families.run_all(names, progress=_report_family)]
    counts = collections.Counter(o["kind"] for o in outcomes)
    print(f"{len(outcomes)} family cases in {time.perf_counter() - started:.0f} s: {dict(counts)}")
    if docs and os.path.exists(docs):
        with open(docs) as f:
            text = f.read()
        with open(docs, "w") as f:
            f.write(with_families(text, outcomes))
    return 1 if any(o["kind"] != families.OK for o in outcomes) else 0


FAMILIES_HEADING = "## Real-layout families"


def with_families(text: str, outcomes: list[dict[str, Any]]) -> str:
    """docs/sweep.md with the families section rewritten: rows of the families in ``outcomes`` replaced, other
    families' rows kept as the page had them."""
    head, found, rest = text.partition(FAMILIES_HEADING)
    end = rest.find("\n## ") + 1 if "\n## " in rest else len(rest)
    section, tail = rest[:end], rest[end:]
    if not found:
        head, marker, tail = text.partition("## Exclusions, by reason")
        tail = marker + tail
    kept = {row.split("`")[1]: row for row in section.splitlines() if row.startswith("| `")} if found else {}
    rows = {**kept, **_family_rows(outcomes)}
    failures = [o for o in outcomes if o["kind"] != families.OK]
    return head + "\n".join(_family_section([rows[k] for k in sorted(rows)], failures)) + "\n\n" + tail


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def _family_rows(outcomes: list[dict[str, Any]]) -> dict[str, str]:
    by_family: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for o in outcomes:
        by_family[o["name"].split("/", 1)[0]][o["kind"]] += 1
    return {
        name: f"| `{name}` | {sum(c.values())} | " + " | ".join(str(c[k]) for k in families.KINDS) + " |"
        for name, c in by_family.items()
    }


def _family_section(rows: list[str], failures: list[dict[str, Any]]) -> list[str]:
    lines = [
        FAMILIES_HEADING,
        "",
        "Layouts real training stacks write, each case rebuilt with the same peft / transformers calls and save",
        "(`tests/support/families.py`; `python -m tests.support.run_sweep --family NAME` runs one family and",
        "rewrites its row):",
        "where plain peft loads the adapter exactly, safe_peft must too; otherwise the primary finding must be the",
        "expected one, and every fix any finding names is executed and must give the trained outputs.",
        f"These rows: peft {_version('peft')}, transformers {_version('transformers')}.",
        "",
        "| family | cases | " + " | ".join(families.KINDS) + " |",
        "|---|---|" + "---|" * len(families.KINDS),
        *rows,
        "",
    ]
    lines += [f"- `{o['name']}` {o['kind']}: {_cell(o['detail'])}" for o in failures] or ["No failed case."]
    return lines


BATCH = 8


def run_batch(cases: list[sweep.Case]) -> list[dict[str, Any]]:
    """Run cases in a fresh worker process (a crash or hang loses only this batch, each case named)."""
    payload = json.dumps([vars(c) for c in cases])
    try:
        done = subprocess.run(
            [sys.executable, "-m", "tests.support.run_sweep", "--worker"],
            cwd=ROOT,
            input=payload,
            capture_output=True,
            text=True,
            timeout=len(cases) * (sweep.CASE_SECONDS + 30),
        )
        lines, why = done.stdout.splitlines(), f"worker exited with {done.returncode}: {done.stderr[-300:]}"
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        lines, why = out.splitlines(), "worker timed out"
    results = [json.loads(line) for line in lines if line.startswith("{")]
    finished = {r["name"] for r in results}
    results += [sweep.Result(c, sweep.EXCLUDED, f"crash: {why}").to_dict() for c in cases if c.name not in finished]
    return results


def worker() -> int:
    """``--worker``: cases as JSON on stdin, one result per line on stdout."""
    import transformers

    transformers.logging.set_verbosity_error()
    out = sys.stdout
    sys.stdout = sys.stderr  # stray prints from models must not corrupt the result lines
    for fields in json.loads(sys.stdin.read()):
        result = sweep.run_isolated(sweep.Case(**fields))
        out.write(json.dumps(result) + "\n")
        out.flush()
    return 0


def render(
    results: list[dict[str, Any]],
    seconds: float,
    workers: int,
    negatives: list[dict[str, Any]] | None = None,
    mappings: list[str] | None = None,
    layouts: list[dict[str, Any]] | None = None,
) -> str:
    """docs/sweep.md: counts per mapping and method, every failure and every exclusion with its reason."""
    import peft
    import transformers

    outcomes = [sweep.EXACT, sweep.PLAIN_INEXACT, sweep.EXCLUDED, *sweep.FAILURES]
    by_group: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for r in results:
        group = r["case"]["mapping"] if r["case"]["method"] == "LORA" else f"method {r['case']['method']}"
        by_group[group][r["outcome"]] += 1
    lines = [
        "# The breadth sweep",
        "",
        "Generated by `make sweep` (`tests/support/run_sweep.py`); do not edit by hand. Every architecture in",
        "transformers' auto mappings that builds tiny (`tests/support/tiny.py`) gets a trained LoRA saved by real peft",
        "(peft's default targets and `all-linear`; task heads via `modules_to_save`), and every `PeftType` a few",
        "architectures; then plain `PeftModel.from_pretrained` and `safe_load_adapter` load it into a fresh base.",
        "",
        "The invariant: **whatever plain peft loads exactly, safe_peft loads exactly and quietly** (outputs equal",
        "to the trained adapter's, no report warning, `diagnose` ok on the real and on a meta-device base).",
        "",
        f"peft {peft.__version__}, transformers {transformers.__version__}, torch {__import__('torch').__version__};",
        f"{len(results)} cases in {seconds / 60:.0f} min on {workers} worker(s)"
        + (
            f"; this run swept the {', '.join(sorted(mappings))} mapping(s) of {len(sweep.MAPPINGS)} "
            "(`make sweep` runs them all)."
            if mappings
            else "."
        ),
        "",
        "Outcomes: `exact` both load exactly; `plain_inexact` plain peft itself does not reproduce the trained",
        "outputs (what safe_peft did is listed below); `excluded` the case cannot be built (reasons below); the",
        "others break the invariant and must be zero.",
        "",
        "| group | " + " | ".join(outcomes) + " |",
        "|---|" + "---|" * len(outcomes),
    ]
    for group in sorted(by_group):
        lines.append(f"| {group} | " + " | ".join(str(by_group[group][o]) for o in outcomes) + " |")
    total = collections.Counter(r["outcome"] for r in results)
    lines.append("| **all** | " + " | ".join(f"**{total[o]}**" for o in outcomes) + " |")
    failures = [r for r in results if r["outcome"] in sweep.FAILURES]
    lines += ["", "## Broken invariants", ""]
    lines += [f"- `{r['name']}` {r['outcome']}: {_cell(r['detail'])}" for r in failures] or ["None."]
    lines += ["", "## Plain peft inexact", "", "| case | what happened |", "|---|---|"]
    inexact = [r for r in results if r["outcome"] == sweep.PLAIN_INEXACT]
    lines += [f"| `{r['name']}` | {_cell(r['detail'])} {r['safe_cause']} |" for r in inexact]
    if negatives:
        lines += [
            "",
            "## The negative sweep",
            "",
            "Adapters from another width, depth, task class or architecture, and with broken layouts or configs",
            "(`tests/support/negative.py`): the primary cause must be the expected one, the refused load must leave",
            "the base untouched, and every fix any finding names is executed and must give the trained outputs.",
            "",
            f"{sum(1 for n in negatives if n['ok'])} of {len(negatives)} cases pass; fixes executed: "
            f"{sum(len(n['fixes_run']) for n in negatives)}.",
            "",
            "| case | result | fixes executed |",
            "|---|---|---|",
        ]
        lines += [
            f"| `{n['name']}` | {'ok: ' if n['ok'] else '**failed**: '}{_cell(n['detail'])} | "
            f"{', '.join(f'`{x}`' for x in n['fixes_run']) or '-'} |"
            for n in negatives
        ]
    if layouts:
        rows = _family_rows(layouts)
        lines += ["", *_family_section([rows[k] for k in sorted(rows)], [o for o in layouts if o["kind"] != "ok"])]
    reasons: dict[str, list[str]] = collections.defaultdict(list)
    for r in results:
        if r["outcome"] == sweep.EXCLUDED:
            reasons[_reason(r["detail"])].append(r["name"])
    lines += ["", "## Exclusions, by reason", "", "| reason | cases | examples |", "|---|---|---|"]
    for reason, names in sorted(reasons.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"| {_cell(reason)} | {len(names)} | {', '.join(f'`{n}`' for n in names[:4])} |")
    lines += ["", "## Every exclusion", "", "| case | reason |", "|---|---|"]
    lines += [f"| `{r['name']}` | {_cell(r['detail'])} |" for r in results if r["outcome"] == sweep.EXCLUDED]
    return "\n".join(lines) + "\n"


def _reason(detail: str) -> str:
    """Group an exclusion: its stage and exception type, and the message with numbers and names blurred."""
    import re

    head = detail.split(": ", 2)
    text = head[2] if len(head) > 2 else ""
    text = re.sub(r"\d[\d,]*", "N", text)
    text = re.sub(r"'[^']*'|`[^`]*`", "'…'", text)
    return ": ".join([*head[:2], text[:80]]) if text else ": ".join(head[:2])


def _cell(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ")


if __name__ == "__main__":
    sys.exit(worker() if sys.argv[1:] == ["--worker"] else main())
