"""Scale benchmark of the drift report on one GPU: matmul rate, the paired cluster MMD test, a 7B-sized grid.

    .venv/bin/python bench/gpu_scale.py                        # one H100-class GPU, full size (grid target < 10 min)
    .venv/bin/python bench/gpu_scale.py --skip-mmd --mir --layers 1 --checkpoints 2 --mir-bootstrap 10  # mir (below)
    .venv/bin/python bench/gpu_scale.py --skip-grid            # parts 1-2 only
    .venv/bin/python bench/gpu_scale.py --device cpu --small   # CPU smoke size, a few seconds

Without CUDA (and without ``--small`` or ``--device cpu``) it prints a message and exits with status 0.
Figures are printed and written as markdown to ``--out`` (default ``bench/results/gpu_scale.md``;
with ``--small``, ``bench/results/gpu_scale_small.md``); ``--report FILE`` also saves the grid's drift
report (netCDF).

Parts
-----
1. **Matmul rate**: best of 5 square ``s x s`` float32 matmuls (``--matmul-size``, default 8192, which
   saturates an H100), with TF32 off and, on CUDA, on. The drift runs with torch's setting
   ``torch.backends.cuda.matmul.allow_tf32``, False by default, i.e. full float32 on the CUDA cores:
   the float32 rate is the comparable one (the TF32 rate is reported beside it; the comparable rate
   is the TF32 one only if this process has TF32 enabled).
2. **Paired cluster MMD test**: :func:`driftlens.inference.paired_mmd` on N tokens per side
   (``--n``, default 20,000) of feature size d (``--d``, default 4096) in K clusters (``--clusters``,
   default 500), with B sign flips and B bootstrap draws (``--permutations``, ``--bootstrap``, 1000),
   best of 3 (after a warm-up call); also its kernel step :func:`driftlens.inference.paired_mmd_matrix`
   alone at several tile sizes (``--block-sizes``). Tokens from the grid's synthetic model below
   (layer 0, ``n / K`` tokens per cluster; the checkpoint side planted with a shift of 0.3 sqrt(d)).
3. **Grid**: :func:`driftlens.engine.make_plan` / ``run_grid`` / ``assemble`` on a 7B-sized grid:
   32 layers (``--layers``), d = 4096, 50,000 visual tokens (``--visual``; 100 per probe, two probes
   per cluster: 250 clusters) plus 20 text tokens per probe (4 before the image, 16 after: 10,000),
   6 checkpoints (``--checkpoints``), site ``hidden``, metrics mmd + paired_shift + gap, 1000 sign flips
   and bootstrap draws. Target: under 10 minutes on one H100-class GPU. ``mir`` only with ``--mir``:
   at d = 4096 each (checkpoint, layer) cell costs ``mir_bootstrap`` (default 1000)
   eigendecompositions of 4096 x 4096 matrices, and the engine's MIR cell
   (``driftlens.stats.crossmodal.mir_cell``) builds per-cluster second moments on the *host*, K x d x d float64
   per modality (2 x 250 x 128 MiB = 63 GiB here), plus bootstrap chunks of 128 x d x d float64
   covariances -- more than the whole rest of the grid, and hours of host eigendecompositions at
   1000 draws. With ``--mir`` the benchmark estimates that host memory
   (``8 d^2 (2 K + 4 min(128, mir_bootstrap))`` bytes) and leaves mir out, saying so, when it exceeds
   80% of the available memory; measure mir's cost on a few layers and draws instead
   (``--skip-mmd --mir --layers 1 --checkpoints 2 --mir-bootstrap 10``).

The grid's Dataset is a *skeleton*: coordinates and attributes of a real store and a ``hidden``
variable of lazy dask zeros (1 x 1 x T x d chunks) that is never computed (189 GB at full size). The
blocks come from :class:`DeviceBlocks`, which the engine reads through its ``BlockSource``
protocol: each (checkpoint, layer) block ``[T, d]`` is generated on the device, deterministically
(``torch.Generator`` seeded by the layer, and by the checkpoint for the checkpoint's own part):

    x = u[cluster] + 0.4 e + [visual] o                         (the same at every checkpoint)
        + [checkpoint > 0] 0.05 eta                             (fresh per checkpoint and layer)
        + [visual, planted layer] drift sqrt(d) (i / (C - 1)) v  (checkpoint i of C)

``u`` [K, d], ``e`` [T, d], ``o`` [d] standard normal (layer seed), ``eta`` standard normal
(checkpoint-and-layer seed), ``v`` a unit direction (layer seed). The planted layers (``--planted``,
default every 4th layer from layer 1) drift by a shift that grows linearly with the checkpoint, so
their mmd grows with the checkpoint while the other layers stay near 0. The block generation is
inside the grid's time (it stands in for reading the store); its share is reported.

FLOP model
----------
:func:`driftlens.inference.paired_mmd_matrix` loops over all ``(i, j)`` tile pairs of the n rows
(not only ``i <= j``); a pair of ``b_i x b_j`` tiles costs the squared-distance Gram of the
reference tiles ``r_i r_j^T`` (``2 b_i b_j d``, one addmm) and the three products ``r_i . delta_j``,
``delta_i . r_j``, ``delta_i . delta_j`` (``3 x 2 b_i b_j d``). Summed over the tiles:

    FLOPs(paired cluster MMD) = 8 n^2 d        (n tokens per side; independent of the tile size)

Not counted: exp / expm1 and the rest of the per-entry pair terms and the scatter of each tile into
cluster rows (memory-bound), the median heuristic (a 2000-row Gram: 0.25% at the default size),
and the sign-flip / bootstrap quadratic forms (``4 K^2 B`` float64 on the CPU). The achieved rate is
so a lower bound on the matmul efficiency; the target is >= 50% of the comparable measured rate.
For the grid, each non-reference (checkpoint, layer, modality) cell with n rows counts ``8 n^2 d``,
except where the engine keeps the reference's kernel tile across a task's checkpoints (a modality of
at most ``driftlens.engine.MMD_CACHE_ROWS`` = 4096 rows: the ``--small`` grid, not the full one):
there the checkpoints after the first count ``6 n^2 d``. paired_shift, gap and the block generation
are not counted.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "results" / "gpu_scale.md"
DEFAULT_SMALL_OUT = ROOT / "bench" / "results" / "gpu_scale_small.md"
GRID_TARGET_S = 600.0
FRACTION_TARGET = 0.5
TOKEN_SD = 0.4          # token effect sd (cluster effect sd 1)
CHECKPOINT_NOISE = 0.05  # fresh noise per non-reference checkpoint (two runs of one model)

FULL = dict(n=20000, d=4096, clusters=500, layers=32, checkpoints=6, visual=50000, visual_per_probe=100,
            text_before=4, text_after=16, matmul_size=8192, block_sizes="2048,4096,8192")
SMALL = dict(n=512, d=64, clusters=32, layers=4, checkpoints=3, visual=2000, visual_per_probe=50,
             text_before=2, text_after=8, matmul_size=1024, block_sizes="128,512")


# ----------------------------------------------------------------------------- timing


def _sync(dev):
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timed(fn, dev, repeats=3, warmup=True):
    """Best wall time of ``repeats`` calls (after one warm-up call) and the last result."""
    out = fn() if warmup else None
    best = float("inf")
    for _ in range(repeats):
        _sync(dev)
        t = time.perf_counter()
        out = fn()
        _sync(dev)
        best = min(best, time.perf_counter() - t)
    return best, out


def device_name(dev) -> str:
    import torch

    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    sys.path.insert(0, str(ROOT / "bench"))
    from out_of_core import cpu_name

    return f"CPU: {cpu_name()} ({torch.get_num_threads()} torch threads)"


# ----------------------------------------------------------------------------- part 1: matmul rate


def matmul_rates(dev, size: int, repeats: int = 5) -> dict:
    """TFLOP/s of square float32 matmuls: ``float32`` (TF32 off) and, on CUDA, ``tf32``."""
    import torch

    g = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(size, size, generator=g, device=dev)
    b = torch.randn(size, size, generator=g, device=dev)
    flops = 2.0 * size ** 3
    rates = {}
    if dev.type == "cuda":
        saved = torch.backends.cuda.matmul.allow_tf32
        try:
            for name, tf32 in (("float32", False), ("tf32", True)):
                torch.backends.cuda.matmul.allow_tf32 = tf32
                t, _ = _timed(lambda a=a, b=b: a @ b, dev, repeats)
                rates[name] = flops / t / 1e12
        finally:
            torch.backends.cuda.matmul.allow_tf32 = saved
    else:
        t, _ = _timed(lambda a=a, b=b: a @ b, dev, repeats)
        rates["float32"] = flops / t / 1e12
    del a, b
    return rates


# ----------------------------------------------------------------------------- synthetic tokens


def _seed(seed: int, layer: int, checkpoint: int | None) -> int:
    base = (int(seed) * 1_000_003 + (int(layer) + 1) * 7919) % (2 ** 62)
    return base if checkpoint is None else (base + (int(checkpoint) + 1) * 104_729) % (2 ** 62)


def synthetic_block(codes, visual, k: int, d: int, layer: int, checkpoint: int, n_checkpoints: int,
                    planted: bool, drift: float = 1.0, seed: int = 0):
    """One ``[T, d]`` float32 block on ``codes``' device (see the module docstring for the model).

    ``codes`` long [T] cluster codes 0..k-1; ``visual`` float [T] 1 at visual tokens, else 0.
    """
    import torch

    dev = codes.device
    t = codes.shape[0]
    g = torch.Generator(device=dev).manual_seed(_seed(seed, layer, None))
    u = torch.randn(k, d, generator=g, device=dev)                   # cluster effects
    offset = torch.randn(d, generator=g, device=dev)                 # visual-token offset (a modality gap)
    direction = torch.randn(d, generator=g, device=dev)
    direction /= direction.norm()
    x = torch.randn(t, d, generator=g, device=dev).mul_(TOKEN_SD)    # token effects
    x += u.index_select(0, codes)
    del u
    x.addcmul_(visual[:, None], offset[None, :])
    if checkpoint > 0:
        g2 = torch.Generator(device=dev).manual_seed(_seed(seed, layer, checkpoint))
        x.add_(torch.randn(t, d, generator=g2, device=dev), alpha=CHECKPOINT_NOISE)
        if planted:
            step = drift * math.sqrt(d) * checkpoint / max(n_checkpoints - 1, 1)
            x.addcmul_(visual[:, None], direction[None, :].mul(step))
    return x


class GridLayout:
    """Probes of ``visual_per_probe`` visual tokens between text tokens; ``renders`` probes per cluster."""

    def __init__(self, n_visual: int, visual_per_probe: int, text_before: int, text_after: int,
                 renders: int = 2):
        import numpy as np

        self.n_probes = max(n_visual // visual_per_probe, 2 * renders)
        cols = {c: [] for c in ("sample", "group", "cluster", "position", "modality", "lang")}
        per = text_before + visual_per_probe + text_after
        for p in range(self.n_probes):
            a, j = divmod(p, renders)
            lang = ("en", "ko")[p % 2]
            cols["sample"] += [f"s{a}r{j}-{lang}"] * per
            cols["group"] += [f"scene{a}#r{j}"] * per
            cols["cluster"] += [f"scene{a}"] * per
            cols["position"] += list(range(per))
            cols["modality"] += (["text"] * text_before + ["visual"] * visual_per_probe + ["text"] * text_after)
            cols["lang"] += [lang] * per
        self.coords = {c: np.asarray(v) for c, v in cols.items()}
        self.n_tokens = len(cols["sample"])
        self.n_visual = int((self.coords["modality"] == "visual").sum())
        self.n_text = self.n_tokens - self.n_visual
        self.n_clusters = (self.n_probes + renders - 1) // renders
        self.codes = np.unique(self.coords["cluster"], return_inverse=True)[1].reshape(-1)


def skeleton_dataset(layout: GridLayout, labels: list[str], n_layers: int, d: int):
    """A store-shaped Dataset whose ``hidden`` variable is lazy dask zeros, never computed."""
    import dask.array as da
    import numpy as np
    import xarray as xr

    c, t = len(labels), layout.n_tokens
    hidden = da.zeros((c, n_layers, t, d), dtype=np.float32, chunks=(1, 1, t, d))
    coords = {"checkpoint": np.asarray(labels), "layer": np.arange(n_layers)}
    coords.update({name: ("token", v) for name, v in layout.coords.items()})
    attrs = {"model_type": "synthetic", "family": "synthetic", "probe_set": "gpu_scale", "n_layers": n_layers,
             "layers": list(range(n_layers)), "sites": ["hidden"], "dims": {"hidden": d}, "dtype": "float32",
             "token_selection": "all", "checkpoints": list(labels), "completed": list(labels)}
    return xr.Dataset({"hidden": (("checkpoint", "layer", "token", "hidden_dim"), hidden)}, coords=coords,
                      attrs=attrs)


class DeviceBlocks:
    """``BlockSource`` of the engine: each (checkpoint, layer) block generated on the device.

    Deterministic: the same (checkpoint, layer) gives the same block on every read. Counts its
    reads and the (synchronized) time spent generating.
    """

    def __init__(self, layout: GridLayout, labels: list[str], d: int, planted, device, drift: float = 1.0,
                 seed: int = 0):
        import torch

        self.layout, self.labels, self.d = layout, list(labels), int(d)
        self.index = {lab: i for i, lab in enumerate(self.labels)}
        self.planted = {int(v) for v in planted}
        self.device = torch.device(device)
        self.drift, self.seed = float(drift), int(seed)
        self.codes = torch.as_tensor(layout.codes, dtype=torch.long, device=self.device)
        self.visual = torch.as_tensor(layout.coords["modality"] == "visual", dtype=torch.float32,
                                      device=self.device)
        self.reads = 0
        self.seconds = 0.0

    def read(self, site: str, checkpoint: str, layer: int | None):
        if site != "hidden" or layer is None:
            raise KeyError(f"the synthetic grid has only the layered site 'hidden', not {site!r} (layer {layer})")
        _sync(self.device)
        t0 = time.perf_counter()
        x = synthetic_block(self.codes, self.visual, self.layout.n_clusters, self.d, int(layer),
                            self.index[str(checkpoint)], len(self.labels), int(layer) in self.planted,
                            self.drift, self.seed)
        _sync(self.device)
        self.seconds += time.perf_counter() - t0
        self.reads += 1
        return x


# ----------------------------------------------------------------------------- part 2: paired MMD test


def mmd_flops(n: int, d: int) -> float:
    """FLOPs of :func:`driftlens.inference.paired_mmd_matrix` on n rows (see the module docstring)."""
    return 8.0 * n * n * d


def grid_mmd_flops(n: int, d: int, n_checkpoints: int, cached: bool) -> float:
    """mmd FLOPs of one (layer, modality) over its non-reference checkpoints; ``cached``: the engine
    keeps the reference's kernel tile after the first checkpoint (its Gram, 2 n^2 d, is not redone)."""
    cells = max(n_checkpoints - 1, 0)
    if not cached or cells == 0:
        return cells * mmd_flops(n, d)
    return mmd_flops(n, d) + (cells - 1) * 6.0 * n * n * d


