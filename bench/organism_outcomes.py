"""The organism's outcomes over seeds, and drift against outcomes scene by scene (run by hand).

    .venv/bin/python bench/organism_outcomes.py --demo DEMO_DIR [--cache CACHE] [--out outcomes.json]

``DEMO_DIR`` is a ``driftlens demo --seeds ...`` output folder (its ``summary.json`` names the seeds and
their organism builds; ``seed-<s>/activations.zarr`` is each seed's store). Prints, and writes as JSON:

1. per checkpoint, mean ± standard deviation over seeds of every outcome (EN/KO accuracy on seen and
   held-out scenes, grounding gain, LM losses), Korean trajectory and English control;
2. does the Korean adaptation reduce the grounding gain more than the control? Per seed the paired
   difference ``gain(ko-k) - gain(en-k)`` (both from the same base), per language; across seeds (the
   training run is the unit) the mean, a t interval and an exact sign-flip p-value over seeds;
3. does a scene's visual-token displacement predict the change in its grounding gain? Per seed, the
   Spearman association across the 72 scenes between the displacement (``outcomes.cluster_displacement``,
   base -> checkpoint, last layer) and the change of the scene's grounding gain (log-likelihood, base ->
   checkpoint), with its cluster-bootstrap interval and permutation p (probe sampling within a run);
   across seeds the mean correlation with a t interval and a sign-flip p.
"""
from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
from scipy import stats


def across_seeds(values) -> dict:
    """Mean, standard deviation, 95% t interval and exact two-sided sign-flip p over per-seed values."""
    v = np.asarray(values, dtype=np.float64)
    n = v.size
    mean, sd = float(v.mean()), float(v.std(ddof=1)) if n > 1 else 0.0
    half = float(stats.t.ppf(0.975, n - 1) * sd / np.sqrt(n)) if n > 1 else float("nan")
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))             # [2^n, n]
    null = np.abs((signs * v).mean(1))
    p = float(np.mean(null >= abs(mean) - 1e-12))
    return {"mean": mean, "sd": sd, "lo": mean - half, "hi": mean + half, "p_signflip": p, "n_seeds": n,
            "per_seed": [float(x) for x in v]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", required=True, help="a driftlens demo output folder")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    ap.add_argument("--layer", type=int, default=None, help="displacement layer (default: the last)")
    ap.add_argument("--cache", default=None, help="where the builds are now (default: the paths in summary.json)")
    args = ap.parse_args()

    from driftlens import organism
    from driftlens.organism.train import Recipe, _complete
    from driftlens.outcomes import association, cluster_displacement
    from driftlens.store import open_store

    demo = Path(args.demo)
    summary = json.loads((demo / "summary.json").read_text(encoding="utf-8"))
    seeds, roots = summary["seeds"], summary["organism"]
    evs = {}
    for s, root in zip(seeds, roots):
        root = Path(args.cache) / "organism" / Path(root).name if args.cache else Path(root)
        info = json.loads((root / "trajectory.json").read_text())
        traj = _complete(root, Recipe(**info["recipe"]))
        evs[s] = organism.evaluate(traj, progress=False)
    ko, en = summary["checkpoints"], summary["control"]["checkpoints"]
    result: dict = {"seeds": seeds, "gain_contrast": {}, "association": {}}

    # 2. Korean minus control, step by step, per language (accuracy gain and log-likelihood gain)
    for measure in ("gain", "gain_logprob", "gain_heldout", "accuracy", "logprob"):
        for lang in ("en", "ko"):
            rows = {}
            for a, b in zip(ko[1:], en[1:]):
                d = [evs[s]["image_reliance"][a][lang][measure] - evs[s]["image_reliance"][b][lang][measure]
                     for s in seeds]
                rows[f"{a} - {b}"] = across_seeds(d)
            result["gain_contrast"][f"{measure}/{lang}"] = rows
    for key in ("en_lm_loss", "ko_lm_loss", "ko_lm_loss_new_forms"):
        result["gain_contrast"][key] = {f"{a} - {b}": across_seeds([evs[s][key][a] - evs[s][key][b] for s in seeds])
                                        for a, b in zip(ko[1:], en[1:])}

    # 3. per scene: displacement vs change in grounding gain
    scenes = evs[seeds[0]]["scenes"]
    for s in seeds:
        ds = open_store(demo / f"seed-{s}" / "activations.zarr")
        layer = int(ds.layer.max()) if args.layer is None else args.layer
        for label in (ko[-1], en[-1], ko[1], en[1]):
            disp = cluster_displacement(ds, "base", label, layers=[layer]).sel(layer=layer)
            x = {c: float(v) for c, v in zip(disp.cluster.values, disp.values)}
            for lang in ("en", "ko"):
                per = evs[s]["per_scene"]
                dy = {k: per[label][lang]["gain_logprob"][i] - per["base"][lang]["gain_logprob"][i]
                      for i, k in enumerate(scenes)}
                res = association(x, dy, n_bootstrap=1000, n_permutations=1000, seed=s)
                result["association"].setdefault(f"{label}/{lang}", {})[str(s)] = res._asdict()
    for per_seed in result["association"].values():
        per_seed["across_seeds"] = across_seeds([v["effect"] for v in per_seed.values()])

    def fmt(d):
        return f"{d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}] p={d['p_signflip']:.3f}"

    print(f"seeds {seeds}")
    print("Korean minus control (per seed paired, across seeds: mean [95% t interval] sign-flip p):")
    for key, rows in result["gain_contrast"].items():
        print(f"  {key:>22}: " + "; ".join(f"{k} {fmt(v)}" for k, v in rows.items() if k.startswith(ko[-1])
                                            or k.startswith(ko[1])))
    print(f"scene displacement (layer {layer}) vs change in grounding gain (log-likelihood), Spearman:")
    for key, per_seed in result["association"].items():
        seeds_part = ", ".join(f"{v['effect']:+.2f} [{v['lo']:+.2f}, {v['hi']:+.2f}]"
                               for k, v in per_seed.items() if k != "across_seeds")
        print(f"  {key:>8}: across seeds {fmt(per_seed['across_seeds'])}; per seed {seeds_part}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
