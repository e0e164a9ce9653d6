"""``kacli cache-teachers`` and ``kacli cache-info``: write and inspect the teacher cache."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from kacli.commands._common import cli_errors, console

# kacli's library is imported inside the command functions, not here: it loads torch (seconds), which
# `kacli --help`, completion and a mistyped option should not wait for.


def register(app: typer.Typer) -> None:
    app.command(
        "cache-teachers",
        epilog=(
            "Example: kacli cache-teachers --tasks tasks/tasks.yaml --teacher runs/t1 --teacher runs/t2 "
            "--views 4 --out cache.h5"
        ),
    )(cache_teachers)
    app.command("cache-info", epilog="Example: kacli cache-info cache.h5 --verify --teacher runs/t1 --teacher runs/t2")(
        cache_info
    )


def _log(msg: str) -> None:
    console.print(msg, highlight=False, markup=False, soft_wrap=True)


def _folder_teaches(teacher: dict, layers: list[str]) -> str:
    """`` (RT-DETR, transformers folder: SA (enc6) + TA)`` for a folder teacher, "" for a kacli one."""
    if teacher.get("kind", "kacli") == "kacli":
        return ""
    own = [n for n in layers if n in teacher["layers"]] if teacher.get("layers") is not None else layers
    how = ("TA only, no sequences" if not teacher.get("sequences")
           else "SA + TA" if own == list(layers) else f"SA ({', '.join(own)}) + TA")
    return f" ({teacher.get('family')}, {teacher['kind']} folder: {how})"


def _rule_text(rule: dict | None) -> str:
    """A transformers folder's image rule in a few words: its resize rule and whether it normalises."""
    if not rule:
        return "image rule unknown"
    size = rule.get("size") or {}
    if "height" in size:
        resize = f"{size['height']}x{size['width']}"
    elif "shortest_edge" in size:
        resize = f"short side {size['shortest_edge']}" + (f", long ≤ {size['longest_edge']}" if "longest_edge" in size else "")
    elif "max_height" in size:
        resize = f"within {size['max_height']}x{size['max_width']}"
    else:
        resize = "no resize"
    return resize + (", normalised" if rule.get("mean") else "")


