"""``driftlens demo``: the whole pipeline on the built-in model organism, over seeds.

build (or load the cached) organism for every seed -> generate the organism's world probe set
-> per seed, capture it across the Korean trajectory and the English control -> per seed, the
drift report against ``base`` -> means and spreads over seeds, figures, a rank schedule,
``summary.json`` and ``summary.md`` in the output folder.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

DEMO_SEEDS = (0, 1, 2)
# What the demo measures: decided before looking at the organism's numbers (issue notes).
DEMO_METRICS = ("mmd", "paired_shift", "gap", "mir")
DEMO_SITES = ("hidden", "final")          # captured; the report reads `hidden` (+ `final` for MIR)
# MIR intervals: each bootstrap draw is a batched eigendecomposition; 200 keep the demo in budget.
DEMO_MIR_BOOTSTRAP = 200
ALPHA = 0.05
# The demo's probe set: every scene of the organism's world (72), rendered twice at the
# organism's image size, one caption probe per image (languages alternating); the two renders
# of a scene are one cluster, so the report resamples 72 independent units.
DEMO_PROBES = {"n_scenes": 72, "renders": 2, "kinds": ("caption",), "alternate_langs": True}
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
                           "states, per layer (report variable `mmd`, site hidden, modality visual)",
    "visual_drift_lo": "lower end of the 95% cluster-bootstrap interval (per seed; the summary's value is the "
                       "mean over seeds)",
    "visual_drift_hi": "upper end of the same interval",
    "visual_drift_p": "cluster sign-flip p-value adjusted over the report's cells (Benjamini-Hochberg; per seed); "
                      "the summary's value is the largest over seeds: <= 0.05 means significant in every seed",
    "layers_significant_fraction": "fraction of layers whose adjusted p-value is <= 0.05 (mean over seeds)",
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
    out = {k: {} for k in (*BY_LANG, *LOSSES, *PER_LAYER, "layers_significant_fraction")}
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
        out["layers_significant_fraction"][c] = float(np.mean(np.nan_to_num(qc, nan=1.0) <= ALPHA))
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
    for key in (*LOSSES, "layers_significant_fraction"):
        mean[key] = {c: float(stack(key, c).mean()) for c in labels}
        spread[key] = {c: float(sd(stack(key, c))) for c in labels}
    for key in PER_LAYER:
        agg = (lambda a: a.max(0)) if key == "visual_drift_p" else (lambda a: a.mean(0))
        mean[key] = {c: [float(v) for v in agg(stack(key, c))] for c in labels}
        spread[key] = {c: [float(v) for v in sd(stack(key, c))] for c in labels}
    return mean, spread


def write_summary(out: Path, summary: dict) -> tuple[Path, Path]:
    """``summary.json`` and a readable ``summary.md`` (mean ± standard deviation over seeds)."""
    js = out / "summary.json"
    js.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    lines = [
        "# driftlens demo: the model organism",
        "",
        f"Seeds {summary['seeds']}; every figure is the mean ± standard deviation over seeds. Training this "
        "small model is chaotic: figures differ between seeds, CPUs and thread counts; the per-seed values are "
        "in summary.json (`per_seed`). Chance accuracy of the grounding questions: "
        f"{summary['chance_accuracy']:.3f}.",
        "",
    ]
    for title, part in (("Korean adaptation", summary), ("English control (same steps, lr, mix)",
                                                         summary["control"])):
        lines += [f"## {title}: outcomes", "", *outcome_table(part), ""]
    for title, part in (("Korean adaptation", summary), ("English control (same steps, lr, mix)",
                                                         summary["control"])):
        lines += [f"## {title}: visual drift", "",
                  "| checkpoint | EN grounding | KO grounding | KO LM loss (held-out) | visual MMD^2 by layer (hidden) "
                  "| layers significant |", "|---|---|---|---|---|---|"]
        sp = part["spread"]
        for c in part["checkpoints"]:
            acc, asd = part["grounding_accuracy"][c], sp["grounding_accuracy"][c]
            eff = ", ".join(f"{m:.3f}±{s:.3f}" for m, s in zip(part["visual_drift_effect"][c],
                                                              sp["visual_drift_effect"][c]))
            lines.append(f"| {c} | {acc['en']:.3f}±{asd['en']:.3f} | {acc['ko']:.3f}±{asd['ko']:.3f} | "
                         f"{part['ko_lm_loss'][c]:.2f}±{sp['ko_lm_loss'][c]:.2f} | {eff} | "
                         f"{part['layers_significant_fraction'][c]:.2f} |")
        lines.append("")
    lines += ["Outcomes: accuracy on the 216 questions per language (likelihood ranking; seen / held-out scenes "
              "apart), grounding gain = accuracy with the true image minus with a mismatched image, LM losses in "
              "nats per token on held-out scenes' captions and on Korean sentence forms never trained on "
              "(definitions in summary.json).", "",
              "Visual MMD^2: the paired cluster MMD^2 between the base's and the checkpoint's visual-token hidden "
              "states (72 scenes, clusters resampled); significant: cluster sign-flip p-value adjusted over the "
              f"report (Benjamini-Hochberg) <= {ALPHA}.", ""]
    if "files" in summary:
        lines += ["## Files", ""] + [f"- {k}: `{v}`" for k, v in summary["files"].items()]
    md = out / "summary.md"
    md.write_text("\n".join(lines) + "\n", encoding="utf-8")
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
    import xarray as xr

    from driftlens import organism
    from driftlens.organism.example import keep_as_example, measure_seed, world_probes
    from driftlens.probes import ProbeSet

    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    trajs = organism.build_seeds(seeds, force=force, progress=progress, cache=cache)
    seconds = {"organism": round(time.perf_counter() - t0, 1), "capture_and_drift": 0.0}
    probes = ProbeSet.load(world_probes(out / "probes" / "organism-world", trajs[0].recipe.image_size))
    ko_labels, en_labels = list(trajs[0].checkpoints), list(trajs[0].control)
    per_seed = {"ko": {}, "en": {}}
    reports = []
    for traj in trajs:
        tick = time.perf_counter()
        report = measure_seed(traj, probes, out / f"seed-{traj.seed}", device=device, progress=progress)
        keep_as_example(traj, out / f"seed-{traj.seed}", cache)
        seconds["capture_and_drift"] += time.perf_counter() - tick
        ev = organism.evaluate(traj, progress=progress)
        per_seed["ko"][traj.seed] = seed_values(report, ev, ko_labels)
        per_seed["en"][traj.seed] = seed_values(report, ev, en_labels)
        reports.append(report)
    chance = organism.chance_accuracy()
    mean_ko, spread_ko = combine(per_seed["ko"], ko_labels)
    mean_en, spread_en = combine(per_seed["en"], en_labels)
    tick = time.perf_counter()
    stacked = xr.concat(reports, "seed")
    mean_report = stacked.mean("seed", keep_attrs=True)
    for v in ("mmd_p", "mmd_q"):          # significant in the mean report = significant in every seed
        mean_report[v] = stacked[v].max("seed")
    for v in mean_report.data_vars:
        mean_report[v].attrs = dict(reports[0][v].attrs)
    mean_report.attrs["seeds"] = [t.seed for t in trajs]
    files = _figures(out, mean_report, per_seed, mean_ko, mean_en, ko_labels, en_labels, chance)
    files.update(_ranks(mean_report, out, budget, ko_labels[-1]))
    files["reports"] = ", ".join(str(out / f"seed-{t.seed}" / "drift.nc") for t in trajs)
    seconds["figures_and_ranks"] = time.perf_counter() - tick
    seconds = {k: round(v, 1) for k, v in seconds.items()}
    seconds["total"] = round(time.perf_counter() - t0, 1)
    summary = {
        "checkpoints": ko_labels,
        "seeds": [t.seed for t in trajs],
        "chance_accuracy": float(chance),
        **mean_ko,
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


def _figures(out: Path, report, per_seed, mean_ko, mean_en, ko_labels, en_labels, chance) -> dict:
    from driftlens import plot

    figs = out / "figures"
    files = {}
    ax = plot.drift_heatmap(report, "mmd")
    ax.set_title(f"MMD$^2$ vs base (hidden, visual), mean of {len(per_seed['ko'])} seeds\n"
                 f"* significant in every seed (Benjamini-Hochberg q $\\leq$ {ALPHA:g})", fontsize=9)
    files["drift_heatmap"] = str(plot.save(ax, figs / "drift_heatmap.png"))
    files["drift_ko_vs_control"] = str(plot.save(plot.seeds_by_layer(
        {"Korean " + ko_labels[-1]: _per_layer(per_seed["ko"], ko_labels[-1]),
         "English control " + en_labels[-1]: _per_layer(per_seed["en"], en_labels[-1])},
        ylabel="visual MMD$^2$ vs base, hidden (dimensionless)",
        title="visual drift by layer: Korean adaptation vs English control"), figs / "drift_ko_vs_control.png"))
    files["modality_gap"] = str(plot.save(plot.modality_gap_by_layer(report), figs / "modality_gap.png"))
    files["mir"] = str(plot.save(plot.mir_by_layer(report), figs / "mir_by_layer.png"))
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


def _ranks(report, out: Path, budget: int | None, checkpoint: str) -> dict:
    """Rank schedule from the mean visual drift of the last Korean checkpoint."""
    from driftlens import plot
    from driftlens.ranks import allocate_ranks

    n_layers = int(report.sizes["layer"])
    budget = budget or 8 * n_layers * 4
    sched = allocate_ranks(report, budget=budget, signal="mmd", rule="proportional", min_rank=2, max_rank=64,
                           checkpoint=checkpoint)
    path = out / "ranks.json"
    sched.save(path)
    return {"ranks": str(path),
            "ranks_plot": str(plot.save(plot.rank_schedule(sched, report), out / "figures" / "ranks.png"))}
