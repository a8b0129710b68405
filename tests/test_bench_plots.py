"""The benchmark plots (issue #27): throughput axes from 0, the settings in the title, labels
that do not overlap. The figures are inspected as matplotlib objects."""

from __future__ import annotations

import datetime

import matplotlib
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from apd_deploy.bench import plots  # noqa: E402
from apd_deploy.bench.concurrency import LevelResult  # noqa: E402
from apd_deploy.bench.runner import ConfigResult  # noqa: E402
from apd_deploy.bench.serving import ServeLevel  # noqa: E402

SETTINGS = {"bundle": "b", "engine": "onnxruntime-cpu-fp32", "threads": 2, "n": 20, "max_new_tokens": 256, "repeat": 3}
TODAY = datetime.date(2026, 1, 2)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _result(label: str, params: dict, speed: float, accuracy: float | None = 0.9) -> ConfigResult:
    return ConfigResult(label, "apd" if label.startswith("apd") else label, params, speed, speed - 5, speed + 5, 3.0,
                        10.0, 10.0, 5.0, 2.0, 2.0, 1.0, accuracy)


# Two configurations at nearly the same speed and accuracy: their labels overlapped.
RESULTS = [_result("apd W=4", {"kv_window": 4}, 1320.0), _result("apd W=16", {"kv_window": 16}, 1322.0),
           _result("ar", {}, 1450.0, 0.5)]


def _title(fig) -> str:
    """The figure's title, its wrapped lines joined."""
    return " ".join(fig.get_suptitle().split())


def test_the_subtitle_names_the_settings():
    line = plots.subtitle(SETTINGS, TODAY)
    assert line == ("engine onnxruntime-cpu-fp32, n=20 prompts, 256 new tokens at most, 2 threads, repeat 3, "
                    "2026-01-02")
    assert plots.subtitle({**SETTINGS, "engine": None, "threads": 1}, TODAY).startswith("engine ONNX graphs (CPU)")
    served = plots.subtitle({"url": "http://h:1", "requests": 64, "max_tokens": 32}, TODAY)
    assert served == "server http://h:1, 64 requests per level, 32 new tokens at most, 2026-01-02"


def test_pareto_labels_do_not_overlap():
    fig = plots.pareto_figure(RESULTS, plots.subtitle(SETTINGS, TODAY))
    (ax,) = fig.axes
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert sorted(texts) == ["Pareto frontier", "apd W=16", "apd W=4", "ar"]
    fig.canvas.draw()
    boxes = [t.get_window_extent() for t in ax.get_legend().get_texts()]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    assert list(ax.texts) == []  # no labels written beside the points
    assert ax.get_xlim()[0] == 0 and "onnxruntime-cpu-fp32" in _title(fig) and "2026-01-02" in _title(fig)


def test_sweep_throughput_starts_at_zero():
    figures = plots.sweep_figures(RESULTS, plots.subtitle(SETTINGS, TODAY))
    (ax,) = figures["kv_window"].axes
    assert ax.get_ylim()[0] == 0 and ax.get_ylim()[1] >= 1322
    assert "2 threads" in _title(figures["kv_window"]) and "n=20 prompts" in _title(figures["kv_window"])


def test_breakdown_concurrency_and_serve_carry_the_settings_and_start_at_zero():
    line = plots.subtitle(SETTINGS, TODAY)
    assert line in _title(plots.breakdown_figure(RESULTS, line))
    rows = [LevelResult(c, 6, 100, 1.0, speed, speed - 1, speed + 1, 50.0, 10.0, 20.0, 5.0, 8.0, 1.0, None, True)
            for c, speed in (("alone", 900.0), ("1", 880.0), ("2", 950.0))]
    fig = plots.concurrency_figure(rows, line)
    assert fig.axes[0].get_ylim()[0] == 0 and line in _title(fig)
    served = [ServeLevel(c, 8, {}, 1.0, 500.0 + c, 40.0, 60.0, 10.0, 20.0) for c in (1, 4)]
    fig = plots.serve_figure(served, line)
    assert [ax.get_ylim()[0] for ax in fig.axes] == [0, 0] and line in _title(fig)
