"""File-system helpers: hashing, safe paths, and writes that never leave half a result.

Every stage writes through :func:`atomic_dir` or :func:`atomic_file`: the output is built under a
temporary name beside the target and renamed into place when complete, so an interrupted or
failed run leaves what was there before untouched.

What a user names as an output is checked first (:func:`check_output_file`,
:func:`check_output_dir`): an existing output is replaced only with ``--force``; a symbolic link,
a device, a FIFO or a socket is never replaced; ``--out .`` (or ``''``, ``sub/..``) naming the
working folder is refused. A write that fails (full disk, read-only file system, a folder where a
file should be: :data:`WRITE_PROBLEMS`) becomes one :class:`KacliError` naming the output; the
temporary names are kacli's own (unique ``.<name>.tmp-*`` and ``.<name>.old-*`` names it has just
created), and only they are removed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Iterator

import yaml

from kacli.errors import KacliError


#: OS errors a write can meet that are the user's to fix, and how they are said in one line.
WRITE_PROBLEMS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large (a file-size limit of the system or the process)",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EISDIR: "is a folder, expected a file",
    errno.ENOTDIR: "a part of the path is not a folder",
    errno.EBUSY: "busy (a mount point or in use)",
    errno.ENAMETOOLONG: "name too long",
    errno.EXDEV: "on another file system than its folder",
}


def write_error(e: OSError, path: str | Path | None = None) -> KacliError | None:
    """The one-line error for ``e`` met while writing ``path`` (None: not a :data:`WRITE_PROBLEMS` one)."""
    problem = WRITE_PROBLEMS.get(getattr(e, "errno", None))
    if problem is None:
        return None
    where = path if path is not None else e.filename
    return KacliError(f"cannot write: {problem}; nothing was written under this name", where)


@contextlib.contextmanager
def _write_errors(path: str | Path, tmp: Path | None = None) -> Iterator[None]:
    """Turn a :data:`WRITE_PROBLEMS` OS error met writing ``path`` (or its temporary ``tmp``) in
    the block into one line naming ``path``; an error about another file (an input read in the
    block) passes unchanged."""
    try:
        yield
    except OSError as e:
        if e.filename is not None and not _is_ours(Path(os.fsdecode(e.filename)), Path(path), tmp):
            raise
        err = write_error(e, path)
        if err is None:
            raise
        raise err from None


def _is_ours(name: Path, path: Path, tmp: Path | None) -> bool:
    """Whether an OS error's file is the output ``path``, its folder (or one above), or a
    temporary of it (``tmp`` and what lies in it, or a ``.<name>.*`` beside it)."""
    a, p = Path(os.path.abspath(name)), Path(os.path.abspath(path))
    if a == p or a in p.parents:
        return True
    if tmp is not None:
        t = Path(os.path.abspath(tmp))
        if a == t or t in a.parents:
            return True
    return a.parent == p.parent and a.name.startswith(f".{p.name}.")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while True:
                b = f.read(chunk)
                if not b:
                    break
                h.update(b)
    except FileNotFoundError:
        raise KacliError("file not found", path) from None
    except IsADirectoryError:
        raise KacliError("is a folder, expected a file", path) from None
    return h.hexdigest()


def combined_sha256(files: list[Path], root: Path) -> str:
    """One sha256 over several files: each file's path relative to ``root`` and its own sha256."""
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f"{f.relative_to(root).as_posix()}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def require_file(path: str | Path, what: str = "file") -> Path:
    """Return ``path`` as a Path, or raise a one-line error if it is not an existing file."""
    p = Path(path)
    if not p.exists():
        raise KacliError(f"{what} not found", p)
    if not p.is_file():
        raise KacliError(f"{what} is not a file", p)
    return p


def require_dir(path: str | Path, what: str = "folder") -> Path:
    p = Path(path)
    if not p.exists():
        raise KacliError(f"{what} not found", p)
    if not p.is_dir():
        raise KacliError(f"{what} is not a folder", p)
    return p


def safe_join(root: str | Path, rel: str | Path, *, source: str | Path | None = None) -> Path:
    """Join ``rel`` under ``root`` and refuse a result that escapes ``root``.

    Absolute ``rel`` paths and ``..`` components that leave the root are errors (named
    against ``source``, the file that contained the path, when given).
    """
    root_r = Path(root).resolve()
    p = (root_r / rel).resolve()
    if p != root_r and root_r not in p.parents:
        raise KacliError(f"image path {str(rel)!r} escapes the image root {root_r}", source or rel)
    return p


def load_json(path: str | Path):
    p = require_file(path)
    try:
        with open(p, encoding="utf-8") as f:
            return json.load(f)
    except RecursionError:
        raise KacliError("malformed JSON: nested too deeply", p) from None
    except json.JSONDecodeError as e:
        raise KacliError(f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}", p) from None
    except UnicodeDecodeError:
        raise KacliError("not a UTF-8 text file", p) from None