@cli_errors
def cache_teachers(
    tasks: Path = typer.Option(..., "--tasks", metavar="TASKS_YAML", show_default=False, help="tasks.yaml written by split-tasks."),
    teacher: List[Path] = typer.Option(
        ..., "--teacher", metavar="CKPT_OR_RUN_DIR", show_default=False,
        help="Teacher checkpoint or run folder (its best.pt); one per task, in tasks.yaml's order.",
    ),
    out: Path = typer.Option(..., "--out", metavar="CACHE_H5", show_default=False, help="Output cache file."),
    split: str = typer.Option("train", "--split", help="Split of tasks.yaml to cache."),
    views: int = typer.Option(1, "--views", metavar="K", help="Views per image: the evaluation view plus K-1 training augmentations."),
    layers: str = typer.Option("all", "--layers", help="Sequences to store: 'all', or e.g. 'proj,1,3' (encoder layers by number)."),
    dtype: str = typer.Option(
        "float16", "--dtype",
        help="Storage of the sequences: float16, float32, or int8 (a float16 scale per token and layer; about half float16's bytes).",
    ),
    batch_size: int = typer.Option(8, "--batch-size", metavar="B", help="Entries per teacher batch."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
    workers: int = typer.Option(2, "--workers", metavar="W", help="Image-decoding worker processes."),
    seed: int = typer.Option(0, "--seed", help="Seed of the training views."),
    config: Optional[str] = typer.Option(
        None, "--config", show_default=False,
        help="Run config (YAML or preset: tiny, detr-r50) whose 'aug' section draws the views; default: the first teacher's.",
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing cache made otherwise (or recompute an up-to-date one)."),
    estimate: bool = typer.Option(
        False, "--estimate", help="Print the bytes the cache would take (per --dtype) and the free disk; write nothing.",
    ),
    ta_only: Optional[List[str]] = typer.Option(
        None, "--ta-only", metavar="TASK",
        help="A task whose transformers-folder teacher teaches through TA only, even when its sequences fit (repeat).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
):  # fmt: skip
    """Run the teachers once over every view of a split; store their sequences and predictions (HDF5).

    Written as OUT.partial and renamed when complete: rerun the same command to resume an interrupted run.

    Under torchrun each rank caches a share of the entries and rank 0 joins the shards."""
    from kacli.cache.writer import cache_teachers as run
    from kacli.runtime import cleanup

    try:
        summary = run(
            tasks, teacher, out, split=split, views=views, layers=layers, dtype=dtype, batch_size=batch_size,
            device=device, workers=workers, seed=seed, config=config, force=force, estimate_only=estimate,
            log=(lambda m: None) if as_json else _log, progress=not as_json, ta_only=ta_only or (),
        )
    finally:
        cleanup()
    if summary["status"] == "estimate":
        _print_estimate(summary, as_json)
        return
    if summary["bytes"] is None:  # a rank other than 0
        return
    if as_json:
        console.print_json(json.dumps(summary))
        return
    from kacli.cache.schema import human_bytes

    table = Table(title=f"cache-teachers: {summary['status']}")
    table.add_column("", style="bold")
    table.add_column("")
    table.add_row("file", summary["out"])
    table.add_row("entries", f"{summary['entries']} ({summary['images']} images × {summary['views']} views)")
    table.add_row("teachers", ", ".join(t["task"] + _folder_teaches(t, summary["layers"]) for t in summary["teachers"]))
    table.add_row("layers", ", ".join(summary["layers"]) + f" ({summary['dtype']})")
    table.add_row("tokens", str(summary["tokens"]))
    table.add_row("size", f"{human_bytes(summary['bytes'])} (estimated {human_bytes(summary['estimated_bytes'])})")
    table.add_row("per entry", human_bytes(summary["bytes"] / max(summary["entries"], 1)))
    if summary["status"] == "written":
        rate = summary["entries_per_s"]
        table.add_row("time", f"{summary['seconds']:.1f} s" + (f" ({rate:.1f} entries/s)" if rate else ""))
        if summary["resumed_from"] is not None:
            table.add_row("resumed at entry", str(summary["resumed_from"]))
    console.print(table)


def _print_estimate(summary: dict, as_json: bool) -> None:
    if as_json:
        console.print_json(json.dumps(summary))
        return
    from kacli.cache.schema import human_bytes

    E = max(summary["entries"], 1)
    table = Table(title="cache-teachers --estimate")
    for col in ("dtype", "bytes", "per entry", ""):
        table.add_column(col, justify="left" if col in ("dtype", "") else "right")
    for dt, n in summary["estimates"].items():
        mark = "--dtype" if dt == summary["dtype"] else ""
        if n > summary["free_bytes"]:
            mark = (mark + ", " if mark else "") + "more than the free disk"
        table.add_row(dt, f"{human_bytes(n)} ({n} B)", human_bytes(n / E), mark)
    console.print(table)
    console.print(
        f"nothing written; {summary['out']} would hold {summary['entries']} entries ({summary['images']} images × {summary['views']} views), {summary['tokens']} tokens, "
        f"{len(summary['teachers'])} teachers × {len(summary['layers'])} layers ({', '.join(summary['layers'])}); "
        f"free disk: {human_bytes(summary['free_bytes'])} ({summary['free_bytes']} B)",
        soft_wrap=True, highlight=False, markup=False,
    )


@cli_errors
def cache_info(
    cache: Path = typer.Argument(..., metavar="CACHE_H5", show_default=False, help="Cache written by cache-teachers."),
    verify: bool = typer.Option(False, "--verify", help="Check offsets, counts and that every stored value is finite."),
    teacher: Optional[List[Path]] = typer.Option(
        None, "--teacher", metavar="CKPT_OR_RUN_DIR", show_default=False,
        help="With --verify: check that these (in order) are the teachers the cache was made from.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the summary (and verification) as JSON."),
):  # fmt: skip
    """Summarise a teacher cache: entries, teachers, layers, bytes per entry; --verify checks it fully.

    A failed verification prints one line and exits with code 2."""
    from kacli.cache.info import cache_summary, require_verified, verify_cache
    from kacli.cache.schema import human_bytes

    s = cache_summary(cache)
    result = None
    if verify or teacher:
        result = verify_cache(cache, teacher or (), progress=not as_json)
    if as_json:
        console.print_json(json.dumps(s | ({"verify": result} if result else {})))
    else:
        table = Table(title=f"teacher cache {cache}")
        table.add_column("", style="bold")
        table.add_column("")
        status = "complete" if s["complete"] else f"INCOMPLETE: {s['done_entries']} of {s['entries']} entries written"
        table.add_row("status", status)
        table.add_row("split", f"{s['split']} of {s['tasks_path']}")
        if s["sources"] is not None:
            table.add_row("sources", "\n".join(
                f"{x['name']}: {x['format']} {x['path']}, complete for "
                + ("every category" if x["complete_all"] else ", ".join(x["complete"])) for x in s["sources"]))
        table.add_row("entries", f"{s['entries']} ({s['images']} images × {s['views']} views, seed {s['seed']})")
        table.add_row("model", f"d_model {s['d_model']}, {s['enc_layers']} encoder layers, stride {s['stride']}")
        table.add_row("layers", ", ".join(s["layers"]) + f" ({s['dtype']})")
        t = s["tokens"]
        table.add_row("tokens / entry", f"{t['min']}–{t['max']} (mean {t['mean']:.1f}), {t['total']} in all")
        table.add_row("size", f"{human_bytes(s['bytes'])}, {human_bytes(s['bytes_per_entry'])} per entry")
        table.add_row("created", f"{s['created']} by kacli {s['kacli_version']}")
        console.print(table)
        tt = Table(title="teachers")
        for col in ("#", "task", "arch", "teaches", "classes", "queries", "sequences", "logits+boxes", "sha256", "checkpoint"):
            tt.add_column(col, justify="right" if col in ("#", "classes", "queries", "sequences", "logits+boxes") else "left")
        for k, te in enumerate(s["teachers"], 1):
            tt.add_row(
                str(k), te["task"], te["arch"] + (f" (transformers {te['transformers_version']}, {_rule_text(te['image_rule'])})"
                                                  if te["kind"] != "kacli" else ""), te["teaches"],
                str(te["num_classes"]), str(te["num_queries"]),
                human_bytes(te["sequence_bytes"]) if te["teaches"] != "TA only" else "–",
                human_bytes(te["head_bytes"]), te["sha256"][:12], te["checkpoint"],
            )
        console.print(tt)
        if result is not None and result["ok"]:
            what = "offsets, counts, token grids"
            console.print(
                f"verified: {what}, {result['values_checked']} values finite"
                + (", teachers' sha256 match" if teacher else ""),
                soft_wrap=True, highlight=False,
            )
    if result is not None:
        require_verified(cache, result)
