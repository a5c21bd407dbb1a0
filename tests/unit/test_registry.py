"""The metric registry drives the report, the CLI and the plots: a metric added there alone shows up in all three.

Also: the ``Metric`` Literal agrees with the registry, and :mod:`driftlens.stats.kernels`'s differentiable
kernel sums (the anchor loss's) match their definition, values and gradients.
"""
from __future__ import annotations

import typing

import numpy as np
import pytest
import torch

import driftlens as dl
from driftlens import registry
from driftlens.registry import METRICS, MetricSpec
from driftlens.stats import kinds
from driftlens.stats.resampling import Inference, draws, percentile_interval


def test_metric_literal_names_every_registered_metric_and_alias():
    assert set(typing.get_args(registry.Metric)) == set(registry.BUILTIN) | set(registry.ALIASES)


def test_defaults_and_kinds_come_from_the_registry():
    assert registry.DEFAULT_METRICS == tuple(m for m, s in METRICS.items() if s.default)
    for name in registry.BUILTIN:                     # every built-in kind has a cell function
        assert kinds.cells_of(METRICS[name].kind).grain in kinds.GRAINS


def _mean_shift_norm(name, cell, s):
    """|mean over clusters of the cluster's mean displacement| with its cluster-bootstrap interval."""
    rows = cell.rows
    d = (cell.c - cell.r).to(torch.float64)
    per = torch.zeros(rows.k, d.shape[1], dtype=torch.float64).index_add_(0, rows.codes.cpu(), d.cpu())
    per /= torch.bincount(rows.codes.cpu(), minlength=rows.k).to(torch.float64)[:, None]
    counts = draws("counts", rows.k, s.n_bootstrap, s.seed)                  # [K, B]
    w = torch.cat([torch.ones(rows.k, 1, dtype=torch.float64), counts], 1)   # [K, 1 + B]
    vals = ((w.T @ per) / w.sum(0)[:, None]).norm(dim=1).numpy()
    lo, hi = percentile_interval(vals[1:], s.level)
    return Inference(float(vals[0]), lo, hi, float("nan"), rows.k), vals[1:]


@pytest.fixture
def toy_metric():
    kinds.register_kind("toy_shift", _mean_shift_norm)
    registry.register(MetricSpec("mean_shift_norm", "toy_shift", "norm of the mean token displacement", "model units",
                                 "|mean over clusters of the mean of c_i - r_i|", outputs=("", "_lo", "_hi"),
                                 label="mean shift", figures=("cell",)))
    yield "mean_shift_norm"
    registry.unregister("mean_shift_norm")
    kinds.unregister_kind("toy_shift")


def test_a_metric_added_through_the_registry_alone_reaches_report_cli_and_plots(toy_metric, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from driftlens.cli import build_parser
    from driftlens.testing import make_store

    store = make_store(tmp_path / "s.zarr", n_clusters=12)
    rep = dl.drift(str(store), metrics=("mmd", toy_metric), n_permutations=50, n_bootstrap=40, progress=False)
    for suffix in ("", "_lo", "_hi", "_boot"):
        assert f"{toy_metric}{suffix}" in rep.data_vars
    assert f"{toy_metric}_p" not in rep.data_vars and rep[toy_metric].attrs["units"] == "model units"
    # the report's cell equals the statistic computed here from the store's rows
    ds = dl.open_store(store)
    vis = ds.modality.values.astype(str) == "visual"
    r = ds.hidden.sel(checkpoint="base", layer=1).values[vis].astype(np.float64)
    c = ds.hidden.sel(checkpoint="shifted", layer=1).values[vis].astype(np.float64)
    cl = ds.cluster.values.astype(str)[vis]
    per = np.stack([(c - r)[cl == u].mean(0) for u in dict.fromkeys(cl)])
    got = float(rep[toy_metric].sel(checkpoint="shifted", layer=1, site="hidden", modality="visual"))
    assert got == pytest.approx(np.linalg.norm(per.mean(0)), rel=1e-5)
    assert float(rep[toy_metric].sel(checkpoint="base").max()) == 0.0          # the reference: 0 by definition
    # the CLI offers it
    choices = next(a.choices for a in build_parser()._subparsers._group_actions[0].choices["drift"]._actions
                   if "--metrics" in a.option_strings)
    assert toy_metric in choices
    # plot_report draws it (heatmap and lines by layer per site and modality)
    written = dl.plot.plot_report(rep, tmp_path / "fig", formats=("png",), variables=[toy_metric])
    names = {p.name for p in written}
    assert f"{toy_metric}_heatmap_hidden_visual.png" in names and f"{toy_metric}_by_layer_hidden_text.png" in names


def test_registering_refuses_clashing_names():
    with pytest.raises(ValueError, match="already registered"):
        registry.register(MetricSpec("mmd", "kernel", "x", "1", "x"))
    with pytest.raises(ValueError, match="ambiguous"):
        registry.register(MetricSpec("mmd_extra", "kernel", "x", "1", "x"))
    with pytest.raises(ValueError, match="built in"):
        registry.unregister("mmd")


@pytest.mark.parametrize("sigma", [0.7, (0.5, 2.0)])
@pytest.mark.parametrize("block", [2048, 7])
def test_the_differentiable_kernel_sums_against_a_naive_float64_formula(sigma, block):
    """``stats.kernels.kernel_sum`` / ``mmd2_unbiased`` (the anchor loss's, one implementation since the
    move) against the double loop of their definition, values and gradients, one and several blocks."""
    from driftlens.stats import kernels as K
    from driftlens.train import anchor

    assert anchor.kernel_sum is K.kernel_sum and anchor.mmd2_unbiased is K.mmd2_unbiased
    g = torch.Generator().manual_seed(int(block) + (7 if isinstance(sigma, tuple) else 0))
    x0 = torch.randn(23, 5, generator=g, dtype=torch.float64)
    y0 = torch.randn(17, 5, generator=g, dtype=torch.float64) + 0.3
    sigmas = sigma if isinstance(sigma, tuple) else (sigma,)

    def k(a, b):                                   # the kernel, one pair at a time
        d2 = ((a - b) ** 2).sum()
        return sum(torch.exp(-d2 / (2 * s**2)) for s in sigmas) / len(sigmas)

    def naive(x, y):
        m, n = len(x), len(y)
        xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
        yy = sum(k(y[a], y[b]) for a in range(n) for b in range(n) if a != b) / (n * (n - 1))
        xy = sum(k(x[i], y[a]) for i in range(m) for a in range(n)) / (m * n)
        cross = sum(k(x[i], y[a]) for i in range(m) for a in range(n))
        within = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
        return xx + yy - 2 * xy, cross + within

    out = []
    for fn in ("naive", "stats"):
        x, y = x0.clone().requires_grad_(True), y0.clone().requires_grad_(True)
        if fn == "naive":
            v, s = naive(x, y)
        else:
            v = K.mmd2_unbiased(x, y, sigma, block_size=block)
            s = K.kernel_sum(x, y, sigma, block_size=block) + K.kernel_sum(x, x, sigma, within=True, block_size=block)
        gx, gy = torch.autograd.grad(v + s, (x, y))
        out.append((v.detach(), s.detach(), gx, gy))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
