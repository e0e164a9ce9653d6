"""The teacher cache: cache-teachers, TeacherCache / collate_cached, cache-info.

A dozen 96-px demo images split into the demo's two tasks; the teachers are tiny DETRs with random
weights. Augmentation here keeps every view square at 96 or 128 px (multiples of the stride), so
padding in a batch does not change a token and a cached entry can be compared with the teacher
run on the replayed image alone.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from cache_rank_reader import entry_digests
from conftest import assert_one_line_error
from kacli.cache import schema
from kacli.cache.output import KILL_ENV
from kacli.cache.reader import TeacherCache, cache_manifest, collate_cached
from kacli.config import config_to_dict
from kacli.data.dataset import CocoDetection, collate, entry_view
from kacli.data.demo_data import make_demo_data
from kacli.data.manifest import TaskManifest
from kacli.data.split import split_tasks
from kacli.data.transforms import AugConfig, apply_view
from kacli.errors import KacliError
from kacli.models.checkpoint import build_model, load_checkpoint, save_checkpoint
from kacli.models.config import model_config
from kacli.models.detr import DETR

AUG16 = AugConfig(
    scales=(48, 64), max_size=128, crop_scales=(96,), crop_min=64, crop_max=96, flip_p=0.5, crop_p=0.0, eval_size=64
)
AUG_CROP = AugConfig(  # crops, and view sizes that are not multiples of 16
    scales=(40, 56, 72), max_size=128, crop_scales=(96,), crop_min=48, crop_max=80, flip_p=0.5, crop_p=0.7,
    eval_size=50,
)
VIEWS, BATCH = 3, 4  # 12 images → 36 entries → 9 batches
ARCH = {"d_model": 32, "nheads": 2, "enc_layers": 2, "dec_layers": 1, "dim_feedforward": 64, "tiny_widths": [8, 8, 16, 16],
        "num_queries": 10}
LAYERS = ["proj", "enc1", "enc2"]


def make_teacher(path: Path, label_map: dict, seed: int, aug: AugConfig, **arch) -> Path:
    cfg = model_config({"preset": "tiny", **ARCH, **arch})
    torch.manual_seed(seed)
    model = DETR(cfg, len(label_map["ids"]))
    save_checkpoint(
        path,
        {
            "kind": "detr", "arch": cfg.to_dict(), "label_map": label_map, "task": None, "model": model.state_dict(),
            "config": {"aug": config_to_dict(aug), "model": cfg.to_dict()},
        },
    )  # fmt: skip
    return path


def cache_args(env, out, *teachers, extra=()):
    teachers = teachers or env.teachers
    args = ["cache-teachers", "--tasks", env.tasks, "--out", out, "--views", VIEWS, "--batch-size", BATCH]
    args += ["--device", "cpu", "--workers", "0"]
    for t in teachers:
        args += ["--teacher", t]
    return [str(a) for a in args + list(extra)]


def subprocess_env(**extra) -> dict:
    # Same thread count as this process: CPU kernels round differently with another one.
    return dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), **extra)


def contents(path: Path) -> dict:
    """Every dataset and attribute of a cache file ('created' aside)."""
    out = {}
    with h5py.File(path, "r") as f:
        out["@/"] = {k: v for k, v in schema.read_attrs(f).items() if k != "created"}

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                out[name] = (obj.dtype.str, obj[...])
            out["@" + name] = {k: schema.decode_attr(v) for k, v in obj.attrs.items()}

        f.visititems(visit)
    return out


def assert_same_cache(a: Path, b: Path) -> None:
    A, B = contents(a), contents(b)
    assert sorted(A) == sorted(B)
    for k in A:
        if k.startswith("@"):
            assert A[k] == B[k], k
        else:
            assert A[k][0] == B[k][0], k
            assert np.array_equal(A[k][1], B[k][1]), k


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    make_demo_data(root / "data", train_images=12, val_images=0, seed=0, size=96, progress=False)
    split_tasks(str(root / "data" / "train.json"), None, str(root / "data" / "tasks-2.yaml"), root / "tasks",
                images=root / "data" / "images")  # fmt: skip
    manifest = TaskManifest(root / "tasks")
    maps = [t.label_map() for t in manifest.tasks]
    teachers = [make_teacher(root / f"t{k}.pt", lm, k, AUG16) for k, lm in enumerate(maps)]
    e = SimpleNamespace(root=root, tasks=manifest.path, manifest=manifest, maps=maps, teachers=teachers)
    from typer.testing import CliRunner

    from kacli.cli import app

    e.main = root / "main.h5"
    res = CliRunner().invoke(app, cache_args(e, e.main), catch_exceptions=False)
    assert res.exit_code == 0, res.stdout + res.stderr
    return e


# -- contents --------------------------------------------------------------------------------------


def test_cached_entries_equal_live_teacher_outputs(env):
    cache = TeacherCache(env.main)
    assert len(cache) == 12 * VIEWS and cache.layer_names == LAYERS
    models = [build_model(load_checkpoint(p)).eval() for p in env.teachers]
    by_size: dict = {}
    for e in range(len(cache)):
        image, target, t = cache[e]
        by_size.setdefault(tuple(image.shape[1:]), []).append((image, t))
    assert sorted(by_size) == [(48, 48), (64, 64)]  # views of both sizes were drawn
    for (H, W), items in by_size.items():
        # the teachers on the replayed images, without any padding (same-size images batch exactly)
        images = torch.stack([im for im, _ in items])
        h, w = math.ceil(H / 16), math.ceil(W / 16)
        for k, m in enumerate(models):
            with torch.inference_mode():
                out = m(images, torch.zeros((len(items), H, W), dtype=torch.bool))
            assert tuple(out["enc_hw"]) == (h, w)
            for b, (_, t) in enumerate(items):
                assert t["hw"] == (h, w) and t["seqs"].shape == (2, 3, h * w, 32) and t["seqs"].dtype == torch.float32
                live = [out["enc_proj"][b], *(x[b] for x in out["enc_layers"])]
                for j in range(3):  # fp16 storage: within half an fp16 ulp (plus float32 noise)
                    torch.testing.assert_close(t["seqs"][k, j], live[j], rtol=2**-10, atol=1e-4)
                    assert not torch.equal(t["seqs"][k, j], live[j])  # it really was rounded
                torch.testing.assert_close(t["logits"][k], out["pred_logits"][b], rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(t["boxes"][k], out["pred_boxes"][b], rtol=1e-4, atol=1e-5)


def test_offsets_tokens_and_attributes(env):
    with h5py.File(env.main, "r") as f:
        a = schema.read_attrs(f)
        off, hw, view = f["offsets"][...], f["entries/hw"][...], f["entries/view"][...]
        assert off[0] == 0 and np.array_equal(np.diff(off), hw[:, 0] * hw[:, 1])
        # token grid = ceil(view size / stride); 64 px → 4x4, 48 px → 3x3
        assert np.array_equal(hw, np.ceil(view[:, 5:7] / 16).astype(np.int64))
        assert set(map(tuple, hw.tolist())) == {(4, 4), (3, 3)}
        assert f["teachers/0/seq/enc2"].shape == (off[-1], 32) and f["teachers/0/seq/enc2"].dtype == np.float16
        assert f["teachers/1/logits"].shape == (36, 10, 5) and f["teachers/1/boxes"].dtype == np.float32
        assert f["teachers/0/seq/proj"].chunks[0] == int(np.median(np.diff(off)))  # about one entry per chunk
        assert f["teachers/0/seq/proj"].compression is None
        assert np.array_equal(f["entries/image_index"][...], np.arange(36) // 3)
        assert np.array_equal(f["entries/view_index"][...], np.arange(36) % 3)
    assert a["done_entries"] == a["entries"] == 36 and a["total_tokens"] == off[-1]
    assert [t["sha256"] for t in a["teachers"]] == [schema_sha(p) for p in env.teachers]
    assert [t["label_map"] for t in a["teachers"]] == env.maps
    assert a["label_map"]["ids"] == env.maps[0]["ids"] + env.maps[1]["ids"]
    assert a["aug"] == config_to_dict(AUG16) and a["views"] == 3 and a["layers"] == LAYERS
    assert a["tasks_sha256"] == env.manifest.sha256 and (a["d_model"], a["enc_layers"], a["stride"]) == (32, 2, 16)
    # the size estimate printed before running is the data the file holds (plus HDF5's headers)
    est = schema.estimate_bytes(int(off[-1]), 36, 32, 3, [(10, 4), (10, 4)], "float16")
    assert est == int(off[-1]) * 32 * 3 * 2 * 2 + 36 * 2 * 10 * 9 * 4 + 36 * 104 + 8
    assert est < env.main.stat().st_size < est + 64 * 1024


def schema_sha(p):
    from kacli.fsutil import sha256_file

    return sha256_file(p)


def test_view_replay_is_bit_identical_and_matches_the_batch_the_teachers_saw(env, cli, tmp_path):
    """Views with crops and sizes that are not multiples of 16: the reader replays the exact
    tensors, and the cache holds the teachers' outputs on the padded batches they ran in."""
    teachers = [make_teacher(tmp_path / f"c{k}.pt", lm, 10 + k, AUG_CROP) for k, lm in enumerate(env.maps)]
    out = tmp_path / "crop.h5"
    res = cli(*cache_args(env, out, *teachers, extra=["--layers", "proj,2", "--dtype", "float32"]))
    assert res.exit_code == 0, res.stderr
    cache = TeacherCache(out)
    assert cache.layer_names == ["proj", "enc2"]
    manifest = env.manifest
    coco = CocoDetection(manifest.split_json("train"), manifest.image_root("train"), cache.label_map["ids"], train=True,
                         aug=AUG_CROP, generator_seed=0)  # fmt: skip
    crops = 0
    for e in range(len(cache)):
        i, v = divmod(e, VIEWS)
        image, target, _ = cache[e]
        raw, boxes, _ = coco.raw(i)
        view = entry_view(raw.shape[1], raw.shape[2], i, v, AUG_CROP, seed=0)
        assert target["view"] == view.to_list()
        assert torch.equal(image, apply_view(raw, boxes, view)[0])
        if v > 0:  # the training view CocoDetection samples for image i in epoch v
            coco.set_epoch(v)
            assert coco[i][1]["view"] == view.to_list()
        crops += view.crop != (0, 0, 96, 96)
    assert crops > 5
    # batches of the run: [b·B, (b+1)·B), padded to a multiple of the stride
    models = [build_model(load_checkpoint(p)).eval() for p in teachers]
    for b in range(0, len(cache), BATCH):
        items = [cache[e] for e in range(b, b + BATCH)]
        images, mask, _ = collate([(im, t) for im, t, _ in items], size_divisibility=16)
        for k, m in enumerate(models):
            with torch.inference_mode():
                o = m(images, mask)
            valid = ~o["enc_mask"]
            for j, (_, _, t) in enumerate(items):
                assert torch.equal(t["seqs"][k, 0], o["enc_proj"][j][valid[j]])  # float32 storage: exact
                assert torch.equal(t["seqs"][k, 1], o["enc_layers"][1][j][valid[j]])
                assert torch.equal(t["logits"][k], o["pred_logits"][j])


