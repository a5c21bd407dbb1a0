"""Linear probes: how decodable a label is from the stored vectors, per (checkpoint, layer).

Drift metrics say *how much* the visual tokens moved; a probe says whether what they encode
(a scene's color, shape, position, ...) is still there, and whether it is still *where it was*:

- ``accuracy``: a logistic-regression probe trained and tested at the same checkpoint
  (cross-validated) -- is the label linearly decodable at this checkpoint?
- ``transfer``: the probe trained at the reference checkpoint, applied unchanged to this
  checkpoint's rows -- is it decodable *the same way* as at the reference? Accuracy that stays
  high while transfer falls means the information survived but its code was rewritten.
- ``shuffled``: the same procedure with labels permuted between clusters -- the floor a real
  accuracy has to clear. A permutation of a few dozen clusters keeps some chance association with
  the true labels, so for a label the tokens decode well one shuffle can sit well above chance
  (0.46 for position, chance 0.25, was seen on the organism); the mean over ``n_shuffles`` is
  steadier. The permutations depend only on ``seed``.

Rows and folds. With ``pool="image"`` a row is one probe (one image + prompt: one ``sample``
value), its features the mean of its selected tokens; with ``pool="token"`` every selected token
is a row. Rows are split into folds by the store's ``cluster`` coordinate (scikit-learn's
``StratifiedGroupKFold``): no cluster -- the unit of statistical independence, e.g. every render
and caption of one scene -- has rows on both sides of a split, so a probe cannot score by
recognising a scene it saw in training. The same folds serve every checkpoint, layer, shuffle
and the transfer probe, so differences between cells are paired.

Features are standardized (``StandardScaler`` fitted on the training rows of the fold), then an
L2-regularised multinomial logistic regression (``C``) is fitted. The transfer probe's scaler is
the reference's: a checkpoint whose features merely moved or rescaled as a whole already loses
transfer accuracy, as a probe (or a head) frozen at the reference would.

``transfer_rescaled`` applies the reference probe's weights after standardizing the checkpoint's
rows with their own statistics, which separates a global translation / rescaling (a drift metric
sees it, a re-standardized probe does not) from a re-encoding of the label.

The store is read one (checkpoint, layer) block at a time (``ds[site].isel(...).values``).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from driftlens.errors import DataError, UsageError, check_count
from driftlens.select import checkpoint_labels, pick_checkpoints, pick_layers, pick_site, reference_of

if TYPE_CHECKING:
    import xarray as xr
    from scipy import sparse

Pool = Literal["image", "token"]
ProbeRows = Literal["visual", "text", "all"]
LabelSpec = str | Callable[[str], Any] | Mapping[Any, Any] | Sequence[Any] | np.ndarray

POOLS: tuple[str, ...] = ("image", "token")
MODALITIES: tuple[str, ...] = ("visual", "text", "all")
MAX_ITER = 1000
#: Newton-CG: a few exact-curvature steps on these small, often separable problems, where L-BFGS
#: takes ten times more iterations; it never forms the (features x classes)^2 Hessian
SOLVER = "newton-cg"


# ----------------------------------------------------------------------------- labels


def _is_missing(value: Any) -> bool:
    """None or a float NaN: the token has no label and is left out."""
    if value is None:
        return True
    try:
        return bool(isinstance(value, float | np.floating) and np.isnan(value))
    except TypeError:  # pragma: no cover - exotic scalar types
        return False


def _token_coord(ds: xr.Dataset, name: str, what: str) -> np.ndarray:
    """Values of the per-token coordinate ``name`` (a clear error when the store lacks it)."""
    if name not in ds.coords or ds[name].dims != ("token",):
        have = sorted(str(c) for c in ds.coords if ds[c].dims == ("token",))
        raise UsageError(f"{what} {name!r} is not a per-token coordinate of the store; it has {have}")
    values = np.asarray(ds[name].values)
    return values.astype(str) if values.dtype.kind in "SUO" else values


def token_labels(ds: xr.Dataset, label: LabelSpec, *, label_from: str = "group") -> np.ndarray:
    """One label per token of ``ds`` (``None`` where a token has none).

    Parameters
    ----------
    ds : xarray.Dataset
        An activation store opened by :func:`driftlens.open_store` (or any Dataset with a
        ``token`` dim and per-token coordinates).
    label : str, callable, mapping or array-like
        - ``str``: the name of a per-token coordinate of ``ds`` (``"group"``, ``"lang"``, ...);
          its values are the labels.
        - callable: applied to each token's ``label_from`` value (by default its ``group`` string,
          e.g. ``'red-circle-top-right#r1'``; with ``label_from="sample"`` its probe id), once per
          distinct value. It may return ``None`` to leave tokens out.
          :func:`driftlens.organism.labels.world_label` makes one for the organism's world.
        - mapping: ``label_from`` value -> label; every value must be a key (use ``None`` values
          to leave tokens out).
        - array-like: one label per token of ``ds``, in token order.
    label_from : str
        The per-token coordinate a callable or mapping is applied to.

    Returns
    -------
    numpy.ndarray
        Object array of length ``ds.sizes["token"]``; ``None`` (or NaN) marks tokens without a label.
    """
    n = int(ds.sizes["token"])
    if isinstance(label, str):
        values = _token_coord(ds, label, "label coordinate")
        return np.asarray(values, dtype=object)
    if callable(label):
        keys = _token_coord(ds, label_from, "label_from")
        uniq, inv = np.unique(keys, return_inverse=True)
        mapped = np.empty(len(uniq), dtype=object)
        for i, k in enumerate(uniq):
            mapped[i] = label(k.item() if hasattr(k, "item") else k)
        return mapped[inv.reshape(-1)]
    if isinstance(label, Mapping):
        keys = _token_coord(ds, label_from, "label_from")
        uniq, inv = np.unique(keys, return_inverse=True)
        missing = [k for k in uniq.tolist() if k not in label]
        if missing:
            raise DataError(f"the label mapping has no entry for {len(missing)} `{label_from}` value(s) of the "
                            f"store, e.g. {missing[:3]}; map them to None to leave their tokens out")
        mapped = np.empty(len(uniq), dtype=object)
        for i, k in enumerate(uniq.tolist()):
            mapped[i] = label[k]
        return mapped[inv.reshape(-1)]
    arr = np.asarray(label, dtype=object)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise UsageError(f"a label array must hold one label per token: the store has {n} tokens, the array has "
                         f"shape {arr.shape}")
    return arr


def _label_name(label: LabelSpec, label_from: str) -> str:
    if isinstance(label, str):
        return label
    if callable(label):
        return f"{getattr(label, '__name__', type(label).__name__)}({label_from})"
    if isinstance(label, Mapping):
        return f"mapping({label_from})"
    return "array"


# ----------------------------------------------------------------------------- folds and shuffles


def cluster_folds(y: np.ndarray, clusters: np.ndarray, n_splits: int = 5,
                  seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Cross-validation folds that keep every cluster on one side of each split.

    ``StratifiedGroupKFold`` (shuffled with ``seed``): each fold's test rows are whole clusters,
    and class proportions are kept close to the overall ones as far as whole clusters allow.

    Parameters
    ----------
    y : numpy.ndarray
        Label (any hashable values) of each row.
    clusters : numpy.ndarray
        Cluster of each row (the unit of independence).
    n_splits : int
        Number of folds, at least 2 and at most the number of clusters.
    seed : int
        Seed of the assignment of clusters to folds.

    Returns
    -------
    list of (train, test)
        Sorted integer row indices; every row is in exactly one test set.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    y = np.asarray(y)
    clusters = np.asarray(clusters)
    if y.shape != clusters.shape or y.ndim != 1:
        raise UsageError(f"y and clusters must be 1-d arrays of one length, got shapes {y.shape} and {clusters.shape}")
    if int(n_splits) < 2:
        raise UsageError(f"n_splits must be >= 2, got {n_splits}")
    k = len(np.unique(clusters))
    if k < n_splits:
        raise UsageError(f"n_splits={n_splits} folds need at least {n_splits} clusters, the rows have {k}; "
                         f"lower n_splits or add probes of more clusters")
    codes = np.unique(y.astype(str), return_inverse=True)[1].reshape(-1)
    splitter = StratifiedGroupKFold(n_splits=int(n_splits), shuffle=True, random_state=int(seed))
    with warnings.catch_warnings():      # "least populated class ... less than n_splits": reported by probe()
        warnings.simplefilter("ignore", UserWarning)
        folds = [(np.sort(tr), np.sort(te)) for tr, te in splitter.split(np.zeros((len(y), 1)), codes, clusters)]
    check_cluster_folds(folds, clusters)
    return folds


def check_cluster_folds(folds: Sequence[tuple[np.ndarray, np.ndarray]], clusters: np.ndarray) -> None:
    """Raise :class:`~driftlens.errors.DataError` when a split puts one cluster on both sides.

    Parameters
    ----------
    folds : sequence of (train, test)
        Row indices of each split.
    clusters : numpy.ndarray
        Cluster of each row.
    """
    clusters = np.asarray(clusters)
    for i, (tr, te) in enumerate(folds):
        both = np.intersect1d(clusters[np.asarray(tr)], clusters[np.asarray(te)])
        if both.size:
            raise DataError(f"fold {i} puts {both.size} cluster(s) on both sides of the split, e.g. "
                            f"{both[:3].tolist()}: its test accuracy would count recognising a seen cluster")


def shuffle_by_cluster(y: np.ndarray, clusters: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Labels permuted between clusters (a null labelling with the clustering kept).

    Clusters are permuted at random and each cluster takes the labels of its image under the
    permutation: when labels are constant within clusters this is exactly a permutation of the
    cluster labels (class counts of clusters are kept). A cluster of another size takes its
    source's labels in random order, repeated or cut to its own size.

    Parameters
    ----------
    y : numpy.ndarray
        Label of each row.
    clusters : numpy.ndarray
        Cluster of each row.
    rng : numpy.random.Generator
        Source of the permutation.

    Returns
    -------
    numpy.ndarray
        Permuted labels, same shape and dtype as ``y``.
    """
    y = np.asarray(y)
    inv = np.unique(np.asarray(clusters), return_inverse=True)[1].reshape(-1)
    order = np.argsort(inv, kind="stable")
    members = np.split(order, np.cumsum(np.bincount(inv))[:-1])
    perm = rng.permutation(len(members))
    out = np.empty_like(y)
    for a, rows in enumerate(members):
        src = y[members[perm[a]]]
        if len(src) == len(rows):
            out[rows] = src
        else:
            out[rows] = np.resize(rng.permutation(src), len(rows))
    return out


