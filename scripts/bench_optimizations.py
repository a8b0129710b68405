"""Each runtime optimisation measured side by side with the naive version it must equal.

    .venv/bin/python scripts/bench_optimizations.py BUNDLE [--threads 1] [--prompts 2] [--max-new-tokens 256]

For every optimisation the runtime runs the same prompts with it switched off and on, alternately
(off, on, off, on, ...) so that machine noise hits both alike, and the tokens must be identical.
Printed: median tokens/s of each, the ratio, and the dLLM's and verifier's shares of the time.
Graph-level optimisations (how the exporter writes attention) need the models exported twice:
the script does that from the checkpoints the bundle was exported from, into a temporary folder.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from apd_deploy.runtime import Runtime, engine


@contextmanager
def whole_draft_verification() -> Iterator[None]:
    """Before: the verifier scores the whole draft (up to M tokens) in one call every step."""
    saved = engine.OrtCpuDecoder.first_verify_chunk
    engine.OrtCpuDecoder.first_verify_chunk = None
    try:
        yield
    finally:
        engine.OrtCpuDecoder.first_verify_chunk = saved


@contextmanager
def logits_for_every_row() -> Iterator[None]:
    """Before: every engine call computes logits for its whole window; the host keeps the rows it needs."""
    run = engine.OrtCpuDecoder.run

    def every_row(self, calls):
        outputs = run(self, [engine.EngineCall(call.ids, call.cache) for call in calls])
        return [((logits if call.rows is None else logits[call.rows]), new_kv)
                for call, (logits, new_kv) in zip(calls, outputs)]

    engine.OrtCpuDecoder.run = every_row
    try:
        yield
    finally:
        engine.OrtCpuDecoder.run = run


@contextmanager
def threads_spinning() -> Iterator[None]:
    """Before: onnxruntime's default, worker threads spin after each call."""
    engine.SPIN_BETWEEN_CALLS = True
    try:
        yield
    finally:
        engine.SPIN_BETWEEN_CALLS = False


@contextmanager
def attention_mask_by_where() -> Iterator[None]:
    """Before: the exporter masks attention scores with masked_fill (ONNX Where) in every layer."""
    import torch

    from apd_deploy.export import transformer

    saved = transformer.apply_mask
    transformer.apply_mask = lambda scores, bias: scores.masked_fill(bias < 0, torch.finfo(torch.float32).min)
    try:
        yield
    finally:
        transformer.apply_mask = saved


# Switched off around each run of the loaded runtime.
RUNTIME_OPTIMISATIONS: dict[str, Callable] = {
    "verify the draft in chunks, stop at the first rejection": whole_draft_verification,
    "logits only for the rows that are sampled": logits_for_every_row,
}


def run(runtime: Runtime, prompts: list[list[int]], max_new_tokens: int):
    outs = [runtime.generate(p, alg="apd", max_new_tokens=max_new_tokens) for p in prompts]
    seconds = sum(o.seconds for o in outs)
    shares = (sum(o.dllm_seconds for o in outs) / seconds, sum(o.verifier_seconds for o in outs) / seconds)
    return sum(len(o.token_ids) for o in outs) / seconds, shares, [o.token_ids for o in outs]


def compare(name: str, before: Callable[[], tuple], after: Callable[[], tuple], rounds: int) -> None:
    speeds, shares, same = ([], []), ([], []), True
    for _ in range(rounds):
        runs = before(), after()
        for i, (speed, share, _) in enumerate(runs):
            speeds[i].append(speed)
            shares[i].append(share)
        same &= runs[0][2] == runs[1][2]
    b, a = (statistics.median(s) for s in speeds)
    dllm, ver = ([f"{statistics.median(s[k] for s in shares[i]):.0%}" for i in (0, 1)] for k in (0, 1))
    print(f"{name}: {b:.1f} -> {a:.1f} tokens/s ({a / b:.2f}x); dLLM share {dllm[0]} -> {dllm[1]}, "
          f"verifier share {ver[0]} -> {ver[1]}; tokens {'identical' if same else 'DIFFERENT'}", flush=True)


def switched_off(runtime: Runtime, optimisation: Callable, prompts, max_new_tokens: int) -> Callable[[], tuple]:
    def go():
        with optimisation():
            return run(runtime, prompts, max_new_tokens)
    return go


def export_without(optimisation: Callable, bundle: Path, out: Path) -> Path:
    from apd_deploy.bundle import read_manifest
    from apd_deploy.export.pipeline import export_bundle

    models = read_manifest(bundle)["models"]
    with optimisation():
        export_bundle(models["dllm"]["source"], models["verifier"]["source"], out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rng = random.Random(0)
    runtime = Runtime.load(args.bundle, threads=args.threads)
    prompts = [[rng.randrange(300, runtime.vocab_size) for _ in range(16)] for _ in range(args.prompts)]
    measured = lambda rt: lambda: run(rt, prompts, args.max_new_tokens)  # noqa: E731
    for name, optimisation in RUNTIME_OPTIMISATIONS.items():
        compare(name, switched_off(runtime, optimisation, prompts, args.max_new_tokens), measured(runtime), args.rounds)
    # Spinning is a session option: it needs a runtime of its own.
    with threads_spinning():
        spinning = Runtime.load(args.bundle, threads=args.threads)
    compare(f"onnxruntime threads sleep between calls ({args.threads} threads)", measured(spinning), measured(runtime),
            args.rounds)
    with tempfile.TemporaryDirectory() as tmp:
        before = export_without(attention_mask_by_where, Path(args.bundle), Path(tmp) / "bundle")
        compare("attention masked by adding a bias row instead of Where (graph)",
                measured(Runtime.load(before, threads=args.threads)), measured(runtime), args.rounds)


if __name__ == "__main__":
    main()
