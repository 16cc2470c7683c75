"""The package's import graph, read from the source (every import, the ones inside functions
included): the packages import each other without cycles, the modules of methods/, engine/ and
quickstart/ too, and no method imports another method's file. (Layers: tests/unit/test_layering.py.)"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "vlmalign"

def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """The vlmalign modules ``path`` imports, as dotted names."""
    tree = ast.parse(path.read_text(), str(path))
    here = _module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "vlmalign"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "vlmalign":
                continue
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}   # `from pkg import submodule`
    return out


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _graph() -> dict[str, set[str]]:
    known = {_module_name(p) for p in SRC.rglob("*.py")}
    return {_module_name(p): {m for m in _imports(p) if m in known} for p in sorted(SRC.rglob("*.py"))}


def test_packages_import_each_other_without_cycles():
    edges: dict[str, set[str]] = {}
    for mod, deps in _graph().items():
        a = _top(mod)
        edges.setdefault(a, set()).update(_top(d) for d in deps if _top(d) != a)
    # a cycle between packages: some package reaches itself
    for start in edges:
        seen, todo = set(), list(edges[start])
        while todo:
            p = todo.pop()
            assert p != start, f"the packages {start} and {p} import each other (through {sorted(seen)})"
            if p not in seen:
                seen.add(p)
                todo.extend(edges.get(p, ()))


def test_no_method_imports_another_methods_file():
    from vlmalign.methods.registry import MODULES
    methods = {f"vlmalign.methods.{m}" for m in MODULES}
    # a method's own helper files (not methods themselves): the part of one method kept apart
    own = {"vlmalign.methods.listwise": "vlmalign.methods.dpo", "vlmalign.methods.ppo_value": "vlmalign.methods.ppo"}
    g = _graph()
    bad = []
    for mod in methods | own.keys():
        owner = own.get(mod, mod)
        for dep in g[mod]:
            if (dep in methods and dep != owner) or (dep in own and own[dep] != owner):
                bad.append(f"{mod} -> {dep}")
    assert not bad, bad


def test_module_imports_have_no_cycles_inside_a_package():
    g = _graph()
    # module-level cycles within methods/ and engine/ (where the two-engine and hub knots were)
    for pkg in ("vlmalign.methods", "vlmalign.engine", "vlmalign.quickstart"):
        mods = {m for m in g if m.startswith(pkg + ".")}
        for start in mods:
            seen, todo = set(), [d for d in g[start] if d in mods]
            while todo:
                m = todo.pop()
                assert m != start, f"{start} imports itself back through {sorted(seen)}"
                if m not in seen:
                    seen.add(m)
                    todo.extend(d for d in g[m] if d in mods)
