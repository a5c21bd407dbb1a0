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
