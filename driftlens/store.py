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

Nothing silently damaged: when a checkpoint completes, a record of it is written to
``checkpoint/records/<slot>.json`` (inside the folder of the ``checkpoint`` coordinate, which
zarr does not list): the size and CRC32 of every chunk file of that checkpoint, and the
checkpoint's identity (its source path, a fingerprint of its weights, the capture options).
:func:`open_store` checks presence and size of every chunk of the checkpoints it shows (a stat
per chunk); :func:`driftlens.drift` and ``driftlens check`` also compare the checksums. A chunk
deleted, cut or altered after capture is reported with its checkpoint, site, layer and token
rows -- never read back as zeros.
"""
from __future__ import annotations

import contextlib
import contextvars
import itertools
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from driftlens.errors import DataError, EnvironmentProblem, UsageError
from driftlens.schema import SITE_DIMS, TOKEN_COORDS, UNLAYERED

if TYPE_CHECKING:
    import xarray as xr

CHUNK_BYTES = 8 * 2**20
RECORDS = ("checkpoint", "records")   # folder of the per-checkpoint records, inside the `checkpoint` array
RECORD_FORMAT = "driftlens-record/1"
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
                                 f"pip install 'driftlens[scale]'") from None
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


def metadata_lock():
    """The current metadata lock (see :data:`METADATA_LOCK`), or a no-op context."""
    factory = METADATA_LOCK.get()
    return contextlib.nullcontext() if factory is None else factory()


def register_checkpoints(root, sites, labels) -> dict[str, int]:
    """Give each label a slot on the checkpoint dim (appended in order; existing ones kept).

    ``root`` is the store's zarr group (or its path). Idempotent, and writes nothing when every
    label already has its slot -- so many writers of one store can call it for their own label
    once a driver registered them all. Returns label -> slot.
    """
    import zarr

    if not hasattr(root, "attrs"):
        root = zarr.open_group(str(root), mode="r+")
    sites = list(sites if sites is not None else root.attrs["sites"])
    with metadata_lock():
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
        import zarr

        self.path = location(path)
        self.meta = meta
        n_tokens = len(tokens["sample"])
        if (self.path / "zarr.json").exists():
            self.root = zarr.open_group(str(self.path), mode="r+")
            self._check_compatible(meta, tokens)
        else:
            if self.path.exists() and any(self.path.iterdir()):
                raise StoreMismatchError(
                    f"{self.path} exists and is not a driftlens store (no zarr.json); "
                    "choose another `out` or remove the folder."
                )
            self.root = zarr.open_group(str(self.path), mode="w", zarr_format=3)
            self._create(meta, tokens, n_tokens)
        self.n_tokens = n_tokens
        self._chunk_rows: dict[str, int] = {}
        self._raw: dict[str, object] = {}        # site -> array metadata when chunks are plain bytes

    # -- creation and identity -------------------------------------------------------
    def _create(self, meta: dict, tokens: dict[str, np.ndarray], n_tokens: int) -> None:
        root = self.root
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
        root.attrs.update({**_jsonable(meta), "checkpoints": [], "completed": [],
                           "format": "driftlens-store/1"})

    def _check_compatible(self, meta: dict, tokens: dict[str, np.ndarray]) -> None:
        have = dict(self.root.attrs)
        if have.get("format") != "driftlens-store/1":
            raise StoreMismatchError(f"{self.path} is a zarr group but not a driftlens store.")
        want = _jsonable(meta)
        labels = {
            "probe_fingerprint": "another probe set (or an edited one)",
            "probe_set": "another probe set",
            "model_type": "another architecture",
            "family": "another architecture",
            "n_layers": "another architecture (layer count)",
            "dims": "another architecture (feature sizes)",
            "layers": "another layer selection",
            "sites": "another site selection",
            "dtype": "another storage dtype",
            "token_selection": "another token selection (tokens_per_sample / seed / batch layout)",
        }
        for key, what in labels.items():
            if have.get(key) != want.get(key):
                raise StoreMismatchError(
                    f"{self.path} holds data from {what}: store has {key}={have.get(key)!r}, "
                    f"this capture has {key}={want.get(key)!r}. Write to a new `out` instead."
                )
        stored = _strs(self.root["sample"][:])
        if len(stored) != len(tokens["sample"]) or not np.array_equal(stored, _strs(tokens["sample"])):
            raise StoreMismatchError(f"{self.path}: token rows differ from this capture's rows.")

    # -- checkpoints -----------------------------------------------------------------
    @property
    def checkpoints(self) -> list[str]:
        """Checkpoint labels of the store, in capture order."""
        return list(self.root.attrs.get("checkpoints", []))

    @property
    def completed(self) -> list[str]:
        """Labels of the checkpoints whose capture completed."""
        return list(self.root.attrs.get("completed", []))

    def slot(self, label: str) -> int:
        """Index of ``label`` on the checkpoint dim, creating it (idempotently) when new."""
        return register_checkpoints(self.root, self.meta["sites"], [label])[label]

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

    def mark_complete(self, label: str, identity: dict | None = None) -> None:
        """Record the checkpoint's chunk sizes and checksums (and ``identity``), then mark it complete."""
        write_record(self.path, label, self.checkpoints.index(label), self.meta["sites"], identity)
        with metadata_lock():
            done = self.completed
            if label not in done:
                self.root.attrs["completed"] = done + [label]

    def forget(self, label: str) -> None:
        """Unmark a completed checkpoint (its slot and chunk files stay and are rewritten next)."""
        with metadata_lock():
            done = self.completed
            if label in done:
                self.root.attrs["completed"] = [c for c in done if c != label]
        if label in self.checkpoints:
            remove_record(self.path, self.checkpoints.index(label))


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
                fh = self._file(store.raw_chunk_file(site, coords), size * row_bytes)
                fh.seek(offset * row_bytes)
                fh.write(piece.data)
            row += take

    def _file(self, path: Path, nbytes: int):
        """The open chunk file at ``path``, created (or cut) at its full size ``nbytes`` (zeros)."""
        fh = self.files.get(path)
        if fh is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(path, "r+b" if path.exists() else "w+b")
            fh.truncate(nbytes)
            self.files[path] = fh
        return fh

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
        does this before computing). A damaged chunk raises
        :class:`~driftlens.errors.StoreIntegrityError` naming the checkpoint, site, layer,
        token rows and file, and how to recapture.

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
    _root_attrs(path)                     # a driftlens store with readable metadata, else a clear error
    if verify != "none":
        check_store(path, verify)
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
    return ds


