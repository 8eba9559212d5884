"""The library's layering: no import cycle between modules or between packages, counting the
imports inside functions (a lazy import hides a cycle, it does not remove it), packages that
import only downwards in the README's order, and no Ray inside ``storygpt/``."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# storygpt's packages from the bottom up: each may import those before it, never those after.
# Top-level modules are their own nodes (config and atomic at the bottom; cli, registry at the top).
ORDER = ["models", "data", "world", "vision", "zoo", "char_ldm|aligner", "evaluation", "commands"]


def module_graph(root: Path, package: str) -> dict[str, set[str]]:
    """{module: modules of ``package`` it imports}, from every import statement in its source."""
    files = {}
    for path in (root / package).rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = name.split(".") if is_package else name.split(".")[:-1]
                    base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else []))
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            else:
                continue
            for target in targets:  # the deepest module of ours the import names
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def package_of(module: str) -> str:
    """storygpt.data.readers.common -> storygpt.data; a top-level module is its own node."""
    return ".".join(module.split(".")[:2])


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for module, targets in graph.items():
        out[package_of(module)] |= {package_of(t) for t in targets} - {package_of(module)}
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan, iterative)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
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
    return found


def test_the_checker_finds_module_and_package_cycles_through_lazy_imports(tmp_path):
    pkg = tmp_path / "fake"
    for sub in ("low", "high"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "low" / "a.py").write_text("from fake.low import b\n")
    (pkg / "low" / "b.py").write_text("def f():\n    from . import a  # lazy: still a cycle\n")
    (pkg / "high" / "c.py").write_text("from fake.low.a import thing\n")
    clean = module_graph(tmp_path, "fake")
    assert cycles(clean) == [["fake.low.a", "fake.low.b"]]
    assert cycles(package_graph(clean)) == []
    (pkg / "low" / "d.py").write_text("def g():\n    import fake.high.c\n")
    assert cycles(package_graph(module_graph(tmp_path, "fake"))) == [["fake.high", "fake.low"]]


def test_storygpt_has_no_import_cycle():
    graph = module_graph(REPO, "storygpt")
    assert len(graph) > 50  # the walk found the library
    assert cycles(graph) == [], "module-level import cycle"
    assert cycles(package_graph(graph)) == [], "package-level import cycle"


@pytest.mark.parametrize("package", ["preprocessing", "ray_jobs", "serving"])
def test_the_ray_layers_have_no_module_cycle(package):
    assert cycles(module_graph(REPO, package)) == []


def test_packages_import_only_downwards():
    rank = {f"storygpt.{name}": k for k, names in enumerate(ORDER) for name in names.split("|")}
    upward = sorted((low, high) for low, targets in package_graph(module_graph(REPO, "storygpt")).items()
                    for high in targets if low in rank and high in rank and rank[high] > rank[low])
    assert upward == []


def test_the_library_never_imports_ray():
    for module, path in [(m, REPO / (m.replace(".", "/"))) for m in module_graph(REPO, "storygpt")]:
        source = path.with_suffix(".py") if path.with_suffix(".py").exists() else path / "__init__.py"
        for node in ast.walk(ast.parse(source.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "ray" or n.startswith("ray.") for n in names), module


def test_only_the_story_pipeline_builds_the_story_loop():
    """Generate, evaluate, Serve and the benchmarks draw stories through ``StoryGPTPipeline``, so
    the reference policy and frame 1's rule mean the same everywhere: nothing else outside the
    tests constructs a ``StoryGenerator``."""
    builders = []
    for package in ("storygpt", "ray_jobs", "serving", "benchmarks", "preprocessing"):
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) \
                        == "StoryGenerator":
                    builders.append(str(path.relative_to(REPO)))
    assert builders == ["storygpt/pipeline.py"]
