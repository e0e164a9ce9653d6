"""examples/: the paper's runs and the "COCO classes plus yours" recipe as configs and scripts.

Every YAML loads with the loader its command uses; the configs carry the paper's settings (the
recipe's: DETR's); every kacli subcommand and option that the scripts and the README use exists in
the CLI; the scripts parse, and refuse to start (exit 2, one clear line) when an input is missing.
The recipe's import and merge steps run for real on a tiny dataset and a small random DETR.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from kacli.amalgamation.config import AmalgamateConfig, load_amalgamate_config
from kacli.cli import app
from kacli.data.schemes import PRESETS as SCHEMES
from kacli.runconfig import load_run_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = sorted(EXAMPLES.glob("run_*.sh"))
README = EXAMPLES / "README.md"
LIB = EXAMPLES / "pipeline.sh"  # the dataset-independent steps, sourced by every run script
RUN_DIRS = ("voc-2", "voc-4", "coco-2")
PAPER_SCRIPTS = [EXAMPLES / "run_coco2.sh", EXAMPLES / "run_voc.sh"]
MINE_SCRIPT = EXAMPLES / "run_coco_plus_mine.sh"  # COCO classes plus yours
MINE_DIR = "coco-plus-mine"
CONDITIONAL_DIR = "voc-2-conditional"  # Conditional DETR on the VOC run (not the paper's model)

# Options on script/README lines that belong to other programs.
FOREIGN_OPTIONS = {"--nproc-per-node", "--help"}
INVOCATION = re.compile(r"(?<![\w$/-])kacli(?:_dist)?[ \t]+([a-z][a-z0-9-]*)")
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


@pytest.fixture(scope="module")
def cli_options() -> dict[str, set[str]]:
    """Subcommand → its long options, from the Typer app itself."""
    group = typer.main.get_command(app)
    return {
        name: {o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("--")}
        for name, cmd in group.commands.items()
    }


def logical_lines(text: str) -> list[str]:
    """Lines with backslash continuations joined (shell and README code blocks)."""
    return text.replace("\\\n", " ").splitlines()


def readme_code(text: str) -> str:
    """The fenced code blocks and inline code spans of a Markdown file."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M)
    spans = re.findall(r"`([^`\n]+)`", prose)
    return "\n".join(blocks + spans)


def invocations(text: str) -> list[tuple[str, list[str], str]]:
    """``(subcommand, [--options], line)`` for every ``kacli SUB ...`` / ``kacli_dist SUB ...``."""
    found = []
    for line in logical_lines(text):
        hits = list(INVOCATION.finditer(line))
        for i, m in enumerate(hits):
            end = hits[i + 1].start() if i + 1 < len(hits) else len(line)
            found.append((m.group(1), OPTION.findall(line[m.end():end]), line.strip()))
    return found


def script_default(script: Path, name: str) -> str:
    """The value a script assigns to ``NAME`` (``NAME=value`` or ``NAME=${NAME:-value}``)."""
    m = re.search(rf"^{name}=(?:\$\{{{name}:-)?([^}}\n]*)\}}?$", script.read_text(), flags=re.M)
    assert m, f"{script.name} sets no {name}"
    return m.group(1)


def run_text(script: Path) -> str:
    """A run script as bash executes it: its own lines and the pipeline.sh it sources."""
    text = script.read_text()
    assert 'source "$here/pipeline.sh"' in text, f"{script.name} does not source pipeline.sh"
    return text + "\n" + LIB.read_text()


def test_examples_hold_the_three_runs_and_the_recipe():
    assert [s.name for s in SCRIPTS] == ["run_coco2.sh", "run_coco_plus_mine.sh", "run_voc.sh"]
    for d in (*RUN_DIRS, MINE_DIR, CONDITIONAL_DIR):
        assert sorted(p.name for p in (EXAMPLES / d).glob("*.yaml")) == ["student.yaml", "teacher.yaml"]
    assert README.is_file()


