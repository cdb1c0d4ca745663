"""The package's import graph: one-way layers, no circle, imports at the top of files.

Reads every module of ``resnet_fused/`` with ``ast`` (nothing is imported), so it holds on any
machine. The table is the one docs/design.md ("Layering") and the README's Layout describe.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "resnet_fused"

#: Layer of each module or sub-package (the longest matching prefix wins). A module may import
#: modules of lower layers; within its own layer only its own group (the sub-package for
#: triton / cuda / fused / ops, else any module of that layer); layer 0 imports nothing of the
#: package.
LAYERS: dict[str, tuple[int, str]] = {
    # 0: the oracle, the model table, the kernel contract, MAC counting, tuned tables, the extension loader
    "resnet_fused.reference": (0, "reference"),
    "resnet_fused.configs": (0, "configs"),
    "resnet_fused.kernel_set": (0, "kernel_set"),
    "resnet_fused.macs": (0, "macs"),
    "resnet_fused.tuned": (0, "tuned"),
    "resnet_fused._extension": (0, "_extension"),
    "resnet_fused.parity": (0, "parity"),
    # 1: the backend= keyword and the auto table
    "resnet_fused.backends": (1, "backends"),
    # 2: each backend's kernels and kernel set; the block orchestration over a kernel set
    "resnet_fused.triton": (2, "triton"),
    "resnet_fused.cuda": (2, "cuda"),
    "resnet_fused.fused": (2, "fused"),
    # 3: the custom ops (the one place a backend name becomes a kernel set); the launch counter
    "resnet_fused.ops": (3, "ops"),
    "resnet_fused.launch_count": (3, "launch_count"),
    # the blocks' TorchScript / FX forward: op calls by schema (imports only torch)
    "resnet_fused.graph_forward": (3, "graph_forward"),
    # 4: the nn.Modules
    "resnet_fused.modules": (4, "modules"),
    "resnet_fused.postact": (4, "modules"),
    # 5: stages, models, convert, the flops command line, the public API
    "resnet_fused.stage": (5, "top"),
    "resnet_fused.models": (5, "top"),
    "resnet_fused.convert_adapters": (5, "top"),
    "resnet_fused.convert_postact": (5, "top"),
    "resnet_fused.convert": (5, "top"),
    "resnet_fused.flops": (5, "top"),
    "resnet_fused.interop": (5, "top"),
    # the AOT tooling: records the launches real module calls make, so it sits above the models
    "resnet_fused.triton.aot": (5, "top"),
    "resnet_fused": (5, "top"),
}
#: Groups whose members may import each other within their layer.
OPEN_GROUPS = {"triton", "cuda", "fused", "ops", "modules", "top"}
#: Imports inside functions that are deliberate lazy loads (each says why in its file).
LAZY_ALLOWED = {
    ("resnet_fused.ops.blocks", "resnet_fused.triton.kernel_set"),  # a backend, loaded on first use
    ("resnet_fused.ops.blocks", "resnet_fused.cuda.kernel_set"),
}
LAZY_MODULES = {"resnet_fused.triton.aot"}  # the AOT tooling: loads the launchers it compiles
#: Packages of fused paths: they never import the oracle.
ORACLE_FREE = ("resnet_fused.fused", "resnet_fused.triton")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports() -> dict[str, list[tuple[str, int, bool]]]:
    """{module: [(imported module, line, at top level)]}, package modules only. ``from X import
    name`` counts as importing ``X.name`` when that is a module of the package, else ``X``."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, list[tuple[str, int, bool]]] = {}
    for mod, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        base = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        top_level = {id(n) for n in tree.body}
        for stmt in tree.body:  # imports under a top-level if/try still run at import time
            if isinstance(stmt, (ast.If, ast.Try)):
                top_level |= {id(n) for n in ast.walk(stmt)}
        found = []
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = ".".join(base[:len(base) - node.level + 1] + [node.module] if node.module else
                                  base[:len(base) - node.level + 1]) if node.level else (node.module or "")
                if not target.startswith("resnet_fused"):
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    found.append((sub if sub in files else target, node.lineno, id(node) in top_level))
            elif isinstance(node, ast.Import):
                found += [(a.name, node.lineno, id(node) in top_level) for a in node.names
                          if a.name.startswith("resnet_fused")]
        graph[mod] = [(t, line, top) for t, line, top in found if t != mod]
    return graph


def _layer(mod: str) -> tuple[int, str]:
    best = max((k for k in LAYERS if mod == k or mod.startswith(k + ".")), key=len, default=None)
    if best is None:
        raise AssertionError(f"{mod} has no layer in tests/test_layering.py's table")
    return LAYERS[best]


GRAPH = _imports()


def test_every_module_has_a_layer():
    for mod in GRAPH:
        _layer(mod)


def test_imports_follow_the_layers():
    wrong = []
    for mod, targets in GRAPH.items():
        layer, group = _layer(mod)
        for target, line, _ in targets:
            t_layer, t_group = _layer(target)
            if layer == 0:
                ok = False
            elif t_layer < layer:
                ok = True
            elif t_layer == layer:
                ok = t_group == group and group in OPEN_GROUPS
            else:
                ok = False
            if not ok:
                wrong.append(f"{mod}:{line} (layer {layer}) imports {target} (layer {t_layer})")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_no_import_circle():
    """Counting imports inside functions too."""
    edges = {mod: {t for t, _, _ in targets if t in GRAPH} for mod, targets in GRAPH.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(mod: str):
        state[mod] = 1
        stack.append(mod)
        for t in sorted(edges[mod]):
            if state.get(t) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[mod] = 2

    for mod in sorted(edges):
        if mod not in state:
            visit(mod)


def test_imports_at_the_top():
    hidden = [f"{mod}:{line} imports {t} inside a function" for mod, targets in GRAPH.items()
              if mod not in LAZY_MODULES for t, line, top in targets if not top and (mod, t) not in LAZY_ALLOWED]
    assert not hidden, "\n".join(hidden)


@pytest.mark.parametrize("package", ORACLE_FREE)
def test_fused_paths_never_import_the_oracle(package):
    users = [f"{mod}:{line}" for mod, targets in GRAPH.items() if mod == package or mod.startswith(package + ".")
             for t, line, _ in targets if t == "resnet_fused.reference"]
    assert not users, f"{package} imports the oracle (resnet_fused.reference): {users}"


def test_the_table_catches_a_wrong_import():
    """The checks above can fail: an orchestration module importing a backend is against the table."""
    layer, group = _layer("resnet_fused.fused.forward")
    t_layer, t_group = _layer("resnet_fused.triton.conv")
    assert t_layer == layer and t_group != group
    assert _layer("resnet_fused.ops.blocks")[0] > _layer("resnet_fused.fused.forward")[0]
