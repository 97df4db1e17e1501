"""Design contract: the package's layers import only the layers above them, no module is left out of a layer,
no import cycle, and only ``distributed/`` (and the entry points that call it) imports Ray."""
from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "noprop_dist"

# Top to bottom (docs/architecture.md): a module may import its own layer and the layers above it.
LAYERS: list[tuple[str, ...]] = [
    ("noprop_dist.paper.numbers",),  # the paper's figures, pure data
    ("noprop_dist.registry",),  # names of blocks and datasets -> import paths, pure data
    ("noprop_dist.config",),
    ("noprop_dist.storage",),
    ("noprop_dist.core",),
    ("noprop_dist.data",),
    ("noprop_dist.training",),
    ("noprop_dist.observability",),  # progress lines, metrics, run logs: config and storage only
    ("noprop_dist.baselines",),  # the baselines' runner shows progress as the shard loop does
    ("noprop_dist.distributed",),
    ("noprop_dist.api", "noprop_dist.run", "noprop_dist.evaluate", "noprop_dist.export", "noprop_dist"),  # entry points
    ("noprop_dist.paper", "noprop_dist.reproduce"),  # the reproduction harness runs the entry points
]
RAY_FREE = [prefix for layer in LAYERS[:9] for prefix in layer] + ["noprop_dist.evaluate", "noprop_dist.export",
                                                                   "noprop_dist.api"]


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _layer(module: str) -> int:
    """The index of the layer whose longest prefix matches ``module``."""
    best, best_len = -1, -1
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = i, len(prefix)
    return best


def _imports(module: str, path: pathlib.Path, modules: set[str], top_level_only: bool) -> set[str]:
    """The package modules ``module`` imports (relative or absolute; ``from pkg import mod`` counts mod)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_pkg = path.name == "__init__.py"
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [f"{target}.{a.name}" for a in node.names]
            found |= {n for n in names if n in modules} or ({target} if target in modules else set())
            if target in modules:
                found.add(target)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
    found.discard(module)
    return found


def test_every_module_belongs_to_a_layer():
    missing = [m for m in _modules() if _layer(m) < 0]
    assert not missing, f"modules in no layer of tests/test_layers.py: {missing}"


def test_layers_import_only_the_layers_above():
    modules = _modules()
    names = set(modules)
    bad = []
    for module, path in modules.items():
        mine = _layer(module)
        for target in _imports(module, path, names, top_level_only=False):
            if _layer(target) > mine:
                bad.append(f"{module} (layer {mine}) imports {target} (layer {_layer(target)})")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    modules = _modules()
    names = set(modules)
    graph = {m: _imports(m, p, names, top_level_only=True) for m, p in modules.items()}
    done: set[str] = set()
    stack: list[str] = []

    def visit(m: str) -> None:
        if m in done:
            return
        if m in stack:
            cycle = stack[stack.index(m):] + [m]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        stack.append(m)
        for n in sorted(graph[m]):
            # a package's __init__ importing its own submodules is how re-exports work, not a cycle
            if not n.startswith(m + "."):
                visit(n)
        stack.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)


def test_method_layers_do_not_import_ray():
    ray_free = sorted(m for m in _modules() if any(m == p or m.startswith(p + ".") for p in RAY_FREE))
    code = (
        f"import importlib, sys; [importlib.import_module(m) for m in {ray_free!r}]; "
        "bad = [m for m in ('ray', 'prometheus_client') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
