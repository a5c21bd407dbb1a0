"""``driftlens demo``: the whole pipeline on the built-in model organism, over seeds.

build (or load the cached) organism for every seed -> generate the organism's world probe set
-> per seed, capture it across the Korean trajectory and the English control -> per seed, the
drift report against ``base`` -> the seeds combined as training runs (:mod:`driftlens.compare`): the
Korean-minus-control contrast per layer with its across-seed interval -> means and spreads over seeds,
figures, a rank schedule from the contrast, ``summary.json`` and ``summary.md`` in the output folder.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from driftlens.outputs import atomic_write

DEMO_SEEDS = (0, 1, 2)
# What the demo measures: decided before looking at the organism's numbers (issue notes).
DEMO_METRICS = ("mmd", "paired_shift", "gap", "mir")
DEMO_SITES = ("hidden", "final")          # captured; the report reads `hidden` (+ `final` for MIR)
# MIR intervals: each bootstrap draw is a batched eigendecomposition; 200 keep the demo in budget.
DEMO_MIR_BOOTSTRAP = 200
# The demo's probe set: every scene of the organism's world (72), rendered twice at the
# organism's image size, one caption probe per image (languages alternating); the two renders
# of a scene are one cluster, so the report resamples 72 independent units.
DEMO_PROBES = {"n_scenes": 72, "renders": 2, "kinds": ("caption",), "alternate_langs": True}
BANDWIDTH_SCALES = (0.5, 1.0, 2.0)   # the headline contrast's sensitivity to the MMD bandwidth
DEFINITIONS = {
    "grounding_accuracy": "likelihood ranking of the candidate answers to color / shape / position questions, one "
                          "rendering never trained on per scene of the world (216 questions per language, all 72 "
                          "scenes), with the scene's own image",
    "grounding_accuracy_seen": "the same on the 54 seen scenes (trained on, in other renderings)",
    "grounding_accuracy_heldout": "the same on the 18 held-out scenes (never in any training batch of any stage)",
    "accuracy_mismatched": "the same questions with the image of another scene that differs in every attribute",
    "accuracy_no_image": "the same questions with a blank image (the world's background, no shape)",
    "grounding_gain": "accuracy with the true image minus accuracy with the mismatched image (all scenes): how much "
                      "the answers use the image",
    "grounding_gain_seen": "the same on the seen scenes",
    "grounding_gain_heldout": "the same on the held-out scenes",
    "grounding_gain_logprob": "the right answer's mean log-likelihood (nats) with the true image minus with the "
                              "mismatched image",
    "grounding_gain_logprob_seen": "the same on the seen scenes",
    "grounding_gain_logprob_heldout": "the same on the held-out scenes",
    "answer_logprob": "the right answer's mean log-likelihood (nats; sum over its tokens) with the true image",
    "answer_logprob_mismatched": "the same with the mismatched image",
    "answer_logprob_no_image": "the same with the blank image",
    "ko_lm_loss": "mean token cross-entropy (nats) on the Korean captions of the 18 held-out scenes (a trained "
                  "sentence form about scenes never trained on)",
    "ko_lm_loss_new_forms": "the same on Korean sentence forms and plain sentences never trained on",
    "ko_lm_loss_seen": "the same on Korean training strings (captions, question/answer text)",
    "en_lm_loss": "mean token cross-entropy (nats) on the English captions of the 18 held-out scenes",
    "en_lm_loss_seen": "the same on English training strings (captions, question/answer text)",
    "visual_drift_effect": "paired cluster MMD^2 between the base's and the checkpoint's visual-token hidden "
                           "states, per layer (report variable `mmd`, site hidden, modality visual); top level: the "
                           "mean over seeds",
    "visual_drift_lo": "top level: lower end of the 95% across-seed interval (hierarchical: seeds, then the probe "
                       "set's clusters; Student t over seeds). Per seed: the lower end of that seed's 95% cluster-"
                       "bootstrap interval, which covers probe sampling only",
    "visual_drift_hi": "upper end of the same intervals",
    "visual_drift_p": "cluster sign-flip p-value of 'anything changed' adjusted over the report's cells (Benjamini-"
                      "Hochberg; per seed); top level: the largest over seeds. Any weight change moves a deterministic "
                      "model's activations, so it sits at its floor for every non-reference checkpoint: kept for "
                      "completeness, not a finding",
    "excess_drift": "the Korean-minus-control contrast: visual MMD^2 at ko-k minus at en-k (the same step of the "
                    "English control, same optimizer, steps and mix), per layer; top level the mean over seeds",
    "excess_drift_lo": "lower end of the 95% across-seed interval of the contrast (seeds, then clusters)",
    "excess_drift_hi": "upper end of the same interval",
    "excess_drift_p": "two-sided Student t over seeds of the per-seed contrasts (H0: the Korean adaptation moves "
                      "the visual tokens no more than the English control does); a test that can come out 'no'",
    "excess_drift_runs_needed": "the number of seeds at which this mean contrast would reach 80% power in that test "
                                "(inf: never)",
    "layers_excess_fraction": "fraction of layers whose across-seed interval of the contrast lies above 0",
    "layers_positive_every_seed": "fraction of layers whose contrast is positive in every seed",
    "seed_spread_over_halfwidth": "the standard deviation over seeds of a visual cell's MMD^2 divided by the median "
                                  "over seeds of its one-seed 95% interval's half-width: median, min and max over "
                                  "the non-reference checkpoints and layers (how much one seed's interval "
                                  "understates the run-to-run variation)",
    "ranks_agreement": "the rank schedule from the contrast at the last step, mean over seeds (ranks.json), beside "
                       "each seed's own schedule: per-seed ranks per layer, their mean pairwise Spearman correlation "
                       "and the largest difference of one layer's rank between two seeds",
    "bandwidth_sensitivity": "the last step's contrast (mean over seeds, per layer) and the ratio of the last to the "
                             "first Korean checkpoint's mean drift, with the MMD bandwidth at 0.5x, 1x and 2x the "
                             "reference's median-heuristic sigma: a conclusion that depends on the bandwidth shows "
                             "here",
    "spread": "standard deviation over seeds (ddof=1) of each per-seed value",
}
PER_LAYER = ("visual_drift_effect", "visual_drift_lo", "visual_drift_hi", "visual_drift_p")
LOSSES = ("ko_lm_loss", "ko_lm_loss_new_forms", "ko_lm_loss_seen", "en_lm_loss", "en_lm_loss_seen")
# per-language outcomes of the summary <- the keys of evaluation.json's image_reliance
OUTCOMES = {
    "grounding_accuracy_seen": "accuracy_seen", "grounding_accuracy_heldout": "accuracy_heldout",
    "accuracy_mismatched": "accuracy_mismatched", "accuracy_no_image": "accuracy_none",
    "grounding_gain": "gain", "grounding_gain_seen": "gain_seen", "grounding_gain_heldout": "gain_heldout",
    "grounding_gain_logprob": "gain_logprob", "grounding_gain_logprob_seen": "gain_logprob_seen",
    "grounding_gain_logprob_heldout": "gain_logprob_heldout",
    "answer_logprob": "logprob", "answer_logprob_mismatched": "logprob_mismatched",
    "answer_logprob_no_image": "logprob_none",
}
BY_LANG = ("grounding_accuracy", *OUTCOMES)


def seed_values(report, evaluation: dict, labels: list[str]) -> dict:
    """One seed's figures for the checkpoints ``labels`` (first is the reference)."""
    sel = {"site": "hidden", "modality": "visual"}
    q = report["mmd_q" if "mmd_q" in report else "mmd_p"].sel(**sel)
    out = {k: {} for k in (*BY_LANG, *LOSSES, *PER_LAYER)}
    for c in labels:
        out["grounding_accuracy"][c] = dict(evaluation["grounding_accuracy"][c])
        for key, src in OUTCOMES.items():
            out[key][c] = {lang: float(evaluation["image_reliance"][c][lang][src]) for lang in ("en", "ko")}
        for key in LOSSES:
            out[key][c] = float(evaluation[key][c])
        for key, var in zip(PER_LAYER, ("mmd", "mmd_lo", "mmd_hi")):
            out[key][c] = [float(v) for v in report[var].sel(checkpoint=c, **sel).values]
        qc = q.sel(checkpoint=c).values
        out["visual_drift_p"][c] = [float(v) if np.isfinite(v) else 1.0 for v in qc]
    return out


