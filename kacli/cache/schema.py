"""The teacher cache's HDF5 layout (``kacli-cache/1``), its size formula and its validation.

Layout (E entries, N teachers, L cached layers, T = total valid tokens; docs/CACHE.md has the full
description)::

    /offsets                    (E+1,)        int64    entry e's tokens are rows offsets[e]:offsets[e+1]
    /entries/image_index        (E,)          int64    index of the image in <split>/all.json
    /entries/image_id           (E,)          int64    COCO image id
    /entries/view_index         (E,)          int64    v in 0..K-1 (0 = evaluation view)
    /entries/view               (E, 7)        float64  View.to_list(): flip, top, left, height, width, out_h, out_w
    /entries/hw                 (E, 2)        int64    token grid (h, w) = (ceil(out_h/stride), ceil(out_w/stride))
    /teachers/<k>/seq/<layer>   (T, d)        float16 | float32 | int8   valid tokens, row-major per entry
    /teachers/<k>/scale         (T, L)        float16  int8 only: column j scales layer j's tokens (q · scale)
                                                      (older int8 caches hold float32 scales; read alike)
    /teachers/<k>/logits        (E, Q_k, C_k+1) float32
    /teachers/<k>/boxes         (E, Q_k, 4)   float32  cxcywh in [0, 1]

Entry ``e = i·K + v`` is view ``v`` of image ``i``. Root attributes describe where the file came
from (see :data:`ROOT_ATTRS`); JSON-valued ones are stored as JSON strings.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from kacli import __version__
from kacli.errors import KacliError

FORMAT = "kacli-cache/1"

#: Storage schemes of the sequences (the ``dtype`` attribute) → the dtype of the ``seq`` datasets.
DTYPES = {"float16": np.float16, "float32": np.float32, "int8": np.int8}

#: Schemes that store a scale per token per layer beside the sequences (``/teachers/<k>/scale``).
SCALED = ("int8",)
#: dtype of the stored scales; files written before it was float16 hold float32 ones (both read).
SCALE_DTYPE = np.float16
SCALE_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))

#: The range of what a teacher writes: boxes are sigmoid outputs (cx, cy, w, h in [0, 1]); no logit
#: and no sequence value lies beyond float16's range (a float16 cache could not hold it), so an
#: int8 scale is at most that over 127. Values outside are a damaged file, refused on reading
#: (boxes, logits) and by ``cache-info --verify`` (all three).
FLOAT16_MAX = float(np.finfo(np.float16).max)
MAX_INT8_SCALE = FLOAT16_MAX / 127


def head_out_of_range(what: str, values: np.ndarray) -> int:
    """How many of a teacher's cached ``"boxes"`` (outside [0, 1]) or ``"logits"`` (beyond
    ±:data:`FLOAT16_MAX`) are outside what a teacher writes (NaN is counted elsewhere)."""
    v = np.asarray(values, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        bad = (v < 0) | (v > 1) if what == "boxes" else np.abs(v) > FLOAT16_MAX
    return int(np.count_nonzero(bad & np.isfinite(v)))

#: Root attributes (name → meaning); ``*`` marks JSON strings.
ROOT_ATTRS = {
    "format": "format tag, 'kacli-cache/1'",
    "kacli_version": "version of kacli that wrote the file",
    "created": "UTC time the file was started (ignored when comparing files)",
    "split": "split of tasks.yaml the entries come from",
    "tasks_path": "absolute path of tasks.yaml",
    "tasks_sha256": "sha256 of tasks.yaml",
    "teachers": "* list of {task, checkpoint, sha256, label_map, num_classes, num_queries[, arch, classifier, "
                "class_map]} (arch detr | conditional, classifier softmax | sigmoid: the teacher's own; its logits "
                "are stored over its task's classes + no object either way; absent: detr, softmax)",
    "label_map": "* the union label map {ids, names}: all tasks' categories in task order, shared ones once",
    "d_model": "teachers' width d",
    "enc_layers": "teachers' encoder depth",
    "stride": "teachers' backbone stride",
    "layers": "* names of the cached layers ('proj', 'enc1', ...)",
    "dtype": "storage scheme of the sequences: 'float16', 'float32' or 'int8' (with a scale per token per layer)",
    "views": "K, views per image",
    "seed": "seed of the training views",
    "aug": "* the AugConfig the views were drawn with",
    "teacher_settings": "* the first teacher's {model: architecture, train: its run's train section}: the "
                        "student's defaults (older caches lack it)",
    "view_policy": "how views are drawn (text)",
    "batch_size": "teacher batch size (entries [b·B, (b+1)·B) run together)",
    "entries": "E = images · K",
    "images": "images in the split",
    "total_tokens": "T, rows of every sequence dataset",
    "done_entries": "entries written so far; equals 'entries' in a complete file",
    "shard": "* only in a rank's shard while running under torchrun: {rank, world_size, start, end}",
}
JSON_ATTRS = ("teachers", "label_map", "layers", "aug", "teacher_settings", "shard")

#: Attributes that define the content: two files agreeing on these hold the same entries.
# batch_size is content too: the teachers' outputs differ in the last bits with the batch they ran in.
CONTENT_KEYS = ("tasks_sha256", "split", "teacher_sha256", "teacher_runtime", "layers", "dtype", "views", "seed", "aug",
                "batch_size")

VIEW_POLICY = (
    "entry e = i*K + v; view 0 = eval_view(H, W, aug.eval_size, aug.max_size); view v > 0 = "
    "sample_train_view(H, W, aug, torch.Generator().manual_seed(item_seed(seed, v, i)))"
)


def sequence_bytes_per_token(d_model: int, num_layers: int, num_teachers: int, dtype: str) -> int:
    """Bytes one token costs across all cached layers and teachers: ``d·sizeof(dtype)`` per layer
    and teacher, plus the float16 scale (2 bytes) for int8."""
    per_layer = int(d_model) * np.dtype(DTYPES[dtype]).itemsize + (np.dtype(SCALE_DTYPE).itemsize if dtype in SCALED else 0)
    return per_layer * int(num_layers) * int(num_teachers)


def head_bytes_per_entry(heads: Iterable[tuple[int, int]]) -> int:
    """Bytes of the float32 logits and boxes of one entry; ``heads`` = [(Q_t, C_t), ...]."""
    return sum(q * (c + 1 + 4) * 4 for q, c in heads)


#: Per-entry bookkeeping: image_index, image_id, view_index (3·8), view (7·8), hw (2·8), offset (8).
ENTRY_META_BYTES = 3 * 8 + 7 * 8 + 2 * 8 + 8


def estimate_bytes(tokens: int, entries: int, d_model: int, num_layers: int, heads: Sequence[tuple[int, int]], dtype: str,
                   seq_teachers: int | None = None, seq_layers: int | None = None) -> int:
    """The data bytes of a cache (HDF5 adds a little for its headers and chunk index):

    ``T·L·N_s·(d·sizeof(dtype) + s) + E·Σ_t Q_t·(C_t+5)·4 + E·104 + 8`` with ``s`` = 4 (the
    float16 scale) for int8 and 0 otherwise; N_s (``seq_teachers``) the teachers with sequences,
    by default all of ``heads``. ``seq_layers``: the (teacher, layer) sequences stored, when not
    every such teacher gives every layer (it replaces L·N_s).
    """
    n_seq = len(heads) if seq_teachers is None else int(seq_teachers)
    pairs = int(num_layers) * n_seq if seq_layers is None else int(seq_layers)
    seq = tokens * sequence_bytes_per_token(d_model, pairs, 1, dtype)
    return int(seq + entries * (head_bytes_per_entry(heads) + ENTRY_META_BYTES) + 8)


def size_estimates(tokens: int, entries: int, d_model: int, num_layers: int, heads: Sequence[tuple[int, int]],
                   seq_teachers: int | None = None, seq_layers: int | None = None) -> dict[str, int]:
    """:func:`estimate_bytes` for every storage scheme: ``{dtype: bytes}``."""
    return {dt: estimate_bytes(tokens, entries, d_model, num_layers, heads, dt, seq_teachers, seq_layers) for dt in DTYPES}


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def chunk_rows(tokens_per_entry: np.ndarray, d_model: int, itemsize: int) -> int:
    """Rows per chunk of a sequence dataset: about one entry's tokens (the median), so reading one
    entry touches one or two chunks; capped at 4 MiB per chunk. int8 chunks hold two entries' rows,
    the bytes of a float16 chunk: HDF5's chunk index costs about 70 bytes per chunk, which would
    otherwise weigh twice as much against small int8 chunks."""
    if len(tokens_per_entry) == 0:
        return 1
    rows = int(np.median(tokens_per_entry)) * max(1, 2 // int(itemsize))
    cap = max(1, (4 << 20) // (d_model * itemsize))
    return max(1, min(rows, cap, int(tokens_per_entry.sum())))


# -- reading the attributes ------------------------------------------------------------------------


def decode_attr(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_attrs(h5) -> dict:
    """The root attributes as Python values (JSON ones decoded)."""
    out = {}
    for k, v in h5.attrs.items():
        v = decode_attr(v)
        if k in JSON_ATTRS and isinstance(v, str):
            try:
                v = json.loads(v)
            except json.JSONDecodeError:
                pass
        out[k] = v
    return out


def content_signature(attrs: dict) -> dict:
    """What decides a cache's content (see :data:`CONTENT_KEYS`), from its attributes.

    ``teacher_runtime`` (each teacher's transformers version: a transformers folder's outputs are
    transformers' arithmetic too) is there only when a teacher is such a folder, so that every other
    cache keeps the content id it had."""
    runtime = [t.get("transformers_version") for t in attrs.get("teachers") or []]
    return {
        "tasks_sha256": attrs.get("tasks_sha256"),
        "split": attrs.get("split"),
        "teacher_sha256": [t.get("sha256") for t in attrs.get("teachers") or []],
        **({"teacher_runtime": runtime} if any(v is not None for v in runtime) else {}),
        "layers": list(attrs.get("layers") or []),
        "dtype": attrs.get("dtype"),
        "views": attrs.get("views"),
        "seed": attrs.get("seed"),
        "aug": attrs.get("aug"),
        "batch_size": attrs.get("batch_size"),
    }


def content_id(attrs: dict, size: int) -> str:
    """sha256 of a complete cache's :func:`content_signature` and its size in bytes.

    The writer is deterministic (the same teachers, tasks, layers, dtype, views, seed,
    augmentation and teacher batch size give the same bytes), so this names the content without reading it: hashing the
    file itself would read every byte (tens to hundreds of GiB for VOC or COCO) on every run.
    """
    payload = json.dumps({"signature": content_signature(attrs), "bytes": int(size)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def first_difference(a: dict, b: dict) -> str | None:
    """The first key of :data:`CONTENT_KEYS` on which two signatures differ, or None."""
    for k in CONTENT_KEYS:
        if a.get(k) != b.get(k):
            return k
    return None


def _version() -> str:
    return __version__


# -- validation ----------------------------------------------------------------------------------


@dataclass
class CacheLayout:
    """What a validated cache holds (read from its attributes and dataset shapes): the one header
    the cache's readers (:class:`~kacli.cache.reader.TeacherCache`, ``amalgamate --cache``,
    ``cache-info``) take the teachers, label maps and settings from."""

    path: Path
    attrs: dict
    entries: int
    layers: list[str]
    num_teachers: int
    d_model: int
    stride: int
    dtype: str
    offsets: np.ndarray  # (E+1,) int64
    hw: np.ndarray  # (E, 2) int64
    heads: list[tuple[int, int]]  # (Q_t, C_t) per teacher

    @property
    def teachers(self) -> list[dict]:
        """Per teacher ``{task, checkpoint, sha256, label_map, num_classes, num_queries[, arch, classifier,
        class_map]}`` (a transformers teacher also ``kind``, ``family``, ``transformers_version``,
        ``image_rule`` and ``sequences: false``)."""
        return list(self.attrs["teachers"])

    @property
    def seq_teachers(self) -> list[int]:
        """The teachers whose sequences the cache holds (:func:`has_sequences`), in order: the
        student has one part per each."""
        return [k for k, t in enumerate(self.teachers) if has_sequences(t)]

    def present(self, layers: Sequence[str]) -> list[list[bool]]:
        """``(N_s, L)``: whether sequence teacher k holds layer j of ``layers`` (an RT-DETR hybrid
        encoder holds the last layer only, :func:`teacher_layers`)."""
        return [[name in teacher_layers(self.teachers[k], self.layers) for name in layers] for k in self.seq_teachers]

    @property
    def label_map(self) -> dict:
        """The union label map ``{ids, names}``: all tasks' categories, the student's classes."""
        lm = self.attrs["label_map"]
        return {"ids": [int(i) for i in lm["ids"]], "names": list(lm["names"])}

    @property
    def teacher_label_maps(self) -> list[dict]:
        return [t["label_map"] for t in self.teachers]

    @property
    def enc_layers(self) -> int:
        return int(self.attrs["enc_layers"])

    def class_index(self) -> list:
        """Per teacher, a LongTensor of its classes' positions in :attr:`label_map`."""
        from kacli.teachers.labels import class_index

        return class_index(self.label_map, self.teacher_label_maps, self.path)

    def teacher_settings(self) -> dict:
        """The teachers' ``{"model", "aug", "train"}`` (:func:`teacher_settings`)."""
        return teacher_settings(self.attrs)


