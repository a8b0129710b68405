"""Tokens/s of requests decoded one after another with `Runtime.generate` (the batch-1 path).

Written against the API that every version of the runtime has, so that two checkouts can be
compared side by side: run it alternately with PYTHONPATH pointing at each checkout, on bundles
each checkout exported (see README, "Batching"):

    PYTHONPATH=/path/to/checkout python scripts/bench_alone.py BUNDLE --engine onnxruntime-cpu-fp32 --task
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--engine")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--task", action="store_true", help="64 arithmetic test problems, 32 new tokens each")
    parser.add_argument("--random-prompts", type=int, default=4, help="else: this many random 16-token prompts")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()

    from apd_deploy.runtime import Runtime

    runtime = Runtime.load(args.bundle, engine=args.engine, threads=args.threads)
    if args.task:
        from apd_deploy.tasks.arithmetic import problems

        prompts = [runtime.prompt_ids(p.question, chat=True) for p in itertools.islice(problems("test"), 64)]
        max_new_tokens = 32
    else:
        rng = np.random.default_rng(0)
        prompts = [rng.integers(300, 7000, 16) for _ in range(args.random_prompts)]
        max_new_tokens = args.max_new_tokens
    full_length = {} if args.task else {"ignore_eos": True}  # random prompts: every request its full length
    runtime.generate(prompts[0], max_new_tokens=max_new_tokens, **full_length)  # warm-up
    started = time.perf_counter()
    tokens = sum(len(runtime.generate(p, max_new_tokens=max_new_tokens, **full_length).token_ids) for p in prompts)
    seconds = time.perf_counter() - started
    print(json.dumps({"bundle": args.bundle, "tokens": tokens, "seconds": round(seconds, 3),
                      "tokens_per_second": round(tokens / seconds, 1)}))


if __name__ == "__main__":
    main()
