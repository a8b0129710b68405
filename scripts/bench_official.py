"""Tokens/s of this runtime next to the paper's own APD code, on one checkpoint pair and its bundle.

The official code (github.com/danielmisrael/apd, with its own venv: torch and transformers==4.54.0)
runs in a subprocess with that venv's Python, on the pair's checkpoint directories; this runtime
runs on the bundle exported from the same pair. Both decode the same random 16-token prompt at
temperature 0 with R/W/M = 0.7/16/100, past EOS, with the same number of threads, alternating
round by round; each side's tokens/s is the median over rounds of generated tokens / wall time
of the generate call (loading and a short warm-up excluded). At fp32 the token ids should be
identical; in bf16 the length of the common prefix is reported.

    .venv/bin/python scripts/bench_official.py --pair out/m30 --bundle out/m30b \\
        --engine onnxruntime-cpu-fp32 --engine openvino-cpu-fp32 --dtype fp32 --threads 2 --rounds 3 \\
        --official-repo /path/to/apd-checkout --official-python /path/to/official-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

WORKER_FLAG = "--official-worker"  # argv[1] of the subprocess that runs the official code


def official_worker(spec: dict[str, Any]) -> None:
    """Run in the official venv: one timed APD generation, printed as a JSON line."""
    import torch

    sys.path.insert(0, spec["official_repo"])
    from dream.modeling_dream import DreamModel
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(spec["threads"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
    pair = Path(spec["pair"])
    with tempfile.TemporaryDirectory() as staged:
        # DreamModel.from_pretrained insists on a generation_config.json, which a checkpoint need not
        # have; diffusion_generate builds its own from config.json, so an empty one changes nothing.
        for file in (pair / "dllm").iterdir():
            os.symlink(file.resolve(), Path(staged) / file.name)
        if not (pair / "dllm" / "generation_config.json").exists():
            (Path(staged) / "generation_config.json").write_text("{}")
        dllm = DreamModel.from_pretrained(staged, torch_dtype=dtype, attn_implementation="sdpa").eval()
    verifier = AutoModelForCausalLM.from_pretrained(pair / "verifier", torch_dtype=dtype, attn_implementation="sdpa").eval()
    prompt = torch.tensor([spec["prompt"]])

    def generate(max_new_tokens: int) -> Any:
        # temperature 0: plain argmax for draft and target. The official loop stops once any EOS is in
        # the canvas (prompt included), so an id that never occurs makes it decode the full length.
        return dllm.diffusion_generate(prompt, max_new_tokens=max_new_tokens, return_dict_in_generate=True, alg="apd",
                                       temperature=0.0, top_p=None, verifier_model=verifier, eos_token_id=-1,
                                       apd_mixture_weight=spec["R"], kv_window=spec["W"], max_lookahead=spec["M"])

    generate(16)
    started = time.perf_counter()
    out = generate(spec["max_new_tokens"])
    seconds = time.perf_counter() - started
    print(json.dumps({"tokens": out.sequences[0, prompt.shape[1]:].tolist(), "seconds": seconds,
                      "steps": out.profile.num_forward_evals}))


def run_official(args: argparse.Namespace, prompt: list[int]) -> dict[str, Any]:
    spec = {"official_repo": str(args.official_repo.resolve()), "pair": str(args.pair.resolve()), "dtype": args.dtype,
            "threads": args.threads, "prompt": prompt, "max_new_tokens": args.max_new_tokens,
            "R": args.apd_mixture_weight, "W": args.kv_window, "M": args.max_lookahead}
    done = subprocess.run([str(args.official_python), __file__, WORKER_FLAG, json.dumps(spec)], capture_output=True,
                          text=True, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    if done.returncode != 0:
        sys.exit(f"error: the official code failed (exit status {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    rates = [len(run["tokens"]) / run["seconds"] for run in runs]
    return {"tokens_per_second": round(statistics.median(rates), 1), "rounds": [round(r, 1) for r in rates],
            "tokens": len(runs[0]["tokens"]), "steps": runs[0]["steps"],
            "deterministic": all(run["tokens"] == runs[0]["tokens"] for run in runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", type=Path, required=True, help="checkpoint pair: a directory with dllm/ and verifier/")
    parser.add_argument("--bundle", type=Path, required=True, help="the bundle exported from --pair")
    parser.add_argument("--engine", action="append", required=True, help="engine of the bundle; repeat to compare several")
    parser.add_argument("--official-repo", type=Path, required=True, help="a work tree of the official APD code")
    parser.add_argument("--official-python", type=Path, required=True, help="the Python of the official code's venv")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="the official models' precision")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--apd-mixture-weight", type=float, default=0.7)
    parser.add_argument("--kv-window", type=int, default=16)
    parser.add_argument("--max-lookahead", type=int, default=100)
    args = parser.parse_args()
    for flag, path in (("--pair", args.pair / "dllm" / "config.json"), ("--pair", args.pair / "verifier" / "config.json"),
                       ("--official-repo", args.official_repo / "dream" / "modeling_dream.py"),
                       ("--official-python", args.official_python)):
        if not path.is_file():
            parser.error(f"{flag}: {path} does not exist")

    import numpy as np

    from apd_deploy.runtime import Runtime

    prompt = np.random.default_rng(0).integers(300, 7000, 16).tolist()
    runtimes = {engine: Runtime.load(args.bundle, engine=engine, threads=args.threads) for engine in args.engine}

    def generate(runtime: Runtime, max_new_tokens: int) -> Any:
        return runtime.generate(prompt, alg="apd", max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True,
                                apd_mixture_weight=args.apd_mixture_weight, kv_window=args.kv_window,
                                max_lookahead=args.max_lookahead)

    for runtime in runtimes.values():
        generate(runtime, 16)
    official: list[dict[str, Any]] = []
    ours: dict[str, list[dict[str, Any]]] = {engine: [] for engine in runtimes}
    for _ in range(args.rounds):
        official.append(run_official(args, prompt))
        for engine, runtime in runtimes.items():
            started = time.perf_counter()
            result = generate(runtime, args.max_new_tokens)
            ours[engine].append({"tokens": result.token_ids, "seconds": time.perf_counter() - started,
                                 "steps": result.steps})

    reference = summary(official)
    print(json.dumps({"side": "official", "dtype": args.dtype, "threads": args.threads, **reference}))
    for engine, runs in ours.items():
        mine = summary(runs)
        prefix = common_prefix(runs[0]["tokens"], official[0]["tokens"])
        print(json.dumps({"side": "apd-deploy", "engine": engine, "threads": args.threads, **mine,
                          "identical_to_official": runs[0]["tokens"] == official[0]["tokens"], "common_prefix": prefix}))
        print(json.dumps({"ratio": f"{engine} / official {args.dtype}",
                          "tokens_per_second": round(mine["tokens_per_second"] / reference["tokens_per_second"], 2)}))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == WORKER_FLAG:
        official_worker(json.loads(sys.argv[2]))
    else:
        main()
