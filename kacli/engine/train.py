"""The training loop shared by ``train-teacher`` and ``amalgamate``.

One :class:`Trainer` runs epochs of ``loss_fn`` over a dataset with AdamW (a separate learning
rate for the backbone), a step schedule, gradient clipping, AMP on CUDA, DDP under torchrun,
a rich progress bar (loss, rate, ETA), ``metrics.jsonl`` (one line per epoch with every loss term
and the validation metrics; mirrored in ``metrics.csv`` and, optionally, TensorBoard), ``best.pt``
on the best validation AP, ``last.pt`` every epoch (and every ``checkpoint_every`` steps), and
``--resume`` from ``last.pt`` of the same run, mid-epoch too. Optional: a moving average of the
weights (``ema``, :mod:`kacli.engine.ema`), which is then what is validated and saved.

Files go through a :class:`~kacli.engine.rundir.RunDir`: a new run is written beside the old one
and swapped in when its first ``last.pt`` is saved. ``best.pt`` is saved before ``last.pt``, so a
run killed between the two redoes that epoch on ``--resume`` and saves both again.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from kacli.engine.config import TrainConfig
from kacli.engine.ema import WeightEMA, refuse_ema_state
from kacli.engine.guards import check_finite
from kacli.engine.rundir import RunDir, kill_point
from kacli.engine.runlog import RunLogs, read_jsonl
from kacli.errors import KacliError
from kacli.fsutil import atomic_file, atomic_path, write_yaml
from kacli.models.checkpoint import load_checkpoint, load_weights_into, save_checkpoint
from kacli.progress import make_progress
from kacli.runtime import DistInfo, all_reduce_mean, barrier

LossFn = Callable[[nn.Module, Any, torch.device], dict[str, torch.Tensor]]
EvalFn = Callable[[nn.Module], dict[str, Any]]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2**32))
    except ImportError:  # pragma: no cover
        pass


def to_device(obj, device: torch.device):
    """Move tensors nested in lists, tuples and dicts to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def param_groups(model: nn.Module, lr: float, lr_backbone: float, extra: list[nn.Module] = ()) -> list[dict]:
    """AdamW groups: backbone parameters at ``lr_backbone`` (frozen ones excluded), the rest at ``lr``;
    parameters of loss modules (``extra``, e.g. SAG's W_a) are optimised at ``lr`` too."""
    backbone, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (backbone if ".backbone." in f".{name}" else rest).append(p)
    groups = [{"params": rest, "lr": lr}]
    if backbone and lr_backbone > 0:
        groups.append({"params": backbone, "lr": lr_backbone})
    elif backbone:
        for p in backbone:
            p.requires_grad_(False)
    extra_params = [p for m in extra for p in m.parameters() if p.requires_grad]
    if extra_params:
        groups.append({"params": extra_params, "lr": lr})
    return groups


