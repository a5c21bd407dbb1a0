"""Integrity without holes: the store's coordinates and identity are checksummed, a missing record is
damage in a store made with records, and every report says what check its data passed.

No model; synthetic stores (``driftlens.testing.make_store``), damaged by hand.
"""
from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import zarr

import driftlens as dl
from driftlens.errors import StoreIntegrityError
from driftlens.store import open_store, verify_store
from driftlens.testing import make_store

from ..badinput import clean_exit, cli, refused

FAST = dict(metrics=("mmd",), n_permutations=20, n_bootstrap=20, progress=False)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("integrity") / "s.zarr")


@pytest.fixture
def store(pristine, tmp_path):
    return shutil.copytree(pristine, tmp_path / "s.zarr")


def _attrs(store) -> dict:
    return json.loads((store / "zarr.json").read_text())["attributes"]


def _set_attrs(store, **changes) -> None:
    body = json.loads((store / "zarr.json").read_text())
    for k, v in changes.items():
        if v is None:
            body["attributes"].pop(k, None)
        else:
            body["attributes"][k] = v
    (store / "zarr.json").write_text(json.dumps(body))


def _refused_everywhere(store, *named) -> None:
    """fast and full checks, open_store and drift all refuse the store, naming ``named``."""
    for level in ("fast", "full"):
        problems, _ = verify_store(store, level)
        text = "\n".join(map(str, problems))
        assert problems and all(n in text for n in named), (level, text)
    with pytest.raises(StoreIntegrityError) as err:
        open_store(store)
    assert all(n in str(err.value) for n in named), str(err.value)
    with pytest.raises(StoreIntegrityError):
        dl.drift(store, **FAST)


def test_visual_rows_rewritten_as_text_are_caught(store):
    """The issue's case: every visual row's modality rewritten as `text` passed `check` and changed the report."""
    mod = zarr.open_array(str(store), path="modality", mode="r+")
    values = np.array([str(v) for v in np.asarray(mod[:]).tolist()])
    assert (values == "visual").sum() >= 200
    mod[:] = np.full(values.shape, "text")
    _refused_everywhere(store, "modality/c/0")
    with pytest.raises(StoreIntegrityError, match="(?s)token coordinates are damaged.*new --out"):
        open_store(store)                                           # no --overwrite repairs a coordinate


@pytest.mark.parametrize("name", ["modality", "cluster", "sample", "group", "lang", "position", "layer"])
def test_a_bit_flip_in_any_coordinate_is_caught(store, name):
    f = store / name / "c" / "0"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    _refused_everywhere(store, f"{name}/c/0")


def test_a_deleted_coordinate_chunk_is_caught(store):
    (store / "cluster" / "c" / "0").unlink()
    _refused_everywhere(store, "cluster/c/0", "missing")


def test_swapped_checkpoint_labels_are_caught(store):
    """xarray labels rows by the `checkpoint` coordinate: swapping two of its values swaps the report's rows."""
    c = zarr.open_array(str(store), path="checkpoint", mode="r+")
    labels = [str(v) for v in np.asarray(c[:]).tolist()]
    c[:] = np.asarray([labels[0], labels[2], labels[1]])
    _refused_everywhere(store, "slot 1", "'same'")


@pytest.mark.parametrize("key, value", [
    ("dims", {"hidden": 12, "key": 8, "final": 12}),
    ("layers", [0, 2, 1]),
    ("probe_fingerprint", "edited"),
    ("token_selection", "other"),
    ("sites", ["hidden", "key"]),
    ("format_version", None),            # removed: the store would pass for one made before the records
])
def test_an_edited_identity_attribute_is_caught(store, key, value):
    _set_attrs(store, **{key: value})
    _refused_everywhere(store, "zarr.json", repr(key))


def test_edited_array_metadata_is_caught(store):
    f = store / "hidden" / "zarr.json"
    meta = json.loads(f.read_text())
    meta["data_type"] = "int32"
    f.write_text(json.dumps(meta))
    assert [p.file for p in verify_store(store)[0]] == ["hidden/zarr.json"]
    with pytest.raises(StoreIntegrityError, match="hidden/zarr.json"):
        open_store(store)


