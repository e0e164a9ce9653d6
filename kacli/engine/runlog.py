"""Training logs: ``metrics.jsonl`` read back, ``metrics.csv`` always, TensorBoard scalars on request.

``metrics.jsonl`` (one JSON object per epoch, appended by the trainer) stays the record. It is the
one file a run appends to instead of replacing: a line is appended whole, after the epoch ends and
before its checkpoint, so a run killed while appending loses at most that last line, which
``--resume`` redoes anyway (it keeps only the lines of the epochs its checkpoint has seen, and
rewrites the file atomically). Every reader goes through :func:`read_jsonl`, which leaves out a
torn last line (one with no newline that does not parse: also the line a running training is
writing right now). This module mirrors the record for people and tools:

- ``metrics.csv``: one row per epoch, one column per number in any line (nested keys joined with
  ``/``: ``per_task/convex/AP``), blank where an epoch lacks it (no validation that epoch). It is
  rebuilt from ``metrics.jsonl`` after every epoch (atomically), so it always agrees with it,
  across ``--resume`` too.
- ``tensorboard/`` (``train.tensorboard: true``, the ``tensorboard`` extra): per epoch,
  ``train/<loss term>`` for every loss term, ``train/lr``, and ``val/<metric>`` (``val/AP``,
  ``val/AP50``, …, ``val/per_task/<task>/AP``), at step = epoch. A resumed run purges what a
  previous process logged past the checkpoint's epoch; a fresh run starts a fresh log.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
from pathlib import Path
from typing import Any, Iterable, Mapping

from kacli.errors import KacliError
from kacli.fsutil import atomic_file

JSONL_NAME = "metrics.jsonl"
CSV_NAME = "metrics.csv"
TB_DIR = "tensorboard"
NOT_SCALARS = ("epoch", "steps", "train_seconds")


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def read_jsonl(path: str | Path) -> list[tuple[int, str, Any]]:
    """``(line number, line, parsed value)`` for each non-blank line of an append-only JSON-lines
    file (``metrics.jsonl``), in order.

    A last line with no newline that does not parse is left out: the line a killed run was
    appending, or one a running training is writing now. Any other line that does not parse is a
    KacliError naming the file and the line, and so is a file that is not UTF-8 text."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise KacliError("not a UTF-8 text file", path) from None
    lines = text.splitlines()
    out = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except RecursionError:
            raise KacliError(f"malformed JSON on line {n}: nested too deeply", path) from None
        except json.JSONDecodeError as e:
            if n == len(lines) and not text.endswith("\n"):
                break  # torn, or being written
            raise KacliError(f"malformed JSON on line {n}: {e.msg} at column {e.colno}", path) from None
        out.append((n, line, value))
    return out


def flatten(record: Mapping[str, Any], prefix: str = "") -> dict[str, float | None]:
    """Numbers (and nulls) of a metrics line, nested keys joined with ``/``, in the line's order."""
    out: dict[str, float | None] = {}
    for k, v in record.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "/"))
        elif v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)):
            out[key] = v
    return out


def write_csv(jsonl: str | Path, csv_path: str | Path) -> Path:
    """``metrics.csv`` from ``metrics.jsonl``: columns in order of first appearance."""
    rows = [flatten(record) for _, _, record in read_jsonl(jsonl)]
    columns: dict[str, None] = {}
    for r in rows:
        columns.update(dict.fromkeys(r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
    with atomic_file(csv_path, encoding="utf-8", newline="") as f:
        f.write(buf.getvalue())
    return Path(csv_path)


def scalar_tags(record: Mapping[str, Any], loss_terms: Iterable[str]) -> dict[str, float]:
    """TensorBoard tag → value for one epoch's metrics line: loss terms and ``lr`` under ``train/``,
    everything else numeric (the validation metrics) under ``val/``."""
    terms = set(loss_terms)
    tags: dict[str, float] = {}
    for key, v in flatten(record).items():
        if v is None or key in NOT_SCALARS:
            continue
        group = "train" if key in terms or key == "lr" else "val"
        tags[f"{group}/{key}"] = float(v)
    return tags


class RunLogs:
    """The CSV and (optionally) TensorBoard logs of one run; only the main process writes.

    Args:
        out: the run folder.
        tensorboard: write TensorBoard scalars (raises KacliError when the package is missing).
        start_epoch: epochs already done (a resumed run), 0 for a fresh one.
    """

    def __init__(self, out: str | Path, tensorboard: bool, start_epoch: int, is_main: bool = True):
        self.out = Path(out)
        self.is_main = is_main
        self.writer = None
        if start_epoch == 0 and is_main and (self.out / CSV_NAME).is_file():
            (self.out / CSV_NAME).unlink()  # a fresh run (--force): rebuilt after its first epoch
        if tensorboard and is_main:
            if not tensorboard_available():
                raise KacliError("train.tensorboard needs the tensorboard package (pip install 'kacli[tensorboard]')")
            from torch.utils.tensorboard import SummaryWriter

            log_dir = self.out / TB_DIR
            if start_epoch == 0 and log_dir.is_dir():  # a fresh run (--force): not the old run's curves
                for old in log_dir.glob("events.out.tfevents.*"):
                    old.unlink()
            self.writer = SummaryWriter(str(log_dir), purge_step=start_epoch + 1 if start_epoch else None)

    def epoch(self, record: Mapping[str, Any], loss_terms: Iterable[str], out: str | Path | None = None) -> None:
        """Call after the epoch's line was appended to ``metrics.jsonl``; ``out``: the run folder
        now, when it has moved since (a new run's staging folder is renamed at its first checkpoint)."""
        if not self.is_main:
            return
        if out is not None:
            self.out = Path(out)
        write_csv(self.out / JSONL_NAME, self.out / CSV_NAME)
        if self.writer is not None:
            step = int(record["epoch"])
            for tag, value in scalar_tags(record, loss_terms).items():
                self.writer.add_scalar(tag, value, global_step=step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
