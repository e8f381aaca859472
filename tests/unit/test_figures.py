"""The report figures (matplotlib, Agg): what a reader of loss.png, diagnostics.png and
weights.png relies on, checked on the Figure objects and on the written PNGs."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_wmss.curriculum.figures import selection_figure
from megatron_wmss.pipeline.plots import COLORS, Panel, lines_figure, write_lines_png


def _losses(final: float):
    """SFT- and WMSS-like loss curves over 3 epochs decaying to about ``final`` nats."""
    x = np.linspace(0.0, 3.0, 40)
    return [("SFT S7", x, final + 2.0 * np.exp(-2.0 * x), COLORS[0]),
            ("WMSS S7", x, final + 0.1 + 2.2 * np.exp(-1.5 * x), COLORS[1])]


def test_loss_axis_never_shows_negative_loss_and_probability_axis_stops_at_one():
    # Autoscale pads 5% of the range: below a loss of 0.005 that padding is negative loss.
    figure = lines_figure([Panel("loss (nats per token)", _losses(0.005), limits=(0.0, None)),
                           Panel("1 − P(y)", [("SFT S7", [0, 1, 2], [0.2, 0.9, 1.0],
                                               COLORS[0])], limits=(0.0, 1.0))],
                          title="t")
    loss_ax, mass_ax = figure.axes
    assert loss_ax.get_ylim()[0] == 0.0
    assert loss_ax.get_ylim()[1] > 2.0  # the first, largest losses are inside the axes
    assert mass_ax.get_ylim() == (pytest.approx(0.2 - 0.04, abs=0.01), 1.0)
    # Away from a bound the range follows the data (a curve at 2..3 nats is not squashed).
    far = lines_figure([Panel("loss", _losses(2.0), limits=(0.0, None))], title="t").axes[0]
    assert far.get_ylim()[0] > 1.5


def test_legend_names_every_series_once_and_covers_no_data():
    x = np.linspace(0.0, 3.0, 30)
    series = [(f"{name} S{seed}", x, np.sin(x * (k + 1)) + k, COLORS[k])
              for k, (name, seed) in enumerate([("SFT", 7), ("WMSS", 7), ("SFT", 8)])]
    figure = lines_figure([Panel("margin (logits)", series), Panel("entropy (nats)", series)],
                          title="diagnostics")
    (legend,) = figure.legends
    assert [t.get_text() for t in legend.get_texts()] == ["SFT S7", "WMSS S7", "SFT S8"]
    figure.canvas.draw()
    box = legend.get_window_extent()
    for ax in figure.axes:
        assert not box.overlaps(ax.get_window_extent()), "the legend sits on a panel"
        for line in ax.get_lines():
            px = ax.transData.transform(line.get_xydata())
            inside = ((px[:, 0] >= box.x0) & (px[:, 0] <= box.x1)
                      & (px[:, 1] >= box.y0) & (px[:, 1] <= box.y1))
            assert not inside.any(), f"the legend covers {line.get_label()}"
    # Shared x: the panels show the same epochs, labelled once at the bottom.
    assert figure.axes[0].get_xlim() == figure.axes[1].get_xlim()
    assert [ax.get_xlabel() for ax in figure.axes] == ["", "epoch"]
    assert [ax.get_ylabel() for ax in figure.axes] == ["margin (logits)", "entropy (nats)"]


def test_write_lines_png_publishes_a_readable_png_and_no_temporary(tmp_path):
    from PIL import Image

    write_lines_png(tmp_path / "loss.png", [Panel("loss (nats per token)", _losses(0.1))],
                    title="Training loss")
    with Image.open(tmp_path / "loss.png") as image:
        assert image.format == "PNG"
        assert image.size == (960, 468)  # 8 x (1.5 + 2.4) in at 120 dpi
        pixels = np.asarray(image.convert("RGB"))
    red = (pixels == np.array(COLORS[1], np.uint8)).all(axis=-1)
    assert red.sum() > 200  # the WMSS curve is drawn in its colour
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png"]


def test_selection_figure_counts_every_sample_in_both_histograms():
    rng = np.random.default_rng(0)
    h_weak = rng.gamma(2.0, 0.5, 300)
    delta = rng.normal(-0.2, 0.4, 300)
    scores = 0.1 * np.maximum(-delta, 0) + 0.8 * (h_weak + delta).clip(0)
    weights = scores / scores.sum()
    figure = selection_figure(weights, delta, formula="paper")
    weights_ax, delta_ax = figure.axes
    for ax in (weights_ax, delta_ax):
        assert sum(bar.get_height() for bar in ax.patches) == 300
        assert ax.get_ylim()[0] == 0 and ax.get_ylabel() == "samples"
    # Weights are shown in units of the uniform 1/n: their mean is 1 whatever n is.
    lo = min(bar.get_x() for bar in weights_ax.patches)
    hi = max(bar.get_x() + bar.get_width() for bar in weights_ax.patches)
    assert lo == pytest.approx(300 * weights.min()) and hi == pytest.approx(300 * weights.max())
    assert f"{(delta < 0).sum()} below 0, {(delta > 0).sum()} above" in delta_ax.get_title()
    assert [t.get_text() for t in figure.legends[0].get_texts()] == ["uniform (1/n)", "ΔH = 0"]
