"""driftlens.metrics against independent references (float64 numpy formulas, alibi-detect, POT,
scipy) on fresh seeded random data."""
import math

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch

from driftlens import metrics as M
from driftlens.stats.common import subsample
from driftlens.stats.mmd import permutation_indicators


def _rng(seed):
    return np.random.default_rng(seed)


def _pair(seed, n=40, m=33, d=6, shift=0.3, dtype=np.float64):
    r = _rng(seed)
    x = r.normal(size=(n, d))
    y = r.normal(size=(m, d)) * 1.1 + shift
    return torch.from_numpy(x.astype(dtype)), torch.from_numpy(y.astype(dtype))


# ---------------------------------------------------------------- naive references (numpy float64)


def naive_sqd(a, b):
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)


def naive_kernel(a, b, sigmas):
    d2 = naive_sqd(a, b)
    return np.mean([np.exp(-d2 / (2 * s * s)) for s in sigmas], axis=0)


def naive_mmd2(x, y, sigmas):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n, m = len(x), len(y)
    kxx, kyy, kxy = naive_kernel(x, x, sigmas), naive_kernel(y, y, sigmas), naive_kernel(x, y, sigmas)
    np.fill_diagonal(kxx, 0)
    np.fill_diagonal(kyy, 0)
    return kxx.sum() / (n * (n - 1)) + kyy.sum() / (m * (m - 1)) - 2 * kxy.mean()


