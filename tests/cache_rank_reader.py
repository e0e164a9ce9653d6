"""Run by tests/test_cache.py under torchrun: every rank reads its share of one teacher cache.

    python -m torch.distributed.run --nproc-per-node 2 tests/cache_rank_reader.py CACHE OUT_DIR \
        SEED BATCH_SIZE WORKERS EPOCH

Each rank opens the cache with ``TeacherCache`` twice (``in_memory=True``, then ``False``), builds
the epoch's DataLoader with the trainer's own ``Trainer._loader`` (its DistributedSampler, seed,
shuffle and drop_last), iterates it, and writes ``OUT_DIR/rank<r>.json``: per mode the sampler's
indices and, per entry read, its sha256 digests (:func:`entry_digests`), the process that read it
and the HDF5 file that process had open.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils.data import get_worker_info


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def entry_digests(image: torch.Tensor, teacher: dict) -> dict:
    """sha256 of an item's image, sequences, logits and boxes (dtype, shape and bytes)."""
    return {
        "image": _digest([image]),
        "seqs": _digest([teacher["seqs"]]),
        "logits": _digest(teacher["logits"]),
        "boxes": _digest(teacher["boxes"]),
    }


def read_batch(items) -> list[dict]:
    """collate_fn: what was read, in the process (rank or DataLoader worker) that read it."""
    info = get_worker_info()
    h5 = getattr(info.dataset if info else None, "_h5", None)
    return [
        {"entry": int(t["entry"]), "digests": entry_digests(image, t), "pid": os.getpid(),
         "h5": None if h5 is None else str(Path(h5.filename).resolve())}
        for image, _, t in items
    ]  # fmt: skip


def main(cache_path: str, out_dir: str, seed: int, batch_size: int, workers: int, epoch: int) -> None:
    import torch.distributed as dist

    from kacli.cache.reader import TeacherCache
    from kacli.runtime import init_distributed
    from kacli.engine.train import Trainer

    info = init_distributed("cpu")
    report = {"rank": info.rank, "world_size": info.world_size, "pid": os.getpid()}
    for mode, in_memory in (("memory", True), ("disk", False)):
        cache = TeacherCache(cache_path, in_memory=in_memory)
        assert cache.in_memory is in_memory
        trainer = SimpleNamespace(  # the attributes Trainer._loader reads
            train_set=cache, collate_fn=read_batch, dist=info, device=info.device,
            s=SimpleNamespace(train=SimpleNamespace(seed=seed, batch_size=batch_size, workers=workers)),
        )  # fmt: skip
        loader = Trainer._loader(trainer, epoch)
        read = [item for batch in loader for item in batch]
        report[mode] = {"sampler": [int(i) for i in loader.sampler], "read": read,
                        "rank_opened_file": cache._h5 is not None}  # fmt: skip
        cache.close()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{info.rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    path, out, *numbers = sys.argv[1:]
    main(path, out, *(int(n) for n in numbers))
