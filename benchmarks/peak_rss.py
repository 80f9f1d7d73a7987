"""One load in a fresh process; prints its peak RSS (VmHWM, KiB) before and after the load.

Used by run.py: `peak_rss.py plain|plain_low_cpu|safe|remap DIR [SIZE]`. VmHWM belongs to the process's own address space; ru_maxrss
would carry over the parent's peak across exec on Linux.
"""

from __future__ import annotations

import sys
import warnings

warnings.filterwarnings("ignore")


def main() -> None:
    mode, directory = sys.argv[1], sys.argv[2]
    size = sys.argv[3] if len(sys.argv) > 3 else "33M"
    from run import bench_base, load_variant

    from safe_peft import safe_load_adapter

    base = bench_base(size)
    before = _hwm()
    if mode == "remap":
        safe_load_adapter(base, directory, remap="auto")
    else:
        load_variant(mode, base, directory)
    after = _hwm()
    print(before, after)


def _hwm() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


if __name__ == "__main__":
    main()
