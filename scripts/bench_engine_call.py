"""One dLLM window call per engine: milliseconds, resident memory once loaded, and argmax agreement.

    .venv/bin/python scripts/bench_engine_call.py BUNDLE --engines onnxruntime-cpu-fp32,openvino-cpu-bf16 \
        [--threads 2] [--window 116] [--past 140] [--calls 5] [--rounds 2]

`graphs` names the exported graphs on onnxruntime's CPU provider (no engine to build for a large pair).
Each engine runs in a process of its own (so that its resident memory is its own), on the same
inputs: `window` random token ids after a cache of `past` random positions (an APD step at W=16,
M=100 feeds about 116), logits for every window row. Engines alternate over `rounds`, so drifting
load on a shared machine hits each alike; each round prints the median of `calls` calls. The first
engine is the reference for the argmax agreement and the largest logit difference.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

GRAPHS = "graphs"  # the exported graphs on onnxruntime's CPU provider, no engine built


def resident_mb() -> dict[str, int]:
    """This process's resident memory in MB (Linux): all of it, its peak, and the anonymous part
    (file-backed pages, such as a memory-mapped engine file, can be dropped and read again)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {key: round(int(fields[field].split()[0]) / 1024) for key, field in
            (("rss_mb", "VmRSS"), ("rss_peak_mb", "VmHWM"), ("rss_anonymous_mb", "RssAnon"))}


def measure(bundle: str, engine: str, threads: int, window: int, past: int, calls: int, logits_out: str) -> dict:
    from apd_deploy.runtime import Runtime
    from apd_deploy.runtime.engine import EngineCall

    started = time.perf_counter()
    runtime = Runtime.load(bundle, engine=None if engine == GRAPHS else engine, threads=threads, verify="skip")
    load_seconds = time.perf_counter() - started
    loaded = resident_mb()
    dllm = runtime.dllm
    rng = np.random.default_rng(0)
    cache = dllm.new_cache(past + window)
    cache.buffer[...] = rng.standard_normal(cache.buffer.shape).astype(cache.buffer.dtype) * 0.5
    cache.length = past
    ids = rng.integers(10, dllm.spec.vocab_size - 10, window)
    call = EngineCall(ids, cache)
    times = []
    for _ in range(calls + 1):  # the first call prepares the shape
        started = time.perf_counter()
        ((logits, _),) = dllm.run([call])
        times.append(time.perf_counter() - started)
    np.save(logits_out, np.asarray(logits))
    return {"engine": engine, "ms": round(float(np.median(times[1:])) * 1000, 2), "first_call_ms": round(times[0] * 1000, 1),
            "load_s": round(load_seconds, 2), "loaded": loaded, "after_calls": resident_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--engines", required=True,
                        help=f"comma-separated engine names ('{GRAPHS}': the exported graphs); the first is the reference")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--window", type=int, default=116)
    parser.add_argument("--past", type=int, default=140)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        engine, out = args.child.split("=", 1)
        print(json.dumps(measure(args.bundle, engine, args.threads, args.window, args.past, args.calls, out)))
        return
    engines = args.engines.split(",")
    with tempfile.TemporaryDirectory() as scratch:
        rows: dict[str, list[dict]] = {engine: [] for engine in engines}
        for _ in range(args.rounds):
            for engine in engines:
                out = f"{scratch}/{engine}.npy"
                child = subprocess.run([sys.executable, __file__, args.bundle, "--engines", engine, "--threads",
                                        str(args.threads), "--window", str(args.window), "--past", str(args.past),
                                        "--calls", str(args.calls), "--child", f"{engine}={out}"],
                                       capture_output=True, text=True, check=True)
                rows[engine].append(json.loads(child.stdout.strip().splitlines()[-1]))
        reference = np.load(f"{scratch}/{engines[0]}.npy")
        for engine in engines:
            logits = np.load(f"{scratch}/{engine}.npy")
            summary = {**rows[engine][-1], "ms_per_round": [row["ms"] for row in rows[engine]],
                       "argmax_agrees": f"{int((logits.argmax(-1) == reference.argmax(-1)).sum())}/{len(logits)}",
                       "max_logit_diff": float(np.abs(logits - reference).max())}
            print(json.dumps(summary))


if __name__ == "__main__":
    main()
