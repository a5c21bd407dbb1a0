"""Seeds as runs on the organism: the Korean-minus-control contrast across 3 and 8 seeds (CPU, by hand).

    .venv/bin/python bench/bench_runs.py [--seeds 0-7] [--out bench/results/runs] [--cache DIR]

Builds (or finds) the organism's seeds, measures each like the demo (capture of the world probe set,
drift report against ``base``; cached as the seed's example), combines the seeds as training runs
(``driftlens.compare``) with the contrasts ``ko-k - en-k`` at every step, and prints markdown tables for
bench/RESULTS.md: per layer and step, the mean contrast over seeds with its across-seed interval, the
t-test over seeds and the seeds needed for 80% power -- for the first three seeds (the demo's) and for
all of them -- and how the spread between seeds compares with one seed's interval. Writes the
combined report to ``OUT/runs.nc``.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np


def table(runs, title: str) -> list[str]:
    vis = dict(site="hidden", modality="visual")
    n = runs.sizes["run"]
    lines = [f"\n{title} ({n} seeds: {', '.join(map(str, runs.run.values))})\n",
             "| contrast | layer | mean over seeds [95% across-seed interval] | p over seeds | seeds for 80% power | "
             "seeds with a positive contrast |", "|---|---|---|---|---|---|"]
    for con in runs.contrast.values:
        cell = runs.sel(contrast=con, **vis)
        for layer in runs.layer.values:
            c = cell.sel(layer=layer)
            need = float(c["mmd_contrast_runs_needed"])
            mean, lo, hi = (float(c[f"mmd_contrast_runs{k}"]) for k in ("", "_lo", "_hi"))
            lines.append(f"| {con} | {layer} | {mean:+.3f} [{lo:+.3f}, {hi:+.3f}] | "
                         f"{float(c['mmd_contrast_runs_p']):.3f} | "
                         f"{'inf' if not np.isfinite(need) else int(need)} | "
                         f"{int((c['mmd_contrast'] > 0).sum())} / {n} |")
    return lines


def spread(runs) -> str:
    vis = dict(site="hidden", modality="visual")
    per = runs["mmd"].sel(**vis).drop_sel(checkpoint=runs.attrs["reference"])
    half = ((runs["mmd_hi"] - runs["mmd_lo"]) / 2).sel(**vis).drop_sel(checkpoint=runs.attrs["reference"])
    ratio = (per.std("run", ddof=1) / half.mean("run")).values.ravel()
    within = (runs["mmd_contrast_lo"] > 0) | (runs["mmd_contrast_hi"] < 0)
    n_within = int(within.sel(**vis).sum())
    return (f"spread of a cell between seeds / one seed's 95% half-width: median {np.median(ratio):.1f}x "
            f"(range {ratio.min():.1f}-{ratio.max():.1f}x); within-seed contrasts whose interval excludes 0: "
            f"{n_within} of {int(within.sel(**vis).size)}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0-7")
    ap.add_argument("--out", default="bench/results/runs")
    ap.add_argument("--cache", default=None)
    args = ap.parse_args()
    from driftlens import organism
    from driftlens.cli import parse_seeds
    from driftlens.compare import combine_runs, trajectory_pairs
    from driftlens.drift import compare_report
    from driftlens.report import save_report

    seeds = parse_seeds(args.seeds)
    t0 = time.perf_counter()
    organism.build_seeds(seeds, cache=args.cache, progress=False)
    t_build = time.perf_counter() - t0
    reports = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for s in seeds:
            reports[f"seed-{s}"] = organism.example(s, cache=args.cache, progress=False).load_report()
    t_measure = time.perf_counter() - t0 - t_build
    pairs = trajectory_pairs(reports[f"seed-{seeds[0]}"].checkpoint.values, "ko-", "en-")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"organism build {t_build:.0f} s, capture + drift {t_measure:.0f} s for {len(seeds)} seeds"]
    for subset in ([f"seed-{s}" for s in seeds[:3]], list(reports)):
        runs = compare_report(combine_runs({k: reports[k] for k in subset}), contrasts=pairs)
        lines += table(runs, "Korean minus English control, visual MMD^2 (hidden)")
        lines.append("\n" + spread(runs))
    save_report(runs, out / "runs.nc")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
