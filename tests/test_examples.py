"""examples/: the paper's runs as configs and scripts.

Every YAML loads with the loader its command uses; the configs carry the paper's settings; every
kacli subcommand and option that the scripts and the README use exists in the CLI; the scripts
parse, and refuse to start (exit 2, one clear line) when an input is missing.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import typer

from kacli.amalgamation.config import load_amalgamate_config
from kacli.cli import app
from kacli.data.schemes import PRESETS as SCHEMES
from kacli.engine.runconfig import load_run_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = sorted(EXAMPLES.glob("run_*.sh"))
README = EXAMPLES / "README.md"
LIB = EXAMPLES / "pipeline.sh"  # the dataset-independent steps, sourced by every run script
RUN_DIRS = ("voc-2", "voc-4", "coco-2")

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


def test_examples_hold_the_three_runs():
    assert [s.name for s in SCRIPTS] == ["run_coco2.sh", "run_voc.sh"]
    for d in RUN_DIRS:
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
EXAMPLE_METHOD_DIFFERENCES: dict[str, str] = {}


@pytest.mark.parametrize("run", RUN_DIRS)
def test_example_method_settings_are_the_library_defaults(run):
    from dataclasses import asdict

    from kacli.amalgamation.config import AmalgamateConfig

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


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
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


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
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
    voc = {"VOC2007": ("trainval", "test"), "VOC2012": ("trainval",)}
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
