"""Token maps (driftlens.tokenmap): UMAP maps of one layer across checkpoints, and their figure.

UMAP's numba code compiles on the first fit of a process (tens of seconds), so every map here is
small and the two expensive ones (one per method) are module-scoped fixtures shared by the tests.
"""
import io

import numpy as np
import pytest

pytest.importorskip("umap")

from driftlens.errors import UsageError  # noqa: E402
from driftlens.plot import OKABE_ITO  # noqa: E402
from driftlens.plot import token_map as plot_token_map  # noqa: E402
from driftlens.store import ActivationStore, checkpoint_chunks, open_store  # noqa: E402
from driftlens.tokenmap import _choose_tokens, token_map_data  # noqa: E402

pytestmark = [pytest.mark.heavy,
              pytest.mark.filterwarnings("ignore:Graph is not fully connected")]   # the blobs are apart

N_CLUSTERS, N_VIS, N_TEXT, DIM, LAYERS = 20, 10, 8, 8, 3
SHIFT = 12.0


def suptitle(fig) -> str:
    """The figure's suptitle (``Figure.get_suptitle`` only exists from matplotlib 3.8; the floor is 3.7)."""
    return fig._suptitle.get_text() if fig._suptitle is not None else ""



def blob_store(path, seed=0):
    """Visual and text tokens as two well separated Gaussian blobs (each made of cluster sub-blobs).

    Checkpoints ``base``, ``same`` (fresh small noise only) and ``shifted`` (the visual tokens of
    layer 1 moved by ``SHIFT`` along the diagonal).
    """
    rng = np.random.default_rng(seed)
    cols = {k: [] for k in ("sample", "group", "cluster", "position", "modality", "lang")}
    for a in range(N_CLUSTERS):
        lang = ("en", "ko")[a % 2]
        for pos in range(N_VIS + N_TEXT):
            cols["sample"].append(f"s{a}-{lang}")
            cols["group"].append(f"{('red', 'blue', 'green')[a % 3]}-scene{a}")
            cols["cluster"].append(f"scene{a}")
            cols["position"].append(pos)
            cols["modality"].append("visual" if pos < N_VIS else "text")
            cols["lang"].append(lang)
    tok = {k: np.asarray(v) for k, v in cols.items()}
    n = len(tok["sample"])
    vis = tok["modality"] == "visual"
    codes = np.unique(tok["cluster"], return_inverse=True)[1].reshape(-1)
    meta = {"model_type": "llava", "family": "llava", "probe_set": "blobs", "probe_fingerprint": "x",
            "n_layers": LAYERS, "layers": list(range(LAYERS)), "sites": ["hidden", "final"],
            "dims": {"hidden": DIM, "final": DIM}, "dtype": "float32", "token_selection": "all"}
    store = ActivationStore(path, meta, tok)
    cluster = rng.normal(0, 1.0, (LAYERS, N_CLUSTERS, DIM))[:, codes]
    latent = cluster + rng.normal(0, 0.3, (LAYERS, n, DIM)) + np.where(vis, 4.0, -4.0)[:, None]
    for label in ("base", "same", "shifted"):
        i = store.slot(label)
        x = latent + rng.normal(0, 0.05, latent.shape)
        if label == "shifted":
            x[1][vis] += SHIFT / np.sqrt(DIM)
        store.write("hidden", i, 0, x.astype(np.float32))
        store.write("final", i, 0, x[-1].astype(np.float32))
        store.mark_complete(label)
    return path


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return open_store(blob_store(tmp_path_factory.mktemp("tokenmap") / "blobs.zarr"))


@pytest.fixture(scope="module")
def ref_map(ds):
    return token_map_data(ds, 1, max_tokens=300, seed=0)


@pytest.fixture(scope="module")
def aligned_map(ds):
    return token_map_data(ds, 1, max_tokens=150, method="aligned", seed=0, n_neighbors=10)


def _knn_accuracy(xy, labels, k=5):
    d = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    nn = np.argsort(d, axis=1)[:, :k]
    votes = (labels[nn] == labels[:, None]).mean(axis=1)
    return float((votes > 0.5).mean())


# ----------------------------------------------------------------------------------------- data

def test_reference_map_layout(ref_map):
    m = ref_map
    assert m.x.dims == ("checkpoint", "token") and m.y.dims == ("checkpoint", "token")
    assert list(m.checkpoint.values) == ["base", "same", "shifted"]
    for c in ("modality", "cluster", "group", "sample", "lang"):
        assert m[c].dims == ("token",)
    assert np.isfinite(m.x.values).all() and np.isfinite(m.y.values).all()
    a = m.attrs
    assert a["method"] == "reference" and a["reference"] == "base" and a["layer"] == 1 and a["site"] == "hidden"
    assert a["n_tokens"] == m.sizes["token"] <= 300
    assert a["n_clusters"] == len(np.unique(m.cluster.values))
    assert a["n_tokens_available"] == N_CLUSTERS * (N_VIS + N_TEXT)


