"""Progress off a terminal and the demo's first run (issue #27): a line per stage saying what it
does, not a bare label; a bundle not yet exported is not called out of date."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from apd_deploy.cli import main

REPO = Path(__file__).resolve().parents[1]


def run(*args: str) -> tuple[int, str, str]:
    with CliRunner().isolation() as (out, err, _):  # stderr is no terminal here
        with pytest.raises(SystemExit) as exited:
            main(list(args))
    return exited.value.code, out.getvalue().decode(), err.getvalue().decode()


def test_eval_off_a_terminal_prints_a_line_per_stage(tiny_bundle):
    code, _, err = run("eval", str(tiny_bundle), "--n", "2", "--algs", "ar,leftright:2", "--max-new-tokens", "4")
    assert code == 0, err
    assert err.splitlines()[0] == "solving 4 generations ..."
    assert re.fullmatch(r"solving: done in \d+\.\d s", err.splitlines()[1]), err


def test_bench_off_a_terminal_prints_a_line_per_stage(tiny_bundle, tmp_path):
    code, _, err = run("bench", str(tiny_bundle), "--random-prompts", "2", "--repeat", "1", "--max-new-tokens", "4",
                       "--algs", "ar", "--no-eager", "--threads", "1", "--out", str(tmp_path))
    assert code == 0, err
    assert err.splitlines()[:2] == ["benchmarking 2 generations ...", err.splitlines()[1]]
    assert re.fullmatch(r"benchmarking: done in \d+\.\d s", err.splitlines()[1]), err


def test_bundle_stamp_says_a_missing_bundle_is_not_exported_yet(tmp_path):
    result = subprocess.run([sys.executable, "scripts/bundle_stamp.py", "check", str(tmp_path / "bundle"),
                             "models/arithmetic"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr == f"{tmp_path / 'bundle'} is not exported yet\n"
