"""CPU benchmark of driftlens.metrics (run by hand; not part of the test suite).

    .venv/bin/python bench/bench_metrics.py            # all cases, writes bench/RESULTS_metrics.md
    .venv/bin/python bench/bench_metrics.py --quick    # skip the 50k-per-side case
    .venv/bin/python bench/bench_metrics.py --mmd-only # mmd_test vs one Gram matrix and alibi-detect (prints)

Each case runs in its own subprocess so that its peak RSS (resource.getrusage ru_maxrss) is its
own. Data are seeded standard normals (y shifted by 0.05 in every coordinate), float32.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _data(n, d, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.randn(n, d, generator=g) + 0.05
    return x, y


def _best(fn, repeats=3):
    """(best wall time of `repeats` calls, last result): the machine is shared, so take the min."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def _peak_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def case_alibi(n=2000, d=1024, b=100):
    import numpy as np
    import torch

    from driftlens import metrics as M

    x, y = _data(n, d)
    M.mmd_test(x[:100], y[:100], n_permutations=10)  # warm-up
    t_ours, ours = _best(lambda: M.mmd_test(x, y, n_permutations=b))
    t_few, few = _best(lambda: M.mmd_test(x, y, n_permutations=5, sigma=ours.sigma))
    t_many, many = _best(lambda: M.mmd_test(x, y, n_permutations=1000, sigma=ours.sigma))

    from alibi_detect.cd import MMDDrift

    def alibi():
        torch.manual_seed(0)
        det = MMDDrift(x.numpy(), backend="pytorch", sigma=np.array(ours.sigma), n_permutations=b,
                       device="cpu")
        return det.predict(y.numpy(), return_distance=True)["data"]

    z = torch.cat([x, y])                           # [2n, d]: one Gram matrix of the same data
    t_gram, _ = _best(lambda: z @ z.T)
    t_alibi, pred = _best(alibi, repeats=2)
    ref64 = M.mmd2(x.double(), y.double(), sigma=ours.sigma)  # float64 reference, same sigma
    return {
        "n": n, "d": d, "B": b, "sigma": ours.sigma[0],
        "ours_s": t_ours, "ours_stat": ours.statistic, "ours_p": ours.p_value,
        "alibi_s": t_alibi, "alibi_stat": float(pred["distance"]), "alibi_p": float(pred["p_val"]),
        "ref64_stat": ref64,
        "speedup": t_alibi / t_ours, "gram_s": t_gram, "over_gram": t_ours / t_gram,
        "few_B": 5, "few_s": t_few, "many_B": 1000, "many_s": t_many,
        "many_p": many.p_value, "few_stat": few.statistic, "peak_gb": _peak_gb(),
    }


def case_large(n=50000, d=1024, b=100):
    from driftlens import metrics as M

    x, y = _data(n, d, seed=1)
    t = time.perf_counter()
    res = M.mmd_test(x, y, n_permutations=b)
    dt = time.perf_counter() - t
    return {"n": n, "d": d, "B": b, "s": dt, "stat": res.statistic, "p": res.p_value,
            "sigma": res.sigma[0], "null_mean": res.null_mean, "null_std": res.null_std,
            "peak_gb": _peak_gb(), "data_gb": 2 * n * d * 4 / 1024**3}


def case_sinkhorn(n=20000, d=1024, max_points=None):
    from driftlens import metrics as M

    x, y = _data(n, d, seed=2)
    kw = {} if max_points is None else {"max_points": max_points}
    t = time.perf_counter()
    val = M.sinkhorn(x, y, blur=0.05, **kw)
    dt = time.perf_counter() - t
    k = M.SINKHORN_MAX_POINTS if max_points is None else max_points
    info = {"n_x": min(n, k), "n_y": min(n, k), "subsampled": n > k, "backend": "tensorized", "blur": 0.05}
    return {"n": n, "d": d, "s": dt, "value": val, **info, "peak_gb": _peak_gb()}


CASES = {"alibi": case_alibi, "large": case_large, "sinkhorn": case_sinkhorn}