# ---------------------------------------------------------------------------------------------
# integrity: per-checkpoint records and their verification
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ChunkProblem:
    """One damaged chunk of a completed checkpoint.

    ``file`` is relative to the store; ``layer`` is None for unlayered sites; ``rows`` is the
    half-open range of token rows the chunk holds.
    """

    label: str
    site: str
    layer: int | None
    rows: tuple[int, int]
    file: str
    what: str

    def __str__(self) -> str:
        where = f"checkpoint {self.label!r}, site {self.site!r}"
        where += f", layer {self.layer}" if self.layer is not None else ""
        return f"{where}, token rows {self.rows[0]}..{self.rows[1] - 1} (chunk file {self.file}): {self.what}"


def _array_meta(path: Path, site: str) -> dict:
    f = path / site / "zarr.json"
    try:
        return json.loads(f.read_text())
    except FileNotFoundError:
        from driftlens.errors import StoreIntegrityError

        raise StoreIntegrityError(f"{path}: the metadata of site {site!r} ({f}) is missing; "
                                  f"the store is damaged") from None
    except (OSError, json.JSONDecodeError) as exc:
        from driftlens.errors import StoreIntegrityError

        raise StoreIntegrityError(f"{path}: the metadata of site {site!r} ({f}) is unreadable: {exc}") from exc


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


