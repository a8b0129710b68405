"""Write benchmark results: results.json, results.csv and the plots."""

from __future__ import annotations

import csv
import json
import os
import platform
from pathlib import Path
from typing import Any

from apd_deploy.bench.concurrency import LevelResult, aligned
from apd_deploy.bench.plots import plot_breakdown, plot_concurrency, plot_pareto, plot_sweeps, subtitle
from apd_deploy.bench.runner import ConfigResult
from apd_deploy.errors import ApdDeployError, BundleError
from apd_deploy.staging import check_writable


def machine() -> dict[str, Any]:
    import onnxruntime

    return {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "onnxruntime": onnxruntime.__version__}


def check_out(out: Path) -> None:
    """Raise ApdDeployError unless results can be written in `out`: checked before the benchmark,
    so that its results are not lost after it."""
    try:
        check_writable(out)
    except BundleError as exc:
        raise ApdDeployError(f"--out {exc}") from None


def write_rows(out: Path, stem: str, settings: dict[str, Any], rows: list[dict[str, Any]]) -> list[Path]:
    """`stem`.json (settings, machine, rows) and `stem`.csv in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({"settings": settings, "machine": machine(), "results": rows}, indent=2) + "\n")
    with open(out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return [out / f"{stem}.json", out / f"{stem}.csv"]


def write_results(out: Path, settings: dict[str, Any], results: list[ConfigResult]) -> list[Path]:
    written = write_rows(out, "results", settings, [r.row() for r in results])
    plots = [plot_breakdown(results, out, subtitle(settings)), *plot_sweeps(results, out, subtitle(settings))]
    pareto = plot_pareto(results, out, subtitle(settings))
    return [*written, *plots, *([pareto] if pareto else [])]


def write_levels(out: Path, settings: dict[str, Any], rows: list[LevelResult]) -> list[Path]:
    """results.json / results.csv of a concurrency benchmark, and its throughput plot."""
    return [*write_rows(out, "results", settings, [r.row() for r in rows]), plot_concurrency(rows, out, subtitle(settings))]


def format_table(results: list[ConfigResult]) -> str:
    header = ("config", "tokens/s", "range", "tok/step", "dLLM fwd", "step ms", "dLLM/ver/host ms", "acc", "vs eager")
    cells = [(r.label, f"{r.tokens_per_second:.1f}", f"{r.tokens_per_second_min:.1f}-{r.tokens_per_second_max:.1f}",
              f"{r.tokens_per_step:.2f}", f"{r.dllm_forwards_per_prompt:.1f}", f"{r.step_ms:.1f}",
              f"{r.dllm_ms_per_step:.1f}/{r.verifier_ms_per_step:.1f}/{r.host_ms_per_step:.1f}",
              "-" if r.accuracy is None else f"{r.accuracy:.1%}",
              "-" if r.speedup_vs_eager is None else
              f"{r.speedup_vs_eager:.2f}x{'' if r.same_tokens_as_eager else ' (tokens differ)'}") for r in results]
    return aligned([header, *cells])