def bench_mmd(dev, n: int, d: int, k: int, n_perm: int, n_boot: int, block_sizes, seed: int = 0) -> dict:
    import numpy as np
    import torch

    from driftlens import inference as I
    from driftlens import metrics as M

    codes_np = np.arange(n) % k
    codes = torch.as_tensor(codes_np, device=dev)
    vis = torch.ones(n, device=dev)
    r = synthetic_block(codes, vis, k, d, 0, 0, 2, True, drift=0.3, seed=seed)
    c = synthetic_block(codes, vis, k, d, 0, 1, 2, True, drift=0.3, seed=seed)
    repeats = 3
    t_test, inf = _timed(lambda r=r, c=c: I.paired_mmd(r, c, codes_np, n_permutations=n_perm,
                                                       n_bootstrap=n_boot, seed=seed), dev, repeats)
    centre = r.mean(0, dtype=torch.float64).to(r.dtype)
    rc, cc = r - centre, c - centre
    sigma = M.median_sigma(rc, pairs="reference", seed=seed)
    flops = mmd_flops(n, d)
    tiles = []
    for bs in block_sizes:
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        t_k, _ = _timed(lambda bs=bs, rc=rc, cc=cc: I.paired_mmd_matrix(rc, cc, codes, k, sigma, block_size=bs),
                        dev, repeats)
        mem = torch.cuda.max_memory_allocated(dev) / 1024 ** 3 if dev.type == "cuda" else float("nan")
        tiles.append({"block": bs, "seconds": t_k, "tflops": flops / t_k / 1e12, "peak_gib": mem})
    del r, c, rc, cc
    return {"n": n, "d": d, "k": k, "n_perm": n_perm, "n_boot": n_boot, "sigma": sigma, "effect": inf.effect,
            "lo": inf.lo, "hi": inf.hi, "p": inf.p, "flops": flops, "seconds": t_test,
            "tflops": flops / t_test / 1e12, "tiles": tiles}


