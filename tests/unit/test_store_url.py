"""A store at an fsspec URL (``memory://``): written through zarr, verified and reported like a folder.

Tier: unit (synthetic stores; no model). Needs the ``scale`` extra (universal_pathlib, fsspec).
"""
from __future__ import annotations

import uuid

import numpy as np
import pytest
import xarray as xr

import driftlens as dl
from driftlens.store import ActivationStore, checkpoint_chunks, location, open_store, verify_store
from driftlens.testing import make_store

fsspec = pytest.importorskip("fsspec")
pytest.importorskip("upath")


@pytest.fixture
def url():
    name = f"memory://driftlens-{uuid.uuid4().hex[:8]}"
    yield f"{name}/run.zarr"
    fsspec.filesystem("memory").rm(name.split("://")[1], recursive=True)


def test_a_url_store_holds_reads_and_reports_what_a_folder_store_does(tmp_path, url):
    local = make_store(tmp_path / "run.zarr", seed=5)
    remote = make_store(url, seed=5)
    assert not isinstance(remote, type(local))                # a UPath, not a local Path
    a, b = open_store(local, verify="full"), open_store(url, verify="full")
    for site in a.data_vars:
        np.testing.assert_array_equal(b[site].values, a[site].values)
    opts = dict(metrics=("mmd", "paired_shift", "gap", "mir"), n_permutations=100, n_bootstrap=100, progress=False)
    there, here = dl.drift(url, **opts), dl.drift(local, **opts)
    assert there.attrs.pop("store_path") == url and here.attrs.pop("store_path") == str(local.resolve())
    xr.testing.assert_identical(there, here)                  # the same report but for where its store is


def test_the_writer_falls_back_to_zarr_writes_at_a_url(url):
    from tests.unit.test_store import _meta, _tokens

    st = ActivationStore(url, _meta(), _tokens())
    assert st.raw_chunk_file("hidden", (0, 0, 0, 0)) is None
    i = st.slot("base")
    rows = np.random.default_rng(0).normal(size=(3, 10, 6)).astype(np.float32)
    w = st.writer(i)
    w.add("hidden", 0, rows[:, :4])
    w.add("hidden", 4, rows[:, 4:])
    w.close()
    np.testing.assert_array_equal(np.asarray(st.root["hidden"][i]), rows)


def test_a_damaged_chunk_at_a_url_is_found_by_the_full_check(url):
    make_store(url, seed=1)
    rel, _, _ = checkpoint_chunks(url, "hidden", 2)[0]          # the `shifted` checkpoint's first chunk
    f = location(url) / rel
    body = bytearray(f.read_bytes())
    body[0] ^= 0xFF
    f.write_bytes(bytes(body))
    assert verify_store(url, "fast") == ([], [])               # same size: only the checksum sees it
    problems, _ = verify_store(url, "full")
    assert [(p.label, p.site) for p in problems] == [("shifted", "hidden")]
    with pytest.raises(dl.StoreIntegrityError, match="shifted"):
        open_store(url, verify="full")
