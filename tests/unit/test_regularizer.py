"""The anchor drift loss against float64 references: value, zero at the anchors, gradients, modes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import driftlens as dl
from driftlens.errors import UsageError
from driftlens.testing import make_report, make_store
from driftlens.train.anchor import (
    AnchorDriftLoss,
    kernel_sum,
    mmd2_unbiased,
    report_weights,
    stratified_rows,
    text_frame,
)


def naive_mmd2_u(x, y, sigma):
    """Unbiased MMD^2 by its definition, float64 loops over pairs (numpy)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)

    def k(a, b):
        return np.exp(-((a - b) ** 2).sum() / (2 * sigma ** 2))

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


@pytest.mark.parametrize("block", [1, 3, 64])
def test_mmd2_matches_the_definition(block):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 5, generator=g, dtype=torch.float64)
    y = torch.randn(7, 5, generator=g, dtype=torch.float64) + 0.7
    got = float(mmd2_unbiased(x, y, sigma=1.3, block_size=block))
    assert got == pytest.approx(naive_mmd2_u(x, y, 1.3), rel=1e-12, abs=1e-14)


def test_mmd2_matches_the_metrics_module_with_the_same_sigma():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 6, generator=g, dtype=torch.float64), torch.randn(30, 6, generator=g, dtype=torch.float64)
    assert float(mmd2_unbiased(x, y, 0.9)) == pytest.approx(float(dl.metrics.mmd2(x, y, sigma=0.9)), rel=1e-9)


def _anchors(seed=0, n=60, d=6, layers=(0, 1), text=False):
    g = torch.Generator().manual_seed(seed)
    a = {la: torch.randn(n, d, generator=g, dtype=torch.float64) for la in layers}
    t = {la: torch.randn(n, d, generator=g, dtype=torch.float64) * 2 + 3 for la in layers}
    return (a, t) if text else a


def test_zero_in_expectation_when_current_is_drawn_like_the_anchors():
    loss = AnchorDriftLoss(_anchors(n=200, layers=(0,)))
    vals = []
    for r in range(200):
        g = torch.Generator().manual_seed(1000 + r)
        vals.append(float(loss({0: torch.randn(30, 6, generator=g, dtype=torch.float64)})))
    vals = np.asarray(vals)
    se = vals.std(ddof=1) / np.sqrt(len(vals))
    assert abs(vals.mean()) < 4 * se, (vals.mean(), se)          # unbiased: no offset
    g = torch.Generator().manual_seed(7)
    moved = float(loss({0: torch.randn(30, 6, generator=g, dtype=torch.float64) + 1.0}))
    assert moved > vals.mean() + 10 * vals.std()


def test_gradient_matches_finite_differences_float64():
    a, t = _anchors(n=12, d=3, text=True)
    g = torch.Generator().manual_seed(3)
    for mode in ("fixed", "tracking"):
        loss = AnchorDriftLoss(a, mode=mode, anchor_text=t, block_size=4)       # several blocks: checkpointed
        x = {la: (torch.randn(7, 3, generator=g, dtype=torch.float64) + 0.5).requires_grad_() for la in (0, 1)}
        txt = {la: torch.randn(9, 3, generator=g, dtype=torch.float64) for la in (0, 1)}
        assert torch.autograd.gradcheck(lambda x0, x1, loss=loss, txt=txt: loss({0: x0, 1: x1}, txt), (x[0], x[1]),
                                        eps=1e-6, atol=1e-7, rtol=1e-5)


def test_loss_decreases_along_its_negative_gradient():
    loss = AnchorDriftLoss(_anchors(layers=(0,)), block_size=8)
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(25, 6, generator=g, dtype=torch.float64) + 1.5).requires_grad_()
    value = loss({0: x})
    (grad,) = torch.autograd.grad(value, x)
    value = value.detach()
    for step in (1e-2, 1e-1, 1.0):
        assert float(loss({0: x.detach() - step * grad})) < float(value)
    # many steps: the loss approaches its noise floor
    y = x.detach().clone().requires_grad_()
    opt = torch.optim.SGD([y], lr=20.0)
    for _ in range(200):
        opt.zero_grad()
        loss({0: y}).backward()
        opt.step()
    assert float(loss({0: y}).detach()) < 0.1 * float(value)