# ----------------------------------------------------------------------------- part 3: the grid


def bench_grid(dev, args, seed: int = 0) -> dict:
    import numpy as np

    from driftlens import engine

    layout = GridLayout(args.visual, args.visual_per_probe, args.text_before, args.text_after)
    labels = [f"step-{i:04d}" for i in range(args.checkpoints)]
    planted = _planted(args.planted, args.layers)
    ds = skeleton_dataset(layout, labels, args.layers, args.d)
    blocks = DeviceBlocks(layout, labels, args.d, planted, dev, drift=args.drift, seed=seed)
    metrics = ["mmd", "paired_shift", "gap"]
    mir_note = "not included (--mir to include it)"
    if args.mir:
        n_mir = args.bootstrap if args.mir_bootstrap is None else args.mir_bootstrap
        need = mir_host_bytes(layout.n_clusters, args.d, n_mir)
        avail = _mem_available()
        if avail is not None and need > 0.8 * avail:
            mir_note = (f"left out: its host statistics need about {need / 2 ** 30:.0f} GiB, "
                        f"{avail / 2 ** 30:.0f} GiB available (fewer --mir-bootstrap draws or a smaller --d)")
        else:
            metrics.append("mir")
            mir_note = f"included: {n_mir} bootstrap draws; host memory estimate {need / 2 ** 30:.2f} GiB"
    t0 = time.perf_counter()
    plan = engine.make_plan(ds, metrics=metrics, sites=["hidden"], n_permutations=args.permutations,
                            n_bootstrap=args.bootstrap, mir_bootstrap=args.mir_bootstrap, seed=seed,
                            device=str(dev))
    t1 = time.perf_counter()
    results = engine.run_grid(plan, blocks, progress=args.progress)
    _sync(dev)
    t2 = time.perf_counter()
    report = engine.assemble(plan, results)
    t3 = time.perf_counter()
    n_mod = {"visual": layout.n_visual, "text": layout.n_tokens - layout.n_visual}
    mods = [str(m) for m in report.modality.values] if "modality" in report.coords else list(n_mod)
    cache_rows = getattr(engine, "MMD_CACHE_ROWS", 0)
    flops = args.layers * sum(grid_mmd_flops(n_mod[m], args.d, args.checkpoints, n_mod[m] <= cache_rows)
                              for m in mods if n_mod[m])
    mmd = report["mmd"].sel(site="hidden", modality="visual").values            # [C, L]
    return {"layout": layout, "labels": labels, "planted": planted, "metrics": metrics, "report": report,
            "mir_note": mir_note,
            "plan_s": t1 - t0, "run_s": t2 - t1, "assemble_s": t3 - t2, "total_s": t3 - t0,
            "blocks_s": blocks.seconds, "reads": blocks.reads, "flops": flops,
            "tflops": flops / (t2 - t1) / 1e12, "finite": report_finite(report),
            "planted_mmd": mmd[:, planted[0]] if planted else np.array([]),
            "other_mmd_max": float(np.nanmax(np.abs(np.delete(mmd, planted, axis=1)[1:])))
            if len(planted) < args.layers and args.checkpoints > 1 else float("nan")}


