"""Calibration of drift inference by simulation, old statistics beside the new (CPU, by hand).

    .venv/bin/python bench/bench_calibration.py [--replicates 400]

Hierarchical synthetic tokens (driftlens.testing: a cluster effect shared by the tokens of one
scene, fresh cluster- and token-level noise per checkpoint, a planted mean shift with a known
population MMD^2). Prints markdown tables for bench/RESULTS.md:

1. p-values under no change: the cluster sign-flip test (the report's ``mmd_p``), the report's
   former token-permutation p on disjoint halves of the images, the former split-half z-score
   read as a one-sided test, and a broken variant of the new test (sign flips per token);
2. the effect and its interval against the true MMD^2 at 16, 48 and 144 clusters, beside the
   former split value and z;
3. power of the cluster test over planted shifts at the demo's 72 clusters.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from scipy import stats

from driftlens import inference as I
from driftlens import metrics as M
from driftlens.testing import ClusteredSpec, clustered_pair, pvalue_calibration, true_mmd2

SIGMA = 2.0


def _t(a):
    return torch.as_tensor(a)


def old_split(r, c, cl, k, seed, n_splits=20):
    """The former report's value, null and z: MMD^2 between disjoint halves of the clusters."""
    rt, ct = _t(r), _t(c)
    sigma = M.median_sigma(rt, pairs="reference")
    rng = np.random.default_rng(seed)
    nulls, values = [], []
    for _ in range(n_splits):
        a = np.isin(cl, rng.permutation(np.unique(cl))[:k // 2])
        nulls.append(M.mmd2(rt[a], rt[~a], sigma=sigma))
        values.append(M.mmd2(rt[a], ct[~a], sigma=sigma))
    return float(np.mean(values)), (np.mean(values) - np.mean(nulls)) / np.std(nulls, ddof=1)


def null_table(n):
    spec = ClusteredSpec(n_clusters=24, tokens_per_cluster=8, dim=6)
    ps = {"cluster sign flips (report `mmd_p`)": [], "former token permutation, disjoint image halves": [],
          "former split z (20 splits) as a one-sided test": [], "broken: sign flips per token": []}
    zs = []
    for s in range(n):
        r, c, cl = clustered_pair(spec, 0.0, seed=s)
        ps["cluster sign flips (report `mmd_p`)"].append(I.paired_mmd(_t(r), _t(c), cl, n_bootstrap=10, seed=s).p)
        half = np.isin(cl, np.random.default_rng(s).permutation(np.unique(cl))[:12])
        ps["former token permutation, disjoint image halves"].append(
            M.mmd_test(_t(r[half]), _t(c[~half]), n_permutations=200, seed=s).p_value)
        _, z = old_split(r, c, cl, 24, s)
        zs.append(z)
        ps["former split z (20 splits) as a one-sided test"].append(stats.norm.sf(z))
        ps["broken: sign flips per token"].append(
            I.paired_mmd(_t(r), _t(c), np.arange(len(cl)), n_bootstrap=10, seed=s).p)
    print(f"\n### No change ({n} replicates, 24 clusters x 8 tokens, d=6, ICC {spec.icc:.2f})\n")
    print("| statistic | KS p (uniform) | rejection rate at 0.05 | passes |")
    print("|---|---|---|---|")
    for name, p in ps.items():
        chk = pvalue_calibration(p)
        ok = chk["ks_p"] > 0.01 and 0.02 <= chk["rejection_rate"] <= 0.08
        print(f"| {name} | {chk['ks_p']:.2g} | {chk['rejection_rate']:.3f} | {'yes' if ok else 'no'} |")
    print(f"\nFormer z under no change: mean {np.mean(zs):.2f}, standard deviation {np.std(zs, ddof=1):.2f} "
          f"(a calibrated z has 0 and 1).")


def effect_table(n, shift=0.8):
    print(f"\n### Planted shift {shift} ({n} replicates per row, sigma fixed at {SIGMA}; 8 tokens per cluster, d=6)\n")
    print("| clusters | true MMD^2 | mean effect (se) | 95% interval coverage | mean interval width "
          "| former split value | former z |")
    print("|---|---|---|---|---|---|---|")
    for k in (16, 48, 144):
        spec = ClusteredSpec(n_clusters=k, tokens_per_cluster=8, dim=6)
        truth = true_mmd2(spec, shift, SIGMA)
        eff, cov, width, old_v, old_z = [], [], [], [], []
        for s in range(n):
            r, c, cl = clustered_pair(spec, shift, seed=50_000 + s)
            res = I.paired_mmd(_t(r), _t(c), cl, sigma=SIGMA, n_permutations=10, seed=s)
            eff.append(res.effect)
            cov.append(res.lo <= truth <= res.hi)
            width.append(res.hi - res.lo)
            if s < 60:
                v, z = old_split(r, c, cl, k, s)
                old_v.append(v)
                old_z.append(z)
        print(f"| {k} | {truth:.5f} | {np.mean(eff):.5f} ({np.std(eff, ddof=1) / np.sqrt(n):.5f}) | "
              f"{np.mean(cov):.3f} | {np.mean(width):.5f} | {np.mean(old_v):.5f} | {np.mean(old_z):.2f} |")


def power_table(n):
    spec = ClusteredSpec(n_clusters=72, tokens_per_cluster=8, dim=6)
    print(f"\n### Power at alpha 0.05, 72 clusters ({n} replicates per shift, 1000 sign flips)\n")
    print("| shift | true MMD^2 (sigma 2) | rejection rate |")
    print("|---|---|---|")
    for shift in (0.0, 0.1, 0.2, 0.3, 0.4, 0.6):
        ps = [I.paired_mmd(_t(r), _t(c), cl, n_bootstrap=10, seed=s).p
              for s, (r, c, cl) in ((s, clustered_pair(spec, shift, seed=70_000 + s)) for s in range(n))]
        print(f"| {shift} | {true_mmd2(spec, shift, SIGMA):.5f} | {np.mean(np.array(ps) <= 0.05):.3f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicates", type=int, default=400)
    args = ap.parse_args()
    null_table(args.replicates)
    effect_table(args.replicates)
    power_table(max(100, args.replicates // 2))


if __name__ == "__main__":
    main()
