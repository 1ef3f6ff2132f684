"""The layout holds: no import circles, every import runs down the floors, no pass imports another pass,
and the wheel holds every package (docs/ARCHITECTURE.md draws the floors)."""
import ast
import pathlib

import networkx as nx

import vitcc

ROOT = pathlib.Path(vitcc.__file__).parent

# bottom to top; a module may import from its own floor or below (docs/ARCHITECTURE.md)
FLOORS = [
    ["vitcc.errors", "vitcc.metrics", "vitcc.devices", "vitcc.version", "vitcc.ir"],
    ["vitcc.frontend", "vitcc.deploy"],
    ["vitcc.analysis"],
    ["vitcc.reference"],
    ["vitcc.search", "vitcc.training"],
    ["vitcc.pipeline.pass_base"],
    ["vitcc.passes"],
    ["vitcc.pipeline.manager", "vitcc.pipeline", "vitcc.api", "vitcc.profiling", "vitcc"],
    ["vitcc.report", "vitcc.cli"],
]


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = ["vitcc", *p.relative_to(ROOT).with_suffix("").parts]
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _imports(modules: dict[str, pathlib.Path]) -> nx.DiGraph:
    """Module -> module it imports, at any depth of the file (lazy imports count), except type-only ones."""
    g = nx.DiGraph()
    g.add_nodes_from(modules)
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        typing_only = {id(m) for n in ast.walk(tree) if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)
                       for m in ast.walk(n)}
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(tree):
            if id(node) in typing_only or not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
                mod = ".".join(base + ([node.module] if node.module else []))
                subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in modules]
                targets = subs if len(subs) == len(node.names) else [mod, *subs]
            g.add_edges_from((name, t) for t in targets if t in modules and t != name)
    return g


def _floor(module: str) -> int:
    best = None
    for i, names in enumerate(FLOORS):
        for prefix in names:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (i, len(prefix))
    assert best is not None, f"{module} is on no floor: add it to FLOORS and docs/ARCHITECTURE.md"
    return best[0]


def test_no_import_circles():
    g = _imports(_modules())
    circles = [sorted(c) for c in nx.strongly_connected_components(g) if len(c) > 1]
    assert circles == []


def test_imports_run_down_the_floors():
    g = _imports(_modules())
    up = [(a, b) for a, b in g.edges if _floor(b) > _floor(a)]
    assert up == []


def test_no_pass_imports_another_pass():
    g = _imports(_modules())
    for a, b in g.edges:
        if a.startswith("vitcc.passes.") and b.startswith("vitcc.passes."):
            assert b == "vitcc.passes._common", f"{a} imports {b}: share code through vitcc.passes._common or the core"
