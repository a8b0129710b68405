"""The CUDA engine's levers measured side by side, against the PyTorch-eager loop on the same GPU.

    python scripts/bench_gpu.py BUNDLE --engine onnxruntime-cuda-fp16 [--prompts 2] [--max-new-tokens 256]
        [--rounds 3] [--json FILE]

Variants, each its own Runtime on the same engine, run in turn (one generation of each per
round) so that drifting clocks hit all alike; the tokens must be identical (T = 0):
- exact: every call at its exact size with an I/O binding made per call, the draft verified in
  chunks of 8 (the CPU's habit), as the CUDA engine ran before fixed shapes;
- fixed: calls padded to fixed shapes, static buffers, binding made once, the whole draft in one
  verifier call, no CUDA graphs;
- graphs: fixed, plus CUDA graphs (the engine's default).
Then one breakdown pass of the default that waits for each engine call (dLLM / verifier / host ms
per step), and the eager loop (`apd_deploy/bench/eager.py`) in the export's dtype on the GPU.
Prints one line per variant and writes everything to --json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

from apd_deploy.runtime import Runtime

VARIANTS = {
    "exact": {"fixed_shapes": False, "cuda_graph": False},
    "fixed": {"fixed_shapes": True, "cuda_graph": False},
    "graphs": {"fixed_shapes": True, "cuda_graph": True},
}


def prompts_for(runtime: Runtime, count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    excluded = runtime.eos_ids | {runtime.mask_id}
    return [[t for t in (rng.randrange(runtime.vocab_size) for _ in range(64)) if t not in excluded][:16]
            for _ in range(count)]


def generate_all(runtime: Runtime, prompts: list[list[int]], max_new_tokens: int) -> dict:
    outs = [runtime.generate(p, alg="apd", max_new_tokens=max_new_tokens) for p in prompts]
    seconds = sum(o.seconds for o in outs)
    steps = sum(o.steps for o in outs)
    return {
        "tokens_per_second": sum(len(o.token_ids) for o in outs) / seconds,
        "ms_per_step": 1000 * seconds / steps,
        "steps": steps,
        "dllm_ms_per_step": 1000 * sum(o.dllm_seconds for o in outs) / steps,
        "verifier_ms_per_step": 1000 * sum(o.verifier_seconds for o in outs) / steps,
        "tokens": [o.token_ids for o in outs],
    }


def graph_nodes(bundle: Path, engine: str | None) -> dict[str, dict[str, int]]:
    """Node counts by operator of the graphs the engine runs: each node is at least one kernel."""
    import onnx

    manifest = json.loads((bundle / "manifest.json").read_text())
    counts = {}
    for role in ("dllm", "verifier"):
        path = bundle / (manifest["engines"][engine]["graphs"][role] if engine else manifest["models"][role]["graph"])
        nodes = onnx.load(str(path), load_external_data=False).graph.node
        ops: dict[str, int] = {}
        for node in nodes:
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
        counts[role] = {"total": len(nodes), **dict(sorted(ops.items(), key=lambda kv: -kv[1]))}
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--engine", help="a CUDA engine of the bundle (without: the CPU graphs, to try the script)")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-eager", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    report: dict = {"bundle": str(args.bundle), "engine": args.engine, "max_new_tokens": args.max_new_tokens,
                    "graph_nodes": graph_nodes(args.bundle, args.engine)}
    runtimes = {}
    for name, options in VARIANTS.items():
        started = time.perf_counter()
        if args.engine is None:  # CPU graphs: no CUDA graphs to switch
            options = {k: v for k, v in options.items() if k != "cuda_graph"}
        runtimes[name] = Runtime.load(args.bundle, engine=args.engine, engine_options=options)
        report[f"{name}_load_s"] = time.perf_counter() - started
    runtimes["exact"].verifier.first_verify_chunk = 8
    prompts = prompts_for(runtimes["graphs"], args.prompts)
    for name, runtime in runtimes.items():  # warm-up: creates the fixed-shape sessions, captures the graphs
        started = time.perf_counter()
        generate_all(runtime, prompts, args.max_new_tokens)
        report[f"{name}_warmup_s"] = time.perf_counter() - started
    runs: dict[str, list[dict]] = {name: [] for name in runtimes}
    for _ in range(args.rounds):
        for name, runtime in runtimes.items():
            runs[name].append(generate_all(runtime, prompts, args.max_new_tokens))
    report["cuda_graph_error"] = (getattr(runtimes["graphs"].dllm, "cuda_graph_error", None)
                                  or getattr(runtimes["graphs"].verifier, "cuda_graph_error", None))
    reference = runs["exact"][0]["tokens"]
    for name, results in runs.items():
        report[name] = {
            "tokens_per_second": statistics.median(r["tokens_per_second"] for r in results),
            "ms_per_step": statistics.median(r["ms_per_step"] for r in results),
            "steps": results[0]["steps"],
            "same_tokens_as_exact": all(r["tokens"] == reference for r in results),
        }
    default = runtimes["graphs"]
    timed = generate_all(default.timed(), prompts, args.max_new_tokens)
    report["breakdown"] = {k: timed[k] for k in ("ms_per_step", "dllm_ms_per_step", "verifier_ms_per_step")}
    report["breakdown"]["host_ms_per_step"] = timed["ms_per_step"] - timed["dllm_ms_per_step"] - timed["verifier_ms_per_step"]
    if not args.no_eager:
        from apd_deploy.bench.eager import EagerAPD

        models = default.manifest["models"]
        device = "cpu" if args.engine is None else "cuda"
        eager = EagerAPD(models["dllm"]["source"], models["verifier"]["source"], 1, device, default.manifest["export"]["dtype"])
        d = default.defaults
        speeds, tokens = [], None
        for _ in range(args.rounds + 1):  # the first is a warm-up
            outs = [eager.generate(p, args.max_new_tokens, d.apd_mixture_weight, d.kv_window, d.max_lookahead,
                                   default.mask_id, default.eos_ids) for p in prompts]
            speeds.append(sum(len(o.token_ids) for o in outs) / sum(o.seconds for o in outs))
            tokens = [o.token_ids for o in outs]
        report["eager"] = {"tokens_per_second": statistics.median(speeds[1:]), "same_tokens_as_exact": tokens == reference}
        for name in VARIANTS:
            report[name]["speedup_vs_eager"] = report[name]["tokens_per_second"] / report["eager"]["tokens_per_second"]
    for name in (*VARIANTS, "eager"):
        if name in report:
            print(name, json.dumps(report[name]))
    print("breakdown", json.dumps(report["breakdown"]), "cuda_graph_error", report["cuda_graph_error"])
    print("graph nodes", json.dumps(report["graph_nodes"]))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