def test_in_memory_and_on_disk_reads_are_identical(env, monkeypatch):
    disk = TeacherCache(env.main, in_memory=False)
    mem = TeacherCache(env.main, layers="proj,1,2", in_memory=True)
    assert mem.in_memory and not disk.in_memory
    for e in range(len(disk)):
        (im_d, tg_d, t_d), (im_m, tg_m, t_m) = disk[e], mem[e]
        assert torch.equal(im_d, im_m) and torch.equal(tg_d["boxes"], tg_m["boxes"])
        assert torch.equal(t_d["seqs"], t_m["seqs"]) and t_d["hw"] == t_m["hw"]
        for key in ("logits", "boxes"):
            assert all(torch.equal(x, y) for x, y in zip(t_d[key], t_m[key]))
    # a returned entry is a copy: changing it leaves the cache as it was
    mem[0][2]["logits"][0].zero_()
    assert torch.equal(mem[0][2]["logits"][0], disk[0][2]["logits"][0])
    # the default holds a cache in memory only while it is small
    assert TeacherCache(env.main).in_memory
    monkeypatch.setattr("kacli.cache.reader.IN_MEMORY_BYTES", mem.selected_bytes() - 1)
    assert not TeacherCache(env.main).in_memory


def test_collate_cached_scatters_tokens_top_left(env):
    cache = TeacherCache(env.main, layers="proj,2", in_memory=False)
    items = [cache[e] for e in (0, 1, 2, 3)]
    assert {it[2]["hw"] for it in items} == {(4, 4), (3, 3)}  # mixed sizes in one batch
    images, mask, targets, t = collate_cached(items)
    assert images.shape == (4, 3, 64, 64) and t["grid"] == (4, 4)
    assert t["seqs"].shape == (4, 2, 2, 16, 32)
    assert [len(x) for x in (t["logits"], t["boxes"])] == [2, 2] and t["logits"][1].shape == (4, 10, 5)
    for b, (im, tg, it) in enumerate(items):
        h, w = it["hw"]
        grid = t["seqs"][b].reshape(2, 2, 4, 4, 32)
        assert torch.equal(grid[:, :, :h, :w].reshape(2, 2, h * w, 32), it["seqs"])
        assert not grid[:, :, h:].any() and not grid[:, :, :, w:].any()
        tm = t["token_mask"][b].reshape(4, 4)
        assert not tm[:h, :w].any() and tm.sum() == 16 - h * w
        assert torch.equal(mask[b, : im.shape[1], : im.shape[2]], torch.zeros(im.shape[1:], dtype=torch.bool))
        assert torch.equal(t["logits"][0][b], it["logits"][0]) and targets[b]["image_id"] == tg["image_id"]
    # through DataLoader workers (the file is reopened in each worker process)
    loader = DataLoader(cache, batch_size=4, num_workers=1, collate_fn=collate_cached)
    first = next(iter(loader))
    assert torch.equal(first[3]["seqs"], t["seqs"]) and torch.equal(first[0], images)
    full = TeacherCache(env.main)
    assert torch.equal(full[5][2]["seqs"][:, [0, 2]], cache[5][2]["seqs"])
    with pytest.raises(KacliError, match="layers enc4 are not in the cache|encoder layer 1..2"):
        TeacherCache(env.main, layers="enc4")
    assert full.class_index[0].tolist() == [0, 1, 2, 3] and full.class_index[1].tolist() == [4, 5, 6, 7]