def combine(per_seed: dict, labels: list[str]) -> tuple[dict, dict]:
    """Means over seeds (``visual_drift_p``: the largest) and standard deviations over seeds."""
    seeds = list(per_seed)

    def stack(key, c, lang=None):
        vals = [per_seed[s][key][c] if lang is None else per_seed[s][key][c][lang] for s in seeds]
        return np.asarray(vals, dtype=np.float64)

    def sd(a):
        return np.std(a, axis=0, ddof=1) if len(a) > 1 else np.zeros_like(a[0])

    mean, spread = {}, {}
    for key in BY_LANG:
        mean[key] = {c: {lang: float(stack(key, c, lang).mean()) for lang in ("en", "ko")} for c in labels}
        spread[key] = {c: {lang: float(sd(stack(key, c, lang))) for lang in ("en", "ko")} for c in labels}
    for key in LOSSES:
        mean[key] = {c: float(stack(key, c).mean()) for c in labels}
        spread[key] = {c: float(sd(stack(key, c))) for c in labels}
    for key in PER_LAYER:
        agg = (lambda a: a.max(0)) if key == "visual_drift_p" else (lambda a: a.mean(0))
        mean[key] = {c: [float(v) for v in agg(stack(key, c))] for c in labels}
        spread[key] = {c: [float(v) for v in sd(stack(key, c))] for c in labels}
    return mean, spread


