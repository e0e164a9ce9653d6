"""The package's shape: stages are siblings over a shared library, no import circle, a light CLI.

Stages (train-teacher, cache-teachers, amalgamate, the demo) may be imported only by what runs them:
the commands, the demo and ablation drivers, and the benchmarks.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kacli"
STAGES = {"kacli.teacher", "kacli.amalgamate", "kacli.cache.writer", "kacli.demo", "kacli.ablate"}
DRIVERS = ("kacli.commands", "kacli.demo", "kacli.ablate", "kacli.bench")


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    name = ".".join(rel.parts)
    return name.removesuffix(".__init__")


def imported_modules(path: Path) -> set[str]:
    """Every kacli module ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kacli"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # from kacli import teacher
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("kacli"))
    return found


def test_no_module_imports_a_stage_at_its_own_level_or_below():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        if name.startswith(DRIVERS):
            continue
        for stage in sorted(imported_modules(path) & STAGES):
            if stage != name:
                offenders.append(f"{name} imports {stage}")
    assert not offenders, offenders


def test_every_module_imports_on_its_own():
    """Imported first, each module loads: no circle (a circle fails for whichever side comes first)."""
    code = (
        "import importlib, sys\n"
        "names = sys.argv[1:]\n"
        "bad = []\n"
        "for m in names:\n"
        "    for k in [k for k in sys.modules if k == 'kacli' or k.startswith('kacli.')]:\n"
        "        del sys.modules[k]\n"
        "    try:\n"
        "        importlib.import_module(m)\n"
        "    except Exception as e:\n"
        "        bad.append(f'{m}: {type(e).__name__}: {e}')\n"
        "print('\\n'.join(bad))\n"
    )
    names = [module_name(p) for p in sorted(PACKAGE.rglob("*.py")) if p.stem != "__main__"]
    out = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=600,
                         cwd=PACKAGE.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", out.stdout


