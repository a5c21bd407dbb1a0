"""Token maps: 2-D UMAP pictures of one layer's visual and text tokens across checkpoints.

:func:`token_map_data` reads one layer of an activation store (only the chosen checkpoints and a
cluster subsample of the tokens), embeds it with umap-learn and returns the maps as an
:class:`xarray.Dataset` of ``x`` / ``y`` on (checkpoint, token); :func:`driftlens.plot.token_map` draws
them with matplotlib's object API (no pyplot: the figure is not registered with a GUI).

umap-learn is an optional dependency (``pip install umap-learn``); its numba code compiles on
the first fit of a process (tens of seconds), later fits of the same process take about a second.
"""
from __future__ import annotations

import os
import warnings
from contextlib import contextmanager

import numpy as np

from driftlens.errors import DataError, EnvironmentProblem, UsageError
from driftlens.select import as_labels, checkpoint_labels, cluster_unit, pick_checkpoints, pick_site, reference_of

METHODS = ("reference", "aligned")
CARRIED = ("sample", "group", "cluster", "position", "modality", "lang")

SMALL_DATA = 4096          # umap-learn's exact-neighbour threshold; larger maps use its NN-descent
_QUIET = (".*n_jobs value .* overridden.*", ".*Tensorflow not installed.*", ".*precomputed metric.*",
          ".*inverse_transform will be unavailable.*")


# ----------------------------------------------------------------------------------------- data

