"""The activation store under faults: a kill or Ctrl-C at every step of its creation, and
concurrent writers (several processes creating one store and adding labels to it at once).

Kills are real ``SIGKILL``s of a forked child at a chosen metadata write (deterministic: the
child counts the store's writes and kills itself at write K, for every K); concurrent writers
are forked children released together. No model.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import numpy as np
import pytest

from driftlens.store import ActivationStore, StoreMismatchError, open_store, verify_store

from .test_store import _meta, _tokens

pytestmark = pytest.mark.heavy      # forks a child per kill point: a few seconds


def _rows(label: str) -> dict[str, np.ndarray]:
    """The rows a writer of ``label`` stores: a function of the label, so any writer's result can be checked."""
    rng = np.random.default_rng([ord(c) for c in label])
    return {"embed": rng.normal(size=(10, 6)), "hidden": rng.normal(size=(3, 10, 6)),
            "key": rng.normal(size=(3, 10, 4))}


def _capture_one(path, label: str) -> None:
    """What a capture does to the store for one checkpoint: open or create, slot, rows, complete."""
    store = ActivationStore(path, _meta(), _tokens())
    i = store.slot(label)
    for site, a in _rows(label).items():
        store.write(site, i, 0, a.astype(np.float32))
    store.mark_complete(label, {"source": label})


def _assert_valid(path, labels) -> None:
    assert verify_store(path, "full") == ([], [])
    ds = open_store(path, verify="full")
    assert sorted(ds.checkpoint.values.astype(str)) == sorted(labels)
    for label in labels:
        for site, a in _rows(label).items():
            np.testing.assert_allclose(ds[site].sel(checkpoint=label).values, a.astype(np.float32), err_msg=label)
    assert not list(path.parent.glob(f".{path.name}.creating-*")), "a temporary creation folder was left behind"


