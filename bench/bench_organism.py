"""Organism build time and the demo's wall time on this machine (run by hand).

    .venv/bin/python bench/bench_organism.py                # fresh build into a temp folder, then the demo twice
    .venv/bin/python bench/bench_organism.py --build-only   # the organism only

Prints the build time of the default recipe (no cache), its evaluation, and the wall time of
``driftlens demo`` with the organism cached (the second run reuses the capture store's folder
afresh, so it measures capture + drift + figures, not a cache of them).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build-only", action="store_true", help="time the organism build only, not the demo")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    os.environ["DRIFTLENS_CACHE"] = str(tmp / "cache")
    from driftlens import organism
    from driftlens.demo import run_demo

    t = time.perf_counter()
    traj = organism.build(progress=False)
    build = time.perf_counter() - t
    ev = organism.evaluate(traj, progress=False)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")
    info = json.loads((traj.root / "trajectory.json").read_text())
    print(f"organism build (recipe {traj.recipe.key()}): {build:.1f} s "
          f"(base kept at step {info.get('base_steps_kept')}, validation accuracy "
          f"{info.get('base_validation_accuracy', float('nan')):.3f})")
    print(f"chance accuracy {ev['chance_accuracy']:.3f}")
    for label in traj.checkpoints:
        acc = ev["grounding_accuracy"][label]
        print(f"  {label:>6}: EN {acc['en']:.3f} KO {acc['ko']:.3f} KO LM loss {ev['ko_lm_loss'][label]:.3f}")
    for run in () if args.build_only else (1, 2):
        out = tmp / f"demo{run}"
        t = time.perf_counter()
        run_demo(out=out, progress=False)
        print(f"demo with cached organism, run {run}: {time.perf_counter() - t:.1f} s")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
