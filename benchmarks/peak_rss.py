"""One load in a fresh process; prints its peak RSS (VmHWM, KiB) before and after the load.

Used by run.py: `peak_rss.py plain|safe DIR`. VmHWM belongs to the process's own address space; ru_maxrss
would carry over the parent's peak across exec on Linux.
"""

from __future__ import annotations

import sys
import warnings

warnings.filterwarnings("ignore")


def main() -> None:
    mode, directory = sys.argv[1], sys.argv[2]
    from peft import PeftModel
    from run import bench_base

    from safe_peft import safe_load_adapter

    base = bench_base()
    before = _hwm()
    if mode == "plain" and "compiled" not in directory:
        PeftModel.from_pretrained(base, directory)
    elif mode == "remap":
        safe_load_adapter(base, directory, remap="auto")
    else:
        safe_load_adapter(base, directory)
    after = _hwm()
    print(before, after)


def _hwm() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


if __name__ == "__main__":
    main()
