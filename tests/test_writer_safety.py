"""The fix writer and the user's files: it never writes or removes outside a directory it created, a failed or
refused fix leaves nothing behind, and ``safe-peft fix --force`` killed (SIGKILL) at any moment leaves the output
directory holding either the old or the new output, never neither, and touches nothing else."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time
from typing import Any

import pytest

import safe_peft._engines.fix as engine_fix
from safe_peft import AdapterLoadError, check_target, fix_for_target, merge_rank_shards
from safe_peft._fix.writer import MARKER, OutputDirError, fix_adapter
from tests.support.helpers import build, derive, save_config

ROUNDS = 40 if os.environ.get("SAFE_PEFT_STRESS") else 10
HERE = os.path.dirname(__file__)


def tree(path: str) -> dict[str, str]:
    """relative path -> sha256 of every file below ``path`` (symlinks as their target)."""
    found = {}
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            rel = os.path.relpath(full, path)
            if os.path.islink(full):
                found[rel] = "-> " + os.readlink(full)
            else:
                with open(full, "rb") as f:
                    found[rel] = hashlib.sha256(f.read()).hexdigest()
    return found


@pytest.fixture(scope="module")
def inputs(adapters: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("writer")
    model = build("causal")
    save_config(model, root / "base")
    good = adapters["causal"][0]
    return {
        "root": str(root),
        "base": str(root / "base"),
        "compiled": derive(good, str(root / "compiled"), keys=lambda k: k.replace("layers", "_orig_mod.layers", 1)),
        "rank4": derive(good, str(root / "rank4"), config=lambda c: c.update(r=4)),
        "good": good,
    }


# -- the file-safety table ---------------------------------------------------------------------------------------


def _symlink(tmp: str, _: dict[str, str]) -> str:
    os.makedirs(os.path.join(tmp, "real"))
    os.symlink(os.path.join(tmp, "real"), os.path.join(tmp, "link"))
    return os.path.join(tmp, "link")


def _foreign(tmp: str, _: dict[str, str]) -> str:
    os.makedirs(os.path.join(tmp, "mine"))
    with open(os.path.join(tmp, "mine", "notes.txt"), "w") as f:
        f.write("the user's")
    return os.path.join(tmp, "mine")


def _inside(_tmp: str, i: dict[str, str]) -> str:
    return os.path.join(i["copy"], "fixed")


def _itself(_tmp: str, i: dict[str, str]) -> str:
    return i["copy"]


def _parent(tmp: str, i: dict[str, str]) -> str:
    with open(os.path.join(tmp, "notes.txt"), "w") as f:  # the user's other files beside the adapter
        f.write("the user's")
    return tmp


REFUSED = {
    "symlink": (_symlink, OutputDirError, "symbolic link"),
    "filesystem_root": (lambda _t, _i: "/", OutputDirError, "root"),
    "non_empty_foreign": (_foreign, FileExistsError, "did not write"),
    "inside_the_input": (_inside, OutputDirError, "inside the adapter"),
    "the_input_itself": (_itself, OutputDirError, "own directory"),
    "the_input_s_parent": (_parent, OutputDirError, "holds it"),
}


def _rank_files(good: str, directory: str) -> str:
    """A sharded save's per-rank directories (every tensor replicated: the merge keeps one copy)."""
    import shutil

    for rank in (0, 1):
        shutil.copytree(good, os.path.join(directory, f"rank_{rank}"))
    return directory


# Every writer of an adapter directory, each through the one writer (safe_peft._fix.writer.write_output):
# name -> (how its input is made from the inputs, how it writes).
WRITERS: dict[str, tuple[Any, Any]] = {
    "fix": (
        lambda i, copy: shutil_copy(i["rank4"], copy),
        lambda i, copy, out, force: fix_adapter(build("causal"), copy, out, repair=("rank",), force=force),
    ),
    "fix_target": (
        lambda i, copy: shutil_copy(i["good"], copy),
        lambda i, copy, out, force: fix_for_target(copy, "llamacpp", out, base=i["base"], force=force),
    ),
    "merge_ranks": (
        lambda i, copy: _rank_files(i["good"], copy),
        lambda i, copy, out, force: merge_rank_shards(build("causal"), copy, out, force=force),
    ),
}


def shutil_copy(source: str, copy: str) -> str:
    import shutil

    shutil.copytree(source, copy)
    return copy