def test_tracking_ignores_a_shift_and_scale_of_the_whole_space_fixed_does_not():
    a, t = _anchors(n=80, text=True)
    fixed = AnchorDriftLoss(a, mode="fixed")
    track = AnchorDriftLoss(a, mode="tracking", anchor_text=t)
    shift = torch.linspace(-2, 3, 6, dtype=torch.float64)
    moved_v = {la: 2.5 * a[la] + shift for la in a}            # the LLM's space moved: visual and text alike
    moved_t = {la: 2.5 * t[la] + shift for la in t}
    assert float(track(moved_v, moved_t)) == pytest.approx(float(track(a, t)), abs=1e-12)
    g = torch.Generator().manual_seed(11)
    fresh = {la: torch.randn(80, 6, generator=g, dtype=torch.float64) for la in a}   # drawn like the anchors
    assert float(fixed(moved_v)) > 0.1 > 10 * abs(float(fixed(fresh)))
    # visual tokens that did not follow the text are drift in tracking mode
    assert float(track(a, moved_t)) > 0.1


def test_text_states_get_no_gradient_in_tracking_mode():
    a, t = _anchors(n=30, text=True)
    loss = AnchorDriftLoss(a, mode="tracking", anchor_text=t)
    x = {la: (a[la] + 0.3).requires_grad_() for la in a}
    txt = {la: t[la].clone().requires_grad_() for la in t}
    loss(x, txt).backward()
    assert all(txt[la].grad is None for la in txt) and all(x[la].grad is not None for la in x)


def test_blockwise_sums_equal_one_block():
    g = torch.Generator().manual_seed(9)
    x, y = torch.randn(50, 4, generator=g, dtype=torch.float64), torch.randn(33, 4, generator=g, dtype=torch.float64)
    for within, other in ((True, x), (False, y)):
        ref = kernel_sum(x, other, 0.3, within=within, block_size=10_000)
        assert float(kernel_sum(x, other, 0.3, within=within, block_size=7)) == pytest.approx(float(ref), rel=1e-13)


def test_weights_per_layer_and_logged_terms():
    a = _anchors()
    loss = AnchorDriftLoss(a, weights={0: 0.25, 1: 0.75})
    g = torch.Generator().manual_seed(2)
    x = {la: torch.randn(20, 6, generator=g, dtype=torch.float64) + la for la in a}
    total = float(loss(x))
    assert total == pytest.approx(0.25 * loss.last[0] + 0.75 * loss.last[1], rel=1e-12)
    assert set(loss.last) == {0, 1}


