"""Contention: a drift report and the cached demo, idle and beside one competing torch job.

Run by hand (one command; prints a table)::

    .venv/bin/python bench/bench_contention.py [--store PATH] [--demo-cache DIR] [--repeats 3]
                                               [--variant NAME:VAR=VALUE,...] [--jobs drift,inproc,demo]

Jobs (each a fresh interpreter, as a user runs them):

- ``drift``: ``driftlens drift STORE`` (``--store``; default: a synthetic store built once with
  :func:`driftlens.testing.make_store`, 48 clusters, hidden size 256);
- ``inproc``: ``dl.drift`` on the same store in a Python process that imported torch first (a
  notebook: the OpenMP runtime is already loaded when driftlens is imported);
- ``demo``: ``driftlens demo --seeds 0,1,2 --cache DIR`` (only with ``--demo-cache``, a cache that
  already holds the organisms of seeds 0-2; the demo only reads it).

``--baseline REV`` adds the package as of a git revision (``git archive`` into the work folder, put
first on PYTHONPATH) as one more variant, e.g. ``--baseline 4384f31`` (before the fix of issue 28).
The lead's command on a quiet machine::

    .venv/bin/python bench/bench_contention.py --store /tmp/golden/demo/seed-0/activations.zarr \
        --demo-cache COPY_OF_AN_ORGANISM_CACHE --baseline 4384f31 --repeats 3

Each job runs idle and beside one competitor: a second Python process doing 1024 x 1024 float32
matmuls in a loop with torch's default threads and OpenMP's default wait policy (what a training
job beside the report does). Runs are interleaved (for each repeat: every variant idle, then
contended) and each cell is the median over repeats; the 1-minute load average is read from
/proc/loadavg before every run. ``--variant`` adds environment settings to compare against the
plain environment (e.g. ``--variant passive:OMP_WAIT_POLICY=PASSIVE``); the environment of this
script's own OMP_* / MKL_* variables is removed for the jobs, never for the competitor's defaults.

Every drift job's report is compared with the first variant's (``xarray.testing.assert_identical``):
a fix may change the time, never a number. Target (issue 28): contended / idle <= 2.5.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
COMPETITOR = ("import torch\n"
              "a = torch.randn(1024, 1024); b = torch.randn(1024, 1024)\n"
              "while True:\n    a @ b\n")
DEMO_SEEDS = "0,1,2"     # the default; with one seed the demo exits 2 at 4384f31 (plot: a run dim, no across-run stats)
STRIP = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
INPROC = ("import sys, torch\n"                 # torch first: the OpenMP runtime is loaded before driftlens
          "torch.ones(4096).sum()\n"
          "import driftlens as dl\n"
          "from driftlens import open_store, save_report\n"
          "n = int(sys.argv[3])\n"
          "rep = dl.drift(open_store(sys.argv[1]), n_permutations=n, n_bootstrap=n, progress=False)\n"
          "save_report(rep, sys.argv[2])\n")


def _clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in STRIP}
    env.update(extra)
    return env


def _load() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def _store(path: Path) -> Path:
    if not path.exists():
        from driftlens.testing import make_store

        print(f"building the synthetic store {path}", flush=True)
        make_store(path, n_clusters=48, renders=2, n_visual=12, n_text=8, dim=256)
    return path


def _command(job: str, store: Path, demo_cache: str | None, out: Path, draws: int | None) -> list[str]:
    if job == "drift":
        more = [] if draws is None else ["--permutations", str(draws), "--bootstrap", str(draws)]
        return [str(BIN / "driftlens"), "drift", str(store), "--out", str(out / "drift.nc"), "--no-progress", *more]
    if job == "inproc":
        return [sys.executable, "-c", INPROC, str(store), str(out / "drift.nc"), str(draws or 1000)]
    return [str(BIN / "driftlens"), "demo", "--seeds", DEMO_SEEDS, "--cache", str(demo_cache),
            "--out", str(out / "demo"), "--no-progress"]


def _run(cmd: list[str], env: dict, contended: bool) -> tuple[float, float]:
    comp = None
    if contended:
        comp = subprocess.Popen([sys.executable, "-c", COMPETITOR], env=_clean_env({}))
        time.sleep(2.0)                          # torch imported, matmuls running
    load = _load()
    t = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if comp is not None:
        comp.kill()
        comp.wait()
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return dt, load


def _baseline(rev: str, work: Path) -> Path:
    """The package as of git revision ``rev`` (driftlens/, hooks/, data/ laid out as installed), for PYTHONPATH."""
    import shutil

    dest = work / f"baseline-{rev}"
    if not (dest / "driftlens").is_dir():
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", rev, "driftlens", "hooks", "data"], cwd=HERE.parent,
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        (dest / "hooks").rename(dest / "driftlens" / "hooks")
        (dest / "data").rename(dest / "driftlens" / "data")
    return dest


def _same_report(a: Path, b: Path) -> str:
    import xarray as xr

    from driftlens.report import load_report

    try:
        xr.testing.assert_identical(load_report(a), load_report(b))
    except AssertionError as e:
        return f"DIFFERENT ({str(e).splitlines()[0]})"
    return "identical"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", help="activation store for the drift jobs (default: a synthetic one)")
    ap.add_argument("--demo-cache", help="organism cache holding seed 0 (enables the demo job)")
    ap.add_argument("--jobs", default="drift,inproc,demo")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--draws", type=int, help="permutations and bootstrap draws of the drift jobs (default: "
                    "the CLI's 1000)")
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME:VAR=VALUE[,VAR=VALUE] environment to compare against the plain one")
    ap.add_argument("--baseline", metavar="REV",
                    help="also run the package as of this git revision (e.g. 4384f31, before the fix)")
    ap.add_argument("--no-plain", action="store_true", help="only the --variant environments")
    ap.add_argument("--work", help="folder for outputs and the synthetic store (default: a temporary one)")
    args = ap.parse_args(argv)

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-contention-"))
    work.mkdir(parents=True, exist_ok=True)
    jobs = [j for j in args.jobs.split(",") if j != "demo" or args.demo_cache]
    store = (Path(args.store) if args.store else _store(work / "synthetic.zarr")) if set(jobs) - {"demo"} else None
    variants = [] if args.no_plain else [("plain", {})]
    if args.baseline:
        variants.append((args.baseline, {"PYTHONPATH": str(_baseline(args.baseline, work))}))
    for v in args.variant:
        name, _, spec = v.partition(":")
        variants.append((name, dict(kv.split("=", 1) for kv in spec.split(",") if kv)))

    times: dict[tuple, list[float]] = {}
    loads: dict[tuple, list[float]] = {}
    checks: dict[tuple, str] = {}
    for r in range(args.repeats):
        for job in jobs:
            for name, extra in variants:
                for contended in (False, True):
                    out = work / f"{job}-{name}-{'c' if contended else 'i'}-{r}"
                    out.mkdir(exist_ok=True)
                    cmd = _command(job, store, args.demo_cache, out, args.draws)
                    dt, load = _run(cmd, _clean_env(extra), contended)
                    key = (job, name, contended)
                    times.setdefault(key, []).append(dt)
                    loads.setdefault(key, []).append(load)
                    print(f"  repeat {r} {job:6s} {name:10s} {'contended' if contended else 'idle':9s} "
                          f"{dt:7.1f} s  (load {load:.2f})", flush=True)
                    if job != "demo":
                        first = work / f"{job}-{variants[0][0]}-i-0" / "drift.nc"
                        checks[(job, name)] = ("identical" if out / "drift.nc" == first
                                               else _same_report(first, out / "drift.nc"))

    print(f"\nmachine: {os.cpu_count()} cores; store {store}; medians over {args.repeats} repeat(s)")
    print("| job | environment | idle s | contended s | contended / idle | load idle / contended | report |")
    print("|---|---|---|---|---|---|---|")
    for job in jobs:
        for name, _ in variants:
            i, c = statistics.median(times[(job, name, False)]), statistics.median(times[(job, name, True)])
            li, lc = statistics.median(loads[(job, name, False)]), statistics.median(loads[(job, name, True)])
            print(f"| {job} | {name} | {i:.1f} | {c:.1f} | {c / i:.2f}x | {li:.2f} / {lc:.2f} | "
                  f"{checks.get((job, name), '-')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