@pytest.mark.parametrize("writer", sorted(WRITERS))
@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unsafe_output_directories_are_refused_touching_nothing(
    case: str, force: bool, writer: str, inputs: dict[str, str], tmp_path: Any
) -> None:
    make_input, write = WRITERS[writer]
    copy = make_input(inputs, str(tmp_path / "adapter"))
    make, error, words = REFUSED[case]
    out = make(str(tmp_path), {**inputs, "copy": copy})
    before = tree(str(tmp_path))
    with pytest.raises(error, match=words):
        write(inputs, copy, out, force)
    assert tree(str(tmp_path)) == before
    assert sorted(os.listdir(tmp_path)) == sorted(n for n in os.listdir(tmp_path) if not n.startswith(".safe_peft_"))


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_every_writer_replaces_its_own_output_and_refuses_without_force(
    writer: str, inputs: dict[str, str], tmp_path: Any
) -> None:
    make_input, write = WRITERS[writer]
    copy = make_input(inputs, str(tmp_path / "adapter"))
    out = str(tmp_path / "out")
    write(inputs, copy, out, False)
    assert {MARKER, "adapter_model.safetensors"} <= set(tree(out))
    first = _content(out)
    with pytest.raises(FileExistsError, match="force=True"):
        write(inputs, copy, out, False)
    write(inputs, copy, out, True)
    assert _content(out) == first  # the same input, written again: the same output
    assert sorted(os.listdir(tmp_path)) == ["adapter", "out"]


def _content(directory: str) -> dict[str, Any]:
    """The files of an output, the weights as tensors and metadata (safetensors writes its metadata map in a
    per-process order)."""
    from safetensors import safe_open

    found: dict[str, Any] = {k: v for k, v in tree(directory).items() if not k.endswith(".safetensors")}
    with safe_open(os.path.join(directory, "adapter_model.safetensors"), "pt") as f:
        found["metadata"] = f.metadata()
        found["tensors"] = {k: f.get_tensor(k).tolist() for k in f.keys()}  # noqa: SIM118 - safe_open has no iter
    return found


def test_a_refused_after_check_leaves_the_output_as_it_was(inputs: dict[str, str], tmp_path: Any) -> None:
    """fix --target checks its output with the engine's rules in the staging directory: when that check refuses,
    nothing is moved into place (an old output stays whole, a new one never appears)."""
    from safe_peft._engines.check import TargetReport

    out = str(tmp_path / "out")
    fix_for_target(inputs["good"], "llamacpp", out, base=inputs["base"])
    old = tree(out)
    refusing = TargetReport("x", "llamacpp", "test", "refuses")
    with pytest.MonkeyPatch.context() as patch:
        real = check_target  # the function engine_fix calls, patched there below
        patch.setattr(
            engine_fix, "check_target", lambda a, *r, **k: refusing if ".safe_peft_" in str(a) else real(a, *r, **k)
        )
        with pytest.raises(AdapterLoadError):
            fix_for_target(inputs["good"], "llamacpp", out, base=inputs["base"], force=True)
        with pytest.raises(AdapterLoadError):
            fix_for_target(inputs["good"], "llamacpp", str(tmp_path / "new"), base=inputs["base"])
    assert tree(out) == old and sorted(os.listdir(tmp_path)) == ["out"]


def test_a_fix_failing_verification_leaves_nothing_behind(inputs: dict[str, str], tmp_path: Any) -> None:
    from safe_peft._fix.writer import write_fix
    from safe_peft._plan.plan import make_plan

    plan = make_plan(build("causal"), inputs["rank4"], repair=("rank",))

    def refuse(_staging: str) -> None:
        raise ValueError("verification failed")

    with pytest.raises(ValueError, match="verification failed"):
        write_fix(plan, str(tmp_path / "new"), verify=refuse)
    assert os.listdir(tmp_path) == []
    fix_adapter(build("causal"), inputs["rank4"], str(tmp_path / "old"), repair=("rank",))
    old = tree(str(tmp_path / "old"))
    with pytest.raises(ValueError, match="verification failed"):
        write_fix(plan, str(tmp_path / "old"), force=True, verify=refuse)
    assert os.listdir(tmp_path) == ["old"] and tree(str(tmp_path / "old")) == old