def across_seeds(runs, labels: list[str]) -> dict:
    """The top-level intervals of the visual drift: across seeds (hierarchical), from the combined report."""
    if "mmd_runs" not in runs:
        return {}
    sel = {"site": "hidden", "modality": "visual"}
    return {key: {c: [float(v) for v in runs[var].sel(checkpoint=c, **sel).values] for c in labels}
            for key, var in (("visual_drift_lo", "mmd_runs_lo"), ("visual_drift_hi", "mmd_runs_hi"))}


def contrast_values(runs, pairs: list[tuple[str, str]]) -> dict:
    """The Korean-minus-control contrast per layer: per seed, and across seeds with interval, p, runs needed."""
    from driftlens.compare import contrast_label

    sel = {"site": "hidden", "modality": "visual"}
    labels = [contrast_label(a, b) for a, b in pairs]
    per_run = runs["mmd_contrast"].sel(**sel)
    out = {"per_seed": {str(r).removeprefix("seed-"): {lab: [float(v) for v in per_run.sel(run=r, contrast=lab).values]
                                                       for lab in labels} for r in per_run.run.values}}
    if "mmd_contrast_runs" not in runs:
        return out
    for key, var in (("excess_drift", ""), ("excess_drift_lo", "_lo"), ("excess_drift_hi", "_hi"),
                     ("excess_drift_p", "_p"), ("excess_drift_runs_needed", "_needed")):
        da = runs[f"mmd_contrast_runs{var}"].sel(**sel)
        out[key] = {lab: [float(v) for v in da.sel(contrast=lab).values] for lab in labels}
    out["layers_excess_fraction"] = {lab: float(np.mean(np.asarray(out["excess_drift_lo"][lab]) > 0))
                                     for lab in labels}
    out["layers_positive_every_seed"] = {lab: float(np.mean((per_run.sel(contrast=lab).values > 0).all(0)))
                                         for lab in labels}
    return out


def spread_over_halfwidth(runs) -> dict | None:
    """How much wider the seeds' spread is than one seed's interval: per visual hidden cell of a non-reference
    checkpoint, the standard deviation over seeds of ``mmd`` divided by the median over seeds of the 95%
    interval's half-width; median and range over cells (None with fewer than two seeds)."""
    if "run" not in runs.dims or runs.sizes["run"] < 2:
        return None
    sel = {"site": "hidden", "modality": "visual"}
    ref = runs.attrs.get("reference")
    keep = [c for c in runs.checkpoint.values if str(c) != str(ref)]
    cell = runs.sel(checkpoint=keep, **sel)
    half = ((cell["mmd_hi"] - cell["mmd_lo"]) / 2).median("run")
    ratio = (cell["mmd"].std("run", ddof=1) / half).values.ravel()
    ratio = ratio[np.isfinite(ratio)]
    return {"median": float(np.median(ratio)), "min": float(ratio.min()), "max": float(ratio.max())}


