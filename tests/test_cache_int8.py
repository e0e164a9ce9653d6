"""int8 teacher caches: the round trip on real teacher outputs, the reader, resume, shards,
cache-info --verify, the bytes against float16, --estimate, and the bad input.

Built on test_cache.py's data and random tiny teachers (its ``env`` fixture)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import assert_one_line_error
from kacli.cache import schema
from kacli.cache.output import join_shards, write_range
from kacli.cache.plan import CacheJob, plan_entries, shard_plan
from kacli.cache.reader import TeacherCache, collate_cached
from kacli.cli import app
from kacli.data.dataset import CocoDetection
from kacli.data.transforms import AUG_PRESETS
from kacli.errors import KacliError
from kacli.models.config import model_config
from kacli.teachers.load import load_teachers
from kacli.teachers.quant import dequantize_teacher, quantize_int8
from test_cache import AUG16, BATCH, LAYERS, VIEWS, assert_same_cache, cache_args, env, make_teacher  # noqa: F401


@pytest.fixture(scope="module")
def caches(env):  # noqa: F811
    """The same teachers and entries stored as float32 and as int8."""
    out = {}
    for dt in ("float32", "int8"):
        path = env.root / f"{dt}.h5"
        res = CliRunner().invoke(app, cache_args(env, path, extra=["--dtype", dt]), catch_exceptions=False)
        assert res.exit_code == 0, res.stdout + res.stderr
        out[dt] = path
    return out


def raw(path: Path, k: int, layer: str, a: int, b: int):
    """Rows a:b of teacher k's stored int8 layer and its scales, straight from HDF5."""
    with h5py.File(path, "r") as f:
        j = schema.read_attrs(f)["layers"].index(layer)
        return torch.from_numpy(f[schema.seq_path(k, layer)][a:b]), torch.from_numpy(f[schema.scale_path(k)][a:b, j])


# -- the storage -------------------------------------------------------------------------------------


def test_quantize_bounds_and_zero_rows():
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.54, 0.3], [1e-30, -1e-30, 0.0]])
    q, s = quantize_int8(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float16 and s.shape == (3,)
    assert s[0] == 0 and not q[0].any()  # an all-zero row: scale 0, no NaN
    assert q[1].tolist() == [50, -127, 15] and s[1].item() == pytest.approx(2.54 / 127, rel=2**-10)
    assert torch.isfinite(q.float() * s[:, None]).all()
    assert not q[2].any() and 0 < s[2] <= 6e-8  # far below float16's range: the smallest scale, reads 0


def test_float16_scales_are_rounded_up_so_nothing_is_clipped():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 64, generator=g) * torch.logspace(-3, 4, 4096)[:, None]  # rows over 7 decades
    q, s = quantize_int8(x)
    exact = x.abs().amax(-1) / 127
    s32 = s.float()
    # rounded up, by less than one float16 step: 2^-10 relative, 2^-24 below float16's normal range
    assert (s32 >= exact).all() and (s32 - exact <= torch.maximum(exact * 2**-10, torch.tensor(2**-24))).all()
    assert (x.abs() / s32[:, None] <= 127).all()  # so no value needs the clamp
    err = (q.float() * s32[:, None] - x).abs()
    assert (err <= s32[:, None] / 2 * (1 + 1e-6)).all()  # round to nearest: within half a step
    big, inf = quantize_int8(torch.tensor([[9e6, 1.0], [float("nan"), 1.0]]))[1]
    assert torch.isinf(big) and torch.isnan(inf)  # beyond 127 x float16's range, or NaN: non-finite, refused on read


def test_int8_round_trip_on_real_teacher_outputs(caches):
    """Every dequantised value is within half its row's scale (max|x|/254) of the float32 value
    the same teachers wrote; the logits and boxes are the float32 ones, bit for bit."""
    f32, i8 = TeacherCache(caches["float32"]), TeacherCache(caches["int8"])
    worst, rounded = 0.0, 0
    for e in range(len(f32)):
        x, y = f32.teacher_entry(e), i8.teacher_entry(e)
        assert y["seqs"].dtype == torch.float32 and y["seqs"].shape == x["seqs"].shape
        bound = x["seqs"].abs().amax(-1, keepdim=True) / 254 * (1 + 2**-10)  # (N, L, n, 1); float16 scale rounded up
        err = (x["seqs"] - y["seqs"]).abs()
        worst = max(worst, float((err / bound).max()))
        rounded += int((err > 0).sum())
        for key in ("logits", "boxes"):
            assert all(torch.equal(a, b) for a, b in zip(x[key], y[key]))
    assert 0.45 < worst <= 1 + 1e-5  # the bound holds, and is nearly reached (rounding to nearest)
    assert rounded > 1000  # it really was quantised