@dataclass
class TrainSetup:
    """Everything a run needs besides the model and the loss.

    ``train`` holds the optimisation settings (epochs, batch size, learning rates, schedule,
    clipping, seed, workers, validation interval, AMP, EMA, TensorBoard, step checkpoints; its
    ``device`` is not read here: the trainer runs on its ``DistInfo``'s device).
    ``checkpoint_base`` holds the checkpoint fields that do not change during the run (kind, arch,
    label_map, task, config, inputs, meta); ``signature`` identifies the run for ``--resume``
    (e.g. task, manifest sha256, architecture): resuming from a ``last.pt`` whose signature differs
    is refused. ``run_dir`` decides where files go (default: ``out_dir`` in place); the trainer
    writes ``checkpoint_base["config"]`` there as ``config.yaml``.
    """

    out_dir: Path
    train: TrainConfig
    checkpoint_base: dict
    signature: dict
    metric: str = "AP"
    extra_modules: list[nn.Module] = field(default_factory=list)
    log_name: str = "train"
    run_dir: RunDir | None = None


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        train_set,
        collate_fn,
        setup: TrainSetup,
        dist_info: DistInfo,
        evaluate: EvalFn | None = None,
    ):
        self.model = model
        self.loss_fn = loss_fn
        self.train_set = train_set
        self.collate_fn = collate_fn
        self.s = setup
        self.dist = dist_info
        self.device = dist_info.device
        self.evaluate = evaluate

    @property
    def out(self) -> Path:
        """The folder files go to now (a new run's staging folder until its first checkpoint)."""
        return self.s.run_dir.path if self.s.run_dir is not None else Path(self.s.out_dir)

    # ---------------------------------------------------------------- state
    def _train_state(self, epoch: int, step: int, best: float | None, best_epoch: int | None,
                     train_seconds: float, partial: dict | None) -> dict:
        """``epoch`` epochs done, and ``step`` steps of the next one (0 at an epoch's end; then
        ``partial`` holds that epoch's loss sums so far)."""
        return {
            "epoch": epoch,
            "step": step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "run_id": self.run_id,
            "best": best,
            "best_epoch": best_epoch,
            "train_seconds": train_seconds,
            "signature": self.s.signature,
            "partial": partial,
            "rng": {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_v": random.getstate()[0]},
        }

    def _save(self, name: str, epoch: int, best: float | None, train_seconds: float, metrics: dict, *,
              step: int = 0, best_epoch: int | None = None, partial: dict | None = None) -> None:
        if not self.dist.is_main:
            return
        base = dict(self.s.checkpoint_base)
        meta = dict(base.get("meta") or {})
        meta.update({"epoch": epoch, "metrics": metrics, "train_seconds": train_seconds})
        if step:
            meta["step"] = step
        base["meta"] = meta
        base["model"] = {k: v.detach().cpu() for k, v in self._bare_model().state_dict().items()}
        base["extra_modules"] = [
            {k: v.detach().cpu() for k, v in m.state_dict().items()} for m in self.s.extra_modules
        ]
        base["train_state"] = self._train_state(epoch, step, best, best_epoch, train_seconds, partial)
        if self.ema is not None:  # the average is the model; the trained weights resume from train_state
            base["model"], base["train_state"]["ema"] = self.ema.checkpoint_fields(base["model"])
        try:
            save_checkpoint(self.out / name, base)
        except KacliError as e:  # named as the run's file, not as the staging folder's
            raise KacliError(e.message, Path(self.s.out_dir) / name) from None

    def _bare_model(self) -> nn.Module:
        return self.model.module if hasattr(self.model, "module") else self.model

    def _resume(self) -> dict:
        path = self.out / "last.pt"
        if not path.is_file():
            raise KacliError("nothing to resume: no last.pt in the run folder", self.out)
        ckpt = load_checkpoint(path)
        state = ckpt.get("train_state")
        if not state:
            raise KacliError("checkpoint holds no training state to resume from", path)
        theirs = state.get("signature", {})
        diff = sorted(k for k in set(theirs) | set(self.s.signature) if theirs.get(k) != self.s.signature.get(k))
        if diff:
            k = diff[0]
            there, here = theirs.get(k), self.s.signature.get(k)
            if isinstance(there, dict) and isinstance(here, dict):  # name the differing field, not the whole dict
                sub = sorted(j for j in set(there) | set(here) if there.get(j) != here.get(j))[0]
                k, there, here = f"{k}.{sub}", there.get(sub), here.get(sub)
            raise KacliError(f"checkpoint belongs to another run ({k}: {there!r} there, {here!r} here)", path)
        self._check_resumable(ckpt, path)
        load_weights_into(self._bare_model(), ckpt["model"], path)
        if self.ema is not None:
            self.ema.restore(self._bare_model(), ckpt, path)
        else:
            refuse_ema_state(ckpt, path)
        for m, sd in zip(self.s.extra_modules, ckpt.get("extra_modules", [])):
            m.load_state_dict(sd)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.run_id = state["run_id"]
        self._set_rng(state.get("rng") or {})
        # metrics.jsonl: keep the lines of the epochs the checkpoint has seen
        log = self.out / "metrics.jsonl"
        if log.exists() and self.dist.is_main:
            kept = [ln for _, ln, rec in read_jsonl(log) if rec.get("epoch", 0) <= state["epoch"]]
            with atomic_file(log) as f:
                f.write("".join(ln + "\n" for ln in kept))
        return {
            "epoch": int(state["epoch"]),
            "step": int(state.get("step") or 0),
            "best": state.get("best"),
            "best_epoch": state.get("best_epoch"),
            "train_seconds": float(state.get("train_seconds", 0.0)),
            "partial": state.get("partial"),
            "rng": state.get("rng") or {},
        }

    #: Settings the saved optimiser and schedule keep on --resume: a new value would be ignored.
    FIXED_ON_RESUME = ("lr", "lr_backbone", "weight_decay", "lr_drop")

    def _check_resumable(self, ckpt: dict, path: Path) -> None:
        """Refuse a resume with settings it cannot honour (the optimiser's learning rates and
        weight decay, the schedule, and mid-epoch the batch size) rather than record them unused."""
        state = ckpt.get("train_state") or {}
        done = int(state.get("epoch") or 0)
        recorded, given = ckpt.get("config"), self.s.checkpoint_base.get("config")
        if done >= self.s.train.epochs and not state.get("step") and recorded is not None and given is not None:
            # nothing left to train: a changed setting would be recorded in config.yaml, never used
            diff = _first_difference(recorded, given)
            if diff is not None:
                key, theirs, ours = diff
                raise KacliError(
                    f"--resume has nothing to train (the run has done {done} epoch{'s' * (done != 1)}) and cannot change {key} "
                    f"({_short(theirs)} in the run, {_short(ours)} given); raise --epochs to train on, or start a new run",
                    path,
                )
        saved = (recorded or {}).get("train") or {}
        names = list(self.FIXED_ON_RESUME)
        if state.get("step"):
            names.append("batch_size")
        for name in names:
            theirs, ours = saved.get(name), getattr(self.s.train, name)
            if theirs is not None and theirs != ours:
                raise KacliError(
                    f"--resume cannot change train.{name} ({theirs} in the run, {ours} given): the saved "
                    "optimiser and schedule keep theirs; start a new run to change it", path,
                )

    @staticmethod
    def _set_rng(rng: dict) -> None:
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "python" in rng:
            random.setstate((rng["python_v"], tuple(rng["python"]), None))

    def _restore_best(self, st: dict) -> None:
        """Make ``best.pt`` agree with the resumed ``last.pt``: it must hold the recorded best epoch
        (or a later one, when a kill fell between the two saves and that epoch is redone). Missing
        or older, it is rewritten from ``last.pt`` when that is the best epoch; otherwise the recorded
        best is forgotten, so that the next validation saves ``best.pt`` again."""
        best_epoch = st["best_epoch"]
        if best_epoch is None:  # nothing saved as best yet (or a checkpoint that predates the record)
            return
        have = None
        path = self.out / "best.pt"
        if path.is_file():
            with contextlib.suppress(KacliError):
                ts = load_checkpoint(path).get("train_state") or {}
                if ts.get("run_id") == self.run_id:
                    have = int(ts.get("epoch") or 0)
        if have is not None and have >= best_epoch:
            return
        if best_epoch == st["epoch"] and st["step"] == 0:
            with atomic_path(path) as tmp:
                shutil.copyfile(self.out / "last.pt", tmp)
        else:
            st["best"], st["best_epoch"] = None, None

    # ---------------------------------------------------------------- loop
    def _loader(self, epoch: int, skip: int = 0) -> DataLoader:
        """The epoch's batches; ``skip`` leaves out its first ``skip`` batches (a mid-epoch resume)."""
        if hasattr(self.train_set, "set_epoch"):
            self.train_set.set_epoch(epoch)
        if self.dist.distributed:
            sampler = DistributedSampler(self.train_set, shuffle=True, seed=self.s.train.seed, drop_last=True)
            sampler.set_epoch(epoch)
        else:
            g = torch.Generator().manual_seed(self.s.train.seed * 1000 + epoch)
            sampler = RandomSampler(self.train_set, generator=g)
        if skip:
            sampler = _Skip(sampler, skip * self.s.train.batch_size)
        return DataLoader(
            self.train_set,
            batch_size=self.s.train.batch_size,
            sampler=sampler,
            num_workers=self.s.train.workers,
            collate_fn=self.collate_fn,
            drop_last=len(self.train_set) >= self.s.train.batch_size * self.dist.world_size,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )

    def start(self) -> None:
        """Before the first step: the model (and extra modules) on the device, AdamW, the step
        schedule, AMP's gradient scaler, the run id and the moving average."""
        s, t = self.s, self.s.train
        self.model.to(self.device)
        for m in s.extra_modules:
            m.to(self.device)
        groups = param_groups(self._bare_model(), t.lr, t.lr_backbone, s.extra_modules)
        self.optimizer = torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay)
        step = t.lr_drop if t.lr_drop and t.lr_drop > 0 else max(t.epochs, 1) * 1000
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=step)
        self.use_amp = t.amp and self.device.type == "cuda"
        self.amp_dtype = torch.bfloat16 if self.use_amp and torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda") if self.use_amp and self.amp_dtype == torch.float16 else None
        self.run_id = uuid.uuid4().hex
        self.ema = WeightEMA(self._bare_model(), t.ema) if t.ema else None

    def step_losses(self, batch, epoch: int = 0, n: int = 0, steps: int = 1) -> dict[str, torch.Tensor]:
        """The first half of a step: ``loss_fn`` on ``batch`` (under AMP on CUDA), refused when not
        finite (``epoch`` and ``n``, 0-based, and the epoch's ``steps`` name the step)."""
        try:
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
                losses = self.loss_fn(self.model, batch, self.device)
        except (FloatingPointError, ValueError) as e:
            if not _non_finite(e):
                raise
            raise KacliError(f"training diverged at epoch {epoch + 1}, step {n + 1}: the model's outputs "
                             "are not finite (lower the learning rate)", self.s.out_dir) from None
        check_finite(losses, epoch * steps + n + 1, epoch + 1, self.s.out_dir)
        return losses

    def step_update(self, losses: dict[str, torch.Tensor]) -> None:
        """The second half of a step: backward from ``losses["total"]``, clipping, the optimiser
        step (through AMP's scaler when there is one) and the moving average."""
        t = self.s.train
        total = losses["total"]
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(total).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            total.backward()
        if t.clip_max_norm > 0:
            nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], t.clip_max_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self._bare_model())

    def fit(self, resume: bool = False) -> dict:
        s, t = self.s, self.s.train
        seed_everything(t.seed + self.dist.rank)
        self.start()
        st = {"epoch": 0, "step": 0, "best": None, "best_epoch": None, "train_seconds": 0.0, "partial": None, "rng": {}}
        if resume:
            st = self._resume()
        best, best_epoch, train_seconds = st["best"], st["best_epoch"], st["train_seconds"]
        if self.dist.distributed:
            self.model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True,
            )
        writing = s.run_dir.writing(self.dist.is_main) if s.run_dir is not None else contextlib.nullcontext()
        last_metrics: dict = {}
        with writing, make_progress(unit="step") as progress, contextlib.ExitStack() as stack:
            if self.dist.is_main:
                self._start_files(st, resume)
                best, best_epoch = st["best"], st["best_epoch"]
            logs = stack.enter_context(contextlib.closing(RunLogs(self.out, t.tensorboard, st["epoch"], self.dist.is_main)))
            for epoch in range(st["epoch"], t.epochs):
                skip = st["step"] if epoch == st["epoch"] else 0
                loader = self._loader(epoch, skip)
                if hasattr(self.loss_fn, "set_epoch"):
                    self.loss_fn.set_epoch(epoch, t.epochs)
                batches = iter(loader)
                sums: dict[str, float] = defaultdict(float)
                n = 0
                if skip:  # continue the epoch exactly: its loss sums so far, and the random state
                    sums.update((st.get("partial") or {}).get("sums") or {})
                    n = skip
                    self._set_rng(st["rng"])  # after the loader drew its seed, as the straight run had
                steps = n + len(loader)
                task = progress.add_task(f"{s.log_name} epoch {epoch + 1}/{t.epochs}", total=steps, completed=n, info="")
                self.model.train()
                t0 = time.perf_counter()
                for batch in batches:
                    losses = self.step_losses(batch, epoch, n, steps)
                    self.step_update(losses)
                    for k, v in losses.items():
                        sums[k] += float(v.detach())
                    n += 1
                    progress.update(task, advance=1, info=f"loss {sums['total'] / n:.4f}")
                    kill_point(f"step@{epoch + 1}.{n}")
                    if t.checkpoint_every > 0 and n % t.checkpoint_every == 0 and n < steps:
                        secs = train_seconds + time.perf_counter() - t0
                        self._save("last.pt", epoch, best, secs, {}, step=n, best_epoch=best_epoch,
                                   partial={"sums": dict(sums)})
                        self._checkpointed()
                        kill_point(f"checkpoint@{epoch + 1}.{n}")
                self.scheduler.step()
                train_seconds += time.perf_counter() - t0
                record = {"epoch": epoch + 1, "lr": self.optimizer.param_groups[0]["lr"], "steps": n}
                record.update(all_reduce_mean({k: v / max(n, 1) for k, v in sums.items()}, self.device))
                record["train_seconds"] = round(train_seconds, 3)
                metrics: dict = {}
                if self.evaluate is not None and ((epoch + 1) % max(t.eval_every, 1) == 0 or epoch + 1 == t.epochs):
                    if self.dist.is_main:
                        metrics = self.evaluate(self._bare_model() if self.ema is None else self.ema.module)
                    barrier()
                    record.update({k: v for k, v in metrics.items() if isinstance(v, (int, float)) or v is None})
                    for key in ("per_task", "per_source"):  # per_source: tasks from several datasets
                        if key in metrics:
                            record[key] = metrics[key]
                progress.update(
                    task,
                    info=f"loss {record.get('total', math.nan):.4f}"
                    + (f"  {s.metric} {metrics[s.metric]:.3f}" if metrics.get(s.metric) is not None else ""),
                )
                score = metrics.get(s.metric)
                is_best = score is not None and (best is None or score > best)
                if is_best:
                    best = score
                last_metrics = record
                if self.dist.is_main:
                    with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
                        f.write(json.dumps(record) + "\n")
                    logs.epoch(record, sums, self.out)
                # best.pt before last.pt: a kill between the two redoes this epoch on --resume
                if is_best or (self.evaluate is None) or (best is None and epoch + 1 == t.epochs):
                    best_epoch = epoch + 1
                    self._save("best.pt", epoch + 1, best, train_seconds, record, best_epoch=best_epoch)
                    kill_point(f"between-checkpoints@{epoch + 1}")
                self._save("last.pt", epoch + 1, best, train_seconds, record, best_epoch=best_epoch)
                self._checkpointed()
                kill_point(f"checkpoint@{epoch + 1}")
                barrier()
        return {"best": best, "last": last_metrics, "train_seconds": train_seconds}

    def _start_files(self, st: dict, resume: bool) -> None:
        """Main process, before the first step: the run folder, a consistent ``best.pt`` on resume,
        and ``config.yaml``."""
        self.out.mkdir(parents=True, exist_ok=True)
        if resume:
            self._restore_best(st)
        if self.s.checkpoint_base.get("config") is not None:
            write_yaml(self.out / "config.yaml", self.s.checkpoint_base["config"])

    def _checkpointed(self) -> None:
        """A ``last.pt`` was saved: a new run now replaces the old one in its folder."""
        if self.dist.is_main and self.s.run_dir is not None:
            self.s.run_dir.commit()


def _first_difference(a, b, prefix: str = ""):
    """The first dotted key (sorted) whose value differs between two configs, with both values
    (None where a key is missing); None when they are equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b or a[k] != b[k]:
                return _first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
        return None
    return None if a == b else (prefix.rstrip("."), a, b)


def _short(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _non_finite(e: Exception) -> bool:
    """The Hungarian matchers' complaint about NaN or inf costs (ours, or scipy's)."""
    return isinstance(e, FloatingPointError) or "invalid numeric entries" in str(e)


class _Skip(torch.utils.data.Sampler):
    """``sampler`` without its first ``skip`` indices (the batches a mid-epoch checkpoint has done)."""

    def __init__(self, sampler, skip: int):
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        it = iter(self.sampler)
        for _ in range(self.skip):
            next(it, None)
        return it

    def __len__(self) -> int:
        return max(len(self.sampler) - self.skip, 0)
