"""PNG plots of benchmark results (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

from apd_deploy.bench.concurrency import LevelResult
from apd_deploy.bench.runner import ConfigResult
from apd_deploy.bench.serving import ServeLevel

SWEEP_AXES = {"apd_mixture_weight": "R (mixture weight)", "kv_window": "W (KV window)", "max_lookahead": "M (max lookahead)"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both throughput (x) and accuracy (y), by throughput."""
    front = [p for p in points if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points)]
    return sorted(set(front))


def plot_pareto(results: list[ConfigResult], out: Path) -> Path | None:
    scored = [r for r in results if r.accuracy is not None]
    if not scored:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    for r in scored:
        ax.errorbar(r.tokens_per_second, 100 * r.accuracy, fmt="o",
                    xerr=[[r.tokens_per_second - r.tokens_per_second_min], [r.tokens_per_second_max - r.tokens_per_second]])
        ax.annotate(r.label, (r.tokens_per_second, 100 * r.accuracy), fontsize=7, xytext=(4, 3), textcoords="offset points")
    front = pareto_front([(r.tokens_per_second, 100 * r.accuracy) for r in scored])
    ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="grey", label="Pareto frontier")
    ax.set_xlabel("tokens / s (median over repeats)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Throughput against accuracy")
    ax.legend()
    return _save(plt, fig, out / "pareto.png")


def plot_sweeps(results: list[ConfigResult], out: Path) -> list[Path]:
    plt = _pyplot()
    paths = []
    apd = [r for r in results if r.alg == "apd"]
    for key, label in SWEEP_AXES.items():
        values = sorted({r.params[key] for r in apd if key in r.params})
        if len(values) < 2:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        others = sorted({tuple(sorted((k, v) for k, v in r.params.items() if k != key)) for r in apd if key in r.params})
        for rest in others:
            line = sorted((r.params[key], r.tokens_per_second) for r in apd
                          if key in r.params and tuple(sorted((k, v) for k, v in r.params.items() if k != key)) == rest)
            ax.plot([p[0] for p in line], [p[1] for p in line], "o-", label=" ".join(f"{k}={v}" for k, v in rest) or "apd")
        ax.set_xlabel(label)
        ax.set_ylabel("tokens / s")
        ax.set_title(f"Throughput against {label.split(' ')[0]}")
        if len(others) <= 9:
            ax.legend(fontsize=7)
        paths.append(_save(plt, fig, out / f"throughput_vs_{key}.png"))
    return paths


def plot_breakdown(results: list[ConfigResult], out: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(results) + 2), 4.5))
    labels = [r.label for r in results]
    parts = (("dLLM engine", [r.dllm_ms_per_step for r in results]),
             ("verifier engine", [r.verifier_ms_per_step for r in results]),
             ("host logic", [r.host_ms_per_step for r in results]))
    bottom = [0.0] * len(results)
    for name, values in parts:
        ax.bar(labels, values, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("ms per step")
    ax.set_title("Where a step's time goes")
    ax.tick_params(axis="x", rotation=60, labelsize=7)
    ax.legend()
    return _save(plt, fig, out / "breakdown.png")


def plot_concurrency(rows: list[LevelResult], out: Path) -> Path:
    """Total and per-request throughput against concurrency, with the lone request's for reference."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    levels = [r for r in rows if r.concurrency != "alone"]
    x = [int(r.concurrency) for r in levels]
    ax.errorbar(x, [r.tokens_per_second for r in levels], fmt="o-", label="total",
                yerr=[[r.tokens_per_second - r.tokens_per_second_min for r in levels],
                      [r.tokens_per_second_max - r.tokens_per_second for r in levels]])
    ax.plot(x, [r.per_request_tokens_per_second for r in levels], "s--", label="per request")
    alone = next((r for r in rows if r.concurrency == "alone"), None)
    if alone is not None:
        ax.axhline(alone.tokens_per_second, color="grey", linestyle=":", label="one request alone")
    ax.set_xscale("log", base=2)
    ax.set_xticks(x, [str(v) for v in x])
    ax.set_xlabel("concurrent requests (max batch)")
    ax.set_ylabel("tokens / s")
    ax.set_title("Throughput against concurrency")
    ax.legend()
    return _save(plt, fig, out / "throughput_vs_concurrency.png")


def plot_serve(rows: list[ServeLevel], out: Path) -> Path:
    """A server's throughput and latency against concurrent clients."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    x = [r.concurrency for r in rows]
    left.plot(x, [r.tokens_per_second for r in rows], "o-")
    left.set_ylabel("tokens / s (all clients)")
    right.plot(x, [r.latency_p50_ms for r in rows], "o-", label="latency p50")
    right.plot(x, [r.latency_p95_ms for r in rows], "s--", label="latency p95")
    right.plot(x, [r.first_token_p50_ms for r in rows], "^:", label="first token p50")
    right.set_ylabel("ms")
    right.legend()
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(v) for v in x])
        ax.set_xlabel("concurrent clients")
    fig.suptitle("apd-deploy serve under load")
    return _save(plt, fig, out / "serve_vs_concurrency.png")