def test_map_keeps_visual_and_text_apart(ref_map):
    for i in range(ref_map.sizes["checkpoint"] - 1):        # base and the unchanged checkpoint
        xy = np.c_[ref_map.x.values[i], ref_map.y.values[i]]
        assert _knn_accuracy(xy, ref_map.modality.values) > 0.95


def test_unchanged_stays_and_shifted_moves(ref_map):
    x, y = ref_map.x.values, ref_map.y.values
    spread = np.median(np.hypot(x[0] - x[0].mean(), y[0] - y[0].mean()))
    vis = ref_map.modality.values == "visual"
    moved = np.hypot(x - x[0], y - y[0])
    assert np.all(moved[0] == 0)                                 # the reference is the fitted embedding
    same, shifted = np.median(moved[1, vis]), np.median(moved[2, vis])
    assert same < 0.1 * spread
    assert shifted > 3 * same and shifted > 0.2 * spread
    assert np.median(moved[2, ~vis]) < 0.1 * spread             # the shift touched only visual tokens


def test_subsample_takes_whole_clusters(ds, ref_map):
    clusters, mods = ds.cluster.values, ds.modality.values
    chosen = set(ref_map.cluster.values)
    rows = np.flatnonzero(np.isin(clusters, list(chosen)))
    np.testing.assert_array_equal(np.sort(ref_map.token.values), rows)      # every token of each chosen cluster
    np.testing.assert_array_equal(ref_map.cluster.values, clusters[ref_map.token.values])
    np.testing.assert_array_equal(ref_map.modality.values, mods[ref_map.token.values])
    per = N_VIS + N_TEXT
    assert ref_map.attrs["n_clusters"] == 300 // per and ref_map.attrs["n_tokens"] == (300 // per) * per
    for seed in range(5):       # caps, modalities, a seed's draw; no UMAP needed
        rows, n_avail, k_avail, unit = _choose_tokens(ds, ("visual",), 4, 1000, seed)
        assert unit == "cluster" and k_avail == N_CLUSTERS and n_avail == N_CLUSTERS * N_VIS
        assert len(np.unique(clusters[rows])) == 4 and rows.size == 4 * N_VIS and set(mods[rows]) == {"visual"}
    a = _choose_tokens(ds, ("visual", "text"), None, 100, 1)[0]
    b = _choose_tokens(ds, ("visual", "text"), None, 100, 2)[0]
    assert a.size <= 100 and not np.array_equal(a, b)


def test_same_seed_same_map(ds, ref_map):
    again = token_map_data(ds, 1, max_tokens=300, seed=0)
    np.testing.assert_array_equal(again.x.values, ref_map.x.values)
    np.testing.assert_array_equal(again.y.values, ref_map.y.values)
    np.testing.assert_array_equal(again.token.values, ref_map.token.values)


def test_aligned_maps_every_checkpoint(aligned_map):
    m = aligned_map
    assert list(m.checkpoint.values) == ["base", "same", "shifted"] and m.attrs["method"] == "aligned"
    assert "reference" not in m.attrs and m.sizes["token"] <= 150
    assert np.isfinite(m.x.values).all() and np.isfinite(m.y.values).all()
    assert not np.allclose(m.x.values[0], m.x.values[1])        # one map per checkpoint, not one copied
    for i in range(3):
        assert _knn_accuracy(np.c_[m.x.values[i], m.y.values[i]], m.modality.values) > 0.95


def test_site_without_layers_and_one_checkpoint(ds):
    for method in ("reference", "aligned"):
        m = token_map_data(ds, None, site="final", checkpoints=["same"], max_tokens=90, n_neighbors=5,
                           method=method)
        assert m.sizes["checkpoint"] == 1 and "layer" not in m.attrs and m.attrs["site"] == "final"
        assert np.isfinite(m.x.values).all()


def test_reads_only_the_chosen_layer_and_checkpoints(tmp_path):
    """Every chunk of the other layers and checkpoints is made unreadable: the map never touches them."""
    path = blob_store(tmp_path / "guarded.zarr")
    keep_layer, keep_ck = 2, {0, 2}
    for ck in range(3):
        for rel, layer, _ in checkpoint_chunks(path, "hidden", ck):
            if layer != keep_layer or ck not in keep_ck:
                (path / rel).write_bytes(b"not a chunk")
    ds = open_store(path, verify="none")
    with pytest.raises(ValueError):                     # the guard works: reading a spoiled chunk fails
        np.asarray(ds.hidden.isel(checkpoint=1, layer=keep_layer))
    m = token_map_data(ds, 2, checkpoints=["shifted", "base"], modalities=["text"], max_tokens=64,
                       n_neighbors=5)
    assert list(m.checkpoint.values) == ["shifted", "base"] and m.attrs["reference"] == "shifted"
    assert set(m.modality.values) == {"text"} and m.sizes["token"] <= 64
    assert np.isfinite(m.x.values).all()