def write_summary(out: Path, summary: dict) -> tuple[Path, Path]:
    """``summary.json`` and a readable ``summary.md`` (mean ± standard deviation over seeds)."""
    js = atomic_write(out / "summary.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    one_seed = (" (one seed here: every ± is 0 by construction, not a measured spread)"
                if len(summary["seeds"]) == 1 else "")
    lines = [
        "# driftlens demo: the model organism",
        "",
        f"Seeds {summary['seeds']}; every figure is the mean ± standard deviation over seeds{one_seed}. Training "
        "this small model is chaotic: figures differ between seeds, CPUs and thread counts; the per-seed values "
        "are in summary.json (`per_seed`). Chance accuracy of the grounding questions: "
        f"{summary['chance_accuracy']:.3f}.",
        "",
    ]
    for title, part in (("Korean adaptation", summary), ("English control (same steps, lr, mix)",
                                                         summary["control"])):
        lines += [f"## {title}: outcomes", "", *outcome_table(part), ""]
    for title, part in (("Korean adaptation", summary), ("English control (same steps, lr, mix)",
                                                         summary["control"])):
        lines += [f"## {title}: visual drift", "",
                  "| checkpoint | EN grounding | KO grounding | KO LM loss (held-out) "
                  "| visual MMD^2 by layer (hidden) |",
                  "|---|---|---|---|---|"]
        sp = part["spread"]
        for c in part["checkpoints"]:
            acc, asd = part["grounding_accuracy"][c], sp["grounding_accuracy"][c]
            eff = ", ".join(f"{m:.3f}±{s:.3f}" for m, s in zip(part["visual_drift_effect"][c],
                                                              sp["visual_drift_effect"][c]))
            lines.append(f"| {c} | {acc['en']:.3f}±{asd['en']:.3f} | {acc['ko']:.3f}±{asd['ko']:.3f} | "
                         f"{part['ko_lm_loss'][c]:.2f}±{sp['ko_lm_loss'][c]:.2f} | {eff} |")
        lines.append("")
    lines += ["Outcomes: accuracy on the 216 questions per language (likelihood ranking; seen / held-out scenes "
              "apart), grounding gain = accuracy with the true image minus with a mismatched image, LM losses in "
              "nats per token on held-out scenes' captions and on Korean sentence forms never trained on "
              "(definitions in summary.json).", ""]
    lines += ["Visual MMD^2: the paired cluster MMD^2 between the base's and the checkpoint's visual-token hidden "
              "states (72 scenes, clusters resampled), mean ± standard deviation over seeds. Every non-reference "
              "cell differs from the base in every seed (any weight change moves a deterministic model's "
              "activations), so 'different from zero' is not the question; the contrast below is.", ""]
    if "excess_drift" in summary:
        n = len(summary["seeds"])
        lines += ["## Korean minus English control, step by step (excess visual drift)", "",
                  f"| contrast | per layer: mean over {n} seeds [95% across-seed interval] | p over seeds | "
                  f"seeds for 80% power | layers above 0 |", "|---|---|---|---|---|"]
        for lab, mean in summary["excess_drift"].items():
            cells = ", ".join(f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]" for m, lo, hi in
                              zip(mean, summary["excess_drift_lo"][lab], summary["excess_drift_hi"][lab]))
            ps = ", ".join(f"{p:.2g}" for p in summary["excess_drift_p"][lab])
            need = ", ".join("inf" if not np.isfinite(k) else f"{k:.0f}" for k in
                             summary["excess_drift_runs_needed"][lab])
            lines.append(f"| {lab} | {cells} | {ps} | {need} | {summary['layers_excess_fraction'][lab]:.2f} |")
        ratio = summary.get("seed_spread_over_halfwidth")
        how = (f" here, the spread between seeds is a median {ratio['median']:.1f}x (range {ratio['min']:.1f}-"
               f"{ratio['max']:.1f}x) one seed's interval half-width" if ratio else "")
        lines += ["", "The across-seed interval covers training runs (seeds, then the probe set's clusters); one "
                  f"seed's own interval covers probe sampling only:{how}.", ""]
    if "ranks_agreement" in summary:
        ra = summary["ranks_agreement"]
        lines += [f"Rank schedule (ranks.json) from {ra['signal']}: ranks per layer {ra['layer_ranks']}; per seed "
                  + "; ".join(f"seed {k}: {v}" for k, v in ra["per_seed_layer_ranks"].items())
                  + f" (mean pairwise Spearman {ra['mean_spearman']:.2f}, largest difference of one layer's rank "
                    f"between seeds {ra['max_rank_difference']}).", ""]
    if "bandwidth_sensitivity" in summary:
        lines += ["Bandwidth sensitivity of the last step's contrast (mean over seeds, per layer; and the ratio of "
                  "the last to the first Korean checkpoint's mean drift):", ""]
        for scale, v in summary["bandwidth_sensitivity"].items():
            lines.append(f"- {scale}x sigma: contrast " + ", ".join(f"{x:+.3f}" for x in v["excess_drift"])
                         + "; last / first Korean step " + ", ".join(f"{x:.2f}" for x in v["last_over_first"]))
        lines.append("")
    if "files" in summary:
        lines += ["## Files", ""] + [f"- {k}: `{v}`" for k, v in summary["files"].items()]
    md = atomic_write(out / "summary.md", "\n".join(lines) + "\n")
    return js, md