def mir_host_bytes(k: int, d: int, n_mir: int) -> float:
    """Host memory of the engine's MIR cell (estimate): per-cluster second moments [K, d, d] float64 of
    both modalities, and a bootstrap chunk's second moments and covariances [128, d, d] of both."""
    return 8.0 * d * d * (2 * k + 4 * min(128, n_mir))


def _mem_available() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _planted(spec: str, n_layers: int) -> list[int]:
    if spec == "auto":
        return list(range(1, n_layers, 4))
    return sorted({int(v) for v in spec.split(",") if v.strip()} & set(range(n_layers)))


def report_finite(report) -> bool:
    """Every cell finite, except the p-values (``*_p``, ``*_q``) at the reference, which are untested (NaN)."""
    import numpy as np

    ref = report.attrs.get("reference", str(report.checkpoint.values[0]))
    for name, var in report.data_vars.items():
        v = var
        if name.endswith(("_p", "_q")) and "checkpoint" in var.dims:
            v = var.where(var.checkpoint != ref, drop=True)
        if not np.isfinite(np.asarray(v.values, dtype=np.float64)).all():
            return False
    return True


# ----------------------------------------------------------------------------- output


def _fraction(rate, peak) -> str:
    f = rate / peak
    met = "met" if f >= FRACTION_TARGET else "not met"
    return f"{f:.3f} ({100 * f:.0f}%; target >= {100 * FRACTION_TARGET:.0f}%: {met})"