def teacher_settings(attrs: dict) -> dict:
    """``{"model", "aug", "train"}`` of the teachers, from a cache's attributes: the first
    teacher's architecture and training settings as ``cache-teachers`` recorded them
    (``teacher_settings``), and the augmentation the views were drawn with (``aug``)."""
    recorded = attrs.get("teacher_settings")
    if isinstance(recorded, Mapping):
        base = {k: dict(v) for k, v in recorded.items() if k in ("model", "train") and isinstance(v, Mapping)}
    else:
        # A cache written before cache-teachers recorded the settings: they are only in the
        # first teacher's checkpoint, read when the file is still where the cache says.
        from kacli.teachers.load import checkpoint_settings

        teachers = attrs.get("teachers") or []
        first = teachers[0].get("checkpoint") if teachers else None
        base = checkpoint_settings(first) if first else {}
    if isinstance(attrs.get("aug"), dict):
        base["aug"] = dict(attrs["aug"])
    return base


class CacheLockedError(KacliError):
    """The HDF5 file is open for writing in another process (HDF5 file locking refused it)."""


def open_h5(path: str | Path, mode: str = "r", **kw):
    """``h5py.File`` with one-line errors for missing, foreign, truncated or locked files."""
    import h5py

    p = Path(path)
    if mode == "r":
        if not p.exists():
            raise KacliError("cache file not found", p)
        if not p.is_file():
            raise KacliError("cache path is not a file", p)
    try:
        return h5py.File(p, mode, **kw)
    except (OSError, ValueError) as e:
        msg = str(e)
        if "truncated" in msg:
            raise KacliError("truncated HDF5 file (an interrupted copy or write?)", p) from None
        if "lock" in msg:
            raise CacheLockedError(
                "HDF5 file is locked by another process (is another cache-teachers writing it? if nothing is, the "
                "filesystem may not support locks: HDF5_USE_FILE_LOCKING=FALSE, docs/CACHE.md)", p) from None
        if mode == "r" and ("signature" in msg or "not an HDF5" in msg.lower() or "file format" in msg):
            raise KacliError("not an HDF5 file", p) from None
        first = msg.strip().splitlines()[0] if msg.strip() else type(e).__name__
        what = "unreadable HDF5 file" if mode == "r" else "cannot write the HDF5 file"
        raise KacliError(f"{what} ({first[:120]})", p) from None


