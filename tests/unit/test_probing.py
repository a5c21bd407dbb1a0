"""Linear probes (driftlens.probing) on synthetic clustered tokens with a planted label."""
from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from sklearn.model_selection import KFold

from driftlens.errors import DataError, UsageError
from driftlens.organism.labels import parse_group, world_label
from driftlens.organism.shapes import Scene, all_scenes
from driftlens.probing import check_cluster_folds, cluster_folds, linear_probe, shuffle_by_cluster, token_labels
from driftlens.report import load_report, save_report
from driftlens.store import open_store
from driftlens.testing import make_store

N_CLASSES = 3


def make_ds(n_clusters=60, renders=2, n_visual=4, n_text=2, dim=10, n_layers=2, signal=4.0, seed=0):
    """Clustered tokens whose class (coord ``shade``, constant per cluster) is planted in dims 0..2.

    Checkpoints: ``base``; ``same`` (fresh noise only); ``rotated`` (the class signal moved out of
    dims 0..2 into three extra dims, zero at every other checkpoint: decodable, but not where the
    base probe looks); ``moved`` (``same`` translated by a large vector: the same code, shifted).
    """
    rng = np.random.default_rng(seed)
    classes = rng.permutation(np.arange(n_clusters) % N_CLASSES)
    cols = {k: [] for k in ("sample", "group", "cluster", "position", "modality", "lang", "shade")}
    for a in range(n_clusters):
        for j in range(renders):
            lang = ("en", "ko")[(a + j) % 2]
            for pos in range(n_visual + n_text):
                cols["sample"].append(f"s{a}r{j}-{lang}")
                cols["group"].append(f"scene{a}" + (f"#r{j}" if j else ""))
                cols["cluster"].append(f"scene{a}")
                cols["position"].append(pos)
                cols["modality"].append("visual" if pos < n_visual else "text")
                cols["lang"].append(lang)
                cols["shade"].append(f"c{classes[a]}")
    tok = {k: np.asarray(v) for k, v in cols.items()}
    n = len(tok["sample"])
    codes = np.unique(tok["cluster"], return_inverse=True)[1].reshape(-1)
    y = np.array([int(s[1:]) for s in tok["shade"]])
    vis = tok["modality"] == "visual"
    planted = np.zeros((n, dim + N_CLASSES))
    planted[np.arange(n), y] = signal * vis
    latent = np.zeros((n_layers, n, dim + N_CLASSES))
    latent[..., :dim] = rng.normal(0, 1.0, (n_layers, n_clusters, dim))[:, codes] + rng.normal(0, 0.5, (n_layers, n, dim))
    data = []
    for label in ("base", "same", "rotated", "moved"):
        x = latent.copy()
        x[..., :dim] += rng.normal(0, 0.2, (n_layers, n, dim))
        if label == "rotated":     # the signal leaves dims 0..2 (pure noise there now) for the extra dims
            x[..., dim:] += np.roll(planted, dim, axis=1)[:, dim:] + rng.normal(0, 0.5, (n_layers, n, N_CLASSES))
        else:
            x += planted
        if label == "moved":
            x[..., :dim] += 50.0 * rng.normal(size=dim)
        data.append(x)
    hidden = np.stack(data).astype(np.float32)
    coords = {"checkpoint": ["base", "same", "rotated", "moved"], "layer": np.arange(n_layers),
              **{k: ("token", v) for k, v in tok.items()}}
    return xr.Dataset({"hidden": (("checkpoint", "layer", "token", "hidden_dim"), hidden)}, coords=coords)


@pytest.fixture(scope="module")
def ds():
    return make_ds()


@pytest.fixture(scope="module")
def result(ds):
    return linear_probe(ds, "shade", n_shuffles=2, progress=False)


def test_planted_label_is_decoded_and_shuffled_stays_at_chance(result):
    assert float(result.chance) == pytest.approx(1 / 3)
    assert (result.accuracy > 0.9).all()
    assert (abs(result.shuffled - result.chance) < 0.15).all()
    assert (result.accuracy_sd >= 0).all() and (result.accuracy_sd < 0.15).all()


