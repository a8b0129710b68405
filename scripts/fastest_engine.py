"""Which of a bundle's engines decodes the arithmetic task fastest here: `scripts/demo.sh` builds the
candidates this machine can run and uses the winner.

    .venv/bin/python scripts/fastest_engine.py BUNDLE ENGINE [ENGINE ...] [--n 8] [--threads N]

Prints the fastest engine's name on stdout and each engine's tokens/s on stderr. Per-call costs
decide small models and arithmetic decides large ones, so the choice is measured, not assumed: on
the 3.2M-parameter demo pair onnxruntime's lower cost per call can beat OpenVINO's bf16 kernels.
Each engine decodes the same `n` test problems with APD twice, the first time to prepare its shapes;
the second is timed.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("engines", nargs="+")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()

    from apd_deploy.runtime import Runtime
    from apd_deploy.tasks.arithmetic import problems

    questions = [p.question for p in itertools.islice(problems("test"), args.n)]
    speeds = {}
    for engine in args.engines:
        runtime = Runtime.load(args.bundle, engine=engine, threads=args.threads)
        for timed in (False, True):
            started, tokens = time.perf_counter(), 0
            for question in questions:
                tokens += len(runtime.generate(question, chat=True, max_new_tokens=32).token_ids)
            if timed:
                speeds[engine] = tokens / (time.perf_counter() - started)
    print(", ".join(f"{engine} {speed:.0f} tokens/s" for engine, speed in speeds.items()), file=sys.stderr)
    print(max(speeds, key=speeds.get))


if __name__ == "__main__":
    main()
