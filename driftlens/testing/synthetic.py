"""Synthetic data for tests, notebooks and benchmarks: clustered tokens with a known truth.

Tokens of one cluster share a random effect, as the tokens of one image and the images of one
scene do. Two checkpoints see the same latent tokens; each adds its own cluster-level and
token-level noise (so "no change" is a paired, exchangeable null, as two runs of one model
would be), and a changed checkpoint also moves every token by a fixed vector ``shift``. The
population MMD^2 between the two checkpoints' token distributions is then known in closed form
(:func:`true_mmd2`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ClusteredSpec:
    """Variances of the hierarchical model (per feature) and the sizes.

    ``x = u_a + e_ai`` (latent: cluster effect + token effect), observed at a checkpoint as
    ``x + v_a + eta_ai (+ shift)`` with fresh ``v`` (cluster) and ``eta`` (token) noise per checkpoint.
    """

    n_clusters: int = 48
    tokens_per_cluster: int = 16
    dim: int = 8
    cluster_var: float = 1.0       # u
    token_var: float = 0.15        # e
    checkpoint_cluster_var: float = 0.05   # v
    checkpoint_token_var: float = 0.05     # eta

    @property
    def total_var(self) -> float:
        """Total per-coordinate variance of a token."""
        return self.cluster_var + self.token_var + self.checkpoint_cluster_var + self.checkpoint_token_var

    @property
    def icc(self) -> float:
        """Share of a token's variance shared with the other tokens of its cluster (one checkpoint)."""
        return (self.cluster_var + self.checkpoint_cluster_var) / self.total_var


def clustered_pair(spec: ClusteredSpec, shift: float = 0.0, seed: int = 0):
    """Reference and checkpoint tokens of the same latent rows, and their cluster labels.

    Returns
    -------
    r, c : numpy float64 [K * T, dim]
    clusters : numpy str [K * T]
    """
    rng = np.random.default_rng(seed)
    k, t, d = spec.n_clusters, spec.tokens_per_cluster, spec.dim
    u = rng.normal(0, np.sqrt(spec.cluster_var), (k, 1, d))
    x = u + rng.normal(0, np.sqrt(spec.token_var), (k, t, d))

    def observe():
        v = rng.normal(0, np.sqrt(spec.checkpoint_cluster_var), (k, 1, d))
        return x + v + rng.normal(0, np.sqrt(spec.checkpoint_token_var), (k, t, d))

    r, c = observe(), observe()
    c = c + shift_vector(d, shift)
    clusters = np.repeat(np.array([f"c{a}" for a in range(k)]), t)
    return r.reshape(k * t, d), c.reshape(k * t, d), clusters


def shift_vector(dim: int, norm: float) -> np.ndarray:
    """The planted change: ``norm`` along the diagonal direction."""
    return np.full(dim, norm / np.sqrt(dim))


def true_mmd2(spec: ClusteredSpec, shift: float, sigma: float) -> float:
    """Population MMD^2 (Gaussian kernel, bandwidth ``sigma``) between the two checkpoints' tokens.

    Both are ``N(., s I)`` with ``s = spec.total_var``, means ``shift`` apart:
    ``2 (1 + 2 s / sigma^2)^(-d/2) (1 - exp(-shift^2 / (2 (sigma^2 + 2 s))))``.
    """
    s, d = spec.total_var, spec.dim
    c0 = (1.0 + 2.0 * s / sigma ** 2) ** (-d / 2.0)
    return float(2.0 * c0 * (1.0 - np.exp(-shift ** 2 / (2.0 * (sigma ** 2 + 2.0 * s)))))


def pvalue_calibration(pvalues, alpha: float = 0.05) -> dict:
    """KS test of uniformity and the rejection rate at ``alpha`` of a set of null p-values."""
    from scipy import stats

    p = np.asarray(pvalues, dtype=np.float64)
    return {"ks_p": float(stats.kstest(p, "uniform").pvalue), "rejection_rate": float(np.mean(p <= alpha)),
            "n": int(p.size)}


