"""The house's rules (issue 19), read from the source: dependencies flow one way between the
rooms, there are no import loops, and a function-level import of project code says why.

Every import statement counts, at the top of a module or inside a function, so a lazy import
cannot hide an upward dependency or a loop.
"""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "training", "data")

# room -> the rooms it may import (besides itself). Orchestration (pipeline/*.py) may use all.
ALLOWED = {
    "data": set(),  # shared I/O and infrastructure: storage, tracking, redaction, shards, media
    "curation": {"data"},  # pipeline/curation/
    "training": {"data"},  # training/*.py: the model, objective, loader, trainer
    "latent": {"data", "training"},  # training/latent/
    "evaluation": {"data", "training", "latent"},  # training/evaluation/
    "report": {"data"},  # pipeline/report/
    "orchestration": {"data", "curation", "training", "latent", "evaluation", "report"},
}
MAX_LINES = 650  # "no module over ~600 lines"


def room(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "data":
        return "data"
    if parts[0] == "training":
        return {"latent": "latent", "evaluation": "evaluation"}.get(parts[1] if len(parts) > 1 else "", "training")
    return {"curation": "curation", "report": "report"}.get(parts[1] if len(parts) > 1 else "", "orchestration")


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in sorted((REPO / pkg).rglob("*.py")):
            name = ".".join(p.relative_to(REPO).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = p
    return out


def imports(path: Path, known: dict) -> list[tuple[str, int, bool]]:
    """(imported project module, line, inside a function) for every import in `path`."""
    tree = ast.parse(path.read_text())
    nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f)}
    found = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            names = [a.name for a in n.names]
        elif isinstance(n, ast.ImportFrom) and n.module and not n.level:
            names = [n.module] + [f"{n.module}.{a.name}" for a in n.names]
        else:
            continue
        for name in names:
            # the longest project module the name starts with ("data.storage.Store" -> data.storage)
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and (name, n.lineno, id(n) in nested) not in found:
                found.append((name, n.lineno, id(n) in nested))
    return found


@pytest.fixture(scope="module")
def graph():
    known = modules()
    return known, {m: imports(p, known) for m, p in known.items()}


def test_rooms_import_only_downward(graph):
    known, edges = graph
    bad = [f"{known[m].relative_to(REPO)}:{line} ({room(m)}) imports {t} ({room(t)})"
           for m, targets in edges.items() for t, line, _ in targets
           if room(t) != room(m) and room(t) not in ALLOWED[room(m)]]
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_loops(graph):
    known, edges = graph
    adj = {m: sorted({t for t, _, _ in ts if t != m and not m.startswith(t + ".")}) for m, ts in edges.items()}
    state, stack, loops = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in adj.get(m, []):
            if state.get(t) == "open":
                loops.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(adj):
        if m not in state:
            visit(m)
    assert not loops, "import loops:\n" + "\n".join(loops)


def test_function_level_project_imports_say_why(graph):
    """Project imports sit at the top of a module; one inside a function (the CLI's light start-up
    path) carries a `# lazy:` comment with its reason."""
    known, edges = graph
    bad = []
    for m, targets in edges.items():
        lines = known[m].read_text().splitlines()
        for _, line, inside in targets:
            if inside and "# lazy:" not in lines[line - 1]:
                bad.append(f"{known[m].relative_to(REPO)}:{line}: {lines[line - 1].strip()}")
    assert not bad, "function-level imports without a `# lazy:` reason:\n" + "\n".join(sorted(set(bad)))


def test_no_module_is_too_long():
    long = {str(p.relative_to(REPO)): n for p in modules().values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_the_checker_sees_upward_and_lazy_imports(tmp_path):
    """The checks above could fail: an upward import inside a function is found and placed."""
    (tmp_path / "training").mkdir()
    p = tmp_path / "training" / "x.py"
    p.write_text("def f():\n    from pipeline.curation.shard import run\n    return run\n")
    found = imports(p, {"pipeline.curation.shard": None, "training.x": None})
    assert found == [("pipeline.curation.shard", 2, True)]
    assert room("pipeline.curation.shard") == "curation" and "curation" not in ALLOWED[room("training.x")]
    assert room("pipeline.report.page") == "report" and room("pipeline.cli") == "orchestration"
    assert room("training.latent.space") == "latent" and room("training.flow") == "training"