def _run_case(name, **kw):
    cmd = [sys.executable, os.path.abspath(__file__), "--case", name, "--kw", json.dumps(kw)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"case {name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _machine():
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{platform.system()} {platform.release()}, {cpu}, {os.cpu_count()} cores, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"python {platform.python_version()}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=sorted(CASES))
    ap.add_argument("--kw", default="{}")
    ap.add_argument("--quick", action="store_true", help="skip the 50k-per-side MMD test")
    ap.add_argument("--mmd-only", action="store_true",
                    help="only mmd_test against one Gram matrix and alibi-detect (issue 28); print, write nothing")
    ap.add_argument("--large-permutations", type=int, default=100)
    ap.add_argument("--out", default=os.path.join(HERE, "RESULTS_metrics.md"))
    args = ap.parse_args(argv)
    if args.case:
        print(json.dumps(CASES[args.case](**json.loads(args.kw))))
        return 0

    rows, lines = [], []
    a = _run_case("alibi")
    rows.append(("mmd_test vs alibi MMDDrift", f"{a['n']}/side, d={a['d']}, B={a['B']}",
                 f"ours {a['ours_s']:.2f} s, alibi {a['alibi_s']:.2f} s ({a['speedup']:.0f}x)",
                 f"stat ours {a['ours_stat']:.9g} / alibi {a['alibi_stat']:.9g} / "
                 f"float64 reference {a['ref64_stat']:.9g}"))
    rows.append(("mmd_test vs one Gram matrix", f"{2 * a['n']} x {a['d']} (both samples)",
                 f"ours {a['ours_s']:.2f} s, `z @ z.T` {a['gram_s']:.2f} s ({a['over_gram']:.2f}x; target <= 1.2x)",
                 f"alibi / ours {a['speedup']:.0f}x (target >= 30x)"))
    rows.append(("mmd_test, B = 5 vs 1000", f"{a['n']}/side, d={a['d']}",
                 f"{a['few_s']:.2f} s vs {a['many_s']:.2f} s", f"p(B=1000) = {a['many_p']:.4f}"))
    if args.mmd_only:
        print("\n".join(["| case | size | time | result |", "|---|---|---|---|"]
                        + [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} |" for r in rows]))
        print(f"load average {open('/proc/loadavg').read().split()[0]} after the run; {_machine()}")
        return 0
    s2 = _run_case("sinkhorn", n=20000)
    rows.append(("sinkhorn (default max_points)", f"{s2['n']}/side, d={s2['d']}",
                 f"{s2['s']:.2f} s, peak RSS {s2['peak_gb']:.2f} GB",
                 f"value {s2['value']:.6g} on {s2['n_x']}+{s2['n_y']} subsampled points"))
    lg = None
    if not args.quick:
        lg = _run_case("large", b=args.large_permutations)
        rows.append(("mmd_test, large", f"{lg['n']}/side, d={lg['d']}, B={lg['B']}",
                     f"{lg['s']:.1f} s, peak RSS {lg['peak_gb']:.2f} GB",
                     f"stat {lg['stat']:.4g}, p {lg['p']:.4f} (data {lg['data_gb']:.2f} GB)"))

    head = ("| case | size | time / memory | result |", "|---|---|---|---|")
    table = list(head) + [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} |" for r in rows]
    print("\n".join(table))
    lines += ["# driftlens.metrics — CPU benchmark", "",
              f"Machine: {_machine()}.", "",
              "Produced by `bench/bench_metrics.py` (each case in its own process; peak RSS from "
              "`resource.getrusage`, includes the interpreter, torch and the data). Data: seeded "
              "standard normals, y shifted by 0.05 per coordinate, float32.", ""] + table + [""]
    lines += [
        "Notes:",
        "- Timings are the best of 3 runs (alibi: best of 2); the 2-core machine is shared with "
        "other jobs, so single runs are noisy.",
        f"- Both MMD statistics use the same sigma ({a['sigma']:.6g}, driftlens' pooled median "
        "heuristic, passed to alibi as `sigma=np.array([s])`); alibi's timing includes its "
        "constructor (reference kernel matrix) and `predict`. driftlens' timing includes the median "
        "heuristic. The statistics differ only by float32 rounding: relative to a float64 "
        f"computation, driftlens (float32 input) is off by {abs(a['ours_stat'] / a['ref64_stat'] - 1):.1e}, "
        f"alibi by {abs(a['alibi_stat'] / a['ref64_stat'] - 1):.1e} (driftlens centres the data, "
        "subtracts the mean kernel value and sums tiles in float64; alibi sums the float32 matrix).",
        "- driftlens evaluates all B permutations as quadratic forms `A^T K0 A` accumulated tile by "
        "tile while the kernel is built once; memory O(block^2 + N B).",
        "- Sinkhorn: geomloss `tensorized` on 2 CPU cores at d = 1024 took 2.6 s (1000 points per "
        "side), 6.4 s (2000) and 44 s (4000; 0.68 GB); so `sinkhorn` subsamples each side above "
        "`max_points = 2048` with a fixed seed and uses `min(n, max_points)` rows per side.",
    ]
    if lg is not None:
        lines.append(f"- 50k-per-side MMD test: {lg['B']} permutations (sigma {lg['sigma']:.6g}, "
                     f"null mean {lg['null_mean']:.3g}, std {lg['null_std']:.3g}); "
                     f"with B = {lg['B']} the smallest possible p is 1/(B+1) = {1 / (lg['B'] + 1):.4f}. "
                     "The cost is dominated by the N^2 d Gram products (about 1e13 flop here).")
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
