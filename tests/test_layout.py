"""The package's shape: no import cycles (lazy imports count too), a small public surface, and a new cause added
through the catalog alone."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from typing import Any

import pytest

import safe_peft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "safe_peft")


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[: -len(".py")].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _modules() -> list[str]:
    """Every .py file of the package, subpackages included."""
    return sorted(
        os.path.join(folder, name) for folder, _, names in os.walk(PACKAGE) for name in names if name.endswith(".py")
    )


def _imports(path: str) -> set[str]:
    """The safe_peft modules a module imports anywhere: function bodies and TYPE_CHECKING blocks included."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    found: set[str] = set()
    for node in ast.walk(tree):
        relative = isinstance(node, ast.ImportFrom) and node.level > 0
        assert not relative, f"{path}: a relative import (this graph reads absolute ones)"
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("safe_peft"):
            if node.module == "safe_peft":  # `from safe_peft import X`: the module that defines X
                found.update(safe_peft._LAZY.get(a.name, "safe_peft") for a in node.names)
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("safe_peft."))
    return found


def _graph() -> dict[str, set[str]]:
    """Module -> the modules it imports. The package's own ``__init__`` is left out: it only re-exports, lazily."""
    graph = {}
    for path in _modules():
        module = _module_name(path)
        if module != "safe_peft":
            graph[module] = {m for m in _imports(path) if m != module}
    return graph


def test_no_import_cycles() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_private_modules_are_marked_and_the_public_surface_is_the_documented_api() -> None:
    public = {n[:-3] for n in os.listdir(PACKAGE) if n.endswith(".py") and not n.startswith("_")}
    assert public == {"errors", "report", "rules", "testing", "pytest_plugin"}
    hidden = [m for m in map(_module_name, _modules()) if m.count(".") > 1 and not m.split(".")[1].startswith("_")]
    assert not hidden, f"modules inside subpackages live under a private subpackage: {hidden}"
    assert dir(safe_peft) == sorted(safe_peft.__all__)
    for name in safe_peft.__all__:
        assert getattr(safe_peft, name) is not None, name
    with open(os.path.join(ROOT, "docs", "reference.md"), encoding="utf-8") as f:
        reference = f.read()
    undocumented = [n for n in safe_peft.__all__ if n != "__version__" and f".{n}\n" not in reference]
    assert not undocumented, undocumented


def test_a_new_cause_needs_one_catalog_entry_and_one_detector(adapters: dict[str, Any]) -> None:
    """A toy cause, added through the catalog and the detector list only, is reported, ranked and rendered."""
    from safe_peft import Cause, diagnose
    from safe_peft._catalog import CATALOG, Entry, finding, register
    from safe_peft._plan.classify import DETECTORS, Found, register_detector
    from tests.support.helpers import build

    entry = register(Entry("toy_tiny_rank", Cause.CONFIG_MISMATCH, 0, True, "train with r >= {minimum}."))

    def tiny_rank(ev: Any, _explained: frozenset[str]) -> list[Found]:
        ranks = [s[0] for k, s in ev.checkpoint.items() if k.endswith("lora_A.weight")]
        if ranks and min(ranks) < 16:
            return [Found(finding("toy_tiny_rank", f"rank {min(ranks)} is tiny", minimum=16), len(ranks))]
        return []

    detector = register_detector(tiny_rank)
    try:
        directory, _ = adapters["wide"]  # a real mismatch, so that classification runs
        report = diagnose(build("causal"), directory)
        assert report.primary is not None and report.primary.code == "toy_tiny_rank"  # rank 0 sorts first
        assert report.primary.fix == "train with r >= 16." and report.primary.url.endswith("#toy_tiny_rank")
        assert "[config_mismatch/toy_tiny_rank]" in str(report)
    finally:
        DETECTORS.remove(detector)
        del CATALOG[entry.code]


@pytest.mark.parametrize("error", ["AdapterLoadError", "AdapterFormatError", "AdapterNotFoundError"])
def test_every_error_class_shows_its_message(error: str) -> None:
    cls = getattr(safe_peft, error)
    assert cls.__doc__ and "str(err)" in cls.__doc__


