"""make gpu-check: says so and exits 0 without CUDA; its steps are real commands that run (here on
the CPU at toy size, NCCL and the benchmark left out)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from kacli.bench import gpu_check


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the check itself")
def test_without_cuda_one_line_and_exit_zero():
    p = subprocess.run([sys.executable, "-m", "kacli.bench.gpu_check"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert len(p.stdout.strip().splitlines()) == 1 and "no CUDA device" in p.stdout


@pytest.mark.slow
def test_the_steps_run_at_toy_size_on_the_cpu(tmp_path):
    rows = gpu_check.check(tmp_path, device="cpu", preset="tiny", size=64, train_images=16, val_images=4, steps=4,
                           batch=4, workers=0, bench=False)  # fmt: skip
    assert [r["step"] for r in rows] == ["data", "train-teacher convex", "train-teacher concave", "cache-teachers",
                                         "amalgamate (ka, AMP)", "eval", "torchrun --nproc-per-node 1 train-teacher"]
    assert all(r["ok"] for r in rows), gpu_check.table(rows)
    assert "| eval | yes |" in gpu_check.table(rows)
