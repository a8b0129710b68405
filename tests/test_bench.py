"""apd-deploy bench: configurations, sweeps, the PyTorch-eager baseline and the written results."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from apd_deploy.bench.plots import pareto_front
from apd_deploy.bench.runner import configs, parse_sweep
from apd_deploy.evaluation import parse_algs
from apd_deploy.errors import GenerationError

CLI = str(Path(sys.executable).with_name("apd-deploy"))


def test_sweeps_make_a_grid_of_apd_configurations():
    grid = dict(map(parse_sweep, ["apd_mixture_weight=0.5,0.9", "kv-window=4,16"]))
    assert grid == {"apd_mixture_weight": [0.5, 0.9], "kv_window": [4, 16]}
    labels = [c.label for c in configs(parse_algs("apd,leftright:2,ar"), grid)]
    assert labels == ["apd R=0.5 W=4", "apd R=0.5 W=16", "apd R=0.9 W=4", "apd R=0.9 W=16", "leftright:2", "ar"]
    with pytest.raises(GenerationError, match="NAME one of"):
        parse_sweep("temperature=0.1")
    with pytest.raises(GenerationError, match="must be ints"):
        parse_sweep("kv_window=a")


def test_pareto_front():
    assert pareto_front([(10, 90), (20, 80), (15, 70), (5, 95), (20, 60)]) == [(5, 95), (10, 90), (20, 80)]


def test_bench_writes_results_and_matches_the_eager_loop(tiny_bundle, tmp_path):
    out = tmp_path / "results"
    result = subprocess.run(
        [CLI, "bench", str(tiny_bundle), "--random-prompts", "2", "--repeat", "2", "--max-new-tokens", "40",
         "--algs", "apd,leftright:2,ar", "--sweep", "kv_window=4,16", "--threads", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    names = {p.name for p in out.iterdir()}
    assert {"results.json", "results.csv", "breakdown.png", "throughput_vs_kv_window.png"} <= names
    rows = json.loads((out / "results.json").read_text())["results"]
    assert [r["label"] for r in rows] == ["apd W=4", "apd W=16", "leftright:2", "ar"]
    for row in rows[:2]:
        assert row["same_tokens_as_eager"] is True and row["speedup_vs_eager"] > 0
        parts = row["dllm_ms_per_step"] + row["verifier_ms_per_step"] + row["host_ms_per_step"]
        assert abs(parts - row["step_ms"]) < 1e-6 * max(1.0, row["step_ms"]) + 1e-9
        assert row["tokens_per_second_min"] <= row["tokens_per_second"] <= row["tokens_per_second_max"]
    assert rows[2]["speedup_vs_eager"] is None
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    assert "apd W=4" in result.stdout


def test_bench_with_a_task_measures_accuracy_and_plots_the_pareto_frontier(tiny_bundle, tmp_path):
    out = tmp_path / "results"
    result = subprocess.run([CLI, "bench", str(tiny_bundle), "--task", "arithmetic", "--n", "2", "--repeat", "1",
                             "--algs", "apd,ar", "--no-eager", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    rows = json.loads((out / "results.json").read_text())["results"]
    assert all(r["accuracy"] is not None for r in rows) and (out / "pareto.png").is_file()


def test_bench_needs_exactly_one_prompt_source(tiny_bundle, tmp_path):
    result = subprocess.run([CLI, "bench", str(tiny_bundle), "--out", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2 and "give exactly one of --task" in result.stderr


def test_step_profile_times_full_window_steps(tiny_bundle):
    from apd_deploy.bench.runner import Prompt, step_profile
    from apd_deploy.runtime import Runtime

    runtime = Runtime.load(tiny_bundle)
    profile = step_profile(runtime, Prompt([5, 6, 7]), (32, 256), {"max_lookahead": 50}, span=16)
    assert set(profile) == {32, 256} and all(ms > 0 for ms in profile.values())
    assert runtime.eos_ids  # restored after the profile
    with pytest.raises(GenerationError, match="positions"):
        step_profile(runtime, Prompt([5]), (1024,), {})


def test_bench_concurrency_writes_each_level(tiny_bundle, tmp_path):
    out = tmp_path / "levels"
    result = subprocess.run([CLI, "bench", str(tiny_bundle), "--random-prompts", "6", "--repeat", "2", "--max-new-tokens",
                             "24", "--concurrency", "4,1,2", "--lanes", "2", "--threads", "2", "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    rows = json.loads((out / "results.json").read_text())["results"]
    assert [r["concurrency"] for r in rows] == ["alone", "1", "2", "4"]
    for row in rows:
        assert row["requests"] == 6 and row["same_tokens_as_alone"] is True
        assert row["tokens_per_second_min"] <= row["tokens_per_second"] <= row["tokens_per_second_max"]
        assert 0 < row["first_chunk_p50_ms"] <= row["latency_p95_ms"] and row["latency_p50_ms"] <= row["latency_p95_ms"]
        assert 1 <= row["mean_batch"] <= (int(row["concurrency"]) if row["concurrency"] != "alone" else 1)
    assert rows[1]["speedup_vs_level_1"] == 1.0
    assert (out / "throughput_vs_concurrency.png").is_file() and (out / "results.csv").is_file()
    assert "first chunk p50/p95 ms" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--concurrency", "0"], "--concurrency must be at least 1"),
    (["--concurrency", "1,x"], "give whole numbers"),
    (["--concurrency", "2", "--algs", "apd,ar"], "measures one configuration"),
    (["--concurrency", "2", "--sweep", "kv_window=4,8"], "drop --sweep"),
    (["--lanes", "2"], "--lanes applies to --concurrency"),
])
def test_bench_concurrency_refuses_bad_options(tiny_bundle, tmp_path, args, message):
    result = subprocess.run([CLI, "bench", str(tiny_bundle), "--random-prompts", "2", "--out", str(tmp_path), *args],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and message in result.stderr, result.stderr