@pytest.mark.parametrize("path", sorted(EXAMPLES.rglob("*.yaml")), ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_every_yaml_loads_with_its_loader(path):
    if path.name == "teacher.yaml":
        cfg = load_run_config(path, {})
        assert cfg.model.backbone == "resnet50"
    elif path.name == "student.yaml":
        cfg = load_amalgamate_config(path)
        assert cfg.method == "ka" and cfg.compress == "none"
    else:
        pytest.fail(f"{path}: neither a teacher.yaml nor a student.yaml")


# run dir → (teacher epochs, lr drop; student passes, lr drop in passes; longer side; default views)
PAPER = {
    "voc-2": (200, 133, 150, 100, 512, 5),
    "voc-4": (200, 133, 150, 100, 512, 5),
    "coco-2": (150, 100, 60, 50, 1000, 2),
}


@pytest.mark.parametrize("run", RUN_DIRS)
def test_configs_carry_the_papers_settings(run):
    t_epochs, t_drop, passes, drop_passes, max_size, views = PAPER[run]
    teacher = load_run_config(EXAMPLES / run / "teacher.yaml", {})
    student = load_amalgamate_config(EXAMPLES / run / "student.yaml")
    script = EXAMPLES / ("run_coco2.sh" if run == "coco-2" else "run_voc.sh")
    assert int(script_default(script, "VIEWS")) == views
    # One amalgamate epoch visits every cached view of every image.
    assert student.train.epochs * views == passes
    assert student.train.lr_drop * views == drop_passes
    assert (teacher.train.epochs, teacher.train.lr_drop) == (t_epochs, t_drop)
    assert teacher.aug.max_size == max_size
    for cfg in (teacher.train, student.train):
        assert (cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.amp) == (32, 1e-4, 1e-4, True)
    assert (student.lambda_seq, student.lambda_task, student.lambda_d) == (1.0, 1.0, 0.1)
    assert tuple(student.ta.alpha) == (1.0, 5.0, 2.0) and student.sa.normalize
    # The cache refuses a student whose width or depth differs; ours equals the teachers' model.
    assert student.model == teacher.model
    assert teacher.model.pre_norm and teacher.model.num_queries == 100 and teacher.model.d_model == 256


# Method settings of an example student.yaml that may differ from the library's defaults, each with
# its reason. Anything not named here must equal AmalgamateConfig's default, so a default moved in
# the library (say, after a measurement on the demo) cannot leave the examples behind.
EXAMPLE_METHOD_DIFFERENCES: dict[str, str] = {
    "gt_loss": "coco-plus-mine names the partial-label loss it trains with (its images lack COCO's labels); "
               "test_coco_plus_mine_configs_are_detrs checks that it is the one ka resolves to by default",
}


@pytest.mark.parametrize("run", (*RUN_DIRS, MINE_DIR, CONDITIONAL_DIR))
def test_example_method_settings_are_the_library_defaults(run):
    from dataclasses import asdict

    def flat(cfg) -> dict:
        """Dotted method keys → values (tuples as lists), without the model, aug and train sections."""
        out, todo = {}, [("", asdict(cfg))]
        while todo:
            pre, d = todo.pop()
            for k, v in d.items():
                if pre == "" and k in ("model", "aug", "train"):
                    continue
                if isinstance(v, dict):
                    todo.append((f"{pre}{k}.", v))
                else:
                    out[f"{pre}{k}"] = list(v) if isinstance(v, tuple) else v
        return out

    ex, de = flat(load_amalgamate_config(EXAMPLES / run / "student.yaml")), flat(AmalgamateConfig())
    assert ex.keys() == de.keys()
    differ = {k: (ex[k], de[k]) for k in ex if ex[k] != de[k]}
    unexplained = {k: v for k, v in differ.items() if k not in EXAMPLE_METHOD_DIFFERENCES}
    assert not unexplained, f"{run}/student.yaml differs from the library defaults (example, default): {unexplained}"


def test_voc_evaluation_size_gives_the_papers_flops_scale():
    # DETR's recipe scaled by 512/1333: every size, rounded (see the teacher.yaml comments).
    aug = load_run_config(EXAMPLES / "voc-2" / "teacher.yaml", {}).aug
    scale = 512 / 1333
    assert aug.scales == tuple(round(s * scale) for s in range(480, 801, 32))
    assert aug.crop_scales == tuple(round(s * scale) for s in (400, 500, 600)) == (154, 192, 230)
    assert (aug.crop_min, aug.crop_max) == (round(384 * scale), round(600 * scale))
    assert (aug.max_size, aug.eval_size) == (512, round(800 * scale)) == (512, 307)


@pytest.mark.parametrize("script", PAPER_SCRIPTS, ids=lambda p: p.name)
def test_script_names_a_preset_and_its_tasks(script):
    """Every SCHEME a script can pick comes with that preset's task names, and its configs folder."""
    text = script.read_text()
    schemes = re.findall(r"\bSCHEME=([\w-]+)", text)
    tasks = [m.split() for m in re.findall(r"\bTASK_NAMES=\(([^)]*)\)", text)]
    assert schemes and len(schemes) == len(tasks)
    for scheme, names in zip(schemes, tasks):
        assert scheme in SCHEMES and names == list(SCHEMES[scheme])
        assert (EXAMPLES / scheme).is_dir()
    assert script_default(LIB, "CONFIGS") == "$here/$SCHEME"


@pytest.mark.parametrize("path", [*SCRIPTS, README], ids=lambda p: p.name)
def test_every_kacli_command_and_option_exists(path, cli_options):
    text = path.read_text() if path == README else run_text(path)
    code = readme_code(text) if path.suffix == ".md" else text
    calls = invocations(code)
    assert len(calls) >= 10, calls  # the whole pipeline is there
    for sub, opts, line in calls:
        assert sub in cli_options, f"{path.name}: no kacli subcommand {sub!r}: {line}"
        unknown = [o for o in opts if o not in cli_options[sub]]
        assert not unknown, f"{path.name}: kacli {sub} has no {unknown}: {line}"
    every = set().union(*cli_options.values()) | FOREIGN_OPTIONS
    stray = sorted(set(OPTION.findall(text)) - every)
    assert not stray, f"{path.name}: options no kacli command has: {stray}"


@pytest.mark.parametrize("script", PAPER_SCRIPTS, ids=lambda p: p.name)
def test_script_runs_every_stage(script, cli_options):
    subs = [sub for sub, _, _ in invocations(run_text(script))]
    for needed in ("split-tasks", "import-checkpoint", "train-teacher", "cache-teachers", "amalgamate", "eval", "report"):
        assert needed in subs, (script.name, needed)
    text = logical_lines(run_text(script))
    amalgamate = [line for line in text if re.search(r"kacli_dist amalgamate", line)]
    assert len(amalgamate) == 3
    assert sum("--compress redundancy" in line for line in amalgamate) == 1
    assert sum("--method raw" in line for line in amalgamate) == 1
    assert any(re.search(r'kacli eval "\$\{ensemble\[@\]\}"', line) for line in text)


@pytest.mark.parametrize("script", [*SCRIPTS, LIB], ids=lambda p: p.name)
def test_bash_syntax(script):
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def _run(script: Path, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(cwd)}
    return subprocess.run(["bash", str(script)], env={**base, **env}, cwd=cwd, capture_output=True, text=True)


@pytest.mark.parametrize(
    "script,root_var,teachers",
    [("run_voc.sh", "VOC_ROOT", "2"), ("run_voc.sh", "VOC_ROOT", "4"), ("run_coco2.sh", "COCO_ROOT", "")],
)
def test_script_refuses_missing_inputs(script, root_var, teachers, tmp_path):
    script = EXAMPLES / script
    pick = {"TEACHERS": teachers} if teachers else {}

    def go(env):
        return _run(script, {**pick, **env}, tmp_path)

    if teachers:
        bad = _run(script, {"TEACHERS": "3"}, tmp_path)
        assert bad.returncode == 2 and bad.stderr.strip() == "error: TEACHERS must be 2 or 4 (the paper's VOC runs), got '3'"
    res = go({})
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.strip().splitlines() == [res.stderr.strip()]
    assert res.stderr.startswith(f"error: {root_var} is not set")

    # A dataset folder without the expected layout is named in the message.
    (tmp_path / "data").mkdir()
    res = go({root_var: str(tmp_path / "data"), "INIT_CKPT": "x", "BACKBONE_WEIGHTS": "y"})
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    expected = "VOC2007/Annotations" if root_var == "VOC_ROOT" else "annotations/instances_train2017.json"
    assert f"{tmp_path / 'data'}/{expected}" in res.stderr

    # Weight files that do not exist are named; nothing was created.
    voc = {"VOC2007": ("train", "val", "test"), "VOC2012": ("trainval",)}
    if root_var == "VOC_ROOT":
        for year, splits in voc.items():
            for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
                (tmp_path / "data" / year / d).mkdir(parents=True)
            for s in splits:
                (tmp_path / "data" / year / "ImageSets/Main" / f"{s}.txt").write_text("000001\n")
    else:
        (tmp_path / "data" / "annotations").mkdir()
        for s in ("train", "val"):
            (tmp_path / "data" / "annotations" / f"instances_{s}2017.json").write_text("{}")
            (tmp_path / "data" / f"{s}2017").mkdir()
    env = {root_var: str(tmp_path / "data"), "INIT_CKPT": str(tmp_path / "updetr.pth"), "BACKBONE_WEIGHTS": "y",
           "KACLI": "true"}
    res = go(env)
    assert res.returncode == 2
    assert res.stderr.strip() == f"error: {tmp_path / 'updetr.pth'}: INIT_CKPT names no file"
    assert not (tmp_path / "runs").exists()

    (tmp_path / "updetr.pth").write_bytes(b"")
    (tmp_path / "swav.pth").write_bytes(b"")
    env.update(BACKBONE_WEIGHTS=str(tmp_path / "swav.pth"), GPUS="3")
    res = go(env)
    assert res.returncode == 2
    assert res.stderr.strip() == "error: TOTAL_BATCH 32 is not divisible by GPUS 3"
    assert not (tmp_path / "runs").exists()


def test_conditional_voc_configs_are_conditional_detr_r50_on_its_schedule():
    """Conditional DETR-R50 as the official checkpoint (post-norm, 300 queries), the VOC run's sizes,
    Conditional DETR's 50 epochs (drop at 40) for the teachers and 50 passes over the VOC run's 5
    cached views (drop at 40) for the student, whose model is the teachers'."""
    teacher = load_run_config(EXAMPLES / CONDITIONAL_DIR / "teacher.yaml", {})
    student = load_amalgamate_config(EXAMPLES / CONDITIONAL_DIR / "student.yaml")
    voc = load_run_config(EXAMPLES / "voc-2" / "teacher.yaml", {})
    m = teacher.model
    assert (m.arch, m.classifier, m.backbone, m.d_model, m.enc_layers, m.dec_layers, m.num_queries, m.pre_norm) == (
        "conditional", "sigmoid", "resnet50", 256, 6, 6, 300, False)
    assert student.model == m and teacher.aug == voc.aug
    assert (teacher.train.epochs, teacher.train.lr_drop) == (50, 40)
    views = 5  # run_voc.sh's default VIEWS
    assert (student.train.epochs * views, student.train.lr_drop * views) == (50, 40)
    text = README.read_text()
    assert "CONFIGS=examples/voc-2-conditional" in text and "expected" in text


# -- COCO classes plus yours -----------------------------------------------------------------------


def test_coco_plus_mine_configs_are_detrs():
    """The teacher fine-tunes facebookresearch/detr's DETR-R50 (post-norm) at DETR's sizes and rates;
    the student has the teachers' model and 150 passes over the cached views, drop at 100."""
    teacher = load_run_config(EXAMPLES / MINE_DIR / "teacher.yaml", {})
    student = load_amalgamate_config(EXAMPLES / MINE_DIR / "student.yaml")
    m = teacher.model
    assert (m.backbone, m.d_model, m.nheads, m.enc_layers, m.dec_layers, m.dim_feedforward, m.num_queries) == (
        "resnet50", 256, 8, 6, 6, 2048, 100)
    assert not m.pre_norm and student.model == m
    assert teacher.aug.scales == tuple(range(480, 801, 32)) and (teacher.aug.max_size, teacher.aug.eval_size) == (1333, 800)
    assert (teacher.train.lr, teacher.train.lr_backbone, teacher.train.weight_decay) == (1e-4, 1e-5, 1e-4)
    assert teacher.train.lr_drop < teacher.train.epochs
    # Partial labels: the user's images are not annotated for COCO's classes; the loss is ka's default.
    assert student.gt_loss == student.ground_truth_loss == AmalgamateConfig(method="ka").ground_truth_loss == "mask"
    views = int(script_default(MINE_SCRIPT, "VIEWS"))
    assert (student.train.epochs * views, student.train.lr_drop * views) == (150, 100)
    # The script passes --batch-size TOTAL_BATCH/GPUS; the configs say the same for one process.
    assert teacher.train.batch_size == student.train.batch_size == int(script_default(MINE_SCRIPT, "TOTAL_BATCH"))


def test_coco_plus_mine_script_runs_every_stage():
    calls = invocations(MINE_SCRIPT.read_text())
    assert [sub for sub, _, _ in calls] == [
        "import-checkpoint", "merge-tasks", "train-teacher", "cache-teachers", "amalgamate", "eval", "report",
        "predict"]  # the closing line says how to use the student
    (_, _, imp_line), _, (_, train, _), (_, cache, _) = calls[:4]
    assert "--label-map coco" in imp_line and "--init" in train and cache.count("--teacher") == 2


def test_coco_plus_mine_refuses_missing_inputs(tmp_path):
    def go(**env):
        return _run(MINE_SCRIPT, env, tmp_path)

    def one_line(res, expected):
        assert res.returncode == 2 and res.stdout == "", (res.returncode, res.stdout, res.stderr)
        assert res.stderr.strip().splitlines() == [expected]

    one_line(go(), "error: DETR_CKPT is not set: facebookresearch/detr's COCO checkpoint (detr-r50-e632da11.pth) "
                   "(see examples/README.md)")
    ckpt = tmp_path / "detr-r50-e632da11.pth"
    env = {"DETR_CKPT": str(ckpt), "USER_TRAIN": str(tmp_path / "VOC") + ":trainval", "USER_VAL": str(tmp_path / "VOC") + ":test",
           "KACLI": "true"}
    one_line(go(**env), f"error: {ckpt}: DETR_CKPT names no file")
    ckpt.write_bytes(b"")
    # PATH:SPLIT names the folder, which does not exist
    one_line(go(**env), f"error: {tmp_path / 'VOC'}: USER_TRAIN names no file or folder")
    (tmp_path / "VOC").mkdir()
    one_line(go(**env, USER_VAL_IMAGES=str(tmp_path / "nope")), f"error: {tmp_path / 'nope'}: USER_VAL_IMAGES names no folder")
    one_line(go(**env, MINE="coco"), "error: MINE must not be 'coco': that is the COCO teacher's task")
    one_line(go(**env, GPUS="3"), "error: TOTAL_BATCH 16 is not divisible by GPUS 3")
    assert not (tmp_path / "runs").exists()


USER_CLASSES = ("hardhat", "pylon")  # the user's VOC names; RENAMES makes them helmet and cone


@pytest.fixture
def coco_plus_mine_inputs(tmp_path):
    """A small random DETR in facebookresearch/detr's layout with COCO's 91-slot head (post-norm,
    2 heads recorded in its args), a VOC root of the user's two classes, and a KACLI that runs
    import-checkpoint and merge-tasks for real and only records the training stages."""
    import torch

    from dataset_builders import write_voc
    from kacli.models import DETR, ModelConfig

    cfg = ModelConfig(backbone="resnet18", d_model=16, nheads=2, enc_layers=1, dec_layers=1, dim_feedforward=16,
                      num_queries=4, dropout=0.0)
    torch.manual_seed(0)
    sd = {("backbone.0." + k[len("backbone."):] if k.startswith("backbone.body.") else k): v
          for k, v in DETR(cfg, 91).state_dict().items()}
    ckpt = tmp_path / "detr-r50-e632da11.pth"
    torch.save({"model": sd, "args": argparse.Namespace(nheads=2, dilation=False, dropout=0.0)}, ckpt)

    items = {f"{i:06d}": (48, 40, [(USER_CLASSES[i % 2], [4, 4, 20, 30], 0)]) for i in range(1, 6)}
    items["000001"][2].append(("pylon", [24, 8, 40, 36], 0))
    voc = write_voc(tmp_path / "VOC", items, {"trainval": ["000001", "000002", "000003"], "test": ["000004", "000005"]})

    log = tmp_path / "calls.log"
    stub = tmp_path / "kacli-stub"
    stub.write_text(
        "#!/usr/bin/env bash\n"
        f"printf '%s\\n' \"$*\" >> {log}\n"
        'case "$1" in\n'
        f"  import-checkpoint|merge-tasks) exec {sys.executable} -m kacli \"$@\" ;;\n"
        "esac\n"
    )
    stub.chmod(0o755)
    env = {"DETR_CKPT": str(ckpt), "USER_TRAIN": f"{voc}:trainval", "USER_VAL": f"{voc}:test",
           "COCO_CLASSES": "person,car,dog", "RENAMES": "hardhat=helmet,pylon=cone", "KACLI": str(stub),
           "PYTHONPATH": str(EXAMPLES.parent), "OMP_NUM_THREADS": "1"}
    return env, log


def test_coco_plus_mine_merges_the_coco_subset_and_the_users_task(coco_plus_mine_inputs, tmp_path):
    from kacli.data.manifest import TaskManifest
    from kacli.errors import KacliError
    from kacli.fsutil import sha256_file
    from kacli.models.checkpoint import load_checkpoint

    env, log = coco_plus_mine_inputs
    res = _run(MINE_SCRIPT, env, tmp_path)
    assert res.returncode == 0, res.stderr
    work = tmp_path / "runs" / "coco-plus-mine"
    coco_pt = work / "weights" / "detr-coco.pt"
    imported = load_checkpoint(coco_pt)
    assert len(imported["label_map"]["ids"]) == 80 and imported["arch"]["unnamed_classes"] == 11

    m = TaskManifest(work / "tasks" / "tasks.yaml")
    assert m.merged and m.task_names == ["mine", "coco"] and m.renames == {"hardhat": "helmet", "pylon": "cone"}
    # The student's classes: the user's (renamed, in their source's id order), then the COCO subset in COCO id order.
    assert m.student_label_map() == {"ids": [1, 2, 3, 4, 5], "names": ["helmet", "cone", "person", "car", "dog"]}
    mine, coco = m.tasks
    assert (mine.category_names, mine.teacher) == (["helmet", "cone"], None)
    assert (coco.category_ids, coco.category_names) == ([3, 4, 5], ["person", "car", "dog"])
    assert coco.teacher == str(coco_pt.resolve())
    assert m.data["tasks"][1]["teacher_sha256"] == sha256_file(coco_pt)
    m.require_trainable("mine")
    with pytest.raises(KacliError, match="teacher-only"):
        m.require_trainable("coco")
    # Every image is the user's, annotated completely for the user's classes only.
    for split, n in (("train", 3), ("val", 2)):
        gt = json.loads(m.split_json(split).read_text())
        assert len(gt["images"]) == n and {im["source"] for im in gt["images"]} == {"mine"}
        assert gt["complete_category_ids"] == {"mine": [1, 2]}
        assert json.loads(m.split_json(split, "coco").read_text())["images"] == []
    assert len(json.loads(m.split_json("train").read_text())["annotations"]) == 4

    # The stages after the merge get the teachers in tasks.yaml's order (yours, then COCO).
    calls = log.read_text().splitlines()
    assert [c.split()[0] for c in calls] == [
        "import-checkpoint", "merge-tasks", "train-teacher", "cache-teachers", "amalgamate", "eval", "eval", "report"]
    rel = "runs/coco-plus-mine"  # WORK's default, relative to where the script runs
    assert f"--task mine --config {EXAMPLES / MINE_DIR / 'teacher.yaml'} --init {rel}/weights/detr-coco.pt" in calls[2]
    assert f"--teacher {rel}/runs/teacher-mine --teacher {rel}/weights/detr-coco.pt --split train --views 5" in calls[3]
    assert f"--backbone-weights {env['DETR_CKPT']} --batch-size 16" in calls[4]

    # A rerun skips the import and the merge; one with another COCO subset stops, tasks.yaml kept.
    before = (work / "tasks" / "tasks.yaml").read_bytes()
    log.write_text("")
    assert _run(MINE_SCRIPT, env, tmp_path).returncode == 0
    assert [c.split()[0] for c in log.read_text().splitlines()][:2] == ["train-teacher", "cache-teachers"]
    res = _run(MINE_SCRIPT, {**env, "COCO_CLASSES": "person,car"}, tmp_path)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert res.stderr.startswith(f"error: {rel}/tasks/tasks.yaml was built from other inputs (")
    assert (work / "tasks" / "tasks.yaml").read_bytes() == before