def token_map_data(ds, layer, *, checkpoints=None, site: str = "hidden", modalities=("visual", "text"),
                   max_clusters: int | None = None, max_tokens: int | None = 2000, method: str = "reference",
                   seed: int = 0, n_neighbors: int = 15, min_dist: float = 0.1, reference: str | None = None):
    """A 2-D UMAP map of one layer's tokens at several checkpoints, the checkpoints' maps aligned.

    Two ways to align the checkpoints' maps:

    ``"reference"`` (default)
        ``umap.UMAP`` is fitted on the reference checkpoint's tokens and every other checkpoint's
        tokens are placed into that map with ``UMAP.transform``. All checkpoints share one
        coordinate system, so a token whose vector drifted visibly moves away from where it was
        at the reference. ``transform`` places a point at a weighted average of the map
        positions of its nearest *reference* neighbours: a token that left the reference
        manifold (moved into a region where no reference token lives) lands next to the
        reference tokens nearest to it, not somewhere new -- such a token's displacement is a
        lower bound of its change, and tokens that drifted the same way collapse together. It
        is the default because there is one coordinate system to read and it is cheaper (one
        fit, then transforms).
    ``"aligned"``
        ``umap.AlignedUMAP`` with relations linking the same token at consecutive checkpoints:
        each checkpoint gets its own map, fitted on its own tokens (so new structure shows up),
        regularized towards its neighbours' maps in the order given. Coordinates of two
        checkpoints are comparable only as far as the regularization holds them together; it
        costs one fit per checkpoint plus the joint optimization (about 40 s for 3 x 2000 tokens
        on one core, against 7 s for ``"reference"``). numba's parallel loop runs on one thread
        during this call so that a seed gives the same maps.

    Distances are Euclidean. Below 4096 tokens they are computed exactly here and handed to UMAP
    as ``metric="precomputed"`` (umap-learn's own exact path calls its metric once per pair from
    Python, tens of seconds for 2000 tokens); from 4096 tokens UMAP's NN-descent finds the
    neighbours.

    Parameters
    ----------
    ds : xarray.Dataset or str or Path
        An activation store opened with :func:`driftlens.open_store` (or its path).
    layer : int or None
        The layer (a value of the store's ``layer`` coordinate, not a position). ``None`` for a
        site without layers (``embed``, ``final``).
    checkpoints : sequence of str, optional
        Checkpoints to map, in trajectory order (``"aligned"`` regularizes along this order);
        default every checkpoint of ``ds``.
    site : str
        The store variable: ``hidden`` (default), ``key``, ``query``, ``embed``, ``final``.
    modalities : sequence of str
        Token modalities to map (``visual``, ``text``).
    max_clusters : int, optional
        At most this many clusters.
    max_tokens : int or None
        At most this many tokens per checkpoint (None: no limit). Whole clusters are drawn in
        a random order (``numpy.random.default_rng(seed)``) and each one that still fits is
        kept, so the map shows every token of the clusters it shows and the same tokens at
        every checkpoint.
    method : {"reference", "aligned"}
        See above.
    seed : int
        Seed of the cluster draw and of UMAP (``random_state``; UMAP then runs single-threaded).
    n_neighbors, min_dist : int, float
        UMAP's parameters.
    reference : str, optional
        The reference checkpoint of ``"reference"``; default (:func:`driftlens.select.reference_of`)
        ``ds.attrs["reference"]`` when recorded (it must then be among ``checkpoints``), else the
        first of ``checkpoints``.

    Returns
    -------
    xarray.Dataset
        Variables ``x`` and ``y`` (checkpoint, token), float64 (NaN for a token UMAP left
        unconnected, which ``"aligned"`` can do); coordinates ``checkpoint``, ``token`` (the
        token's row in the store) and the store's ``sample``, ``group``, ``cluster``,
        ``position``, ``modality``, ``lang``. Attributes: ``site``, ``layer`` (absent for sites
        without layers), ``method``, ``reference`` (``"reference"`` only), ``modalities``,
        ``n_tokens`` and ``n_clusters`` (the sample per checkpoint), ``n_tokens_available`` and
        ``n_clusters_available`` (before subsampling), ``cluster_unit`` (the coordinate the
        clusters come from), ``seed``, ``n_neighbors``, ``min_dist`` and the store's
        ``model_type``, ``probe_set``, ``store_path`` when it has them.

    Raises
    ------
    driftlens.errors.UsageError
        An unknown site, layer, checkpoint, modality or method, a bad count, or too few tokens
        for ``n_neighbors``.
    driftlens.errors.EnvironmentProblem
        umap-learn is not installed.
    driftlens.errors.DataError
        The selected vectors hold NaN or infinite values.

    Examples
    --------
    >>> ds = driftlens.open_store("runs/activations.zarr")            # doctest: +SKIP
    >>> m = token_map_data(ds, 2, checkpoints=["base", "ko-5", "en-5"])  # doctest: +SKIP
    >>> dl.plot.token_map(m, color="modality")                          # doctest: +SKIP
    """
    import xarray as xr

    if isinstance(ds, (str, os.PathLike)):
        from driftlens.store import open_store

        ds = open_store(ds)
    if method not in METHODS:
        raise UsageError(f"method must be one of {METHODS}, got {method!r}")
    _check_count("n_neighbors", n_neighbors, 2)
    if max_tokens is not None:
        _check_count("max_tokens", max_tokens, 1)
    if max_clusters is not None:
        _check_count("max_clusters", max_clusters, 1)
    if not (isinstance(min_dist, (int, float, np.number)) and 0 <= float(min_dist)):
        raise UsageError(f"min_dist must be a number >= 0, got {min_dist!r}")

    da, layer_sel = _site_layer(ds, site, layer)
    labels = checkpoint_labels(ds)
    chosen = pick_checkpoints(labels, checkpoints, "the store")
    if len(set(chosen)) != len(chosen):
        raise UsageError(f"checkpoints lists a label twice: {chosen}")
    reference = reference_of(ds, reference, among=chosen, where="the map")

    tokens, n_avail, k_avail, unit = _choose_tokens(ds, modalities, max_clusters, max_tokens, seed)
    if tokens.size <= n_neighbors:
        raise UsageError(f"{tokens.size} token(s) selected, too few for a map with n_neighbors={n_neighbors}: "
                         f"UMAP needs more than n_neighbors tokens (raise max_tokens / max_clusters, add "
                         f"modalities, or lower n_neighbors)")

    # read only this (site, layer), these checkpoints and these tokens
    ci = [labels.index(c) for c in chosen]
    vec = np.asarray(da.isel(checkpoint=ci, token=tokens, **layer_sel).values, dtype=np.float32)
    bad = ~np.isfinite(vec).all(axis=-1)
    if bad.any():
        c, t = np.argwhere(bad)[0]
        raise DataError(f"{site}{'' if layer is None else f' layer {layer}'}: {int(bad.sum())} selected token "
                        f"vector(s) hold NaN or infinite values (first: checkpoint {chosen[c]!r}, token row "
                        f"{int(tokens[t])}); was the store captured in float16 with overflows?")

    umap = _umap()
    # umap-learn finds the neighbours of fewer than 4096 points exactly by calling its numba metric once
    # per pair from Python (tens of seconds for 2000 tokens); euclidean distances computed here and
    # passed as metric="precomputed" give the same neighbours in milliseconds
    exact = tokens.size < SMALL_DATA
    kwargs = {"n_neighbors": int(n_neighbors), "min_dist": float(min_dist), "random_state": int(seed),
              "metric": "precomputed" if exact else "euclidean"}
    prep = (lambda a, b: _distances(a, b)) if exact else (lambda a, b: a)
    with warnings.catch_warnings():
        for message in _QUIET:
            warnings.filterwarnings("ignore", message=message)
        if method == "reference":
            r = chosen.index(reference)
            model = umap.UMAP(n_jobs=1, **kwargs).fit(prep(vec[r], vec[r]))
            maps = [model.embedding_ if i == r else model.transform(prep(vec[i], vec[r]))
                    for i in range(len(chosen))]
        elif len(chosen) == 1:
            maps = [umap.UMAP(n_jobs=1, **kwargs).fit(prep(vec[0], vec[0])).embedding_]
        else:
            ident = {i: i for i in range(tokens.size)}
            with _numba_threads(1):
                aligned = umap.AlignedUMAP(transform_seed=int(seed), **kwargs).fit(
                    [prep(v, v) for v in vec], relations=[ident] * (len(chosen) - 1))
            maps = list(aligned.embeddings_)
    xy = np.stack([np.asarray(m, dtype=np.float64) for m in maps])        # (checkpoint, token, 2)

    coords = {"checkpoint": np.asarray(chosen), "token": tokens}
    for name in CARRIED:
        if name in ds.coords and ds[name].dims == ("token",):
            coords[name] = ("token", ds[name].values[tokens])
    attrs = {"site": site, "method": method, "modalities": [str(m) for m in modalities],
             "n_tokens": int(tokens.size), "n_clusters": int(len(np.unique(_units(ds, unit)[tokens]))),
             "n_tokens_available": int(n_avail), "n_clusters_available": int(k_avail), "cluster_unit": unit,
             "seed": int(seed), "n_neighbors": int(n_neighbors), "min_dist": float(min_dist)}
    if layer is not None:
        attrs["layer"] = int(layer)
    if method == "reference":
        attrs["reference"] = reference
    attrs.update({k: ds.attrs[k] for k in ("model_type", "probe_set", "store_path") if k in ds.attrs})
    dims = ("checkpoint", "token")
    x = xr.DataArray(xy[..., 0], dims=dims, attrs={"long_name": "UMAP 1"})
    y = xr.DataArray(xy[..., 1], dims=dims, attrs={"long_name": "UMAP 2"})
    return xr.Dataset({"x": x, "y": y}, coords=coords, attrs=attrs)