def make_report(n_layers: int = 6, checkpoints=("base", "step-100", "step-200"), seed: int = 0,
                model_type: str = "llava", family: str = "llava", loc: float = 0.0, scale: float = 3.0):
    """A drift report with the documented dims and variables, filled with random numbers.

    For tests of code that reads reports (rank schedules, plots): distributional metrics with
    ``""``, ``_lo``, ``_hi``, ``_p``, ``_q``; ``paired_shift`` with its interval; ``gap``
    (checkpoint, layer, site), ``mir`` (checkpoint, layer) and ``mir_total`` (checkpoint) with
    intervals. Effects are ``loc + scale * N(0, 1)``; intervals straddle them. Its store identity
    (``probe_fingerprint``, ``token_selection``) is that of :func:`make_store`'s stores.
    """
    import xarray as xr

    rng = np.random.default_rng(seed)
    C, L = len(checkpoints), n_layers
    coords = {"checkpoint": list(checkpoints), "layer": np.arange(L), "site": ["hidden", "key"],
              "modality": ["visual", "text"]}
    dims4 = ("checkpoint", "layer", "site", "modality")
    data = {}

    def with_interval(name, dims, shape, values):
        half = rng.uniform(0.1, 1.0, size=shape) * scale
        data[name] = (dims, values)
        data[name + "_lo"] = (dims, values - half)
        data[name + "_hi"] = (dims, values + half)

    for m in ("mmd", "sinkhorn", "sliced_w", "gauss_w2"):
        with_interval(m, dims4, (C, L, 2, 2), loc + scale * rng.normal(size=(C, L, 2, 2)))
        data[m + "_p"] = (dims4, rng.uniform(size=(C, L, 2, 2)))
        data[m + "_q"] = (dims4, np.minimum(1.0, data[m + "_p"][1] * 2))
    with_interval("paired_shift", dims4, (C, L, 2, 2), np.abs(rng.normal(size=(C, L, 2, 2))))
    with_interval("gap", ("checkpoint", "layer", "site"), (C, L, 2), rng.uniform(size=(C, L, 2)))
    with_interval("mir", ("checkpoint", "layer"), (C, L), rng.uniform(size=(C, L)))
    data["mir_total"] = (("checkpoint",), rng.uniform(size=C))
    return xr.Dataset(data, coords=coords, attrs={"reference": checkpoints[0], "model_type": model_type,
                                                  "family": family, "n_layers": L, "probe_set": "test",
                                                  "probe_fingerprint": "x", "token_selection": "all"})


