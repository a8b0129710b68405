"""GPU check: build engines for a tiny bundle, generate with every backend this machine has, and
compare the tokens with the CPU numpy run at temperature 0, and each engine's logits for the same
calls (a prefill and a cached window per model) with the CPU graphs'. Prints a table; each backend
whose package or GPU is missing is skipped with the reason. Exit status 1 if a backend that ran
produced other tokens. Meant to finish well under ten minutes on one GPU.

    bash scripts/gpu_check.sh [--bundle DIR] [--work DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from apd_deploy.errors import BackendUnavailable
from apd_deploy.runtime import Runtime
from apd_deploy.runtime.arrays import to_host
from apd_deploy.runtime.engine import EngineCall

PROMPTS = ([72, 101, 108, 108, 111], list(range(30, 47)))
RUNS = (("apd", {}), ("apd", {"apd_mixture_weight": 0.3, "kv_window": 4, "max_lookahead": 16}),
        ("leftright", {"tokens_per_step": 2}), ("diffusion", {"steps": 24}), ("ar", {}))
# (label, build-engine arguments or None for the bundle's own graphs, Runtime.load arguments)
BACKENDS = (
    ("onnxruntime CPU engine, numpy", ("onnxruntime", "cpu", "fp32"), {"engine": "onnxruntime-cpu-fp32"}),
    ("onnxruntime CPU graphs padded to fixed shapes", None, {"engine_options": {"fixed_shapes": True}}),
    ("onnxruntime CPU graphs, cupy sampling", None, {"array_backend": "cupy"}),
    ("onnxruntime CUDA engine, exact shapes, cupy", ("onnxruntime", "cuda", "fp32"),
     {"engine": "onnxruntime-cuda-fp32", "engine_options": {"fixed_shapes": False}}),
    ("onnxruntime CUDA engine, fixed shapes, no CUDA graphs", ("onnxruntime", "cuda", "fp32"),
     {"engine": "onnxruntime-cuda-fp32", "engine_options": {"cuda_graph": False}}),
    ("onnxruntime CUDA engine, fixed shapes + CUDA graphs (default)", ("onnxruntime", "cuda", "fp32"),
     {"engine": "onnxruntime-cuda-fp32"}),
    ("TensorRT fp32 engine, cupy", ("tensorrt", "cuda", "fp32"), {"engine": "tensorrt-cuda-fp32"}),
)


def tiny_bundle(work: Path) -> Path:
    from apd_deploy.export.pipeline import export_bundle
    from apd_deploy.export.tiny import make_tiny

    pair = make_tiny(work / "pair", overwrite=True)
    export_bundle(pair / "dllm", pair / "verifier", work / "bundle", overwrite=True)
    return work / "bundle"


def generations(runtime: Runtime, max_new_tokens: int) -> tuple[list[list[int]], float]:
    tokens, count, started = [], 0, time.perf_counter()
    for prompt in PROMPTS:
        for alg, params in RUNS:
            ids = runtime.generate(prompt, alg=alg, max_new_tokens=max_new_tokens, **params).token_ids
            tokens.append(ids)
            count += len(ids)
    return tokens, count / (time.perf_counter() - started)


def logits_gap(runtime: Runtime, reference: Runtime) -> float:
    """Largest |logit difference| against the CPU graphs over a prefill and a cached window of each model."""
    gap = 0.0
    for engine, cpu in ((runtime.dllm, reference.dllm), (runtime.verifier, reference.verifier)):
        caches = engine.new_cache(64), cpu.new_cache(64)
        for ids in (np.arange(30, 47), np.arange(5, 12)):
            (logits, new_kv), = engine.run([EngineCall(ids, caches[0])])
            (expected, cpu_kv), = cpu.run([EngineCall(ids, caches[1])])
            gap = max(gap, float(np.abs(to_host(logits).astype(np.float32) - expected).max()))
            caches[0].append(new_kv)
            caches[1].append(cpu_kv)
    return gap


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, help="a bundle to check (copied); default: export a tiny random pair")
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="apd-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.bundle:
        bundle = work / "bundle"
        shutil.rmtree(bundle, ignore_errors=True)
        shutil.copytree(args.bundle, bundle)
    else:
        bundle = tiny_bundle(work)

    from apd_deploy.engines.build import build_engine

    reference = Runtime.load(bundle)
    expected, speed = generations(reference, args.max_new_tokens)
    rows = [("onnxruntime CPU graphs, numpy (reference)", "ran", "-", f"{speed:.0f}")]
    differed = False
    built = set()
    for label, build, load in BACKENDS:
        try:
            if build and build not in built:
                build_engine(bundle, *build, report=lambda line: print(f"  {line}", flush=True))
                built.add(build)
            runtime = Runtime.load(bundle, **load)
            tokens, speed = generations(runtime, args.max_new_tokens)
            gap = logits_gap(runtime, reference) if build else None
        except BackendUnavailable as exc:
            rows.append((label, "skipped", str(exc), "-"))
            continue
        except Exception as exc:  # onnxruntime and cupy raise their own types: report them all
            rows.append((label, "failed", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", "-"))
            differed = True
            continue
        refused = getattr(runtime.dllm, "cuda_graph_error", None)
        if refused:
            label += f" [CUDA graphs refused: {refused}]"
        same = sum(a == b for a, b in zip(tokens, expected))
        differed |= same != len(expected)
        logits = "" if gap is None else f", logits within {gap:.1e}"
        rows.append((label, "ran", f"{same}/{len(expected)} generations identical{logits}", f"{speed:.0f}"))

    widths = [max(len(r[i]) for r in rows + [("backend", "status", "tokens vs CPU numpy", "tokens/s")]) for i in range(4)]
    for row in [("backend", "status", "tokens vs CPU numpy", "tokens/s"), *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
    return 1 if differed else 0


if __name__ == "__main__":
    sys.exit(main())
