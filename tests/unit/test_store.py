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
        "cluster": np.array([f"c{i // 10}" for i in range(n)]),
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
    assert set(ds.coords) >= {"sample", "group", "cluster", "position", "modality", "lang", "checkpoint", "layer"}
    assert ds.cluster.values.tolist() == ["c0"] * 10
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


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_writer_streams_rows_across_chunks(tmp_path, monkeypatch, dtype):
    """CheckpointWriter writes rows straight into the chunk files; zarr reads back exactly them.

    Small chunks (7 rows for width 6) and uneven blocks so blocks straddle chunk boundaries and
    the last chunk is an edge chunk (padded to full size on disk); per-layer lists and stacked
    arrays both accepted; float16 storage casts.
    """
    import driftlens.store as store_mod

    monkeypatch.setattr(store_mod, "_chunk_rows", lambda width, itemsize, n: 7)
    n = 30
    toks = _tokens(n)
    st = ActivationStore(tmp_path / "s.zarr", _meta(dtype=dtype), toks)
    rng = np.random.default_rng(3)
    data = {"embed": rng.normal(size=(n, 6)), "hidden": rng.normal(size=(3, n, 6)),
            "key": rng.normal(size=(3, n, 4))}
    w = st.writer(st.slot("base"))
    start = 0
    for size in (4, 9, 1, 10, 6):                       # 30 rows in uneven blocks
        for s, a in data.items():
            part = a[start:start + size] if s == "embed" else a[:, start:start + size]
            part = part.astype(np.float32)
            w.add(s, start, part if s != "key" else [layer for layer in part])   # key as a list of layers
        start += size
    w.close()
    st.mark_complete("base")
    assert st.raw_chunk_file("hidden", (0, 0, 0, 0)) is not None
    chunk_file = tmp_path / "s.zarr" / "hidden" / "c" / "0" / "2" / "4" / "0"      # edge chunk: rows 28..29
    assert chunk_file.stat().st_size == 7 * 6 * np.dtype(dtype).itemsize
    ds = open_store(tmp_path / "s.zarr")
    for s, a in data.items():
        got = ds[s].sel(checkpoint="base").values
        assert got.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(got, a.astype(np.float32).astype(dtype))
    with pytest.raises(ValueError, match="in order"):
        w2 = st.writer(st.slot("next"))
        w2.add("embed", 0, data["embed"][:3].astype(np.float32))
        w2.add("embed", 5, data["embed"][5:8].astype(np.float32))
    w2.close()


def test_writer_falls_back_to_zarr_for_encoded_chunks(tmp_path, monkeypatch):
    """A store whose chunks are not plain bytes (e.g. compressed) is written through zarr."""
    monkeypatch.setattr(ActivationStore, "raw_chunk_file", lambda self, site, coords: None)
    st = ActivationStore(tmp_path / "s.zarr", _meta(), _tokens())
    rng = np.random.default_rng(4)
    hidden = rng.normal(size=(3, 10, 6)).astype(np.float32)
    w = st.writer(st.slot("base"))
    w.add("hidden", 0, hidden[:, :4])
    w.add("hidden", 4, [layer for layer in hidden[:, 4:]])
    w.close()
    st.mark_complete("base")
    np.testing.assert_array_equal(open_store(tmp_path / "s.zarr").hidden.sel(checkpoint="base").values, hidden)