def test_noise_label_stays_at_chance(ds):
    rng = np.random.default_rng(7)
    clusters = np.unique(ds.cluster.values)
    mapping = dict(zip(clusters.tolist(), rng.permutation(np.arange(len(clusters)) % 2).tolist()))
    res = linear_probe(ds, mapping, label_from="cluster", checkpoints=["base", "same"], n_shuffles=2, progress=False)
    assert res.attrs["n_classes"] == 2 and res.attrs["label"] == "mapping(cluster)"
    assert float(res.chance) == pytest.approx(0.5)
    assert (abs(res.accuracy - 0.5) < 0.2).all()
    assert float(res.accuracy.mean()) < 0.65


def test_folds_never_split_a_cluster():
    rng = np.random.default_rng(0)
    clusters = np.repeat([f"k{a}" for a in range(20)], rng.integers(2, 9, 20))
    y = np.array([int(c[1:]) % 3 for c in clusters])
    folds = cluster_folds(y, clusters, n_splits=5, seed=3)
    assert len(folds) == 5
    check_cluster_folds(folds, clusters)
    tests = np.concatenate([te for _, te in folds])
    assert np.array_equal(np.sort(tests), np.arange(len(y)))          # every row held out exactly once
    for tr, te in folds:
        assert not set(clusters[tr]) & set(clusters[te])
        assert np.array_equal(np.sort(np.concatenate([tr, te])), np.arange(len(y)))
    assert [te.tolist() for _, te in cluster_folds(y, clusters, 5, seed=3)] == [te.tolist() for _, te in folds]
    # the check is not vacuous: token-level folds put clusters on both sides
    token_folds = list(KFold(5, shuffle=True, random_state=0).split(y))
    with pytest.raises(DataError, match="both sides"):
        check_cluster_folds(token_folds, clusters)


def test_folds_used_by_probe_keep_clusters_whole(ds):
    labels = token_labels(ds, "shade")
    vis = ds.modality.values == "visual"
    samples, first = np.unique(ds.sample.values[vis], return_index=True)
    clusters = ds.cluster.values[vis][first]
    folds = cluster_folds(labels[vis][first].astype(str), clusters, 5, 0)
    check_cluster_folds(folds, clusters)
    assert len(samples) == 120


def test_shuffle_by_cluster_permutes_cluster_labels():
    clusters = np.repeat([f"k{a}" for a in range(12)], 3)
    y = np.repeat(np.arange(12) % 3, 3)
    out = shuffle_by_cluster(y, clusters, np.random.default_rng(0))
    per = out.reshape(12, 3)
    assert (per == per[:, :1]).all()                                   # still constant within clusters
    assert np.array_equal(np.bincount(out), np.bincount(y))            # class counts kept
    assert not np.array_equal(out, y)
    ragged = np.array(["a", "a", "b", "c", "c", "c"])
    assert shuffle_by_cluster(np.arange(6), ragged, np.random.default_rng(1)).shape == (6,)


def test_transfer_tracks_the_code_not_the_information(result):
    acc = result.accuracy.sel(checkpoint="rotated")
    assert (acc > 0.9).all()                                          # still decodable ...
    assert (result.transfer.sel(checkpoint="rotated") < 0.5).all()    # ... but not where it was
    assert (result.transfer_rescaled.sel(checkpoint="rotated") < 0.5).all()
    # the reference itself: transfer is its own accuracy; an unchanged checkpoint transfers
    assert np.array_equal(result.transfer.sel(checkpoint="base"), result.accuracy.sel(checkpoint="base"))
    assert (abs(result.transfer.sel(checkpoint="same") - result.accuracy.sel(checkpoint="same")) < 0.06).all()
    # a translated checkpoint: the frozen probe (with its scaler) fails, re-standardized it transfers
    assert (result.transfer.sel(checkpoint="moved") < 0.5).all()
    assert (result.transfer_rescaled.sel(checkpoint="moved") > 0.85).all()
    assert result.attrs["reference"] == "base" and result.transfer.attrs["reference"] == "base"


def test_result_round_trips_through_netcdf(result, tmp_path):
    back = load_report(save_report(result, tmp_path / "probe.nc"))
    xr.testing.assert_identical(back, result)


