"""Reading the regularizer experiment: per-seed outcomes, each arm against its parent across seeds, the goal.

The unit of replication is the training run (seed): for every arm and its parent (:data:`TREE
<driftlens.organism.experiment.TREE>`) the per-seed paired difference of every outcome, with the
across-seed mean, the hierarchical interval and Student t over seeds, and the number of seeds the
observed effect would need for 80% power (:func:`driftlens.compare.run_stats`). Within a seed the
outcomes measured on scenes have a second level of uncertainty, the sampling of scenes: their draws
resample the evaluation scenes (the same draws in every seed and arm, so differences are paired),
and the interval adds that variance (``v_probe``); the LM losses and the probe transfer have no such
draws and their intervals cover the seeds only (said in ``covers``).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from driftlens.outputs import atomic_write

#: outcome -> (kind, language, per-scene key or source, split, better: +1 higher, -1 lower, 0 a mechanism)
OUTCOMES = {
    "en_acc": ("scene", "en", "correct", "all", 1),
    "ko_acc": ("scene", "ko", "correct", "all", 1),
    "en_acc_heldout": ("scene", "en", "correct", "heldout", 1),
    "ko_acc_heldout": ("scene", "ko", "correct", "heldout", 1),
    "en_gain": ("scene", "en", "gain_accuracy", "all", 1),
    "ko_gain": ("scene", "ko", "gain_accuracy", "all", 1),
    "en_gain_heldout": ("scene", "en", "gain_accuracy", "heldout", 1),
    "ko_gain_heldout": ("scene", "ko", "gain_accuracy", "heldout", 1),
    "en_gain_logprob": ("scene", "en", "gain_logprob", "all", 1),
    "ko_gain_logprob": ("scene", "ko", "gain_logprob", "all", 1),
    "en_lm_loss": ("loss", None, "en_lm_loss", None, -1),
    "ko_lm_loss": ("loss", None, "ko_lm_loss", None, -1),
    "ko_lm_loss_new_forms": ("loss", None, "ko_lm_loss_new_forms", None, -1),
    "visual_drift": ("drift", None, None, None, 0),
    "displacement": ("displacement", None, None, None, 0),
    "probe_transfer": ("probe", None, None, None, 0),
}
DEFINITIONS = {
    "en_acc": "English grounding accuracy, true image, all 72 evaluation scenes (likelihood ranking, 3 questions a "
              "scene; renders never trained on)",
    "ko_acc": "the same in Korean",
    "en_acc_heldout": "English accuracy on the 18 held-out scenes (never in any training batch)",
    "ko_acc_heldout": "the same in Korean",
    "en_gain": "English grounding gain: accuracy with the true image minus with a mismatched image (another scene "
               "differing in every attribute), all scenes",
    "ko_gain": "the same in Korean",
    "en_gain_heldout": "English grounding gain on the held-out scenes",
    "ko_gain_heldout": "the same in Korean",
    "en_gain_logprob": "the right answer's log-likelihood (nats) with the true minus the mismatched image, English",
    "ko_gain_logprob": "the same in Korean",
    "en_lm_loss": "English LM loss (nats/token) on the captions of the held-out scenes, no image",
    "ko_lm_loss": "Korean LM loss on the captions of the held-out scenes (a trained sentence form)",
    "ko_lm_loss_new_forms": "Korean LM loss on sentence forms never trained on",
    "visual_drift": "visual MMD^2 of the arm's final model against the base (drift report `mmd`, site hidden), "
                    "mean over the decoder layers, on the seed's probe set (72 scenes x 2 renders)",
    "displacement": "per-scene paired visual-token displacement against the base at the last layer "
                    "(driftlens.outcomes.cluster_displacement; 1 = as far as one scene is from another), mean over "
                    "scenes",
    "probe_transfer": "accuracy of the base's linear probe (color, shape, position; image-pooled visual tokens, "
                      "last layer, cluster cross-validation) applied unchanged to the arm's model, mean over the "
                      "three attributes",
}
TASK = tuple(k for k, v in OUTCOMES.items() if v[4] != 0)
FIGURE = ("en_gain", "ko_gain", "en_acc", "ko_acc", "en_lm_loss", "ko_lm_loss", "ko_lm_loss_new_forms",
          "visual_drift", "probe_transfer")
REGULARIZED = ("anchor_fixed", "anchor_tracking", "anchor_key", "contrast", "replay_anchor")
GOAL = {"en_gain_points": 0.05, "ko_gain_points": 0.03, "ko_loss_ratio": 1.10, "alpha": 0.05}


# ----------------------------------------------------------------------------- per-seed values with draws

def _scene_vector(per_scene: dict, key: str) -> np.ndarray:
    v = per_scene[key]
    return np.asarray([float(np.mean(x)) if isinstance(x, list) else float(x) for x in v])      # [scenes]


class _Values:
    """Per (model, seed): every outcome's value and its scene-level draws [B] (constant where none)."""

    def __init__(self, seeds, results, measures, base, n_bootstrap: int):
        from driftlens.inference import bootstrap_counts

        self.seeds, self.results, self.measures, self.base = list(seeds), results, measures, base
        ev = base[self.seeds[0]]
        self.scenes = list(ev["scenes"])
        held = set(ev["heldout_scenes"])
        self.split = {"all": np.arange(len(self.scenes)),
                      "heldout": np.asarray([i for i, s in enumerate(self.scenes) if s in held])}
        self.counts = {k: bootstrap_counts(len(v), n_bootstrap, 0).numpy() for k, v in self.split.items()}
        m0 = measures[self.seeds[0]]
        any_arm = next(iter(m0["displacement"]))
        self.clusters = list(m0["displacement"][any_arm])
        self.counts["clusters"] = bootstrap_counts(len(self.clusters), n_bootstrap, 0).numpy()

    def _per_scene(self, model: str, seed: int, lang: str) -> dict:
        if model == "base":
            return self.base[seed]["per_scene"]["base"][lang]
        return self.results[seed][model]["per_scene"][lang]

    def vector(self, name: str, model: str, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The per-unit vector and the bootstrap counts [K, B] of a resampled outcome (None: none)."""
        kind, lang, key, split, _ = OUTCOMES[name]
        if kind == "scene":
            idx = self.split[split]
            return _scene_vector(self._per_scene(model, seed, lang), key)[idx], self.counts[split]
        if kind == "displacement":
            if model == "base":
                return np.zeros(len(self.clusters)), self.counts["clusters"]
            d = self.measures[seed]["displacement"][model]
            return np.asarray([d[c][-1] for c in self.clusters]), self.counts["clusters"]
        return None

    def scalar(self, name: str, model: str, seed: int) -> tuple[float, np.ndarray]:
        """``(value, draws [B])`` of an outcome without a per-unit vector."""
        kind, _, key, _, _ = OUTCOMES[name]
        if kind == "loss":
            v = self.base[seed][key]["base"] if model == "base" else self.results[seed][model][key]
            return float(v), np.full(2, float(v))
        if kind == "drift":
            if model == "base":
                return 0.0, np.zeros(2)
            m = self.measures[seed]
            return float(np.mean(m["drift"][model])), np.asarray(m["drift_boot_mean"][model], dtype=np.float64)
        if kind == "probe":
            p = self.measures[seed]["probe_transfer"][model]
            v = float(np.mean([p[a][-1] for a in p]))
            return v, np.full(2, v)
        raise KeyError(name)

    def value(self, name: str, model: str, seed: int) -> float:
        vec = self.vector(name, model, seed)
        return float(vec[0].mean()) if vec is not None else self.scalar(name, model, seed)[0]

    def diff(self, name: str, a: str, b: str, seed: int) -> tuple[float, np.ndarray]:
        """``a - b`` in one seed and its paired draws."""
        va, vb = self.vector(name, a, seed), self.vector(name, b, seed)
        if va is not None:
            d, counts = va[0] - vb[0], va[1]
            return float(d.mean()), (d @ counts) / counts.sum(0)
        (xa, da), (xb, db) = self.scalar(name, a, seed), self.scalar(name, b, seed)
        if da.shape != db.shape:               # the base's drift has no draws: its value is 0 exactly
            db = np.full(da.shape, xb) if db.size == 2 else db
            da = np.full(db.shape, xa) if da.size == 2 else da
        return xa - xb, da - db


def _num(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def contrast(values: _Values, name: str, a: str, b: str, level: float = 0.95) -> dict:
    """``a - b`` of one outcome: per seed, and across seeds (:func:`driftlens.compare.run_stats`)."""
    from driftlens.compare import run_stats

    per = [values.diff(name, a, b, s) for s in values.seeds]
    vals = np.asarray([p[0] for p in per])                                  # [R]
    width = max(p[1].size for p in per)
    draws = np.stack([p[1] if p[1].size == width else np.full(width, p[0]) for p in per])   # [R, B]
    st = run_stats(vals, draws, level=level)
    kind = OUTCOMES[name][0]
    covers = ("training runs, then the evaluation scenes (or probe scenes) within a run" if kind in
              ("scene", "displacement", "drift") else "training runs only (no within-run draws)")
    return {"per_seed": [float(v) for v in vals], "mean": float(st["mean"]), "sd": float(st["sd"]),
            "lo": float(st["lo"]), "hi": float(st["hi"]), "p": _num(st["p"]), "seeds_needed": _num(st["needed"]),
            "covers": covers}


# ----------------------------------------------------------------------------- the result

def assemble(plan: dict, arms, results: dict, measures: dict, base: dict) -> dict:
    """Everything ``regularizer.json`` holds: tree, settings, per-seed values, contrasts, goal, per-image evidence."""
    from driftlens.organism.experiment import arm, tree_dict

    seeds = list(results)
    v = _Values(seeds, results, measures, base, int(plan["settings"]["n_bootstrap"]))
    out = {"seeds": seeds, "tree": tree_dict(arms), "settings": {k: plan[k] for k in plan if k != "stores"},
           "definitions": DEFINITIONS, "outcomes": list(OUTCOMES),
           "base": {k: [v.value(k, "base", s) for s in seeds] for k in OUTCOMES if k not in ("visual_drift",
                                                                                           "displacement")},
           "arms": {}, "contrasts": {}, "goal": {}, "per_image": {}}
    for a in arms:
        r = {k: [v.value(k, a, s) for s in seeds] for k in OUTCOMES}
        r.update({key: [results[s][a][key] for s in seeds]
                  for key in ("seconds_per_step", "hinge_active_share", "image_steps", "mean_terms")})
        r["trainable"] = results[seeds[0]][a]["trainable"]
        r["ranks"] = results[seeds[0]][a]["ranks"]
        r["visual_drift_by_layer"] = [measures[s]["drift"][a] for s in seeds]
        r["probe_transfer_by_layer"] = [measures[s]["probe_transfer"][a] for s in seeds]
        out["arms"][a] = r
        node = arm(a)
        if node.parent and node.parent in arms and len(seeds) >= 2:
            out["contrasts"][f"{a} - {node.parent}"] = {
                "arm": a, "parent": node.parent, "factor": node.factor,
                "outcomes": {k: contrast(v, k, a, node.parent) for k in OUTCOMES},
                "time_per_step_ratio": [results[s][a]["seconds_per_step"] / results[s][node.parent]["seconds_per_step"]
                                        for s in seeds]}
    if len(seeds) >= 2:
        out["goal"] = goal(v, arms)
        out["per_image"] = per_image(measures, arms, seeds)
    return out


def goal(values: _Values, arms) -> dict:
    """The issue's goal per regularized arm present, as stated before the run.

    ``english_kept``: mean over seeds of (arm - base) English grounding gain >= -0.05;
    ``korean_kept``: mean (arm - lora_uniform) Korean grounding gain >= -0.03 and mean Korean LM
    loss <= 1.10 x lora_uniform's; ``beats_replay``: on at least one task outcome the across-seed
    t-test of arm - replay gives p < 0.05 in the arm's favour. ``met``: all three.
    """
    out = {}
    for a in (x for x in REGULARIZED if x in arms):
        en = contrast(values, "en_gain", a, "base")
        ko = contrast(values, "ko_gain", a, "lora_uniform") if "lora_uniform" in arms else None
        lm_a = float(np.mean([values.value("ko_lm_loss", a, s) for s in values.seeds]))
        lm_u = float(np.mean([values.value("ko_lm_loss", "lora_uniform", s) for s in values.seeds]))
        wins, vs = [], {}
        if "replay" in arms and a != "replay":
            for k in TASK:
                c = contrast(values, k, a, "replay")
                vs[k] = c
                if c["p"] is not None and c["p"] < GOAL["alpha"] and c["mean"] * OUTCOMES[k][4] > 0:
                    wins.append(k)
        r = {"english_kept": en["mean"] >= -GOAL["en_gain_points"], "en_gain_vs_base": en,
             "korean_kept": bool(ko is not None and ko["mean"] >= -GOAL["ko_gain_points"]
                                 and lm_a <= GOAL["ko_loss_ratio"] * lm_u),
             "ko_gain_vs_lora_uniform": ko, "ko_lm_loss_ratio_vs_lora_uniform": lm_a / lm_u,
             "beats_replay_on": wins, "beats_replay": bool(wins), "vs_replay": vs}
        r["met"] = bool(r["english_kept"] and r["korean_kept"] and r["beats_replay"])
        out[a] = r
    return out


def per_image(measures: dict, arms, seeds) -> dict:
    """Per arm and language: the per-seed Spearman association across scenes between displacement and the
    change of grounding gain (log-likelihood), and its mean over seeds with a t interval over seeds."""
    from driftlens.compare import run_stats

    out = {}
    for a in arms:
        for lang in ("en", "ko"):
            per = [measures[s]["association"][a][lang] for s in seeds]
            eff = np.asarray([p["effect"] for p in per])
            st = run_stats(eff, np.repeat(eff[:, None], 2, 1))
            out.setdefault(a, {})[lang] = {
                "per_seed": per, "mean": float(st["mean"]), "lo": float(st["lo"]), "hi": float(st["hi"]),
                "p": _num(st["p"]), "seeds_with_p_below_0.05": int(sum(p["p"] < 0.05 for p in per))}
    return out


# ----------------------------------------------------------------------------- words, table, figure

def _fmt(x, nd=3) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def _ms(values) -> str:
    a = np.asarray([np.nan if x is None else x for x in values], dtype=np.float64)
    if np.isnan(a).all():
        return ""
    return f"{np.nanmean(a):.3f}±{np.nanstd(a, ddof=1):.3f}" if a.size > 1 else f"{a[0]:.3f}"


TABLE = ("en_acc", "ko_acc", "en_gain", "ko_gain", "en_lm_loss", "ko_lm_loss", "ko_lm_loss_new_forms",
         "visual_drift", "displacement", "probe_transfer")


def markdown(result: dict) -> str:
    """``regularizer.md``: tree, per-arm table, each arm against its parent in words, the goal, per-image evidence."""
    seeds = result["seeds"]
    lines = [f"# The regularizer experiment ({len(seeds)} seeds: {seeds})", "",
             "Arm tree (each arm differs from its parent in exactly the named factor):", ""]
    for t in result["tree"]:
        lines.append(f"- `{t['arm']}`: parent `{t['parent']}`, factor `{t['factor']}` ({t['role']}); config "
                     + ", ".join(f"{k}={v}" for k, v in t["config"].items()))
    s = result["settings"]
    lines += ["", f"Settings (fixed in settings.json before any arm ran, {s.get('written', '')}): "
              + ", ".join(f"{k}={v}" for k, v in s["settings"].items())
              + f"; steps {s['steps']}, budget {s['budget']}; ranks from `{s['contrast']}` (mean over seeds): "
              f"{s['layer_ranks']['contrast']} per layer; anchor layer weights {s['anchor_layer_weights']}.", "",
              "Mean ± standard deviation over seeds:", "",
              "| arm | " + " | ".join(TABLE) + " | s/step | hinge active |",
              "|---|" + "---|" * (len(TABLE) + 2)]
    lines.append("| base | " + " | ".join(_ms(result["base"][k]) if k in result["base"] else "0" for k in TABLE)
                 + " | | |")
    for a, r in result["arms"].items():
        lines.append(f"| {a} | " + " | ".join(_ms(r[k]) for k in TABLE) + f" | {_ms(r['seconds_per_step'])} | "
                     + (_ms(r["hinge_active_share"]) if any(x is not None for x in r["hinge_active_share"]) else "")
                     + " |")
    lines += ["", "## Each arm against its parent (per-seed paired differences; across seeds: mean [95% interval], "
              "t-test p over seeds, seeds needed for 80% power)", ""]
    for name, c in result["contrasts"].items():
        lines.append(f"**{name}** (factor `{c['factor']}`): " + words(c["outcomes"], len(seeds)))
        lines.append("")
        lines.append("| outcome | per seed | mean [95% interval] | p | seeds needed |")
        lines.append("|---|---|---|---|---|")
        for k, o in c["outcomes"].items():
            lines.append(f"| {k} | {', '.join(f'{x:+.3f}' for x in o['per_seed'])} | {o['mean']:+.3f} "
                         f"[{o['lo']:+.3f}, {o['hi']:+.3f}] | {_fmt(o['p'])} | "
                         f"{'never' if o['seeds_needed'] is None else int(o['seeds_needed'])} |")
        lines.append("")
    if result["goal"]:
        lines += ["## The goal (stated before the run)", "",
                  "A regularized arm keeps English grounding gain within 5 points of the base, Korean grounding gain "
                  "within 0.03 and Korean LM loss within 10% of `lora_uniform`, and beats `replay` alone on at least "
                  "one task outcome across seeds (t-test over seeds, p < 0.05).", ""]
        for a, g in result["goal"].items():
            ko = g["ko_gain_vs_lora_uniform"]
            lines.append(f"- `{a}`: **{'met' if g['met'] else 'not met'}** -- English gain vs base "
                         f"{g['en_gain_vs_base']['mean']:+.3f} ({'kept' if g['english_kept'] else 'not kept'}); "
                         f"Korean gain vs lora_uniform {ko['mean'] if ko else float('nan'):+.3f}, Korean loss "
                         f"x{g['ko_lm_loss_ratio_vs_lora_uniform']:.2f} "
                         f"({'kept' if g['korean_kept'] else 'not kept'}); "
                         f"beats replay on: {', '.join(g['beats_replay_on']) or 'nothing'}")
    if result["per_image"]:
        lines += ["", "## Per image: does a scene's visual-token displacement go with the change of its grounding "
                  "gain? (Spearman across the 72 scenes, last layer, log-likelihood gain, base -> arm; mean over "
                  "seeds [t interval over seeds])", "",
                  "| arm | English | Korean |", "|---|---|---|"]
        for a, d in result["per_image"].items():
            lines.append(f"| {a} | " + " | ".join(
                f"{d[lang]['mean']:+.2f} [{d[lang]['lo']:+.2f}, {d[lang]['hi']:+.2f}] "
                f"({d[lang]['seeds_with_p_below_0.05']}/{len(seeds)} seeds p<0.05)" for lang in ("en", "ko")) + " |")
    return "\n".join(lines) + "\n"


def words(outcomes: dict, n_seeds: int, alpha: float = 0.05) -> str:
    """One sentence per contrast: where the arm beats or loses to its parent, what moved, what stays open."""
    better, worse, moved, unknown = [], [], [], []
    for k, o in outcomes.items():
        sign = OUTCOMES[k][4]
        if o["p"] is not None and o["p"] < alpha:
            text = f"{k} {o['mean']:+.3f} [{o['lo']:+.3f}, {o['hi']:+.3f}]"
            (moved if sign == 0 else better if o["mean"] * sign > 0 else worse).append(text)
        else:
            need = "never" if o["seeds_needed"] is None else f"~{int(o['seeds_needed'])}"
            unknown.append(f"{k} ({need})")
    return (f"across {n_seeds} seeds (t over seeds, p < {alpha:g}) it is better than its parent on "
            f"{', '.join(better) or 'nothing'}; worse on {', '.join(worse) or 'nothing'}; the measurements of the "
            f"visual tokens moved: {', '.join(moved) or 'none'}; not distinguishable from the parent on "
            f"{', '.join(unknown) or 'nothing'} (in brackets: the seeds the observed effect would need for 80% "
            f"power; never: no number would).")


def plot_contrasts(result: dict, outcomes=FIGURE):
    """Each arm minus its parent, one panel per outcome: per-seed dots, across-seed interval and mean."""
    import matplotlib.pyplot as plt

    names = list(result["contrasts"])
    n = len(outcomes)
    cols = 3
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 0.32 * len(names) * rows + 1.2 * rows), squeeze=False,
                             sharey=True)
    y = np.arange(len(names))
    for ax, k in zip(axes.flat, outcomes):
        for i, name in enumerate(names):
            o = result["contrasts"][name]["outcomes"][k]
            ax.scatter(o["per_seed"], np.full(len(o["per_seed"]), i) + np.linspace(-0.15, 0.15, len(o["per_seed"])),
                       s=10, color="0.45", zorder=2)
            ax.plot([o["lo"], o["hi"]], [i, i], color="#0072B2", lw=2, zorder=1)
            ax.scatter([o["mean"]], [i], marker="D", s=28, color="#0072B2", zorder=3)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_title(k, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in axes[:, 0]:
        ax.set_yticks(y, names, fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    axes[0, 0].invert_yaxis()
    fig.suptitle(f"each arm minus its parent ({len(result['seeds'])} seeds: dots; diamond and bar: mean and 95% "
                 f"across-seed interval)", fontsize=9)
    fig.tight_layout()
    return fig


def write_outputs(result: dict, out) -> dict:
    """``regularizer.json``, ``regularizer.md`` and (with two or more seeds) ``regularizer.png`` in ``out``."""
    from driftlens import plot

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": atomic_write(out / "regularizer.json", json.dumps(result, indent=1, ensure_ascii=False) + "\n"),
             "markdown": atomic_write(out / "regularizer.md", markdown(result))}
    if result["contrasts"]:
        files["figure"] = Path(plot.save(plot_contrasts(result), out / "regularizer.png"))
    return files