@pytest.mark.parametrize("kwargs, match", [
    ({"mode": "frozen"}, "mode"),
    ({"weights": {0: 1.0}}, "weights"),
    ({"weights": {0: 1.0, 1: -1.0}}, "weights"),
    ({"mode": "tracking"}, "anchor_text"),
    ({"block_size": 0}, "block_size"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(UsageError, match=match):
        AnchorDriftLoss(_anchors(), **kwargs)


def test_stratified_rows_cover_every_cluster_evenly():
    clusters = np.repeat(np.array([f"c{i}" for i in range(10)]), [3, 50, 50, 50, 50, 50, 50, 50, 50, 50])
    rows = stratified_rows(clusters, 40, seed=0)
    counts = {c: int((clusters[rows] == c).sum()) for c in np.unique(clusters)}
    assert len(rows) == 40 and len(set(rows.tolist())) == 40
    assert counts["c0"] == 3 and all(v in (4, 5) for c, v in counts.items() if c != "c0")
    assert np.array_equal(rows, stratified_rows(clusters, 40, seed=0))
    assert len(stratified_rows(clusters, 10_000)) == len(clusters)


def test_from_store_anchors_sigma_and_report_weights(tmp_path):
    store = make_store(tmp_path / "s.zarr", n_clusters=24, shift=4.0)
    ds = dl.open_store(store)
    loss = AnchorDriftLoss.from_store(ds, checkpoint="base", layers=[0, 2], n_anchors=48, mode="tracking")
    assert loss.layers == [0, 2] and loss.source["n_anchors"] == 48 and loss.source["n_clusters"] == 24
    vis = ds.hidden.sel(checkpoint="base", layer=0).values[ds.modality.values.astype(str) == "visual"]
    a = loss.anchors(0).numpy()
    txt = torch.as_tensor(ds.hidden.sel(checkpoint="base", layer=0).values[ds.modality.values.astype(str) == "text"])
    mean, scale = text_frame(txt)
    raw = a * float(scale) + mean.numpy()                      # back from the text frame
    assert all(np.isclose(vis, r, atol=1e-5).all(1).any() for r in raw)   # every anchor is a reference row
    assert loss.sigma[0] > 0 and np.isfinite(loss.sigma[0])
    # a batch of visual rows spread over the scenes, read at 'same' (checkpoint noise only) and at
    # 'shifted' (planted drift at layer 1 of hidden): only the planted layer's loss jumps
    vis_rows = np.flatnonzero(ds.modality.values.astype(str) == "visual")
    rows = vis_rows[stratified_rows(ds.cluster.values.astype(str)[vis_rows], 96, seed=1)]

    def batch(label):
        return {la: torch.as_tensor(ds.hidden.sel(checkpoint=label, layer=la).values[rows]) for la in (0, 1, 2)}

    on_planted = AnchorDriftLoss.from_store(ds, layers=[1], n_anchors=96)
    off_planted = AnchorDriftLoss.from_store(ds, layers=[0], n_anchors=96)
    jump = float(on_planted(batch("shifted"))) - float(on_planted(batch("same")))
    wobble = abs(float(off_planted(batch("shifted"))) - float(off_planted(batch("same"))))
    assert jump > 0.05 and jump > 20 * wobble, (jump, wobble)
    report = make_report(n_layers=3, checkpoints=("base", "ko-1", "ko-2", "en-1", "en-2"))   # two trajectories
    with pytest.raises(UsageError, match=r"say which checkpoint.*2 trajectories ko: \['ko-1', 'ko-2'\], en"):
        report_weights(report, [0, 1, 2])
    with pytest.raises(UsageError, match="say which checkpoint"):
        AnchorDriftLoss.from_store(ds, layers=[0, 1, 2], n_anchors=32, weights=report)
    w = report_weights(report, [0, 1, 2], checkpoint="ko-1")
    assert sum(w.values()) == pytest.approx(1.0) and all(v >= 0 for v in w.values())
    assert w != report_weights(report, [0, 1, 2], checkpoint="ko-2")
    weighted = AnchorDriftLoss.from_store(ds, layers=[0, 1, 2], n_anchors=32, weights=report,
                                          weights_checkpoint="ko-1")
    assert weighted.weights == pytest.approx(w)
    one = report.sel(checkpoint=["base", "ko-1", "ko-2"])                       # one trajectory: its last step
    assert report_weights(one, [0, 1, 2]) == report_weights(report, [0, 1, 2], checkpoint="ko-2")


def test_from_store_refusals(tmp_path):
    ds = dl.open_store(make_store(tmp_path / "s.zarr", n_clusters=4))
    with pytest.raises(UsageError, match="nope"):
        AnchorDriftLoss.from_store(ds, checkpoint="nope")
    with pytest.raises(UsageError, match="layers"):
        AnchorDriftLoss.from_store(ds, layers=[7])
    with pytest.raises(UsageError, match="n_anchors"):
        AnchorDriftLoss.from_store(ds, n_anchors=1)
    with pytest.raises(UsageError, match="site"):
        AnchorDriftLoss.from_store(ds, site="final")
