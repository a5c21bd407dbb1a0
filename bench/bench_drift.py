"""The drift report's cost: today's calibrated report beside the former 20-split report (CPU, by hand).

    .venv/bin/python bench/bench_drift.py STORE [--legacy-commit 57d75ec]

STORE is an activation store, e.g. ``driftlens-demo/seed-0/activations.zarr`` written by
``driftlens demo``. The former report (group-split null, z-scores, a 200-permutation token test
on the first split) is read from git history (``git show COMMIT:driftlens/drift.py``) and run on
the same store with the same metrics it had in the demo; the current report runs with 1000 sign
flips and 1000 bootstrap draws per cell. Prints a markdown table for bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def legacy_drift(commit: str):
    src = subprocess.run(["git", "show", f"{commit}:driftlens/drift.py"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "legacy_drift.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("legacy_drift", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.drift


def timed(fn, repeats=2):
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store")
    ap.add_argument("--legacy-commit", default="57d75ec")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    import torch

    from driftlens.drift import drift
    from driftlens.store import open_store

    ds = open_store(args.store).load()
    legacy = legacy_drift(args.legacy_commit)
    layered = [s for s in ("hidden", "key") if s in ds.data_vars]
    shape = (f"{ds.sizes['checkpoint']} checkpoints x {ds.sizes['layer']} layers x sites {layered} x 2 modalities, "
             f"{ds.sizes['token']} tokens, torch threads {torch.get_num_threads()}")
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t, _ = timed(lambda: legacy(ds.drop_vars([c for c in ("cluster",) if c in ds.coords]), reference="base",
                                    metrics=("mmd", "sliced_w", "gauss_w2", "shift", "gap", "mir"), sites=layered,
                                    progress=False), args.repeats)
        rows.append(("former: 20 group splits (MMD, sliced W, Gaussian W2, shift), 200-permutation token test, "
                     "gap, MIR (no intervals)", t))
        t, _ = timed(lambda: drift(ds, reference="base", metrics=("mmd", "paired_shift", "gap", "mir"), sites=layered,
                                   progress=False), args.repeats)
        rows.append(("current: MMD + paired shift + gap + MIR, 1000 sign flips and 1000 bootstrap draws per cell",
                     t))
        t, _ = timed(lambda: drift(ds, reference="base", metrics=("mmd",), sites=layered, progress=False),
                     args.repeats)
        rows.append(("current, MMD only (1000 + 1000)", t))
    print(f"\nStore: {args.store} ({shape})\n")
    print(f"| report | seconds (best of {args.repeats}) |")
    print("|---|---|")
    for name, t in rows:
        print(f"| {name} | {t:.1f} |")


if __name__ == "__main__":
    sys.exit(main())