def test_reader_returns_q_times_scale_and_int8_batches_dequantise_to_the_same(caches):
    path = caches["int8"]
    cache = TeacherCache(path, in_memory=False)
    stored = TeacherCache(path, layers="proj,2", dequantize=False, in_memory=False)
    stored_mem = TeacherCache(path, layers="proj,2", dequantize=False, in_memory=True)
    for e in (0, 7, 35):
        a, b = int(cache.offsets[e]), int(cache.offsets[e + 1])
        t, s, m = cache.teacher_entry(e), stored.teacher_entry(e), stored_mem.teacher_entry(e)
        for k in range(2):
            for j, layer in enumerate(LAYERS):
                q, scale = raw(path, k, layer, a, b)
                assert torch.equal(t["seqs"][k, j], q.float() * scale[:, None])
            for j, layer in enumerate(["proj", "enc2"]):  # a subset of the layers: their scale columns
                q, scale = raw(path, k, layer, a, b)
                for item in (s, m):
                    assert item["seqs"].dtype == torch.int8 and torch.equal(item["seqs"][k, j], q)
                    assert torch.equal(item["seq_scale"][k, j], scale.float())
    # collate carries int8 and scales (zeros at padding); dequantize_teacher gives the float batch
    items = [stored[e] for e in range(4)]
    _, _, _, teacher = collate_cached(items)
    assert teacher["seqs"].dtype == torch.int8 and teacher["seq_scale"].shape == (4, 2, 2, 16)
    assert not teacher["seq_scale"][teacher["token_mask"][:, None, None].expand(-1, 2, 2, -1)].any()
    floats = dequantize_teacher(teacher)
    assert "seq_scale" not in floats and floats["seqs"].dtype == torch.float32
    expect = collate_cached([TeacherCache(path, layers="proj,2")[e] for e in range(4)])[3]["seqs"]
    assert torch.equal(floats["seqs"], expect)
    assert dequantize_teacher(collate_cached([cache[0]])[3])["seqs"].dtype == torch.float32  # float: as it is


# -- resume, shards, verify ------------------------------------------------------------------------


def test_int8_resume_rewrites_the_rest_equal_to_uninterrupted(env, caches, cli, tmp_path):  # noqa: F811
    out = tmp_path / "c.h5"
    partial = Path(f"{out}.partial")
    shutil.copyfile(caches["int8"], partial)
    with h5py.File(partial, "r+") as f:  # as if stopped after 3 batches: the rest is garbage
        r0 = int(f["offsets"][3 * BATCH])
        f.attrs["done_entries"] = 3 * BATCH
        for k in range(2):
            f[schema.scale_path(k)][r0:] = 7.0
            for layer in LAYERS:
                f[schema.seq_path(k, layer)][r0:] = 99
    res = cli(*cache_args(env, out, extra=["--dtype", "int8"]))
    assert res.exit_code == 0, res.stderr
    assert f"resuming {partial.name} at entry {3 * BATCH}" in res.stdout
    assert_same_cache(out, caches["int8"])


