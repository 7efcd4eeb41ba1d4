"""Every fibo module imports on its own in a fresh interpreter, and fibo's imports form no cycle.

A cycle that works only because one side imports inside a function (so the other module is already
loaded by then) does not show up when the package is imported in the usual order; the static check
below finds it from the source: the graph of module-level imports between fibo modules must be
acyclic, and so must the graph with function-level imports included.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fibo"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(node: ast.AST, module: str, is_package: bool, function_level: bool, known) -> set[str]:
    """Modules of ``known`` imported by the statements under ``node`` (not inside functions unless asked)."""
    found: set[str] = set()
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and not function_level:
            continue
        if isinstance(child, ast.Import):
            found |= {alias.name for alias in child.names}
        elif isinstance(child, ast.ImportFrom):
            if child.level:  # relative: from the module's package
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - child.level + 1]
                target = ".".join(base + ([child.module] if child.module else []))
            else:
                target = child.module or ""
            found.add(target)
            found |= {f"{target}.{alias.name}" for alias in child.names}  # `from pkg import submodule`
        found |= _imports(child, module, is_package, function_level, known)
    return {name for name in found if name in known and name != module}


def import_graph(function_level: bool = False, prefix: str = "fibo") -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        if name == prefix or name.startswith(prefix + "."):
            tree = ast.parse(path.read_text(), filename=str(path))
            deps = _imports(tree, name, path.name == "__init__.py", function_level, MODULES)
            graph[name] = {d for d in deps if d == prefix or d.startswith(prefix + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle as ``[a, b, ..., a]``, or None. Depth-first search with colours."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_finds_a_hidden_cycle():
    """The checker itself: spec -> backends -> sparse -> spec (the cycle fibo.attention had, its last
    two edges inside functions) is found with function-level imports and missed without."""
    sources = {
        "fibo.attention.spec": "from fibo.attention.backends import CHOICES\n",
        "fibo.attention.backends": "def f():\n    from fibo.attention.sparse import g\n",
        "fibo.attention.sparse": "def g():\n    from fibo.attention.spec import AttentionSpec\n",
    }
    graphs = {level: {name: _imports(ast.parse(src), name, False, level, set(sources)) for name, src in sources.items()}
              for level in (False, True)}
    assert find_cycle(graphs[False]) is None
    assert find_cycle(graphs[True]) == ["fibo.attention.backends", "fibo.attention.sparse", "fibo.attention.spec",
                                        "fibo.attention.backends"]


def test_module_level_imports_of_fibo_are_acyclic():
    graph = import_graph()
    assert "fibo.attention.layer" in graph and graph["fibo.attention.layer"]
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_imports_are_acyclic_even_inside_functions():
    graph = import_graph(function_level=True)
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"
    # the intended direction: layer -> spec -> patterns, layer -> backends -> patterns
    assert not any(d.startswith(("fibo.attention.layer", "fibo.attention.spec")) for d in graph["fibo.attention.backends"])
    patterns = [m for m in graph if m.startswith("fibo.attention.patterns")]
    assert all(not d.startswith("fibo.attention.backends") for m in patterns for d in graph[m])


# One fresh interpreter imports the third-party libraries fibo uses (no fibo module), then forks one
# child per fibo module: each child starts with no fibo module loaded and imports just that one.
# (Forking saves re-importing torch/lightning/timm ~60 times; what is checked is fibo's own order.)
_FORK_EACH = """
import importlib, json, os, sys
modules, third_party = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for name in third_party:
    try:
        importlib.import_module(name)
    except Exception:
        pass
assert not any(m == "fibo" or m.startswith("fibo.") for m in sys.modules), "a third-party import loaded fibo"
failures = {}
for module in modules:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            importlib.import_module(module)
            code, msg = 0, b""
        except BaseException as err:
            code, msg = 1, f"{type(err).__name__}: {err}".encode()
        os.write(write, msg[:2000])
        os._exit(code)
    os.close(write)
    msg = os.read(read, 4000).decode()
    os.close(read)
    _, status = os.waitpid(pid, 0)
    if status:
        failures[module] = msg or f"exit status {status}"
print(json.dumps(failures))
"""


def _third_party() -> list[str]:
    names = set()
    for path in MODULES.values():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
    return sorted(n for n in names if n != "fibo" and n not in sys.stdlib_module_names)


def test_every_module_imports_first_in_a_fresh_interpreter():
    import json

    proc = subprocess.run([sys.executable, "-c", _FORK_EACH, json.dumps(sorted(MODULES)), json.dumps(_third_party())],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    failures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert failures == {}, failures


def test_fresh_import_check_reports_a_failing_module():
    import json

    proc = subprocess.run([sys.executable, "-c", _FORK_EACH, json.dumps(["fibo.attention.patterns", "fibo.no_such_module"]),
                           "[]"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    failures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert list(failures) == ["fibo.no_such_module"]
    assert failures["fibo.no_such_module"].startswith("ModuleNotFoundError: No module named 'fibo.no_such_module'")