def _cli(server: Any, tmp: Any, *args: str) -> subprocess.CompletedProcess[str]:
    """``safe-peft ARGS`` run by the fork server (the console script's code, without its imports each time)."""
    prefix = os.path.join(str(tmp), f"cli{time.monotonic_ns()}")
    _start(server, list(args), capture=prefix)
    status = _wait(server)
    with open(prefix + ".stdout") as out, open(prefix + ".stderr") as err:
        stdout, stderr = out.read(), err.read()
    os.remove(prefix + ".stdout")
    os.remove(prefix + ".stderr")
    return subprocess.CompletedProcess(list(args), os.waitstatus_to_exitcode(status), stdout, stderr)


def test_cli_refusals_are_one_line_with_the_fix(server: Any, inputs: dict[str, str], tmp_path: Any) -> None:
    out = _foreign(str(tmp_path), inputs)
    args = ["fix", inputs["rank4"], "--base", inputs["base"], "--out", out, "--repair", "rank", "--force"]
    result = _cli(server, tmp_path.parent, *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "did not write" in result.stderr
    assert "choose a new directory" in result.stderr  # the fix is on the line too
    assert sorted(os.listdir(out)) == ["notes.txt"]


def test_fix_repair_vocab_verifies_with_the_resized_base(server: Any, inputs: dict[str, str], tmp_path: Any) -> None:
    """The fix writes the adapter and says to resize the base before loading it (a vocabulary size cannot be kept
    in an adapter); plain peft loads it into a base resized so."""
    import warnings

    import torch
    from peft import PeftModel

    from tests.support.helpers import outputs, train_adapter

    trained_base = build("causal")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trained_base.resize_token_embeddings(120)
    directory = str(tmp_path / "vocab")
    trained = train_adapter(trained_base, directory, modules_to_save=["embed_tokens", "lm_head"])
    check = _cli(server, tmp_path.parent, "check", directory, "--base", inputs["base"])
    assert check.returncode == 1 and "repair=('vocab',)" in check.stdout
    args = ["fix", directory, "--base", inputs["base"], "--out", str(tmp_path / "out"), "--repair", "vocab"]
    result = _cli(server, tmp_path.parent, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "model.resize_token_embeddings(120)" in result.stdout
    base = build("causal")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base.resize_token_embeddings(120)
    assert torch.allclose(outputs(PeftModel.from_pretrained(base, str(tmp_path / "out"))), trained, atol=1e-5)


def test_every_repair_a_finding_suggests_is_accepted_by_fix() -> None:
    """`check` prints each finding's opt-in; `fix --repair` accepts every one (argparse would exit 2)."""
    from safe_peft._catalog import CATALOG
    from safe_peft._cli import _parser

    suggested = {name for entry in CATALOG.values() for name in entry.repair}
    assert {"rank", "vocab", "dora", "targets", "legacy", "config"} <= suggested
    for name in sorted(suggested):
        args = _parser().parse_args(["fix", "adapter", "--base", "base", "--out", "out", "--repair", name])
        assert args.repair == [name]


# -- SIGKILL at random moments ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Any:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.fork_server"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    yield proc
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.close()
    proc.wait(timeout=60)
    proc.stdout.close()


def _start(server: Any, argv: list[str], capture: str | None = None, **job: Any) -> int:
    server.stdin.write(json.dumps({"argv": argv, "capture": capture, **job}) + "\n")
    server.stdin.flush()
    return int(json.loads(server.stdout.readline())["pid"])


def _wait(server: Any) -> int:
    return int(json.loads(server.stdout.readline())["status"])


@pytest.mark.parametrize("exchange", [True, False], ids=["atomic_exchange", "fallback"])
def test_fix_force_killed_at_random_points_leaves_old_or_new(
    server: Any, inputs: dict[str, str], tmp_path: Any, exchange: bool
) -> None:
    """SIGKILL before a random file-system call of the writer (fork_server's kill points): the output directory
    holds the old or the new output, and nothing but safe-peft's own staging is left beside it. Without atomic
    exchange (``fallback``), the next write's recovery (run here as that write would) puts the old one back."""
    from safe_peft._fix.writer import recover_output

    def fix(source: str, out: str) -> list[str]:
        opt = ["--remap", "auto"] if source == "compiled" else ["--repair", "rank"]
        return ["fix", inputs[source], "--base", inputs["base"], "--out", out, "--force", *opt]

    work = str(tmp_path / "work")
    os.makedirs(work)
    out = os.path.join(work, "out")
    outputs: dict[str, dict[str, str]] = {}
    counts: list[dict[str, int]] = []
    for source in ("compiled", "rank4", "compiled", "rank4"):  # the two outputs, as complete runs write them
        count = str(tmp_path / "count")
        _start(server, fix(source, out), count_to=count, no_exchange=not exchange)
        assert _wait(server) == 0
        with open(count) as f:
            counts.append(json.load(f))
        outputs[source] = tree(out)
        assert MARKER in outputs[source]
    assert outputs["compiled"] != outputs["rank4"]
    others = {name: tree(path) for name, path in inputs.items() if name != "root"}
    rng = random.Random(5)
    last, swap = min(c["points"] for c in counts[2:]), counts[-1]["swap"]
    assert 0 < swap <= last
    points = [rng.randint(1, last) for _ in range(ROUNDS)] + list(range(swap, swap + 6))  # and every swap step
    current, killed = "rank4", 0
    for round_, point in enumerate(points):
        new = "compiled" if current == "rank4" else "rank4"
        _start(server, fix(new, out), kill_at=point, no_exchange=not exchange)
        status = _wait(server)
        killed += os.WIFSIGNALED(status)
        if not exchange:
            recover_output(out)
        got = tree(out)
        assert got in (outputs[current], outputs[new]), f"round {round_}: neither the old nor the new output"
        assert not os.WIFEXITED(status) or os.WEXITSTATUS(status) == 0
        current = new if got == outputs[new] else current
        stray = [n for n in os.listdir(work) if n != "out"]
        assert all(n.startswith(".safe_peft_") for n in stray), stray  # only its own staging, never the user's
    assert killed == len(points), killed  # every kill point lies inside the write
    assert {name: tree(path) for name, path in inputs.items() if name != "root"} == others


def test_an_output_gets_the_mode_of_a_directory_made_by_hand(inputs: dict[str, str], tmp_path: Any) -> None:
    """The staging directory is private to its owner while it is written (mkdtemp); the output is not."""
    out = str(tmp_path / "out")
    fix_adapter(build("causal"), inputs["rank4"], out, repair=("rank",))
    umask = os.umask(0o022)
    os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~umask


def test_a_failed_write_removes_the_parents_it_made(inputs: dict[str, str], tmp_path: Any) -> None:
    from safe_peft._fix.writer import write_output

    def fail(_staging: str) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_output(str(tmp_path / "a" / "b" / "out"), [inputs["rank4"]], fail)
    assert os.listdir(tmp_path) == []


def test_a_crashed_swap_inside_the_input_is_refused_first(inputs: dict[str, str], tmp_path: Any) -> None:
    """The recovery of an old output (left aside by a crash) runs only for an --out the checks accept."""
    import shutil

    copy = str(tmp_path / "adapter")
    shutil.copytree(inputs["rank4"], copy)
    aside = os.path.join(copy, ".safe_peft_fixed.old")
    os.makedirs(aside)
    with open(os.path.join(aside, MARKER), "w") as f:
        f.write("{}")
    before = tree(str(tmp_path))
    with pytest.raises(OutputDirError, match="inside the adapter"):
        fix_adapter(build("causal"), copy, os.path.join(copy, "fixed"), repair=("rank",), force=True)
    assert tree(str(tmp_path)) == before


def test_another_spelling_of_the_input_is_refused(
    inputs: dict[str, str], tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The input is told by the filesystem (device and inode), not only by its resolved spelling: a bind mount or a
    case-insensitive filesystem spells one directory two ways (simulated: paths left as given)."""
    import shutil

    copy = str(tmp_path / "adapter")
    shutil.copytree(inputs["rank4"], copy)
    os.symlink(str(tmp_path), str(tmp_path / "alias"))  # another way to the same directory
    monkeypatch.setattr(os.path, "realpath", lambda path: path)  # the writer's os.path is os.path
    before = tree(str(tmp_path))
    for out, words in (
        (tmp_path / "alias" / "adapter", "own directory"),
        (tmp_path / "alias" / "adapter" / "x", "inside"),
    ):
        with pytest.raises(OutputDirError, match=words):
            fix_adapter(build("causal"), copy, str(out), repair=("rank",), force=True)
    assert tree(str(tmp_path)) == before
