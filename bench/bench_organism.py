"""Organism build time (all seeds) and the demo's wall time on this machine (run by hand).

    .venv/bin/python bench/bench_organism.py                 # fresh build of seeds 0,1,2 (temp cache), then the demo
    .venv/bin/python bench/bench_organism.py --build-only    # the organism only
    .venv/bin/python bench/bench_organism.py --jobs 1        # seeds one after another, all threads each

Prints the wall time of building every seed (no cache), each seed's evaluation (mean over
seeds is what the demo reports), and the wall time of ``driftlens demo`` with the organism cached.
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
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--jobs", type=int, default=None, help="build processes (default: one per seed)")
    ap.add_argument("--cache", default=None, help="build into (and keep) this cache instead of a temporary one")
    args = ap.parse_args()
    from driftlens import organism
    from driftlens.organism.demo import run_demo

    tmp = Path(args.cache) if args.cache else Path(tempfile.mkdtemp())
    from driftlens.cli import parse_seeds

    seeds = parse_seeds(args.seeds)
    load0 = os.getloadavg()
    t = time.perf_counter()
    trajs = organism.build_seeds(seeds, cache=tmp, progress=False, jobs=args.jobs)
    build = time.perf_counter() - t
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; load average "
          f"before {load0[0]:.1f}, after {os.getloadavg()[0]:.1f} (1 min; above the cores: contended)")
    print(f"organism build, seeds {seeds}, jobs {args.jobs or len(seeds)}: {build:.1f} s wall")
    for traj in trajs:
        ev = organism.evaluate(traj, progress=False)
        info = json.loads((traj.root / "trajectory.json").read_text())
        print(f"seed {traj.seed}: {info['build_seconds']} s ({info['torch_threads']} threads), base kept at step "
              f"{info['base_steps_kept']} (validation {info['base_validation_accuracy']:.3f})")
        print(f"  training renders skipped (reserved images): {info['training_renders_skipped']}")
        for label in traj.all_checkpoints:
            r = ev["image_reliance"][label]
            print(f"  {label:>6}: EN {r['en']['accuracy_seen']:.3f} / {r['en']['accuracy_heldout']:.3f} "
                  f"KO {r['ko']['accuracy_seen']:.3f} / {r['ko']['accuracy_heldout']:.3f} (seen / held-out)  "
                  f"gain EN {r['en']['gain']:.3f} KO {r['ko']['gain']:.3f}  LM EN {ev['en_lm_loss'][label]:.3f} "
                  f"KO {ev['ko_lm_loss'][label]:.3f} new forms {ev['ko_lm_loss_new_forms'][label]:.3f}")
    if not args.build_only:
        t = time.perf_counter()
        run_demo(out=tmp / "demo", cache=tmp, progress=False, seeds=seeds)
        print(f"demo with the organism cached: {time.perf_counter() - t:.1f} s")
    if not args.cache:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
