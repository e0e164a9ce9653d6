"""The cache's HDF5 file: create it preallocated, resume it, write batches, join rank shards.

The file is written as ``<out>.partial`` with a ``done_entries`` attribute advanced after every
flushed batch (:class:`_BackgroundWriter`, a thread, so writing overlaps the next batch's
forward); a rerun with the same attributes resumes there (:func:`try_resume`). Under torchrun each
rank writes its share of the batches to ``<out>.rank<r>.partial`` (:func:`write_range`) and rank 0
copies the shards into one file (:func:`join_shards`). Schema: docs/CACHE.md,
:mod:`kacli.cache.schema`.
"""

from __future__ import annotations

import datetime
import json
import os
import queue
import re
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from kacli.cache import schema
from kacli.cache.extract import NonFiniteOutputs, teacher_batches
from kacli.cache.plan import CacheJob
from kacli.errors import KacliError
from kacli.teachers.load import sequence_teachers
from kacli.fsutil import WRITE_PROBLEMS
from kacli.progress import make_progress

#: Test hook: the writer SIGKILLs its own process after writing this many batches.
KILL_ENV = "KACLI_TEST_KILL_AFTER_BATCHES"

#: Attributes that may differ between two runs that produce the same cache.
VOLATILE_ATTRS = ("created", "done_entries")


def _attr_value(key: str, value):
    return json.dumps(value) if key in schema.JSON_ATTRS else value


def normal_attrs(attrs: dict) -> dict:
    """Attributes as they read back (JSON round trip), for comparisons."""
    return {k: json.loads(json.dumps(v)) for k, v in attrs.items()}


