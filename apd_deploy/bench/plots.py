"""PNG plots of benchmark results (matplotlib, no display needed).

Each plot is made by a `*_figure` function (which tests inspect) and saved by its `plot_*` one.
Throughput axes start at 0, so that a 10% change looks like one; every figure's title carries the
settings it was measured with (`subtitle`)."""

from __future__ import annotations

import datetime
import textwrap
from pathlib import Path
from typing import Any

from apd_deploy.bench.concurrency import LevelResult
from apd_deploy.bench.runner import SWEEPABLE, ConfigResult
from apd_deploy.bench.serving import ServeLevel


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def subtitle(settings: dict[str, Any], today: datetime.date | None = None) -> str:
    """The settings a plot was measured with, on one line: engine (or server), prompts, tokens,
    threads, date."""
    s = settings
    parts = [f"server {s['url']}" if "url" in s else f"engine {s.get('engine') or 'ONNX graphs (CPU)'}"]
    if s.get("n") is not None:
        parts.append(f"n={s['n']} prompts")
    if s.get("requests") is not None:
        parts.append(f"{s['requests']} requests per level")
    tokens = s.get("max_new_tokens", s.get("max_tokens"))
    if tokens is not None:
        parts.append(f"{tokens} new tokens at most")
    if s.get("threads") is not None:
        parts.append(f"{s['threads']} thread{'s' * (s['threads'] != 1)}"
                     + (f" in {s['lanes']} lanes" if (s.get("lanes") or 1) > 1 else ""))
    if s.get("repeat") is not None:
        parts.append(f"repeat {s['repeat']}")
    parts.append((today or datetime.date.today()).isoformat())
    return ", ".join(parts)


def _titles(fig, title: str, settings: str) -> None:
    # About 11 characters of 10-point text to an inch of figure.
    fig.suptitle(f"{title}\n{textwrap.fill(settings, int(11 * fig.get_figwidth()))}", fontsize=10)


def _from_zero(ax, axis: str = "y") -> None:
    """Start the axis at 0, with room above the highest point (error bars included)."""
    top = ax.dataLim.ymax if axis == "y" else ax.dataLim.xmax
    (ax.set_ylim if axis == "y" else ax.set_xlim)(0, 1.08 * top if top > 0 else 1)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both throughput (x) and accuracy (y), by throughput."""
    front = [p for p in points if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points)]
    return sorted(set(front))


def pareto_figure(results: list[ConfigResult], settings: str):
    """Accuracy against throughput, one marker per configuration named in the legend (labels
    written beside the points overlapped where configurations ran at nearly the same speed)."""
    scored = [r for r in results if r.accuracy is not None]
    if not scored:
        return None
    fig, ax = _pyplot().subplots(figsize=(8.5, 5))
    markers = "osD^vP*X<>"
    for i, r in enumerate(scored):
        # Hollow markers: configurations at the same point stay visible one through the other.
        ax.errorbar(r.tokens_per_second, 100 * r.accuracy, fmt=markers[i % len(markers)], label=r.label,
                    markerfacecolor="none", markeredgewidth=1.5, markersize=8,
                    xerr=[[r.tokens_per_second - r.tokens_per_second_min], [r.tokens_per_second_max - r.tokens_per_second]])
    front = pareto_front([(r.tokens_per_second, 100 * r.accuracy) for r in scored])
    ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="grey", label="Pareto frontier")
    _from_zero(ax, "x")
    ax.set_ylim(0, 102)
    ax.set_xlabel("tokens / s (median over repeats)")
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    _titles(fig, "Throughput against accuracy", settings)
    return fig


def plot_pareto(results: list[ConfigResult], out: Path, settings: str) -> Path | None:
    fig = pareto_figure(results, settings)
    return None if fig is None else _save(fig, out / "pareto.png")


def sweep_figures(results: list[ConfigResult], settings: str) -> dict[str, Any]:
    """Throughput against each swept APD parameter (with two values or more), by parameter."""
    plt = _pyplot()
    figures = {}
    apd = [r for r in results if r.alg == "apd"]
    for key, label in ((name, param.label) for name, param in SWEEPABLE.items()):
        values = sorted({r.params[key] for r in apd if key in r.params})
        if len(values) < 2:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        others = sorted({tuple(sorted((k, v) for k, v in r.params.items() if k != key)) for r in apd if key in r.params})
        for rest in others:
            line = sorted((r.params[key], r.tokens_per_second) for r in apd
                          if key in r.params and tuple(sorted((k, v) for k, v in r.params.items() if k != key)) == rest)
            ax.plot([p[0] for p in line], [p[1] for p in line], "o-", label=" ".join(f"{k}={v}" for k, v in rest) or "apd")
        _from_zero(ax)
        ax.set_xlabel(label)
        ax.set_ylabel("tokens / s")
        _titles(fig, f"Throughput against {label.split(' ')[0]}", settings)
        if len(others) <= 9:
            ax.legend(fontsize=7)
        figures[key] = fig
    return figures


def plot_sweeps(results: list[ConfigResult], out: Path, settings: str) -> list[Path]:
    return [_save(fig, out / f"throughput_vs_{key}.png") for key, fig in sweep_figures(results, settings).items()]


def breakdown_figure(results: list[ConfigResult], settings: str):
    fig, ax = _pyplot().subplots(figsize=(max(6, 0.6 * len(results) + 2), 4.5))
    labels = [r.label for r in results]
    parts = (("dLLM engine", [r.dllm_ms_per_step for r in results]),
             ("verifier engine", [r.verifier_ms_per_step for r in results]),
             ("host logic", [r.host_ms_per_step for r in results]))
    bottom = [0.0] * len(results)
    for name, values in parts:
        ax.bar(labels, values, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("ms per step")
    _titles(fig, "Where a step's time goes", settings)
    ax.tick_params(axis="x", rotation=60, labelsize=7)
    ax.legend()
    return fig


def plot_breakdown(results: list[ConfigResult], out: Path, settings: str) -> Path:
    return _save(breakdown_figure(results, settings), out / "breakdown.png")


def concurrency_figure(rows: list[LevelResult], settings: str):
    """Total and per-request throughput against concurrency, with the lone request's for reference."""
    fig, ax = _pyplot().subplots(figsize=(6, 4.5))
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
    _from_zero(ax)
    ax.set_xlabel("concurrent requests (max batch)")
    ax.set_ylabel("tokens / s")
    _titles(fig, "Throughput against concurrency", settings)
    ax.legend()
    return fig


def plot_concurrency(rows: list[LevelResult], out: Path, settings: str) -> Path:
    return _save(concurrency_figure(rows, settings), out / "throughput_vs_concurrency.png")


def serve_figure(rows: list[ServeLevel], settings: str):
    """A server's throughput and latency against concurrent clients."""
    fig, (left, right) = _pyplot().subplots(1, 2, figsize=(10, 4.3))
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
        _from_zero(ax)
        ax.set_xlabel("concurrent clients")
    _titles(fig, "apd-deploy serve under load", settings)
    return fig


def plot_serve(rows: list[ServeLevel], out: Path, settings: str) -> Path:
    return _save(serve_figure(rows, settings), out / "serve_vs_concurrency.png")