def test_a_load_never_imports_the_engine_rule_data() -> None:
    """The engine rules (a thousand lines of data) join the findings catalog when an engine check imports them."""
    code = (
        "import sys, safe_peft._catalog, safe_peft._plan.plan, safe_peft._routes.first_adapter; "
        "assert not [m for m in sys.modules if m.startswith('safe_peft._engines.rule')]; "
        "import safe_peft._engines.check; from safe_peft._catalog import CATALOG; "
        "assert 'vllm_max_lora_rank' in CATALOG"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_tree_shows_the_stages() -> None:
    """At most 12 modules at the top (the public ones and the shared knowledge), the rest in stage subpackages."""
    top = [n for n in os.listdir(PACKAGE) if n.endswith(".py")]
    subpackages = [n for n in os.listdir(PACKAGE) if os.path.isfile(os.path.join(PACKAGE, n, "__init__.py"))]
    assert len(top) <= 12, sorted(top)
    assert len(subpackages) >= 5, sorted(subpackages)
    inits = [p for p in _modules() if os.path.basename(p) == "__init__.py" and os.path.dirname(p) != PACKAGE]
    for path in inits:  # a subpackage's __init__ (nested ones too) says what it holds and imports nothing
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        assert ast.get_docstring(tree), path
        assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))], path


MAX_FUNCTION_LINES = 90


def test_every_function_fits_a_screen() -> None:
    """A screen, docstring included: a longer function is split into steps that each say what they do."""
    long = []
    for path in _modules():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno:
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{_module_name(path)}.{node.name}: {lines} lines")
    assert not long, long


def test_the_package_version_matches_pyproject() -> None:
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
        declared = next(line.split('"')[1] for line in f if line.startswith("version = "))
    assert safe_peft.__version__ == declared


def _imported_from(node: ast.Import | ast.ImportFrom) -> str:
    return (node.module or "") if isinstance(node, ast.ImportFrom) else node.names[0].name


def test_no_module_imports_a_private_name_of_another() -> None:
    """An underscore name is its module's own: another module that needs it needs a public name."""
    crossing = []
    for path in _modules():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("safe_peft"):
                names = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                crossing += [f"{_module_name(path)}: {node.module}.{name}" for name in names]
        modules = {  # `import safe_peft._x as m` / `from safe_peft._p import m`: m._private crosses too
            a.asname or a.name
            for node in ast.walk(tree)
            if isinstance(node, (ast.Import, ast.ImportFrom)) and _imported_from(node).startswith("safe_peft")
            for a in node.names
        }
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)):
                continue
            if node.value.id in modules and node.attr.startswith("_") and not node.attr.startswith("__"):
                crossing.append(f"{_module_name(path)}: {node.value.id}.{node.attr}")
    assert not crossing, crossing


def test_where_to_change_what_names_paths_that_exist() -> None:
    """docs/changing.md's tree names every subpackage and module, and every path it cites exists."""
    import re

    with open(os.path.join(ROOT, "docs", "changing.md"), encoding="utf-8") as f:
        page = f.read()
    cited = set(re.findall(r"`((?:safe_peft|tests|tools|benchmarks)/[\w/.-]+)`", page))
    assert cited, "no paths cited"
    missing = sorted(p for p in cited if not os.path.exists(os.path.join(ROOT, p)))
    assert not missing, missing
    tree = page[page.index("```text") : page.index("```", page.index("```text") + 3)]
    entries = re.split(r"\n  (?=\S)", tree)  # one entry a top-level line, with its continuation lines
    for path in _modules():
        rel = os.path.relpath(path, PACKAGE)
        folder, name = os.path.split(rel)
        if name == "__init__.py" and not folder:
            continue
        top = rel.split(os.sep)[0] + "/" if folder else ""
        entry = next((e for e in entries if e.startswith(top)), "") if top else tree
        word = f"{os.path.basename(folder)}/" if name == "__init__.py" else name[:-3]
        found = re.search(rf"(?<![\w.]){re.escape(word)}(?!\w)", entry)
        assert found, f"{rel} is not in its entry of docs/changing.md's tree"
