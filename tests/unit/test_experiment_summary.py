"""The regularizer experiment's reading of its result: the targets, the table, the figure (no model)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402

from driftlens.organism.experiment import markdown_table, plot_arms, targets  # noqa: E402


def _result(**arms):
    base = {"en_acc": 0.90, "ko_acc": 0.30, "ko_lm_loss": 11.0}
    out = {"base": base, "arms": {}, "seeds": [0, 1, 2], "budget": 128, "steps": 600, "drift_metric": "mmd"}
    for name, (en, ko, lm, dr) in arms.items():
        out["arms"][name] = {"en_acc": en, "ko_acc": ko, "ko_lm_loss": lm, "drift_effect_mean": dr,
                             "seconds_per_step": [0.1, 0.1, 0.1], "trainable": "x"}
    return out


UNIFORM = ([0.5, 0.6, 0.4], [0.80, 0.82, 0.78], [0.60, 0.62, 0.58], [0.30, 0.34, 0.26])


def test_targets_met():
    r = _result(lora_uniform=UNIFORM,
                lora_schedule_anchor_fixed=([0.88, 0.87, 0.86], [0.79, 0.80, 0.78], [0.61, 0.62, 0.60],
                                            [0.10, 0.12, 0.14]))
    t = targets(r)["lora_schedule_anchor_fixed"]
    assert t["all"] and t["english_kept"] and t["korean_as_good"] and t["drift_halved"]
    assert t["drift_change"] == pytest.approx(0.12 / 0.30 - 1)


@pytest.mark.parametrize("which, arm", [
    ("english_kept", ([0.84, 0.84, 0.84], [0.80, 0.82, 0.78], [0.60, 0.62, 0.58], [0.1, 0.1, 0.1])),
    ("korean_as_good", ([0.88, 0.88, 0.88], [0.70, 0.71, 0.72], [0.60, 0.62, 0.58], [0.1, 0.1, 0.1])),
    ("korean_as_good", ([0.88, 0.88, 0.88], [0.80, 0.82, 0.78], [0.70, 0.72, 0.71], [0.1, 0.1, 0.1])),
    ("drift_halved", ([0.88, 0.88, 0.88], [0.80, 0.82, 0.78], [0.60, 0.62, 0.58], [0.16, 0.16, 0.16])),
])
def test_each_target_can_fail(which, arm):
    t = targets(_result(lora_uniform=UNIFORM, lora_schedule_contrast=arm))["lora_schedule_contrast"]
    assert not t[which] and not t["all"]
    assert all(v for k, v in t.items() if k not in (which, "all", "drift_change"))


def test_table_and_figure():
    r = _result(lora_uniform=UNIFORM, lora_schedule_anchor_tracking=UNIFORM)
    md = markdown_table(r)
    assert md.count("\n") == 4 and "| lora_uniform | 0.500±0.100 |" in md and "+0%" in md
    ax = plot_arms(r, chance=0.25).axes[0]
    assert ax.get_xlabel() == "English grounding accuracy" and ax.get_ylabel() == "Korean grounding accuracy"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["lora_uniform", "lora_schedule_anchor_tracking", "base"]
    assert sum(len(c.get_offsets()) for c in ax.collections) == 2 * (3 + 1) + 1