def _count_writes(monkeypatch, on_write) -> None:
    """Call ``on_write()`` before every file write of the store: zarr's metadata and chunk writes, the
    records, and the renames that publish a store or a record."""
    import zarr.storage

    set_ = zarr.storage.LocalStore.set

    async def counted(self, key, value):
        on_write()
        return await set_(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", counted)
    for name in ("rename", "replace"):
        real = getattr(os, name)

        def wrapped(*args, _real=real, **kwargs):
            on_write()
            return _real(*args, **kwargs)

        monkeypatch.setattr(os, name, wrapped)


def _in_child(fn) -> int:
    """Run ``fn()`` in a forked child; its wait status."""
    pid = os.fork()
    if pid == 0:                                   # the child: never returns into pytest
        code = 1
        try:
            fn()
            code = 0
        finally:
            os._exit(code)
    return os.waitpid(pid, 0)[1]


def _between_steps(monkeypatch, on_step) -> None:
    """Call ``on_step()`` in the main thread after each zarr operation returns and before each rename:
    where a Ctrl-C (delivered to the main thread) lands between two steps."""
    import zarr.core.sync

    real_wait = zarr.core.sync.wait

    def wait(*args, **kwargs):
        out = real_wait(*args, **kwargs)
        on_step()
        return out

    monkeypatch.setattr(zarr.core.sync, "wait", wait)
    for name in ("rename", "replace"):
        real = getattr(os, name)

        def wrapped(*args, _real=real, **kwargs):
            if threading.current_thread() is threading.main_thread():     # not zarr's own I/O threads
                on_step()
            return _real(*args, **kwargs)

        monkeypatch.setattr(os, name, wrapped)


def _creation_writes(tmp_path) -> int:
    """How many writes creating a store takes (up to and including the rename that publishes it)."""
    n = [0]
    with pytest.MonkeyPatch.context() as mp:
        _count_writes(mp, lambda: n.__setitem__(0, n[0] + 1))
        ActivationStore(tmp_path / "count.zarr", _meta(), _tokens())
    return n[0]


def test_a_kill_at_any_step_of_store_creation_leaves_a_store_the_rerun_completes(tmp_path):
    """SIGKILL before each write of the creation (and after the last): the rerun gives a whole store.

    Before creation was atomic, a kill after the group's zarr.json was written left a folder every
    rerun refused ("is a zarr group but not a driftlens store")."""
    n = _creation_writes(tmp_path)
    assert n >= 20                                 # every array's metadata, the coordinates, the records
    for k in range(1, n + 2):
        path = tmp_path / f"k{k}" / "s.zarr"
        path.parent.mkdir()

        def killed_at_write_k(k=k, path=path):
            seen = [0]

            def on_write():
                seen[0] += 1
                if seen[0] == k:
                    os.kill(os.getpid(), signal.SIGKILL)

            with pytest.MonkeyPatch.context() as mp:
                _count_writes(mp, on_write)
                _capture_one(path, "base")

        status = _in_child(killed_at_write_k)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (k, status)
        assert not path.exists() or (path / "zarr.json").exists(), k     # no store, or a whole one
        _capture_one(path, "base")                 # the rerun (another process id: the leftover is removed)
        _assert_valid(path, ["base"])


@pytest.mark.parametrize("fault", [KeyboardInterrupt, OSError])
def test_ctrl_c_or_an_error_during_creation_leaves_nothing(tmp_path, fault):
    """Ctrl-C (or a failed write) between any two steps of the creation: no temporary folder, no
    store or a whole one, and the rerun completes it."""
    counted = [0]
    with pytest.MonkeyPatch.context() as mp:
        _between_steps(mp, lambda: counted.__setitem__(0, counted[0] + 1))
        ActivationStore(tmp_path / "count.zarr", _meta(), _tokens())
    assert counted[0] >= 20
    for k in range(1, counted[0] + 1):
        path = tmp_path / f"k{k}" / "s.zarr"
        path.parent.mkdir()
        seen = [0]

        def on_step(k=k, seen=seen):
            seen[0] += 1
            if seen[0] == k:
                raise fault("injected")

        with pytest.MonkeyPatch.context() as mp, pytest.raises(fault):
            _between_steps(mp, on_step)
            ActivationStore(path, _meta(), _tokens())
        left = list(path.parent.iterdir())           # no temporary folder; no store, or a whole one
        assert left == [] or (left == [path] and verify_store(path, "full") == ([], [])), (k, left)
        _capture_one(path, "base")
        _assert_valid(path, ["base"])


def test_a_store_left_unfinished_by_an_older_driftlens_names_the_command_that_clears_it(tmp_path):
    """Before creation was atomic a kill left ``{"attributes": {}}`` and empty arrays: say what to do."""
    import zarr

    path = tmp_path / "s.zarr"
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    root.create_array("checkpoint", shape=(0,), chunks=(256,), dtype=str, dimension_names=("checkpoint",))
    for fn in (lambda: ActivationStore(path, _meta(), _tokens()), lambda: open_store(path)):
        with pytest.raises(StoreMismatchError, match=rf"creation was interrupted.*rm -r {path}"):
            fn()
    empty = tmp_path / "e.zarr"
    zarr.open_group(str(empty), mode="w", zarr_format=3)
    with pytest.raises(StoreMismatchError, match=rf"empty zarr group.*rm -r {empty}"):
        ActivationStore(empty, _meta(), _tokens())


def _together(path, labels, delay: float = 0.3) -> list[int]:
    """Fork one writer per label; all start at the same moment (a shared start time)."""
    start = time.time() + delay
    pids = []
    for label in labels:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                time.sleep(max(0.0, start - time.time()))
                _capture_one(path, label)
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    return [os.waitpid(pid, 0)[1] for pid in pids]


@pytest.mark.parametrize("existing", [False, True], ids=["new store", "existing store"])
def test_concurrent_captures_of_different_labels_all_complete(tmp_path, existing):
    """Three processes add their label to one store at once, five times over: every label ends
    completed with its own rows. Before the root attributes were re-read under a lock, one
    capture's `completed` (or `checkpoints`) update overwrote another's; when the store was new,
    the processes that lost the race to create it were refused with a misleading message."""
    for rep in range(5):
        path = tmp_path / f"r{rep}" / "s.zarr"
        labels = [f"ft{j}" for j in range(3)]
        if existing:
            _capture_one(path, "base")
        statuses = _together(path, labels)
        assert all(os.WIFEXITED(s) and os.WEXITSTATUS(s) == 0 for s in statuses), (rep, statuses)
        _assert_valid(path, (["base"] if existing else []) + labels)
        attrs = json.loads((path / "zarr.json").read_text())["attributes"]
        assert sorted(attrs["checkpoints"]) == sorted(attrs["completed"]), rep


def test_a_url_store_whose_creation_did_not_finish_is_built_again(tmp_path):
    """A store at a URL cannot be renamed into place: it is tagged `creating` until whole; readers refuse
    it with the way out, and the next capture builds it again."""
    import uuid

    fsspec = pytest.importorskip("fsspec")
    pytest.importorskip("upath")
    import zarr

    from driftlens.store import location

    url = f"memory://driftlens-{uuid.uuid4().hex[:8]}/s.zarr"
    try:
        seen = [0]

        def on_write():
            seen[0] += 1
            if seen[0] == 12:                                  # (as a kill would: the writes stop here)
                raise OSError("injected")

        with pytest.MonkeyPatch.context() as mp, pytest.raises(OSError, match="injected"):
            import zarr.storage

            set_ = zarr.storage.FsspecStore.set

            async def counted(self, key, value):
                on_write()
                return await set_(self, key, value)

            mp.setattr(zarr.storage.FsspecStore, "set", counted)
            ActivationStore(url, _meta(), _tokens())
        assert zarr.open_group(url, mode="r").attrs["creating"] is True
        with pytest.raises(StoreMismatchError, match="creation was interrupted"):
            open_store(url)
        _capture_one(url, "base")
        assert verify_store(url, "full") == ([], [])
        assert list(open_store(url).checkpoint.values.astype(str)) == ["base"]
    finally:
        fsspec.filesystem("memory").rm(str(location(url).path).split("/")[0], recursive=True)


def test_a_full_disk_while_writing_a_record_names_the_file_and_keeps_the_previous_one(tmp_path):
    """The records go through driftlens.outputs.atomic_write: a full disk is an EnvironmentProblem naming the
    record file (it was a bare OSError naming nothing), and the record written before is intact."""
    import errno

    from driftlens.errors import EnvironmentProblem
    from driftlens.store import read_record, write_record

    path = tmp_path / "s.zarr"
    _capture_one(path, "base")
    before = read_record(path, 0)
    real = os.replace

    def full(src, dst, *a, **k):
        if str(dst).endswith(os.path.join("records", "0.json")):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst, *a, **k)

    with pytest.MonkeyPatch.context() as mp, pytest.raises(EnvironmentProblem, match=r"records/0\.json: no space"):
        mp.setattr(os, "replace", full)
        write_record(path, "base", 0, ["hidden"], {"source": "other"})
    assert read_record(path, 0) == before
    assert not [p for p in (path / "checkpoint" / "records").iterdir() if p.name.endswith(".tmp")]