def _crc32(file: Path, block: int = 2**24) -> int:
    crc = 0
    with file.open("rb") as fh:
        while chunk := fh.read(block):
            crc = zlib.crc32(chunk, crc)
    return crc


def _record_file(path: Path, index: int) -> Path:
    return path.joinpath(*RECORDS, f"{index}.json")


def write_record(path, label: str, index: int, sites, identity: dict | None = None) -> Path:
    """Record what verifies a just-completed checkpoint: every chunk file's size and CRC32.

    Written atomically next to the store's ``checkpoint`` coordinate (zarr ignores the folder),
    before the label is marked complete. ``identity`` (the checkpoint's source, fingerprint and
    capture options) is stored with it.
    """
    path = location(path)
    chunks = {}
    for site in sites:
        files = checkpoint_chunks(path, site, index)
        sizes, crcs = [], []
        for rel, _, _ in files:
            f = path / rel
            if f.exists():
                sizes.append(f.stat().st_size)
                crcs.append(_crc32(f))
            else:                      # an all-fill chunk zarr chose not to write (encoded stores)
                sizes.append(None)
                crcs.append(None)
        chunks[site] = {"n": len(files), "size": sizes, "crc32": crcs}
    body = {"format": RECORD_FORMAT, "label": label, "index": int(index), "chunks": chunks,
            **({"identity": identity} if identity else {})}
    out = _record_file(path, index)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not is_local(out):                    # an object store writes an object whole
        out.write_text(json.dumps(_jsonable(body)))
        return out
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_jsonable(body)))
    os.replace(tmp, out)
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
    """Check the completed checkpoints of a store against their records.

    Parameters
    ----------
    path : str or Path
        The store folder.
    level : {"fast", "full", "none"}
        ``fast``: every chunk file exists with its recorded size (a stat per chunk).
        ``full``: also its CRC32 (reads the whole store). ``none``: nothing.
    labels : sequence of str, optional
        Checkpoints to check (default: every completed one).

    Returns
    -------
    problems : list of ChunkProblem
        Empty when every checked chunk is intact.
    notes : list of str
        What could not be checked (checkpoints completed before records existed are checked
        for presence and size only, from the array metadata).
    """
    if level not in VERIFY_LEVELS:
        from driftlens.errors import UsageError

        raise UsageError(f"verify must be one of {VERIFY_LEVELS}, got {level!r}")
    path = location(path)
    attrs = _root_attrs(path)
    problems: list[ChunkProblem] = []
    notes: list[str] = []
    if level == "none":
        return problems, notes
    order = list(attrs.get("checkpoints", []))
    done = list(attrs.get("completed", []))
    for label in done if labels is None else labels:
        if label not in order:
            from driftlens.errors import StoreIntegrityError

            raise StoreIntegrityError(f"{path}: checkpoint {label!r} is marked complete but has no slot "
                                      f"in the store's checkpoint list {order}")
        index = order.index(label)
        record = read_record(path, index)
        if record is not None and record.get("label") != label:
            problems.append(ChunkProblem(label, "*", None, (0, 0), "/".join(RECORDS + (f"{index}.json",)),
                                         f"the record names checkpoint {record.get('label')!r}"))
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


