"""Cluster-level inference against brute-force references (float64 loops over clusters and rows)."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

from driftlens import inference as I
from driftlens import metrics as M
from driftlens.stats.crossmodal import gap_cell as _gap_cell
from driftlens.stats.crossmodal import mir_cell as _mir_cell
from driftlens.testing import ClusteredSpec, clustered_pair


def _data(k=7, t=5, d=3, shift=0.4, seed=0):
    spec = ClusteredSpec(n_clusters=k, tokens_per_cluster=t, dim=d)
    r, c, cl = clustered_pair(spec, shift=shift, seed=seed)
    # unequal cluster sizes: drop some rows
    keep = np.ones(len(cl), bool)
    keep[[1, 2, 7, 13]] = False
    return r[keep], c[keep], cl[keep]


def _kbar(a, b, sigma):
    d2 = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    return np.exp(-d2 / (2 * sigma ** 2)).mean()


def _brute_u(r, c, cl, sigma, weights=None):
    """sum over pairs of distinct draws (a, b) of <D_a, D_b> / number of pairs; weights = copies."""
    labels = list(dict.fromkeys(cl))
    w = np.ones(len(labels)) if weights is None else np.asarray(weights, float)
    num = den = 0.0
    for i, a in enumerate(labels):
        for j, b in enumerate(labels):
            if i == j:
                continue                                   # copies of one cluster are never paired
            ra, ca, rb, cb = r[cl == a], c[cl == a], r[cl == b], c[cl == b]
            h = _kbar(ra, rb, sigma) + _kbar(ca, cb, sigma) - _kbar(ra, cb, sigma) - _kbar(ca, rb, sigma)
            num += w[i] * w[j] * h
            den += w[i] * w[j]
    return num / den


def _h(r, c, cl, sigma, block_size=4096):
    codes, uniq = I.cluster_codes(cl)
    return I.paired_mmd_matrix(torch.as_tensor(r), torch.as_tensor(c), torch.as_tensor(codes), len(uniq), sigma,
                               block_size=block_size)


def test_cluster_codes_follow_first_appearance():
    codes, uniq = I.cluster_codes(np.array(["b", "b", "a", "c", "a"]))
    assert codes.tolist() == [0, 0, 1, 2, 1] and uniq.tolist() == ["b", "a", "c"]


def test_pair_term_matches_naive_kernel_means():
    r, c, cl = _data()
    _, uniq = I.cluster_codes(cl)
    for block in (4, 4096):                                   # tiles that cut clusters, and one tile
        got = _h(r, c, cl, 1.3, block_size=block)
        for i, a in enumerate(uniq):
            for j, b in enumerate(uniq):
                ra, ca, rb, cb = r[cl == a], c[cl == a], r[cl == b], c[cl == b]
                ref = _kbar(ra, rb, 1.3) + _kbar(ca, cb, 1.3) - _kbar(ra, cb, 1.3) - _kbar(ca, rb, 1.3)
                assert float(got[i, j]) == pytest.approx(ref, rel=1e-9, abs=1e-13)


@pytest.mark.parametrize("case", ["swapped rows", "far shift", "mixed"])
def test_pair_term_stays_finite_and_exact_for_large_drift(case):
    """Large moves (a token landing where another was, or 30 sigma away) use the direct kernel sum:
    no overflow of the near-reference form, same values as the definition."""
    rng = np.random.default_rng(11)
    r = rng.normal(size=(40, 3)) * 4
    cl = np.repeat(np.arange(8), 5)
    if case == "swapped rows":
        c = r[rng.permutation(40)]
    elif case == "far shift":
        c = r + 30.0
    else:
        c = r.copy()
        c[::2] += rng.normal(size=(20, 3)) * 6                    # half the rows move far, half stay
    got = _h(r, c, cl, 1.0, block_size=16)
    assert bool(torch.isfinite(got).all())
    _, uniq = I.cluster_codes(cl)
    for i, a in enumerate(uniq[:4]):
        for j, b in enumerate(uniq[:4]):
            ra, ca, rb, cb = r[cl == a], c[cl == a], r[cl == b], c[cl == b]
            ref = _kbar(ra, rb, 1.0) + _kbar(ca, cb, 1.0) - _kbar(ra, cb, 1.0) - _kbar(ca, rb, 1.0)
            assert float(got[i, j]) == pytest.approx(ref, rel=1e-7, abs=1e-12)


def test_pair_term_stays_exact_for_float_rounding_differences():
    """c = r + 1e-6 noise: the pair terms are ~|delta|^2 and still equal the float64 definition
    (a naive float32 evaluation would be dominated by the rounding of kernel values)."""
    rng = np.random.default_rng(7)
    r = rng.normal(size=(60, 8)) * 3
    c = r + 1e-6 * rng.normal(size=r.shape)
    cl = np.repeat(np.arange(6), 10)
    ref = _h(r, c, cl, 2.0)                                   # float64
    got = _h(r.astype(np.float32), c.astype(np.float32), cl, 2.0)
    delta32 = c.astype(np.float32).astype(np.float64) - r.astype(np.float32).astype(np.float64)
    ref32 = _h(r.astype(np.float32).astype(np.float64), r.astype(np.float32).astype(np.float64) + delta32, cl, 2.0)
    assert float(ref.abs().max()) < 1e-10
    np.testing.assert_allclose(got.numpy(), ref32.numpy(), rtol=1e-3, atol=1e-16)


def test_paired_mmd_effect_is_the_cluster_u_statistic():
    r, c, cl = _data(seed=3)
    res = I.paired_mmd(torch.as_tensor(r), torch.as_tensor(c), cl, sigma=1.1, n_permutations=50, n_bootstrap=50)
    assert res.effect == pytest.approx(_brute_u(r, c, cl, 1.1), rel=1e-9, abs=1e-12)
    assert res.n_clusters == 7
    # float32 input, median sigma: same value as float64 within float32 rounding
    sig = M.median_sigma(torch.as_tensor(r - r.mean(0)), pairs="reference")
    r32 = I.paired_mmd(torch.as_tensor(r, dtype=torch.float32), torch.as_tensor(c, dtype=torch.float32), cl,
                       n_permutations=10, n_bootstrap=10)
    assert r32.effect == pytest.approx(_brute_u(r, c, cl, sig), rel=1e-4, abs=1e-6)


def test_sign_flip_equals_swapping_whole_clusters():
    r, c, cl = _data(seed=4)
    h = _h(r, c, cl, 0.9)
    _, uniq = I.cluster_codes(cl)
    s = np.array([1, -1, -1, 1, 1, -1, 1], dtype=float)
    r2, c2 = r.copy(), c.copy()
    for a, sa in zip(uniq, s):
        if sa < 0:
            r2[cl == a], c2[cl == a] = c[cl == a], r[cl == a]
    got = float(I.quadratic_u(h, torch.as_tensor(s)[:, None], signs=True)[0])
    assert got == pytest.approx(_brute_u(r2, c2, cl, 0.9), rel=1e-9, abs=1e-12)


def test_bootstrap_draw_equals_the_u_statistic_of_the_resampled_clusters():
    r, c, cl = _data(seed=5)
    h = _h(r, c, cl, 0.9)
    w = np.array([2, 0, 1, 0, 3, 1, 0], dtype=float)          # 7 draws with replacement
    got = float(I.quadratic_u(h, torch.as_tensor(w)[:, None])[0])
    assert got == pytest.approx(_brute_u(r, c, cl, 0.9, weights=w), rel=1e-9, abs=1e-12)
    counts = I.bootstrap_counts(7, 500, seed=1)
    assert counts.shape == (7, 500) and bool((counts.sum(0) == 7).all())
    flips = I.sign_flips(7, 500, seed=1)
    assert set(flips.unique().tolist()) == {-1.0, 1.0}


def test_p_value_and_interval_conventions():
    assert I.p_value(np.array([0.1, 0.2, 0.3]), 0.5) == 0.25               # never 0
    assert I.p_value(np.array([0.1, 0.2, 0.3]), 0.2) == 0.75               # ties count
    lo, hi = I.percentile_interval(np.arange(1001.0), 0.9)
    assert (lo, hi) == pytest.approx((50.0, 950.0))
    with pytest.raises(ValueError, match="level"):
        I.percentile_interval(np.arange(3.0), 1.0)


def test_adjusted_p_values_match_references():
    rng = np.random.default_rng(0)
    p = rng.uniform(size=(3, 7)) ** 3
    p[1, 2] = np.nan
    ok = np.isfinite(p)
    bh = I.adjust_pvalues(p, "bh")
    np.testing.assert_allclose(bh[ok], scipy.stats.false_discovery_control(p[ok], method="bh"), rtol=1e-12)
    assert np.isnan(bh[1, 2])
    # Holm, written out: sorted p_(i) * (m - i + 1), running max, capped at 1
    flat = p[ok]
    order = np.argsort(flat)
    m = flat.size
    ref = np.empty(m)
    running = 0.0
    for rank, idx in enumerate(order):
        running = max(running, min(1.0, flat[idx] * (m - rank)))
        ref[idx] = running
    np.testing.assert_allclose(I.adjust_pvalues(p, "holm")[ok], ref, rtol=1e-12)
    with pytest.raises(ValueError, match="unknown correction"):
        I.adjust_pvalues(p, "bonf")


# float64 terms are summed over chunks of rows (inference.row_chunks): the default, and a chunk of
# one or a few rows, must both give the definition
CHUNKS = pytest.mark.parametrize("chunk_elements", [I.CHUNK_ELEMENTS, 7])


@CHUNKS
def test_paired_shift_matches_the_definition(chunk_elements, monkeypatch):
    monkeypatch.setattr(I, "CHUNK_ELEMENTS", chunk_elements)
    r, c, cl = _data(seed=6, shift=1.0)
    labels = list(dict.fromkeys(cl))
    num = np.mean([((c[cl == a] - r[cl == a]) ** 2).sum(1).mean() for a in labels])
    pairs = [((r[cl == a][:, None] - r[cl == b][None]) ** 2).sum(-1).mean()
             for a in labels for b in labels if a != b]
    eff, lo, hi = I.paired_shift(torch.as_tensor(r), torch.as_tensor(c), cl, n_bootstrap=200)
    assert eff == pytest.approx(np.sqrt(num / np.mean(pairs)), rel=1e-10)
    assert lo <= eff <= hi
    assert I.paired_shift(torch.as_tensor(r), torch.as_tensor(r), cl, n_bootstrap=20) == (0.0, 0.0, 0.0)


def _resampled(codes, w):
    return np.concatenate([np.flatnonzero(codes == a).repeat(1)[None].repeat(int(n), 0).ravel()
                           for a, n in enumerate(w) if n])


@CHUNKS
def test_gap_bootstrap_draw_is_the_gap_of_the_resampled_rows(chunk_elements, monkeypatch):
    monkeypatch.setattr(I, "CHUNK_ELEMENTS", chunk_elements)
    rng = np.random.default_rng(1)
    k = 6
    v = torch.as_tensor(rng.normal(size=(30, 4)) + 1.0)
    t = torch.as_tensor(rng.normal(size=(18, 4)))
    cv, ct = np.repeat(np.arange(k), 5), np.repeat(np.arange(k), 3)
    w = np.array([0, 2, 1, 0, 1, 2], dtype=float)
    value, lo, hi, draws = _gap_cell(v, t, torch.as_tensor(cv), torch.as_tensor(ct), k,
                                     torch.as_tensor(w)[:, None], 0.5)
    assert value == pytest.approx(M.modality_gap(v, t), rel=1e-12)
    ref = M.modality_gap(v[_resampled(cv, w)], t[_resampled(ct, w)])
    assert lo == pytest.approx(ref, rel=1e-12) and hi == pytest.approx(ref, rel=1e-12)
    assert draws.shape == (1,) and draws[0] == pytest.approx(ref, rel=1e-12)


def test_gap_names_a_zero_row_by_its_index_in_the_block(monkeypatch):
    monkeypatch.setattr(I, "CHUNK_ELEMENTS", 8)            # two rows per chunk: row 5 is in the third
    v, t = torch.ones(9, 4, dtype=torch.float64), torch.ones(6, 4, dtype=torch.float64)
    v[5] = 0.0
    codes = torch.zeros(9, dtype=torch.long)
    with pytest.raises(ValueError, match=r"visual tokens: 1 zero-norm row.*\[5\]"):
        _gap_cell(v, t, codes, codes[:6], 1, torch.ones(1, 3, dtype=torch.float64), 0.9)


def test_row_chunks_cover_the_block_in_order():
    assert I.row_chunks(5, 2**22) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    chunks = I.row_chunks(100_000, 4096)
    assert chunks[0] == (0, 1024) and chunks[-1][1] == 100_000
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
    assert I.row_chunks(0, 8) == []


def test_mir_bootstrap_draw_is_the_mir_of_the_resampled_rows():
    rng = np.random.default_rng(2)
    k, d = 8, 5

    def rows(n, scale, centre):  # norms spread evenly: no row is a 3-std outlier in any resample
        a = rng.normal(size=(n, d)) + centre
        return torch.as_tensor(a / np.linalg.norm(a, axis=1, keepdims=True) * np.linspace(0.9, 1.1, n)[:, None]
                               * scale)

    v, t = rows(40, 2.0, 1.0), rows(32, 1.0, 0.0)
    for a in (v, t):
        norms = a.norm(dim=1)
        assert float(((norms - norms.median()).abs() / norms.std()).max()) < 2.5
    cv, ct = np.repeat(np.arange(k), 5), np.repeat(np.arange(k), 4)
    w = np.array([1, 0, 2, 1, 0, 3, 1, 0], dtype=float)
    value, lo, hi, boot = _mir_cell(v, t, torch.as_tensor(cv), torch.as_tensor(ct), k,
                                    torch.as_tensor(w)[:, None], 0.5)
    assert value == pytest.approx(M.mir(v, t), rel=1e-12)
    ref = M.mir(v[_resampled(cv, w)], t[_resampled(ct, w)])
    assert boot[0] == pytest.approx(ref, rel=1e-4)        # eigenvalues of the draws in float32


def test_too_few_clusters_is_an_error():
    r = torch.randn(6, 2)
    with pytest.raises(ValueError, match="1 cluster"):
        I.paired_mmd(r, r + 1, ["a"] * 6)
    with pytest.raises(ValueError, match="labels for 6 rows"):
        I.paired_mmd(r, r + 1, ["a", "b"])


def test_per_cluster_terms_do_not_depend_on_the_thread_count():
    """A Dask worker runs with one torch thread, the driver with all: the float64 per-cluster terms
    must round the same way. (A one-hot matmul and ``mu @ mu.T`` did not: BLAS splits their long
    inner dimension by thread count, 1 ulp apart at this size.)"""
    g = torch.Generator().manual_seed(0)
    n, d, k = 2064, 1024, 86
    r = torch.randn(n, d, generator=g)
    c = r + 0.1 * torch.randn(n, d, generator=g)
    codes = torch.as_tensor(np.repeat(np.arange(k), n // k + 1)[:n])
    counts = torch.as_tensor(np.random.default_rng(0).multinomial(k, np.full(k, 1 / k), size=50).T,
                             dtype=torch.float64)
    before, out = torch.get_num_threads(), []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out.append((I.paired_shift_terms(r, c, codes, k), _gap_cell(r[:1000], r[1000:], codes[:1000],
                                                                        codes[1000:], k, counts, 0.9)))
    finally:
        torch.set_num_threads(before)
    (disp1, pair1), gap1 = out[0]
    (disp2, pair2), gap2 = out[1]
    assert torch.equal(disp1, disp2) and torch.equal(pair1, pair2) and gap1[:3] == gap2[:3]
    assert np.array_equal(gap1[3], gap2[3])
