"""The bundled, trained demo pair: export -> engine -> eval, and the figures it must reach."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from apd_deploy.errors import GenerationError
from apd_deploy.evaluation import evaluate, parse_algs, wilson_interval
from apd_deploy.tasks.arithmetic import SPLITS, extract_answer, problems

REPO = Path(__file__).parents[1]
MODELS = REPO / "models" / "arithmetic"
CLI = str(Path(sys.executable).with_name("apd-deploy"))


def test_splits_never_share_a_problem():
    seen = {split: {p.question for p in itertools.islice(problems(split), 300)} for split in SPLITS}
    assert not (seen["train"] & seen["test"]) and not (seen["train"] & seen["validation"])
    assert not (seen["validation"] & seen["test"])
    assert all(len(questions) == 300 for questions in seen.values())


def test_problems_are_reproducible_and_checkable():
    first = list(itertools.islice(problems("test"), 5))
    assert first == list(itertools.islice(problems("test"), 5))
    for problem in first:
        assert extract_answer(problem.solution) == problem.answer
        assert problem.solution.count("=") == 2
    assert extract_answer("12 + 3 = 15. The answer is 15.") == 15 and extract_answer("no answer") is None
    assert extract_answer("3 + 12 = 15. Answer: 15.") == 15 and extract_answer("The: 15.") is None


def test_solutions_come_in_more_than_one_form():
    """Either order of `+`'s operands, either answer line: what parallel decoding can mix up."""
    solutions = [p.solution for p in itertools.islice(problems("train"), 400)]
    assert 0.35 < sum("Answer: " in s for s in solutions) / len(solutions) < 0.65
    sums = [re.match(r"(\d+) \+ (\d+) =", s) for s in solutions]
    smaller_first = [int(m.group(1)) < int(m.group(2)) for m in sums if m and m.group(1) != m.group(2)]
    assert 0.35 < sum(smaller_first) / len(smaller_first) < 0.65


def test_demo_pair_is_small_and_documented():
    files = [p for p in MODELS.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 50 * 2**20
    for role in ("dllm", "verifier"):
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (MODELS / role).iterdir()}
    assert (MODELS / "TRAINING.md").is_file()


def test_parse_algs():
    assert [(s.label, s.alg, s.params) for s in parse_algs("apd,leftright:4,diffusion:16,ar")] == [
        ("apd", "apd", {}), ("leftright:4", "leftright", {"tokens_per_step": 4}),
        ("diffusion:16", "diffusion", {"steps": 16}), ("ar", "ar", {})]
    with pytest.raises(GenerationError, match="'apd:3' is not understood"):
        parse_algs("apd:3")


def test_eval_on_the_bundled_pair(demo_runtime):
    """A handful of test problems, through export -> engine -> eval, within CI time."""
    results = {r.alg: r for r in evaluate(demo_runtime, n=24, algs="apd,leftright:1,leftright:8")}
    one, apd, eight = results["leftright:1"], results["apd"], results["leftright:8"]
    # The README's figures (500 problems): 92.4% one token per step, 95.2% APD with 5.1x fewer
    # forwards, 2.0% eight tokens per step (drafted independently, positions mix two forms).
    assert one.accuracy >= 0.85 and apd.accuracy >= one.accuracy - 0.1 and eight.accuracy <= 0.25
    assert apd.dllm_forwards_per_problem * 4 <= one.dllm_forwards_per_problem
    assert apd.tokens_per_step > 4 and one.tokens_per_step == 1.0 and eight.tokens_per_step > 4


def test_wilson_interval():
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)


def test_cli_eval_json(demo_bundle):
    runs = [subprocess.run([CLI, "eval", str(demo_bundle), "--n", "6", "--algs", "apd,ar", "--max-new-tokens", "32,40,32",
                            "--json", *extra], capture_output=True, text=True, timeout=300)
            for extra in ([], ["--batch-size", "4"])]
    for result in runs:
        assert result.returncode == 0, result.stderr
    alone, batched = ([json.loads(line) for line in result.stdout.splitlines()] for result in runs)
    assert [(r["alg"], r["max_new_tokens"]) for r in alone] == [("apd", 32), ("ar", 32), ("apd", 40), ("ar", 40)]
    assert {"accuracy", "tokens_per_step", "dllm_forwards_per_problem", "tokens_per_second"} <= set(alone[0])
    for row in alone:
        assert row["accuracy_low"] <= row["accuracy"] <= row["accuracy_high"]
        assert (row["accuracy_low"], row["accuracy_high"]) == pytest.approx(wilson_interval(row["correct"], 6))
    for one, many in zip(alone, batched):  # the same answers, steps and forwards, batched
        assert {k: v for k, v in one.items() if "second" not in k} == {k: v for k, v in many.items() if "second" not in k}


