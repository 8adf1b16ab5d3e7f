"""The package's import graph, read from the code: circles, arrows running back up a floor, longest files.

    python scripts/import_graph.py [--root DIR] [--json FILE] [--edges]

Files are rooms and imports arrows: every `import` of a `dermaflux` module counts, at the top of a
file, inside a function or under `if TYPE_CHECKING:`, since each is something a reader has to know.
`from a.b import c` points at the file `a/b/c.py` when there is one, else at `a/b`. The floors,
lowest first, are in `FLOORS`; an arrow from a file to a higher floor runs back up. Prints a table;
`tests/unit/test_layering.py` asserts on the same functions.
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "dermaflux"

# (floor name, module patterns) lowest first: the first floor with a pattern that matches a module
# (fnmatch: `*` also spans dots) holds it. A file may import its own floor and the floors below it.
# A new stage package needs no line here: its `config.py` is configuration, its other files stages.
FLOORS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("core", ("dermaflux", "dermaflux.core", "dermaflux.core.*")),
    ("domain", ("dermaflux.lesion", "dermaflux.lesion.*")),
    # train.prompts holds the caption styles train's section names (CaptionStyle)
    ("configuration", ("dermaflux.config", "dermaflux.*.config", "dermaflux.train.prompts")),
    ("testing", ("dermaflux.testing", "dermaflux.testing.*")),
    ("table", ("dermaflux.stages", "dermaflux.checks")),
    ("entry", ("dermaflux.commands", "dermaflux.pipeline", "dermaflux.cli")),
    ("stages", ("dermaflux.*",)),  # every other file: the stage packages corpus/, caption/, model/, train/, ...
)
# Where each floor sits, ground floor first (`FLOORS` is in matching order: the catch-all last).
ORDER = ("core", "domain", "configuration", "stages", "table", "entry", "testing")


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package (`a/__init__.py` is `a`)."""
    found = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imported_names(node: ast.AST, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative: resolve against this module's package
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([base] if base else []))
    return [f"{base}.{alias.name}" if base else alias.name for alias in node.names]


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The package file a dotted import name lands in (`a.b.c` -> `a.b.c`, else `a.b`, ...)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph(root: Path = ROOT) -> dict[str, dict[str, int]]:
    """module -> {imported package module: the first line importing it}; self-imports dropped."""
    modules = module_files(root)
    graph: dict[str, dict[str, int]] = {}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        arrows: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            for name in _imported_names(node, module, is_package):
                if name != PACKAGE and not name.startswith(PACKAGE + "."):
                    continue
                target = _resolve(name, modules)
                if target and target != module:
                    arrows.setdefault(target, node.lineno)
        graph[module] = arrows
    return graph


def circles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components of more than one file (Tarjan, iterative), largest first."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, {})))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found, key=len, reverse=True)


def floor_of(module: str) -> int:
    """The module's floor, as its place in `ORDER` (0 is the ground floor)."""
    for name, patterns in FLOORS:
        if any(fnmatch.fnmatchcase(module, pattern) for pattern in patterns):
            return ORDER.index(name)
    raise ValueError(f"{module}: on no floor of scripts/import_graph.py FLOORS; add it there")


def arrows_up(graph: dict[str, dict[str, int]], root: Path = ROOT, below: int | None = None) -> list[str]:
    """`file:line: a (floor) -> b (floor)` for each import of a higher floor (from floors <= `below`)."""
    modules = module_files(root)
    found = []
    for module, arrows in sorted(graph.items()):
        here = floor_of(module)
        if below is not None and here > below:
            continue
        for target, line in sorted(arrows.items()):
            there = floor_of(target)
            if there > here:
                path = modules[module].relative_to(root)
                found.append(f"{path}:{line}: {module} ({ORDER[here]}) -> {target} ({ORDER[there]})")
    return found


def longest_files(root: Path = ROOT, count: int = 5) -> list[tuple[str, int]]:
    sizes = [(str(p.relative_to(root)), len(p.read_text().splitlines())) for p in (root / PACKAGE).rglob("*.py")]
    return sorted(sizes, key=lambda item: (-item[1], item[0]))[:count]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root to read (default: this one)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    parser.add_argument("--edges", action="store_true", help="list every arrow running back up a floor")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    graph = import_graph(root)
    found = circles(graph)
    up = arrows_up(graph, root)
    longest = longest_files(root)
    print(f"files {len(graph)}  arrows {sum(len(a) for a in graph.values())}  circles {len(found)} "
          f"(files in circles {sum(len(c) for c in found)})  arrows back up a floor {len(up)}")
    for component in found:
        print(f"  circle of {len(component)}: {', '.join(component)}")
    if args.edges:
        print("\n".join(f"  up: {line}" for line in up))
    print("longest files: " + ", ".join(f"{name} {lines}" for name, lines in longest))
    if args.json:
        args.json.write_text(json.dumps({"files": len(graph), "circles": found, "arrows_up": up,
                                         "longest": longest}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