def test_errors(ds):
    cases = [
        (dict(layer=7), "layer 7"),
        (dict(layer=None), "layer None"),
        (dict(site="query"), "site 'query'"),
        (dict(site="final"), "no layers"),
        (dict(checkpoints=["base", "nope"]), "'nope'"),
        (dict(checkpoints=[]), "empty"),
        (dict(reference="same", checkpoints=["base"]), "reference"),
        (dict(modalities=("visual", "audio")), "'audio'"),
        (dict(method="tsne"), "method"),
        (dict(max_tokens=5), "smaller than every cluster"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=40, n_neighbors=40), "too few"),
        (dict(max_clusters=1, modalities=("text",)), "too few"),
    ]
    for kw, match in cases:
        kw = {"layer": 1, **kw}
        with pytest.raises(UsageError, match=match):
            token_map_data(ds, kw.pop("layer"), **kw)


# ----------------------------------------------------------------------------------------- plot

def _legend_texts(ax):
    leg = ax.get_legend()
    return [t.get_text() for t in leg.get_texts()] if leg else []


def test_plot_modality_panels(ref_map):
    axes = plot_token_map(ref_map)
    assert isinstance(axes, np.ndarray) and axes.shape == (3,)
    fig = axes[0].figure
    assert type(fig).__name__ == "Figure" and fig.canvas.manager is None        # not a pyplot figure
    assert [a.get_title() for a in axes] == ["base (reference)", "same", "shifted"]
    for a in axes:
        assert len(a.collections) == 2
    assert axes[0].get_shared_x_axes().joined(axes[0], axes[2])
    n_vis = int((ref_map.modality.values == "visual").sum())
    assert _legend_texts(axes[-1]) == [f"visual ({n_vis})", f"text ({ref_map.sizes['token'] - n_vis})"]
    assert np.allclose(axes[0].collections[0].get_facecolor()[0][:3], (0, 0x72 / 255, 0xB2 / 255))
    title = suptitle(fig)
    a = ref_map.attrs
    assert "layer 1" in title and "'base'" in title and f"{a['n_tokens']} tokens" in title
    assert f"{a['n_clusters']} clusters" in title
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    assert buf.getvalue()[:4] == b"\x89PNG"


def test_plot_checkpoint_overlay(ref_map, aligned_map):
    ax = plot_token_map(ref_map, color="checkpoint")
    assert not isinstance(ax, np.ndarray) and len(ax.collections) == 3
    assert _legend_texts(ax) == ["base (reference)", "same", "shifted"]
    assert np.allclose(ax.collections[0].get_facecolor()[0][:3], 0)          # the reference in black
    assert "layer 1" in suptitle(ax.figure) and "tokens" in suptitle(ax.figure)
    ax = plot_token_map(aligned_map, color="checkpoint", checkpoints=["same", "shifted"])
    assert len(ax.collections) == 2 and _legend_texts(ax) == ["same", "shifted"]
    assert "AlignedUMAP" in suptitle(ax.figure)


def test_plot_labels_and_given_axes(ref_map):
    from matplotlib.figure import Figure

    fig = Figure()
    given = fig.subplots(1, 2)
    shape_color = lambda d: [g.split("-")[0] for g in d.group.values]   # noqa: E731
    axes = plot_token_map(ref_map, color=shape_color, ax=given, checkpoints=["base", "shifted"],
                          legend_title="shape colour")
    assert list(axes) == list(given)
    cats = sorted(set(shape_color(ref_map)))
    assert all(len(a.collections) == len(cats) for a in axes)
    assert [t.split(" ")[0] for t in _legend_texts(axes[-1])] == cats
    assert axes[-1].get_legend().get_title().get_text() == "shape colour"
    red = [c for c in axes[0].collections if c.get_label() == "red"][0]
    assert np.allclose(red.get_facecolor()[0][:3], (0xD5 / 255, 0x5E / 255, 0))   # Okabe-Ito vermillion
    assert "layer 1" in axes[0].get_title()                   # the summary goes above the first given panel
    # a coordinate, and numbers per (checkpoint, token): a colorbar
    axes = plot_token_map(ref_map, color="lang")
    assert len(axes[0].collections) == 2 and axes[0].collections[0].get_facecolor()[0][:3].tolist() == \
        pytest.approx([int(OKABE_ITO[0][i:i + 2], 16) / 255 for i in (1, 3, 5)])
    moved = np.hypot(ref_map.x - ref_map.x.sel(checkpoint="base"), ref_map.y - ref_map.y.sel(checkpoint="base"))
    axes = plot_token_map(ref_map, color=moved, legend_title="moved")
    fig = axes[0].figure
    assert len(fig.axes) == 4 and fig.axes[-1].get_ylabel() == "moved"


def test_plot_errors(ref_map):
    from matplotlib.figure import Figure

    with pytest.raises(UsageError, match="'nope'"):
        plot_token_map(ref_map, color="nope")
    with pytest.raises(UsageError, match="shape"):
        plot_token_map(ref_map, color=np.zeros(3))
    with pytest.raises(UsageError, match="3 Axes"):
        plot_token_map(ref_map, ax=Figure().subplots(1, 2))
    with pytest.raises(UsageError, match="'later'"):
        plot_token_map(ref_map, checkpoints=["later"])
    with pytest.raises(UsageError, match="token_map_data"):
        plot_token_map(ref_map.drop_vars("x"))
    with pytest.raises(UsageError, match="no colour"):
        plot_token_map(ref_map, palette={"visual": "k"})
