"""The import rule of docs/ARCHITECTURE.md, checked on the source: no import cycle between llmkd's modules (lazy
imports inside functions included), and the losses import nothing of llmkd but its constants."""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "llmkd")


def module_imports() -> dict[str, set[str]]:
    """``module -> the llmkd modules it imports`` (``from . import x`` counted as importing ``package.x`` when that
    is a module; a module's own parent packages left out), for every ``.py`` file under llmkd/."""
    files = {}
    for folder, _, names in os.walk(ROOT):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                parts = ["llmkd", *os.path.relpath(path[:-3], ROOT).split(os.sep)]
                files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = (path, parts[-1] == "__init__")
    graph = {}
    for module, (path, is_package) in files.items():
        package = module.split(".") if is_package else module.split(".")[:-1]
        targets = set()
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names if alias.name.split(".")[0] == "llmkd"}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
                elif node.module and node.module.split(".")[0] == "llmkd":
                    base = node.module
                else:
                    continue
                targets.add(base)
                targets |= {f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in files}
        # a module's own parent packages are already being imported when it runs: not an edge
        ancestors = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
        graph[module] = {target for target in targets if target in files and target != module
                         and target not in ancestors}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = module_imports()
    assert "llmkd.trainers.base" in graph and "llmkd.losses.registry" in graph["llmkd.trainers.base"] | {
        target for source in graph["llmkd.trainers.base"] for target in graph.get(source, ())}
    assert cycles(graph) == []


@pytest.mark.parametrize("layer,allowed", [("llmkd.losses", {"llmkd.constants"}),
                                           ("llmkd.constants", set())])
def test_the_bottom_layers_import_nothing_above_them(layer, allowed):
    graph = module_imports()
    for module, targets in graph.items():
        if module == layer or module.startswith(layer + "."):
            above = {t for t in targets if not (t == layer or t.startswith(layer + "."))} - allowed
            assert not above, f"{module} imports {sorted(above)}"