# ----------------------------------------------------------------------------- the probe


class _Classifier:
    """A fitted probe: standardization (mean, scale) and a linear classifier over class codes."""

    def __init__(self, mean: np.ndarray, scale: np.ndarray, coef: np.ndarray | None, intercept: np.ndarray | None,
                 classes: np.ndarray):
        self.mean, self.scale, self.coef, self.intercept, self.classes = mean, scale, coef, intercept, classes

    def predict(self, x: np.ndarray, mean: np.ndarray | None = None, scale: np.ndarray | None = None) -> np.ndarray:
        """Class codes of ``x``, standardized by the probe's own (or the given) mean and scale."""
        if self.coef is None:                       # a training fold with a single class
            return np.full(x.shape[0], self.classes[0])
        z = ((x - (self.mean if mean is None else mean)) / (self.scale if scale is None else scale)) @ self.coef.T
        z += self.intercept
        idx = (z[:, 0] > 0).astype(np.int64) if z.shape[1] == 1 else z.argmax(axis=1)
        return self.classes[idx]


def _standardizer(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation per feature (1 where a feature is constant), as StandardScaler."""
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale <= 10 * np.finfo(np.float64).eps * np.maximum(1.0, np.abs(mean))] = 1.0
    return mean, scale


def _fit(x: np.ndarray, y: np.ndarray, C: float, counter: list[int]) -> _Classifier:
    """Standardize, then fit an L2 logistic regression; the probe of one training fold."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    mean, scale = _standardizer(x)
    classes = np.unique(y)
    if classes.size == 1:
        return _Classifier(mean, scale, None, None, classes)
    model = LogisticRegression(C=C, solver=SOLVER, max_iter=MAX_ITER)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit((x - mean) / scale, y)
    counter[0] += sum(issubclass(w.category, ConvergenceWarning) for w in caught)
    return _Classifier(mean, scale, model.coef_, model.intercept_, model.classes_)


def _score(model: _Classifier, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(model.predict(x) == y))


def _score_rescaled(model: _Classifier, x_train: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    """``model``'s classifier on ``x`` standardized by ``x_train``'s own mean and SD (not the model's)."""
    mean, scale = _standardizer(x_train)
    return float(np.mean(model.predict(x, mean, scale) == y))


def _sd(values: np.ndarray, axis: int = -1) -> np.ndarray:
    n = values.shape[axis]
    if n < 2:
        return np.full(np.delete(values.shape, axis % values.ndim), np.nan)
    return values.std(axis=axis, ddof=1)


def _rows(ds: xr.Dataset, labels: np.ndarray, modality: str, pool: str,
          cluster: str) -> tuple[np.ndarray, sparse.csr_matrix | None, np.ndarray, np.ndarray, np.ndarray]:
    """Token indices, pooling matrix (rows x tokens, or None), row labels, row clusters, row ids."""
    from scipy import sparse

    keep = np.array([not _is_missing(v) for v in labels], dtype=bool)
    if modality != "all":
        if "modality" not in ds.coords:
            raise DataError(f"the store has no `modality` coordinate, so modality={modality!r} cannot select "
                            f"tokens; use modality='all'")
        keep &= np.asarray(ds["modality"].values).astype(str) == modality
    index = np.flatnonzero(keep)
    if index.size == 0:
        raise DataError(f"no token has both modality {modality!r} and a label")
    lab = np.asarray([str(v) for v in labels[index]])
    clus = _token_coord(ds, cluster, "cluster coordinate").astype(str)[index]
    if pool == "token":
        return index, None, lab, clus, index.astype(str)
    sample = _token_coord(ds, "sample", "pooling coordinate").astype(str)[index]
    ids, first, inv = np.unique(sample, return_index=True, return_inverse=True)   # first: a token of each sample
    inv = inv.reshape(-1)
    for what, vals in (("label", lab), (cluster, clus)):
        bad = np.flatnonzero(vals != vals[first][inv])
        if bad.size:
            s = ids[inv[bad[0]]]
            seen = sorted(set(vals[inv == inv[bad[0]]].tolist()))
            raise DataError(f"pool='image' needs one {what} per sample, but sample {s!r} has tokens with {what}s "
                            f"{seen[:4]}; use pool='token' (or a label constant over a probe's tokens)")
    counts = np.bincount(inv, minlength=len(ids)).astype(np.float64)
    weights = 1.0 / counts[inv]
    pool_matrix = sparse.csr_matrix((weights, (inv, np.arange(len(inv)))), shape=(len(ids), index.size))
    return index, pool_matrix, lab[first], clus[first], ids


def linear_probe(ds: xr.Dataset, label: LabelSpec, *, label_from: str = "group", label_name: str | None = None,
          site: str = "hidden", modality: ProbeRows = "visual", layers: Sequence[int] | None = None,
          checkpoints: Sequence[str] | None = None, reference: str | None = None, pool: Pool = "image",
          cluster: str = "cluster", n_splits: int = 5, n_shuffles: int = 3, seed: int = 0, C: float = 1.0,
          max_rows: int | None = None, progress: bool | None = None) -> xr.Dataset:
    """Cross-validated linear-probe accuracy of a label, per (checkpoint, layer), with baselines.

    Parameters
    ----------
    ds : xarray.Dataset
        The activation store (:func:`driftlens.open_store`): dims ``checkpoint``, ``layer``,
        ``token``; per-token coordinates ``sample``, ``cluster``, ``modality`` and those a label uses.
    label : str, callable, mapping or array-like
        What to decode, resolved per token by :func:`token_labels`: the name of a per-token
        coordinate (``"lang"``, ``"group"``), a callable applied to each token's ``label_from``
        value (its ``group`` string by default, e.g.
        ``driftlens.organism.labels.world_label("color")``), a mapping of ``label_from`` values to
        labels, or one label per token. Tokens whose label is ``None`` are left out.
    label_from : str
        The per-token coordinate a callable or mapping label is applied to (``"group"`` or ``"sample"``).
    label_name : str, optional
        Name of the label in the output's attributes (default: the coordinate's name, or
        ``"<function name>(<label_from>)"``).
    site : str
        The store variable probed: ``"hidden"``, ``"key"``, ``"query"`` (per layer) or ``"embed"``,
        ``"final"`` (one per checkpoint: the output then has no ``layer`` dim).
    modality : {"visual", "text", "all"}
        Tokens probed (by the ``modality`` coordinate).
    layers : sequence of int, optional
        Layer values (not positions) to probe; default every layer of the store.
    checkpoints : sequence of str, optional
        Checkpoint labels to probe, in the output's order; default every checkpoint of ``ds``.
    reference : str, optional
        Checkpoint the transfer probe is trained on (it need not be among ``checkpoints``);
        default (:func:`driftlens.select.reference_of`) ``ds.attrs["reference"]`` when recorded (it
        must then be a checkpoint of ``ds``), else the first checkpoint of ``ds``.
    pool : {"image", "token"}
        ``"image"``: one row per sample (one probe's image + prompt), the mean of its selected
        tokens; every token of a sample must share the label and the cluster (probes of one
        image with different prompts are separate rows -- in a causal decoder whose image comes
        first their visual rows are identical -- and stay together, being of one cluster).
        ``"token"``: every selected token is a row.
    cluster : str
        The per-token coordinate whose values are the units of independence; folds and shuffles
        keep its values whole.
    n_splits : int
        Cross-validation folds (``StratifiedGroupKFold`` over clusters); at least 2, at most the
        number of clusters among the rows.
    n_shuffles : int
        Label permutations for the ``shuffled`` baseline (0: no baseline, its variables are NaN).
    seed : int
        Seeds the folds, the shuffles and the ``max_rows`` subset; the result is deterministic
        for a given seed.
    C : float
        Inverse L2 regularisation strength of the logistic regression (on standardized features).
    max_rows : int, optional
        Use at most this many rows, a random subset (the same at every cell), to bound the cost of
        ``pool="token"`` on large stores.
    progress : bool, optional
        tqdm bar over the cells: ``True`` always, ``False`` never, ``None`` (default) only when the
        run lasts longer than two seconds.

    Returns
    -------
    xarray.Dataset
        Dims ``checkpoint``, ``layer`` (absent for ``embed`` / ``final``), ``fold``, ``class``.
        Variables: ``accuracy``, ``accuracy_sd``, ``accuracy_fold`` (within-checkpoint probe),
        ``transfer``, ``transfer_sd``, ``transfer_fold`` (reference probe on this checkpoint's
        held-out rows), ``transfer_rescaled`` (the same with the checkpoint's rows standardized
        by their own training rows), ``shuffled``, ``shuffled_sd`` (cluster-permuted labels), ``chance``
        (majority-class share of the rows, 0-d), ``class_rows`` (rows per class), each with
        ``long_name``, ``units`` and ``definition``. Attributes: ``label``, ``label_from``,
        ``pool``, ``site``, ``modality``, ``cluster_coord``, ``reference``, ``n_splits``,
        ``n_shuffles``, ``n_rows``, ``n_clusters``, ``n_classes``, ``uniform_chance``
        (1 / n_classes), ``C``, ``seed``, ``n_not_converged``, ``warnings``.

    Raises
    ------
    UsageError
        An unknown site, checkpoint, layer, pool, modality or label coordinate; ``n_splits`` < 2
        or larger than the number of clusters; a label array of the wrong length.
    DataError
        A label with fewer than two classes among the rows, a store without the coordinates
        needed, a label or cluster that varies inside a sample with ``pool="image"``, NaN/Inf
        in the probed rows.
    """
    import xarray as xr
    from threadpoolctl import threadpool_limits
    from tqdm.auto import tqdm

    from driftlens._version import __version__

    if pool not in POOLS:
        raise UsageError(f"pool must be one of {POOLS}, got {pool!r}")
    if modality not in MODALITIES:
        raise UsageError(f"modality must be one of {MODALITIES}, got {modality!r}")
    n_splits = check_count("n_splits", n_splits, least=2)
    n_shuffles = check_count("n_shuffles", n_shuffles, least=0)
    if not C > 0:
        raise UsageError(f"C must be > 0, got {C}")
    if max_rows is not None:
        max_rows = check_count("max_rows", max_rows, least=2)
    da = ds[pick_site(ds, site)]
    layered = "layer" in da.dims

    all_ckpts = checkpoint_labels(ds)
    if not all_ckpts:
        raise DataError("the store holds no checkpoint")
    checkpoints = pick_checkpoints(all_ckpts, checkpoints, "the store")
    reference = reference_of(ds, reference, among=all_ckpts, where="the store")
    if layered:
        all_layers = pick_layers(ds)
        layers = pick_layers(ds, layers, where="the store")
    elif layers is not None:
        raise UsageError(f"site {site!r} has one vector per checkpoint, no layers; leave layers unset")
    else:
        layers = []

    labels = token_labels(ds, label, label_from=label_from)
    name = label_name or _label_name(label, label_from)
    index, pool_matrix, y_str, clusters, _ids = _rows(ds, labels, modality, pool, cluster)
    if max_rows is not None and len(y_str) > int(max_rows):
        sub = np.sort(np.random.default_rng([int(seed), 2]).choice(len(y_str), int(max_rows), replace=False))
        if pool_matrix is None:
            index = index[sub]
        else:
            pool_matrix = pool_matrix[sub]
            used = np.unique(pool_matrix.indices)          # token columns still needed
            index, pool_matrix = index[used], pool_matrix[:, used]
        y_str, clusters = y_str[sub], clusters[sub]
    classes, y = np.unique(y_str, return_inverse=True)
    y = y.reshape(-1)
    if classes.size < 2:
        raise DataError(f"label {name!r} has a single class {classes.tolist()} among the {len(y)} "
                        f"{modality} row(s): there is nothing to decode")
    notes: list[str] = []
    folds = cluster_folds(y, clusters, int(n_splits), int(seed))
    k_clusters = len(np.unique(clusters))
    per_class = {str(c): len(np.unique(clusters[y == i])) for i, c in enumerate(classes)}
    few = {c: k for c, k in per_class.items() if k < n_splits}
    if few:
        notes.append(f"class(es) {few} (clusters per class) have fewer clusters than n_splits={n_splits}: some "
                     f"training or test folds lack them")
    rng = np.random.default_rng([int(seed), 1])
    shuffles = [shuffle_by_cluster(y, clusters, rng) for _ in range(int(n_shuffles))]
    counts = np.bincount(y, minlength=classes.size)
    chance = float(counts.max() / counts.sum())

    n_ck, n_l, n_f, n_s = len(checkpoints), max(1, len(layers)), len(folds), len(shuffles)
    acc = np.full((n_ck, n_l, n_f), np.nan)
    trans = np.full((n_ck, n_l, n_f), np.nan)
    rescaled = np.full((n_ck, n_l, n_f), np.nan)
    shuf = np.full((n_ck, n_l, n_s, n_f), np.nan)
    not_converged = [0]
    ck_pos = {c: i for i, c in enumerate(all_ckpts)}

    def features(label_: str, layer: int | None) -> np.ndarray:
        sel = {"checkpoint": ck_pos[label_]}
        if layer is not None:
            sel["layer"] = all_layers.index(layer)
        block = np.asarray(da.isel(sel).values)[index].astype(np.float64, copy=False)
        bad = ~np.isfinite(block).all(axis=1)
        if bad.any():
            where = f"checkpoint {label_!r}, site {site!r}" + (f", layer {layer}" if layer is not None else "")
            raise DataError(f"{where}: {int(bad.sum())} probed token row(s) hold NaN/Inf (first at token "
                            f"{int(index[np.flatnonzero(bad)[0]])}); the store is damaged or the model overflowed")
        return block if pool_matrix is None else np.asarray(pool_matrix @ block)

    bar = tqdm(total=n_ck * n_l, desc=f"probe {name}", unit="cell", disable=progress is False,
               delay=0 if progress else 2.0)
    try:
        with threadpool_limits(1):   # BLAS threads only slow down matrices this small
            for li, layer in enumerate(layers or [None]):
                x_ref = features(reference, layer)
                ref_models = [_fit(x_ref[tr], y[tr], C, not_converged) for tr, _ in folds]
                for ci, ck in enumerate(checkpoints):
                    x = x_ref if ck == reference else features(ck, layer)
                    for f, (tr, te) in enumerate(folds):
                        own = ref_models[f] if ck == reference else _fit(x[tr], y[tr], C, not_converged)
                        acc[ci, li, f] = _score(own, x[te], y[te])
                        trans[ci, li, f] = _score(ref_models[f], x[te], y[te])
                        rescaled[ci, li, f] = _score_rescaled(ref_models[f], x[tr], x[te], y[te])
                        for s, ys in enumerate(shuffles):
                            shuf[ci, li, s, f] = _score(_fit(x[tr], ys[tr], C, not_converged), x[te], ys[te])
                    bar.update(1)
    finally:
        bar.close()
    if not_converged[0]:
        notes.append(f"{not_converged[0]} logistic-regression fit(s) stopped at max_iter={MAX_ITER} before "
                     f"converging (try a smaller C)")

    lead = ("checkpoint", "layer") if layered else ("checkpoint",)
    squeeze = (lambda a: a) if layered else (lambda a: a[:, 0])
    rows_what = "samples (mean of a probe's tokens)" if pool == "image" else "tokens"
    cv = (f"{n_f}-fold StratifiedGroupKFold over `{cluster}` (seed {seed}): no cluster on both sides of a split; "
          f"rows are {rows_what}")
    shuf_mean = shuf.mean(axis=3)                          # per shuffle: mean over folds
    data = {
        "accuracy": (lead, squeeze(acc.mean(axis=2)), {
            "long_name": "probe accuracy", "units": "1",
            "definition": f"held-out accuracy of a logistic-regression probe (standardized features, C={C}) trained "
                          f"on this checkpoint's training rows, mean over folds; {cv}"}),
        "accuracy_sd": (lead, squeeze(_sd(acc)), {
            "long_name": "probe accuracy, spread over folds", "units": "1",
            "definition": "standard deviation over folds (ddof=1) of the held-out accuracy"}),
        "accuracy_fold": (lead + ("fold",), squeeze(acc), {
            "long_name": "probe accuracy per fold", "units": "1",
            "definition": "held-out accuracy of each fold (the same folds at every checkpoint and layer)"}),
        "transfer": (lead, squeeze(trans.mean(axis=2)), {
            "long_name": "transfer accuracy of the reference probe", "units": "1", "reference": reference,
            "definition": f"accuracy on this checkpoint's held-out rows of the probe (scaler included) trained on "
                          f"the reference checkpoint {reference!r}'s training rows of the same fold, mean over "
                          f"folds; equals accuracy at the reference"}),
        "transfer_sd": (lead, squeeze(_sd(trans)), {
            "long_name": "transfer accuracy, spread over folds", "units": "1",
            "definition": "standard deviation over folds (ddof=1) of the transfer accuracy"}),
        "transfer_fold": (lead + ("fold",), squeeze(trans), {
            "long_name": "transfer accuracy per fold", "units": "1",
            "definition": "transfer accuracy of each fold"}),
        "transfer_rescaled": (lead, squeeze(rescaled.mean(axis=2)), {
            "long_name": "transfer accuracy of the reference probe, features restandardized", "units": "1",
            "reference": reference,
            "definition": "as transfer, but this checkpoint's rows are standardized with the mean and SD of its "
                          "own training rows before the reference probe's weights are applied: insensitive to a "
                          "translation or per-feature rescaling of the whole checkpoint, so transfer < "
                          "transfer_rescaled means part of the loss is such a global move, and a low "
                          "transfer_rescaled means the label is encoded along other directions"}),
        "shuffled": (lead, squeeze(shuf_mean.mean(axis=2)) if n_s else squeeze(np.full((n_ck, n_l), np.nan)), {
            "long_name": "probe accuracy on shuffled labels", "units": "1", "n_shuffles": n_s,
            "definition": f"accuracy of the same procedure (same folds) on labels permuted between clusters "
                          f"(each cluster takes the labels of another), mean over {n_s} permutation(s) and folds"}),
        "shuffled_sd": (lead, squeeze(_sd(shuf_mean, axis=2)) if n_s else squeeze(np.full((n_ck, n_l), np.nan)), {
            "long_name": "shuffled-label accuracy, spread over permutations", "units": "1",
            "definition": "standard deviation (ddof=1) over permutations of the fold-mean shuffled accuracy"}),
        "chance": ((), chance, {
            "long_name": "chance accuracy", "units": "1",
            "definition": "majority-class rate: share of the rows in the most frequent class (the accuracy of "
                          "always answering it); 1 / n_classes is the attribute uniform_chance"}),
        "class_rows": (("class",), counts.astype(np.int64), {
            "long_name": "rows per class", "units": "rows",
            "definition": "number of probed rows of each class"}),
    }
    coords: dict[str, Any] = {"checkpoint": checkpoints, "fold": np.arange(n_f), "class": classes.astype(str)}
    if layered:
        coords["layer"] = np.asarray(layers, dtype=np.int64)
    out = xr.Dataset(data, coords=coords)
    for w in notes:
        warnings.warn(w, stacklevel=2)
    out.attrs.update({
        "label": name,
        "label_from": label_from if callable(label) or isinstance(label, Mapping) else "",
        "pool": pool,
        "site": site,
        "modality": modality,
        "cluster_coord": cluster,
        "reference": reference,
        "n_splits": int(n_f),
        "n_shuffles": int(n_s),
        "n_rows": int(len(y)),
        "n_tokens": int(index.size),
        "n_clusters": int(k_clusters),
        "n_classes": int(classes.size),
        "uniform_chance": float(1.0 / classes.size),
        "C": float(C),
        "seed": int(seed),
        "max_rows": -1 if max_rows is None else int(max_rows),
        "n_not_converged": int(not_converged[0]),
        "probe_set": str(ds.attrs.get("probe_set", "")),
        "model_type": str(ds.attrs.get("model_type", "")),
        "warnings": "\n".join(notes),
        "driftlens_version": __version__,
    })
    return out


__all__ = ["LabelSpec", "Pool", "ProbeRows", "check_cluster_folds", "cluster_folds", "linear_probe",
           "shuffle_by_cluster", "token_labels"]