def naive_median_sigma(z):
    z = np.asarray(z, np.float64)
    iu = np.triu_indices(len(z), k=1)
    v = np.sort(naive_sqd(z, z)[iu])
    return math.sqrt(v[(len(v) - 1) // 2] / 2)  # lower median


def naive_frechet(a, b):
    mu1, mu2 = a.mean(0), b.mean(0)
    c1, c2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(c1 @ c2).real
    return ((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * np.trace(covmean)


# ---------------------------------------------------------------- mmd2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mmd2_matches_naive_single_sigma(seed):
    x, y = _pair(seed)
    s = float(_rng(seed + 100).uniform(1.0, 4.0))
    assert M.mmd2(x, y, sigma=s) == pytest.approx(naive_mmd2(x, y, [s]), rel=1e-10, abs=1e-13)


@pytest.mark.parametrize("seed", [3, 4])
def test_mmd2_multiple_sigmas_is_mean_of_kernels(seed):
    x, y = _pair(seed)
    sig = [0.7, 2.0, 5.5]
    val = M.mmd2(x, y, sigma=sig)
    assert val == pytest.approx(naive_mmd2(x, y, sig), rel=1e-10, abs=1e-13)


@pytest.mark.parametrize("block", [1, 5, 7, 16])
def test_mmd2_block_path_matches_naive(block):
    x, y = _pair(10 + block, n=37, m=29)
    s = 2.3
    ref = naive_mmd2(x, y, [s])
    assert M.mmd2(x, y, sigma=s, block_size=block) == pytest.approx(ref, rel=1e-10, abs=1e-13)


def test_mmd2_float32_close_to_float64_reference():
    x, y = _pair(20, n=200, m=150, d=32, dtype=np.float32)
    # large common offset: centring must keep float32 accurate
    x, y = x + 50.0, y + 50.0
    ref = naive_mmd2(x.double().numpy(), y.double().numpy(), [6.0])
    got = M.mmd2(x, y, sigma=6.0, block_size=64)
    assert got == pytest.approx(ref, rel=2e-4, abs=1e-6)


@pytest.mark.parametrize("seed", [5, 6])
def test_median_sigma_pooled_matches_naive(seed):
    x, y = _pair(seed)
    z = np.concatenate([x.numpy(), y.numpy()])
    s_ref = naive_median_sigma(z)
    val = M.mmd2(x, y)
    assert val == M.mmd2(x, y, sigma=M.median_sigma(x, y))
    assert val == pytest.approx(naive_mmd2(x, y, [s_ref]), rel=1e-9, abs=1e-13)
    assert M.median_sigma(x, y) == pytest.approx(s_ref, rel=1e-10)


def test_median_sigma_subsample_is_fixed_seed_and_close():
    x, y = _pair(7, n=1500, m=1500, d=8)
    full = M.median_sigma(x, y, max_points=None)
    a = M.median_sigma(x, y, max_points=500, seed=3)
    b = M.median_sigma(x, y, max_points=500, seed=3)
    assert a == b
    assert a == pytest.approx(full, rel=0.05)


def test_mmd2_autograd_matches_torch_reference():
    x, y = _pair(8, n=12, m=10, d=3)
    x1, y1 = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    v = M.mmd2_loss(x1, y1, sigma=1.5, block_size=4)
    assert float(v.detach()) == pytest.approx(M.mmd2(x, y, sigma=1.5, block_size=4), rel=1e-12)
    v.backward()
    x2, y2 = x.clone().requires_grad_(True), y.clone().requires_grad_(True)

    def k(a, b):
        return torch.exp(-torch.cdist(a, b) ** 2 / (2 * 1.5**2))

    n, m = 12, 10
    ref = ((k(x2, x2).sum() - n) / (n * (n - 1)) + (k(y2, y2).sum() - m) / (m * (m - 1))
           - 2 * k(x2, y2).mean())
    ref.backward()
    assert v.item() == pytest.approx(ref.item(), rel=1e-9)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(y1.grad, y2.grad, rtol=1e-7, atol=1e-10)


# ---------------------------------------------------------------- alibi-detect


def _alibi(x, sigma=None, n_permutations=20):
    pytest.importorskip("alibi_detect")
    from alibi_detect.cd import MMDDrift

    kw = {} if sigma is None else {"sigma": np.asarray(sigma, dtype=np.float64)}
    return MMDDrift(x.numpy(), backend="pytorch", n_permutations=n_permutations, device="cpu", **kw)


@pytest.mark.parametrize("seed", [11, 12])
def test_mmd2_matches_alibi_with_same_sigma(seed):
    x, y = _pair(seed, n=60, m=45, d=10)
    s = M.median_sigma(x, y)
    det = _alibi(x, sigma=[s])
    dist = det.predict(y.numpy(), return_distance=True)["data"]["distance"]
    assert M.mmd2(x, y, sigma=s) == pytest.approx(dist, rel=1e-6)
    # several sigmas: alibi averages the kernels too
    det2 = _alibi(x, sigma=[s / 2, s, 3 * s])
    dist2 = det2.predict(y.numpy(), return_distance=True)["data"]["distance"]
    assert M.mmd2(x, y, sigma=[s / 2, s, 3 * s]) == pytest.approx(dist2, rel=1e-6)


@pytest.mark.parametrize("n", [50, 51])
def test_reference_median_matches_alibi_inferred_sigma(n):
    x, y = _pair(13 + n, n=n, m=40, d=5)
    det = _alibi(x)  # sigma inferred from x_ref (configure_kernel_from_x_ref=True)
    alibi_sigma = float(det._detector.kernel.sigma.detach().reshape(-1)[0])
    ours = M.median_sigma(x, pairs="reference", max_points=None)
    assert ours == pytest.approx(alibi_sigma, rel=1e-6)
    dist = det.predict(y.numpy(), return_distance=True)["data"]["distance"]
    assert M.mmd2(x, y, median_pairs="reference") == pytest.approx(dist, rel=1e-5)


# ---------------------------------------------------------------- permutation test


@pytest.mark.parametrize("block", [None, 9])
def test_mmd_test_null_equals_naive_per_permutation(block):
    x, y = _pair(21, n=30, m=24, d=4, shift=0.4)
    B, seed = 60, 5
    kw = {} if block is None else {"block_size": block}
    res = M.mmd_test(x, y, n_permutations=B, seed=seed, **kw)
    s = res.sigma[0]
    assert res.statistic == M.mmd2(x, y, seed=seed, **kw)  # same code path, exactly
    assert res.statistic == pytest.approx(naive_mmd2(x, y, [s]), rel=1e-10)
    z = np.concatenate([x.numpy(), y.numpy()])
    ind = permutation_indicators(30, 24, B, seed).numpy()
    naive = np.array([naive_mmd2(z[ind[:, b]], z[~ind[:, b]], [s]) for b in range(B)])
    np.testing.assert_allclose(res.null, naive, rtol=1e-9, atol=1e-12)
    k = int((naive >= res.statistic).sum())
    assert res.p_value == pytest.approx((k + 1) / (B + 1))
    assert res.null_mean == pytest.approx(naive.mean())
    assert res.null_std == pytest.approx(naive.std(ddof=1))
    assert res.n_permutations == B


def test_mmd_test_permutations_are_distinct_and_balanced():
    ind = permutation_indicators(7, 5, 50, seed=1)
    assert ind.shape == (12, 50)
    assert (ind.sum(0) == 7).all()
    assert len({tuple(c) for c in ind.T.tolist()}) > 40


def test_mmd_test_float32_null_close_to_float64():
    x, y = _pair(22, n=80, m=70, d=16, dtype=np.float32)
    r32 = M.mmd_test(x, y, n_permutations=50, sigma=4.0)
    r64 = M.mmd_test(x.double(), y.double(), n_permutations=50, sigma=4.0)
    np.testing.assert_allclose(r32.null, r64.null, rtol=1e-3, atol=1e-6)
    assert r32.statistic == pytest.approx(r64.statistic, rel=1e-4, abs=1e-7)


# ---------------------------------------------------------------- sliced Wasserstein


@pytest.mark.parametrize("n,m,p", [(40, 40, 2), (40, 27, 2), (31, 50, 1), (20, 33, 3)])
def test_sliced_matches_pot_with_same_projections(n, m, p):
    ot = pytest.importorskip("ot")
    x, y = _pair(30 + n + m + p, n=n, m=m, d=5)
    proj = _rng(p).normal(size=(5, 17))
    proj /= np.linalg.norm(proj, axis=0, keepdims=True)
    ref = ot.sliced_wasserstein_distance(x.numpy(), y.numpy(), p=p, projections=proj)
    got = M.sliced_wasserstein(x, y, p=p, projections=torch.from_numpy(proj))
    assert got == pytest.approx(float(ref), rel=1e-9)


@pytest.mark.parametrize("n,m", [(25, 25), (25, 38)])
def test_sliced_1d_matches_scipy(n, m):
    r = _rng(n + m)
    x, y = r.normal(size=(n, 1)), r.exponential(size=(m, 1))
    got = M.sliced_wasserstein(torch.from_numpy(x), torch.from_numpy(y), p=1,
                               projections=np.ones((1, 1)))
    assert got == pytest.approx(scipy.stats.wasserstein_distance(x[:, 0], y[:, 0]), rel=1e-10)


def test_sliced_default_projections_are_seeded():
    x, y = _pair(40)
    a = M.sliced_wasserstein(x, y, n_projections=64, seed=3)
    assert a == M.sliced_wasserstein(x, y, n_projections=64, seed=3)
    assert a != M.sliced_wasserstein(x, y, n_projections=64, seed=4)
    assert M.sliced_wasserstein(x, x) == 0.0


# ---------------------------------------------------------------- Gaussian W2, Sinkhorn, POT


@pytest.mark.parametrize("seed", [50, 51])
def test_gaussian_w2_matches_scipy_sqrtm_and_pot(seed):
    ot = pytest.importorskip("ot")
    r = _rng(seed)
    x = r.normal(size=(80, 6)) @ r.normal(size=(6, 6))
    y = r.normal(size=(70, 6)) @ r.normal(size=(6, 6)) + 0.5
    ref = naive_frechet(x, y)
    got = M.gaussian_w2(torch.from_numpy(x), torch.from_numpy(y))
    assert got == pytest.approx(math.sqrt(ref), rel=1e-8)
    assert M.gaussian_w2(torch.from_numpy(x), torch.from_numpy(y), squared=True) == pytest.approx(ref, rel=1e-8)
    bw = ot.gaussian.bures_wasserstein_distance(x.mean(0), y.mean(0), np.cov(x, rowvar=False),
                                                np.cov(y, rowvar=False))
    assert got == pytest.approx(float(bw), rel=1e-6)


def test_gaussian_w2_translation_is_exact():
    x, _ = _pair(52, n=50, d=4)
    c = torch.tensor([0.3, -1.0, 2.0, 0.5], dtype=torch.float64)
    assert M.gaussian_w2(x, x + c) == pytest.approx(float(c.norm()), rel=1e-7)


def test_gaussian_w2_close_to_exact_ot_for_large_gaussian_samples():
    """Sanity: for big samples of 2-D Gaussians the closed form approaches the exact OT cost."""
    ot = pytest.importorskip("ot")
    r = _rng(53)
    x = r.normal(size=(600, 2))
    y = r.normal(size=(600, 2)) * np.array([2.0, 0.5]) + np.array([1.0, -1.0])
    emd = ot.emd2(np.full(600, 1 / 600), np.full(600, 1 / 600), ot.dist(x, y))  # W2^2
    g = M.gaussian_w2(torch.from_numpy(x), torch.from_numpy(y), squared=True)
    assert g == pytest.approx(emd, rel=0.1)


@pytest.mark.parametrize("seed", [60, 61])
def test_sinkhorn_small_blur_is_half_w2_squared(seed):
    ot = pytest.importorskip("ot")
    r = _rng(seed)
    x = r.normal(size=(30, 2))
    y = r.normal(size=(25, 2)) + np.array([2.0, 0.5])
    emd = ot.emd2(np.full(30, 1 / 30), np.full(25, 1 / 25), ot.dist(x, y))  # W2^2
    got = M.sinkhorn(torch.from_numpy(x), torch.from_numpy(y), blur=0.01)
    assert got == pytest.approx(emd / 2, rel=0.03)


def test_sinkhorn_subsamples_above_max_points_and_reports_it():
    x, y = _pair(62, n=300, m=200, d=3)
    val = M.sinkhorn(x, y, blur=0.1, max_points=100)
    assert math.isfinite(val)
    xs, ys = subsample(x, 100, 0), subsample(y, 100, 1)     # the documented fixed-seed subsample
    assert xs.shape[0] == ys.shape[0] == 100
    assert val == M.sinkhorn(xs, ys, blur=0.1, max_points=None)
    assert M.sinkhorn(x, y, blur=0.1, max_points=None) != val
    assert val == M.sinkhorn(x, y, blur=0.1, max_points=100)  # fixed seed
    assert M.sinkhorn(x, x, blur=0.1) == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------- cross-modal and paired


@pytest.mark.parametrize("seed", [70, 71])
def test_modality_gap_matches_liang_formula(seed):
    r = _rng(seed)
    v = r.normal(size=(30, 8)) + 1.0
    t = r.normal(size=(20, 8)) * 3
    vec = (v / np.linalg.norm(v, axis=1, keepdims=True)).mean(0) - (
        t / np.linalg.norm(t, axis=1, keepdims=True)).mean(0)
    dist = M.modality_gap(torch.from_numpy(v), torch.from_numpy(t))
    gap = M.modality_gap_vector(torch.from_numpy(v), torch.from_numpy(t))
    assert dist == pytest.approx(np.linalg.norm(vec), rel=1e-12)
    np.testing.assert_allclose(gap.numpy(), vec, rtol=1e-12, atol=1e-15)
    assert M.modality_gap(torch.from_numpy(v).float(), torch.from_numpy(t).float()) == pytest.approx(
        np.linalg.norm(vec), rel=1e-5)


def _naive_mir(v, t):
    scale = np.linalg.norm(t, axis=1).mean()
    out = []
    for a in (v / scale, t / scale):
        a = a.copy()
        norms = np.linalg.norm(a, axis=1)
        med = np.sort(norms)[(len(norms) - 1) // 2]  # torch.median: lower median
        bad = np.abs(norms - med) > 3 * norms.std(ddof=1)
        colmed = np.sort(a, axis=0)[(len(a) - 1) // 2]
        a[bad] = colmed
        out.append(a)
    return naive_frechet(*out)


@pytest.mark.parametrize("seed", [80, 81])
def test_mir_matches_naive_with_outliers(seed):
    r = _rng(seed)
    v = r.normal(size=(60, 5)) * 4 + 2
    t = r.normal(size=(44, 5))
    v[[3, 17]] *= 40  # outliers replaced by the per-dimension median
    t[5] *= 60
    ref = _naive_mir(v, t)
    got = M.mir(torch.from_numpy(v), torch.from_numpy(t))
    assert got == pytest.approx(ref, rel=1e-7)
    # the outlier rule matters here (checks it is not a no-op)
    scale = np.linalg.norm(t, axis=1).mean()
    assert abs(naive_frechet(v / scale, t / scale) - ref) > 0.1 * ref


def test_mir_total_is_log10_of_sum():
    assert M.mir_total([1.0, 2.5, 6.5]) == pytest.approx(1.0)
    assert M.mir_total(np.array([50.0, 50.0])) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="no per-layer"):
        M.mir_total([])
    with pytest.raises(ValueError, match="positive"):
        M.mir_total([0.0, 0.0])


def test_shift_matches_numpy():
    r = _rng(90)
    a = r.normal(size=(25, 7))
    b = a + r.normal(size=(25, 7)) * 0.3
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    res = M.shift(torch.from_numpy(a), torch.from_numpy(b))
    assert res.cosine == pytest.approx((1 - cos).mean(), rel=1e-12)
    assert res.l2 == pytest.approx(np.linalg.norm(a - b, axis=1).mean(), rel=1e-12)
    per = M.token_shift(torch.from_numpy(a), torch.from_numpy(b))
    np.testing.assert_allclose(per.cosine.numpy(), 1 - cos, rtol=1e-10, atol=1e-14)
    z = torch.zeros(2, 3, dtype=torch.float64)
    o = torch.tensor([[0.0, 0, 0], [1.0, 0, 0]], dtype=torch.float64)
    assert M.token_shift(z, o).cosine.tolist() == [0.0, 1.0]


# ---------------------------------------------------------------- degenerate input


TWO_SAMPLE = [
    lambda x, y: M.mmd2(x, y),
    lambda x, y: M.mmd_test(x, y, n_permutations=5),
    lambda x, y: M.gaussian_w2(x, y),
    lambda x, y: M.mir(x, y),
    lambda x, y: M.sinkhorn(x, y),
    lambda x, y: M.sliced_wasserstein(x, y),
    lambda x, y: M.modality_gap(x, y),
    lambda x, y: M.shift(x, y),
]


@pytest.mark.parametrize("fn", TWO_SAMPLE)
def test_nan_rows_are_named(fn):
    x, y = _pair(100, n=12, m=12)
    y = y.clone()
    y[[3, 7], 1] = float("nan")
    y[9, 0] = float("inf")
    with pytest.raises(ValueError, match=r"y|t|b") as e:
        fn(x, y)
    assert "3 row(s) with NaN/Inf, first at rows [3, 7, 9]" in str(e.value)


@pytest.mark.parametrize("fn", TWO_SAMPLE)
def test_mismatched_features(fn):
    x, _ = _pair(101, n=10, d=4)
    _, y = _pair(101, m=10, d=5)
    with pytest.raises(ValueError, match="feature sizes differ.*4 features.*5"):
        fn(x, y)


@pytest.mark.parametrize("fn", TWO_SAMPLE[:4])
def test_too_few_tokens(fn):
    x, y = _pair(102, n=10, m=1)
    with pytest.raises(ValueError, match="at least 2 rows"):
        fn(x, y)


def test_not_2d_and_paired_rows():
    with pytest.raises(ValueError, match="2-D"):
        M.mmd2(torch.zeros(5), torch.zeros(5))
    with pytest.raises(ValueError, match="same rows"):
        M.shift(torch.zeros(5, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="sigma must be finite and > 0"):
        M.mmd2(torch.randn(5, 2), torch.randn(5, 2), sigma=0.0)


def test_identical_points_defined_values():
    x = torch.ones(10, 3, dtype=torch.float64)
    y = torch.ones(8, 3, dtype=torch.float64)
    assert M.median_sigma(x, y) == 1.0 and M.mmd2(x, y) == 0.0
    res = M.mmd_test(x, y, n_permutations=30)
    assert res.statistic == 0.0 and res.p_value == 1.0
    assert M.gaussian_w2(x, y) == 0.0
    assert M.gaussian_w2(x, y + 2.0) == pytest.approx(math.sqrt(12.0))
    assert M.mir(x, y) == 0.0
    assert M.sliced_wasserstein(x, y) == 0.0
    assert M.modality_gap(x, y) == pytest.approx(0.0, abs=1e-15)


def test_median_fallback_when_most_pairs_coincide():
    x = torch.zeros(20, 2, dtype=torch.float64)
    x[0] = torch.tensor([3.0, 4.0])  # 19 of 190 pairs non-zero, all at d^2 = 25
    s = M.median_sigma(x, x[:2] * 0)  # pooled: median is 0 -> mean of non-zero d^2 = 25
    assert s == pytest.approx(math.sqrt(25 / 2))


def test_zero_norm_rows_in_modality_gap():
    v = torch.randn(6, 3, dtype=torch.float64)
    v[4] = 0
    with pytest.raises(ValueError, match=r"zero-norm row.*\[4\]"):
        M.modality_gap(v, torch.randn(5, 3, dtype=torch.float64))
