"""Log axes of the report's figures are labelled in plain text: the figures are drawn with mathtext off
(`soul.literal_text`), and matplotlib's default log tick labels are mathtext, which then printed as their
source ("$\\mathdefault{10^{-2}}$") on every forget-quality axis."""

from __future__ import annotations

import pytest

from soul.report import plots


def _tick_texts(monkeypatch, draw, *args):
    seen = []

    def capture(fig):
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        FigureCanvasAgg(fig).draw()
        seen.extend(t.get_text() for ax in fig.axes for t in ax.get_xticklabels() + ax.get_yticklabels())
        return b""

    monkeypatch.setattr(plots, "_png", capture)
    draw(*args)
    return [t for t in seen if t]


ROWS = [{"forget_quality": 1e-3, "model_utility": 0.5, "role": "target", "label": "T"},
        {"forget_quality": 0.3, "model_utility": 0.4, "role": "retain", "label": "R"}]
SETTING = {"tuned": True, "chosen_index": 0, "points": [
    {"options": {"lr": lr}, "metric": {"per_seed": {"0": fq}, "mean": fq}, "admissible": True}
    for lr, fq in ((1e-5, 0.01), (1e-4, 0.2), (1e-3, 0.5))]}


@pytest.mark.parametrize(("draw", "args"), [("fq_mu_scatter", (ROWS,)),
                                            ("tuning_plot", ({"graddiff/adamw": SETTING}, "forget_quality"))])
def test_log_axes_have_plain_tick_labels(monkeypatch, draw, args):
    texts = _tick_texts(monkeypatch, getattr(plots, draw), *args)
    assert "0.01" in texts and "0.1" in texts
    assert not any("$" in t or "mathdefault" in t for t in texts), texts


def test_a_log_axis_spanning_less_than_a_decade_still_has_labels(monkeypatch):
    """The demo's AdamW tuning curve (lr 5e-5 … 2e-4, forget quality 0.17 … 0.79) holds no power of ten on
    either axis: without minor-tick labels both axes were bare."""
    setting = {"tuned": True, "chosen_index": 1, "points": [
        {"options": {"lr": lr}, "metric": {"per_seed": {"0": fq}, "mean": fq}, "admissible": True}
        for lr, fq in ((5e-5, 0.168), (1e-4, 0.787), (2e-4, 0.168))]}
    seen: list[tuple[str, str]] = []

    def capture(fig):
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        FigureCanvasAgg(fig).draw()
        for ax in fig.axes:  # only ticks inside the drawn range: the locator also places some outside it
            for name, axis, (lo, hi) in (("x", ax.xaxis, ax.get_xlim()), ("y", ax.yaxis, ax.get_ylim())):
                for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                    if min(lo, hi) <= tick.get_loc() <= max(lo, hi):
                        seen.append((name, tick.label1.get_text()))
        return b""

    monkeypatch.setattr(plots, "_png", capture)
    plots.tuning_plot({"graddiff/adamw": setting}, "forget_quality")
    for axis in "xy":
        labels = {t for a, t in seen if a == axis and t}
        assert len(labels) >= 2, (axis, labels)
        assert not any("$" in t for t in labels), labels
