"""The drift report on a synthetic store with a planted shift."""
from __future__ import annotations

import numpy as np
import pytest

import driftlens as dl
from driftlens.drift import group_splits, load_report
from driftlens.store import ActivationStore, open_store

N_GROUPS, VIS, TXT, D, L = 24, 8, 6, 16, 3


def _tokens():
    cols = {k: [] for k in ("sample", "group", "position", "modality", "lang")}
    for g in range(N_GROUPS):
        for lang in ("en", "ko"):
            for pos in range(VIS + TXT):
                cols["sample"].append(f"s{g}-{lang}")
                cols["group"].append(f"g{g}")
                cols["position"].append(pos)
                cols["modality"].append("visual" if pos < VIS else "text")
                cols["lang"].append(lang)
    return {k: np.asarray(v) for k, v in cols.items()}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rng = np.random.default_rng(0)
    tok = _tokens()
    T = len(tok["sample"])
    vis = tok["modality"] == "visual"
    meta = {"model_type": "llava", "family": "llava", "probe_set": "synthetic", "probe_fingerprint": "x",
            "n_layers": L, "layers": list(range(L)), "sites": ["hidden", "key"],
            "dims": {"hidden": D, "key": D}, "dtype": "float32", "token_selection": "all"}
    path = tmp_path_factory.mktemp("drift") / "s.zarr"
    st = ActivationStore(path, meta, tok)
    # per-image structure: tokens of one group share a group mean (like one image's patches)
    gid = np.array([int(g[1:]) for g in tok["group"]])
    gmean = rng.normal(size=(N_GROUPS, L, D))
    base = {site: np.stack([gmean[gid, l] + rng.normal(size=(T, D)) for l in range(L)]) for site in ("hidden", "key")}
    noise = {site: base[site] + 0.01 * rng.normal(size=base[site].shape) for site in base}
    shifted = {site: base[site].copy() for site in base}
    shifted["hidden"][1][vis] += 1.5          # planted: layer 1, hidden, visual tokens only
    for label, data in (("base", base), ("same", noise), ("shifted", shifted)):
        i = st.slot(label)
        for site, arr in data.items():
            st.write(site, i, 0, arr.astype(np.float32))
        st.mark_complete(label)
    return path


def test_report_structure_and_planted_shift(store, tmp_path):
    ds = open_store(store)
    rep = dl.drift(ds, reference="base", metrics=("mmd", "sliced_w", "gauss_w2", "shift", "gap", "mir"),
                   n_splits=6, n_permutations=200, progress=False, out=tmp_path / "r.nc")
    assert dict(rep.sizes) == {"checkpoint": 3, "layer": L, "site": 2, "modality": 2}
    for m in ("mmd", "sliced_w", "gauss_w2", "shift"):
        for suffix in ("", "_null", "_z"):
            assert rep[m + suffix].dims == ("checkpoint", "layer", "site", "modality")
            assert rep[m + suffix].attrs["definition"]
    assert rep.gap.dims == ("checkpoint", "layer", "site")
    assert rep.mir_total.dims == ("checkpoint", "site")
    assert rep.attrs["reference"] == "base"
    # the reference against itself: value == null exactly, z == 0
    np.testing.assert_array_equal(rep.mmd_z.sel(checkpoint="base").values, 0.0)
    # planted shift found where it was planted and nowhere else
    z = rep.mmd_z.sel(checkpoint="shifted")
    assert float(z.sel(layer=1, site="hidden", modality="visual")) > 5
    others = z.where(~((z.layer == 1) & (z.site == "hidden") & (z.modality == "visual")))
    assert float(np.nanmax(np.abs(others.values))) < 3
    assert float(rep.mmd_p.sel(checkpoint="shifted", layer=1, site="hidden", modality="visual")) < 0.02
    assert float(np.abs(rep.mmd_z.sel(checkpoint="same")).max()) < 3
    assert float(rep.sliced_w_z.sel(checkpoint="shifted", layer=1, site="hidden", modality="visual")) > 3
    # paired shift: the planted displacement is large relative to its random-pairing null scale
    assert float(rep["shift"].sel(checkpoint="same").max()) < 1e-2   # rep.shift is Dataset.shift
    # netCDF round trip
    back = load_report(tmp_path / "r.nc")
    np.testing.assert_allclose(back.mmd_z.values, rep.mmd_z.values)
    assert back.attrs["reference"] == "base"


def test_group_splits_keep_groups_together():
    groups = np.repeat(np.array([f"g{i}" for i in range(7)]), 5)
    for a, b in group_splits(groups, 4, seed=1):
        assert not (a & b).any() and (a | b).all()
        assert set(groups[a]).isdisjoint(set(groups[b]))
    with pytest.raises(ValueError, match="at least 2 probe groups"):
        group_splits(np.array(["g0"] * 4), 2, 0)


def test_bad_arguments(store):
    ds = open_store(store)
    with pytest.raises(ValueError, match="reference 'nope' is not a checkpoint"):
        dl.drift(ds, reference="nope", progress=False)
    with pytest.raises(ValueError, match="unknown metric"):
        dl.drift(ds, metrics=("mmd", "kl"), progress=False)
    with pytest.raises(ValueError, match="not in the store"):
        dl.drift(ds, sites=("query",), progress=False)