def render(info: dict, rates: dict, mmd: dict | None, grid: dict | None, args) -> str:
    comparable = "tf32" if info["tf32"] else "float32"
    peak = rates[comparable]
    rows = [("device", info["device"]), ("torch", info["torch"]),
            ("drift matmul precision", (f"{'TF32' if info['tf32'] else 'float32'} (torch.backends.cuda.matmul."
                                        f"allow_tf32 = {info['tf32']}; torch's default is False)")
             if info["cuda"] else "float32 (CPU)"),
            ("matmul size", f"{args.matmul_size} x {args.matmul_size} x {args.matmul_size}, best of 5"),
            ("matmul float32 TFLOP/s", f"{rates['float32']:.3f}"),
            ("matmul TF32 TFLOP/s", f"{rates['tf32']:.3f}" if "tf32" in rates else "n/a (no CUDA)"),
            ("comparable matmul rate TFLOP/s", f"{peak:.3f} ({comparable})")]
    cmd = "python bench/gpu_scale.py" + "".join(" " + a for a in info["argv"])
    lines = ["# driftlens GPU scale benchmark", "", f"`{cmd}`", "",
             "## Device", "", "| figure | value |", "|---|---|"]
    lines += [f"| {a} | {b} |" for a, b in rows]
    if mmd is not None:
        lines += ["", "## Paired cluster MMD test (`driftlens.inference.paired_mmd`)", "",
                  "| figure | value |", "|---|---|"]
        lines += [f"| {a} | {b} |" for a, b in (
            ("mmd tokens per side", f"{mmd['n']}"), ("mmd feature size d", f"{mmd['d']}"),
            ("mmd clusters", f"{mmd['k']}"),
            ("mmd sign flips / bootstrap draws", f"{mmd['n_perm']} / {mmd['n_boot']}"),
            ("mmd sigma", f"{mmd['sigma']:.5g}"),
            ("mmd effect [interval], p", f"{mmd['effect']:.5g} [{mmd['lo']:.5g}, {mmd['hi']:.5g}], p {mmd['p']:.4f}"),
            ("mmd FLOPs (8 n^2 d)", f"{mmd['flops']:.4g}"),
            ("mmd test time (s)", f"{mmd['seconds']:.4f}"),
            ("mmd test TFLOP/s", f"{mmd['tflops']:.3f}"),
            ("mmd test fraction of matmul rate", _fraction(mmd["tflops"], peak)))]
        lines += ["", "Kernel step alone (`paired_mmd_matrix`), by tile size:", "",
                  "| block | s | TFLOP/s | fraction of matmul rate | peak GPU mem GiB |", "|---|---|---|---|---|"]
        lines += [f"| {t['block']} | {t['seconds']:.4f} | {t['tflops']:.3f} | {t['tflops'] / peak:.3f} | "
                  f"{t['peak_gib']:.2f} |" for t in mmd["tiles"]]
    if grid is not None:
        lay = grid["layout"]
        full = info["cuda"] and args.permutations == args.bootstrap == 1000 and all(
            getattr(args, key) == FULL[key] for key in ("d", "layers", "checkpoints", "visual", "visual_per_probe",
                                                        "text_before", "text_after"))
        target = (f"{'met' if grid['total_s'] < GRID_TARGET_S else 'not met'} ({grid['total_s']:.0f} s)" if full
                  else "n/a (the target is for one H100-class GPU at the default full size)")
        pm = ", ".join(f"{v:.4g}" for v in grid["planted_mmd"])
        lines += ["", "## Drift grid (`driftlens.engine`: make_plan / run_grid / assemble, on-device blocks)", "",
                  "| figure | value |", "|---|---|"]
        lines += [f"| {a} | {b} |" for a, b in (
            ("grid checkpoints", f"{len(grid['labels'])}"), ("grid layers", f"{args.layers}"),
            ("grid site", "hidden"), ("grid feature size d", f"{args.d}"),
            ("grid tokens", f"{lay.n_tokens} ({lay.n_visual} visual + {lay.n_text} text)"),
            ("grid clusters", f"{lay.n_clusters} ({lay.n_probes} probes)"),
            ("grid metrics", " + ".join(grid["metrics"])),
            ("grid mir", grid["mir_note"]),
            ("grid sign flips / bootstrap draws", f"{args.permutations} / {args.bootstrap}"),
            ("grid planted layers", ", ".join(map(str, grid["planted"])) or "none"),
            ("grid make_plan time (s)", f"{grid['plan_s']:.4f}"),
            ("grid run_grid time (s)", f"{grid['run_s']:.4f}"),
            ("grid assemble time (s)", f"{grid['assemble_s']:.4f}"),
            ("grid total time (s)", f"{grid['total_s']:.4f}"),
            ("grid block generation time (s)", f"{grid['blocks_s']:.4f} ({grid['reads']} blocks, inside run_grid)"),
            ("grid mmd FLOPs (8 n^2 d per cell; 6 n^2 d cached)", f"{grid['flops']:.4g}"),
            ("grid mmd TFLOP/s over run_grid", f"{grid['tflops']:.3f}"),
            ("grid fraction of matmul rate", f"{grid['tflops'] / peak:.3f}"),
            ("grid target < 600 s", target),
            ("grid every report cell finite", "yes" if grid["finite"] else "NO"),
            ("grid planted drift: visual mmd by checkpoint", f"layer {grid['planted'][0]}: {pm}"
             if grid["planted"] else "n/a"),
            ("grid unplanted layers: max abs visual mmd", f"{grid['other_mmd_max']:.4g}"))]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main


