"""The run folder of a training run, and how a new run replaces an old one without losing it.

A run folder holds ``config.yaml``, ``metrics.jsonl``, ``last.pt`` and ``best.pt``. A new run
(``out`` absent or empty, or ``--force`` over an old run) is written in a staging folder
``.<name>.new-<token>`` beside ``out`` (a fresh name, holding the marker file
``.kacli-staging`` with its token); ``out`` itself is touched only when the new run has saved its
first ``last.pt`` (:meth:`RunDir.commit`): then the old folder moves aside to
``.<name>.old-<token>``, the new one is renamed to ``out``, whatever the old folder held that is
not a run file is carried over, the old run is deleted and the marker removed. A run that fails
or is killed before its first checkpoint therefore leaves ``out`` as it was; its staging folder is
removed (at once on failure, by the next start after a kill). ``--resume`` writes in place: it
only adds to a run.

A swap that was interrupted between its renames is finished by the next start: a marked staging
folder with ``out`` missing and its ``.<name>.old-<token>`` present puts the old run back; a
marker inside ``out`` means the new run was already in place, so the old one's remaining files
are carried over and it is removed. kacli deletes only folders carrying its marker: a user's
``.<name>.new`` or ``.<name>.old`` is never touched. A symbolic link as ``out`` is refused.

While a run writes, the folder is locked (:class:`RunLock`: ``.<name>.lock`` beside it, holding
the pid, with an ``flock`` the system releases when the process ends, however it ends); a second
run into the same folder is refused with one line, and the lock of a killed run is seen as stale
and taken over.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Iterator

from kacli.errors import KacliError
from kacli.fsutil import check_output_folder_name, write_error

#: The file inside a staging folder that proves kacli made it (JSON: ``{"kacli": "run-staging", "token"}``).
MARKER = ".kacli-staging"
LOCK_HEADER = "kacli run lock"

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


class RunLock:
    """``.<name>.lock`` beside a run folder: created (or taken over from a killed run) and
    ``flock``-ed while a run writes the folder, removed when it ends. The kernel drops an ``flock``
    when its process dies, so a lock file left by ``kill -9`` is stale and the next run takes it."""

    def __init__(self, out: Path):
        self.out = out
        self.path = out.with_name(f".{out.name}.lock")
        self.fd: int | None = None

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)  # a new run's folder may not have a parent yet
        except OSError as e:
            raise write_error(e, self.path.parent) or KacliError(f"cannot create the folder: {e.strerror}",
                                                                 self.path.parent) from None
        while self.fd is None:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as e:
                if e.errno == getattr(os, "ELOOP", 40) or os.path.islink(self.path):
                    raise KacliError("lock file is a symbolic link (kacli did not make it); move it away", self.path) from None
                raise write_error(e, self.path) or KacliError(f"cannot create the run lock: {e.strerror}", self.path) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._read(fd).partition("pid ")[2].split()[:1]
                os.close(fd)
                who = f"pid {holder[0]}" if holder else "another process"
                raise KacliError(f"another kacli run ({who}) is writing this run folder; wait for it to end", self.out) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the run that held it removed it meanwhile: lock the file that is there now
                os.close(fd)
                continue
            text = self._read(fd)
            if text and not text.startswith(LOCK_HEADER):
                os.close(fd)
                raise KacliError("a file kacli did not make has the lock's name; move it away", self.path)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{LOCK_HEADER}\npid {os.getpid()}\n".encode(), 0)
            self.fd = fd

    @staticmethod
    def _read(fd: int) -> str:
        try:
            return os.pread(fd, 256, 0).decode("utf-8", "replace")
        except OSError:
            return ""

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.path)
        os.close(self.fd)
        self.fd = None


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
        if not resume:  # a new run replaces out: never the working folder or a folder holding it
            check_output_folder_name(self.out)
        if self.out.is_symlink():
            raise KacliError("run folder is a symbolic link; name the folder it points to", self.out)
        if is_main is None:  # under torchrun only rank 0 touches the folder
            is_main = int(os.environ.get("RANK", "0")) == 0
        self.resume = bool(resume)
        self.force = bool(force)
        self.staging: Path | None = None
        self.committed = self.resume
        self.lock = RunLock(self.out)
        if is_main:
            self.lock.acquire()
        try:
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
        except BaseException:
            self.lock.release()
            raise

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the folder's lock (the run is over, or never started)."""
        self.lock.release()

    @property
    def path(self) -> Path:
        """The folder the run's files go to now: ``out`` once committed (or resuming), else the staging one."""
        if self.committed:
            return self.out
        if self.staging is None:  # another rank's view (only rank 0 writes), or before writing()
            return self.out.with_name(f".{self.out.name}.new")
        return self.staging

    def _old(self, token: str) -> Path:
        return self.out.with_name(f".{self.out.name}.old-{token}")

    @staticmethod
    def _token(folder: Path) -> str | None:
        """The token of kacli's marker in ``folder`` (None: no marker, so not kacli's)."""
        try:
            data = json.loads((folder / MARKER).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if isinstance(data, dict) and data.get("kacli") == "run-staging" and isinstance(data.get("token"), str):
            token = data["token"]
            if token and "/" not in token and token not in (".", ".."):
                return token
        return None

    def _recover(self) -> None:
        """Finish or undo a swap that a kill interrupted, and drop the staging folder of a run
        killed before its first checkpoint (see the module docstring). Only folders carrying
        kacli's marker are touched."""
        for staging in sorted(self.out.parent.glob(f".{self.out.name}.new-*")) if self.out.parent.is_dir() else []:
            token = self._token(staging) if staging.is_dir() and not staging.is_symlink() else None
            if token is None or not staging.name.endswith(f"-{token}"):
                continue
            old = self._old(token)
            if old.is_dir() and not old.is_symlink() and not self.out.exists():
                os.replace(old, self.out)  # killed between the two renames: the old run goes back
            shutil.rmtree(staging, ignore_errors=True)
        token = self._token(self.out) if self.out.is_dir() else None
        if token is not None:  # killed after the swap, before the old run was cleared
            old = self._old(token)
            if old.is_dir() and not old.is_symlink():
                self._carry_over(old, self.out)
                shutil.rmtree(old, ignore_errors=True)
            (self.out / MARKER).unlink(missing_ok=True)

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

        A new run starts in a fresh staging folder; a resumed run loses only the temporary files of
        an interrupted save. If the block fails before :meth:`commit`, the staging folder is
        removed and ``out`` is as it was. The lock is released when the block ends."""
        try:
            if is_main:
                if self.committed:
                    remove_partial_files(self.out)
                else:
                    self._make_staging()
            try:
                yield self.path
            except BaseException:
                if is_main and not self.committed and self.staging is not None:
                    shutil.rmtree(self.staging, ignore_errors=True)
                raise
        finally:
            self.close()

    def _make_staging(self) -> None:
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.new-", dir=self.out.parent))
        except OSError as e:
            raise write_error(e, self.out) or e from None
        token = staging.name[len(f".{self.out.name}.new-"):]
        (staging / MARKER).write_text(json.dumps({"kacli": "run-staging", "token": token}) + "\n", encoding="utf-8")
        os.chmod(staging, 0o777 & ~_umask())
        self.staging = staging

    def commit(self) -> None:
        """Called after each saved ``last.pt``: the first call puts the new run in place of ``out``
        (the old run moves aside to a name carrying the staging folder's token, its other files
        are carried over, then it is deleted)."""
        if self.committed:
            return
        token = self._token(self.staging)
        if self.out.exists():
            old = self._old(token)
            if old.exists() or old.is_symlink():
                raise KacliError("a folder kacli did not make is in the way; move it away", old)
            os.replace(self.out, old)
            kill_point("swap")
            os.replace(self.staging, self.out)
            self._carry_over(old, self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.staging, self.out)
        (self.out / MARKER).unlink(missing_ok=True)
        self.committed = True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
