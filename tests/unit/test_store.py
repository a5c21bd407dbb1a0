"""Activation store on synthetic data: layout, resumability, refusal to mix."""
from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from driftlens.store import ActivationStore, StoreMismatchError, open_store


def _tokens(n=10):
    return {
        "sample": np.array([f"p{i // 5}" for i in range(n)]),
        "group": np.array([f"g{i // 5}" for i in range(n)]),
        "position": np.arange(n) % 5,
        "modality": np.array(["visual", "visual", "text", "text", "text"] * (n // 5)),
        "lang": np.array(["en"] * n),
    }


def _meta(**kw):
    meta = {"model_type": "llava", "family": "llava", "probe_set": "x", "probe_fingerprint": "f" * 8,
            "n_layers": 3, "layers": [0, 1, 2], "sites": ["embed", "hidden", "key"],
            "dims": {"embed": 6, "hidden": 6, "key": 4}, "dtype": "float32", "token_selection": "t"}
    meta.update(kw)
    return meta


def _fill(store, label, rng, upto=None):
    i = store.slot(label)
    data = {"embed": rng.normal(size=(10, 6)), "hidden": rng.normal(size=(3, 10, 6)),
            "key": rng.normal(size=(3, 10, 4))}
    for s, a in data.items():
        if upto is None:
            store.write(s, i, 0, a.astype(np.float32))
        else:   # two blocks of rows, like two batches
            store.write(s, i, 0, (a[:upto] if s == "embed" else a[:, :upto]).astype(np.float32))
            store.write(s, i, upto, (a[upto:] if s == "embed" else a[:, upto:]).astype(np.float32))
    return data


def test_layout_and_values(tmp_path):
    rng = np.random.default_rng(0)
    st = ActivationStore(tmp_path / "s.zarr", _meta(), _tokens())
    a = _fill(st, "base", rng, upto=4)
    st.mark_complete("base")
    b = _fill(st, "ft", rng)
    st.mark_complete("ft")
    ds = open_store(tmp_path / "s.zarr")
    assert isinstance(ds, xr.Dataset)
    assert ds.hidden.dims == ("checkpoint", "layer", "token", "hidden_dim")
    assert ds.key.dims == ("checkpoint", "layer", "token", "key_dim")
    assert ds.embed.dims == ("checkpoint", "token", "hidden_dim")
    assert list(ds.checkpoint.values.astype(str)) == ["base", "ft"]
    np.testing.assert_allclose(ds.hidden.sel(checkpoint="base").values, a["hidden"], rtol=1e-6)
    np.testing.assert_allclose(ds.key.sel(checkpoint="ft").values, b["key"], rtol=1e-6)
    np.testing.assert_allclose(ds.embed.sel(checkpoint="ft").values, b["embed"], rtol=1e-6)
    assert set(ds.coords) >= {"sample", "group", "position", "modality", "lang", "checkpoint", "layer"}
    assert list(ds.modality.values.astype(str)[:3]) == ["visual", "visual", "text"]
    # plain xarray reads it too
    raw = xr.open_zarr(tmp_path / "s.zarr", consolidated=False)
    assert raw.hidden.shape == (2, 3, 10, 6)


def test_incomplete_checkpoint_hidden_and_redone(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "s.zarr"
    st = ActivationStore(path, _meta(), _tokens())
    _fill(st, "base", rng)
    st.mark_complete("base")
    st.slot("ft")                      # started, never completed (as after a kill)
    assert list(open_store(path).checkpoint.values.astype(str)) == ["base"]
    assert list(open_store(path, include_incomplete=True).checkpoint.values.astype(str)) == ["base", "ft"]
    st2 = ActivationStore(path, _meta(), _tokens())   # reopen: slot is idempotent
    assert st2.slot("ft") == 1
    assert st2.completed == ["base"]


def test_refuses_other_identity(tmp_path):
    path = tmp_path / "s.zarr"
    ActivationStore(path, _meta(), _tokens())
    with pytest.raises(StoreMismatchError, match="another probe set"):
        ActivationStore(path, _meta(probe_fingerprint="other"), _tokens())
    with pytest.raises(StoreMismatchError, match="another architecture"):
        ActivationStore(path, _meta(model_type="qwen2_vl"), _tokens())
    with pytest.raises(StoreMismatchError, match="feature sizes"):
        ActivationStore(path, _meta(dims={"embed": 6, "hidden": 8, "key": 4}), _tokens())
    with pytest.raises(StoreMismatchError, match="token rows"):
        ActivationStore(path, _meta(), _tokens(15))


def test_not_a_store(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    with pytest.raises(StoreMismatchError, match="not a driftlens store"):
        ActivationStore(tmp_path / "junk", _meta(), _tokens())
    with pytest.raises(FileNotFoundError, match="no driftlens store"):
        open_store(tmp_path / "missing")
