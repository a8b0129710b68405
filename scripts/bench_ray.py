"""The Ray Serve path against the single-process server, on this machine (README "Scaling out").

1. Overhead at concurrency 1: `apd-deploy serve --ray` (a local Ray, one replica) and
   `apd-deploy serve` run side by side; `bench-serve --compare-url` sends each request to one and
   then the other: the median of the paired differences is what Ray Serve's proxy and routing add.
2. Throughput: a simulated two-node cluster (`ray.cluster_utils.Cluster`, one CPU per node) serving
   one replica, then two (one per node), under the same closed-loop load.

    python scripts/bench_ray.py out/arithmetic-bundle --engine onnxruntime-cpu-fp32 --out out/bench-ray

On real machines, measure (2) with a cluster of your own instead: `ray start --head` and
`ray start --address HEAD:6379` on each worker, then `apd-deploy serve BUNDLE --ray --ray-address
auto --replicas N` and `apd-deploy bench-serve` at each N.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from apd_deploy.bench.serving import launched_server

CLI = str(Path(sys.executable).with_name("apd-deploy"))


@contextmanager
def serving(bundle: str, engine: str, *args: str) -> Iterator[str]:
    with launched_server([bundle, "--engine", engine, "--threads", "1", *args], start_seconds=180) as (url, _):
        time.sleep(2)  # let the replicas finish warming up
        yield url


def bench(url: str, out: Path, levels: str, requests: int, *extra: str) -> dict:
    subprocess.run([CLI, "bench-serve", url, "--concurrency", levels, "--requests", str(requests), "--out", str(out),
                    *extra], check=True, stdout=sys.stderr)
    return json.loads((out / "results.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle")
    parser.add_argument("--engine", default="onnxruntime-cpu-fp32")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", default="1,8,16", help="levels of the throughput runs")
    parser.add_argument("--rounds", type=int, default=1,
                        help="throughput runs of 1 and 2 replicas, alternated (1, 2, 1, 2, ...) against drift")
    parser.add_argument("--skip-overhead", action="store_true", help="only the throughput runs")
    parser.add_argument("--skip-throughput", action="store_true", help="only the overhead run")
    parser.add_argument("--out", default="out/bench-ray")
    args = parser.parse_args()
    out = Path(args.out)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    paired = None
    if not args.skip_overhead:
        with serving(args.bundle, args.engine) as single, serving(args.bundle, args.engine, "--ray") as ray_url:
            paired = bench(ray_url, out / "overhead", "1", args.requests, "--compare-url", single)["settings"]["baseline"]
        print(f"overhead at c1, {paired['pairs']} paired requests: Ray Serve p50 {paired['server_p50_ms']:.1f} ms, "
              f"single-process p50 {paired['baseline_p50_ms']:.1f} ms, difference {paired['overhead_ms']:.1f} ms "
              f"(median of the pairs); same answers: {paired['same_answers']}")

    if args.skip_throughput:
        return
    from ray.cluster_utils import Cluster

    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="apdray-", dir="/tmp")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    rows: dict[int, list] = {1: [], 2: []}
    try:
        for round_ in range(args.rounds):
            for replicas in (1, 2):
                with serving(args.bundle, args.engine, "--ray", "--ray-address", cluster.address, "--replicas",
                             str(replicas)) as url:
                    rows[replicas].append(bench(url, out / f"replicas-{replicas}-round-{round_ + 1}", args.concurrency,
                                                args.requests)["results"])
    finally:
        cluster.shutdown()
    print("replicas on the simulated 2-node cluster: tokens/s by concurrency, 1 -> 2 replicas")
    for round_, (ones, twos) in enumerate(zip(rows[1], rows[2])):
        for one, two in zip(ones, twos):
            print(f"  round {round_ + 1}, c{one['concurrency']}: {one['tokens_per_second']:.0f} -> "
                  f"{two['tokens_per_second']:.0f} ({two['tokens_per_second'] / one['tokens_per_second']:.2f}x); "
                  f"errors {one['errors']} / {two['errors']}")
    (out / "summary.json").write_text(json.dumps({"overhead": paired, "throughput": rows}, indent=1))
    print(f"wrote {out / 'summary.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
