"""Rich progress bars shared by the long-running stages (rate and ETA always shown)."""

from __future__ import annotations

import contextlib
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


_shared: Progress | None = None


class _Borrowed:
    """A stage's view of the shared display: its tasks appear in the one live display, and
    leaving the stage removes them instead of stopping the display."""

    def __init__(self, progress: Progress):
        self._p = progress
        self._tasks: list = []

    def __getattr__(self, name):
        return getattr(self._p, name)

    def add_task(self, *args, **kwargs):
        kwargs.setdefault("info", "")
        task = self._p.add_task(*args, **kwargs)
        self._tasks.append(task)
        return task

    def start(self):
        pass

    def stop(self):
        for t in self._tasks:
            if t in self._p.task_ids:
                self._p.remove_task(t)
        self._tasks.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
        return False


@contextlib.contextmanager
def shared_progress(unit: str = "it", console: Console | None = None):
    """One live display for a whole multi-stage run (``kacli demo``): while it is open, every
    :func:`make_progress` adds its bars to it instead of opening a display of its own."""
    global _shared
    progress = _new_progress(unit, console, transient=False)
    _shared = progress
    try:
        with progress:
            yield progress
    finally:
        _shared = None


def make_progress(unit: str = "it", console: Console | None = None, transient: bool = False, **extra):
    """A progress display with description, bar, count, rate, elapsed and ETA, plus a free
    text field ``{task.fields[info]}`` for losses. Disabled on ranks other than 0. Inside
    :func:`shared_progress` the bars join the shared display."""
    if _shared is not None:
        return _Borrowed(_shared)
    return _new_progress(unit, console, transient, **extra)


class _Progress(Progress):
    """A display that vanishes when its stage fails, so the error line is all that is left (rich
    ends a display written to a file or pipe with an empty line, which would come before it; a
    transient display leaves no such line either)."""

    _failed = False

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.live.transient = True
            self._failed = True
        return super().__exit__(exc_type, exc, tb)

    def stop(self) -> None:
        if (self._failed or self.live.transient) and not self.disable:
            self.live.stop()
            return
        super().stop()


def _new_progress(unit: str, console: Console | None, transient: bool, **extra) -> Progress:
    return _Progress(
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
