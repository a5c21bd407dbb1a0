"""The activation store: captured vectors as an xarray Dataset on zarr.

Layout (zarr v3, one group; every array carries ``dimension_names`` so ``xarray.open_zarr``
reads it directly)::

    embed   (checkpoint, token, hidden_dim)           # input of decoder block 0 (HF hidden_states[0])
    final   (checkpoint, token, hidden_dim)           # the decoder's final norm output (HF hidden_states[-1])
    hidden  (checkpoint, layer, token, hidden_dim)    # output of block l (HF hidden_states[l + 1])
    key     (checkpoint, layer, token, key_dim)       # block l's k_proj output
    query   (checkpoint, layer, token, query_dim)     # optional
    coordinates: checkpoint (str), layer (int), sample / group / cluster / position / modality / lang on token

Chunks are one (checkpoint, layer) slab split along ``token`` into blocks of about 8 MB, so
a metric streams one (checkpoint, layer) at a time.

Chunks are stored uncompressed (activations barely compress and encoding cost more than the
forward pass), so :class:`CheckpointWriter` writes captured rows straight into their place in
the chunk files, whose names come from zarr's chunk-key encoding; zarr reads them back.

Nothing lost, nothing mixed: metadata is written by zarr (atomically); the root attributes
hold ``checkpoints`` (every label a capture has started, in trajectory order) and
``completed`` (labels whose every row has been written, set after the last write returned).
A checkpoint that is started but not completed is redone by the next capture;
:func:`open_store` shows only completed ones. A store
refuses data from another probe set (fingerprint), another architecture (model type, layer
count, feature sizes) or another token selection.

Nothing half-made: a new local store is built in a temporary sibling folder
(``.<name>.creating-<host>-<pid>-<random>``) and renamed into place once complete, so a capture
killed while it creates the store leaves either no store or a whole one (the leftover folder is
removed by the next capture on that machine). A store at a URL, which cannot be renamed, carries
a ``creating`` attribute until its creation finished, and the next capture builds it again.
The read-modify-writes of the root attributes (the checkpoint list, the completed list) hold a
lock -- an ``flock`` on ``checkpoint/records/.lock`` for a local store, a cluster-wide
``distributed.Lock`` for a capture task on a Dask worker -- and re-read the attributes under it,
so concurrent captures adding labels to one store never lose each other's updates.

Nothing silently damaged: when a checkpoint completes, a record of it is written to
``checkpoint/records/<slot>.json`` (inside the folder of the ``checkpoint`` coordinate, which
zarr does not list): the size and CRC32 of every chunk file of that checkpoint, and the
checkpoint's identity (its source path, a fingerprint of its weights, the capture options).
At creation, ``checkpoint/records/store.json`` records what the whole store's meaning rests on:
the root attributes that identify it (sites, dims, layers, probe fingerprint, token selection
...), a checksum of every array's metadata and the size and CRC32 of every chunk file of the
coordinate arrays (``layer``, ``sample``, ``group``, ``cluster``, ``position``, ``modality``,
``lang``); the root attribute ``format_version`` (2) says the store was made with these records,
so a missing record is damage, not an old store. :func:`open_store` checks the store record and
the presence and size of every chunk of the checkpoints it shows (small files and a stat per
chunk); :func:`driftlens.drift` and ``driftlens check`` also compare the checksums. A chunk,
coordinate or identity deleted, cut or altered after capture is reported with its file (and a
chunk with its checkpoint, site, layer and token rows) -- never read back as zeros.
"""
from __future__ import annotations

import contextlib
import contextvars
import errno
import itertools
import json
import os
import shutil
import socket
import threading
import uuid
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np

from driftlens._version import install_hint
from driftlens.errors import DataError, EnvironmentProblem, UsageError
from driftlens.schema import SITE_DIMS, SITES, TOKEN_COORDS, UNLAYERED

if TYPE_CHECKING:
    import torch
    import xarray as xr

CHUNK_BYTES = 8 * 2**20
RECORDS = ("checkpoint", "records")   # folder of the per-checkpoint records, inside the `checkpoint` array
RECORD_FORMAT = "driftlens-record/1"
STORE_FORMAT = "driftlens-store/1"     # the root attribute ``format`` of every driftlens store
#: ``format_version`` of the stores this version creates: 2 = made with a store record (coordinates and
#: identity checksummed) and a record per completed checkpoint. Stores without it predate both.
FORMAT_VERSION = 2
STORE_RECORD = "store.json"            # in the records folder
STORE_RECORD_FORMAT = "driftlens-store-record/1"
LOCK_FILE = ".lock"                    # in the records folder: the flock of the root metadata's updates
CREATING = "creating"                  # root attribute of a store at a URL whose creation has not finished
MUTABLE_ATTRS = ("checkpoints", "completed")   # root attributes a capture updates (not in the store record)
Verify = Literal["full", "fast", "none"]
VERIFY_LEVELS: tuple[Verify, ...] = ("full", "fast", "none")


class StoreMismatchError(DataError):
    """The store at a path holds data that cannot be mixed with what is being written."""


#: Context manager factory guarding the root metadata's read-modify-writes (the checkpoint list,
#: the completed list). A no-op in one process; a capture task on a Dask worker sets it to a
#: cluster-wide ``distributed.Lock`` so that workers capturing into one store never lose an update.
METADATA_LOCK: contextvars.ContextVar = contextvars.ContextVar("driftlens_metadata_lock", default=None)


def location(path):
    """A store's location: a local :class:`~pathlib.Path`, or for an fsspec URL (``s3://``, ``gs://``,
    ``memory://`` ...) a ``upath.UPath`` with the same path API (``file://`` URLs are local paths).

    A remote store is read and written through zarr's own fsspec support; its records and checks go
    through the same UPath. Needs ``universal_pathlib`` and the URL's fsspec backend (``s3fs`` ...).
    """
    if not isinstance(path, (str, os.PathLike)) and hasattr(path, "protocol"):
        return path                                           # already a UPath
    text = os.fspath(path)
    if "://" not in text or text.startswith("file://"):
        return Path(text[len("file://"):] if text.startswith("file://") else text)
    try:
        import fsspec
        from upath import UPath
    except ImportError:
        raise EnvironmentProblem(f"{text}: a store at a URL needs universal_pathlib and fsspec: "
                                 f"{install_hint('scale')}") from None
    protocol = text.split("://", 1)[0]
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as exc:          # the URL's backend (s3fs, gcsfs ...) is not installed
        raise EnvironmentProblem(f"{text}: {exc} (the fsspec backend of {protocol}:// URLs)") from None
    except ValueError:
        raise UsageError(f"{text}: {protocol!r} is not a URL protocol fsspec knows; give a folder path or an "
                         f"fsspec URL (s3://, gs://, ...)") from None
    return UPath(text)


def is_local(path) -> bool:
    """Whether a store location is a local folder (raw chunk writes, atomic renames)."""
    return isinstance(path, Path)


_HELD = threading.local()                # stores whose file lock this thread holds (the lock is not reentrant)


def metadata_lock(path=None):
    """The lock of the root metadata's read-modify-writes.

    A local store's updates hold an exclusive ``flock`` on ``checkpoint/records/.lock`` (captures in
    several processes of one machine); a capture task on a Dask worker sets :data:`METADATA_LOCK`
    (a cluster-wide ``distributed.Lock``), held first. A store at a URL has no lock without Dask.
    """
    factory = METADATA_LOCK.get()
    local = path is not None and is_local(location(path))
    if factory is None:
        return _file_lock(location(path)) if local else contextlib.nullcontext()
    stack = contextlib.ExitStack()        # the cluster-wide lock, then (local stores) the file lock:
    stack.enter_context(factory())        # a capture outside Dask writing the same store is excluded too
    if local:
        stack.enter_context(_file_lock(location(path), required=False))
    return stack


_NO_FLOCK_WARNED: set = set()


