"""The house layout, checked: project imports run one way (no cycle), all sit at the top of their
file, a module imported whole has the same alias everywhere, and no file is over 600 lines. Imports
are read with `ast`, top level and inside functions."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = {p.stem: p for p in sorted(ROOT.glob("*.py"))}
MAX_LINES = 600
# The one alias of each project module imported whole (`import reference_model as RM`); a project
# module not listed here is imported whole without an alias (`import train`).
ALIASES = {"reference_model": "RM", "ppo_anchor": "PA", "r1_finetune": "R1", "scenes": "S", "evaluate": "E",
           "distributed": "D", "wosac_metrics": "wm"}
# train.py is being rewritten on another branch (issue 12); remove this entry when it lands
PENDING_LENGTH = set()


def project_imports(path: Path) -> list:
    """(module imported, line, inside a function or class?) for every import of a project module."""
    out = []

    def visit(node, nested):
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef,
                                                 ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend((a.name.split(".")[0], child.lineno, nested) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                out.append((child.module.split(".")[0], child.lineno, nested))
            visit(child, inner)

    visit(ast.parse(path.read_text(), str(path)), False)
    return [(m, line, nested) for m, line, nested in out if m in MODULES]


def import_graph() -> dict:
    return {name: sorted({m for m, _, _ in project_imports(p)}) for name, p in MODULES.items()}


def find_cycle(graph: dict):
    """One cycle as a list of modules (first == last), or None."""
    state, stack = {}, []

    def dfs(u):
        state[u] = "open"
        stack.append(u)
        for v in graph[u]:
            if state.get(v) == "open":
                return stack[stack.index(v):] + [v]
            if v not in state:
                found = dfs(v)
                if found:
                    return found
        state[u] = "done"
        stack.pop()
        return None

    for u in graph:
        if u not in state:
            found = dfs(u)
            if found:
                return found
    return None


def test_finder_sees_cycles_and_nested_imports(tmp_path):
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": ["b"], "b": ["c"], "c": []}) is None
    p = tmp_path / "m.py"
    p.write_text("import scenes\n\ndef f():\n    from geometry import BIG\n    return BIG\n")
    assert project_imports(p) == [("scenes", 1, False), ("geometry", 4, True)]


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))


def test_project_imports_are_at_the_top():
    lazy = [f"{p.name}:{line} imports {m}" for p in MODULES.values() for m, line, nested in project_imports(p)
            if nested]
    assert not lazy, lazy


def test_declared_direction():
    """The arrows of DESIGN.md: the contract imports nothing, geometry only the contract, and the
    concepts never import what is built on top of them."""
    g = import_graph()
    assert g["scenes"] == []
    assert g["geometry"] == ["scenes"]
    assert "toy_scenes" not in g["env"] and "wosac_metrics" not in g["env"]
    for concept in ("scenes", "geometry", "womd", "toy_scenes", "human_driver", "env", "tokenizer",
                    "reference_model", "ppo_anchor", "r1_finetune", "wosac_metrics", "presets"):
        assert not {"evaluate", "train", "bench"} & set(g[concept]), concept


def whole_imports(path: Path) -> list:
    """(module, alias or None, line) for every `import x [as y]` of a project module."""
    return [(a.name, a.asname, node.lineno) for node in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(node, ast.Import) for a in node.names if a.name in MODULES]


def test_alias_finder(tmp_path):
    p = tmp_path / "m.py"
    p.write_text("import math\nimport scenes as sc, train\n\ndef f():\n    import evaluate as E\n")
    assert whole_imports(p) == [("scenes", "sc", 2), ("train", None, 2), ("evaluate", "E", 5)]


def test_one_alias_per_module():
    """Every file (modules, tests, docs scripts) calls a project module by the same name."""
    files = sorted(ROOT.glob("*.py")) + sorted(ROOT.glob("tests/*.py")) + sorted(ROOT.glob("docs/*.py"))
    wrong = [f"{p.relative_to(ROOT)}:{line} imports {m} as {alias}, want {ALIASES.get(m)}"
             for p in files for m, alias, line in whole_imports(p) if alias != ALIASES.get(m)]
    assert not wrong, wrong


@pytest.mark.parametrize("name", sorted(MODULES))
def test_file_length(name):
    path = MODULES[name]
    n = len(path.read_text().splitlines())
    if path.name in PENDING_LENGTH and n > MAX_LINES:
        pytest.xfail(f"{path.name}: {n} lines, its rewrite is pending")
    assert n <= MAX_LINES, f"{path.name}: {n} lines"
