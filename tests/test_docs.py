"""The docs name every cause and every code the library can emit."""

from __future__ import annotations

import glob
import os
import re
from typing import Any

import pytest

from safe_peft import Cause
from safe_peft._versions import SHARDED_LOAD_TORCH_SINCE

ROOT = os.path.dirname(os.path.dirname(__file__))


def _catalog() -> dict[str, str]:
    """code -> cause page, for every finding the library can report (built-in rename rules included)."""
    import safe_peft._engines.rules  # registers the engine checks' codes
    import safe_peft.rules  # noqa: F401 - registers the rename rules' codes
    from safe_peft._catalog import CATALOG

    return {code: entry.cause.value for code, entry in CATALOG.items()}


def _sections() -> dict[str, set[str]]:
    """cause page -> the codes it has a ``### `code``` section for."""
    found = {}
    for cause in Cause:
        with open(os.path.join(ROOT, "docs", "causes", f"{cause.value}.md")) as f:
            found[cause.value] = set(re.findall(r"^### `([A-Za-z0-9_]+)`", f.read(), re.M))
    return found


@pytest.mark.parametrize("cause", list(Cause), ids=lambda c: c.value)
def test_every_cause_has_a_page(cause: Cause) -> None:
    assert os.path.isfile(os.path.join(ROOT, "docs", "causes", f"{cause.value}.md"))


def test_every_code_is_documented_under_its_cause() -> None:
    sections = _sections()
    missing = [f"{cause}/{code}" for code, cause in sorted(_catalog().items()) if code not in sections[cause]]
    assert not missing, missing
    assert len(_catalog()) > 60


def test_no_section_documents_a_code_the_catalog_lacks() -> None:
    catalog = _catalog()
    stale = [f"{cause}/{code}" for cause, codes in _sections().items() for code in codes if catalog.get(code) != cause]
    assert not stale, stale


def test_every_finding_the_code_builds_is_in_the_catalog() -> None:
    """Findings are built only through the catalog: no module constructs a Diagnosis by hand."""
    offenders = []
    for path in glob.glob(os.path.join(ROOT, "safe_peft", "*.py")):
        if path.endswith(("_catalog.py", "report.py")):
            continue
        with open(path) as f:
            if re.search(r"\bDiagnosis\(", f.read()):
                offenders.append(os.path.basename(path))
    assert not offenders, offenders


def _python_examples() -> dict[str, list[str]]:
    """Each page's ```python blocks, in order: a page's examples build on each other."""
    pages: dict[str, list[str]] = {}
    for name in [*sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))), os.path.join(ROOT, "README.md")]:
        with open(name) as f:
            blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
        if blocks:
            pages[os.path.relpath(name, ROOT)] = blocks
    return pages


@pytest.fixture(scope="module")
def doc_workspace(tmp_path_factory: pytest.TempPathFactory, adapters: dict[str, Any]) -> str:
    """The files the docs' examples name: real adapters and a config-only model directory."""
    import shutil

    from tests.support.helpers import build, derive, save_config

    root = tmp_path_factory.mktemp("docs")
    good = adapters["causal"][0]
    shutil.copytree(good, root / "path" / "to" / "adapter")
    shutil.copytree(good, root / "adapters" / "ours")
    shutil.copytree(good, root / "adapter")
    derive(
        good,
        str(root / "adapter-encoder"),
        keys=lambda k: k.replace("base_model.model.model.", "base_model.model.encoder."),
    )
    derive(good, str(root / "adapter-r4"), config=lambda c: c.update(r=4))
    derive(
        good,
        str(root / "adapter-compiled-r4"),
        keys=lambda k: k.replace("model.layers", "_orig_mod.model.layers"),
        config=lambda c: c.update(r=4),
    )
    model = build("causal")
    save_config(model, root / "path" / "to" / "model")
    _route_files(root / "path" / "to", good)
    return str(root)


def _route_files(where: Any, good: str) -> None:
    """docs/routes.md: a second adapter, a retrained copy, an AdaLoRA, a broken copy, a saved base and an adapter
    naming it."""
    import json
    import shutil

    from tests.support.helpers import build, derive, train_adapter

    train_adapter(build("causal"), str(where / "second"), seed=2, r=4, target_modules=["q_proj", "k_proj", "o_proj"])
    train_adapter(build("causal"), str(where / "retrained"), seed=3)
    from peft import AdaLoraConfig, get_peft_model

    adalora = AdaLoraConfig(total_step=10, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(build("causal"), adalora).save_pretrained(where / "adalora")
    derive(good, str(where / "broken"), keys=lambda k: None if "v_proj" in k else k)
    build("causal").save_pretrained(where / "base")
    shutil.copytree(good, where / "auto-adapter")
    config = where / "auto-adapter" / "adapter_config.json"
    data = json.loads(config.read_text())
    data.update(base_model_name_or_path="path/to/base", task_type="CAUSAL_LM")
    config.write_text(json.dumps(data))


# Pages whose examples need a newer torch than the oldest supported one, and why (plain torch / transformers too).
NEEDS_TORCH = {
    "docs/distributed.md": (SHARDED_LOAD_TORCH_SINCE, "loading into a sharded model"),
    "docs/routes.md": ("2.6", "transformers' Trainer resume (torch.load below torch 2.6 is refused: CVE-2025-32434)"),
}


def _runs_on_this_torch(page: str) -> None:
    import torch

    from safe_peft._versions import torch_at_least

    since, why = NEEDS_TORCH.get(page, ("0", ""))
    if not torch_at_least(str(torch.__version__), since):
        pytest.skip(f"{page} needs torch >= {since}: {why}")


@pytest.mark.parametrize("page", sorted(_python_examples()))
def test_doc_examples_run(page: str, doc_workspace: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every Python example in the docs runs, in a workspace holding the adapters it names."""
    _runs_on_this_torch(page)
    from peft import PeftModel

    from safe_peft.testing import assert_adapter_loads
    from tests.support.helpers import build

    monkeypatch.chdir(doc_workspace)
    try:
        PeftModel.from_pretrained(build("causal"), "adapter-r4")  # the key wall parse_load_error reads
    except RuntimeError as error:
        exc = error
    namespace = {
        "base_model": build("causal"),
        "base": build("causal"),
        "exc": exc,
        "build_base_model": lambda: build("causal"),
    }
    for index, code in enumerate(_python_examples()[page]):
        exec(compile(code, f"{page}[{index}]", "exec"), namespace)
    for value in list(namespace.values()):
        if callable(value) and getattr(value, "__name__", "").startswith("test_"):
            value(assert_adapter_loads)


def test_the_compatibility_matrix_is_the_rendering_of_the_ci_records() -> None:
    """docs/compatibility.md's tested matrix is tools/compat.py's rendering of docs/compat/*.json (make compat-docs)."""
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("compat_tool", os.path.join(root, "tools", "compat.py"))
    assert spec is not None and spec.loader is not None
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--check"]) == 0
    for record in tool.load_records():
        assert record["whole_suite"] and record["tests"]["failed"] == record["tests"]["errors"] == 0, record["env"]