@contextlib.contextmanager
def _file_lock(path: Path, required: bool = True):
    """An exclusive ``flock`` on the store's lock file. Where the file system refuses ``flock`` (some
    network mounts), the update goes ahead unlocked -- with a warning unless another lock is held."""
    try:
        import fcntl
    except ImportError:                   # no flock on this platform: one writer at a time is the user's to ensure
        yield
        return
    key = os.path.abspath(path)
    held = _HELD.__dict__.setdefault("paths", set())
    if key in held:                       # already held by this thread (a nested update)
        yield
        return
    f = path.joinpath(*RECORDS, LOCK_FILE)
    f.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            if required and key not in _NO_FLOCK_WARNED:
                _NO_FLOCK_WARNED.add(key)
                warnings.warn(f"{path}: the file system refuses flock ({exc}); captures writing this store at the "
                              f"same time may lose each other's checkpoint list updates", stacklevel=4)
            yield
            return
        held.add(key)
        try:
            yield
        finally:
            held.discard(key)
    finally:
        os.close(fd)                      # releases the lock


def _open_root(path, mode: str = "r+"):
    """The store's root group, its attributes read now (a zarr group caches them when opened)."""
    import zarr

    return zarr.open_group(str(path), mode=mode)


def update_root_attrs(path, update) -> dict:
    """Apply ``update(attrs) -> changes`` to the store's root attributes under the metadata lock.

    The attributes are re-read under the lock, so concurrent writers never lose each other's
    updates; ``changes`` (a dict, possibly empty) is written back. Returns the attributes after.
    """
    with metadata_lock(path):
        root = _open_root(path)
        attrs = dict(root.attrs)
        changes = update(attrs)
        if changes:
            root.attrs.update(changes)
            attrs.update(changes)
    return attrs


def register_checkpoints(root, sites, labels) -> dict[str, int]:
    """Give each label a slot on the checkpoint dim (appended in order; existing ones kept).

    ``root`` is the store's path. Idempotent, and writes nothing when every
    label already has its slot -- so many writers of one store can call it for their own label
    once a driver registered them all. The checkpoint list is re-read under the metadata lock,
    so captures adding labels concurrently all get their slot. Returns label -> slot.
    """
    path = location(root)
    with metadata_lock(path):
        root = _open_root(path)
        sites = list(sites if sites is not None else root.attrs["sites"])
        current = list(root.attrs.get("checkpoints", []))
        new = [lab for lab in dict.fromkeys(labels) if lab not in current]
        labels_all = current + new
        n = len(labels_all)
        if new:
            root.attrs["checkpoints"] = labels_all
        for site in sites:
            a = root[site]
            if a.shape[0] != n:
                a.resize((n,) + a.shape[1:])
        c = root["checkpoint"]
        if c.shape[0] != n or new or list(_strs(c[:])) != labels_all:     # (a kill between resize and write)
            c.resize((n,))
            c[:] = np.asarray(labels_all, dtype=str)
    return {lab: labels_all.index(lab) for lab in labels}


def _creating_prefix(path) -> str:
    """Name prefix of the temporary folders this machine builds a new store at ``path`` in."""
    return f".{path.name}.creating-{socket.gethostname()}-"


_BUILDING: set = set()       # temporary creation folders this process is building now


def remove_stale_creations(path) -> list[Path]:
    """Remove the temporary folders of store creations at ``path`` whose process is gone.

    Only folders made on this machine (the host name is in their name) by a process that no
    longer runs (a capture killed while it created the store), or by this process and no longer
    being built (an interrupted creation), are removed. Returns them.
    """
    path = location(path)
    prefix = _creating_prefix(path)
    removed = []
    for tmp in path.parent.glob(".*.creating-*"):
        if not tmp.name.startswith(prefix):
            continue
        pid = tmp.name[len(prefix):].split("-", 1)[0]
        if not pid.isdigit():
            continue
        if (int(pid) == os.getpid() and tmp not in _BUILDING) or not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _unfinished_creation(path, attrs: dict) -> bool:
    """Whether ``path`` is a store whose creation did not finish: tagged ``creating``, or (made by a
    driftlens before creation was atomic) a group with no attributes holding only driftlens's empty
    arrays (no checkpoint slot, so no captured data)."""
    if attrs.get("format") == STORE_FORMAT:
        return bool(attrs.get(CREATING))
    if attrs or not is_local(path):
        return False
    ours = {"zarr.json", "checkpoint", "layer", *TOKEN_COORDS, *SITES}
    names = {p.name for p in path.iterdir()}
    if "checkpoint" not in names or not names <= ours:
        return False
    f = path / "checkpoint" / "zarr.json"
    try:
        return not f.exists() or json.loads(f.read_text()).get("shape") == [0]
    except (OSError, json.JSONDecodeError):
        return False


def not_a_store_message(path, attrs: dict) -> str:
    """Why the zarr group at ``path`` is not a usable driftlens store, and the way out."""
    if _unfinished_creation(path, attrs):
        return (f"{path} is a driftlens store whose creation was interrupted (a capture killed while it created "
                f"the store); it holds no captured data: remove it (rm -r {path}) and rerun the capture")
    if not attrs and is_local(path) and {p.name for p in path.iterdir()} == {"zarr.json"}:
        return (f"{path} is an empty zarr group (no arrays, no attributes), not a driftlens store; a capture "
                f"killed while it created a store leaves one: remove it (rm -r {path}) and rerun the capture")
    return (f"{path} is a zarr group but not a driftlens store (its zarr.json has no driftlens format tag); "
            f"choose another --out, or open the store a capture wrote")