def make_store(path, n_clusters: int = 24, renders: int = 2, n_visual: int = 6, n_text: int = 4,
               dim: int = 12, n_layers: int = 3, planted=((1, "hidden"),), shift: float = 1.5,
               final: bool = True, seed: int = 0):
    """A small activation store on disk with a known truth.

    ``n_clusters`` scenes, each rendered ``renders`` times (one probe per image, languages
    alternating), ``n_visual`` visual then ``n_text`` text tokens per probe. Per layer and site,
    token vectors follow :class:`ClusteredSpec`'s model; checkpoints: ``base``, ``same`` (fresh
    checkpoint noise only: no change) and ``shifted`` (also moved by ``shift`` along the
    diagonal at the visual tokens of the ``planted`` (layer, site) cells). With ``final`` the
    store also has the ``final`` site (a different vector per token, for MIR's last layer).

    Returns
    -------
    pathlib.Path, or a ``upath.UPath`` when ``path`` is an fsspec URL
    """
    from driftlens.store import ActivationStore

    rng = np.random.default_rng(seed)
    cols = {k: [] for k in ("sample", "group", "cluster", "position", "modality", "lang")}
    for a in range(n_clusters):
        for j in range(renders):
            lang = ("en", "ko")[(a + j) % 2]
            for pos in range(n_visual + n_text):
                cols["sample"].append(f"s{a}r{j}-{lang}")
                cols["group"].append(f"scene{a}#r{j}")
                cols["cluster"].append(f"scene{a}")
                cols["position"].append(pos)
                cols["modality"].append("visual" if pos < n_visual else "text")
                cols["lang"].append(lang)
    tok = {k: np.asarray(v) for k, v in cols.items()}
    n = len(tok["sample"])
    codes = np.unique(tok["cluster"], return_inverse=True)[1].reshape(-1)
    vis = tok["modality"] == "visual"
    sites = ["hidden", "key"] + (["final"] if final else [])
    meta = {"model_type": "llava", "family": "llava", "probe_set": "synthetic", "probe_fingerprint": "x",
            "n_layers": n_layers, "layers": list(range(n_layers)), "sites": sites,
            "dims": {s: dim for s in sites}, "dtype": "float32", "token_selection": "all"}
    store = ActivationStore(path, meta, tok)
    spec = ClusteredSpec(n_clusters=n_clusters, dim=dim)
    shape = {"hidden": (n_layers, n, dim), "key": (n_layers, n, dim), "final": (n, dim)}
    latent = {}
    for site in sites:          # cluster effect + token effect (+ an offset per modality)
        lead = shape[site][:-2]
        u = rng.normal(0, np.sqrt(spec.cluster_var), lead + (n_clusters, dim))[..., codes, :]
        latent[site] = u + rng.normal(0, np.sqrt(spec.token_var), shape[site]) + 2.0 * vis[:, None]
    for label in ("base", "same", "shifted"):
        i = store.slot(label)
        for site in sites:
            lead = shape[site][:-2]
            v = rng.normal(0, np.sqrt(spec.checkpoint_cluster_var), lead + (n_clusters, dim))[..., codes, :]
            x = latent[site] + v + rng.normal(0, np.sqrt(spec.checkpoint_token_var), shape[site])
            if label == "shifted":
                for layer, where in planted:
                    if where == site:
                        x[layer][vis] += shift_vector(dim, shift)
            store.write(site, i, 0, x.astype(np.float32))
        store.mark_complete(label)
    return store.path


@dataclass(frozen=True)
class RunsSpec:
    """Training runs of one design on one probe set: two checkpoints ``A`` and ``B`` drift from the reference.

    Per replicate the probe set is fixed: cluster effects ``u_a`` and a per-cluster susceptibility
    ``c_a ~ N(0, cluster_sd^2)`` (some scenes move more, in every run). Per run: the reference's tokens
    ``x = u_a + N(0, token_sd^2)``; checkpoint ``j`` moves cluster ``a``'s tokens by
    ``(sqrt(max(drift_j^2 + run_sd z_rj, 0)) + c_a + c_ja) v`` (``c_ja ~ N(0, checkpoint_cluster_sd^2)`` the
    checkpoint's own per-cluster susceptibility; the run effect acts on the squared drift, to which a small
    MMD^2 is proportional, so per-run contrasts are close to normal; ``v`` a fixed unit vector, ``z`` a run
    effect: standard normal,
    or Student t with ``run_df`` degrees of freedom scaled to unit variance) plus ``N(0, noise_sd^2)``.
    With ``drift_a == drift_b`` the two checkpoints drift equally in expectation over runs.
    """

    n_clusters: int = 48
    tokens_per_cluster: int = 2
    dim: int = 8
    token_sd: float = 0.5
    cluster_sd: float = 0.1
    noise_sd: float = 0.05
    checkpoint_cluster_sd: float = 0.03  # per-cluster susceptibility of one checkpoint only (A and B differ)
    drift_a: float = 1.0
    drift_b: float = 1.0
    run_sd: float = 0.6          # the run-to-run spread of a contrast: about 8x one run's interval half-width
    run_df: float | None = None
    n_boot: int = 200


