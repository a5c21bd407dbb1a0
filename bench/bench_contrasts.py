"""The cost of contrasts: a report with the trajectory contrasts against the same report without (CPU, by hand).

    .venv/bin/python bench/bench_contrasts.py STORE [--repeats 3]

STORE is an activation store with two trajectories, e.g. ``driftlens-demo/seed-0/activations.zarr``
written by ``driftlens demo`` (``ko-1 .. ko-5`` and the English control ``en-1 .. en-5``). Both reports
use the demo's metrics and settings (MMD, paired shift, gap, MIR; 1000 sign flips and draws, 200 MIR
draws), alternating runs in one process so that both see the same machine state; the contrast report
adds ``ko-k - en-k`` for every step (five contrasts of every metric). Prints a markdown row for
bench/RESULTS.md; the issue's budget is at most 1.2x.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import torch

    from driftlens.compare import trajectory_pairs
    from driftlens.drift import drift
    from driftlens.store import open_store

    ds = open_store(args.store).load()
    pairs = trajectory_pairs(ds.checkpoint.values, "ko-", "en-")
    kw = dict(reference="base", metrics=("mmd", "paired_shift", "gap", "mir"), sites=("hidden",), mir_bootstrap=200,
              progress=False)
    times = {"without": [], "with": []}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        drift(ds, **kw)                                                  # warm-up (imports, caches)
        for _ in range(args.repeats):
            for name, extra in (("without", {}), ("with", {"contrasts": pairs})):
                t = time.perf_counter()
                drift(ds, **kw, **extra)
                times[name].append(time.perf_counter() - t)
    best = {k: min(v) for k, v in times.items()}
    print(f"\nStore: {args.store} ({ds.sizes['checkpoint']} checkpoints x {ds.sizes['layer']} layers, "
          f"{ds.sizes['token']} tokens; torch threads {torch.get_num_threads()}; {len(pairs)} contrasts)\n")
    print(f"| report | seconds (best of {args.repeats}) | ratio |")
    print("|---|---|---|")
    print(f"| demo metrics, no contrasts | {best['without']:.2f} | 1.00 |")
    print(f"| demo metrics + ko-k - en-k contrasts | {best['with']:.2f} | {best['with'] / best['without']:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