def _parser():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto (CUDA if present), cuda, cuda:N, cpu")
    ap.add_argument("--small", action="store_true",
                    help="tiny sizes for a CPU smoke run: " + ", ".join(f"{k}={v}" for k, v in SMALL.items()))
    ap.add_argument("--n", type=int, help=f"tokens per side of the MMD test (default {FULL['n']})")
    ap.add_argument("--d", type=int, help=f"feature size, MMD test and grid (default {FULL['d']})")
    ap.add_argument("--clusters", type=int, help=f"clusters of the MMD test (default {FULL['clusters']})")
    ap.add_argument("--permutations", type=int, default=1000, help="sign flips (MMD test and grid)")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap draws (MMD test and grid)")
    ap.add_argument("--block-sizes", help=f"paired_mmd_matrix tile sizes (default {FULL['block_sizes']})")
    ap.add_argument("--matmul-size", type=int, help=f"square matmul size (default {FULL['matmul_size']})")
    ap.add_argument("--layers", type=int, help=f"grid layers (default {FULL['layers']})")
    ap.add_argument("--checkpoints", type=int, help=f"grid checkpoints incl. the reference (default "
                                                          f"{FULL['checkpoints']})")
    ap.add_argument("--visual", type=int, help=f"grid visual tokens (default {FULL['visual']})")
    ap.add_argument("--visual-per-probe", type=int, help=f"visual tokens per probe (default "
                                                               f"{FULL['visual_per_probe']})")
    ap.add_argument("--text-before", type=int, help=f"text tokens before the image (default {FULL['text_before']})")
    ap.add_argument("--text-after", type=int, help=f"text tokens after the image (default {FULL['text_after']})")
    ap.add_argument("--planted", default="auto", help="planted layers, comma-separated (default every 4th from 1)")
    ap.add_argument("--drift", type=float, default=1.0, help="planted shift at the last checkpoint, x sqrt(d)")
    ap.add_argument("--mir", action="store_true", help="also mir on the grid (very costly at d = 4096)")
    ap.add_argument("--mir-bootstrap", type=int, default=None, help="mir bootstrap draws (default --bootstrap)")
    ap.add_argument("--skip-mmd", action="store_true", help="skip parts 1-2's MMD test")
    ap.add_argument("--skip-grid", action="store_true", help="skip part 3")
    ap.add_argument("--progress", action="store_true", help="the engine's progress bar")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads for this run (default: torch's own; restored at the end)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None,
                    help="markdown file (default bench/results/gpu_scale.md; with --small "
                         "bench/results/gpu_scale_small.md, so a smoke run keeps the GPU figures)")
    ap.add_argument("--report", default=None, help="also save the grid's drift report here (netCDF)")
    return ap


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    sizes = SMALL if args.small else FULL
    for key, val in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, val)

    import torch

    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, argv)
    finally:
        torch.set_num_threads(threads)