def test_output_layout_attributes_and_determinism(ds, result):
    assert dict(result.sizes) == {"checkpoint": 4, "layer": 2, "fold": 5, "class": 3}
    for v in ("accuracy", "accuracy_sd", "transfer", "transfer_sd", "transfer_rescaled", "shuffled", "shuffled_sd"):
        assert result[v].dims == ("checkpoint", "layer")
        assert result[v].attrs["long_name"] and result[v].attrs["units"] and result[v].attrs["definition"]
    assert result.accuracy_fold.dims == ("checkpoint", "layer", "fold")
    assert result.chance.dims == () and result.class_rows.values.tolist() == [40, 40, 40]
    a = result.attrs
    assert (a["label"], a["pool"], a["site"], a["modality"], a["n_splits"], a["n_rows"], a["n_classes"],
            a["n_clusters"], a["seed"]) == ("shade", "image", "hidden", "visual", 5, 120, 3, 60, 0)
    assert a["uniform_chance"] == pytest.approx(1 / 3) and a["warnings"] == ""
    # deterministic, and a cell does not depend on which other checkpoints are probed (same folds, shuffles)
    again = linear_probe(ds, "shade", n_shuffles=2, checkpoints=["rotated", "base"], progress=False)
    xr.testing.assert_identical(again.drop_vars("checkpoint"),
                                result.sel(checkpoint=["rotated", "base"]).drop_vars("checkpoint"))
    # a callable on the group strings giving the same labels gives the same result
    shade = dict(zip(ds.group.values.tolist(), ds.shade.values.tolist()))
    by_fn = linear_probe(ds, lambda g: shade[g], checkpoints=["same"], layers=[1], n_shuffles=0, progress=False)
    assert by_fn.attrs["label"] == "<lambda>(group)"
    np.testing.assert_array_equal(by_fn.accuracy_fold.values[0, 0], result.accuracy_fold.sel(checkpoint="same", layer=1))
    other = linear_probe(ds, "shade", seed=1, checkpoints=["base"], layers=[1], reference="same", progress=False)
    assert dict(other.sizes) == {"checkpoint": 1, "layer": 1, "fold": 5, "class": 3}
    assert other.attrs["reference"] == "same"


