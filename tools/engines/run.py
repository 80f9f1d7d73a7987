"""``make engines``: rebuild the corpus, run it through the real engines, and rewrite tests/engines/recorded.json.

Runs in the project's environment (torch, transformers, peft): builds the tiny bases and every adapter of
tests/engines/corpus.py, the ``safe-peft fix --target`` output of each case that lists the engine in ``fixes``,
and peft's reference outputs; then runs each engine in its own environment (``--vllm-python``,
``--llamacpp-python``; the Makefile creates them) and records, per case and engine, what the engine really did:
``serves`` (greedy tokens equal to peft's and log-probabilities within ``TOLERANCE``), ``serves_wrong`` (it ran,
outputs differ), ``refuses`` (an error; whether it killed the engine). Nothing here is imported by safe_peft.

    python -m tools.engines.run   # from the repository root (``make engines``)
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import time
import zlib
from typing import Any

from tests.engines import corpus

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# max |log-prob difference| of the greedy tokens against peft's (float32 everywhere, llama.cpp with a float32 KV
# cache). Adapters an engine serves right stay within ~1e-5 (Gemma within 1.4e-3); a wrong scale or a dropped
# module moves them by 0.8 or more.
TOLERANCE = {"vllm": 2e-3, "llamacpp": 2e-3}


def build(work: str, names: list[str]) -> dict[str, Any]:
    """Build bases, adapters, fix outputs and peft references under ``work``; return the engine jobs' inputs."""
    from safe_peft._engines.fix import fix_for_target

    models: dict[str, Any] = {}
    refs: dict[str, Any] = {}
    entries: list[dict[str, Any]] = []
    for case in (corpus.CASE_BY_NAME[n] for n in names):
        mdir = os.path.join(work, "models", case.model)
        if case.model not in models:
            models[case.model] = corpus.build_model(case.model, mdir)
            refs[f"<base:{case.model}>"] = corpus.reference_outputs(mdir, None)
        adir = os.path.join(work, "adapters", case.name)
        corpus.build_adapter(case, adir, models[case.model])
        refs[case.name] = corpus.reference_outputs(mdir, adir)
        entries.extend(
            {
                "id": case.name,
                "case": case.name,
                "engine": engine,
                "path": adir,
                "model": case.model,
                "args": case.engine_args.get(engine, {}),
            }
            for engine in case.engines
        )
        for engine in case.fixes:
            fdir = os.path.join(work, "fixed", engine, case.name)
            fix_for_target(adir, engine, fdir, base=mdir, force=True, pad_rank_to=case.pad_rank)
            entries.append(
                {
                    "id": f"{case.name}+fix",
                    "case": case.name,
                    "engine": engine,
                    "path": fdir,
                    "model": case.model,
                    "args": case.engine_args.get(engine, {}),
                    "fixed": True,
                }
            )
            # the fixed adapter must also give peft's outputs in peft itself
            refs[f"{case.name}+fix:{engine}:peft"] = corpus.reference_outputs(mdir, fdir)
    return {"models": {m: os.path.join(work, "models", m) for m in models}, "refs": refs, "entries": entries}


