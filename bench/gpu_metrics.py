"""GPU benchmark of the MMD kernel step: achieved TFLOP/s against the device's measured matmul rate.

    .venv/bin/python bench/gpu_metrics.py [--n 20000] [--d 1024] [--permutations 1000] [--out FILE]

Without CUDA it prints a message and exits with status 0.

FLOP model (pooled N = 2n rows, feature size d, B permutations; symmetric tiles, each
off-diagonal tile used twice):
- Gram part of the squared distances: N^2 d (half of the 2 N^2 d of a full N x N x d product);
- permutation quadratic forms ``K0 @ A``: 2 N^2 B (every kernel entry meets every column twice
  over the symmetric pair of tiles).
exp, sums and the median heuristic are not counted (they are memory-bound), so the achieved rate
is a lower bound on the matmul efficiency.
"""
from __future__ import annotations

import argparse
import sys
import time


def _timed(fn, torch, repeats=3):
    fn()  # warm-up
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000, help="points per side")
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--permutations", type=int, default=1000)
    ap.add_argument("--block-sizes", default="2048,4096,8192")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--out", default=None, help="also write a markdown table here")
    args = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("gpu_metrics: no CUDA device available (torch.cuda.is_available() is False); "
              "nothing to measure. Run this on a machine with an NVIDIA GPU.")
        return 0

    from driftlens import metrics as M

    dtype = getattr(torch, args.dtype)
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    tf32 = torch.backends.cuda.matmul.allow_tf32

    # device matmul rate in the same dtype / TF32 setting as the kernel step
    s = 8192
    a = torch.randn(s, s, device=dev, dtype=dtype)
    b = torch.randn(s, s, device=dev, dtype=dtype)
    t_mm = _timed(lambda a=a, b=b: a @ b, torch)
    peak = 2 * s**3 / t_mm / 1e12
    del a, b

    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(args.n, args.d, generator=g, dtype=dtype).to(dev)
    y = (torch.randn(args.n, args.d, generator=g, dtype=dtype) + 0.05).to(dev)
    sigma = M.median_sigma(x, y)
    N, B, d = 2 * args.n, args.permutations, args.d

    rows = []
    for bs in [int(v) for v in args.block_sizes.split(",")]:
        torch.cuda.reset_peak_memory_stats()
        t_k = _timed(lambda bs=bs: M.mmd2(x, y, sigma=sigma, block_size=bs), torch)
        t_t = _timed(lambda bs=bs: M.mmd_test(x, y, n_permutations=B, sigma=sigma, block_size=bs), torch,
                     repeats=2)
        mem = torch.cuda.max_memory_allocated() / 1024**3
        f_k = N * N * d
        f_t = f_k + 2 * N * N * B
        rows.append((bs, t_k, f_k / t_k / 1e12, t_t, f_t / t_t / 1e12, mem))
    res = M.mmd_test(x, y, n_permutations=B, sigma=sigma)

    lines = [f"Device: {name}; dtype {args.dtype}; TF32 matmul {'on' if tf32 else 'off'}; "
             f"torch {torch.__version__}.",
             f"Measured matmul rate ({s}^3, same dtype): {peak:.1f} TFLOP/s.",
             f"Data: {args.n} points per side, d = {d}; sigma {sigma:.5g}; B = {B}; "
             f"statistic {res.statistic:.6g}, p {res.p_value:.4f}.", "",
             "| block | mmd2 s | mmd2 TFLOP/s (% of matmul) | mmd_test s | mmd_test TFLOP/s "
             "(% of matmul) | peak GPU mem GiB |", "|---|---|---|---|---|---|"]
    for bs, t_k, r_k, t_t, r_t, mem in rows:
        lines.append(f"| {bs} | {t_k:.3f} | {r_k:.1f} ({100 * r_k / peak:.0f}%) | {t_t:.3f} | "
                     f"{r_t:.1f} ({100 * r_t / peak:.0f}%) | {mem:.2f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
