"""File-system helpers: hashing, safe paths, and writes that never leave half a result.

Every stage writes through :func:`atomic_dir` or :func:`atomic_file`: the output is built under a
temporary name beside the target and renamed into place when complete, so an interrupted or
failed run leaves what was there before untouched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import yaml

from kacli.errors import KacliError


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
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise KacliError(f"malformed YAML: {problem}{where}", p) from None
    except UnicodeDecodeError:
        raise KacliError("not a UTF-8 text file", p) from None


def check_output_dir(out: str | Path, force: bool) -> Path:
    """Refuse an output folder that exists and is not empty unless ``force``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise KacliError("output exists and is not a folder", out)
    if out.exists() and any(out.iterdir()) and not force:
        raise KacliError("output folder exists and is not empty (use --force to replace it)", out)
    return out


@contextlib.contextmanager
def atomic_dir(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Build a folder under a temporary name and move it to ``out`` when the block succeeds.

    Yields the temporary folder. On error the temporary folder is removed and ``out`` is
    untouched. With ``force`` an existing ``out`` is replaced only after the new one is complete.
    """
    out = check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the result is an ordinary folder
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w", **kw) -> Iterator:
    """Open a temporary file beside ``path``; rename it over ``path`` when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the result is an ordinary file
    try:
        with open(tmp, mode, **kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_path(path: str | Path) -> contextlib.AbstractContextManager[Path]:
    """Yield a temporary path beside ``path`` for writers that open files themselves
    (``torch.save``, h5py, PIL); it is renamed over ``path`` when the block succeeds."""

    @contextlib.contextmanager
    def _cm():
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.tmp-", dir=p.parent, suffix=p.suffix)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())
        try:
            yield Path(tmp)
            os.replace(tmp, p)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    return _cm()


def write_json(path: str | Path, obj, indent: int | None = 2) -> None:
    with atomic_file(path, encoding="utf-8") as f:
        json.dump(obj, f, indent=indent)
        f.write("\n")


def write_yaml(path: str | Path, obj) -> None:
    with atomic_file(path, encoding="utf-8") as f:
        yaml.safe_dump(obj, f, sort_keys=False, allow_unicode=True)
