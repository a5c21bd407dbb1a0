"""Calibration of the across-run and within-run contrast inference by simulation (CPU, by hand).

    .venv/bin/python bench/bench_calibration_runs.py [--replicates 400]

The same simulation as ``tests/unit/test_calibration_runs.py`` (``driftlens.testing.RunsSpec``: one
probe set per replicate, training runs with a random run effect, two checkpoints drifting from a shared
reference), with more replicates, printed as markdown tables for bench/RESULTS.md: rejection rates of a
true null (no difference between the checkpoints in expectation over runs) for the across-run t-test,
a single run's within-run test, and broken variants; coverage of a planted difference.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
from scipy import stats


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicates", type=int, default=400)
    args = ap.parse_args()
    from driftlens.compare import bootstrap_pvalue, run_stats
    from driftlens.testing import RunsSpec, simulate_contrasts

    n = args.replicates
    runs = (3, 5, 8)
    print(f"\nNo true difference ({n} replicates of 8 runs; the first 3 / 5 / 8 runs of each):\n")
    print("| run effect | runs | spread / half-width (median) | across-run t-test | z instead of t | "
          "probe-sampling se only | a single run's within-run test |")
    print("|---|---|---|---|---|---|---|")
    for label, spec in (("normal", RunsSpec()), ("Student t, 3 df", RunsSpec(run_df=3.0))):
        d, db = simulate_contrasts(spec, n, max(runs), seed0=0 if spec.run_df is None else 10_000)
        lo, hi = np.quantile(db, [0.025, 0.975], axis=-1)
        ratio = np.median(d.std(axis=1, ddof=1) / np.median((hi - lo) / 2, axis=1))
        for r in runs:
            sts = [run_stats(d[i, :r], db[i, :r], needed=False) for i in range(n)]
            p = np.array([float(s["p"]) for s in sts])
            z = np.array([2 * stats.norm.sf(abs(float(s["mean"])) / float(s["se"])) for s in sts])
            probe = np.array([2 * stats.norm.sf(abs(d[i, :r].mean()) / np.sqrt(np.var(db[i, :r].mean(0), ddof=1)))
                              for i in range(n)])
            within = np.mean(bootstrap_pvalue(db[:, :r]) <= 0.05)
            print(f"| {label} | {r} | {ratio:.1f}x | {np.mean(p <= 0.05):.3f} | {np.mean(z <= 0.05):.3f} | "
                  f"{np.mean(probe <= 0.05):.3f} | {within:.3f} |")
    spec = RunsSpec(run_sd=0.0, tokens_per_cluster=4, checkpoint_cluster_sd=0.3)
    _, db = simulate_contrasts(spec, n, 1, seed0=20_000)
    _, db_tok = simulate_contrasts(spec, n, 1, seed0=20_000, token_units=True)
    print(f"\nWithin one run, no run effect ({n} replicates): rejection rate of the within-run contrast test "
          f"{np.mean(bootstrap_pvalue(db[:, 0]) <= 0.05):.3f} (clusters resampled), "
          f"{np.mean(bootstrap_pvalue(db_tok[:, 0]) <= 0.05):.3f} (tokens resampled: broken)")
    spec = RunsSpec(drift_a=1.3, drift_b=1.0)
    truth_d, _ = simulate_contrasts(spec, 1500, 1, seed0=30_000)
    truth = truth_d.mean()
    d, db = simulate_contrasts(spec, 2 * n, max(runs), seed0=40_000)
    print(f"\nPlanted difference (true mean contrast {truth:.4f}, from 1500 independent runs; {2 * n} replicates):\n")
    print("| runs | across-run interval coverage | probe-sampling interval coverage |")
    print("|---|---|---|")
    for r in runs:
        cover = np.mean([(lambda s: s["lo"] <= truth <= s["hi"])(run_stats(d[i, :r], db[i, :r], needed=False))
                         for i in range(len(d))])
        probe = np.mean([abs(d[i, :r].mean() - truth) <= 1.96 * np.sqrt(np.var(db[i, :r].mean(0), ddof=1))
                         for i in range(len(d))])
        print(f"| {r} | {cover:.3f} | {probe:.3f} |")


if __name__ == "__main__":
    sys.exit(main())
