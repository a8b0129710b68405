"""Write benchmark results: results.json, results.csv and the plots."""

from __future__ import annotations

import csv
import json
import os
import platform
from pathlib import Path
from typing import Any

from apd_deploy.bench.plots import plot_breakdown, plot_pareto, plot_sweeps
from apd_deploy.bench.runner import ConfigResult


def machine() -> dict[str, Any]:
    import onnxruntime

    return {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "onnxruntime": onnxruntime.__version__}


def write_results(out: Path, settings: dict[str, Any], results: list[ConfigResult]) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    rows = [r.row() for r in results]
    (out / "results.json").write_text(json.dumps({"settings": settings, "machine": machine(), "results": rows}, indent=2) + "\n")
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plots = [plot_breakdown(results, out), *plot_sweeps(results, out)]
    pareto = plot_pareto(results, out)
    return [out / "results.json", out / "results.csv", *plots, *([pareto] if pareto else [])]


def format_table(results: list[ConfigResult]) -> str:
    header = ("config", "tokens/s", "range", "tok/step", "dLLM fwd", "step ms", "dLLM/ver/host ms", "acc", "vs eager")
    rows = [header]
    for r in results:
        rows.append((r.label, f"{r.tokens_per_second:.1f}", f"{r.tokens_per_second_min:.1f}-{r.tokens_per_second_max:.1f}",
                     f"{r.tokens_per_step:.2f}", f"{r.dllm_forwards_per_prompt:.1f}", f"{r.step_ms:.1f}",
                     f"{r.dllm_ms_per_step:.1f}/{r.verifier_ms_per_step:.1f}/{r.host_ms_per_step:.1f}",
                     "-" if r.accuracy is None else f"{r.accuracy:.1%}",
                     "-" if r.speedup_vs_eager is None else
                     f"{r.speedup_vs_eager:.2f}x{'' if r.same_tokens_as_eager else ' (tokens differ)'}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)
