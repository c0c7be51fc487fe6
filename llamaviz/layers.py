"""The layers of llamaviz, bottom first: a module may import its own layer and the layers below it.

This table is the one place the order lives; tests/test_layers.py reads every module's imports
(the standard library's ast, function-level imports included) and fails on an import that points
up a layer or closes a circle. The package's root (llamaviz/__init__.py) is above every layer and
nothing imports it; llamaviz/__main__.py runs the CLI.
"""

from __future__ import annotations

import ast
from pathlib import Path

LAYERS: tuple[tuple[str, ...], ...] = (
    ("llama", "layers"),          # the model core (pure torch); this table (no imports)
    ("distributed",),             # tensor parallelism, placement, parallel requests
    ("checkpoints",),             # weights in and out (shards a checkpoint for a tensor-parallel plan)
    ("tokenizers",),              # vocabularies (reads GGUF headers with checkpoints' parser)
    ("run",),                     # generation, streamers, pipelines, llamaviz.load
    ("interpret",),               # analyses that take a model and return numbers
    ("features",),                # dictionaries: formats, attaching, training, dashboards
    ("graphs",),                  # attribution graphs on transcoder sets
    ("plots",),                   # figures: pure functions of tensors and tokens
    ("terminal",),                # AttentionMaskVisualizer and its renderers
    ("notebook",),                # one-call helpers for notebooks
    ("app",),                     # the Gradio app
    ("tl",),                      # the TransformerLens face (HookedTransformer)
    ("cli", "__main__"),          # the llamaviz command
)
ROOT = "llamaviz"


def layer_of(module: str) -> int:
    """The index in LAYERS of a dotted module name (llamaviz.run.generation -> 4); the root is above all."""
    parts = module.split(".")
    if parts == [ROOT]:
        return len(LAYERS)
    for index, members in enumerate(LAYERS):
        if parts[1] in members:
            return index
    raise ValueError(f"{module} is in no layer of llamaviz/layers.py; add its package to LAYERS")


def module_imports(package_dir: Path) -> dict[str, dict[str, int]]:
    """{module: {imported llamaviz module: line}} for every .py file under package_dir (all import statements)."""
    modules = {_name(package_dir, path): path for path in sorted(package_dir.rglob("*.py"))}
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _name(package_dir: Path, path: Path) -> str:
    parts = [package_dir.name, *path.relative_to(package_dir).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(name: str, path: Path, modules: dict) -> dict[str, int]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules]
            targets = submodules if len(submodules) == len(node.names) else [base, *submodules]
        else:
            continue
        for target in targets:
            if (target == ROOT or target.startswith(ROOT + ".")) and target != name:
                found.setdefault(target, node.lineno)
    return found


def violations(package_dir: Path) -> list[str]:
    """Every upward import and every import circle, each naming the files involved."""
    graph = module_imports(package_dir)
    problems = []
    for module, targets in graph.items():
        for target, line in targets.items():
            if target == ROOT or layer_of(target) > layer_of(module):
                problems.append(f"{_file(module)}:{line} imports {target} ({_file(target)}), a layer above")
    problems += [" -> ".join(_file(m) for m in cycle) for cycle in _cycles(graph)]
    return problems


def _file(module: str) -> str:
    return module.replace(".", "/") + ".py"


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One circle (as a closed path of modules) per strongly connected group of modules, found by Tarjan's method."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node):  # recursion depth is bounded by the module count (about a hundred)
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, {}):
            if target not in graph:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(_closed_path(graph, set(group)))

    for node in graph:
        if node not in index:
            visit(node)
    return groups


def _closed_path(graph, group: set[str]) -> list[str]:
    """A path start -> ... -> start inside one strongly connected group (breadth first from its first member)."""
    start = min(group)
    previous = {start: None}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for target in graph[node]:
            if target == start:
                walk = [node]
                while previous[walk[-1]] is not None:
                    walk.append(previous[walk[-1]])
                return [*reversed(walk), start]
            if target in group and target not in previous:
                previous[target] = node
                queue.append(target)
    return sorted(group)