# -- resume, sharding ------------------------------------------------------------------------------


@pytest.mark.slow  # a CLI subprocess
def test_kill_nine_then_rerun_equals_uninterrupted(env, cli, tmp_path):
    out = tmp_path / "killed.h5"
    args = cache_args(env, out)
    args[args.index("--workers") + 1] = "1"  # the worker path, too
    proc = subprocess.run(
        [sys.executable, "-m", "kacli", *args], env=subprocess_env(**{KILL_ENV: "3"}), capture_output=True, timeout=300
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    partial = Path(f"{out}.partial")
    assert partial.exists() and not out.exists()
    with h5py.File(partial, "r") as f:
        assert f.attrs["done_entries"] == 3 * BATCH
    res = cli(*cache_args(env, out))
    assert res.exit_code == 0, res.stderr
    assert f"resuming {partial.name} at entry 12" in res.stdout
    assert not partial.exists()
    assert_same_cache(out, env.main)


def test_unreadable_partial_starts_over(env, cli, tmp_path):
    out = tmp_path / "c.h5"
    shutil.copyfile(env.main, f"{out}.partial")
    with open(f"{out}.partial", "r+b") as f:  # as if killed during a write
        f.truncate(os.path.getsize(env.main) // 2)
    res = cli(*cache_args(env, out))
    assert res.exit_code == 0, res.stderr
    assert "starting c.h5.partial over: it is unreadable" in res.stdout
    assert_same_cache(out, env.main)


TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


@pytest.fixture(scope="module")
def dist_cache(env, tmp_path_factory):
    """The cache written by two torchrun ranks (gloo on the CPU), joined by rank 0."""
    out = tmp_path_factory.mktemp("dist") / "dist.h5"
    proc = subprocess.run(TORCHRUN_2 + ["-m", "kacli"] + cache_args(env, out), env=subprocess_env(),
                          capture_output=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    return SimpleNamespace(path=out, stdout=proc.stdout.decode())


@pytest.mark.slow  # torchrun with two processes
def test_two_ranks_equal_one(env, dist_cache):
    assert "joining 2 shards" in dist_cache.stdout
    assert sorted(p.name for p in dist_cache.path.parent.iterdir()) == ["dist.h5"]  # shards removed
    assert_same_cache(dist_cache.path, env.main)


@pytest.mark.slow
def test_every_rank_of_a_later_run_reads_its_share_of_the_one_joined_file(env, dist_cache, tmp_path):
    """Two gloo ranks open the joined cache itself (no copy), each reads its DistributedSampler
    share as the trainer draws it, in memory and from disk through a DataLoader worker; then a
    real two-rank amalgamate trains on it and leaves the file as it was."""
    joined = dist_cache.path.resolve()
    before = (joined.read_bytes(), joined.stat().st_mtime_ns)
    reader = Path(__file__).with_name("cache_rank_reader.py")
    seed, batch, workers, epoch = 7, 3, 1, 1  # 36 entries → 18 a rank → 6 whole batches
    args = [str(reader), str(joined), str(tmp_path / "read"), *map(str, (seed, batch, workers, epoch))]
    proc = subprocess.run(TORCHRUN_2 + args, env=subprocess_env(), capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    reports = [json.loads((tmp_path / "read" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world_size"]) for r in reports] == [(0, 2), (1, 2)]

    ref = TeacherCache(env.main, in_memory=False)  # the single-process cache
    want = {e: entry_digests(ref[e][0], ref[e][2]) for e in range(len(ref))}
    ref.close()
    for mode in ("memory", "disk"):
        shares = []
        for rep in reports:
            got = rep[mode]
            assert got["sampler"] == rep["memory"]["sampler"]  # both modes draw one order
            assert [x["entry"] for x in got["read"]] == got["sampler"]  # every promised entry, in its order
            assert len(got["sampler"]) == len(ref) // 2 and got["sampler"] != sorted(got["sampler"])  # shuffled
            for x in got["read"]:
                assert x["digests"] == want[x["entry"]], (mode, rep["rank"], x["entry"])  # bit-equal
            assert not got["rank_opened_file"]  # the rank itself holds no handle
            assert rep["pid"] not in {x["pid"] for x in got["read"]}  # read in the DataLoader worker
            if mode == "disk":  # the worker opened the one joined file itself
                assert {x["h5"] for x in got["read"]} == {str(joined)}
            else:  # in memory: the worker never opened the file
                assert {x["h5"] for x in got["read"]} == {None}
            shares.append(set(got["sampler"]))
        assert not shares[0] & shares[1] and shares[0] | shares[1] == set(range(len(ref)))

    run = tmp_path / "student"
    cmd = ["-m", "kacli", "amalgamate", "--cache", str(joined), "--out", str(run), "--epochs", "1", "--batch-size", "3",
           "--device", "cpu"]  # fmt: skip
    proc = subprocess.run(TORCHRUN_2 + cmd, env=subprocess_env(), capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    assert proc.stdout.decode().count("student (ka)") == 1  # one summary table, rank 0's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["read", "student"]  # one run folder
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(row["epoch"], row["steps"]) for row in rows] == [(1, 6)]  # 36 entries / (2 ranks × 3)
    assert (run / "last.pt").is_file()
    assert sorted(p.name for p in joined.parent.iterdir()) == ["dist.h5"]  # no copy, no partial, no lock file
    assert (joined.read_bytes(), joined.stat().st_mtime_ns) == before


# -- existing outputs ------------------------------------------------------------------------------


def test_existing_output_up_to_date_other_teachers_and_force(env, cli, tmp_path):
    out = tmp_path / "c.h5"
    shutil.copyfile(env.main, out)
    before = out.read_bytes()
    res = cli(*cache_args(env, out))
    assert res.exit_code == 0 and "is up to date" in res.stdout
    other = make_teacher(tmp_path / "other.pt", env.maps[1], 99, AUG16)
    res = cli(*cache_args(env, out, env.teachers[0], other))
    assert_one_line_error(res, "output exists and was made for other teachers", "--force")
    res = cli(*cache_args(env, out, extra=["--layers", "proj"]))
    assert_one_line_error(res, "other settings (layers")
    assert out.read_bytes() == before  # nothing lost
    res = cli(*cache_args(env, out, env.teachers[0], other, extra=["--force"]))
    assert res.exit_code == 0, res.stderr
    with h5py.File(out, "r") as f:
        assert schema.read_attrs(f)["teachers"][1]["sha256"] == schema_sha(other)
    junk = tmp_path / "junk.h5"
    junk.write_text("not a cache")
    assert_one_line_error(cli(*cache_args(env, junk)), "output exists and is not a complete kacli cache")


# -- bad input -------------------------------------------------------------------------------------


def test_teacher_checks(env, cli, tmp_path):
    t0, t1 = env.teachers
    out = tmp_path / "x.h5"
    assert_one_line_error(cli(*cache_args(env, out, t1, t0)), "t1.pt", "wrong order", "convex, concave")
    assert_one_line_error(cli(*cache_args(env, out, t0)), "one --teacher per task", "got 1")
    bad_map = make_teacher(tmp_path / "bad.pt", {"ids": [1, 2, 3], "names": ["circle", "square", "triangle"]}, 0, AUG16)
    assert_one_line_error(cli(*cache_args(env, out, t0, bad_map)), "bad.pt", "is not task 'concave'")
    narrow = make_teacher(tmp_path / "narrow.pt", env.maps[1], 0, AUG16, d_model=16)
    assert_one_line_error(cli(*cache_args(env, out, t0, narrow)), "narrow.pt", "d_model 16 differs from teacher 1's")
    shallow = make_teacher(tmp_path / "shallow.pt", env.maps[1], 0, AUG16, enc_layers=1)
    assert_one_line_error(cli(*cache_args(env, out, t0, shallow)), "shallow.pt", "encoder depth 1 differs")
    assert_one_line_error(cli(*cache_args(env, out, extra=["--layers", "proj,3"])), "encoder layer 1..2")
    assert not out.exists() and not Path(f"{out}.partial").exists()


def test_reader_and_cache_info_refuse_foreign_and_truncated_files(env, cli, tmp_path):
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f.create_dataset("x", data=[1, 2, 3])
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(env.main.read_bytes()[: env.main.stat().st_size // 2])
    text = tmp_path / "text.h5"
    text.write_text("hello")
    partial = tmp_path / "partial.h5"
    shutil.copyfile(env.main, partial)
    with h5py.File(partial, "r+") as f:
        f.attrs["done_entries"] = 8
    cases = [(foreign, "not a kacli teacher cache"), (truncated, "truncated HDF5 file"), (text, "not an HDF5 file"),
             (partial, "incomplete cache: 8 of 36 entries")]  # fmt: skip
    for path, needle in cases:
        with pytest.raises(KacliError, match=needle):
            TeacherCache(path)
        if path is not partial:
            assert_one_line_error(cli("cache-info", path), path.name, needle)
    assert_one_line_error(cli("cache-info", partial, "--verify"), "incomplete cache")
    res = cli("cache-info", partial)  # a partial file is summarised, not refused
    assert res.exit_code == 0 and "INCOMPLETE: 8 of 36" in res.stdout


def test_cache_info_verify(env, cli, tmp_path):
    res = cli("cache-info", env.main, "--verify", "--teacher", env.teachers[0], "--teacher", env.teachers[1])
    assert res.exit_code == 0, res.stderr
    assert "verified" in res.stdout and "sha256 match" in res.stdout
    res = cli("cache-info", env.main, "--json")
    import json

    s = json.loads(res.stdout)
    assert s["entries"] == 36 and s["complete"] and s["layers"] == LAYERS
    with h5py.File(env.main, "r") as f:
        assert s["tokens"]["total"] == int(f["offsets"][-1]) == int(np.prod(f["entries/hw"][...], axis=1).sum())
    assert s["bytes_per_entry"] == pytest.approx(env.main.stat().st_size / 36)
    res = cli("cache-info", env.main, "--verify", "--teacher", env.teachers[1], "--teacher", env.teachers[0])
    assert_one_line_error(res, "verification failed", "teacher 1 (t1.pt) is not the checkpoint")
    broken = tmp_path / "nan.h5"
    shutil.copyfile(env.main, broken)
    with h5py.File(broken, "r+") as f:
        f["teachers/1/seq/enc1"][5, 3] = np.nan
    assert_one_line_error(cli("cache-info", broken, "--verify"), "/teachers/1/seq/enc1 holds 1 non-finite values")
    with h5py.File(broken, "r+") as f:
        f["teachers/1/seq/enc1"][5, 3] = 0
        f["entries/hw"][0] = [4, 3]
    with pytest.raises(KacliError, match="entry 0: offsets give 16 tokens, hw says"):
        TeacherCache(broken)


def test_reader_checks_the_manifest(env, tmp_path):
    moved = tmp_path / "tasks.yaml"
    moved.write_text(env.tasks.read_text() + "\n# edited\n")
    with pytest.raises(KacliError, match="tasks.yaml differs from the one the cache"):
        TeacherCache(env.main, tasks=moved)


def test_the_manifest_check_names_the_manifest_and_says_what_is_wrong(env, tmp_path):
    """One check for amalgamate and TeacherCache: the given or recorded tasks.yaml must hash to the
    cache's tasks_sha256."""
    with h5py.File(env.main, "r") as f:
        attrs = schema.read_attrs(f)
    assert cache_manifest(attrs, env.main).sha256 == attrs["tasks_sha256"]
    edited = tmp_path / "tasks.yaml"
    edited.write_text(env.tasks.read_text() + "\n# edited\n")
    with pytest.raises(KacliError, match="another task manifest than " + re.escape(str(attrs["tasks_path"]))) as e:
        cache_manifest(attrs, env.main, edited)
    assert e.value.path == str(edited)
    with pytest.raises(KacliError, match="it has changed since") as e:
        cache_manifest({**attrs, "tasks_path": str(edited)}, env.main)
    assert e.value.path == str(edited)
    with pytest.raises(KacliError, match="does not name its tasks.yaml; pass --tasks"):
        cache_manifest({k: v for k, v in attrs.items() if k != "tasks_path"}, env.main)


def test_a_locked_cache_is_one_line_naming_the_way_out(env, tmp_path):
    """A file another process holds open for writing: one line, which also names the switch for
    filesystems without locks."""
    path = tmp_path / "held.h5"
    shutil.copyfile(env.main, path)
    hold = "import h5py, sys, time; f = h5py.File(sys.argv[1], 'a'); print('open', flush=True); time.sleep(120)"
    holder = subprocess.Popen([sys.executable, "-c", hold, str(path)], stdout=subprocess.PIPE, env=subprocess_env())
    try:
        assert holder.stdout.readline().strip() == b"open"
        with pytest.raises(KacliError, match=r"locked by another process .*HDF5_USE_FILE_LOCKING=FALSE") as e:
            TeacherCache(path)
        assert "\n" not in str(e.value) and "held.h5" in str(e.value)
    finally:
        holder.kill()
        holder.wait()
