"""Reading the regularizer experiment (no model): per-seed paired contrasts, the goal, the words, the figure."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from driftlens.organism import experiment_results as R  # noqa: E402
from driftlens.organism.experiment import tree_dict  # noqa: E402

SCENES = [f"s{i}" for i in range(24)]
HELD = SCENES[:6]
ARMS = ["lora_uniform", "lora_schedule", "anchor_fixed", "replay", "replay_anchor"]


def _per_scene(rng, acc, gain):
    correct = [[int(rng.random() < acc) for _ in range(3)] for _ in SCENES]
    return {"correct": correct, "gain_accuracy": list(np.clip(gain + rng.normal(0, 0.1, len(SCENES)), -1, 1)),
            "gain_logprob": list(gain * 5 + rng.normal(0, 0.5, len(SCENES)))}


def _data(effects: dict, seeds=(0, 1, 2, 3, 4), seed_sd=0.01):
    """Per arm: (en gain, ko gain, ko lm loss, drift); seeds vary around them by ``seed_sd``."""
    rng = np.random.default_rng(0)
    results, measures, base = {}, {}, {}
    for s in seeds:
        off = rng.normal(0, seed_sd)
        base[s] = {"scenes": SCENES, "heldout_scenes": HELD,
                   "per_scene": {"base": {"en": _per_scene(rng, 0.9, 0.7), "ko": _per_scene(rng, 0.3, 0.1)}},
                   **{k: {"base": v} for k, v in (("en_lm_loss", 2.0), ("ko_lm_loss", 9.0),
                                                  ("ko_lm_loss_new_forms", 9.5))}}
        results[s], measures[s] = {}, {"drift": {}, "drift_boot_mean": {}, "displacement": {}, "association": {},
                                        "probe_transfer": {"base": {k: [0.9] * 4 for k in ("color", "shape")}}}
        for a in ARMS:
            en, ko, lm, dr = effects[a]
            results[s][a] = {"per_scene": {"en": _per_scene(rng, en, en + off), "ko": _per_scene(rng, ko, ko + off)},
                             "en_lm_loss": 3.0 + off, "ko_lm_loss": lm + off, "ko_lm_loss_new_forms": lm + 2,
                             "seconds_per_step": 0.1, "hinge_active_share": None, "image_steps": 180,
                             "mean_terms": {}, "trainable": "x", "ranks": None}
            measures[s]["drift"][a] = [dr + off] * 4
            measures[s]["drift_boot_mean"][a] = list(dr + off + rng.normal(0, 0.001, 50))
            measures[s]["displacement"][a] = {c: [dr] * 4 for c in SCENES}
            measures[s]["probe_transfer"][a] = {k: [0.8] * 4 for k in ("color", "shape", "position")}
            measures[s]["association"][a] = {lang: {"effect": 0.1 + rng.normal(0, 0.05), "lo": -0.2, "hi": 0.4,
                                                    "p": 0.5, "n_clusters": 24, "method": "spearman"}
                                             for lang in ("en", "ko")}
    plan = {"settings": {"n_bootstrap": 200, "margin": 4.0}, "steps": 600, "budget": 128, "contrast": "ko-5 - en-5",
            "layer_ranks": {"contrast": [24, 36, 24, 44]}, "anchor_layer_weights": {}}
    return R.assemble(plan, ARMS, results, measures, base)


GOOD = {"lora_uniform": (0.4, 0.8, 1.0, 0.3), "lora_schedule": (0.4, 0.8, 1.0, 0.3),
        "anchor_fixed": (0.4, 0.8, 1.0, 0.1), "replay": (0.85, 0.8, 1.0, 0.3), "replay_anchor": (0.9, 0.8, 1.0, 0.1)}


def test_contrasts_are_per_seed_paired_differences_with_across_seed_inference():
    res = _data(GOOD)
    assert set(res["contrasts"]) == {"lora_schedule - lora_uniform", "anchor_fixed - lora_schedule",
                                     "replay - lora_uniform", "replay_anchor - replay"}
    c = res["contrasts"]["replay - lora_uniform"]["outcomes"]
    per = np.asarray(res["arms"]["replay"]["en_gain"]) - np.asarray(res["arms"]["lora_uniform"]["en_gain"])
    np.testing.assert_allclose(c["en_gain"]["per_seed"], per)
    assert c["en_gain"]["mean"] > 0.3 and c["en_gain"]["p"] < 0.001 and c["en_gain"]["lo"] > 0
    assert c["en_gain"]["seeds_needed"] <= 3
    lm = c["ko_lm_loss"]                           # identical per seed: no difference, no power at any seed count
    assert lm["mean"] == pytest.approx(0, abs=1e-12) and lm["seeds_needed"] is None
    d = res["contrasts"]["anchor_fixed - lora_schedule"]["outcomes"]["visual_drift"]
    assert d["mean"] == pytest.approx(-0.2, abs=1e-9) and d["hi"] < 0
    # the scene-level draws widen the interval beyond the seeds' own spread (v_probe > 0)
    g = res["contrasts"]["lora_schedule - lora_uniform"]["outcomes"]["en_gain"]
    from scipy import stats

    sd_only = stats.t.ppf(0.975, 4) * g["sd"] / np.sqrt(5)
    assert g["hi"] - g["mean"] > 1.05 * sd_only


def test_the_goal_is_met_only_when_every_part_holds():
    g = _data(GOOD)["goal"]
    assert g["replay_anchor"]["english_kept"] and g["replay_anchor"]["korean_kept"]
    assert g["anchor_fixed"]["english_kept"] is False and not g["anchor_fixed"]["met"]
    bad_ko = _data({**GOOD, "replay_anchor": (0.9, 0.7, 1.0, 0.1)})["goal"]["replay_anchor"]
    assert not bad_ko["korean_kept"] and not bad_ko["met"]
    bad_lm = _data({**GOOD, "replay_anchor": (0.9, 0.8, 1.2, 0.1)})["goal"]["replay_anchor"]
    assert not bad_lm["korean_kept"] and "ko_lm_loss" not in bad_lm["beats_replay_on"]
    better = _data({**GOOD, "replay_anchor": (0.97, 0.8, 0.8, 0.1)})["goal"]["replay_anchor"]
    assert better["met"] and "ko_lm_loss" in better["beats_replay_on"]
    same = _data({**GOOD, "replay_anchor": GOOD["replay"]})["goal"]["replay_anchor"]
    assert not same["beats_replay"] and not same["met"]          # as good as replay is not "beats replay"


def test_words_table_and_figure():
    res = _data(GOOD)
    res["tree"] = tree_dict(ARMS)
    md = R.markdown(res)
    assert "**replay - lora_uniform** (factor `replay`):" in md and "en_gain +0." in md
    assert "`replay_anchor`: **" in md and "| anchor_fixed |" in md
    fig = R.plot_contrasts(res)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == list(R.FIGURE)
    dots = axes[0].collections[0].get_offsets()
    assert len(dots) == 5                                          # one dot per seed
