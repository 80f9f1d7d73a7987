"""A process that imports safe-peft's command line (and torch, transformers, peft) once, then runs each command it is
sent in a forked child: ``safe-peft`` commands that a test can SIGKILL at any moment without paying the imports
every round. Protocol, one JSON line each way: the test sends ``{"argv": [...], "capture": PREFIX or null}``; the server
answers ``{"pid": N}`` at once, then ``{"status": S}`` when the child has ended (S as ``os.waitpid`` reports it).
With ``capture``, the child's stdout and stderr go to ``PREFIX.stdout`` / ``PREFIX.stderr``.

Kill points, for the writer's tests: with ``"kill_at": N`` the child SIGKILLs itself just before the N-th file-system
call (a call into ``posix`` or ``io``) that the one writer (``safe_peft._fix.writer.write_output``) makes outside its
verification; with ``"count_to": PATH`` it writes how many such calls a whole run made (``points``) and the first
one inside the swap of an old output for the new (``swap``). ``"no_exchange": true`` takes
away the atomic directory exchange, as on a filesystem without ``renameat2``. A kill point is a place in the code,
not a moment: the same rounds are run on a fast machine and on a busy one."""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

import peft  # noqa: F401 - imported before forking, so that children start at once
import torch  # noqa: F401
import transformers  # noqa: F401

import safe_peft._fix.writer as writer
from safe_peft._cli import main

_FILE_MODULES = ("posix", "io", "_io")


def _kill_points(kill_at: int | None, count_to: str | None) -> None:
    """Wrap the one writer so that its file-system calls are counted, and the ``kill_at``-th is never made."""
    original, swap, seen, swapping = writer.write_output, writer._swap, [0], [0]

    def watched_swap(staging: str, target: str) -> None:
        swapping[0] = seen[0] + 1  # the first kill point inside the swap
        swap(staging, target)

    def hook(frame: Any, event: str, arg: Any) -> None:
        if event == "c_call" and getattr(arg, "__module__", None) in _FILE_MODULES:
            seen[0] += 1
            if seen[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    def counted(out_dir: Any, sources: Any, fill: Any, *, verify: Any = None, **kwargs: Any) -> None:
        def unwatched(staging: str) -> Any:  # plain peft's load of the output: not the writer's own steps
            sys.setprofile(None)
            try:
                return verify(staging) if verify is not None else None
            finally:
                sys.setprofile(hook)

        sys.setprofile(hook)
        try:
            original(out_dir, sources, fill, verify=unwatched, **kwargs)
        finally:
            sys.setprofile(None)
            if count_to:
                with open(count_to, "w") as f:
                    json.dump({"points": seen[0], "swap": swapping[0]}, f)

    writer.write_output = counted
    writer._swap = watched_swap


if __name__ == "__main__":
    for line in sys.stdin:
        job = json.loads(line)
        argv, capture = job["argv"], job.get("capture")
        pid = os.fork()
        if pid == 0:  # the child: the command, then out without running the parent's cleanups
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
            os.dup2(os.open(f"{capture}.stdout" if capture else os.devnull, flags), 1)
            os.dup2(os.open(f"{capture}.stderr" if capture else os.devnull, flags), 2)
            sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 - the child exits with os._exit
            sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
            code = 70
            if job.get("no_exchange"):
                writer._exchange = lambda first, second: False
            if job.get("kill_at") or job.get("count_to"):
                _kill_points(job.get("kill_at"), job.get("count_to"))
            try:
                code = main(argv)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"status": status}), flush=True)
