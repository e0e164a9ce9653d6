"""Shared fixtures: run the CLI in-process and check its one-line errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kacli.cli import app

# Two cores: keep torch from oversubscribing them in tests.
torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
BCCD = SHARED / "datasets" / "bccd" / "BCCD"


@pytest.fixture
def cli():
    """Call ``cli("split-tasks", "--train", ...)`` → click Result (exit_code, stdout, stderr)."""
    runner = CliRunner()

    def run(*args):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    return run


def assert_one_line_error(result, *needles: str) -> str:
    """The CLI failed as bad input must: exit code 2, one line on stderr, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    err = result.stderr.strip()
    assert "Traceback" not in err and "Traceback" not in result.stdout
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error:"), err
    for n in needles:
        assert n in err, (n, err)
    return err
