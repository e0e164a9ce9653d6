"""Rich progress bars shared by the long-running stages (rate and ETA always shown)."""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress_bar import ProgressBar  # noqa: F401  (re-exported for callers that draw their own)
from rich.text import Text
from rich.progress import ProgressColumn


class RateColumn(ProgressColumn):
    """Items per second (or seconds per item when slower than one a second)."""

    def __init__(self, unit: str = "it"):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        if not speed:
            return Text(f"? {self.unit}/s", style="progress.data.speed")
        if speed >= 1:
            return Text(f"{speed:.1f} {self.unit}/s", style="progress.data.speed")
        return Text(f"{1 / speed:.1f} s/{self.unit}", style="progress.data.speed")


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def make_progress(unit: str = "it", console: Console | None = None, transient: bool = False, **extra) -> Progress:
    """A progress display with description, bar, count, rate, elapsed and ETA, plus a free
    text field ``{task.fields[info]}`` for losses. Disabled on ranks other than 0."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console or Console(stderr=True),
        transient=transient,
        disable=not is_main_process() or extra.pop("disable", False),
        refresh_per_second=4 if sys.stderr.isatty() else 0.2,
    )
