"""The packages of mgrow form layers, and imports point down: no cycle, no import of a higher layer.

Read from the source (every ``import`` statement, at module level or inside a
function): a back-edge hidden in a function-local import counts as much as one
at the top of a module.
"""

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "mgrow"
# lowest first; a module may import its own package and the packages before it
LAYERS = ("core", "ops", "parallel", "engine", "checkpoint", "transforms", "megatron", "deepspeed", "train", "testing", "jobs", "cli")


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(path): path for path in ROOT.rglob("*.py")}


def _resolve(name: str) -> str:
    """The mgrow module an imported name lives in (``mgrow.ops.plan.steps`` -> ``mgrow.ops.plan``)."""
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def edges_of(module: str, source: str) -> set[tuple[str, str, bool]]:
    """(module, imported mgrow module, at module level) for every import statement in ``source``."""
    edges = set()
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name == "mgrow" or name.startswith("mgrow."):
                target = _resolve(name)
                if target != module:
                    edges.add((module, target, node in tree.body))
    return edges


def import_edges() -> set[tuple[str, str, bool]]:
    return set().union(*(edges_of(module, path.read_text()) for module, path in MODULES.items()))


def upward(edges) -> list[str]:
    return sorted(f"{a} -> {b}{'' if top else ' (in a function)'}" for a, b, top in edges if layer(b) > layer(a))


def layer(module: str) -> int:
    parts = module.split(".")
    return -1 if len(parts) == 1 else LAYERS.index(parts[1])


def test_every_module_is_in_a_layer():
    assert {module.split(".")[1] for module in MODULES if "." in module} == set(LAYERS)


def test_no_module_imports_a_higher_layer():
    found = upward(import_edges())
    assert not found, "imports of a higher layer:\n" + "\n".join(found)


def test_the_import_graph_has_no_cycle():
    graph = defaultdict(set)
    for a, b, _ in import_edges():
        graph[a].add(b)
    state, cycles = {}, []

    def visit(module, path):
        state[module] = "open"
        for imported in sorted(graph[module]):
            if state.get(imported) == "open":
                cycles.append(" -> ".join(path[path.index(imported):] + [imported]))
            elif imported not in state:
                visit(imported, path + [imported])
        state[module] = "done"

    for module in sorted(MODULES):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_layer_check_catches_a_hidden_upward_import():
    """The negative control: a function-local import of the training loop added to the engines is reported."""
    source = MODULES["mgrow.engine.engines"].read_text()
    assert upward(edges_of("mgrow.engine.engines", source)) == []
    hidden = source + "\n\ndef _back_edge():\n    from mgrow.train.loop import train\n\n    return train\n"
    assert upward(edges_of("mgrow.engine.engines", hidden)) == ["mgrow.engine.engines -> mgrow.train.loop (in a function)"]


def test_core_imports_no_torch():
    """core/ is what the parent of a local launch and the config checks stand on: importing it loads no torch."""
    import subprocess
    import sys

    core = sorted(module for module in MODULES if module.startswith("mgrow.core"))
    probe = f"import sys; import {', '.join(core)}; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT.parent, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout
