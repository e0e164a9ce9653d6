"""``TeacherCache``: the student's dataset over a teacher cache (schema: docs/CACHE.md).

Each item is an entry of the cache: the image replayed from the entry's stored view (the same
tensor, bit for bit, that the teachers saw), its ground-truth target over the union label map, and
the teachers' cached sequences and predictions. The HDF5 file is opened lazily in each process
(DataLoader workers included); the handle is never pickled.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from kacli.cache import schema
from kacli.data.dataset import CocoDetection, collate
from kacli.data.manifest import TaskManifest
from kacli.data.transforms import View
from kacli.errors import KacliError
from kacli.grid import token_grid, top_left_index
from kacli.teachers.layers import layer_names
from kacli.teachers.quant import dequantize as dequantize_int8


IN_MEMORY_BYTES = 1 << 30  # caches up to 1 GiB (selected layers + logits + boxes) are held in memory


def cache_manifest(attrs: Mapping, cache_path: str | Path, tasks: str | Path | None = None) -> TaskManifest:
    """The task manifest a cache was made from: ``tasks`` when given, else the tasks.yaml the cache
    names (``attrs["tasks_path"]``). Its sha256 must be the one the cache recorded
    (``attrs["tasks_sha256"]``): otherwise a KacliError names the manifest, saying whether it is
    another file or the cache's own one changed since."""
    cache_path = Path(cache_path)
    recorded = attrs.get("tasks_path")
    if tasks is None and not recorded:
        raise KacliError("cache does not name its tasks.yaml; pass --tasks", cache_path)
    manifest = TaskManifest(tasks if tasks is not None else recorded)
    want = str(attrs.get("tasks_sha256"))
    if manifest.sha256 != want:
        same_file = recorded is not None and Path(recorded).resolve() == manifest.path.resolve()
        why = "it has changed since" if same_file else f"another task manifest than {recorded}"
        raise KacliError(
            f"tasks.yaml differs from the one the cache {cache_path.name} was made from: {why} (sha256 "
            f"{manifest.sha256[:12]}… vs {want[:12]}…)",
            manifest.path,
        )
    return manifest


class TeacherCache(Dataset):
    """The entries of a complete cache file, with their images and ground truth.

    Args:
        path: the cache (``.h5``) written by ``kacli cache-teachers``.
        split_dataset: optional :class:`CocoDetection` of the cached split (any label map), to take
            the annotation file and image folder from; by default they come from the tasks.yaml
            the cache names (whose sha256 must match).
        layers: cached layers to return (``'all'``, ``'proj,1,3'`` or a list of names); default all cached.
        tasks: tasks.yaml to use instead of the path stored in the cache (sha256 must match).
        seq_dtype: dtype of the returned sequences (float32 by default).
        dequantize: for an int8 cache, return float sequences ``q · scale`` in ``seq_dtype`` (True,
            default), or the stored int8 ``seqs`` with their ``seq_scale`` (False) so that they travel
            at one byte a value and :func:`kacli.teachers.quant.dequantize_teacher` turns the batch into
            floats on the training device. Float caches ignore it.
        in_memory: read the selected layers, logits and boxes into memory once (True), or read
            every entry from the file (False). None (default): in memory when they take at most
            :data:`IN_MEMORY_BYTES`. A small cache read per entry costs N·L + 2N HDF5 calls, a
            fixed cost that outweighs a small model's training step; a large one stays on disk.
        layout: the file's validated header (:func:`kacli.cache.schema.read_layout`) when the
            caller already has it; read and validated here otherwise.

    Item ``e``: ``(image (3,h,w) float32, target, teacher)`` where ``target`` is
    :class:`CocoDetection`'s (labels index :attr:`label_map`) and ``teacher`` is
    ``{"seqs": (N_s, L, n_e, d), "hw": (h_tok, w_tok), "logits": [(Q_t, C_t+1)] * N,
    "boxes": [(Q_t, 4)] * N, "stride": int, "entry": e}`` with ``n_e = h_tok·w_tok`` tokens row-major;
    N_s counts the teachers with sequences (``seq_teachers``: a transformers folder of a multi-scale
    family has none, it teaches through TA only), N all of them. An int8 cache read with ``dequantize=False`` gives
    ``seqs`` (N_s, L, n_e, d) int8 and ``seq_scale`` (N_s, L, n_e) float32 instead.

    Attributes: ``label_map`` (union ``{ids, names}``: all tasks' categories in task order),
    ``teacher_label_maps``, ``class_index`` (per teacher, a LongTensor of its classes' positions in
    the union), ``layer_names``, ``present`` ((N_s, L) bools: whether sequence teacher k holds layer
    j; an absent layer reads as zeros), ``d_model``, ``stride``, ``layout`` (the validated header) and its
    ``attrs`` (the file's root attributes).
    """

    def __init__(
        self,
        path: str | Path,
        split_dataset: CocoDetection | None = None,
        layers: str | Sequence[str] | None = None,
        tasks: str | Path | None = None,
        seq_dtype: torch.dtype = torch.float32,
        in_memory: bool | None = None,
        dequantize: bool = True,
        layout: schema.CacheLayout | None = None,
    ):
        self.path = Path(path)
        with schema.open_h5(self.path, "r") as f:
            if layout is None:
                layout = schema.validate(f, self.path, require_complete=True)
            image_index = f["entries/image_index"][...].astype(np.int64)
            image_id = f["entries/image_id"][...].astype(np.int64)
            views = f["entries/view"][...]
        a = layout.attrs
        self.layout = layout
        self.attrs = a
        self.entries = layout.entries
        self.offsets = layout.offsets
        self.hw = layout.hw
        self.d_model = layout.d_model
        self.stride = layout.stride
        self.num_teachers = layout.num_teachers
        self.seq_teachers = layout.seq_teachers  # the teachers with sequences: seqs' N axis
        self.seq_dtype = seq_dtype
        self.storage = layout.dtype
        self.scaled = layout.dtype in schema.SCALED
        self.dequantize = bool(dequantize)
        cached = list(layout.layers)
        if layers is None:
            self.layer_names = cached
        else:
            wanted = layer_names(layers, layout.enc_layers)
            missing = [n for n in wanted if n not in cached]
            if missing:
                raise KacliError(f"layers {', '.join(missing)} are not in the cache (it has {', '.join(cached)})", self.path)
            self.layer_names = wanted
        # (N_s, L): whether sequence teacher k holds layer j (an RT-DETR hybrid encoder: the last
        # layer only); an absent layer reads as zeros and the SA loss leaves it out (Objective's present)
        self.present = layout.present(self.layer_names)
        own = [schema.teacher_layers(layout.teachers[k], cached) for k in self.seq_teachers]
        # per sequence teacher, the columns of /teachers/<k>/scale of the selected layers it holds
        self._scale_cols = [[own[i].index(n) for n, has in zip(self.layer_names, row) if has]
                            for i, row in enumerate(self.present)]
        self._held = [np.asarray(row, dtype=bool) for row in self.present]  # per entry: the layers to fill
        self._complete = all(all(row) for row in self.present)
        self.label_map = layout.label_map
        self.teacher_label_maps = layout.teacher_label_maps
        self.class_index = layout.class_index()

        if split_dataset is None:
            manifest = cache_manifest(a, self.path, tasks)
            json_path, image_root = manifest.split_json(a["split"]), manifest.image_root(a["split"])
        else:
            json_path, image_root = split_dataset.json_path, split_dataset.image_root
        view_list = [(int(i), View.from_list(v)) for i, v in zip(image_index, views)]
        self.dataset = CocoDetection(json_path, image_root, self.label_map["ids"], train=False, views=view_list)
        if self.dataset.num_images != int(a["images"]):
            raise KacliError(
                f"{json_path.name} has {self.dataset.num_images} images, the cache was made from {a['images']}", json_path
            )
        ids = np.array([int(self.dataset.image_info(i)["id"]) for i in range(self.dataset.num_images)], dtype=np.int64)
        if len(image_index) and not np.array_equal(ids[image_index], image_id):
            raise KacliError(f"image ids of {json_path.name} do not match the cache's entries", json_path)
        self._h5 = None
        self._pid = None
        self._ds = None
        self._mem = None
        if in_memory is None:
            in_memory = self.selected_bytes() <= IN_MEMORY_BYTES
        if in_memory:
            ds = self._open()
            self._mem = {key: [[None if d is None else d[...] for d in row] for row in val] if key == "seqs"
                         else [d[...] for d in val] for key, val in ds.items()}
            if self.scaled:  # only the selected layers' columns
                self._mem["scale"] = [m[:, cols] for m, cols in zip(self._mem["scale"], self._scale_cols)]
            self.close()

    def selected_bytes(self) -> int:
        """Bytes of the selected layers, logits and boxes in the file (what ``in_memory`` holds)."""
        ds = self._open()
        try:
            return sum(d.dtype.itemsize * int(np.prod(d.shape)) for row in ds["seqs"] for d in row if d is not None) + sum(
                d.dtype.itemsize * int(np.prod(d.shape)) for key in ("logits", "boxes", "scale") for d in ds.get(key, ()))
        finally:
            self.close()

    @property
    def in_memory(self) -> bool:
        return self._mem is not None

    # -- file handle per process ---------------------------------------------------------------

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_h5"] = None
        state["_ds"] = None
        state["_pid"] = None
        return state

    def _open(self):
        if self._h5 is None or self._pid != os.getpid():
            import h5py

            self._h5 = h5py.File(self.path, "r", rdcc_nbytes=4 << 20)
            self._pid = os.getpid()
            self._ds = {
                "seqs": [[self._h5[schema.seq_path(k, n)] if has else None for n, has in zip(self.layer_names, row)]
                         for k, row in zip(self.seq_teachers, self.present)],
                "logits": [self._h5[f"teachers/{k}/logits"] for k in range(self.num_teachers)],
                "boxes": [self._h5[f"teachers/{k}/boxes"] for k in range(self.num_teachers)],
            }
            if self.scaled:
                self._ds["scale"] = [self._h5[schema.scale_path(k)] for k in self.seq_teachers]
        return self._ds

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
        self._h5 = self._ds = self._pid = None

    # -- items ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.entries

    def teacher_entry(self, e: int) -> dict:
        """The cached teacher outputs of entry ``e`` (see the class docstring)."""
        if not 0 <= e < self.entries:
            raise IndexError(e)
        a, b = int(self.offsets[e]), int(self.offsets[e + 1])
        L, N = len(self.layer_names), len(self.seq_teachers)
        alloc = np.empty if self._complete else np.zeros  # a layer a teacher does not hold stays zero
        seqs = alloc((N, L, b - a, self.d_model), dtype=np.dtype(schema.DTYPES[self.storage]))
        scale = alloc((N, L, b - a), dtype=np.float32) if self.scaled else None
        if self._mem is not None:
            ds = self._mem
            for k in range(N):
                for j, d in enumerate(ds["seqs"][k]):
                    if d is not None:
                        seqs[k, j] = d[a:b]
                if scale is not None:
                    scale[k, self._held[k]] = ds["scale"][k][a:b].T
        else:
            ds = self._open()
            for k in range(N):
                for j, d in enumerate(ds["seqs"][k]):
                    if b > a and d is not None:
                        d.read_direct(seqs, np.s_[a:b], np.s_[k, j])
                if scale is not None:
                    scale[k, self._held[k]] = ds["scale"][k][a:b][:, self._scale_cols[k]].T
        h, w = (int(v) for v in self.hw[e])
        logits = [np.array(d[e]) for d in ds["logits"]]
        boxes = [np.array(d[e]) for d in ds["boxes"]]
        values = [seqs] if scale is None else [scale]  # int8 values are finite; their scales may not be
        for what, arrays in (("sequences", values), ("logits", logits), ("boxes", boxes)):
            for k, arr in enumerate(arrays):
                if not np.isfinite(arr).all():
                    who = f"teacher {k}'s " if what != "sequences" else ""
                    raise KacliError(f"entry {e}: {who}cached {what} hold NaN or inf (kacli cache-info --verify checks "
                                     "the whole file; a cache written now refuses such teachers)", self.path)
        for what, arrays, bound in (("boxes", boxes, "outside [0, 1]"), ("logits", logits, "beyond ±65504")):
            for k, arr in enumerate(arrays):
                if schema.head_out_of_range(what, arr):
                    raise KacliError(f"entry {e}: teacher {k}'s cached {what} lie {bound}, where no teacher's do: the "
                                     "file is damaged (kacli cache-info --verify checks it whole)", self.path)
        stored = {"seqs": torch.from_numpy(seqs).to(self.seq_dtype)}
        if scale is not None:
            q, s = torch.from_numpy(seqs), torch.from_numpy(scale)
            stored = {"seqs": dequantize_int8(q, s, self.seq_dtype)} if self.dequantize else {"seqs": q, "seq_scale": s}
        return {
            **stored,
            "hw": (h, w),
            "logits": [torch.from_numpy(x) for x in logits],
            "boxes": [torch.from_numpy(x) for x in boxes],
            "stride": self.stride,
            "entry": int(e),
        }

    def __getitem__(self, e: int):
        image, target = self.dataset[e]
        teacher = self.teacher_entry(e)
        h, w = teacher["hw"]
        if token_grid(image.shape[1], image.shape[2], self.stride) != (h, w):
            raise KacliError(f"entry {e}: replayed image {tuple(image.shape[1:])} does not give the cached {h}x{w} tokens", self.path)
        return image, target, teacher


def collate_cached(batch):
    """Batch :class:`TeacherCache` items.

    Returns ``(images (B,3,H,W), mask (B,H,W) True=pad, targets, teacher)`` with images padded
    bottom/right to a multiple of the teachers' stride, and ``teacher``:

    - ``seqs`` (B, N_s, L, hp·wp, d) (N_s: the teachers with sequences): each entry's tokens at the top-left of the padded
      ``(hp, wp) = (ceil(H/stride), ceil(W/stride))`` grid, row-major; zeros at padding;
    - ``token_mask`` (B, hp·wp) bool, True at padding;
    - ``logits``: per teacher (all N) (B, Q_t, C_t+1); ``boxes``: per teacher (B, Q_t, 4);
    - ``hw`` (B, 2) int64 valid token grid per entry; ``entries`` (B,) int64; ``grid`` (hp, wp);
    - int8 items (``TeacherCache(dequantize=False)``): ``seqs`` is int8 and ``seq_scale``
      (B, N, L, hp·wp) float32 holds the scales, zeros at padding;
      :func:`kacli.teachers.quant.dequantize_teacher` gives the float ``seqs``.
    """
    if not batch:
        raise ValueError("collate_cached needs at least one item")
    stride = int(batch[0][2]["stride"])
    images, mask, targets = collate([(im, t) for im, t, _ in batch], size_divisibility=stride)
    H, W = images.shape[-2:]
    hp, wp = token_grid(H, W, stride)
    first = batch[0][2]["seqs"]
    N, L, _, d = first.shape
    seqs = first.new_zeros((len(batch), N, L, hp * wp, d))
    scaled = "seq_scale" in batch[0][2]
    scale = torch.zeros((len(batch), N, L, hp * wp), dtype=torch.float32) if scaled else None
    token_mask = torch.ones((len(batch), hp * wp), dtype=torch.bool)
    for b, (_, _, t) in enumerate(batch):
        h, w = t["hw"]
        idx = top_left_index(h, w, wp)
        seqs[b][:, :, idx] = t["seqs"]
        if scaled:
            scale[b][:, :, idx] = t["seq_scale"]
        token_mask[b, idx] = False
    teacher = {
        "seqs": seqs,
        "token_mask": token_mask,
        "logits": [torch.stack([t["logits"][k] for _, _, t in batch]) for k in range(len(batch[0][2]["logits"]))],
        "boxes": [torch.stack([t["boxes"][k] for _, _, t in batch]) for k in range(len(batch[0][2]["boxes"]))],
        "hw": torch.tensor([list(t["hw"]) for _, _, t in batch], dtype=torch.int64),
        "entries": torch.tensor([t["entry"] for _, _, t in batch], dtype=torch.int64),
        "grid": (hp, wp),
    }
    if scaled:
        teacher["seq_scale"] = scale
    return images, mask, targets, teacher
