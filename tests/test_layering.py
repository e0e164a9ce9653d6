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
        if name.startswith(DRIVERS) or name == "kacli.cache":  # kacli.cache re-exports cache_teachers lazily
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