def _chunk_rows(width: int, itemsize: int, n_tokens: int) -> int:
    rows = max(64, CHUNK_BYTES // max(1, width * itemsize))
    return int(min(rows, max(1, n_tokens)))


class ActivationStore:
    """Writer side of the activation store (the reader is :func:`open_store`).

    Parameters
    ----------
    path : str or Path
        Folder of the zarr store; created when missing.
    meta : dict
        Identity of what is captured: ``model_type``, ``family``, ``probe_set``,
        ``probe_fingerprint``, ``n_layers``, ``layers`` (captured layer indices),
        ``sites``, ``dims`` (site -> width), ``dtype``, ``token_selection`` (hash).
        An existing store must agree on every one of these.
    tokens : dict of numpy arrays
        ``sample``, ``group``, ``cluster``, ``position``, ``modality``, ``lang``, one entry per token row.
    """

    def __init__(self, path, meta: dict, tokens: dict[str, np.ndarray]):
        self.path = location(path)
        self.meta = meta
        n_tokens = len(tokens["sample"])
        if not self._open_existing(meta, tokens):
            if is_local(self.path):
                self._create_local(meta, tokens, n_tokens)
            else:                           # a URL: built in place, marked `creating` until it is whole
                self._build(self.path, meta, tokens, n_tokens)
                self.root = _open_root(self.path)
        self.n_tokens = n_tokens
        self._chunk_rows: dict[str, int] = {}
        self._raw: dict[str, object] = {}        # site -> array metadata when chunks are plain bytes

    # -- creation and identity -------------------------------------------------------
    def _open_existing(self, meta: dict, tokens: dict[str, np.ndarray]) -> bool:
        """Open the store at ``self.path`` and check it matches; False when there is none to open."""
        f = self.path / "zarr.json"
        if not f.exists():
            if self.path.exists() and any(self.path.iterdir()):
                raise StoreMismatchError(
                    f"{self.path} exists and is not a driftlens store (no zarr.json); "
                    "choose another `out` or remove the folder."
                )
            return False
        have = root_attrs(self.path, missing_ok=True)
        if not have:
            return False                    # a URL store whose creation did not finish: build it again
        self.root = _open_root(self.path)
        self._check_compatible(meta, tokens)
        return True

    def _create_local(self, meta: dict, tokens: dict[str, np.ndarray], n_tokens: int) -> None:
        """Build the store in a unique temporary sibling folder, then rename it into place (atomic).

        When another capture renamed its store into place first, this one's is discarded and
        the other's is opened (and checked) instead.
        """
        parent = self.path.parent
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale_creations(self.path)
        tmp = parent / f"{_creating_prefix(self.path)}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        _BUILDING.add(tmp)
        try:
            self._build(tmp, meta, tokens, n_tokens)
            try:
                os.rename(tmp, self.path)          # replaces a missing or empty folder, never a full one
                placed = True
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                placed = False
        finally:
            _BUILDING.discard(tmp)
            if tmp.exists():               # (a write still in flight after a Ctrl-C may recreate a file in it:
                shutil.rmtree(tmp, ignore_errors=True)     # remove_stale_creations removes that later)
        if not placed and not self._open_existing(meta, tokens):   # another capture created it meanwhile
            raise StoreMismatchError(f"{self.path} could not be created: the folder filled while this "
                                     f"capture built the store; choose another `out`")
        if placed:
            self.root = _open_root(self.path)

    def _build(self, where, meta: dict, tokens: dict[str, np.ndarray], n_tokens: int) -> None:
        """Create every array of a new store at ``where``; the identity attributes are written last.

        The first write tags the group as a driftlens store whose creation has not finished
        (``creating``), so a store at a URL interrupted here is recognised and built again.
        """
        import zarr

        root = zarr.open_group(str(where), mode="w", zarr_format=3)
        root.attrs.put({"format": STORE_FORMAT, CREATING: True})
        dtype = np.dtype(meta["dtype"])
        layers = np.asarray(meta["layers"], dtype=np.int64)
        root.create_array("checkpoint", shape=(0,), chunks=(256,), dtype=str,
                          dimension_names=("checkpoint",))
        arr = root.create_array("layer", shape=(len(layers),), chunks=(max(1, len(layers)),),
                                dtype="int64", dimension_names=("layer",))
        arr[:] = layers
        for name in TOKEN_COORDS:
            values = np.asarray(tokens[name] if name in tokens or name != "cluster" else tokens["group"])
            kind = "int64" if name == "position" else str
            a = root.create_array(name, shape=(n_tokens,), chunks=(max(1, n_tokens),), dtype=kind,
                                  dimension_names=("token",))
            a[:] = values.astype(np.int64) if name == "position" else values.astype(str)
        for site in meta["sites"]:
            width = int(meta["dims"][site])
            rows = _chunk_rows(width, dtype.itemsize, n_tokens)
            if site in UNLAYERED:
                shape, chunks = (0, n_tokens, width), (1, rows, width)
                dims = ("checkpoint", "token", SITE_DIMS[site])
            else:
                shape, chunks = (0, len(layers), n_tokens, width), (1, 1, rows, width)
                dims = ("checkpoint", "layer", "token", SITE_DIMS[site])
            # no compressor: activations barely compress and encoding costs more than the forward
            a = root.create_array(site, shape=shape, chunks=chunks, dtype=dtype,
                                  dimension_names=dims, fill_value=0, compressors=None)
            a.attrs.update(_site_attrs(site))
            a.attrs["coordinates"] = " ".join(TOKEN_COORDS)
        attrs = {**_jsonable(meta), "checkpoints": [], "completed": [], "format": STORE_FORMAT,
                 "format_version": FORMAT_VERSION}
        where = location(where)
        if is_local(where):
            where.joinpath(*RECORDS).mkdir(parents=True, exist_ok=True)
            where.joinpath(*RECORDS, LOCK_FILE).touch()
        write_store_record(where, attrs)
        root.attrs.put(attrs)                # last: without `creating`, the store is whole

    def _check_compatible(self, meta: dict, tokens: dict[str, np.ndarray]) -> None:
        check_compatible(self.path, dict(self.root.attrs), _jsonable(meta))     # (root_attrs checked the format)
        stored = _strs(self.root["sample"][:])
        if len(stored) != len(tokens["sample"]) or not np.array_equal(stored, _strs(tokens["sample"])):
            raise StoreMismatchError(f"{self.path}: token rows differ from this capture's rows.")

    # -- checkpoints -----------------------------------------------------------------
    @property
    def checkpoints(self) -> list[str]:
        """Checkpoint labels of the store, in capture order (read now: other captures may add some)."""
        return list(_open_root(self.path, "r").attrs.get("checkpoints", []))

    @property
    def completed(self) -> list[str]:
        """Labels of the checkpoints whose capture completed (read now)."""
        return list(_open_root(self.path, "r").attrs.get("completed", []))

    def slot(self, label: str) -> int:
        """Index of ``label`` on the checkpoint dim, creating it (idempotently) when new."""
        return register_checkpoints(self.path, self.meta["sites"], [label])[label]

    def write(self, site: str, index: int, start: int, block: np.ndarray) -> None:
        """Write rows ``start : start + len`` of one checkpoint.

        ``block`` is ``[n_layers, rows, width]`` for layered sites, ``[rows, width]`` for embed / final.
        """
        a = self.root[site]
        if site in UNLAYERED:
            a[index, start:start + block.shape[0], :] = block
        else:
            a[index, :, start:start + block.shape[1], :] = block

    def raw_chunk_file(self, site: str, coords: tuple[int, ...]) -> Path | None:
        """Path of one chunk's file when chunks are stored as plain bytes in this machine's order.

        driftlens creates its arrays uncompressed (zarr's ``BytesCodec`` alone), so a chunk file
        is exactly the chunk's array in C order -- edge chunks padded to the full chunk shape with
        the fill value -- under the key zarr's own chunk-key encoding gives. Returns None for any
        other layout (a compressor, another byte order), where writes go through zarr.
        """
        import sys

        if not is_local(self.path):
            return None                  # a store at a URL: zarr writes (whole chunks, through fsspec)
        if site not in self._raw:
            meta = self.root[site].metadata
            codecs = meta.codecs
            endian = getattr(codecs[0], "endian", None) if len(codecs) == 1 else None
            plain = type(codecs[0]).__name__ == "BytesCodec" and getattr(endian, "value", endian) == sys.byteorder
            self._raw[site] = meta if plain else None
        meta = self._raw[site]
        return None if meta is None else self.path / site / meta.encode_chunk_key(coords)

    def chunk_rows(self, site: str) -> int:
        """Token rows per chunk of ``site``."""
        if site not in self._chunk_rows:
            a = self.root[site]
            self._chunk_rows[site] = int(a.chunks[1] if site in UNLAYERED else a.chunks[2])
        return self._chunk_rows[site]

    def writer(self, index: int) -> CheckpointWriter:
        """A buffered writer of one checkpoint's rows (writes whole chunks only)."""
        return CheckpointWriter(self, index)

    def mark_complete(self, label: str, identity: dict | None = None, known: dict | None = None) -> None:
        """Record the checkpoint's chunk sizes and checksums (and ``identity``), then mark it complete.

        ``known``: (size, CRC32) of chunk files by path, as :meth:`CheckpointWriter.checksums` gives
        them (computed while the rows were written); every other file is read back.
        """
        write_record(self.path, label, self.checkpoints.index(label), self.meta["sites"], identity, known)
        update_root_attrs(self.path, lambda a: {} if label in a.get("completed", [])
                          else {"completed": list(a.get("completed", [])) + [label]})

    def forget(self, label: str) -> None:
        """Unmark a completed checkpoint (its slot and chunk files stay and are rewritten next)."""
        unmark_complete(self.path, [label])


class CheckpointWriter:
    """Streams consecutive row blocks of one checkpoint into the store on a background thread.

    driftlens stores are uncompressed, so a chunk file is the chunk's rows in C order
    (:meth:`ActivationStore.raw_chunk_file`): each block of rows is written straight from the
    captured arrays into its place in the chunk files (created at full size, the fill value
    where nothing is written yet) -- no stacking, no chunk buffer, no read-modify-write. Writes
    run on one background thread so disk I/O overlaps the next forward pass, spread evenly
    over the capture (at most ``max_pending`` blocks wait; a block is held, not copied).
    A store whose chunks are encoded otherwise (a compressor) is written through zarr instead.

    A checkpoint interrupted mid-way leaves chunk files partly written; it is not marked
    complete, so :func:`open_store` hides it and the next capture rewrites all of its rows.
    """

    def __init__(self, store: ActivationStore, index: int, max_pending: int = 4):
        from concurrent.futures import ThreadPoolExecutor

        self.store, self.index = store, index
        self.dtype = np.dtype(store.meta["dtype"])
        self.next: dict[str, int] = {}           # expected next row per site
        self.files: dict[Path, object] = {}      # open chunk files (writer thread only)
        # per chunk file: [bytes written from offset 0 in order, their running CRC32, file size, new file];
        # None once a write lands elsewhere (then the record reads the file back)
        self.crc: dict[Path, list | None] = {}
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="driftlens-store")
        self.pending: list = []
        self.max_pending = max_pending

    def add(self, site: str, start: int, block) -> None:
        """Queue rows ``start : start + n`` of ``site`` (contiguous with what came before).

        ``block`` is ``[n, width]`` (embed) or ``[n_layers, n, width]`` -- an array or a list of
        one ``[n, width]`` array per layer. It must not be modified until :meth:`close`.
        """
        n = len(block) if site in UNLAYERED else len(block[0])
        if site in self.next and start != self.next[site]:
            raise ValueError(f"rows of {site!r} must arrive in order: expected {self.next[site]}, got {start}")
        self.next[site] = start + n
        while len(self.pending) >= self.max_pending:
            self.pending.pop(0).result()          # re-raises a failed write
        self.pending.append(self.pool.submit(self._write, site, start, block))

    def _write(self, site: str, start: int, block) -> None:
        store = self.store
        slabs = [block] if site in UNLAYERED else list(block)        # [n, width] per layer
        n = len(slabs[0])
        if store.raw_chunk_file(site, (0,) * (2 if site in UNLAYERED else 4)) is None:
            data = np.asarray(slabs[0] if site in UNLAYERED else np.stack(slabs), dtype=self.dtype)
            store.write(site, self.index, start, data)
            return
        size = store.chunk_rows(site)
        row = 0
        while row < n:                                              # one piece per chunk touched
            chunk, offset = divmod(start + row, size)
            take = min(n - row, size - offset)
            for layer, slab in enumerate(slabs):
                coords = (self.index, chunk, 0) if site in UNLAYERED else (self.index, layer, chunk, 0)
                piece = np.ascontiguousarray(slab[row:row + take], dtype=self.dtype)
                row_bytes = piece.shape[-1] * self.dtype.itemsize
                path = store.raw_chunk_file(site, coords)
                fh = self._file(path, size * row_bytes)
                fh.seek(offset * row_bytes)
                fh.write(piece.data)
                self._checksum(path, offset * row_bytes, piece)
            row += take

    def _file(self, path: Path, nbytes: int):
        """The open chunk file at ``path``, created (or cut) at its full size ``nbytes`` (zeros)."""
        fh = self.files.get(path)
        if fh is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            new = not path.exists()
            fh = open(path, "w+b" if new else "r+b")
            fh.truncate(nbytes)
            self.files[path] = fh
            self.crc[path] = [0, 0, nbytes, new]
        return fh

    def _checksum(self, path: Path, at: int, piece: np.ndarray) -> None:
        """Extend the file's running CRC32 by ``piece``, written at byte ``at`` (writer thread only).

        Rows arrive in order, so each chunk file is written from its start to its end; a write
        anywhere else drops the file's running CRC (the record then reads the file back).
        """
        state = self.crc.get(path)
        if state is None:
            return
        if at != state[0]:
            self.crc[path] = None
            return
        state[1] = zlib.crc32(piece.data, state[1])        # releases the GIL: overlaps the next forward
        state[0] += piece.nbytes

    def checksums(self) -> dict[str, tuple[int, int]]:
        """(size, CRC32) of every chunk file this writer wrote whole, by path; after :meth:`close`.

        A file written up to its end, or a new file whose unwritten tail is the zeros it was
        created with (the last chunk's padding); the same values :func:`write_record` reads back.
        """
        out = {}
        for path, state in self.crc.items():
            if state is None:
                continue
            done, crc, size, new = state
            if done < size and not new:      # an older file's tail: whatever an earlier capture left there
                continue
            zeros = memoryview(bytes(min(size - done, 2**20)))
            while done < size:
                take = min(size - done, len(zeros))
                crc = zlib.crc32(zeros[:take], crc)
                done += take
            out[str(path)] = (size, crc)
        return out

    def close(self) -> None:
        """Wait for every write and close the chunk files."""
        try:
            for f in self.pending:
                f.result()
        finally:
            self.pending = []
            self.pool.submit(self._close_files).result()
            self.pool.shutdown(wait=True)

    def _close_files(self) -> None:
        for fh in self.files.values():
            fh.close()
        self.files.clear()


