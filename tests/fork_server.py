"""A process that imports safe-peft's command line (and torch, transformers, peft) once, then runs each command it is
sent in a forked child: ``safe-peft`` commands that a test can SIGKILL at any moment without paying the imports
every round. Protocol, one JSON line each way: the test sends ``{"argv": [...], "capture": PREFIX or null}``; the server
answers ``{"pid": N}`` at once, then ``{"status": S}`` when the child has ended (S as ``os.waitpid`` reports it).
With ``capture``, the child's stdout and stderr go to ``PREFIX.stdout`` / ``PREFIX.stderr``."""

from __future__ import annotations

import json
import os
import sys

import peft  # noqa: F401 - imported before forking, so that children start at once
import torch  # noqa: F401
import transformers  # noqa: F401

from safe_peft._cli import main

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
            try:
                code = main(argv)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"status": status}), flush=True)
