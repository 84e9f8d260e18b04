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