def run_vllm(python: str, work: str, built: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for e in built["entries"]:
        if e["engine"] == "vllm":
            key = (e["model"], json.dumps(e["args"], sort_keys=True))
            groups.setdefault(key, []).append(e)
    for (model, args), entries in sorted(groups.items()):
        engine_args = {"max_lora_rank": 128, **json.loads(args)}
        job = {
            "model": built["models"][model],
            "engine_args": engine_args,
            "prompts": corpus.PROMPTS,
            "new_tokens": corpus.NEW_TOKENS,
            "adapters": [{"id": e["id"], "path": e["path"]} for e in entries],
        }
        tag = f"vllm-{model}-{zlib.crc32(args.encode()) % 10000}"
        results = _run_engine(python, "run_vllm.py", work, tag, job)
        starts = results.get("engine_starts", 0)
        _root_causes(results)
        by_id = {r["id"]: r for r in results["results"]}
        for e in entries:
            out[(e["id"], "vllm")] = {
                **by_id.get(e["id"], {"status": "missing"}),
                "engine_args": engine_args,
                "base": by_id.get("<base>"),
                "engine_starts": starts,
            }
    return out


def _root_causes(results: dict[str, Any]) -> None:
    """vLLM's EngineDeadError hides the worker's error. The engine's log has it before the runner's line for that
    adapter (``<id>: ... (engine died: True)``): read the log in order and give each death the error before it."""
    log = results.get("log", "")
    if not log or not os.path.exists(log):
        return
    by_id = {r["id"]: r for r in results["results"]}
    cause = ""
    with open(log, errors="replace") as f:
        for line in f:
            found = re.search(r"Worker failed with error '(.*?)', please check", line)
            if found:
                cause = found.group(1)
                continue
            ident, sep, rest = line.partition(": ")
            if sep and ident in by_id and "engine died" in rest and cause:
                by_id[ident]["error"] = f"{by_id[ident].get('error', '')} (worker: {cause})"
                cause = ""


def run_llamacpp(python: str, llama_dir: str, work: str, built: dict[str, Any]) -> dict[str, Any]:
    entries = [e for e in built["entries"] if e["engine"] == "llamacpp"]
    if not entries:
        return {}
    job = {
        "llama_cpp_dir": llama_dir,
        "work": os.path.join(work, "gguf"),
        "prompts": corpus.PROMPTS,
        "new_tokens": corpus.NEW_TOKENS,
        "models": built["models"],
        "adapters": [{"id": e["id"], "path": e["path"], "model": e["model"]} for e in entries],
    }
    results = _run_engine(python, "run_llamacpp.py", work, "llamacpp", job)
    by_id = {r["id"]: r for r in results["results"]}
    return {
        (e["id"], "llamacpp"): {**by_id.get(e["id"], {"status": "missing"}), "base": by_id.get(f"<base:{e['model']}>")}
        for e in entries
    }


REUSE = False  # --reuse: score the engines' saved outputs again instead of running them


def _run_engine(python: str, script: str, work: str, tag: str, job: dict[str, Any]) -> dict[str, Any]:
    if REUSE:
        for old in sorted(glob.glob(os.path.join(work, "job-*.json"))):
            with open(old) as f:
                same = json.load(f) == json.loads(json.dumps(job))
            out = old.replace("job-", "out-")
            if same and os.path.exists(out):
                with open(out) as f:
                    result: dict[str, Any] = json.load(f)
                result["log"] = old.replace("job-", "log-").replace(".json", ".txt")
                return result
    jpath, opath = os.path.join(work, f"job-{tag}.json"), os.path.join(work, f"out-{tag}.json")
    with open(jpath, "w") as f:
        json.dump(job, f)
    log = os.path.join(work, f"log-{tag}.txt")
    t0 = time.time()
    with open(log, "w") as f:
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        subprocess.run(
            [python, os.path.join(ROOT, "tools", "engines", script), jpath, opath],
            stdout=f,
            stderr=f,
            env=env,
            check=False,
        )
    print(f"  {tag}: {time.time() - t0:.0f}s (log {log})", flush=True)
    if not os.path.exists(opath):
        raise RuntimeError(f"{script} wrote no result; see {log}")
    with open(opath) as f:
        result = json.load(f)
    result["log"] = log
    return result


def verdict(result: dict[str, Any], ref: dict[str, Any], engine: str) -> dict[str, Any]:
    """What the engine really did, compared with peft's reference outputs."""
    if result.get("status") != "served":
        error = str(result.get("error", result.get("status")))
        return {
            "verdict": "refuses",
            "error": _headline(error),
            "stage": result.get("stage", "request"),
            "kills_engine": bool(result.get("engine_died", False)) or "killed by signal" in error,
        }
    diff = max(
        abs(a - b)
        for ra, rb in zip(result["logprobs"], ref["logprobs"], strict=True)
        for a, b in zip(ra, rb, strict=True)
    )
    same = result["tokens"] == ref["tokens"]
    base = result.get("base") or {}
    out = {
        "verdict": "serves" if same and diff <= TOLERANCE[engine] else "serves_wrong",
        "tokens_equal": same,
        "max_logprob_diff": round(diff, 6),
        "serves_base": result["tokens"] == base.get("tokens"),
    }
    return out


def _headline(error: str) -> str:
    if "(worker: " in error:
        return error.rsplit("(worker: ", 1)[1].rstrip(")")[:300]
    for line in reversed(error.splitlines()):
        if "GGML_ASSERT" in line or "Can not map tensor" in line or "Not a lora_A or lora_B" in line:
            return line.strip()[:300]
    if "killed by signal" in error:
        return error.split(":", 1)[0]
    for marker in ("ValueError: ", "RuntimeError: ", "Error: ", "ERROR:"):
        idx = error.rfind(marker)
        if idx >= 0:
            return error[idx:].strip().splitlines()[0][:300]
    return error.strip().splitlines()[-1][:300] if error.strip() else error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", default=os.path.join(ROOT, ".engines-work"))
    parser.add_argument("--vllm-python", default=os.path.join(ROOT, ".venv-vllm", "bin", "python"))
    parser.add_argument("--llamacpp-python", default=os.path.join(ROOT, ".venv-llamacpp", "bin", "python"))
    parser.add_argument("--llamacpp-dir", default=os.path.join(ROOT, ".engines-src", "llama.cpp"))
    parser.add_argument("--engines", default="vllm,llamacpp")
    parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    parser.add_argument("--reuse", action="store_true", help="score saved engine outputs in --work again")
    args = parser.parse_args()
    global REUSE
    REUSE = args.reuse
    names = [n for n in args.cases.split(",") if n] or [c.name for c in corpus.CASES]
    engines = args.engines.split(",")
    os.makedirs(args.work, exist_ok=True)
    t0 = time.time()
    built = build(args.work, names)
    built["entries"] = [e for e in built["entries"] if e["engine"] in engines]
    print(f"built {len(names)} cases in {time.time() - t0:.0f}s", flush=True)
    results: dict[Any, Any] = {}
    if "vllm" in engines:
        results.update(run_vllm(args.vllm_python, args.work, built))
    if "llamacpp" in engines:
        results.update(run_llamacpp(args.llamacpp_python, args.llamacpp_dir, args.work, built))
    recorded = corpus.load_recorded() if os.path.exists(corpus.RECORDED) else {"cases": {}, "fixes": {}}
    for e in built["entries"]:
        result = results.get((e["id"], e["engine"]), {"status": "missing"})
        ref = built["refs"][e["case"]]
        real = verdict(result, ref, e["engine"])
        if e["engine"] == "vllm":
            real["engine_args"] = result.get("engine_args")
        if e.get("fixed"):
            peft_ref = built["refs"][f"{e['case']}+fix:{e['engine']}:peft"]
            real["peft_equal"] = verdict({"status": "served", **peft_ref}, ref, "vllm")["verdict"] == "serves"
            recorded["fixes"].setdefault(e["case"], {})[e["engine"]] = real
        else:
            recorded["cases"].setdefault(e["case"], {})[e["engine"]] = real
        print(f"{e['id']:32} {e['engine']:9} {real['verdict']:13} {real.get('error', '')[:90]}", flush=True)
    recorded["tolerance"] = TOLERANCE
    recorded["engines"] = {"vllm": "vllm-cpu 0.32.0", "llamacpp": "llama-cpp-python 0.3.36 (llama.cpp 0c1e570)"}
    with open(corpus.RECORDED, "w") as f:
        json.dump(recorded, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {corpus.RECORDED} in {time.time() - t0:.0f}s total")


if __name__ == "__main__":
    main()
