"""``make peft-suite``: peft's own saving / loading tests, run plain and with ``safe_peft.patch()`` on; every test
whose outcome differs is listed.

``prepare`` gets peft's test files once: the sdist of peft ``PEFT_VERSION`` from PyPI (pinned by its sha256; peft is
Apache-2.0 and its sdist ships ``tests/``), unpacked under ``.peft-suite/`` (ignored by git). ``run`` fetches nothing:
it runs the files below with pytest twice in this environment (offline: tests that download from the hub fail in
both runs), once plain and once with the switch on (``switch_plugin.py``), writes each run's JUnit XML and
``.peft-suite/out/differences.txt``, and prints the counts: every test that passes plain and not with the switch,
grouped by the finding code (or exception type) of its failure, and the reverse.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import os
import re
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.dirname(os.path.abspath(__file__))
WORK = os.path.join(ROOT, ".peft-suite")
PEFT_VERSION = "0.21.2"
SDIST = f"peft-{PEFT_VERSION}.tar.gz"
SDIST_SHA256 = "b803ccfb3f3f316004d850284306687833a2235ea278fb56abc856203456142e"
SOURCE = os.path.join(WORK, f"peft-{PEFT_VERSION}")

# The big files, filtered to saving / loading; then the smaller files that need no hub, whole.
FILTER = "save or load or pretrained"
FILTERED = [
    "test_custom_models.py",
    "test_initialization.py",
    "test_mixed.py",
    "test_trainable_tokens.py",
    "test_target_parameters.py",
]
WHOLE = [
    "test_adamss_asa.py",
    "test_bdlora.py",
    "test_bufferdict.py",
    "test_deft.py",
    "test_frod.py",
    "test_incremental_pca.py",
    "test_lora_ga.py",
    "test_lora_intruders.py",
    "test_lora_megatron.py",
    "test_lora_variants.py",
    "test_lorafa.py",
    "test_loraplus.py",
    "test_mapping.py",
    "test_multitask_prompt_tuning.py",
    "test_osf.py",
    "test_poly.py",
    "test_pvera.py",
    "test_randlora.py",
    "test_riemannian_lora.py",
    "test_shira.py",
    "test_unilora.py",
    "test_vblora.py",
    "test_velora.py",
    "test_vera.py",
]
CODE = re.compile(r"\[([a-z_]+)/([a-z_]+)\]")


def prepare() -> None:
    """Download and unpack peft's tests once (the only step that reaches the network)."""
    stamp = os.path.join(SOURCE, ".unpacked")
    if os.path.exists(stamp):
        return
    os.makedirs(WORK, exist_ok=True)
    archive = os.path.join(WORK, SDIST)
    if not os.path.exists(archive):
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-binary",
                ":all:",
                "--no-deps",
                "-d",
                WORK,
                f"peft=={PEFT_VERSION}",
            ],
            check=True,
        )
    with open(archive, "rb") as handle:
        digest = hashlib.sha256(handle.read()).hexdigest()
    if digest != SDIST_SHA256:
        sys.exit(f"{archive}: sha256 {digest}, expected {SDIST_SHA256}")
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(f"peft-{PEFT_VERSION}/tests/") and m.isfile()]
        tar.extractall(WORK, members=members, filter="data")
    open(os.path.join(SOURCE, "tests", "__init__.py"), "w").close()  # peft's tests import each other relatively
    open(stamp, "w").close()


def _pytest(files: list[str], keyword: str | None, xml: str, env: dict[str, str]) -> None:
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "switch_plugin",
        "-c",
        os.path.join(HERE, "pytest.ini"),
        "--rootdir",
        SOURCE,
        f"--junitxml={xml}",
        *(["-k", keyword] if keyword else []),
        *[os.path.join("tests", f) for f in files],
    ]
    subprocess.run(command, cwd=SOURCE, env=env, check=False, stdout=subprocess.DEVNULL)