def _run(args, argv) -> int:
    import torch

    if args.device == "auto":
        if not torch.cuda.is_available() and not args.small:
            print("gpu_scale: no GPU present (torch.cuda.is_available() is False); nothing to measure at full "
                  "size. Run this on a machine with an NVIDIA GPU, or `--device cpu --small` for the CPU smoke run.")
            return 0
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print(f"gpu_scale: no GPU present (torch.cuda.is_available() is False; --device {args.device}); "
              f"nothing to measure. Use `--device cpu --small` for the CPU smoke run.")
        return 0
    if dev.type == "cuda":
        dev = torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    info = {"device": device_name(dev), "torch": torch.__version__, "cuda": dev.type == "cuda",
            "tf32": bool(dev.type == "cuda" and torch.backends.cuda.matmul.allow_tf32), "argv": argv}

    rates = matmul_rates(dev, args.matmul_size)
    mmd = None
    if not args.skip_mmd:
        bs = [int(v) for v in args.block_sizes.split(",") if v.strip()]
        mmd = bench_mmd(dev, args.n, args.d, args.clusters, args.permutations, args.bootstrap, bs, args.seed)
    grid = None
    if not args.skip_grid:
        grid = bench_grid(dev, args, args.seed)
        if args.report:
            from driftlens.report import save_report

            save_report(grid["report"], args.report)
    text = render(info, rates, mmd, grid, args)
    print(text, end="")
    out = Path(args.out) if args.out else (DEFAULT_SMALL_OUT if args.small else DEFAULT_OUT)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