def test_the_cli_starts_without_torch():
    out = subprocess.run([sys.executable, "-c", "import sys, kacli.cli; print(sorted(m for m in sys.modules "
                          "if m.split('.')[0] in ('torch', 'torchvision', 'h5py', 'scipy')))"],
                         capture_output=True, text=True, timeout=120, cwd=PACKAGE.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# -- the import graph --------------------------------------------------------------------------------


def import_graph(type_hints: bool = True) -> dict[str, set[str]]:
    """``{module: the kacli modules it imports}``, every import counted: at the top, inside a
    function, and under ``if TYPE_CHECKING`` (a circle through type hints is still a circle).
    ``from kacli.x import name`` counts as ``kacli.x.name`` when that is a module, else ``kacli.x``."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kacli"):
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    deps.add(full if full in modules else owner(node.module))
            elif isinstance(node, ast.Import):
                deps.update(owner(a.name) for a in node.names if a.name.startswith("kacli"))
        graph[name] = deps - {None, name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


#: The layers, lowest first: a module imports only from its own layer or a lower one. A module
#: belongs to the layer of the longest prefix listed (``kacli.cache.writer`` before ``kacli.cache``).
LAYERS = [
    ("foundation", ["kacli", "kacli.errors", "kacli.fsutil", "kacli.limits", "kacli.progress", "kacli.draw",
                    "kacli.grid", "kacli.config"]),
    ("data", ["kacli.data"]),
    ("models", ["kacli.models"]),
    ("runtime", ["kacli.runtime"]),
    ("losses, eval, teachers", ["kacli.losses", "kacli.eval", "kacli.teachers"]),
    ("engine, cache", ["kacli.engine", "kacli.runconfig", "kacli.cache"]),
    ("amalgamation", ["kacli.amalgamation"]),
    ("training kit", ["kacli.training"]),
    ("stages", ["kacli.teacher", "kacli.amalgamate", "kacli.cache.writer", "kacli.predict", "kacli.export",
                "kacli.report"]),
    ("drivers", ["kacli.demo", "kacli.ablate", "kacli.bench", "kacli.commands", "kacli.cli", "kacli.__main__"]),
]


def layer_of(module: str) -> int:
    best, rank = "", None
    for k, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > len(best):
                best, rank = p, k
    assert rank is not None, f"{module} is in no layer: add it to LAYERS"
    return rank


def closure(graph: dict[str, set[str]], start: set[str]) -> set[str]:
    seen, todo = set(), list(start)
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph[m])
    return seen


def test_the_import_graph_has_no_circle_type_hints_included():
    assert circles(import_graph()) == []


#: Upward imports still to be undone, each with where it goes.
STILL_UP: set[tuple[str, str]] = set()


def test_no_import_goes_up_a_layer():
    graph = import_graph()
    up = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})"
          for m in sorted(graph) for d in sorted(graph[m]) if layer_of(d) > layer_of(m) and (m, d) not in STILL_UP]
    assert not up, up
    gone = [pair for pair in STILL_UP if pair[1] not in graph.get(pair[0], ())]
    assert not gone, f"no longer imported, take them off STILL_UP: {gone}"


def test_the_folders_import_each_other_in_no_circle():
    """Each subpackage taken as one node (engine/, eval/, losses/ …): no two reach each other."""
    def folder(m: str) -> str:
        parts = m.split(".")
        return ".".join(parts[:2]) if len(parts) > 1 and (PACKAGE / parts[1]).is_dir() else m

    graph: dict[str, set[str]] = {}
    for m, deps in import_graph().items():
        graph.setdefault(folder(m), set()).update(folder(d) for d in deps)
    for f in graph:
        graph[f].discard(f)
        for d in graph[f]:
            graph.setdefault(d, set())
    assert circles(graph) == []


def test_the_engine_is_the_trainer_alone():
    """engine/ is the Trainer and what it alone uses: nothing below it (losses, eval, teachers,
    models, data) imports it, and it imports no evaluation."""
    graph = import_graph()
    below = [f"{m} imports {d}" for m in graph if m.startswith(("kacli.losses", "kacli.eval", "kacli.teachers",
                                                              "kacli.models", "kacli.data", "kacli.runtime"))
             for d in graph[m] if d.startswith("kacli.engine")]
    assert not below, below
    up = [f"{m} imports {d}" for m in graph if m.startswith("kacli.engine")
          for d in graph[m] if d.startswith("kacli.eval")]
    assert not up, up


def test_data_imports_nothing_from_models():
    graph = import_graph()
    bad = [f"{m} imports {d}" for m in graph if m.startswith("kacli.data") for d in graph[m]
           if d.startswith("kacli.models")]
    assert not bad, bad


def test_the_teachers_capability_stands_below_the_cache():
    """A teacher (load, identify, match labels, run, online) is kacli.teachers's; nothing there
    reaches the cache, the amalgamation or a stage."""
    graph = import_graph()
    reached = closure(graph, {m for m in graph if m.startswith("kacli.teachers")})
    assert not {m for m in reached if m.startswith(("kacli.cache", "kacli.amalgamat", "kacli.engine.train"))}


def top_level_graph() -> dict[str, set[str]]:
    """Like :func:`import_graph`, the imports a module runs when it is imported: at its top level,
    not inside a function nor under ``if TYPE_CHECKING``."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    full = import_graph()
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        body = [n for n in tree.body if not (isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test))]
        top = ast.Module(body=[n for n in body if isinstance(n, (ast.Import, ast.ImportFrom))], type_ignores=[])
        names = set()
        for node in top.body:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kacli"):
                names.add(node.module)
                names.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
        graph[name] = {d for d in full[name] if d in names or any(n.startswith(d + ".") for n in names)}
    return graph


def test_amalgamate_with_online_teachers_loads_no_cache_module():
    """``amalgamate --teacher``: the command, the stage and everything they import at load time
    reach nothing in kacli.cache; the cache source is imported only when a cache is given
    (tests/test_online_teachers.py runs the command and looks at sys.modules)."""
    graph = top_level_graph()
    reached = closure(graph, {"kacli.commands.amalgamate", "kacli.amalgamate", "kacli.amalgamation.sources"})
    assert sorted(m for m in reached if m.startswith("kacli.cache")) == []
