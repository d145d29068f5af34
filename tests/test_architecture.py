"""The layers of ARCHITECTURE.md, checked from the code's own imports (function-level ones too).

Bottom to top: core (studio/*.py) < adapters < pipelines < tiny builders < training < entry
points (batch runner, server, Python API, CLI). An import may point down or sideways, never up,
and no two modules may import each other in a loop. The registry's "module:Class" strings are
the one sanctioned way for core to name a pipeline (the plugin seam) and are not imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"studio": "studio", "pipelines": "studio.pipelines", "adapters": "studio.adapters"}

# (module prefix, layer): the longest matching prefix wins
LAYERS = [
    ("studio", 0),  # core: errors, paths, progress, device, outputs, safety, models, registry, pipeline, presets, engine
    ("studio.adapters", 1),
    ("studio.pipelines", 2),
    ("studio.pipelines.tiny", 3),
    ("studio.pipelines.training", 4),
    ("studio.batch", 5),
    ("studio.api", 6),
    ("studio.server", 6),
    ("studio.cli", 7),
    ("studio.__main__", 8),
]


def layer(module: str) -> int:
    if module == "studio":  # the package's face (studio/__init__.py): `from studio import Studio` for scripts
        return 6
    best = max((p for p, _ in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return dict(LAYERS)[best]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    parts = list(rel.with_suffix("").parts)
    parts[0] = FOLDERS[parts[0]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    found = {}
    for folder in FOLDERS:
        for path in (ROOT / folder).rglob("*.py"):
            found[module_name(path)] = path
    return found


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Every studio module this file imports, at any depth of the code."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for target in targets:
            # the longest known module that the import names (from X import Y: Y may be a module or a name)
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target.startswith("studio") and target != name:
                out.add(target)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: {t for t in imports(path, name, known) if not name.startswith(t + ".")} for name, path in mods.items()}


def test_imports_point_down_only():
    upward = [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
              for a, targets in sorted(graph().items()) for b in sorted(targets) if layer(b) > layer(a)]
    assert not upward, "imports that run up a layer (see ARCHITECTURE.md):\n" + "\n".join(upward)


def test_no_import_cycles():
    g = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    assert not cycles, "modules that import each other in a loop:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_core_names_pipelines_only_through_registry_strings():
    """Core modules hold no import of pipelines/adapters; the registry's table is strings."""
    from studio import registry

    assert all(target.startswith("studio.pipelines.") for target in registry.BUILTIN_TASKS.values())
    core = [m for m in graph() if layer(m) == 0]
    assert "studio.registry" in core and "studio.engine" in core