def run(out: str, files: list[str] | None, allow_pickle: bool, modes: list[str]) -> None:
    import peft

    if peft.__version__ != PEFT_VERSION:
        sys.exit(f"peft {peft.__version__} is installed; these are peft {PEFT_VERSION}'s tests")
    os.makedirs(out, exist_ok=True)
    groups = [(FILTERED, FILTER), (WHOLE, None)]
    if files:
        groups = [([f for f in fs if f in files], k) for fs, k in groups]
    base = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
    for mode in modes:
        env = dict(
            base,
            SAFE_PEFT_SUITE_SWITCH="1" if mode == "switch" else "0",
            SAFE_PEFT_SUITE_ALLOW_PICKLE="1" if allow_pickle else "0",
        )
        for index, (group, keyword) in enumerate(groups):
            if group:
                print(f"{mode}: {len(group)} file(s)", flush=True)
                _pytest(group, keyword, os.path.join(out, f"{mode}-{index}.xml"), env)
    compare(out)


def outcomes(out: str, mode: str) -> dict[str, tuple[str, str]]:
    """test id -> (outcome, category of a failure) for one run's XML files."""
    found: dict[str, tuple[str, str]] = {}
    for name in sorted(os.listdir(out)):
        if not (name.startswith(f"{mode}-") and name.endswith(".xml")):
            continue
        for case in ET.parse(os.path.join(out, name)).iter("testcase"):
            test = f"{case.get('classname')}::{case.get('name')}"
            outcome, category = "passed", ""
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    outcome = {"failure": "failed"}.get(child.tag, child.tag)
                    category = _category(child.get("message") or "", child.text or "")
                    break
            found[test] = (outcome, category)
    return found


def _category(message: str, text: str) -> str:
    match = CODE.search(message) or CODE.search(text)
    if match:
        return f"{match.group(1)}/{match.group(2)}"
    head = message.split(":", 1)[0].strip()
    return head[:60] or "?"


def compare(out: str) -> None:
    plain, switch = outcomes(out, "plain"), outcomes(out, "switch")
    lines, worse, better = [], collections.Counter[str](), collections.Counter[str]()
    for test in sorted(set(plain) | set(switch)):
        before, after = plain.get(test, ("absent", "")), switch.get(test, ("absent", ""))
        if before[0] == after[0]:
            continue
        lines.append(f"{test}\t{before[0]}\t{after[0]}\t{after[1] or before[1]}")
        if before[0] == "passed":
            worse[after[1]] += 1
        elif after[0] == "passed":
            better[before[1]] += 1
    with open(os.path.join(out, "differences.txt"), "w") as handle:
        handle.write("".join(line + "\n" for line in lines))
    for mode, found in (("plain", plain), ("switch", switch)):
        counts = collections.Counter(outcome for outcome, _ in found.values())
        print(f"{mode}: {len(found)} tests: " + ", ".join(f"{n} {o}" for o, n in sorted(counts.items())))
    print(f"pass plain, not with the switch: {sum(worse.values())}")
    for category, count in worse.most_common():
        print(f"  {count:5d}  {category}")
    print(f"pass with the switch, not plain: {sum(better.values())}")
    for category, count in better.most_common():
        print(f"  {count:5d}  {category}")
    print(f"every differing test: {os.path.join(out, 'differences.txt')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    sub.add_parser("prepare", help="download and unpack peft's tests (once)")
    runner = sub.add_parser("run", help="run the files plain and with the switch, and compare")
    runner.add_argument("--out", default=os.path.join(WORK, "out"))
    runner.add_argument("--files", nargs="*", help="only these of the files (names as listed in run.py)")
    runner.add_argument("--allow-pickle", action="store_true", help="the switch with allow_pickle=True")
    runner.add_argument(
        "--modes",
        nargs="+",
        default=["plain", "switch"],
        choices=["plain", "switch"],
        help="the runs to make (a plain run's XML files already in --out are reused)",
    )
    comparer = sub.add_parser("compare", help="compare the XML files of an earlier run")
    comparer.add_argument("--out", default=os.path.join(WORK, "out"))
    args = parser.parse_args()
    if args.verb == "prepare":
        prepare()
    elif args.verb == "run":
        prepare_done = os.path.exists(os.path.join(SOURCE, ".unpacked"))
        if not prepare_done:
            sys.exit("peft's tests are not unpacked: run `python tools/peft_suite/run.py prepare` first")
        run(args.out, args.files, args.allow_pickle, args.modes)
    else:
        compare(args.out)


if __name__ == "__main__":
    main()
