"""`driftlens demo` on the real model organism: the measured effect, not an assumed one.

Uses the organism cache (built once, then reused; the organism tests share it): on a fresh
machine this builds the organism (about 3 minutes on 2 cores), then runs the demo (under a minute).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from driftlens.cli import main


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "everything is in" in printed
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    for key in ("checkpoints", "chance_accuracy", "grounding_accuracy", "ko_lm_loss", "visual_drift_z",
                "layers_z_gt3_fraction"):
        assert key in summary
    cks = summary["checkpoints"]
    assert cks[0] == "base" and len(cks) >= 6          # base + at least 5 adaptation checkpoints
    base, last = cks[0], cks[-1]
    acc = summary["grounding_accuracy"]
    # done-when of the organism issue, measured by the demo itself
    assert acc[base]["en"] >= 0.90
    assert acc[base]["en"] - acc[last]["en"] >= 0.20
    assert summary["ko_lm_loss"][last] < summary["ko_lm_loss"][base]
    assert summary["layers_z_gt3_fraction"][last] >= 0.5
    assert np.allclose(summary["visual_drift_z"][base], 0.0)        # the reference sits at its null
    # drift rises along the adaptation: the last checkpoint is further than the first one
    z = summary["visual_drift_z"]
    assert np.mean(z[last]) > np.mean(z[cks[1]]) > 0
    assert 0 < summary["chance_accuracy"] < 0.5
    for name in ("drift_heatmap", "modality_gap", "mir", "accuracy_vs_drift", "ranks_plot"):
        assert (out / "figures").exists() and summary["files"][name].endswith(".png")
    assert (out / "drift.nc").exists() and (out / "ranks.json").exists()
    assert "| checkpoint |" in (out / "summary.md").read_text(encoding="utf-8")
