"""Each runtime optimisation measured side by side with the naive version it must equal.

    .venv/bin/python scripts/bench_optimizations.py BUNDLE [--threads 1] [--prompts 2] [--max-new-tokens 256]

For every optimisation the runtime runs the same prompts with it switched off and on, alternately
(off, on, off, on, ...) so that machine noise hits both alike, and the tokens must be identical.
Printed: median tokens/s of each, the ratio, and the verifier's share of a step.
"""

from __future__ import annotations

import argparse
import random
import statistics
from collections.abc import Callable
from contextlib import contextmanager

from apd_deploy.runtime import Runtime, apd, engine


@contextmanager
def whole_draft_verification():
    """Before: the verifier scores the whole draft (up to M tokens) in one call every step."""
    saved = apd.FIRST_CHUNK
    apd.FIRST_CHUNK = 1 << 30
    try:
        yield
    finally:
        apd.FIRST_CHUNK = saved


OPTIMISATIONS: dict[str, Callable] = {"verify the draft in chunks, stop at the first rejection": whole_draft_verification}


def run(runtime: Runtime, prompts: list[list[int]], max_new_tokens: int):
    outs = [runtime.generate(p, alg="apd", max_new_tokens=max_new_tokens) for p in prompts]
    tokens = sum(len(o.token_ids) for o in outs)
    seconds = sum(o.seconds for o in outs)
    verifier = sum(o.verifier_seconds for o in outs)
    return tokens / seconds, verifier / seconds, [o.token_ids for o in outs]


def compare(name: str, before_runtime: Runtime, after_runtime: Runtime, prompts, args) -> None:
    before, after, same = [], [], True
    for _ in range(args.rounds):
        speed_b, _, tokens_b = run(before_runtime, prompts, args.max_new_tokens)
        speed_a, _, tokens_a = run(after_runtime, prompts, args.max_new_tokens)
        before.append(speed_b)
        after.append(speed_a)
        same &= tokens_a == tokens_b
    b, a = statistics.median(before), statistics.median(after)
    print(f"{name}: {b:.1f} -> {a:.1f} tokens/s ({a / b:.2f}x); tokens {'identical' if same else 'DIFFERENT'}")


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
    # Spinning is a session option: it needs its own pair of runtimes.
    engine.SPIN_BETWEEN_CALLS = True
    spinning = Runtime.load(args.bundle, threads=args.threads)
    engine.SPIN_BETWEEN_CALLS = False
    compare(f"onnxruntime threads sleep between calls ({args.threads} threads)", spinning, runtime, prompts, args)
    for name, switched_off in OPTIMISATIONS.items():
        before, after, same = [], [], True
        for _ in range(args.rounds):
            with switched_off():
                speed, share_off, tokens_off = run(runtime, prompts, args.max_new_tokens)
            before.append((speed, share_off))
            speed, share_on, tokens_on = run(runtime, prompts, args.max_new_tokens)
            after.append((speed, share_on))
            same &= tokens_off == tokens_on
        b, a = statistics.median(s for s, _ in before), statistics.median(s for s, _ in after)
        print(f"{name}: {b:.1f} -> {a:.1f} tokens/s ({a / b:.2f}x); verifier share of the time "
              f"{statistics.median(v for _, v in before):.0%} -> {statistics.median(v for _, v in after):.0%}; "
              f"tokens {'identical' if same else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