OUTCOME_COLUMNS = (("EN acc, seen", "grounding_accuracy_seen", "en", ".2f"),
                   ("EN acc, held-out", "grounding_accuracy_heldout", "en", ".2f"),
                   ("KO acc, seen", "grounding_accuracy_seen", "ko", ".2f"),
                   ("KO acc, held-out", "grounding_accuracy_heldout", "ko", ".2f"),
                   ("EN gain", "grounding_gain", "en", ".2f"), ("KO gain", "grounding_gain", "ko", ".2f"),
                   ("EN LM loss", "en_lm_loss", None, ".2f"), ("KO LM loss", "ko_lm_loss", None, ".2f"),
                   ("KO LM loss, new forms", "ko_lm_loss_new_forms", None, ".2f"))


def outcome_table(part: dict) -> list[str]:
    """Markdown rows of one trajectory's outcomes (mean ± standard deviation over seeds per checkpoint)."""
    rows = ["| checkpoint | " + " | ".join(name for name, *_ in OUTCOME_COLUMNS) + " |",
            "|---" * (len(OUTCOME_COLUMNS) + 1) + "|"]
    for c in part["checkpoints"]:
        cells = []
        for _, key, lang, fmt in OUTCOME_COLUMNS:
            m, sd = part[key][c], part["spread"][key][c]
            if lang is not None:
                m, sd = m[lang], sd[lang]
            cells.append(f"{m:{fmt}}±{sd:{fmt}}")
        rows.append(f"| {c} | " + " | ".join(cells) + " |")
    return rows


def run_demo(out="driftlens-demo", cache=None, force: bool = False, budget: int | None = None,
             progress: bool = True, device="auto", seeds=DEMO_SEEDS) -> dict:
    """Run the demo; returns the summary dict (also written to ``out/summary.json``).

    Parameters
    ----------
    out : path
        Output folder.
    cache : path, optional
        Cache root for the organism builds (default ``$DRIFTLENS_CACHE`` or ``~/.cache/driftlens``).
    force : bool
        Rebuild the organism even when cached.
    budget : int, optional
        Total LoRA rank of the exported schedule (default 8 per adapted module).
    seeds : sequence of int
        Organism seeds (at least 1; the README's figures use 0, 1, 2).
    """
    from driftlens import organism
    from driftlens.compare import combine_runs, trajectory_pairs
    from driftlens.drift import compare_report
    from driftlens.organism.example import keep_as_example, measure_seed, world_probes
    from driftlens.probes import ProbeSet

    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    trajs = organism.build_seeds(seeds, force=force, progress=progress, cache=cache)
    seconds = {"organism": round(time.perf_counter() - t0, 1), "capture_and_drift": 0.0}
    probes = ProbeSet.load(world_probes(out / "probes" / "organism-world", trajs[0].recipe.image_size))
    ko_labels, en_labels = list(trajs[0].checkpoints), list(trajs[0].control)
    pairs = trajectory_pairs(ko_labels + en_labels, "ko-", "en-")            # ko-k minus en-k, k = 1 .. 5
    per_seed = {"ko": {}, "en": {}}
    reports = {}
    for traj in trajs:
        tick = time.perf_counter()
        report = measure_seed(traj, probes, out / f"seed-{traj.seed}", device=device, progress=progress)
        keep_as_example(traj, out / f"seed-{traj.seed}", cache)
        seconds["capture_and_drift"] += time.perf_counter() - tick
        ev = organism.evaluate(traj, progress=progress)
        per_seed["ko"][traj.seed] = seed_values(report, ev, ko_labels)
        per_seed["en"][traj.seed] = seed_values(report, ev, en_labels)
        reports[f"seed-{traj.seed}"] = report
    chance = organism.chance_accuracy()
    mean_ko, spread_ko = combine(per_seed["ko"], ko_labels)
    mean_en, spread_en = combine(per_seed["en"], en_labels)
    tick = time.perf_counter()
    runs = compare_report(combine_runs(reports), contrasts=pairs)          # seeds are the runs
    mean_ko.update(across_seeds(runs, ko_labels))
    mean_en.update(across_seeds(runs, en_labels))
    contrast = contrast_values(runs, pairs)
    contrast["seed_spread_over_halfwidth"] = spread_over_halfwidth(runs)
    for seed, vals in contrast.pop("per_seed").items():
        per_seed["ko"][int(seed)]["excess_drift"] = vals
    files = _figures(out, runs, per_seed, mean_ko, mean_en, ko_labels, en_labels, chance)
    ranks_files, agreement = _ranks(runs, out, budget, pairs[-1])
    files.update(ranks_files)
    files["reports"] = ", ".join(str(out / f"seed-{t.seed}" / "drift.nc") for t in trajs)
    seconds["figures_and_ranks"] = time.perf_counter() - tick
    tick = time.perf_counter()
    sensitivity = bandwidth_sensitivity([out / f"seed-{t.seed}" / "activations.zarr" for t in trajs], pairs[-1],
                                        (ko_labels[1], ko_labels[-1]), device=device, progress=progress)
    seconds["bandwidth_sensitivity"] = time.perf_counter() - tick
    seconds = {k: round(v, 1) for k, v in seconds.items()}
    seconds["total"] = round(time.perf_counter() - t0, 1)
    summary = {
        "checkpoints": ko_labels,
        "seeds": [t.seed for t in trajs],
        "chance_accuracy": float(chance),
        **mean_ko,
        **contrast,
        "ranks_agreement": agreement,
        "bandwidth_sensitivity": sensitivity,
        "spread": spread_ko,
        "per_seed": {str(s): v for s, v in per_seed["ko"].items()},
        "control": {"checkpoints": en_labels, **mean_en, "spread": spread_en,
                    "per_seed": {str(s): v for s, v in per_seed["en"].items()}},
        "definitions": DEFINITIONS,
        "organism": [str(t.root) for t in trajs],
        "seconds": seconds,
        "files": files,
    }
    write_summary(out, summary)
    return summary


def bandwidth_sensitivity(stores, pair: tuple[str, str], ko_ends: tuple[str, str], *, device="auto",
                          progress: bool = False) -> dict:
    """The headline contrast (mean over seeds, per layer) and the last / first Korean step's drift ratio at
    0.5x, 1x and 2x the median-heuristic bandwidth (visual tokens, site hidden; MMD only)."""
    from driftlens.compare import combine_runs
    from driftlens.drift import drift
    from driftlens.store import open_store

    out = {}
    a, b = pair
    first, last = ko_ends
    needed = list(dict.fromkeys(["base", first, last, a, b]))    # only the checkpoints read (identical values)
    opened = [open_store(store, verify="fast").sel(checkpoint=needed) for store in stores]
    for scale in BANDWIDTH_SCALES:
        reps = {f"seed-{i}": drift(store, reference="base", metrics=("mmd",), sites=("hidden",),
                                   modalities=("visual",), n_permutations=1, n_bootstrap=2, correction=None,
                                   bandwidth_scale=scale, device=device, progress=False, verify="fast")
                for i, store in enumerate(opened)}
        eff = combine_runs(reps)["mmd"].sel(site="hidden", modality="visual").mean("run")    # [checkpoint, layer]
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = (eff.sel(checkpoint=last) / eff.sel(checkpoint=first)).values
        out[f"{scale:g}"] = {"excess_drift": [float(v) for v in (eff.sel(checkpoint=a) - eff.sel(checkpoint=b)).values],
                             "last_over_first": [float(v) for v in ratio]}
    return out


