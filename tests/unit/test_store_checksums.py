"""The capture writer's CRC32s (computed from the bytes it writes, off the end of the checkpoint) are the
ones a read-back gives, so the checkpoint record is the same file either way."""
from __future__ import annotations

import json

import numpy as np
import pytest

import driftlens.store as store_mod
from driftlens.store import ActivationStore, checkpoint_chunks, verify_store, write_record

from .test_store import _meta, _tokens


def _write(st, label, seed, n):
    rng = np.random.default_rng(seed)
    data = {"embed": rng.normal(size=(n, 6)), "hidden": rng.normal(size=(3, n, 6)), "key": rng.normal(size=(3, n, 4))}
    w = st.writer(st.slot(label))
    start = 0
    for size in (4, 9, 1, 10, 6):                       # 30 rows in uneven blocks, across 7-row chunks
        for s, a in data.items():
            part = (a[start:start + size] if s == "embed" else a[:, start:start + size]).astype(np.float32)
            w.add(s, start, part if s != "key" else list(part))
        start += size
    w.close()
    return w


def _read_back(st, index):
    return {str(st.path / rel): (f.stat().st_size, store_mod._crc32(f))
            for site in st.meta["sites"] for rel, _, _ in checkpoint_chunks(st.path, site, index)
            if (f := st.path / rel).exists()}


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_writer_checksums_equal_the_files_read_back(tmp_path, monkeypatch, dtype):
    monkeypatch.setattr(store_mod, "_chunk_rows", lambda width, itemsize, n: 7)
    st = ActivationStore(tmp_path / "s.zarr", _meta(dtype=dtype), _tokens(30))
    w = _write(st, "base", 0, 30)
    got, disk = w.checksums(), _read_back(st, 0)
    assert got == disk and len(disk) == 3 * 5 * 2 + 5           # every chunk file, edge chunks' padding included
    write_record(st.path, "base", 0, st.meta["sites"], known=got)
    record = (st.path / "checkpoint" / "records" / "0.json").read_text()
    write_record(st.path, "base", 0, st.meta["sites"])             # read back from disk
    assert (st.path / "checkpoint" / "records" / "0.json").read_text() == record


def test_a_rewritten_checkpoint_with_an_old_tail_is_read_back(tmp_path, monkeypatch):
    """A capture that rewrites a checkpoint opens its old chunk files: bytes it does not write (an edge
    chunk's padding) are whatever was there, so that file's checksum comes from the disk."""
    monkeypatch.setattr(store_mod, "_chunk_rows", lambda width, itemsize, n: 7)
    st = ActivationStore(tmp_path / "s.zarr", _meta(), _tokens(30))
    _write(st, "base", 0, 30)
    edge = st.raw_chunk_file("hidden", (0, 0, 4, 0))                  # rows 28..34 of 30: 5 rows of padding
    with open(edge, "r+b") as fh:
        fh.seek(2 * 6 * 4)
        fh.write(b"\x07" * 8)                                          # something left in the padding
    w = _write(st, "base", 1, 30)
    got = w.checksums()
    assert str(edge) not in got and len(got) == 3 * 5 * 2 + 5 - 7     # the 7 edge chunks (embed, 3 + 3 layers)
    assert all(_read_back(st, 0)[k] == v for k, v in got.items())
    st.mark_complete("base", known=got)
    assert json.loads((st.path / "checkpoint" / "records" / "0.json").read_text())["label"] == "base"
    problems, _ = verify_store(st.path, level="full")
    assert problems == []                                             # the record matches the files