def simulate_runs(spec: RunsSpec, n_runs: int, seed: int = 0, token_units: bool = False):
    """One replicate of :class:`RunsSpec`: per run, the paired cluster MMD^2 of ``base``, ``A``, ``B`` against
    ``base`` and its cluster-bootstrap draws, computed with the report's own cell code (the same cluster
    draws in every run, as a report's seed gives). ``token_units`` resamples tokens instead of clusters
    (the broken inference the calibration tests must reject).

    Returns
    -------
    effects : numpy [n_runs, 3]
    draws : numpy [n_runs, 3, n_boot]
    """
    import torch

    from driftlens import inference as I
    from driftlens import metrics as M

    rng = np.random.default_rng(seed)
    k, t, d = spec.n_clusters, spec.tokens_per_cluster, spec.dim
    u = rng.normal(0, 1.0, (k, 1, d))
    sus = rng.normal(0, spec.cluster_sd, (k, 1, 1))
    v = np.zeros(d)
    v[0] = 1.0
    units = np.arange(k * t) if token_units else np.repeat(np.arange(k), t)
    codes = torch.as_tensor(units)
    n_units = int(units.max()) + 1
    counts = I.bootstrap_counts(n_units, spec.n_boot, seed + 1)          # [K, B], shared by every run
    weights = torch.cat([torch.ones(n_units, 1, dtype=torch.float64), counts], 1)   # [K, 1 + B]
    effects, draws = np.zeros((n_runs, 3)), np.zeros((n_runs, 3, spec.n_boot))
    for run in range(n_runs):
        x = u + rng.normal(0, spec.token_sd, (k, t, d))
        ref = torch.as_tensor(x.reshape(k * t, d))
        sigma = M.median_sigma(ref, pairs="reference", seed=0)
        for j, drift in ((1, spec.drift_a), (2, spec.drift_b)):
            z = rng.normal() if spec.run_df is None else rng.standard_t(spec.run_df) / np.sqrt(
                spec.run_df / (spec.run_df - 2))
            own = rng.normal(0, spec.checkpoint_cluster_sd, (k, 1, 1))
            size = np.sqrt(max(drift ** 2 + spec.run_sd * z, 0.0))        # the run effect acts on drift^2
            moved = x + (size + sus + own) * v + rng.normal(0, spec.noise_sd, (k, t, d))
            h = I.paired_mmd_matrix(ref, torch.as_tensor(moved.reshape(k * t, d)), codes, n_units, sigma)
            q = I.quadratic_u(h, weights).numpy()
            effects[run, j], draws[run, j] = q[0], q[1:]
    return effects, draws



def simulate_contrasts(spec: RunsSpec, n: int, n_runs: int, seed0: int = 0, token_units: bool = False):
    """``n`` replicates of :func:`simulate_runs` (seeds ``seed0``, ``seed0 + 1``, ...) as the contrast ``A - B``.

    Returns
    -------
    contrasts : numpy [n, n_runs]
        Per replicate and run, the effect of ``A`` minus that of ``B``.
    draws : numpy [n, n_runs, n_boot]
        Their paired cluster-bootstrap draws' differences.
    """
    d, db = [], []
    for rep in range(n):
        e, b = simulate_runs(spec, n_runs, seed=seed0 + rep, token_units=token_units)
        d.append(e[:, 1] - e[:, 2])
        db.append(b[:, 1] - b[:, 2])
    return np.asarray(d), np.asarray(db)

def run_reports(spec: RunsSpec, n_runs: int, seed: int = 0, token_units: bool = False) -> dict:
    """:func:`simulate_runs` as per-run mini reports (checkpoints ``base``, ``A``, ``B``; variables ``mmd``
    and ``mmd_boot``), the shape :func:`driftlens.compare.combine_runs` takes.

    Returns
    -------
    dict run label -> xarray.Dataset
    """
    import xarray as xr

    effects, draws = simulate_runs(spec, n_runs, seed, token_units)
    return {f"run-{r}": xr.Dataset(
        {"mmd": (("checkpoint",), effects[r], {"units": "1"}),
         "mmd_boot": (("checkpoint", "draw"), draws[r], {"units": "1"})},
        coords={"checkpoint": ["base", "A", "B"]},
        attrs={"reference": "base", "probe_set": "runs-sim", "seed": seed, "n_bootstrap": spec.n_boot,
               "level": 0.95}) for r in range(n_runs)}