def _figures(out: Path, runs, per_seed, mean_ko, mean_en, ko_labels, en_labels, chance) -> dict:
    from driftlens import plot

    figs = out / "figures"
    files = {}
    n = runs.sizes["run"]
    if n == 1:                    # one seed: its own report, with its within-run (cluster) intervals
        runs = runs.isel(run=0, drop=True)
    ax = plot.drift_heatmap(runs, "mmd")
    ax.set_title(f"MMD$^2$ vs base (hidden, visual), {f'mean of {n} seeds' if n > 1 else 'one seed'}\nno marks: "
                 f"every cell differs from the base{' in every seed' if n > 1 else ''}; see contrast_by_layer",
                 fontsize=9)
    files["drift_heatmap"] = str(plot.save(ax, figs / "drift_heatmap.png"))
    files["drift_ko_vs_control"] = str(plot.save(plot.seeds_by_layer(
        {"Korean " + ko_labels[-1]: _per_layer(per_seed["ko"], ko_labels[-1]),
         "English control " + en_labels[-1]: _per_layer(per_seed["en"], en_labels[-1])},
        ylabel="visual MMD$^2$ vs base, hidden (dimensionless)",
        title="visual drift by layer: Korean adaptation vs English control"), figs / "drift_ko_vs_control.png"))
    if "mmd_contrast" in runs:
        files["contrast_by_layer"] = str(plot.save(plot.contrast_by_layer(runs, "mmd"),
                                                   figs / "contrast_by_layer.png"))
    files["modality_gap"] = str(plot.save(plot.modality_gap_by_layer(runs), figs / "modality_gap.png"))
    files["mir"] = str(plot.save(plot.mir_by_layer(runs), figs / "mir_by_layer.png"))
    ax = None
    for name, mean, labels in (("ko", mean_ko, ko_labels), ("control", mean_en, en_labels)):
        drift_mean = {c: float(np.mean(mean["visual_drift_effect"][c])) for c in labels}
        acc = {c: mean["grounding_accuracy"][c] for c in labels}
        ax = plot.grounding_vs_drift(acc, drift_mean, ax=ax, chance=chance if name == "ko" else None,
                                     tag=" (control)" if name == "control" else "")
    files["accuracy_vs_drift"] = str(plot.save(ax, figs / "accuracy_vs_drift.png"))
    return files


def _per_layer(per_seed: dict, label: str) -> np.ndarray:
    """[seeds, layers] visual drift effect of one checkpoint."""
    return np.asarray([v["visual_drift_effect"][label] for v in per_seed.values()])


def _ranks(runs, out: Path, budget: int | None, pair: tuple[str, str]) -> tuple[dict, dict]:
    """Rank schedule from the last step's Korean-minus-control contrast, mean over seeds; and how much the
    schedules each seed would give agree with each other."""
    from scipy import stats

    from driftlens import plot
    from driftlens.compare import contrast_label
    from driftlens.ranks import allocate_ranks

    n_layers = int(runs.sizes["layer"])
    budget = budget or 8 * n_layers * 4
    kw = dict(budget=budget, signal="mmd", rule="proportional", min_rank=2, max_rank=64,
              contrast=contrast_label(*pair))
    sched = allocate_ranks(runs, **kw)
    path = out / "ranks.json"
    sched.save(path)
    per_seed = {str(r).removeprefix("seed-"): allocate_ranks(runs.sel(run=r), **kw).layer_ranks().tolist()
                for r in runs.run.values}
    ranks = np.asarray(list(per_seed.values()))                       # [seeds, layers]
    rhos = [stats.spearmanr(ranks[i], ranks[j]).statistic for i in range(len(ranks)) for j in range(i + 1, len(ranks))]
    agreement = {"signal": f"mmd contrast {contrast_label(*pair)} (hidden, visual), mean over {len(ranks)} seeds",
                 "layer_ranks": sched.layer_ranks().tolist(), "per_seed_layer_ranks": per_seed,
                 "mean_spearman": float(np.nanmean(rhos)) if rhos else float("nan"),
                 "max_rank_difference": int(np.ptp(ranks, axis=0).max()) if len(ranks) > 1 else 0}
    return ({"ranks": str(path),
             "ranks_plot": str(plot.save(plot.rank_schedule(sched, runs), out / "figures" / "ranks.png"))}, agreement)