def load_yaml(path: str | Path):
    """Parse a YAML file with ``yaml.safe_load``; malformed YAML is a one-line error."""
    p = require_file(path)
    try:
        with open(p, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except RecursionError:
        raise KacliError("malformed YAML: nested too deeply", p) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise KacliError(f"malformed YAML: {problem}{where}", p) from None
    except UnicodeDecodeError:
        raise KacliError("not a UTF-8 text file", p) from None


def _not_regular(mode: int) -> str | None:
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return None


def _check_not_special(p: Path, what: str) -> os.stat_result | None:
    """Refuse a symbolic link, a device, a FIFO or a socket at ``p`` (even with ``--force``); the
    ``lstat`` of what is there, or None."""
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise write_error(e, p) or KacliError(f"cannot read: {e.strerror}", p) from None
    if stat.S_ISLNK(st.st_mode):
        raise KacliError(f"output is a symbolic link; name the {what} it points to", p)
    kind = _not_regular(st.st_mode)
    if kind:
        raise KacliError(f"output is {kind}, not a regular {what}; refused even with --force", p)
    return st


def check_output_folder_name(out: Path) -> Path:
    """``out`` made absolute when it ends in ``''``, ``.`` or ``..``; refused when it is the working
    folder or holds it (replacing it would pull the folder from under the shell)."""
    if out.name in ("", ".", ".."):
        out = Path(os.path.abspath(out))
    here = Path.cwd()
    a = Path(os.path.abspath(out))
    if a == here or a in here.parents:
        raise KacliError("output folder is the working folder or holds it; name a new folder (e.g. --out out)", out)
    return out


def check_output_file(path: str | Path, force: bool) -> Path:
    """Refuse an output file that exists unless ``force``, and whatever is not a regular file even
    with ``force`` (a symbolic link, device, FIFO, socket, folder); a name that is not a file name
    (``''``, ``.``, ``..``) too. Nothing is touched."""
    p = Path(path)
    if str(path) in ("", ".", "..") or p.name in ("", ".", ".."):
        raise KacliError(f"expected a file name, got {str(path)!r}", path)
    st = _check_not_special(p, "file")
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise KacliError("output is a folder, expected a file name", p)
        if not force:
            raise KacliError("file exists (use --force to replace it)", p)
    parent = p.parent
    if parent.exists() and not parent.is_dir():
        raise KacliError(f"{str(parent)!r} is not a folder", p)
    return p


def check_output_dir(out: str | Path, force: bool) -> Path:
    """Refuse an output folder that exists and is not empty unless ``force``; a symbolic link, a
    file, a device and the working folder (``--out .``) always. Returns the folder to write."""
    out = check_output_folder_name(Path(out))
    st = _check_not_special(out, "folder")
    if st is not None and not stat.S_ISDIR(st.st_mode):
        raise KacliError("output exists and is not a folder", out)
    if st is not None and any(out.iterdir()) and not force:
        raise KacliError("output folder exists and is not empty (use --force to replace it)", out)
    return out


@contextlib.contextmanager
def atomic_dir(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Build a folder under a temporary name and move it to ``out`` when the block succeeds.

    Yields the temporary folder. On error the temporary folder is removed and ``out`` is
    untouched. With ``force`` an existing ``out`` is replaced only after the new one is complete
    (it is first renamed to a fresh ``.<name>.old-*`` folder made for it, then deleted)."""
    out = check_output_dir(out, force)
    with _write_errors(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the result is an ordinary folder
        with _write_errors(out, tmp):
            yield tmp
            if out.exists():
                check_output_dir(out, force)  # something may have appeared there meanwhile
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
                os.replace(out, old)  # over the empty folder just made: the name is ours alone
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _temp_file(path: Path, suffix: str = "") -> Path:
    """A new empty file beside ``path`` with a unique ``.<name>.tmp-*`` name (mode as ``open`` would make it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent, suffix=suffix)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the result is an ordinary file
    except BaseException:
        os.unlink(tmp)
        raise
    return Path(tmp)


def _replace(tmp: Path, path: Path, force: bool | None) -> None:
    if force is not None:
        check_output_file(path, force)  # something may have appeared there meanwhile
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w", *, force: bool | None = None, **kw) -> Iterator:
    """Open a temporary file beside ``path``; rename it over ``path`` when the block succeeds.

    ``force``: None for a file kacli owns (a run's metrics); True/False for an output the user
    named, checked by :func:`check_output_file` first. A failing write is one line naming ``path``."""
    path = Path(path)
    if force is not None:
        check_output_file(path, force)
    with _write_errors(path):
        tmp = _temp_file(path)
    try:
        with _write_errors(path, tmp):
            with open(tmp, mode, **kw) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            _replace(tmp, path, force)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_path(path: str | Path, *, force: bool | None = None) -> contextlib.AbstractContextManager[Path]:
    """Yield a temporary path beside ``path`` for writers that open files themselves
    (``torch.save``, h5py, PIL); it is renamed over ``path`` when the block succeeds.
    ``force`` as in :func:`atomic_file`."""

    @contextlib.contextmanager
    def _cm():
        p = Path(path)
        if force is not None:
            check_output_file(p, force)
        with _write_errors(p):
            tmp = _temp_file(p, suffix=p.suffix)
        try:
            with _write_errors(p, tmp):
                yield tmp
                _replace(tmp, p, force)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    return _cm()


def write_json(path: str | Path, obj, indent: int | None = 2, *, force: bool | None = None) -> None:
    with atomic_file(path, encoding="utf-8", force=force) as f:
        json.dump(obj, f, indent=indent)
        f.write("\n")


def write_yaml(path: str | Path, obj, *, force: bool | None = None) -> None:
    with atomic_file(path, encoding="utf-8", force=force) as f:
        yaml.safe_dump(obj, f, sort_keys=False, allow_unicode=True)