def has_sequences(teacher: dict) -> bool:
    """Whether a cached teacher (an entry of the ``teachers`` attribute) has sequences in the file:
    a transformers folder of a multi-scale family teaches through TA only (``sequences: false``)."""
    return bool(teacher.get("sequences", True))


def teacher_layers(teacher: dict, layers: Sequence[str]) -> list[str]:
    """Those of the cache's ``layers`` a cached teacher holds, in order: none without sequences, all
    of them unless the teacher records its own ``layers`` (an RT-DETR hybrid encoder: the last
    encoder layer)."""
    if not has_sequences(teacher):
        return []
    own = teacher.get("layers")
    return [name for name in layers if own is None or name in own]


def seq_path(teacher: int, layer: str) -> str:
    return f"teachers/{teacher}/seq/{layer}"


def scale_path(teacher: int) -> str:
    """int8 caches: teacher's (T, L) float16 scales, column j for the j-th cached layer."""
    return f"teachers/{teacher}/scale"


def validate(h5, path: str | Path, require_complete: bool = True) -> CacheLayout:
    """Check an open cache's format, datasets and sizes; raise a one-line KacliError on the first problem.

    Checks: format tag; every required dataset present with consistent shapes; offsets start at 0,
    never decrease, end at the sequence datasets' row count and match each entry's ``h·w``;
    ``done_entries == entries`` (when ``require_complete``).
    """
    import h5py

    p = Path(path)
    try:
        attrs = read_attrs(h5)
    except (OSError, RuntimeError) as e:
        raise KacliError(f"unreadable cache attributes ({str(e)[:100]})", p) from None
    fmt = attrs.get("format")
    if fmt != FORMAT:
        what = "not a kacli teacher cache" if fmt is None else f"cache format {fmt!r} is not {FORMAT!r}"
        raise KacliError(what, p)

    def need(name):
        if name not in attrs:
            raise KacliError(f"cache lacks the attribute {name!r}", p)
        return attrs[name]

    entries = int(need("entries"))
    layers = list(need("layers"))
    teachers = need("teachers")
    d = int(need("d_model"))
    stride = int(need("stride"))
    dtype = str(need("dtype"))
    for k in ("label_map", "views", "seed", "aug", "split", "tasks_sha256", "total_tokens", "done_entries", "images"):
        need(k)
    if dtype not in DTYPES:
        raise KacliError(
            f"cache storage scheme (dtype) {dtype!r} is not known to kacli {_version()} (it reads {', '.join(DTYPES)})", p
        )
    done = int(attrs["done_entries"])
    if require_complete and done != entries:
        raise KacliError(f"incomplete cache: {done} of {entries} entries written", p)

    def ds(name, shape=None, ndim=None):
        obj = h5.get(name)
        if not isinstance(obj, h5py.Dataset):
            raise KacliError(f"cache lacks the dataset /{name}", p)
        if shape is not None and tuple(obj.shape) != tuple(shape):
            raise KacliError(f"/{name} has shape {tuple(obj.shape)}, expected {tuple(shape)}", p)
        if ndim is not None and obj.ndim != ndim:
            raise KacliError(f"/{name} has {obj.ndim} dimensions, expected {ndim}", p)
        return obj

    try:
        offsets = ds("offsets", (entries + 1,))[...].astype(np.int64)
        hw = ds("entries/hw", (entries, 2))[...].astype(np.int64)
        for name, shape in (("image_index", (entries,)), ("image_id", (entries,)), ("view_index", (entries,)), ("view", (entries, 7))):
            ds(f"entries/{name}", shape)
        total = int(offsets[-1]) if len(offsets) else 0
        if len(offsets) and offsets[0] != 0:
            raise KacliError("offsets do not start at 0", p)
        if np.any(np.diff(offsets) < 0):
            raise KacliError("offsets decrease (corrupt cache)", p)
        if not np.array_equal(np.diff(offsets), hw[:, 0] * hw[:, 1]):
            bad = int(np.nonzero(np.diff(offsets) != hw[:, 0] * hw[:, 1])[0][0])
            raise KacliError(f"entry {bad}: offsets give {int(offsets[bad + 1] - offsets[bad])} tokens, hw says {hw[bad].tolist()}", p)
        if total != int(attrs["total_tokens"]):
            raise KacliError(f"offsets end at {total}, total_tokens says {attrs['total_tokens']}", p)
        if not isinstance(teachers, list) or not teachers:
            raise KacliError("cache lists no teachers", p)
        if not any(has_sequences(t) for t in teachers):
            raise KacliError("no cached teacher has sequences (at least one must be a kacli teacher)", p)
        heads = []
        for k, t in enumerate(teachers):
            q, c = int(t["num_queries"]), int(t["num_classes"])
            heads.append((q, c))
            ds(f"teachers/{k}/logits", (entries, q, c + 1))
            ds(f"teachers/{k}/boxes", (entries, q, 4))
            own = teacher_layers(t, layers)
            if has_sequences(t) and not own:
                raise KacliError(f"teacher {k} is said to have sequences but holds none of the cached layers", p)
            if not own:
                continue
            for layer in own:
                obj = ds(seq_path(k, layer), (total, d))
                if obj.dtype != np.dtype(DTYPES[dtype]):
                    raise KacliError(f"/{seq_path(k, layer)} is {obj.dtype}, the cache says {dtype}", p)
            if dtype in SCALED:
                obj = ds(scale_path(k), (total, len(own)))
                if obj.dtype not in SCALE_DTYPES:
                    raise KacliError(f"/{scale_path(k)} is {obj.dtype}, expected float16 (or float32)", p)
    except (KeyError, TypeError) as e:
        raise KacliError(f"malformed cache attributes ({e})", p) from None
    except OSError as e:
        raise KacliError(f"unreadable cache ({str(e)[:100]})", p) from None
    return CacheLayout(p, attrs, entries, layers, len(teachers), d, stride, dtype, offsets, hw, heads)


def read_layout(path: str | Path, require_complete: bool = True) -> CacheLayout:
    """Open the cache at ``path`` and :func:`validate` it."""
    with open_h5(path, "r") as f:
        return validate(f, path, require_complete=require_complete)


__all__ = [
    "FORMAT",
    "DTYPES",
    "ROOT_ATTRS",
    "VIEW_POLICY",
    "CacheLayout",
    "estimate_bytes",
    "human_bytes",
    "chunk_rows",
    "read_attrs",
    "content_id",
    "content_signature",
    "first_difference",
    "open_h5",
    "has_sequences",
    "teacher_layers",
    "seq_path",
    "scale_path",
    "SCALED",
    "SCALE_DTYPE",
    "SCALE_DTYPES",
    "FLOAT16_MAX",
    "MAX_INT8_SCALE",
    "head_out_of_range",
    "size_estimates",
    "read_layout",
    "teacher_settings",
    "validate",
]
