"""``python -m kacli.bench --out BENCHMARKS.md [--only NAME ...]``: run the benchmarks and write
their results with a description of the machine they ran on."""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import os
import platform
import sys
import time

import torch

from kacli.fsutil import atomic_file

SUITES = ["cache_bench", "amalgamate_bench"]
# Sections after this line in the existing file (measurements of whole runs, such as the demo's)
# are kept when the benchmarks are rewritten.
KEEP_MARKER = "<!-- sections below are kept by make bench -->"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        mem = f", {pages * size / 2**30:.0f} GiB RAM"
    except (ValueError, OSError):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores{mem}, {gpu}; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}"
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kacli.bench")
    ap.add_argument("--out", default="BENCHMARKS.md")
    ap.add_argument("--only", nargs="*", default=None, help=f"suites to run (default all: {', '.join(SUITES)})")
    args = ap.parse_args(argv)
    lines = [
        "# Benchmarks",
        "",
        f"Measured by `make bench` on {_dt.date.today().isoformat()}.",
        "",
        f"Machine: {machine()}.",
        "",
        "Every target is a ratio of two timings taken in the same run on the same machine.",
        "",
    ]
    for name in args.only or SUITES:
        t0 = time.perf_counter()
        print(f"== {name}", file=sys.stderr)
        importlib.import_module(f"kacli.bench.{name}").run(lines)
        lines.append(f"_({name} took {time.perf_counter() - t0:.0f} s)_")
        lines.append("")
    kept = ""
    if os.path.exists(args.out):
        with open(args.out, encoding="utf-8") as f:
            old = f.read()
        if KEEP_MARKER in old:
            kept = old[old.index(KEEP_MARKER):]
    with atomic_file(args.out, encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n" + ("\n" + kept if kept else ""))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
