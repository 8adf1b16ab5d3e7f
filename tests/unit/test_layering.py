"""Layering rules checked on the code itself: the pure core imports no Ray (the lesion domain and the
attribute extractor no torch either), the product never imports the test support, nothing outside
tests/ imports from tests/, no file imports a floor above its own (core/ the ground floor, then the
lesion domain, then the configuration), and there is no import circle among dermaflux/ files.
Every import counts: at the top, inside a function, or under `if TYPE_CHECKING:`."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import import_graph  # noqa: E402  (scripts/import_graph.py: the graph, its floors and its circles)

NO_RAY = ("ray",)
NO_RAY_OR_TORCH = ("ray", "torch")
RAY_MODULE_PREFIXES = ("ray_", "serve_")  # Ray lives in the modules that say so: ray_*.py, synth/serve_*.py
NO_TORCH = ("lesion", "caption.extract", "caption.tone_summary")  # the domain and the attribute extractor


def light_modules() -> dict[str, tuple[tuple[str, ...], list[str]]]:
    """{group: (forbidden packages, modules)}: every module of the package but the Ray ones, grouped by
    subpackage (top-level modules and core/ as "entry"), so a new module is checked without a line here."""
    groups: dict[str, list[str]] = {}
    for path in sorted((ROOT / "dermaflux").rglob("*.py")):
        if path.stem.startswith(RAY_MODULE_PREFIXES):
            continue
        parts = path.relative_to(ROOT / "dermaflux").with_suffix("").parts
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        group = parts[0] if len(parts) > 1 and parts[0] != "core" else "entry"
        groups.setdefault(group, []).append(".".join(parts))
    out = {name: (NO_RAY, modules) for name, modules in groups.items()}
    out["no-torch"] = (NO_RAY_OR_TORCH, [m for ms in groups.values() for m in ms if m.startswith(NO_TORCH)])
    return out


LIGHT_MODULES = light_modules()


def test_the_light_module_table_covers_the_package():
    names = [m for _, modules in LIGHT_MODULES.values() for m in modules]
    assert len(names) > 100 and {"train.strategy.fsdp2", "evaluate.subgroups", "corpus.sources.isic2024",
                                 "lesion.skin_tone", "core.config"} <= set(names)
    assert not {"train.ray_trainer", "synth.serve_app", "synth.serve_jobs"} & set(names)
    assert {"lesion.taxonomy", "caption.extract"} <= set(LIGHT_MODULES["no-torch"][1])


# Imports each module in turn; prints, per module, the forbidden packages loaded once it is imported.
_PROBE = """
import importlib, json, sys
forbidden, modules = json.loads(sys.argv[1])
loaded = {}
for name in modules:
    importlib.import_module(name)
    loaded[name] = sorted({m.split(".")[0] for m in sys.modules} & set(forbidden))
print(json.dumps(loaded))
"""


@pytest.mark.parametrize("group", sorted(LIGHT_MODULES))
def test_light_modules_import_no_ray(group):
    forbidden, modules = LIGHT_MODULES[group]
    names = [f"dermaflux.{m}" if m else "dermaflux" for m in modules]
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps([forbidden, names])],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout)
    culprit = next((name for name in names if loaded[name]), None)
    assert culprit is None, f"importing {culprit} loads {loaded[culprit]}"


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, dotted name) of everything a Python file imports (`from a import b` gives `a.b`)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def imports_under(files: list[Path], package: str) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{line}: imports {name}" for path in files
            for line, name in imports_of(path) if name == package or name.startswith(package + ".")]


def test_nothing_outside_tests_imports_from_tests():
    # Top-level modules of tests/ were importable by bare name while conftest put tests/ on sys.path.
    test_packages = ["tests", "conftest", *(p.stem for p in (ROOT / "tests").glob("*.py"))]
    files = [*(ROOT / "dermaflux").rglob("*.py"), *(ROOT / "bench").glob("*.py"), *(ROOT / "jobs").glob("*.py")]
    assert len(files) > 50
    assert [found for package in test_packages for found in imports_under(files, package)] == []


def test_the_product_does_not_import_the_test_support():
    testing = ROOT / "dermaflux" / "testing"
    product = [p for p in (ROOT / "dermaflux").rglob("*.py") if testing not in p.parents]
    assert imports_under(product, "dermaflux.testing") == []


@pytest.fixture(scope="module")
def graph() -> dict[str, dict[str, int]]:
    return import_graph.import_graph(ROOT)


def test_every_file_is_on_a_floor(graph):
    assert len(graph) > 90
    for module in graph:
        import_graph.floor_of(module)  # raises, naming the file, when no floor claims it


def test_core_and_the_configuration_import_nothing_above_them(graph):
    configuration = import_graph.ORDER.index("configuration")
    assert import_graph.arrows_up(graph, ROOT, below=configuration) == []


def test_no_file_imports_a_floor_above_its_own(graph):
    assert import_graph.arrows_up(graph, ROOT) == []


def test_no_import_circle_among_the_package_files(graph):
    assert import_graph.circles(graph) == []


def test_the_graph_sees_every_kind_of_import(tmp_path):
    """A function-local, a TYPE_CHECKING and a relative import each make an arrow; a circle and an
    arrow up a floor are found (so the three tests above can fail)."""
    package = tmp_path / "dermaflux"
    (package / "core").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "core" / "__init__.py").write_text("")
    (package / "core" / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                           "    from dermaflux.stages import X\n")
    (package / "core" / "b.py").write_text("def f():\n    from . import a\n")
    (package / "stages.py").write_text("import dermaflux.core.b\nfrom dermaflux.core.a import y\n")
    small = import_graph.import_graph(tmp_path)
    assert small["dermaflux.core.a"] == {"dermaflux.stages": 3}
    assert small["dermaflux.core.b"] == {"dermaflux.core.a": 2}
    assert import_graph.circles(small) == [["dermaflux.core.a", "dermaflux.core.b", "dermaflux.stages"]]
    up = import_graph.arrows_up(small, tmp_path)
    assert len(up) == 1 and "dermaflux.core.a (core) -> dermaflux.stages (table)" in up[0]