def _site_attrs(site: str) -> dict:
    text = {
        "embed": "input of decoder block 0 (HF hidden_states[0]): token embeddings with visual features merged in",
        "hidden": "output of decoder block `layer` (HF hidden_states[layer + 1]; the last block is before the "
                  "final norm)",
        "key": "output of block `layer`'s key projection (k_proj), all key/value heads concatenated",
        "query": "output of block `layer`'s query projection (q_proj), all heads concatenated",
        "final": "output of the decoder's final norm (HF hidden_states[-1]): the last block's output after the norm",
        "route": "block `layer`'s mixture-of-experts routing distribution over experts (the router's logits through "
                 "the spec's router_scores); NaN at dense blocks (root attribute route_layers lists the sparse ones)",
    }[site]
    return {"long_name": site, "definition": text, "units": "probability" if site == "route" else "model units"}


def _strs(values) -> np.ndarray:
    """A fixed-width unicode array from any string array (zarr returns numpy StringDType,
    which cannot be cast with ``astype(str)``)."""
    return np.array([str(v) for v in np.asarray(values).tolist()], dtype=str)


def _jsonable(meta: dict) -> dict:
    return json.loads(json.dumps(meta, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def open_store(path: str | os.PathLike, include_incomplete: bool = False, verify: Verify = "fast") -> xr.Dataset:
    """Open an activation store lazily as an :class:`xarray.Dataset`.

    Parameters
    ----------
    path : str or Path
        The store folder written by :func:`driftlens.capture`.
    include_incomplete : bool
        Keep checkpoints whose capture was interrupted (their unwritten rows read as 0).
    verify : {"fast", "full", "none"}
        Integrity check of the completed checkpoints before anything is read (see
        :func:`verify_store`): ``fast`` (default) stats every chunk file (presence and size),
        ``full`` also compares CRC32 checksums (reads the store once; :func:`driftlens.drift`
        does this before computing); both check the store's identity and token coordinates
        against the record made at its creation. A damaged chunk raises
        :class:`~driftlens.errors.StoreIntegrityError` naming the checkpoint, site, layer,
        token rows and file, and how to recapture; a damaged coordinate or root attribute names
        its file. What could not be checked (a store made before these records) is warned about
        and kept in ``attrs["store_notes"]``. ``none`` checks nothing.

    Returns
    -------
    xarray.Dataset
        Dims ``checkpoint``, ``layer``, ``token``, ``hidden_dim`` / ``key_dim``; variables
        ``embed``, ``hidden``, ``key``, ``final`` (those captured); token coordinates ``sample``,
        ``group`` (probes sharing an image), ``cluster`` (the independent unit: a scene or source
        photo; stores captured before clusters existed lack it), ``position``, ``modality``,
        ``lang``. Nothing is read until values are used.
    """
    import xarray as xr

    from driftlens.errors import StoreIntegrityError

    path = location(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no driftlens store at {path}" + (" (it is a file, not a store folder)"
                                                                   if path.exists() else ""))
    root_attrs(path)                     # a driftlens store with readable metadata, else a clear error
    notes = check_store(path, verify) if verify != "none" else []
    for note in notes:                    # what could not be checked (a store made before the records)
        warnings.warn(f"{path}: {note}", stacklevel=2)
    try:
        ds = xr.open_zarr(str(path), consolidated=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StoreIntegrityError(f"{path}: zarr cannot open the store ({type(exc).__name__}: {exc}); "
                                  f"its metadata is damaged") from exc
    ds = ds.set_coords([c for c in TOKEN_COORDS if c in ds.data_vars])
    strings = {c: (ds[c].dims, _strs(ds[c].values)) for c in ("checkpoint",) + TOKEN_COORDS
               if c in ds.coords and c != "position"}
    ds = ds.assign_coords(strings)
    if not include_incomplete:
        done = list(ds.attrs.get("completed", []))
        ds = ds.sel(checkpoint=[c for c in ds.checkpoint.values if c in done])
    ds.attrs["store_path"] = str(path)          # kept through selections: drift's full check finds the files
    ds.attrs["store_verified"] = verify
    ds.attrs["store_notes"] = list(notes)       # drift copies them into the report's warnings
    return ds


# ---------------------------------------------------------------------------------------------
# block readers: what a drift task reads, one (site, checkpoint, layer) block at a time
# ---------------------------------------------------------------------------------------------

class BlockSource(Protocol):
    """Where a task reads its blocks: one (site, checkpoint, layer) at a time."""

    def read(self, site: str, checkpoint: str, layer: int | None) -> np.ndarray | torch.Tensor:
        """The block [token, dim] (``layer`` None for the unlayered sites ``embed``/``final``)."""


class DatasetBlocks:
    """Blocks of an xarray Dataset laid out like a store (in memory or lazily opened).

    Reads with Dask's synchronous scheduler where the Dataset is Dask-backed, so a read inside a
    Dask worker never submits tasks of its own.
    """

    def __init__(self, ds: xr.Dataset):
        self.ds = ds

    def read(self, site, checkpoint, layer):
        """The block [token, dim] of ``site`` at ``checkpoint`` (and ``layer``)."""
        da = self.ds[site].sel(checkpoint=checkpoint)
        if layer is not None:
            da = da.sel(layer=layer)
        try:
            import dask
        except ImportError:
            return np.asarray(da.values)
        with dask.config.set(scheduler="synchronous"):
            return np.asarray(da.values)


class StoreBlocks:
    """Blocks of an activation store read straight from its zarr arrays.

    Pickles as its path and index maps, so every Dask worker opens the store itself; each read
    touches the chunk files of one block only.

    Parameters
    ----------
    path : str
        The store (a local folder, or any URL zarr opens).
    slots : dict
        Checkpoint label -> index on the store's ``checkpoint`` dimension.
    layers : dict
        Layer -> index on the store's ``layer`` dimension.
    """

    def __init__(self, path: str, slots: dict[str, int], layers: dict[int, int], completed: tuple[str, ...] = ()):
        self.path, self.slots, self.layers = str(path), dict(slots), dict(layers)
        self.completed = tuple(completed)
        self._arrays: dict = {}

    def __getstate__(self):
        return {"path": self.path, "slots": self.slots, "layers": self.layers, "completed": self.completed}

    def __setstate__(self, state):
        self.__init__(**state)

    @classmethod
    def of_store(cls, path) -> StoreBlocks:
        """The block source of the store at ``path`` (its metadata read once, here)."""
        import zarr

        root = zarr.open_group(str(path), mode="r")
        labels = list(root.attrs.get("checkpoints", []))
        layers = np.asarray(root["layer"][:]).tolist() if "layer" in root else []
        return cls(str(path), {c: i for i, c in enumerate(labels)}, {int(v): i for i, v in enumerate(layers)},
                   tuple(root.attrs.get("completed", [])))

    def read(self, site, checkpoint, layer):
        """The block [token, dim] of ``site`` at ``checkpoint`` (and ``layer``): its chunks only.

        A chunk file missing from a completed checkpoint (of a local, uncompressed store) is refused
        here, naming it -- zarr would read it as zeros -- whatever check the store had before.
        """
        import zarr

        if checkpoint in self.completed:
            refuse_missing_chunks(self.path, site, self.slots[checkpoint], checkpoint,
                                  None if layer is None else self.layers[int(layer)])
        if site not in self._arrays:
            self._arrays[site] = zarr.open_array(self.path, path=site, mode="r")
        arr = self._arrays[site]
        index = (self.slots[checkpoint],) if layer is None else (self.slots[checkpoint], self.layers[int(layer)])
        return np.asarray(arr[index])


# ---------------------------------------------------------------------------------------------
# integrity: per-checkpoint records and their verification
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ChunkProblem:
    """One damaged chunk of a completed checkpoint, or one damaged file of the whole store.

    ``file`` is relative to the store; ``layer`` is None for unlayered sites; ``rows`` is the
    half-open range of token rows the chunk holds. ``label`` is None for a problem of the store
    itself (its root metadata, a coordinate array, an array's metadata), which no checkpoint's
    recapture repairs.
    """

    label: str | None
    site: str
    layer: int | None
    rows: tuple[int, int]
    file: str
    what: str

    def __str__(self) -> str:
        if self.label is None:
            return f"{self.site} ({self.file}): {self.what}"
        where = f"checkpoint {self.label!r}, site {self.site!r}"
        where += f", layer {self.layer}" if self.layer is not None else ""
        return f"{where}, token rows {self.rows[0]}..{self.rows[1] - 1} (chunk file {self.file}): {self.what}"


def _array_meta(path: Path, site: str, what: str = "site") -> dict:
    f = path / site / "zarr.json"
    try:
        return json.loads(f.read_text())
    except FileNotFoundError:
        from driftlens.errors import StoreIntegrityError

        raise StoreIntegrityError(f"{path}: the metadata of {what} {site!r} ({f}) is missing; "
                                  f"the store is damaged") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        from driftlens.errors import StoreIntegrityError

        raise StoreIntegrityError(f"{path}: the metadata of {what} {site!r} ({f}) is unreadable: {exc}") from exc


def _chunk_key(meta: dict, coords: tuple[int, ...]) -> str:
    """zarr v3's chunk key of ``coords`` (``default`` or ``v2`` chunk-key encoding)."""
    enc = meta.get("chunk_key_encoding", {"name": "default"})
    name = enc.get("name", "default")
    sep = enc.get("configuration", {}).get("separator", "/" if name == "default" else ".")
    parts = sep.join(str(c) for c in coords)
    return f"c{sep}{parts}" if name == "default" else parts


def _plain_chunk_bytes(meta: dict) -> int | None:
    """Size of every chunk file of an uncompressed array (None when chunks are encoded)."""
    codecs = meta.get("codecs", [])
    if len(codecs) != 1 or codecs[0].get("name") != "bytes":
        return None
    shape = meta["chunk_grid"]["configuration"]["chunk_shape"]
    return int(np.prod(shape)) * np.dtype(meta["data_type"]).itemsize


def checkpoint_chunks(path, site: str, index: int) -> list[tuple[str, int | None, tuple[int, int]]]:
    """The chunk files of one checkpoint of one site, in a fixed order.

    Returns
    -------
    list of (file relative to the store, layer or None, (first row, end row))
    """
    meta = _array_meta(location(path), site)
    shape = meta["shape"]
    chunks = meta["chunk_grid"]["configuration"]["chunk_shape"]
    n_tok, rows = shape[-2], chunks[-2]
    layered = len(shape) == 4
    out = []
    for coords in itertools.product(*(range(-(-s // c)) for s, c in zip(shape[1:], chunks[1:]))):
        tchunk = coords[-2]
        layer = coords[0] if layered else None
        span = (tchunk * rows, min(n_tok, (tchunk + 1) * rows))
        out.append((f"{site}/{_chunk_key(meta, (index,) + coords)}", layer, span))
    return out


def refuse_missing_chunks(path, site: str, index: int, label: str, layer_index: int | None = None) -> None:
    """Raise :class:`~driftlens.errors.StoreIntegrityError` when a chunk file of one block of a completed
    checkpoint is missing or cut (a stat per chunk). Only for a local store whose chunks are plain bytes,
    where every chunk of a completed checkpoint exists at its full size; zarr would read a missing one as
    zeros."""
    path = location(path)
    if not is_local(path):
        return
    meta = _array_meta(path, site)
    want = _plain_chunk_bytes(meta)
    if want is None:
        return
    layered = len(meta["shape"]) == 4
    missing = []
    for rel, layer, span in checkpoint_chunks(path, site, index):
        if layer_index is not None and layered and layer != layer_index:
            continue
        try:
            size = (path / rel).stat().st_size
        except FileNotFoundError:
            missing.append(ChunkProblem(label, site, layer, span, rel, "missing"))
            continue
        if size != want:
            missing.append(ChunkProblem(label, site, layer, span, rel, f"{size} bytes, expected {want}"))
    if missing:
        from driftlens.errors import StoreIntegrityError

        raise StoreIntegrityError(integrity_message(path, missing))


def _crc32(file: Path, block: int = 2**24) -> int:
    crc = 0
    with file.open("rb") as fh:
        while chunk := fh.read(block):
            crc = zlib.crc32(chunk, crc)
    return crc


def _record_file(path: Path, index: int) -> Path:
    return path.joinpath(*RECORDS, f"{index}.json")


def write_record(path, label: str, index: int, sites, identity: dict | None = None,
                 known: dict | None = None) -> Path:
    """Record what verifies a just-completed checkpoint: every chunk file's size and CRC32.

    Written atomically next to the store's ``checkpoint`` coordinate (zarr ignores the folder),
    before the label is marked complete. ``identity`` (the checkpoint's source, fingerprint and
    capture options) is stored with it. ``known`` maps a chunk file's path (``str``) to its
    (size, CRC32) where the writer computed them from the bytes it wrote (a capture); other files
    are read back.
    """
    path = location(path)
    known = known or {}
    chunks = {}
    for site in sites:
        files = checkpoint_chunks(path, site, index)
        sizes, crcs = [], []
        for rel, _, _ in files:
            f = path / rel
            if str(f) in known:
                size, crc = known[str(f)]
                sizes.append(size)
                crcs.append(crc)
            elif f.exists():
                sizes.append(f.stat().st_size)
                crcs.append(_crc32(f))
            else:                      # an all-fill chunk zarr chose not to write (encoded stores)
                sizes.append(None)
                crcs.append(None)
        chunks[site] = {"n": len(files), "size": sizes, "crc32": crcs}
    body = {"format": RECORD_FORMAT, "label": label, "index": int(index), "chunks": chunks,
            **({"identity": identity} if identity else {})}
    return _write_json(_record_file(path, index), body)


def _write_json(out, body: dict):
    """Write ``body`` as JSON at ``out``: a local file through :func:`driftlens.outputs.atomic_write` (a failed
    write names the file and keeps the previous one); an object store writes an object whole."""
    from driftlens.outputs import atomic_write

    text = json.dumps(_jsonable(body))
    if not is_local(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        return out
    return atomic_write(out, text)


# -- the store record: identity, array metadata and coordinates, fixed at creation -----------------

COORD_ARRAYS = ("layer",) + TOKEN_COORDS     # coordinate arrays written once, at creation


def _canonical_meta(meta: dict, name: str) -> bytes:
    """An array's metadata as canonical JSON; the checkpoint dim's length left out (it grows)."""
    m = json.loads(json.dumps(meta))
    if (name == "checkpoint" or name in SITES) and isinstance(m.get("shape"), list) and m["shape"]:
        m["shape"] = [None] + m["shape"][1:]
    return json.dumps(m, sort_keys=True, separators=(",", ":")).encode()


def _array_files(path: Path, name: str) -> list[str]:
    """Every chunk file of a (small) array, relative to the store, from its metadata."""
    meta = _array_meta(path, name, "array")
    shape = meta["shape"]
    chunks = meta["chunk_grid"]["configuration"]["chunk_shape"]
    return [f"{name}/{_chunk_key(meta, coords)}"
            for coords in itertools.product(*(range(-(-s // c)) for s, c in zip(shape, chunks)))]


def _file_stat(f) -> tuple[int | None, int | None]:
    """(size, CRC32) of a file, (None, None) when it does not exist (an all-fill chunk zarr did not write)."""
    try:
        return f.stat().st_size, _crc32(f)
    except FileNotFoundError:
        return None, None


def write_store_record(path, attrs: dict) -> Path:
    """Record what the store's meaning rests on, at its creation (``checkpoint/records/store.json``).

    The root attributes ``attrs`` except the ones captures update (``checkpoints``, ``completed``),
    a CRC32 of every array's metadata (the checkpoint dim's length left out), and the size and
    CRC32 of every chunk file of the coordinate arrays (:data:`COORD_ARRAYS`).
    """
    path = location(path)
    arrays = {}
    for name in ("checkpoint",) + COORD_ARRAYS + tuple(attrs.get("sites", [])):
        if not (path / name / "zarr.json").exists() and name == "cluster":
            continue                                       # (stores before clusters)
        entry: dict = {"meta_crc32": zlib.crc32(_canonical_meta(_array_meta(path, name, "array"), name))}
        if name in COORD_ARRAYS:
            files = _array_files(path, name)
            stats = [_file_stat(path / rel) for rel in files]
            entry["chunks"] = {"file": files, "size": [a for a, _ in stats], "crc32": [b for _, b in stats]}
        arrays[name] = entry
    body = {"format": STORE_RECORD_FORMAT, "attrs": {k: v for k, v in attrs.items() if k not in MUTABLE_ATTRS},
            "arrays": arrays}
    return _write_json(path.joinpath(*RECORDS, STORE_RECORD), body)


def _store_problem(name: str, file: str, what: str) -> ChunkProblem:
    return ChunkProblem(None, name, None, (0, 0), file, what)


def _verify_store_record(path: Path, attrs: dict) -> tuple[list[ChunkProblem], list[str]]:
    """Check the root attributes, every array's metadata and the coordinate chunks against the store record."""
    rel = "/".join(RECORDS + (STORE_RECORD,))
    f = path.joinpath(*RECORDS, STORE_RECORD)
    if not f.exists():
        if int(attrs.get("format_version", 1) or 1) >= 2:
            return [_store_problem("the store record", rel, "missing (this store was created with one: "
                                   "format_version 2); its coordinates and identity cannot be checked")], []
        return [], ["the store was created before driftlens checksummed a store's coordinates and identity (no "
                    f"{rel}): its token coordinates (modality, cluster, sample ...) and root metadata were not "
                    "checked"]
    try:
        body = json.loads(f.read_text())
        assert isinstance(body, dict) and body.get("format") == STORE_RECORD_FORMAT
        want_attrs, arrays = dict(body["attrs"]), dict(body["arrays"])
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as exc:
        return [_store_problem("the store record", rel, f"unreadable or not a driftlens store record ({exc!r})")], []
    problems = []
    have = {k: v for k, v in attrs.items() if k not in MUTABLE_ATTRS}
    for key in sorted(set(want_attrs) | set(have)):
        if have.get(key) != want_attrs.get(key):
            problems.append(_store_problem("the store's root metadata", "zarr.json",
                                           f"attribute {key!r} is {have.get(key)!r}, recorded at creation as "
                                           f"{want_attrs.get(key)!r}"))
    for name, entry in arrays.items():
        try:
            meta = _array_meta(path, name, "array")
        except DataError as exc:
            problems.append(_store_problem(f"array {name!r}", f"{name}/zarr.json", f"missing or unreadable ({exc})"))
            continue
        if zlib.crc32(_canonical_meta(meta, name)) != entry.get("meta_crc32"):
            problems.append(_store_problem(f"array {name!r}", f"{name}/zarr.json", "its metadata changed since the "
                                           "store was created (shape, data type, chunks or codecs)"))
            continue
        chunks = entry.get("chunks")
        for j, rel_file in enumerate([] if chunks is None else chunks["file"]):
            size, crc = _file_stat(path / rel_file)
            if size != chunks["size"][j]:
                what = "missing" if size is None else (f"{size} bytes, expected {chunks['size'][j]}"
                                                       if chunks["size"][j] is not None else "present but recorded "
                                                       "as absent")
                problems.append(_store_problem(f"coordinate {name!r}", rel_file, what))
            elif crc != chunks["crc32"][j]:
                problems.append(_store_problem(f"coordinate {name!r}", rel_file, "contents changed (CRC32 differs "
                                               "from the one recorded at creation)"))
    return problems, []


def _verify_slots(path: Path, order: list[str], done: list[str]) -> list[ChunkProblem]:
    """The ``checkpoint`` coordinate names every completed checkpoint at its slot (xarray labels rows by it)."""
    import zarr

    try:
        values = list(_strs(zarr.open_array(str(path), path="checkpoint", mode="r")[:]))
    except Exception as exc:  # noqa: BLE001 - any decoding failure of the coordinate is damage
        return [_store_problem("coordinate 'checkpoint'", "checkpoint", f"unreadable ({type(exc).__name__}: {exc})")]
    out = []
    for label in done:
        index = order.index(label)
        have = values[index] if index < len(values) else None
        if have != label:
            out.append(_store_problem("coordinate 'checkpoint'", "checkpoint", f"slot {index} is labelled {have!r}, "
                                      f"the store's checkpoint list says {label!r}"))
    return out


def read_record(path, index: int) -> dict | None:
    """The record of checkpoint slot ``index`` (None when the store predates records)."""
    f = _record_file(location(path), index)
    if not f.exists():
        return None
    try:
        body = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        from driftlens.errors import StoreIntegrityError

        raise StoreIntegrityError(f"{path}: the integrity record {f} is unreadable ({exc})") from exc
    if not isinstance(body, dict) or body.get("format") != RECORD_FORMAT:
        from driftlens.errors import StoreIntegrityError

        raise StoreIntegrityError(f"{path}: {f} is not a driftlens checkpoint record")
    return body


def remove_record(path, index: int) -> None:
    """Delete the record of checkpoint ``index`` (its capture is no longer complete)."""
    _record_file(location(path), index).unlink(missing_ok=True)


def verify_store(path, level: Verify = "fast", labels=None) -> tuple[list[ChunkProblem], list[str]]:
    """Check a store against its records: its identity and coordinates, and its completed checkpoints.

    Parameters
    ----------
    path : str or Path
        The store folder.
    level : {"fast", "full", "none"}
        ``fast``: the store record (root attributes, every array's metadata, the size and CRC32 of
        the coordinate arrays' small chunk files), the ``checkpoint`` coordinate's labels, and
        every chunk file of the checked checkpoints with its recorded size (a stat per chunk).
        ``full``: also every chunk's CRC32 (reads the whole store). ``none``: nothing.
    labels : sequence of str, optional
        Checkpoints to check (default: every completed one).

    Returns
    -------
    problems : list of ChunkProblem
        Empty when everything checked is intact.
    notes : list of str
        What could not be checked: a store made before driftlens recorded these (no
        ``format_version``) has no store record, and its checkpoints completed before records
        existed are checked for presence and size only. In a store made with records
        (``format_version`` 2) a missing record is damage, not a note.
    """
    if level not in VERIFY_LEVELS:
        from driftlens.errors import UsageError

        raise UsageError(f"verify must be one of {VERIFY_LEVELS}, got {level!r}")
    path = location(path)
    attrs = root_attrs(path)
    problems: list[ChunkProblem] = []
    notes: list[str] = []
    if level == "none":
        return problems, notes
    problems, notes = _verify_store_record(path, attrs)
    versioned = int(attrs.get("format_version", 1) or 1) >= 2
    order = list(attrs.get("checkpoints", []))
    done = list(attrs.get("completed", []))
    checked = done if labels is None else list(labels)
    for label in checked:
        if label not in order:
            from driftlens.errors import StoreIntegrityError

            raise StoreIntegrityError(f"{path}: checkpoint {label!r} is marked complete but has no slot "
                                      f"in the store's checkpoint list {order}")
    problems += _verify_slots(path, order, [lab for lab in checked if lab in done])
    for label in checked:
        index = order.index(label)
        rel = "/".join(RECORDS + (f"{index}.json",))
        record = read_record(path, index)
        if record is not None and record.get("label") != label:
            problems.append(ChunkProblem(label, "*", None, (0, 0), rel,
                                         f"the record names checkpoint {record.get('label')!r}"))
            continue
        if record is None and versioned:
            problems.append(ChunkProblem(label, "*", None, (0, 0), rel, "the checkpoint's integrity record is "
                                         "missing (this store was made with records: format_version 2)"))
            continue
        if record is None:
            notes.append(f"checkpoint {label!r} has no integrity record (captured before driftlens recorded "
                         f"checksums): only chunk presence and sizes were checked")
        for site in attrs.get("sites", []):
            problems += _verify_site(path, label, index, site, record, level)
    return problems, notes


def _verify_site(path: Path, label: str, index: int, site: str, record: dict | None, level: str):
    files = checkpoint_chunks(path, site, index)
    plain = _plain_chunk_bytes(_array_meta(path, site))
    rec = None if record is None else record["chunks"].get(site)
    if record is not None and (rec is None or rec.get("n") != len(files)):
        return [ChunkProblem(label, site, None, (0, 0), site, "the record lists "
                             f"{None if rec is None else rec.get('n')} chunk(s), the array has {len(files)}")]
    out = []
    for j, (rel, layer, span) in enumerate(files):
        f = path / rel
        want = plain if rec is None else rec["size"][j]
        try:
            size = f.stat().st_size
        except FileNotFoundError:
            if want is not None:
                out.append(ChunkProblem(label, site, layer, span, rel, "missing"))
            continue
        if want is None:
            if rec is not None:
                out.append(ChunkProblem(label, site, layer, span, rel, "present but recorded as absent"))
            continue
        if size != want:
            out.append(ChunkProblem(label, site, layer, span, rel, f"{size} bytes, expected {want}"))
        elif level == "full" and rec is not None and _crc32(f) != rec["crc32"][j]:
            out.append(ChunkProblem(label, site, layer, span, rel, "contents changed (CRC32 differs from the "
                                                                    "one recorded at capture)"))
    return out


def root_attrs(path, missing_ok: bool = False) -> dict:
    """The root attributes of the driftlens store at ``path``: the one reader of its ``zarr.json``.

    Parameters
    ----------
    path : Path or UPath
        The store folder (:func:`location`).
    missing_ok : bool
        For a writer: ``{}`` when there is no store yet, or when a store at a URL was left
        unfinished (the capture builds it again). Else a missing store is a ``FileNotFoundError``.

    Raises
    ------
    StoreIntegrityError
        The ``zarr.json`` is unreadable.
    StoreMismatchError
        The folder is a zarr group but not a (whole) driftlens store: the message says why and the way out.
    """
    path = location(path)
    f = path / "zarr.json"
    try:
        body = json.loads(f.read_text())
    except FileNotFoundError:
        if missing_ok:
            return {}
        raise FileNotFoundError(f"no driftlens store at {path} (missing {f})") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        from driftlens.errors import StoreIntegrityError

        raise StoreIntegrityError(f"{path}: the store's metadata {f} is unreadable ({exc})") from exc
    attrs = body.get("attributes", {}) if isinstance(body, dict) else {}
    attrs = attrs if isinstance(attrs, dict) else {}
    if missing_ok and attrs.get("format") == STORE_FORMAT and attrs.get(CREATING) and not is_local(path):
        return {}
    if attrs.get("format") != STORE_FORMAT or attrs.get(CREATING):
        raise StoreMismatchError(not_a_store_message(path, attrs))
    return attrs


def completed_labels(path) -> list[str]:
    """The completed checkpoints of the store at ``path`` (from its metadata; nothing else read)."""
    return list(root_attrs(location(path)).get("completed", []))


def check_store(path, level: Verify = "fast", labels=None) -> list[str]:
    """Raise :class:`~driftlens.errors.StoreIntegrityError` when a completed checkpoint is damaged.

    The message lists the damaged chunks (checkpoint, site, layer, token rows, file) and how to
    recapture. Returns the notes of :func:`verify_store`.
    """
    problems, notes = verify_store(path, level, labels)
    if problems:
        from driftlens.errors import StoreIntegrityError

        raise StoreIntegrityError(integrity_message(path, problems))
    return notes


def integrity_message(path, problems: list[ChunkProblem], show: int = 5) -> str:
    """One message for a list of damaged chunks and store files, with the way out."""
    store_level = [p for p in problems if p.label is None]
    chunks = [p for p in problems if p.label is not None]
    labels = list(dict.fromkeys(p.label for p in chunks))
    lines = []
    if store_level:
        lines.append(f"store {path}: its identity or token coordinates are damaged ({len(store_level)} problem(s)):")
        lines += [f"  {p}" for p in store_level[:show]]
    if chunks:
        lines.append(f"store {path}: {len(chunks)} damaged chunk(s) in completed checkpoint(s) {labels}:")
        lines += [f"  {p}" for p in chunks[:show]]
    hidden = max(0, len(store_level) - show) + max(0, len(chunks) - show)
    if hidden:
        lines.append(f"  ... and {hidden} more (driftlens check {path} lists them all)")
    if store_level:
        lines.append("recapturing a checkpoint does not repair the store's identity or coordinates: capture again "
                     "into a new --out (or restore the store from a copy)")
    if chunks:
        lines.append(f"recapture: rerun the same `driftlens capture ... --out {path}` with "
                     + " ".join(f"--overwrite {lab}" for lab in labels)
                     + " (the other checkpoints are kept)")
    return "\n".join(lines)


def unmark_complete(path, labels) -> None:
    """Unmark completed checkpoints (``--overwrite``): their records go, their rows are rewritten next."""
    labels = list(labels)

    def drop(attrs):
        done = list(attrs.get("completed", []))
        return {"completed": [c for c in done if c not in labels]} if set(done) & set(labels) else {}

    attrs = update_root_attrs(path, drop)
    order = list(attrs.get("checkpoints", []))
    for label in labels:
        if label in order:
            remove_record(path, order.index(label))


#: The one compatibility table: the root attributes a capture must share with an existing store, and
#: what a difference means (in the error, with the option that sets it).
COMPATIBLE = {
    "probe_fingerprint": "another probe set (or an edited one)",
    "probe_set": "another probe set",
    "model_type": "another architecture",
    "family": "another architecture",
    "n_layers": "another architecture (layer count)",
    "dims": "another architecture (feature sizes)",
    "layers": "another layer selection (--layers)",
    "sites": "another site selection (--sites)",
    "dtype": "another storage dtype (--dtype)",
    "token_selection": "another token selection (--tokens-per-sample / --seed / --batch-size)",
}


def check_compatible(path, have: dict, want: dict, known_only: bool = False) -> None:
    """Refuse writing ``want`` into a store whose root attributes ``have`` differ on a key of :data:`COMPATIBLE`.

    ``known_only``: compare only the keys ``want`` gives a value (not None) -- a capture knows some
    before it loads a model (the feature sizes come with the first forward).
    """
    for key, what in COMPATIBLE.items():
        if known_only and want.get(key) is None:
            continue
        if have.get(key) != want.get(key):
            raise StoreMismatchError(
                f"{path} holds data from {what}: store has {key}={have.get(key)!r}, this capture has "
                f"{key}={want.get(key)!r}. Write to a new --out, or repeat the store's options."
            )


def check_identities(path, attrs: dict, identities: dict, completed) -> None:
    """Refuse a completed label whose recorded source has other weights than ``identities[label]`` says.

    ``attrs`` are the store's root attributes; ``completed`` the labels to check (those a capture
    would skip). A label captured before stores recorded sources is kept, with a warning.
    """
    from driftlens.errors import CheckpointIdentityError, StoreIntegrityError

    order = list(attrs.get("checkpoints", []))
    unrecorded = []
    for label in identities:
        if label not in completed:
            continue
        record = read_record(path, order.index(label))
        if record is None and int(attrs.get("format_version", 1) or 1) >= 2:
            raise StoreIntegrityError(
                f"{path}: checkpoint {label!r} is marked complete but its integrity record "
                f"(checkpoint/records/{order.index(label)}.json) is missing, in a store made with records: "
                f"it is damaged. Capture it again with --overwrite {label}."
            )
        had = (record or {}).get("identity")
        if had is None:
            unrecorded.append(label)
            continue
        now = identities[label]
        for key in ("fingerprint", "base_fingerprint"):
            if had.get(key) != now.get(key):
                what = "weights" if key == "fingerprint" else "base model's weights"
                raise CheckpointIdentityError(
                    f"{path}: checkpoint {label!r} was captured from {had.get('source')} "
                    f"({what} fingerprint {had.get(key)}), this capture names {now.get('source')} "
                    f"(fingerprint {now.get(key)}). Use another label, or --overwrite {label} to replace it."
                )
    if unrecorded:
        warnings.warn(f"{path}: checkpoint(s) {unrecorded} were captured before driftlens recorded sources; they "
                      f"are kept without checking that this capture names the same weights (--overwrite a label "
                      f"to capture it again with a record)", stacklevel=4)


def prepare(path, want: dict, identities: dict, overwrite=()) -> set[str]:
    """Ready the store at ``path`` for a capture, before any model is loaded; the labels already complete.

    An existing store must be a whole driftlens store (:func:`root_attrs`) that agrees with ``want``
    on every key it gives (:func:`check_compatible`), and each completed label must name the
    weights it was captured from (:func:`check_identities`, ``identities``: label -> the source's
    identity); the labels in ``overwrite`` are unmarked (captured again). There being no store
    yet is fine: the first checkpoint creates it (:class:`ActivationStore`).

    Returns
    -------
    set of str
        The completed labels a capture skips.
    """
    path = location(path)
    have = root_attrs(path, missing_ok=True)
    if not have:
        return set()
    check_compatible(path, have, want, known_only=True)
    done = set(have.get("completed", []))
    check_identities(path, have, identities, done - set(overwrite))
    redo = [label for label in overwrite if label in done]
    if redo:
        unmark_complete(path, redo)
    return done - set(redo)


def describe_store(path) -> list[str]:
    """Human-readable lines: the store's identity and, per checkpoint, its status and recorded source."""
    path = location(path)
    attrs = root_attrs(path)
    done = set(attrs.get("completed", []))
    lines = [f"store {path}: probe set {attrs.get('probe_set')!r}, model_type {attrs.get('model_type')!r}, "
             f"{len(attrs.get('layers', []))} of {attrs.get('n_layers')} layers, sites {attrs.get('sites')}, "
             f"dtype {attrs.get('dtype')}"]
    for index, label in enumerate(attrs.get("checkpoints", [])):
        if label not in done:
            lines.append(f"  {label}: capture started but not finished (hidden; the next capture redoes it)")
            continue
        ident = (read_record(path, index) or {}).get("identity")
        if ident is None:
            lines.append(f"  {label}: complete (no source recorded)")
            continue
        opts = ident.get("options", {})
        base = f", adapter on {ident['base']}" if ident.get("base") else ""
        lines.append(f"  {label}: complete; {ident.get('kind')} {ident.get('source')}{base}; weights fingerprint "
                     f"{ident.get('fingerprint')}; tokens_per_sample {opts.get('tokens_per_sample')}, "
                     f"seed {opts.get('seed')}")
    return lines
