"""The run folder of a training run, and how a new run replaces an old one without losing it.

A run folder holds ``config.yaml``, ``metrics.jsonl``, ``last.pt`` and ``best.pt``. A new run
(``out`` absent or empty, or ``--force`` over an old run) is written in ``.<name>.new`` beside
``out``; ``out`` itself is touched only when the new run has saved its first ``last.pt``
(:meth:`RunDir.commit`): then the old folder moves aside to ``.<name>.old``, the new one is
renamed to ``out``, whatever the old folder held that is not a run file is carried over, and the
old run is deleted. A run that fails or is killed before its first checkpoint therefore leaves
``out`` as it was; its ``.<name>.new`` is removed (at once on failure, by the next start after a
kill). ``--resume`` writes in place: it only adds to a run.

A swap that was interrupted between its renames is finished by the next start: ``out`` missing
with ``.<name>.old`` present puts the old run back; both present means the new run was already
in place, so the old one's remaining files are carried over and it is removed. A leftover
``.<name>.new`` never holds anything ``out`` lacks, and the next start removes it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from pathlib import Path
from typing import Iterator

from kacli.errors import KacliError

#: Files a training run writes (``eval.json``: the run's evaluation, when asked for).
RUN_FILES = ("metrics.jsonl", "last.pt", "best.pt", "config.yaml", "eval.json")
#: Folders a run (or an evaluation of it) writes.
RUN_DIRS = ("eval",)


def kill_point(name: str) -> None:
    """Crash-test hook: with ``KACLI_KILL_AT=name`` in the environment the process kills itself
    here with SIGKILL, exactly as ``kill -9`` or a power cut would. Without it, nothing happens."""
    if os.environ.get("KACLI_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def remove_partial_files(folder: Path) -> list[str]:
    """Delete the temporary files an interrupted save leaves in ``folder`` (``.last.pt.tmp-*``,
    ``.metrics.jsonl.tmp-*``, ...: :mod:`kacli.fsutil`'s names for the run files). Returns their names."""
    removed = []
    if not folder.is_dir():
        return removed
    for name in RUN_FILES:
        for p in folder.glob(f".{name}.tmp-*"):
            if p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p.name)
    return removed


class RunDir:
    """Where a run writes, decided before anything is written.

    ``RunDir(out, resume, force)`` only checks (no file is touched): ``out`` must not be a file; a
    new run needs ``out`` absent or empty unless ``force``; ``resume`` needs ``out/last.pt``.
    :meth:`writing` then prepares the folder and yields it; :meth:`commit` swaps a new run in.
    """

    def __init__(self, out: str | Path, resume: bool = False, force: bool = False, is_main: bool | None = None):
        self.out = Path(out)
        if self.out.name in ("", ".", ".."):  # "--out ." : name the staging folder after the real one
            self.out = self.out.resolve()
        if is_main is None:  # under torchrun only rank 0 touches the folder
            is_main = int(os.environ.get("RANK", "0")) == 0
        self.resume = bool(resume)
        self.force = bool(force)
        self.staging = self.out.with_name(f".{self.out.name}.new")
        self.old = self.out.with_name(f".{self.out.name}.old")
        self.committed = self.resume
        if is_main:
            self._recover()
        if self.out.exists() and not self.out.is_dir():
            raise KacliError("output exists and is not a folder", self.out)
        if self.resume:
            if not (self.out / "last.pt").is_file():
                raise KacliError("nothing to resume: no last.pt in the run folder (start it without --resume)", self.out)
        elif self.out.is_dir() and any(self.out.iterdir()) and not self.force:
            raise KacliError(
                "run folder exists and is not empty (use --resume to continue it, --force to start over)", self.out
            )

    @property
    def path(self) -> Path:
        """The folder the run's files go to now: ``out`` once committed (or resuming), else the staging one."""
        return self.out if self.committed else self.staging

    def _recover(self) -> None:
        """Finish or undo a swap that a kill interrupted, and drop the staging folder of a run
        killed before its first checkpoint (see the module docstring)."""
        if self.old.is_dir():
            if not self.out.exists():
                os.replace(self.old, self.out)
            else:
                self._carry_over(self.old, self.out)
                shutil.rmtree(self.old, ignore_errors=True)
        if self.staging.is_dir():
            shutil.rmtree(self.staging, ignore_errors=True)

    @staticmethod
    def _carry_over(old: Path, new: Path) -> None:
        """Move what ``old`` holds besides run files into ``new`` (files a user put in the folder)."""
        for p in old.iterdir():
            if p.name in RUN_FILES or p.name in RUN_DIRS or p.name.startswith("."):
                continue
            if not (new / p.name).exists():
                os.replace(p, new / p.name)

    @contextlib.contextmanager
    def writing(self, is_main: bool = True) -> Iterator[Path]:
        """Prepare the folder the run writes to and yield it (only the main process touches files).

        A new run starts in a fresh staging folder (a stale one from a killed attempt is removed);
        a resumed run loses only the temporary files of an interrupted save. If the block fails
        before :meth:`commit`, the staging folder is removed and ``out`` is as it was."""
        if is_main:
            if self.committed:
                remove_partial_files(self.out)
            else:
                shutil.rmtree(self.staging, ignore_errors=True)
                self.staging.mkdir(parents=True)
        try:
            yield self.path
        except BaseException:
            if is_main and not self.committed:
                shutil.rmtree(self.staging, ignore_errors=True)
            raise

    def commit(self) -> None:
        """Called after each saved ``last.pt``: the first call puts the new run in place of ``out``
        (the old run moves aside, its other files are carried over, then it is deleted)."""
        if self.committed:
            return
        if self.out.exists():
            os.replace(self.out, self.old)
            kill_point("swap")
            os.replace(self.staging, self.out)
            self._carry_over(self.old, self.out)
            shutil.rmtree(self.old, ignore_errors=True)
        else:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.staging, self.out)
        self.committed = True
