"""The package's import graph: no cycles, and every import points down the layers; each layer is a folder.

Layers, bottom to top (a module may import its own layer and those below; docs/architecture.md's
Layout section shows the same): base (errors, quiet) <- model <- data <- objectives (losses, log-probs,
train step) <- parallel (sharding, distributed, memory) <- config <- io (model sources, export,
checkpoints, metrics log) <- inference (scoring, decoding, prompts, metrics, reports) <- train (setup,
reference pass, memory search, loop) <- aot (compiling for a topology) <- cli.
Imports inside functions count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import os

from helpers import REPO

LAYERS = [  # (layer, the top-level modules and folders of asft_jax/ in it)
    ("base", ["errors", "quiet"]),
    ("model", ["model"]),
    ("data", ["data"]),
    ("objectives", ["objectives"]),
    ("parallel", ["parallel"]),
    ("config", ["config"]),
    ("io", ["io"]),
    ("inference", ["inference"]),
    ("train", ["train"]),
    ("aot", ["aot"]),
    ("cli", ["cli", "__main__"]),
]


def _modules() -> dict[str, str]:
    """Dotted module name (without ``asft_jax.``) -> file, for every module of the package."""
    root = os.path.join(REPO, "asft_jax")
    found = {}
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, name), root)[:-3].replace(os.sep, ".")
                found[rel.removesuffix(".__init__") if rel != "__init__" else ""] = os.path.join(folder, name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()

    def owner(dotted: str) -> str | None:  # the module a dotted name lives in
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    graph = {}
    for module, path in modules.items():
        with open(path) as f:
            tree = ast.parse(f.read())
        deps = set()
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("asft_jax"):
                names = [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("asft_jax")]
            deps.update(owner(n.removeprefix("asft_jax").lstrip(".")) for n in names)
        graph[module] = {d for d in deps if d is not None and d != module}
    return graph


def _layer(module: str) -> int:
    top = module.split(".")[0]
    for i, (_, members) in enumerate(LAYERS):
        if top in members:
            return i
    raise AssertionError(f"asft_jax.{module} is in no layer: add it to LAYERS and to docs/architecture.md")


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep, [*path, dep])):
                return cycle
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module, [module])):
            return cycle
    return None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(f"asft_jax.{m}" for m in cycle)


def test_find_cycle_reports_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_imports_point_down_the_layers():
    upward = [
        f"asft_jax.{m} ({LAYERS[_layer(m)][0]}) imports asft_jax.{d} ({LAYERS[_layer(d)][0]})"
        for m, deps in import_graph().items()
        if m
        for d in deps
        if d and _layer(d) > _layer(m)
    ]
    assert not upward, "\n".join(upward)


def test_the_folders_are_the_layers():
    """Each layer above base and config is one folder of the same name, and nothing else sits in a folder."""
    root = os.path.join(REPO, "asft_jax")
    folders = sorted(e for e in os.listdir(root) if os.path.isfile(os.path.join(root, e, "__init__.py")))
    assert folders == sorted(name for name, members in LAYERS if name in members and name != "config")
    flat = sorted(e[:-3] for e in os.listdir(root) if e.endswith(".py") and e != "__init__.py")
    assert flat == sorted(m for _, members in LAYERS for m in members if m not in folders)


def test_test_modules_share_code_through_helpers_only():
    """No test module imports another test module or conftest (what they share is in helpers.py)."""
    offenders = []
    for folder, _, files in os.walk(os.path.join(REPO, "tests")):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            with open(path) as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                targets = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if isinstance(node, ast.ImportFrom) and node.module:
                    targets = [node.module]
                for target in targets:
                    last = target.split(".")[-1]
                    if last == "conftest" or last.startswith("test_"):
                        offenders.append(f"{os.path.relpath(path, REPO)}: {target}")
    assert not offenders, offenders