def create_file(job: CacheJob, path: Path, attrs: dict, start: int, end: int) -> None:
    """Create the cache file for ``job``'s entries [start, end) with every dataset preallocated
    (chunked, unfiltered); the attributes, entry tables and offsets are written now, the teachers'
    data later."""
    plan, teachers, layers, dtype, chunk = job.plan, job.teachers, job.layers, job.dtype, job.chunk
    E = end - start
    offsets = plan.offsets(start, end)
    T = int(offsets[-1])
    d = sequence_teachers(teachers)[0].d_model
    with schema.open_h5(path, "w") as f:
        for k, v in attrs.items():
            f.attrs[k] = _attr_value(k, v)
        f.attrs["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        f.attrs["done_entries"] = 0
        f.create_dataset("offsets", data=offsets)
        g = f.create_group("entries")
        g.create_dataset("image_index", data=plan.image_index[start:end])
        g.create_dataset("image_id", data=plan.image_id[start:end])
        g.create_dataset("view_index", data=plan.view_index[start:end])
        g.create_dataset("view", data=plan.view[start:end])
        g.create_dataset("hw", data=plan.hw[start:end])
        for k, t in enumerate(teachers):
            tg = f.create_group(f"teachers/{k}")
            tg.attrs["task"] = t.task
            tg.attrs["checkpoint"] = str(t.path)
            tg.attrs["sha256"] = t.sha256
            own = t.gives(layers)  # a TA-only teacher: none; an RT-DETR hybrid encoder: the last layer
            for layer in own:
                tg.create_dataset(
                    f"seq/{layer}", shape=(T, d), dtype=schema.DTYPES[dtype], chunks=(max(1, min(chunk, T)), d)
                )
            if dtype in schema.SCALED and own:
                tg.create_dataset("scale", shape=(T, len(own)), dtype=schema.SCALE_DTYPE,
                                  chunks=(max(1, min(chunk, T)), len(own)))
            q, c = t.num_queries, t.num_classes
            per = max(1, min(E, (64 << 10) // (q * (c + 1) * 4)))
            tg.create_dataset("logits", shape=(E, q, c + 1), dtype=np.float32, chunks=(per, q, c + 1))
            tg.create_dataset("boxes", shape=(E, q, 4), dtype=np.float32, chunks=(per, q, 4))


def try_resume(path: Path, attrs: dict, log: Callable[[str], None]) -> int | None:
    """``done_entries`` of a partial file written with the same attributes, else None (and the
    partial file is removed, saying why)."""
    if not path.exists():
        return None
    why = None
    try:
        with schema.open_h5(path, "r") as f:
            layout = schema.validate(f, path, require_complete=False)
            diff = same_attrs(layout.attrs, attrs)
            if diff:
                why = f"it was made with other settings ({diff})"
            else:
                done = int(layout.attrs["done_entries"])
                if not 0 <= done <= layout.entries:
                    why = f"its done_entries ({done}) is out of range"
                else:
                    return done
    except schema.CacheLockedError:
        raise
    except KacliError as e:
        why = f"it is unreadable ({e.message}; killed during a write?)"
    log(f"starting {path.name} over: {why}")
    path.unlink()
    return None


class _BackgroundWriter:
    """Writes batches to the open HDF5 file in a thread, so writing overlaps the next forward.

    After each batch: flush, advance ``done_entries``, flush again.
    """

    def __init__(self, f, start: int, offsets: np.ndarray, layers: Sequence[str], num_teachers: int,
                 given: Sequence[Sequence[str]] | None = None):
        self.f = f
        self.start = start
        self.offsets = offsets
        self.layers = list(layers)
        given = list(given) if given is not None else [self.layers] * num_teachers  # the layers each teacher gives
        self.seq = [[f[schema.seq_path(k, layer)] for layer in given[k]] for k in range(num_teachers)]
        self.logits = [f[f"teachers/{k}/logits"] for k in range(num_teachers)]
        self.boxes = [f[f"teachers/{k}/boxes"] for k in range(num_teachers)]
        self.scale = [f.get(schema.scale_path(k)) for k in range(num_teachers)]  # int8 only
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.kill_after = int(os.environ.get(KILL_ENV, "0") or 0)
        self.batches = 0
        self.thread = threading.Thread(target=self._run, name="cache-writer", daemon=True)
        self.thread.start()

    def put(self, e0: int, e1: int, payload: list[dict]) -> None:
        self.check()
        while True:
            try:
                self.queue.put((e0, e1, payload), timeout=0.5)
                return
            except queue.Full:
                self.check()

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self.check()

    def _run(self) -> None:
        try:
            while True:
                item = self.queue.get()
                if item is None:
                    return
                self._write(*item)
        except BaseException as e:  # handed to the main thread
            self.error = e
            while True:  # keep draining so the producer never blocks forever
                try:
                    if self.queue.get(timeout=0.5) is None:
                        return
                except queue.Empty:
                    continue

    def _write(self, e0: int, e1: int, payload: list[dict]) -> None:
        a, b = e0 - self.start, e1 - self.start
        r0, r1 = int(self.offsets[a]), int(self.offsets[b])
        for k, out in enumerate(payload):
            for ds, arr in zip(self.seq[k], out["seqs"]):
                ds[r0:r1] = arr
            if out["scale"] is not None:
                self.scale[k][r0:r1] = out["scale"]
            self.logits[k][a:b] = out["logits"]
            self.boxes[k][a:b] = out["boxes"]
        self.f.flush()
        self.f.attrs["done_entries"] = b
        self.f.flush()
        self.batches += 1
        if self.kill_after and self.batches >= self.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)


def _write_failed(e: OSError, path: Path) -> Exception:
    """A full disk (or another write error) while the cache is written: one line saying how to go on."""
    code = e.errno
    if code is None:  # h5py's errors carry the system's errno in their text: "... errno = 28, ..."
        m = re.search(r"errno = (\d+)", str(e))
        code = int(m.group(1)) if m else None
    if code not in WRITE_PROBLEMS:
        return e
    return KacliError(f"cannot write: {WRITE_PROBLEMS[code]}; the entries done so far stay in it: make room and run "
                      "the same command again to resume, or delete it to start over", path)


def write_range(job: CacheJob, path: Path, attrs: dict, start: int, end: int, description: str) -> dict:
    """Cache ``job``'s entries [start, end) into ``path`` (created, or resumed when it holds the
    same attributes ``attrs``), running the teachers in batches of ``job.batch_size`` while a
    background thread writes the previous batch. ``start`` is a multiple of the batch size;
    ``description`` labels the progress bar. Returns ``{"resumed_from", "seconds"}``."""
    done = try_resume(path, attrs, job.log)
    if done is None:
        try:
            create_file(job, path, attrs, start, end)
        except OSError as e:
            raise _write_failed(e, path) from None
        done = 0
    elif done:
        job.log(f"resuming {path.name} at entry {start + done} ({done} of {end - start} done)")
    first = start + done
    batches = [list(range(b, min(b + job.batch_size, end))) for b in range(first, end, job.batch_size)]
    t0 = time.perf_counter()
    if batches:
        stream = teacher_batches(job, batches)  # workers start before the file is open and the writer thread runs
        offsets = job.plan.offsets(start, end)
        try:
            with schema.open_h5(path, "r+") as f, make_progress("entry", disable=not job.progress) as bar:
                task = bar.add_task(description, total=end - start, completed=done, info="")
                writer = _BackgroundWriter(f, start, offsets, job.layers, len(job.teachers),
                                           [t.gives(job.layers) for t in job.teachers])
                try:
                    for idx, payload in stream:
                        writer.put(idx[0], idx[-1] + 1, payload)
                        bar.update(task, advance=len(idx))
                finally:
                    writer.close()
        except NonFiniteOutputs:
            path.unlink(missing_ok=True)  # kacli's own partial file: a cache of these teachers is worthless
            raise
        except OSError as e:
            raise _write_failed(e, path) from None
        del stream
    return {"resumed_from": start + done if done else None, "seconds": time.perf_counter() - t0}


def same_attrs(have: dict, want: dict) -> str | None:
    """The first attribute (volatile ones aside) that differs, or None."""
    have = {k: v for k, v in have.items() if k not in VOLATILE_ATTRS}
    want = normal_attrs({k: v for k, v in want.items() if k not in VOLATILE_ATTRS})
    diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
    return diff[0] if diff else None


def wait_for_shards(shards: Sequence[dict], log: Callable[[str], None], poll: float = 1.0) -> None:
    """Block until every shard file is complete and made with this run's settings.

    Files are polled rather than waited for with a collective, so a rank that finishes long before
    the others (e.g. one resumed with nothing left to do) never hits a process-group timeout."""
    said = False
    for sh in shards:
        path, want = sh["path"], sh["attrs"]
        while True:
            try:
                with schema.open_h5(path, "r") as f:
                    have = schema.read_attrs(f)
                if int(have.get("done_entries", -1)) == int(want["entries"]) and same_attrs(have, want) is None:
                    break
            except KacliError:
                pass  # not created yet, or open for writing (HDF5 locks it)
            if not said:
                log("waiting for the other ranks' shards")
                said = True
            time.sleep(poll)


def _copy_rows(src, dst, r0: int, rows_per_block: int) -> None:
    """``dst[r0 : r0 + len(src)] = src``, a block of rows at a time."""
    n = src.shape[0]
    for a in range(0, n, rows_per_block):
        b = min(n, a + rows_per_block)
        dst[r0 + a : r0 + b] = src[a:b]


def join_shards(job: CacheJob, out_partial: Path, shards: Sequence[dict], attrs: dict,
                block_bytes: int = 64 << 20) -> None:
    """Copy complete rank shards (see :func:`~kacli.cache.plan.shard_plan`) into one file holding
    all of ``job``'s entries."""
    plan, teachers, layers, dtype = job.plan, job.teachers, job.layers, job.dtype
    create_file(job, out_partial, attrs, 0, plan.entries)
    offsets = plan.offsets()
    d = sequence_teachers(teachers)[0].d_model
    itemsize = np.dtype(schema.DTYPES[dtype]).itemsize
    rows_per_block = max(1, block_bytes // (d * itemsize))
    with schema.open_h5(out_partial, "r+") as dst:
        for sh in shards:
            spath, start, end = sh["path"], sh["attrs"]["shard"]["start"], sh["attrs"]["shard"]["end"]
            with schema.open_h5(spath, "r") as src:
                schema.validate(src, spath, require_complete=True)
                r0 = int(offsets[start])
                for k, t in enumerate(teachers):
                    for layer in t.gives(layers):
                        name = schema.seq_path(k, layer)
                        _copy_rows(src[name], dst[name], r0, rows_per_block)
                    if dtype in schema.SCALED and t.gives(layers):
                        _copy_rows(src[schema.scale_path(k)], dst[schema.scale_path(k)], r0, rows_per_block)
                    for name in (f"teachers/{k}/logits", f"teachers/{k}/boxes"):
                        dst[name][start:end] = src[name][...]
        dst.flush()
        dst.attrs["done_entries"] = plan.entries
        dst.flush()


__all__ = [
    "KILL_ENV",
    "VOLATILE_ATTRS",
    "create_file",
    "join_shards",
    "normal_attrs",
    "same_attrs",
    "try_resume",
    "wait_for_shards",
    "write_range",
]