@pytest.mark.parametrize("record", ["1.json", "store.json"])
def test_a_missing_record_in_a_store_made_with_records_is_damage(store, record):
    """Before: a deleted record turned its checkpoint into a 'legacy' one, whose altered chunks passed."""
    (store / "checkpoint" / "records" / record).unlink()
    _refused_everywhere(store, record, "missing")


def _legacy(store) -> None:
    """The store as a driftlens before format_version 2 wrote it: no store record, no format_version."""
    (store / "checkpoint" / "records" / "store.json").unlink()
    _set_attrs(store, format_version=None)


def test_a_store_made_before_the_records_is_opened_with_a_note_in_the_report(store):
    _legacy(store)
    (store / "checkpoint" / "records" / "1.json").unlink()         # and a checkpoint from before records
    problems, notes = verify_store(store, "full")
    assert problems == [] and len(notes) == 2
    with pytest.warns(UserWarning) as caught:
        rep = dl.drift(store, **FAST)
    said = " ".join(str(w.message) for w in caught)
    assert "before driftlens checksummed" in said and "'same' has no integrity record" in said
    assert "before driftlens checksummed" in rep.attrs["warnings"]
    assert "'same' has no integrity record" in rep.attrs["warnings"]
    assert rep.attrs["verify"] == "full"


def test_every_report_records_its_verify_level(pristine):
    for level in ("full", "fast"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")                         # an intact store: nothing to warn about
            assert dl.drift(pristine, verify=level, **FAST).attrs["verify"] == level
    with pytest.warns(UserWarning, match="unchecked"):
        rep = dl.drift(pristine, verify="none", **FAST)
    assert rep.attrs["verify"] == "none" and "unchecked" in rep.attrs["warnings"]
    opened = open_store(pristine, verify="none")                   # a Dataset opened unchecked, checked by drift
    assert dl.drift(opened, verify="fast", **FAST).attrs["verify"] == "fast"
    assert dl.drift(open_store(pristine, verify="full"), verify="fast", **FAST).attrs["verify"] == "full"
    with pytest.warns(UserWarning, match="unchecked"):
        assert dl.drift(opened, verify="none", **FAST).attrs["verify"] == "none"
    loaded = open_store(pristine).load()
    loaded.attrs.pop("store_path")
    assert dl.drift(loaded, **FAST).attrs["verify"] == "not a store"


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_verify_none_does_not_read_a_missing_chunk_as_zeros(store, damage):
    """Before: the deleted chunk read as zeros (MMD^2 1.35 instead of 0.11) without a word, and a cut
    one failed with a message that named no chunk."""
    from driftlens.store import checkpoint_chunks

    index = _attrs(store)["checkpoints"].index("shifted")
    rel = next(r for r, lay, _ in checkpoint_chunks(store, "hidden", index) if lay == 1)
    if damage == "delete":
        (store / rel).unlink()
    else:
        (store / rel).write_bytes((store / rel).read_bytes()[:100])
    with pytest.warns(UserWarning, match="unchecked"), pytest.raises(StoreIntegrityError, match=rel):
        dl.drift(store, verify="none", **FAST)


@pytest.mark.heavy
def test_the_cli_refuses_a_rewritten_coordinate_and_warns_under_verify_none(store, tmp_path):
    out = tmp_path / "r.nc"
    err = clean_exit(cli("drift", store, "--verify", "none", "--out", out, "--permutations", "20",
                         "--bootstrap", "20", "--no-progress"))
    assert "driftlens drift: warning:" in err and "unchecked" in err
    assert dl.load_report(out).attrs["verify"] == "none"
    zarr.open_array(str(store), path="modality", mode="r+")[:] = "text"
    refused(cli("check", store), "data", "modality/c/0")
    refused(cli("check", store, "--fast"), "data", "modality/c/0")
    refused(cli("drift", store, "--permutations", "20", "--bootstrap", "20", "--no-progress"), "data", "modality")