def test_cells_equal_a_plain_scikit_learn_pipeline(ds, result):
    """accuracy_fold is an sklearn StandardScaler + LogisticRegression pipeline on the same folds."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    vis = ds.modality.values == "visual"
    samples, inv = np.unique(ds.sample.values[vis], return_inverse=True)
    first = np.unique(inv, return_index=True)[1]
    y = ds.shade.values[vis][first]
    folds = cluster_folds(y, ds.cluster.values[vis][first], 5, 0)
    for ck, layer in (("same", 0), ("rotated", 1)):
        block = ds.hidden.sel(checkpoint=ck, layer=layer).values[vis].astype(np.float64)
        x = np.stack([block[inv == i].mean(0) for i in range(len(samples))])
        want = [make_pipeline(StandardScaler(), LogisticRegression(solver="newton-cg", max_iter=1000))
                .fit(x[tr], y[tr]).score(x[te], y[te]) for tr, te in folds]
        np.testing.assert_allclose(result.accuracy_fold.sel(checkpoint=ck, layer=layer), want)


def test_reference_from_attrs_and_array_labels(ds):
    d2 = ds.assign_attrs(reference="same")
    res = linear_probe(d2, np.asarray(ds.shade.values), checkpoints=["base", "same"], layers=[0], n_shuffles=0,
                progress=True)
    assert res.attrs["reference"] == "same" and res.attrs["label"] == "array"
    assert np.array_equal(res.transfer.sel(checkpoint="same"), res.accuracy.sel(checkpoint="same"))
    assert np.isnan(res.shuffled).all() and res.attrs["n_shuffles"] == 0


def test_token_pool_and_max_rows(ds):
    res = linear_probe(ds, "shade", pool="token", checkpoints=["base", "rotated"], n_shuffles=1, progress=False)
    assert res.attrs["n_rows"] == 60 * 2 * 4 and res.attrs["pool"] == "token"
    assert (res.accuracy > 0.8).all() and (res.transfer.sel(checkpoint="rotated") < 0.5).all()
    few = linear_probe(ds, "shade", pool="token", checkpoints=["base"], max_rows=100, n_shuffles=0, progress=False)
    assert few.attrs["n_rows"] == 100
    img = linear_probe(ds, "shade", checkpoints=["base"], max_rows=40, n_shuffles=0, progress=False)
    assert img.attrs["n_rows"] == 40 and img.attrs["n_tokens"] == 160


def test_labels_of_none_are_left_out(ds):
    res = linear_probe(ds, lambda g: None if g.endswith("#r1") else f"x{int(g.removeprefix('scene')) % 2}",
                checkpoints=["base"], n_shuffles=0, progress=False)
    assert res.attrs["n_rows"] == 60 and res.attrs["n_classes"] == 2


def test_on_a_store_on_disk(tmp_path):
    store = open_store(make_store(tmp_path / "s.zarr", n_clusters=12, n_layers=2))
    res = linear_probe(store, "lang", n_splits=3, n_shuffles=1, progress=False)
    assert dict(res.sizes) == {"checkpoint": 3, "layer": 2, "fold": 3, "class": 2}
    assert (res.accuracy < 0.85).all()                 # no language signal in the synthetic store
    fin = linear_probe(store, "lang", site="final", n_splits=3, n_shuffles=0, progress=False)
    assert "layer" not in fin.dims and fin.accuracy.dims == ("checkpoint",)


def test_errors(ds):
    with pytest.raises(UsageError, match="'colour'"):
        linear_probe(ds, "colour", progress=False)
    with pytest.raises(UsageError, match="n_splits=61.*60"):
        linear_probe(ds, "shade", n_splits=61, progress=False)
    with pytest.raises(UsageError, match="n_splits must be an integer >= 2"):
        linear_probe(ds, "shade", n_splits=1, progress=False)
    with pytest.raises(DataError, match="single class"):
        linear_probe(ds, lambda g: "same", progress=False)
    with pytest.raises(UsageError, match="site 'key'"):
        linear_probe(ds, "shade", site="key", progress=False)
    with pytest.raises(UsageError, match="'ko-9'"):
        linear_probe(ds, "shade", checkpoints=["base", "ko-9"], progress=False)
    with pytest.raises(UsageError, match="reference 'nope'"):
        linear_probe(ds, "shade", reference="nope", progress=False)
    with pytest.raises(UsageError, match=r"layer\(s\) \[7\]"):
        linear_probe(ds, "shade", layers=[7], progress=False)
    with pytest.raises(UsageError, match="pool"):
        linear_probe(ds, "shade", pool="mean", progress=False)
    with pytest.raises(UsageError, match="one label per token"):
        linear_probe(ds, ["a", "b"], progress=False)
    with pytest.raises(DataError, match="no entry"):
        linear_probe(ds, {"scene0": "a"}, progress=False)
    with pytest.raises(DataError, match="one label per sample"):
        linear_probe(ds, "position", progress=False)           # varies inside a probe: pool='token' needed
    with pytest.raises(UsageError, match="cluster coordinate 'scene'"):
        linear_probe(ds, "shade", cluster="scene", progress=False)
    bad = ds.copy(deep=True)
    bad["hidden"][0, 0, 0, 0] = np.nan
    with pytest.raises(DataError, match="NaN"):
        linear_probe(bad, "shade", progress=False)


def test_world_labels_on_real_group_strings():
    g = "red-circle-top-right#r1"
    assert [world_label(k)(g) for k in ("color", "shape", "position", "scene")] == [
        "red", "circle", "top right", "red-circle-top-right"]
    assert world_label("position")("yellow-triangle-bottom-left") == "bottom left"
    assert world_label("color").__name__ == "world_color"
    for scene in all_scenes():
        assert parse_group(scene.key) == scene and parse_group(scene.key + "#r3") == scene
    assert parse_group("purple-square-bottom-right") == Scene("purple", "square", "bottom right")
    with pytest.raises(DataError, match="'scene4#r1'"):
        world_label("color")("scene4#r1")
    with pytest.raises(DataError, match="'pink-circle-top-left'"):
        parse_group("pink-circle-top-left")
    with pytest.raises(UsageError, match="'size'"):
        world_label("size")


def test_world_labels_drive_a_probe(ds):
    scenes = all_scenes()
    relabel = {f"scene{a}": scenes[(a * 7) % len(scenes)].key for a in range(60)}
    d2 = ds.assign_coords(group=("token", [relabel[g.split("#")[0]] + ("#r1" if "#" in g else "")
                                           for g in ds.group.values.tolist()]))
    res = linear_probe(d2, world_label("shape"), checkpoints=["base"], n_shuffles=0, progress=False)
    assert res.attrs["label"] == "world_shape(group)" and res.attrs["n_classes"] == 3