def _check_count(name, value, least) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
        raise UsageError(f"{name} must be an integer >= {least}, got {value!r}")


def _site_layer(ds, site, layer):
    da = ds[pick_site(ds, site)]
    if "layer" not in da.dims:
        if layer is not None:
            raise UsageError(f"site {site!r} has no layers (one vector per token); pass layer=None")
        return da, {}
    have = [int(v) for v in ds.layer.values]
    if layer is None or isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or int(layer) not in have:
        raise UsageError(f"layer {layer!r} is not in the store's {site!r}; it has layers {have}")
    return da, {"layer": have.index(int(layer))}


def _units(ds, unit) -> np.ndarray:
    return np.asarray(ds[unit].values).astype(str)


def _choose_tokens(ds, modalities, max_clusters, max_tokens, seed):
    """Rows of the tokens to map: whole clusters in a seeded random order until the caps are reached."""
    if "modality" not in ds.coords:
        raise UsageError("the store has no `modality` token coordinate")
    mods = as_labels(modalities, "modalities")
    have = sorted({str(m) for m in np.unique(ds.modality.values)})
    unknown = [m for m in mods if str(m) not in have]
    if unknown or not mods:
        raise UsageError(f"modality {unknown} not in the store; it has {have}" if unknown else
                         f"modalities is empty: give at least one of {have}")
    unit = cluster_unit(ds)
    keep = np.isin(np.asarray(ds.modality.values).astype(str), [str(m) for m in mods])
    units = _units(ds, unit)
    names, inverse, counts = np.unique(units[keep], return_inverse=True, return_counts=True)
    order = np.random.default_rng(seed).permutation(len(names))
    cap = np.inf if max_tokens is None else max_tokens
    taken, total = [], 0
    for k in order:
        if max_clusters is not None and len(taken) >= max_clusters:
            break
        if total + counts[k] <= cap:
            taken.append(k)
            total += counts[k]
    if not taken:
        raise UsageError(f"max_tokens={max_tokens} is smaller than every {unit} (the smallest has "
                         f"{counts.min()} selected tokens): raise max_tokens")
    rows = np.flatnonzero(keep)[np.isin(inverse.reshape(-1), taken)]
    return np.sort(rows), int(keep.sum()), len(names), unit


def _distances(a, b) -> np.ndarray:
    """Euclidean distances between the rows of ``a`` and ``b`` (float64, exact zeros kept)."""
    from scipy.spatial.distance import cdist

    return cdist(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))


def _umap():
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Tensorflow not installed.*")
            import umap
    except ImportError as exc:
        raise EnvironmentProblem(f"token maps need umap-learn ({exc}); install it: pip install umap-learn") from exc
    return umap


@contextmanager
def _numba_threads(n: int):
    """numba's thread count of this thread set to ``n`` for the block (numba's setting is per thread)."""
    try:
        import numba

        before = numba.get_num_threads()
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    except (ImportError, ValueError, RuntimeError):
        yield
        return
    try:
        yield
    finally:
        numba.set_num_threads(before)