def _root_attrs(path: Path) -> dict:
    f = path / "zarr.json"
    try:
        body = json.loads(f.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no driftlens store at {path} (missing {f})") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        from driftlens.errors import StoreIntegrityError

        raise StoreIntegrityError(f"{path}: the store's metadata {f} is unreadable ({exc})") from exc
    attrs = body.get("attributes", {}) if isinstance(body, dict) else {}
    if attrs.get("format") != "driftlens-store/1":
        raise StoreMismatchError(f"{path} is not a driftlens store ({f} has no driftlens format tag)")
    return attrs


def completed_labels(path) -> list[str]:
    """The completed checkpoints of the store at ``path`` (from its metadata; nothing else read)."""
    return list(_root_attrs(location(path)).get("completed", []))


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
    """One message for a list of damaged chunks, with the way out."""
    labels = list(dict.fromkeys(p.label for p in problems))
    lines = [f"store {path}: {len(problems)} damaged chunk(s) in completed checkpoint(s) {labels}:"]
    lines += [f"  {p}" for p in problems[:show]]
    if len(problems) > show:
        lines.append(f"  ... and {len(problems) - show} more (driftlens check {path} lists them all)")
    lines.append(f"recapture: rerun the same `driftlens capture ... --out {path}` with "
                 + " ".join(f"--overwrite {lab}" for lab in labels)
                 + " (the other checkpoints are kept)")
    return "\n".join(lines)


def unmark_complete(path, labels) -> None:
    """Unmark completed checkpoints (``--overwrite``): their records go, their rows are rewritten next."""
    import zarr

    root = zarr.open_group(str(path), mode="r+")
    order = list(root.attrs.get("checkpoints", []))
    root.attrs["completed"] = [c for c in root.attrs.get("completed", []) if c not in labels]
    for label in labels:
        if label in order:
            remove_record(path, order.index(label))


def describe_store(path) -> list[str]:
    """Human-readable lines: the store's identity and, per checkpoint, its status and recorded source."""
    path = location(path)
    attrs = _root_attrs(path)
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


# ----------------------------------------------------------------------------- reports

def check_report_path(path, inputs=()) -> Path:
    """An output file path that can be written: local, not a folder, its parent a writable folder, and
    not an input (``inputs``: paths or ``(description, path)``; see :func:`driftlens.outputs.check_output`)."""
    from driftlens.outputs import check_output, local

    path = local(path)
    if path.is_dir():
        raise UsageError(f"--out {path} is a folder; give a file name such as {path / 'report.nc'}")
    parent = next((p for p in [path.parent, *path.parent.parents] if p.exists()), Path("."))
    if not parent.is_dir():
        raise UsageError(f"--out {path}: {parent} is a file, so {path.parent} cannot be created")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise EnvironmentProblem(f"--out {path}: not writable")
    check_output(path, inputs)
    return path


def save_report(report, path) -> Path:
    """Write a drift report as netCDF (h5netcdf engine), atomically; returns the path.

    The file is encoded in memory, then written under a temporary name beside ``path`` and renamed
    (:func:`driftlens.outputs.atomic_write`): HDF5 never meets a full disk or a file-size limit, the
    previous file survives any failure, and no temporary file is left. A path inside the report's
    own activation store (``attrs["store_path"]``) is refused.
    """
    from driftlens.outputs import atomic_write

    path = check_report_path(path, [("activation store", report.attrs.get("store_path") or None)])
    blob = report.to_netcdf(engine="h5netcdf")          # bytes: netCDF-4 / HDF5 encoded in memory
    return atomic_write(path, bytes(blob))


def load_report(path):
    """Read a drift report written by :func:`save_report`.

    Raises :class:`~driftlens.errors.DataError` when the file is not a readable netCDF drift report.
    """
    import xarray as xr

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no drift report at {path}")
    if path.is_dir():
        raise UsageError(f"{path} is a folder, not a drift report (a .nc file written by `driftlens drift`)")
    try:
        with xr.open_dataset(path, engine="h5netcdf") as ds:
            rep = ds.load()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path} is not a readable drift report ({type(exc).__name__}: {exc})") from exc
    if "checkpoint" not in rep.dims or "layer" not in rep.dims:
        raise DataError(f"{path} is a netCDF file but not a driftlens drift report (it has dims "
                        f"{dict(rep.sizes)}, a report has checkpoint and layer)")
    if rep.sizes["checkpoint"] == 0:
        raise DataError(f"{path}: the report holds no checkpoint")
    return rep