def test_int8_rank_shards_join_into_the_single_process_file(env, caches, tmp_path):  # noqa: F811
    """Two ranks' shards (as torchrun's ranks write them) joined by rank 0's join_shards."""
    with h5py.File(caches["int8"], "r") as f:
        attrs = {k: v for k, v in schema.read_attrs(f).items() if k not in ("created", "done_entries")}
    teachers = load_teachers(env.manifest, env.teachers)
    ids = attrs["label_map"]["ids"]
    base = CocoDetection(env.manifest.split_json("train"), env.manifest.image_root("train"), ids, train=False, aug=AUG16)
    plan = plan_entries(base, AUG16, VIEWS, 0, 16)
    data = CocoDetection(base.json_path, base.image_root, ids, train=False, aug=AUG16, views=plan.view_list())
    chunk = schema.chunk_rows(plan.tokens, 32, 1)
    out = tmp_path / "joined.h5"
    shards = shard_plan(attrs, plan.tokens, -(-plan.entries // BATCH), BATCH, 2, out)
    assert len(shards) == 2
    job = CacheJob(plan, teachers, LAYERS, "int8", BATCH, chunk, data, torch.device("cpu"), 0, lambda m: None, False)
    for sh in shards:
        s = sh["attrs"]["shard"]
        write_range(job, sh["path"], sh["attrs"], s["start"], s["end"], "test")
    join_shards(job, Path(f"{out}.partial"), shards, attrs)
    os.replace(f"{out}.partial", out)
    assert_same_cache(out, caches["int8"])


def test_int8_caches_with_float32_scales_still_read(caches, cli, tmp_path):
    """int8 caches written before the scales were float16 hold float32 ones: read and verified alike."""
    old = tmp_path / "old.h5"
    shutil.copyfile(caches["int8"], old)
    with h5py.File(old, "r+") as f:
        for k in range(2):
            s = f[schema.scale_path(k)][...]
            del f[schema.scale_path(k)]
            f.create_dataset(schema.scale_path(k), data=s.astype(np.float32))
    new, before = TeacherCache(caches["int8"]), TeacherCache(old)
    for e in (0, 17, 35):
        assert torch.equal(new.teacher_entry(e)["seqs"], before.teacher_entry(e)["seqs"])
    res = cli("cache-info", old, "--verify", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["verify"]["ok"], res.stderr
    with h5py.File(old, "r+") as f:
        s = f[schema.scale_path(1)][...]
        del f[schema.scale_path(1)]
        f.create_dataset(schema.scale_path(1), data=s.astype(np.float64))
    with pytest.raises(KacliError, match="/teachers/1/scale is float64, expected float16"):
        TeacherCache(old)


def test_cache_info_verify_int8(caches, cli, tmp_path):
    res = cli("cache-info", caches["int8"], "--verify", "--json")
    assert res.exit_code == 0, res.stderr
    s = json.loads(res.stdout)
    assert s["dtype"] == "int8" and s["verify"]["ok"]
    with h5py.File(caches["int8"], "r") as f:
        T = int(f["offsets"][-1])
        scales = f[schema.scale_path(0)].id.get_storage_size()
        values = sum(f[schema.seq_path(0, n)].id.get_storage_size() for n in LAYERS)
    assert s["teachers"][0]["sequence_bytes"] == values + scales  # int8 values + float16 scales (whole chunks)
    assert values >= T * 3 * 32 and scales >= T * 3 * 2
    for edit, needle in (
        (lambda f: f[schema.scale_path(1)].__setitem__((5, 2), np.nan), "/teachers/1/scale holds 1 non-finite values"),
        (lambda f: f[schema.scale_path(0)].__setitem__((3, 0), -0.5), "/teachers/0/scale holds 1 negative scales"),
        (lambda f: f[schema.seq_path(0, "enc1")].__setitem__((4, 1), -128), "/teachers/0/seq/enc1 holds 1 int8 values of -128"),
    ):
        broken = tmp_path / "broken.h5"
        shutil.copyfile(caches["int8"], broken)
        with h5py.File(broken, "r+") as f:
            edit(f)
        assert_one_line_error(cli("cache-info", broken, "--verify"), "verification failed", needle)


# -- size -----------------------------------------------------------------------------------------


def test_int8_file_of_tiny_teachers_is_at_most_055_of_float16(env, cli, tmp_path):  # noqa: F811
    """The ``tiny`` preset (d 64, proj + 3 encoder layers), 128-px evaluation views (8×8 tokens)."""
    aug = dataclasses.replace(AUG_PRESETS["demo"], scales=(128,), max_size=128, crop_scales=(128,), crop_min=128,
                              crop_max=128, eval_size=128)  # fmt: skip
    cfg = model_config("tiny").to_dict()
    teachers = [make_teacher(tmp_path / f"tiny{k}.pt", lm, k, aug, **cfg) for k, lm in enumerate(env.maps)]
    size = {}
    for dt in ("float16", "int8"):
        out = tmp_path / f"{dt}.h5"
        res = cli(*cache_args(env, out, *teachers, extra=["--dtype", dt, "--views", "4", "--batch-size", "12"]))
        assert res.exit_code == 0, res.stderr
        size[dt] = out.stat().st_size
        with h5py.File(out, "r") as f:
            a = schema.read_attrs(f)
            assert a["d_model"] == 64 and len(a["layers"]) == 4 and a["total_tokens"] == 48 * 64
            est = schema.estimate_bytes(a["total_tokens"], 48, 64, 4, [(5, 4), (5, 4)], dt)
        assert est < size[dt] < est + 64 * 1024  # the size formula, scales included
    assert size["int8"] <= 0.55 * size["float16"], size["int8"] / size["float16"]


# -- content identity, --estimate, bad input --------------------------------------------------------


def test_the_storage_scheme_is_part_of_the_content(env, caches, cli, tmp_path):  # noqa: F811
    ids = {}
    for dt, path in caches.items():
        with h5py.File(path, "r") as f:
            ids[dt] = schema.content_id(schema.read_attrs(f), 1000)  # same size: only the scheme differs
    assert ids["int8"] != ids["float32"]
    out = tmp_path / "c.h5"
    shutil.copyfile(caches["int8"], out)
    assert "is up to date" in cli(*cache_args(env, out, extra=["--dtype", "int8"])).stdout
    res = cli(*cache_args(env, out, extra=["--dtype", "float16"]))
    assert_one_line_error(res, "c.h5", 'other settings (dtype: "int8" there, "float16" here)')


def test_estimate_prints_every_scheme_and_writes_nothing(env, caches, cli, tmp_path):  # noqa: F811
    out = tmp_path / "new" / "c.h5"
    res = cli(*cache_args(env, out, extra=["--estimate", "--dtype", "int8", "--json"]))
    assert res.exit_code == 0, res.stderr
    s = json.loads(res.stdout)
    assert s["status"] == "estimate" and s["bytes"] is None and s["free_bytes"] == shutil.disk_usage(tmp_path).free
    assert not (tmp_path / "new").exists()
    for dt in ("float16", "float32", "int8"):
        with h5py.File(caches.get(dt, env.main), "r") as f:
            assert s["estimates"][dt] == schema.estimate_bytes(
                int(f["offsets"][-1]), 36, 32, 3, [(10, 4), (10, 4)], dt)  # fmt: skip
        written = (caches.get(dt) or env.main).stat().st_size
        assert s["estimates"][dt] < written < s["estimates"][dt] + 64 * 1024
    # an existing cache is left as it is; the table names each scheme and the free disk
    before = env.main.read_bytes()
    res = cli(*cache_args(env, env.main, extra=["--estimate"]))
    assert res.exit_code == 0 and env.main.read_bytes() == before
    assert "nothing written" in res.stdout and "int8" in res.stdout and "free disk" in res.stdout


def test_unknown_dtype_and_unknown_storage_scheme(env, caches, cli, tmp_path):  # noqa: F811
    out = tmp_path / "x.h5"
    res = cli(*cache_args(env, out, extra=["--dtype", "int4"]))
    assert_one_line_error(res, "--dtype must be one of float16, float32, int8", "'int4'")
    assert list(tmp_path.iterdir()) == []
    future = tmp_path / "future.h5"
    shutil.copyfile(caches["int8"], future)
    with h5py.File(future, "r+") as f:
        f.attrs["dtype"] = "int4-grouped"
    before = future.read_bytes()
    needle = "cache storage scheme (dtype) 'int4-grouped' is not known to kacli"
    assert_one_line_error(cli("cache-info", future), "future.h5", needle, "it reads float16, float32, int8")
    assert_one_line_error(cli("cache-info", future, "--verify"), needle)
    with pytest.raises(KacliError, match=r"storage scheme \(dtype\) 'int4-grouped'"):
        TeacherCache(future)
    res = cli(*cache_args(env, future, extra=["--dtype", "int8"]))
    assert_one_line_error(res, "future.h5", "output exists and is not a complete kacli cache", needle)
    assert future.read_bytes() == before  # nothing destroyed
