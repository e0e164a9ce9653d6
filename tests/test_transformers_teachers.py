"""Teachers from other tools: a transformers ``save_pretrained`` folder of any DETR-family detector.

For every family the pinned transformers builds offline (tests/hf_tiny.py), a tiny random model
is saved with its image processor, cached with kacli beside a kacli teacher, and the cache is
checked against transformers itself on the same image: its boxes (≤ 0.01 px) and its class
probabilities through the rule of :mod:`kacli.teachers.labels` (≤ 1e-4), and kacli's detections
of the folder against the processor's own ``post_process_object_detection``. The images are 64 px
and every model's processor keeps them at 64 px, so both sides see the same pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import pytest
import torch

pytest.importorskip("transformers")

from conftest import assert_one_line_error  # noqa: E402
from hf_tiny import AIFI, FAMILIES, SEQUENCE, processor, save_tiny  # noqa: E402
from kacli.cache.reader import TeacherCache, collate_cached  # noqa: E402
from kacli.cache.writer import cache_teachers  # noqa: E402
from kacli.data.demo_data import make_demo_data  # noqa: E402
from kacli.data.manifest import TaskManifest  # noqa: E402
from kacli.data.split import split_tasks  # noqa: E402
from kacli.data.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from kacli.models.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from kacli.models.config import model_config  # noqa: E402
from kacli.models.detr import DETR  # noqa: E402
from kacli.models.postprocess import postprocess  # noqa: E402
from kacli.teachers.load import load_teachers  # noqa: E402
from kacli.teachers.online import OnlineTeachers  # noqa: E402

SIDE = 64
MODEL = {"backbone": "tiny", "tiny_widths": [8, 8, 16, 16], "d_model": 32, "nheads": 4, "enc_layers": 2,
         "dec_layers": 1, "dim_feedforward": 64, "dropout": 0.0, "num_queries": 6, "pre_norm": True}
AUG = {"scales": [48, 64], "max_size": SIDE, "crop_scales": [64], "crop_min": 48, "crop_max": 64, "crop_p": 0.0,
       "flip_p": 0.5, "eval_size": SIDE}
TRAIN = {"epochs": 1, "batch_size": 4, "lr": 1e-3, "lr_backbone": 1e-3, "lr_drop": 1000, "workers": 0,
         "eval_every": 100, "seed": 0}
QUIET = dict(views=1, dtype="float32", batch_size=4, workers=0, device="cpu", log=lambda *a, **k: None, progress=False)


def _kacli_teacher(path: Path, label_map: dict, seed: int) -> Path:
    cfg = model_config(MODEL)
    torch.manual_seed(seed)
    model = DETR(cfg, len(label_map["ids"]))
    save_checkpoint(path, {"kind": "detr", "arch": cfg.to_dict(), "label_map": label_map, "task": None,
                           "model": model.state_dict(), "config": {"model": cfg.to_dict(), "aug": AUG, "train": TRAIN}})
    return path


def _id2label(task_names: list[str]) -> dict[int, str]:
    """The task's classes in reverse order, an unnamed slot (``N/A``) and a class no task has."""
    names = list(reversed(task_names))
    return {0: names[0], 1: "N/A", 2: "unicorn", **{3 + k: n for k, n in enumerate(names[1:])}}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Six 64-px demo images in two tasks and a tiny kacli teacher of the second task."""
    root = tmp_path_factory.mktemp("hf")
    make_demo_data(root / "data", train_images=6, val_images=2, test_images=2, seed=3, size=SIDE, progress=False)
    split_tasks(str(root / "data" / "train.json"), str(root / "data" / "val.json"),
                str(root / "data" / "tasks-2.yaml"), root / "tasks", test_spec=str(root / "data" / "test.json"))
    manifest = TaskManifest(root / "tasks")
    maps = [t.label_map() for t in manifest.tasks]
    kacli_t = _kacli_teacher(root / "t1.pt", maps[1], 1)
    return {"root": root, "manifest": manifest, "maps": maps, "kacli": kacli_t,
            "id2label": _id2label(manifest.tasks[0].category_names)}


#: The kacli teacher's encoder (d_model, layers, stride): a single-scale folder's matches it, and so
#: does a hybrid encoder's AIFI level (width, stride), so their sequences guide the student.
KACLI_ENCODER = (MODEL["d_model"], MODEL["enc_layers"], 16)


def _folder(env, family: str, name: str | None = None, seed: int = 0) -> tuple[Path, torch.nn.Module]:
    folder = env["root"] / (name or family)
    if not folder.exists():
        save_tiny(folder, family, env["id2label"], seed=seed, side=SIDE, encoder=KACLI_ENCODER)
    from transformers import AutoModelForObjectDetection

    return folder, AutoModelForObjectDetection.from_pretrained(folder, local_files_only=True).eval()


def _pixels(view: torch.Tensor) -> torch.Tensor:
    """A kacli view (normalised with ImageNet's statistics) back to its uint8 image."""
    x = view * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    return (x * 255).round().clamp(0, 255).to(torch.uint8)


def _rule(logits: torch.Tensor, family: str, task_slots: list[int], named: list[int]) -> torch.Tensor:
    """The documented distribution over the task's classes + no object, from transformers' own
    logits (Q, K[+1]): a softmax's task classes keep their probability, the rest is no object; a
    sigmoid's task classes are normalised by max(1, Σp), no object 1 − Σq (teachers/labels.py)."""
    if family in ("detr", "yolos"):
        p = logits.softmax(-1)
        q = p[:, task_slots]
        return torch.cat([q, 1 - q.sum(-1, keepdim=True)], -1)
    p = logits.sigmoid()[:, task_slots]
    q = p / p.sum(-1, keepdim=True).clamp(min=1)
    return torch.cat([q, (1 - q.sum(-1, keepdim=True)).clamp(min=1e-12)], -1)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_outputs_are_transformers_own(env, family):
    folder, model = _folder(env, family)
    out = env["root"] / f"{family}.h5"
    cache_teachers(env["manifest"].path, [folder, env["kacli"]], out, **QUIET)
    cache = TeacherCache(out)
    task = env["manifest"].tasks[0]
    id2label = env["id2label"]
    slot_of = {n: k for k, n in id2label.items()}
    task_slots = [slot_of[n] for n in task.category_names]
    named = [k for k, n in sorted(id2label.items()) if n != "N/A"]
    proc = processor(family, SIDE)
    # what the cache says about the teacher
    t0, t1 = cache.layout.teachers
    sa = family in SEQUENCE or family in AIFI  # sequences cached too: every layer, or the last (the AIFI output)
    assert (t0["kind"], t0["arch"], t0["sequences"]) == ("transformers", family, sa)
    last = f"enc{MODEL['enc_layers']}"
    assert t0.get("layers") == ([last] if family in AIFI else None)
    assert t0["classifier"] == ("softmax" if family in ("detr", "yolos") else "sigmoid")
    assert t0["transformers_version"] and t0["family"]
    assert t1.get("kind", "kacli") == "kacli" and cache.layout.seq_teachers == ([0, 1] if sa else [1])
    with h5py.File(out) as f:
        assert ("seq" in f["teachers/0"]) == sa and "seq" in f["teachers/1"]
        if family in AIFI:  # the AIFI output only
            assert sorted(f["teachers/0/seq"]) == ["enc2"]
    assert cache.present == ([[False, False, True], [True, True, True]] if family in AIFI else [[True] * 3] * (1 + sa))
    worst = {"box_px": 0.0, "prob": 0.0, "pp_score": 0.0, "pp_box": 0.0, "seq": 0.0}
    compared = 0
    folder_model = load_teachers(env["manifest"], [folder, env["kacli"]])[0].model
    for e in range(len(cache)):
        image, _, entry = cache[e]
        assert tuple(image.shape) == (3, SIDE, SIDE)  # the eval view: the image itself
        assert entry["seqs"].shape[0] == (2 if sa else 1)  # the kacli teacher's sequences, and the folder's
        inputs = proc(images=_pixels(image), return_tensors="pt")
        assert tuple(inputs["pixel_values"].shape[-2:]) == (SIDE, SIDE)
        with torch.no_grad():
            ref = model(pixel_values=inputs["pixel_values"], output_hidden_states=sa)
        if family in SEQUENCE:  # proj, enc1, enc2: the input projection's output and each encoder layer's, row-major tokens
            states = torch.stack([x[0] for x in ref.encoder_hidden_states])
            assert entry["seqs"][0].shape == states.shape == (3, (SIDE // 16) ** 2, MODEL["d_model"])
            worst["seq"] = max(worst["seq"], float((entry["seqs"][0] - states).abs().max()))
        if family in AIFI:  # enc2 (the last): the AIFI output F5; proj and enc1: none
            level, f5 = (x[0].flatten(1).T for x in ref.encoder_hidden_states)  # (d, h, w) → (h·w, d) row-major
            assert level.shape == f5.shape == ((SIDE // 16) ** 2, MODEL["d_model"])
            got = entry["seqs"][0]
            assert bool((got[:2] == 0).all())  # layers it does not give
            worst["seq"] = max(worst["seq"], float((got[2] - f5).abs().max()))
        box = (entry["boxes"][0] - ref.pred_boxes[0]).abs().max() * SIDE
        prob = (entry["logits"][0].softmax(-1) - _rule(ref.logits[0], family, task_slots, named)).abs().max()
        worst["box_px"], worst["prob"] = max(worst["box_px"], float(box)), max(worst["prob"], float(prob))
        # kacli's detections of the folder (eval's path) hold every one of transformers' own of a named class
        pp = proc.post_process_object_detection(ref, threshold=0.0, target_sizes=[(SIDE, SIDE)])[0]
        ours = postprocess(folder_model(image[None], torch.zeros(1, SIDE, SIDE, dtype=torch.bool)),
                           torch.tensor([[SIDE, SIDE]]), folder_model.classifier)[0]
        our_slots = torch.tensor(named)[ours["labels"]]
        kept = [i for i, lab in enumerate(pp["labels"].tolist()) if lab in named]
        compared += len(kept)
        for i in kept:
            same = our_slots == pp["labels"][i]
            ds = (ours["scores"][same] - pp["scores"][i]).abs()
            db = (ours["boxes"][same] - pp["boxes"][i]).abs().max(-1).values
            j = int((ds + db).argmin())
            worst["pp_score"] = max(worst["pp_score"], float(ds[j]))
            worst["pp_box"] = max(worst["pp_box"], float(db[j]))
    assert compared >= 5  # transformers' detections of the named classes, each found in kacli's
    assert worst["box_px"] <= 0.01 and worst["prob"] <= 1e-4 and worst["seq"] <= 1e-4, worst
    assert worst["pp_score"] <= 1e-4 and worst["pp_box"] <= 0.01, worst


def _mixed(env, family: str) -> dict:
    """A cache of a ``family`` folder (first task) and the kacli teacher (second task)."""
    folder, _ = _folder(env, family)
    out = env["root"] / f"mixed-{family}.h5"
    if not out.exists():
        cache_teachers(env["manifest"].path, [folder, env["kacli"]], out, **QUIET)
    return {"folder": folder, "cache": out}


@pytest.fixture(scope="module")
def mixed(env):
    """A Deformable DETR folder (TA only) and the kacli teacher, cached."""
    return _mixed(env, "deformable_detr")


@pytest.mark.parametrize("family", ["rt_detr", "detr", "deformable_detr"])
def test_online_transformers_teacher_gives_the_cached_outputs(env, family):
    folders = _mixed(env, family)
    cache = TeacherCache(folders["cache"])
    images, mask, _, teacher = collate_cached([cache[i] for i in range(4)])
    online = OnlineTeachers.from_teachers(load_teachers(env["manifest"], [folders["folder"], env["kacli"]]),
                                          cache.layer_names)
    run = online(images, mask)
    sa = family in SEQUENCE or family in AIFI
    assert run["seqs"].shape == teacher["seqs"].shape and run["seqs"].shape[1] == (2 if sa else 1)
    torch.testing.assert_close(run["seqs"], teacher["seqs"], rtol=1e-5, atol=1e-5)
    for k in range(2):
        torch.testing.assert_close(run["logits"][k], teacher["logits"][k], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(run["boxes"][k], teacher["boxes"][k], rtol=1e-5, atol=1e-5)
    assert not any(m.training for m in online.modules())


def test_cli_cache_info_amalgamate_eval_predict_with_a_folder(cli, env, mixed, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    r = cli("cache-info", mixed["cache"])
    assert r.exit_code == 0, r.stderr
    assert "TA only" in r.stdout and "SA+TA" in r.stdout and "deformable_detr (transformers " in r.stdout and "short side 64" in r.stdout
    r = cli("cache-info", mixed["cache"], "--json")
    teachers = json.loads(r.stdout)["teachers"]
    assert [(t["kind"], t["teaches"], t["sequence_bytes"] == 0) for t in teachers] == [
        ("transformers", "TA only", True), ("kacli", "SA+TA", False)]
    r = cli("cache-info", mixed["cache"], "--verify", "--teacher", mixed["folder"], "--teacher", env["kacli"])
    assert r.exit_code == 0 and "teachers' sha256 match" in r.stdout, r.stderr  # the folder's hash
    run = tmp_path / "student"
    r = cli("amalgamate", "--cache", mixed["cache"], "--out", run, "--epochs", 1, "--device", "cpu")
    assert r.exit_code == 0, r.stderr
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"loss_seq", "loss_task", "loss_d"} <= set(row)
    ck = load_checkpoint(run / "last.pt")
    assert ck["arch"]["num_parts"] == 1  # one part: the kacli teacher's (the folder has no sequences)
    # online, the same folder
    r = cli("amalgamate", "--tasks", env["manifest"].path, "--teacher", mixed["folder"], "--teacher", env["kacli"],
            "--out", tmp_path / "online", "--epochs", 1, "--device", "cpu")
    assert r.exit_code == 0, r.stderr
    assert load_checkpoint(tmp_path / "online" / "last.pt")["meta"]["online"]["teachers"][0]["checkpoint"] == str(
        mixed["folder"].resolve())
    # eval: the folder beside the student, in one table
    r = cli("eval", "--model", mixed["folder"], "--model", run, "--tasks", env["manifest"].path,
            "--json", tmp_path / "eval.json")
    assert r.exit_code == 0, r.stderr
    members = json.loads((tmp_path / "eval.json").read_text())["members"]
    assert members[0]["kind"] == "transformers" and members[0]["family"] == "Deformable DETR"
    assert members[0]["split"] == "test" and members[0]["model"] == "deformable_detr" and 0 <= members[0]["AP"] <= 1
    # predict draws the folder's boxes with its class names
    image = next((env["root"] / "data").rglob("*.png"))
    r = cli("predict", "--model", mixed["folder"], "--out", tmp_path / "pred", "--threshold", "0", image)
    assert r.exit_code == 0, r.stderr
    preds = json.loads(next((tmp_path / "pred").glob("*.json")).read_text())
    rows = next(iter(preds.values())) if isinstance(preds, dict) else preds
    names = {d["name"] for d in (rows if isinstance(rows, list) else rows["detections"])}
    assert names and names <= set(env["manifest"].tasks[0].category_names) | {"unicorn"}


@pytest.mark.parametrize("family", ["detr", "rt_detr"])
def test_a_folder_with_sequences_guides_its_own_part_of_the_student(cli, env, tmp_path, family):
    """A DETR folder of the kacli teacher's width, depth and stride, or an RT-DETR whose AIFI level
    has its width and stride: two parts, SA on both (the RT-DETR's on the last layer)."""
    folders = _mixed(env, family)
    run = tmp_path / "student"
    r = cli("amalgamate", "--cache", folders["cache"], "--out", run, "--epochs", 1, "--device", "cpu")
    assert r.exit_code == 0, r.stderr
    assert load_checkpoint(run / "last.pt")["arch"]["num_parts"] == 2
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"loss_seq", "loss_task", "sa_proj", "sa_enc1", "sa_enc2"} <= set(row)
    info = json.loads(cli("cache-info", folders["cache"], "--json").stdout)["teachers"]
    assert [t["teaches"] for t in info] == ["SA+TA" if family == "detr" else "SA (enc2)+TA", "SA+TA"]


@pytest.mark.parametrize("in_memory", [True, False])
def test_an_int8_cache_of_a_teacher_with_some_layers_reads_like_the_float_one(env, tmp_path, in_memory):
    """An RT-DETR folder's two layers in an int8 cache (its own scale columns): every selection of
    layers reads as the float32 cache does, within int8's step, with exact zeros where it has none;
    read as int8 and dequantised on the batch, the same."""
    from kacli.teachers.quant import dequantize_teacher

    folders = _mixed(env, "rt_detr")
    out = tmp_path / "int8.h5"
    cache_teachers(env["manifest"].path, [folders["folder"], env["kacli"]], out, **(QUIET | {"dtype": "int8"}))
    for layers, present in (("all", [False, False, True]), ("proj,2", [False, True]), ("1,2", [False, True])):
        q = TeacherCache(out, layers=layers, in_memory=in_memory)
        ref = TeacherCache(folders["cache"], layers=layers)
        assert q.present == ref.present == [present, [True] * len(present)]
        for e in range(len(q)):
            a, b = q[e][2]["seqs"], ref[e][2]["seqs"]
            step = b.abs().amax(-1, keepdim=True) / 127  # int8's step, per token
            assert bool(((a - b).abs() <= step * 0.51 + 1e-6).all())
            assert bool((a[0, [j for j, p in enumerate(present) if not p]] == 0).all())
        raw = TeacherCache(out, layers=layers, in_memory=in_memory, dequantize=False)
        batch = collate_cached([raw[i] for i in range(3)])[3]
        floats = collate_cached([q[i] for i in range(3)])[3]
        torch.testing.assert_close(dequantize_teacher(batch)["seqs"], floats["seqs"])
    from kacli.cache.info import verify_cache
    assert verify_cache(out, progress=False)["ok"]  # every stored sequence with its own scale column


@pytest.mark.parametrize("method", [["--method", "sag"], ["--compress", "redundancy"]])
def test_sag_and_compression_refuse_a_teacher_with_some_layers_only(cli, env, tmp_path, method):
    """SAG's mean over teachers and a compressed student's kept tokens need every teacher at every
    layer: with an RT-DETR folder (the last layer only) they are refused, naming the
    layers all teachers give."""
    folders = _mixed(env, "rt_detr")
    r = cli("amalgamate", "--cache", folders["cache"], "--out", tmp_path / "s", "--epochs", 1, "--device", "cpu",
            *method)
    assert_one_line_error(r, "needs every teacher's sequence at every cached layer", "--layers enc2")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("family, encoder, needle", [
    ("detr", (16, 2, 16), "d_model 16"), ("detr", (32, 1, 16), "encoder depth 1"),
    ("detr", (32, 2, 32), "backbone stride 32"), ("rt_detr", (16, 1, 16), "d_model 16"),
    ("rt_detr", (32, 1, 32), "backbone stride 32")])
def test_a_folder_whose_sequences_do_not_fit_teaches_through_ta_only(cli, env, tmp_path, monkeypatch, family,
                                                                     encoder, needle):
    """Another width, depth or stride than the kacli teachers': the folder still teaches through TA,
    one line says why, and the cache and cache-info say it."""
    monkeypatch.setenv("COLUMNS", "250")
    folder = tmp_path / "other"
    save_tiny(folder, family, env["id2label"], side=SIDE, encoder=encoder)
    r = cli("cache-teachers", "--tasks", env["manifest"].path, "--teacher", folder, "--teacher", env["kacli"],
            "--out", tmp_path / "c.h5", "--device", "cpu")
    assert r.exit_code == 0, r.stderr
    said = [line for line in r.stdout.splitlines() if "teaches through TA only" in line]
    assert len(said) == 1 and said[0].startswith("other: ") and needle in said[0] and "teacher 2's (t1.pt" in said[0]
    assert "transformers folder: TA only, no sequences)" in r.stdout
    t0 = TeacherCache(tmp_path / "c.h5").layout.teachers[0]
    assert t0["sequences"] is False and needle in t0["sa_off"] and "layers" not in t0
    with h5py.File(tmp_path / "c.h5") as f:
        assert "seq" not in f["teachers/0"]
    r = cli("cache-info", tmp_path / "c.h5")
    assert r.exit_code == 0 and "TA only" in r.stdout, r.stderr
    if needle == "d_model 16" and family == "rt_detr":  # online, the same line; the student has the kacli part only
        r = cli("amalgamate", "--tasks", env["manifest"].path, "--teacher", folder, "--teacher", env["kacli"],
                "--out", tmp_path / "online", "--epochs", 1, "--device", "cpu")
        assert r.exit_code == 0 and said[0] in r.stdout, r.stderr
        assert load_checkpoint(tmp_path / "online" / "last.pt")["arch"]["num_parts"] == 1


@pytest.mark.parametrize("family, change, needle", [
    ("deimv2", {"encoder_type": "lite"}, "'lite' encoder has no AIFI layer"),
    ("rt_detr", {"encoder_layers": 0}, "no AIFI layer (encoder_layers 0)")])
def test_a_hybrid_encoder_without_one_aifi_level_teaches_through_ta_only(env, tmp_path, family, change, needle):
    """What the config says decides, not the family's name: a DEIMv2 with its lite encoder, or an
    RT-DETR without AIFI, has no sequence kacli reads; it still teaches through TA."""
    from transformers import AutoModelForObjectDetection
    from hf_tiny import tiny_config

    cfg = tiny_config(family, env["id2label"], side=SIDE, encoder=KACLI_ENCODER)
    for k, v in change.items():
        setattr(cfg, k, v)
    folder = tmp_path / "hybrid"
    torch.manual_seed(0)
    AutoModelForObjectDetection.from_config(cfg).save_pretrained(folder)
    processor(family, SIDE).save_pretrained(folder)
    said = []
    summary = cache_teachers(env["manifest"].path, [folder, env["kacli"]], tmp_path / "c.h5", **(QUIET | {"log": said.append}))
    assert summary["teachers"][0]["sequences"] is False and needle in summary["teachers"][0]["sa_off"]
    assert [line for line in said if "teaches through TA only" in line] == [f"hybrid: {summary['teachers'][0]['sa_off']}"]
    assert TeacherCache(tmp_path / "c.h5").layout.seq_teachers == [1]


def test_a_folder_that_gives_none_of_the_cached_layers_teaches_through_ta_only(env, tmp_path):
    """--layers 1 with an RT-DETR (the last layer only): TA only for it, said in one line."""
    folder, _ = _folder(env, "rt_detr")
    said = []
    summary = cache_teachers(env["manifest"].path, [folder, env["kacli"]], tmp_path / "c.h5",
                             **(QUIET | {"log": said.append, "layers": "1"}))
    assert summary["teachers"][0]["sequences"] is False
    assert any(line == "rt_detr: teaches through TA only: it gives enc2, none of the layers cached (enc1)"
               for line in said), said
    assert TeacherCache(tmp_path / "c.h5").layer_names == ["enc1"]


def test_ta_only_makes_a_fitting_folder_teach_through_ta_only(cli, env, tmp_path, monkeypatch):
    """--ta-only TASK: a folder whose AIFI output fits teaches through TA only on request (on the demo's
    data that was the better student, BENCHMARKS.md); naming a kacli teacher's task or no task is refused."""
    monkeypatch.setenv("COLUMNS", "250")
    folder, _ = _folder(env, "rt_detr")
    task = env["manifest"].tasks[0].name
    args = ["--tasks", env["manifest"].path, "--teacher", folder, "--teacher", env["kacli"]]
    r = cli("cache-teachers", *args, "--ta-only", task, "--out", tmp_path / "c.h5", "--device", "cpu")
    assert r.exit_code == 0, r.stderr
    assert "rt_detr: teaches through TA only (--ta-only)" in r.stdout and "TA only, no sequences)" in r.stdout
    t0 = TeacherCache(tmp_path / "c.h5").layout.teachers[0]
    assert t0["sequences"] is False and t0["sa_off"] == "teaches through TA only (--ta-only)"
    r = cli("amalgamate", *args, "--ta-only", task, "--out", tmp_path / "online", "--epochs", 1, "--device", "cpu")
    assert r.exit_code == 0, r.stderr
    assert load_checkpoint(tmp_path / "online" / "last.pt")["arch"]["num_parts"] == 1
    other = env["manifest"].tasks[1].name
    for extra, needles in ((["--ta-only", other], ["kacli checkpoint", "t1.pt"]), (["--ta-only", "nosuch"], ["no such task"])):
        r = cli("cache-teachers", *args, *extra, "--out", tmp_path / "bad.h5", "--device", "cpu")
        assert_one_line_error(r, *needles)
        assert not (tmp_path / "bad.h5").exists()
    r = cli("amalgamate", "--cache", tmp_path / "c.h5", "--ta-only", task, "--out", tmp_path / "s", "--epochs", 1)
    assert_one_line_error(r, "pass it to cache-teachers")
    assert not (tmp_path / "s").exists()


def test_merge_tasks_takes_a_folder_as_a_teacher_only_task(cli, env, mixed, tmp_path):
    data = env["root"] / "data"
    out = tmp_path / "merged"
    r = cli("merge-tasks", "--task", f"own={data / 'train.json'}", "--val", f"own={data / 'val.json'}",
            "--teacher-only", f"shapes={mixed['folder']}", "--out", out)
    assert r.exit_code == 0, r.stderr + r.stdout
    tasks = TaskManifest(out / "tasks.yaml")
    shapes = next(t for t in tasks.tasks if t.name == "shapes")
    assert set(shapes.category_names) == {n for n in env["id2label"].values() if n != "N/A"}


# -- bad input: one line, exit 2, nothing written -----------------------------------------------------


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("case, needles", [
    ("remote-code", ["remote code", "trust_remote_code"]),
    ("not-a-detector", ["'bert'", "not an object detector"]),
    ("no-classes-match", ["label map is not task", "config.json"]),
    ("weights-mismatch", ["does not match", "config.json"]),
    ("weights-extra", ["does not match", "no place for"]),
    ("processor-remote-code", ["preprocessor_config.json", "remote code"]),
    ("bin-only", ["no model.safetensors", "pytorch_model.bin"]),
    ("no-processor", ["preprocessor_config.json"]),
    ("no-transformers", ["pip install 'kacli[hf]'"]),
    ("all-folders", ["at least one must be a kacli checkpoint"]),
])
def test_bad_folders_are_one_line_errors_and_write_nothing(cli, env, mixed, tmp_path, monkeypatch, case, needles):
    bad = _copy(mixed["folder"], tmp_path / "bad")
    teachers = [bad, env["kacli"]]
    if case == "remote-code":
        _edit_config(bad, auto_map={"AutoModelForObjectDetection": "modeling_evil.Evil"})
    elif case == "not-a-detector":
        _edit_config(bad, model_type="bert")
    elif case == "no-classes-match":
        n = len(env["id2label"])
        _edit_config(bad, id2label={str(k): f"thing{k}" for k in range(n)}, label2id={f"thing{k}": k for k in range(n)})
    elif case == "weights-mismatch":
        _edit_config(bad, d_model=64)
    elif case == "weights-extra":  # a 2-layer encoder's weights under a config that says 1 layer
        bad = _copy(_folder(env, "detr")[0], tmp_path / "bad-detr")
        teachers = [bad, env["kacli"]]
        _edit_config(bad, encoder_layers=1)
    elif case == "processor-remote-code":
        proc = json.loads((bad / "preprocessor_config.json").read_text())
        (bad / "preprocessor_config.json").write_text(json.dumps({**proc, "auto_map": {"AutoImageProcessor": "x.Y"}}))
    elif case == "bin-only":
        (bad / "model.safetensors").rename(bad / "pytorch_model.bin")
    elif case == "no-processor":
        (bad / "preprocessor_config.json").unlink()
    elif case == "no-transformers":
        monkeypatch.setattr("kacli.teachers.hf.folder._transformers", lambda: None)
    elif case == "all-folders":
        other = env["root"] / "detr-second-task"
        if not other.exists():
            save_tiny(other, "detr", dict(enumerate(env["manifest"].tasks[1].category_names)), side=SIDE)
        teachers = [bad, other]
    before = sorted(p.name for p in tmp_path.iterdir())
    args = ["cache-teachers", "--tasks", env["manifest"].path, "--out", tmp_path / "c.h5", "--device", "cpu"]
    r = cli(*args, *[a for t in teachers for a in ("--teacher", t)])
    assert_one_line_error(r, *needles)
    if case == "weights-extra":
        bad_name = bad.name
        assert bad_name in r.stderr
    if case != "all-folders":
        r = cli("eval", "--model", bad, "--tasks", env["manifest"].path, "--json", tmp_path / "e.json")
        if case == "no-classes-match":  # eval scores the classes the folder shares with the dataset: none
            assert_one_line_error(r, "none of the model's classes", "thing0")
        else:
            assert_one_line_error(r, *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# -- the image rules and batches: as transformers resizes, whatever the batch ------------------------


@pytest.mark.parametrize("family, size", [("detr", {"shortest_edge": 40, "longest_edge": 56}),
                                          ("rt_detr", {"height": 48, "width": 40}),
                                          ("detr", {"max_height": 50, "max_width": 36})])
def test_resize_rule_gives_transformers_sizes(tmp_path, family, size):
    """kacli's rule resizes every view to the size the folder's own processor gives it."""
    import numpy as np
    import transformers

    from kacli.teachers.hf.folder import load_transformers_folder

    save_tiny(tmp_path / "m", family, {0: "circle", 1: "square"}, side=SIDE)
    proc = processor(family, SIDE)
    proc.size = size
    proc.save_pretrained(tmp_path / "m")
    rule = load_transformers_folder(tmp_path / "m", build=False)["rule"]
    ref = transformers.AutoImageProcessor.from_pretrained(tmp_path / "m", local_files_only=True)
    for h, w in [(48, 80), (80, 48), (64, 64), (600, 1400), (333, 500), (37, 101)]:
        shape = ref(images=np.zeros((h, w, 3), np.uint8), return_tensors="pt", do_pad=False)["pixel_values"].shape
        assert rule.output_size(h, w) == tuple(shape[-2:]), (h, w)


def test_an_older_processor_file_is_read_as_transformers_reads_it(tmp_path):
    from kacli.teachers.hf.folder import load_transformers_folder

    save_tiny(tmp_path / "m", "detr", {0: "circle"}, side=SIDE)
    (tmp_path / "m" / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "DetrImageProcessor", "size": 800, "max_size": 1333}))
    rule = load_transformers_folder(tmp_path / "m", build=False)["rule"]
    assert dict(rule.size) == {"shortest_edge": 800, "longest_edge": 1333} and rule.mean == tuple(IMAGENET_MEAN)


@pytest.mark.parametrize("family", ["detr", "rt_detr", "conditional_detr"])
def test_a_padded_batch_of_sizes_gives_each_view_its_own_outputs(env, family):
    """Views of 48×80, 80×48 and 64×64 padded into one batch, through a rule that resizes them: each
    one's predictions (and, for a single-scale encoder, its sequences at its own grid) are the
    ones it gets alone."""
    from kacli.teachers.hf.folder import load_transformers_folder

    folder = env["root"] / f"{family}-resizing"
    if not folder.exists():
        save_tiny(folder, family, env["id2label"], side=SIDE, encoder=KACLI_ENCODER)
        proc = processor(family, SIDE)
        proc.size = {"height": 64, "width": 96} if family == "rt_detr" else {"shortest_edge": 56, "longest_edge": 96}
        proc.save_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(3, h, w, generator=g) for h, w in [(48, 80), (80, 48), (64, 64)]]
    images = torch.zeros(3, 3, 80, 80)
    mask = torch.ones(3, 80, 80, dtype=torch.bool)
    for b, v in enumerate(views):
        images[b, :, : v.shape[1], : v.shape[2]] = v
        mask[b, : v.shape[1], : v.shape[2]] = False
    for sequences in (False, True) if family in SEQUENCE else (False,):
        model = load_transformers_folder(folder)["model"]
        if sequences:
            model.give_sequences(16)
        out = model(images, mask)
        for b, v in enumerate(views):
            alone = model(v[None], torch.zeros(1, *v.shape[1:], dtype=torch.bool))
            torch.testing.assert_close(out["pred_logits"][b], alone["pred_logits"][0], rtol=0, atol=1e-5)
            torch.testing.assert_close(out["pred_boxes"][b], alone["pred_boxes"][0], rtol=0, atol=1e-6)
            if sequences:  # the view's tokens at the top-left of the batch's 5×5 grid, the rest padding
                h, w = -(-v.shape[1] // 16), -(-v.shape[2] // 16)
                grid = out["enc_layers"][-1][b].reshape(5, 5, -1)
                torch.testing.assert_close(grid[:h, :w].reshape(h * w, -1), alone["enc_layers"][-1][0], rtol=0, atol=1e-5)
                assert out["enc_mask"][b].reshape(5, 5)[:h, :w].logical_not().all()
                assert int((~out["enc_mask"][b]).sum()) == h * w


def test_predict_coco_names_a_folders_classes_by_the_image_ids_categories(cli, env, mixed, tmp_path):
    images = sorted((env["root"] / "data" / "images").rglob("*.png"))[:2]
    r = cli("predict", "--model", mixed["folder"], "--format", "coco", "--out", tmp_path / "p", *images)
    assert_one_line_error(r, "--image-ids", "categories")
    assert not (tmp_path / "p").exists()  # refused before anything is written
    ids = env["root"] / "data" / "test.json"
    test_images = [env["root"] / "data" / "images" / im["file_name"] for im in json.loads(ids.read_text())["images"]]
    r = cli("predict", "--model", mixed["folder"], "--format", "coco", "--image-ids", ids, "--threshold", "0",
            "--out", tmp_path / "p", *test_images)
    assert r.exit_code == 0, r.stderr
    cats = {c["name"]: c["id"] for c in json.loads(ids.read_text())["categories"]}
    results = json.loads(next((tmp_path / "p").glob("*.json")).read_text())
    rows = results if isinstance(results, list) else results.get("detections", [])
    got = {d["category_id"] for d in rows}
    assert got and got <= {cats[n] for n in env["manifest"].tasks[0].category_names}  # the dataset's ids; no unicorn


def test_a_cache_made_under_another_transformers_version_is_not_up_to_date(cli, env, mixed, tmp_path):
    import shutil

    out = tmp_path / "c.h5"
    shutil.copy(mixed["cache"], out)
    args = ["cache-teachers", "--tasks", env["manifest"].path, "--teacher", mixed["folder"], "--teacher", env["kacli"],
            "--out", out, "--device", "cpu", "--workers", 0, "--views", 1, "--dtype", "float32", "--batch-size", 4]
    r = cli(*args)
    assert r.exit_code == 0 and "up to date" in r.stdout, (r.stdout, r.stderr)
    with h5py.File(out, "r+") as f:
        teachers = json.loads(f.attrs["teachers"])
        teachers[0]["transformers_version"] = "4.0.0"
        f.attrs["teachers"] = json.dumps(teachers)
    before = out.read_bytes()
    assert_one_line_error(cli(*args), "another transformers version", "--force")
    assert out.read_bytes() == before