def test_batched_answers_equal_answers_alone(demo_runtime):
    """Test problems of several prompt lengths, 8 slots for 24 requests with mixed parameters: they
    join and leave mid-batch, and each gets its answer alone."""
    questions = [p.question for p in itertools.islice(problems("test"), 24)]
    params = [{"max_new_tokens": 32}, {"max_new_tokens": 48, "kv_window": 4}, {"max_new_tokens": 32, "alg": "leftright"},
              {"max_new_tokens": 40, "apd_mixture_weight": 0.5, "max_lookahead": 12}]
    requests = [(q, params[i % len(params)]) for i, q in enumerate(questions)]
    alone = [demo_runtime.generate(q, chat=True, **p) for q, p in requests]
    with demo_runtime.scheduler(max_batch=8) as scheduler:
        batched = [h.result(timeout=300) for h in [scheduler.submit(q, chat=True, **p) for q, p in requests]]
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
    assert sum(extract_answer(r.text) == p.answer for r, p in zip(batched, itertools.islice(problems("test"), 24))) >= 20


@pytest.mark.slow
def test_issue_targets_on_500_test_problems(demo_runtime):
    """The README's figures (`pytest -m slow`): at every length a user may set, the dLLM one token
    per step solves 90%, APD as many (within 2 points) with a fifth of its forwards, eight tokens per
    step 10 points fewer, and the verifier alone at most 60%. At temperature 1, APD stays within
    noise of one token per step and eight tokens per step falls clearly below it."""
    results = {(r.alg, r.max_new_tokens): r for r in evaluate(demo_runtime, n=500, algs="apd,leftright:1,leftright:8,ar",
                                                              lengths=[32, 48, 64, 96])}
    for length in (32, 48, 64, 96):
        one, apd = results["leftright:1", length], results["apd", length]
        assert one.accuracy >= 0.9, length
        assert apd.accuracy >= one.accuracy - 0.02, length
        assert apd.dllm_forwards_per_problem * 5 <= one.dllm_forwards_per_problem, length
        assert results["leftright:8", length].accuracy <= one.accuracy - 0.10, length
        assert results["ar", length].accuracy <= 0.6, length
    sampled = {r.alg: r for r in evaluate(demo_runtime, n=500, algs="apd,leftright:1,leftright:8",
                                                 params={"temperature": 1.0, "seed": 0})}
    assert sampled["apd"].accuracy >= sampled["leftright:1"].accuracy - 0.03
    assert sampled["leftright:8"].accuracy <= sampled["leftright:1"].accuracy - 0.05


def _stamp(action, bundle, *sources):
    return subprocess.run([sys.executable, "scripts/bundle_stamp.py", action, str(bundle), *map(str, sources)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def test_bundle_stamp_says_when_the_demo_must_export_again(tiny_bundle, tiny_pair, tmp_path):
    bundle = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    sources = shutil.copytree(tiny_pair / "verifier", tmp_path / "sources"), REPO / "export"
    never = _stamp("check", bundle, *sources)
    assert never.returncode == 1 and "no bundle.stamp" in never.stderr
    assert _stamp("write", bundle, *sources).returncode == 0
    assert _stamp("check", bundle, *sources).returncode == 0
    config = sources[0] / "config.json"
    config.write_text(config.read_text() + "\n")
    changed = _stamp("check", bundle, *sources)
    assert changed.returncode == 1 and f"{config.as_posix()} changed" in changed.stderr
    assert _stamp("write", bundle, *sources).returncode == 0
    with open(bundle / "dllm.onnx", "r+b") as f:  # damage after the stamp is caught too
        f.seek(64)
        f.write(b"\x00\x01")
    damaged = _stamp("check", bundle, *sources)
    assert damaged.returncode == 1 and "dllm.onnx: sha256 differs" in damaged.stderr


@pytest.mark.slow
def test_demo_script_exports_once_then_reuses_the_bundle(tmp_path):
    env = {**os.environ, "BUNDLE": str(tmp_path / "bundle"), "N": "2"}
    runs = [subprocess.run(["bash", "scripts/demo.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
            for _ in range(2)]
    assert all(run.returncode == 0 for run in runs), runs[-1].stderr
    assert "reusing" not in runs[0].stdout and extract_answer(runs[0].stdout) is not None
    assert f"reusing {tmp_path / 'bundle'}" in runs[1].stdout and extract_answer(runs[1].stdout) is not None
