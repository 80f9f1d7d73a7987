"""Run adapters through the real llama.cpp (``make engines``; runs inside .venv-llamacpp).

For each adapter: convert it with llama.cpp's own ``convert_lora_to_gguf.py`` (run from the vendored
``vendor/llama.cpp`` of the llama-cpp-python source package, as its docs say), load it with llama-cpp-python
(built from the same source) on top of the base model converted with ``convert_hf_to_gguf.py``, and decode greedily
from token ids. The tiny bases have no tokenizer: the base conversion writes ``tokenizer.ggml.model = "none"``
a placeholder vocabulary of the right size (prompts are token ids); the adapter converter never reads one.

Input job JSON: ``{"llama_cpp_dir": DIR, "work": DIR, "prompts": [[ids]], "new_tokens": N,
"models": {name: dir}, "adapters": [{"id", "path", "model"}]}``. Output: one result per adapter and per base.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from typing import Any

_BASE_CONVERTER = r"""
import sys, runpy
sys.argv = ["convert_hf_to_gguf.py"] + sys.argv[1:]
import conversion.base as base
import gguf
_prepare = base.ModelBase.prepare_metadata
def tiny_vocab(self):
    # The tiny bases have no tokenizer: write a placeholder SentencePiece vocabulary of the model's size
    # (<unk>, <s>, </s>, the 256 byte tokens, then plain ones). Prompts are token ids, so it is never used.
    n = self.hparams.get("vocab_size") or self.hparams["text_config"]["vocab_size"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tokens += [f"t{i}" for i in range(len(tokens), n)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    types += [gguf.TokenType.NORMAL] * (n - len(types))
    w = self.gguf_writer
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens[:n])
    w.add_token_scores([0.0] * n)
    w.add_token_types(types[:n])
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
def prepare_metadata(self, vocab_only):
    self.set_vocab = lambda: tiny_vocab(self)
    return _prepare(self, vocab_only)
base.ModelBase.prepare_metadata = prepare_metadata
runpy.run_path("convert_hf_to_gguf.py", run_name="__main__")
"""


def _env(llama_cpp_dir: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(llama_cpp_dir, "gguf-py"), llama_cpp_dir])
    env["HF_HUB_OFFLINE"] = "1"
    return env


def convert_base(job: dict[str, Any], name: str, model_dir: str) -> str:
    out = os.path.join(job["work"], f"base-{name}.gguf")
    if not os.path.exists(out):
        cmd = [sys.executable, "-c", _BASE_CONVERTER, model_dir, "--outfile", out, "--outtype", "f32"]
        proc = subprocess.run(
            cmd, cwd=job["llama_cpp_dir"], env=_env(job["llama_cpp_dir"]), capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise RuntimeError(f"base conversion of {name} failed: {proc.stderr[-3000:]}")
    return out


def convert_adapter(job: dict[str, Any], adapter: dict[str, Any], model_dir: str) -> tuple[int, str, str]:
    out = os.path.join(job["work"], f"lora-{adapter['id']}.gguf")
    if os.path.exists(out):
        os.remove(out)
    cmd = [
        sys.executable,
        "convert_lora_to_gguf.py",
        adapter["path"],
        "--base",
        model_dir,
        "--outfile",
        out,
        "--outtype",
        "f32",
    ]
    proc = subprocess.run(cmd, cwd=job["llama_cpp_dir"], env=_env(job["llama_cpp_dir"]), capture_output=True, text=True)
    return proc.returncode, out, (proc.stderr or proc.stdout)[-1500:]


def generate(base_gguf: str, lora_gguf: str | None, job: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    from llama_cpp import Llama

    # type_k / type_v 0 = GGML_TYPE_F32: a float32 KV cache (the default F16 one rounds, ~5e-3 in log-probabilities)
    kwargs: dict[str, Any] = {
        "model_path": base_gguf,
        "n_ctx": 64,
        "logits_all": True,
        "verbose": False,
        "n_threads": 2,
        "seed": 0,
        "type_k": 0,
        "type_v": 0,
    }
    if lora_gguf is not None:
        kwargs["lora_path"] = lora_gguf
    llm = Llama(**kwargs)
    tokens_all, logprobs_all = [], []
    for prompt in job["prompts"]:
        llm.reset()
        llm.eval(list(prompt))
        tokens, logprobs = [], []
        for _ in range(job["new_tokens"]):
            logits = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float64)
            token = int(np.argmax(logits))
            top = logits.max()
            logprob = float(logits[token] - (top + math.log(np.exp(logits - top).sum())))
            tokens.append(token)
            logprobs.append(logprob)
            llm.eval([token])
        tokens_all.append(tokens)
        logprobs_all.append(logprobs)
    del llm
    return {"tokens": tokens_all, "logprobs": logprobs_all}


def isolated_generate(base_gguf: str, lora_gguf: str, job: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """``generate`` in a child process: an adapter can crash llama.cpp (a segfault), which is a verdict too."""
    request = os.path.join(job["work"], "request.json")
    with open(request, "w") as f:
        json.dump({"base": base_gguf, "lora": lora_gguf, "job": job}, f)
    proc = subprocess.run([sys.executable, __file__, "--generate", request], capture_output=True, text=True)
    if proc.returncode != 0:
        signal = f" (killed by signal {-proc.returncode})" if proc.returncode < 0 else ""
        return {}, f"exit code {proc.returncode}{signal}: {proc.stderr.strip()[-1200:]}"
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result, ""


def main() -> None:
    if sys.argv[1] == "--generate":
        with open(sys.argv[2]) as f:
            request = json.load(f)
        print(json.dumps(generate(request["base"], request["lora"], request["job"])))
        return
    with open(sys.argv[1]) as f:
        job = json.load(f)
    os.makedirs(job["work"], exist_ok=True)
    results: list[dict[str, Any]] = []
    bases: dict[str, str] = {}
    for name in sorted({a["model"] for a in job["adapters"]}):
        bases[name] = convert_base(job, name, job["models"][name])
        results.append({"id": f"<base:{name}>", "status": "served", **generate(bases[name], None, job)})
    for adapter in job["adapters"]:
        model_dir = job["models"][adapter["model"]]
        rc, out, log = convert_adapter(job, adapter, model_dir)
        if rc != 0:
            results.append({"id": adapter["id"], "status": "error", "stage": "conversion", "error": log})
            print(f"{adapter['id']}: conversion failed ({log.strip().splitlines()[-1][:200]})", file=sys.stderr)
            continue
        outputs, error = isolated_generate(bases[adapter["model"]], out, job)
        if error:  # llama.cpp's loading error (or crash) is the verdict we record
            results.append({"id": adapter["id"], "status": "error", "stage": "load", "error": error[-1500:]})
            print(f"{adapter['id']}: load failed ({error[-300:]})", file=sys.stderr)
            continue
        results.append({"id": adapter["id"], "status": "served", "conversion_log": log[-600:], **outputs})
        print(f"{adapter['id']}: served", file=sys.stderr)
    with open(sys.argv[2], "w") as f:
        json.dump({"results": results}, f, indent=1)


if __name__ == "__main__":
    main()
