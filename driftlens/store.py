"""The activation store: captured vectors as an xarray Dataset on zarr.

Layout (zarr v3, one group; every array carries ``dimension_names`` so ``xarray.open_zarr``
reads it directly)::

    embed   (checkpoint, token, hidden_dim)           # input of decoder block 0 (HF hidden_states[0])
    hidden  (checkpoint, layer, token, hidden_dim)    # output of block l (HF hidden_states[l + 1])
    key     (checkpoint, layer, token, key_dim)       # block l's k_proj output
    query   (checkpoint, layer, token, query_dim)     # optional
    coordinates: checkpoint (str), layer (int), sample / group / position / modality / lang on token

Chunks are one (checkpoint, layer) slab split along ``token`` into blocks of about 8 MB, so
a metric streams one (checkpoint, layer) at a time.

Nothing lost, nothing mixed: zarr's local store writes every file atomically; the root
attributes hold ``checkpoints`` (every label a capture has started, in trajectory order) and
``completed`` (labels whose every row has been written). A checkpoint that is started but not
completed is redone by the next capture; :func:`open_store` shows only completed ones. A store
refuses data from another probe set (fingerprint), another architecture (model type, layer
count, feature sizes) or another token selection.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SITE_DIMS = {"embed": "hidden_dim", "hidden": "hidden_dim", "key": "key_dim", "query": "query_dim"}
TOKEN_COORDS = ("sample", "group", "position", "modality", "lang")
CHUNK_BYTES = 8 * 2**20


class StoreMismatchError(ValueError):
    """The store at a path holds data that cannot be mixed with what is being written."""


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
        ``sample``, ``group``, ``position``, ``modality``, ``lang``, one entry per token row.
    """

    def __init__(self, path, meta: dict, tokens: dict[str, np.ndarray]):
        import zarr

        self.path = Path(path)
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
            values = np.asarray(tokens[name])
            kind = "int64" if name == "position" else str
            a = root.create_array(name, shape=(n_tokens,), chunks=(max(1, n_tokens),), dtype=kind,
                                  dimension_names=("token",))
            a[:] = values.astype(np.int64) if name == "position" else values.astype(str)
        for site in meta["sites"]:
            width = int(meta["dims"][site])
            rows = _chunk_rows(width, dtype.itemsize, n_tokens)
            if site == "embed":
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
        return list(self.root.attrs.get("checkpoints", []))

    @property
    def completed(self) -> list[str]:
        return list(self.root.attrs.get("completed", []))

    def slot(self, label: str) -> int:
        """Index of ``label`` on the checkpoint dim, creating it (idempotently) when new."""
        labels = self.checkpoints
        if label not in labels:
            labels = labels + [label]
            self.root.attrs["checkpoints"] = labels
        n = len(labels)
        for site in self.meta["sites"]:
            a = self.root[site]
            if a.shape[0] != n:
                a.resize((n,) + a.shape[1:])
        c = self.root["checkpoint"]
        if c.shape[0] != n:
            c.resize((n,))
        c[:] = np.asarray(labels, dtype=str)
        return labels.index(label)

    def write(self, site: str, index: int, start: int, block: np.ndarray) -> None:
        """Write rows ``start : start + len`` of one checkpoint.

        ``block`` is ``[n_layers, rows, width]`` for layered sites, ``[rows, width]`` for embed.
        """
        a = self.root[site]
        if site == "embed":
            a[index, start:start + block.shape[0], :] = block
        else:
            a[index, :, start:start + block.shape[1], :] = block

    def chunk_rows(self, site: str) -> int:
        """Token rows per chunk of ``site``."""
        if site not in self._chunk_rows:
            a = self.root[site]
            self._chunk_rows[site] = int(a.chunks[1] if site == "embed" else a.chunks[2])
        return self._chunk_rows[site]

    def writer(self, index: int) -> "CheckpointWriter":
        """A buffered writer of one checkpoint's rows (writes whole chunks only)."""
        return CheckpointWriter(self, index)

    def mark_complete(self, label: str) -> None:
        done = self.completed
        if label not in done:
            self.root.attrs["completed"] = done + [label]


class CheckpointWriter:
    """Buffers consecutive row blocks of one checkpoint and writes them chunk-aligned.

    A zarr chunk written in pieces is read, merged and rewritten for every piece; batches are
    much smaller than chunks, so rows are copied (once) into a chunk-sized buffer per site and
    each chunk is written once, on one background thread so disk I/O overlaps the next
    forward pass (at most ``max_pending`` writes wait). Memory: one chunk per site plus the
    pending writes.
    """

    def __init__(self, store: ActivationStore, index: int, max_pending: int = 2):
        from concurrent.futures import ThreadPoolExecutor

        self.store, self.index = store, index
        self.buf: dict[str, np.ndarray] = {}     # [chunk, width] (embed) or [n_layers, chunk, width]
        self.start: dict[str, int] = {}          # store row of buf's first row
        self.fill: dict[str, int] = {}           # rows filled in buf
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="driftlens-store")
        self.pending: list = []
        self.max_pending = max_pending

    def _new_buffer(self, site: str, block: np.ndarray, start: int) -> None:
        chunk = self.store.chunk_rows(site)
        rows = min(chunk - start % chunk, self.store.n_tokens - start)   # up to the next chunk boundary
        shape = (rows,) + block.shape[1:] if site == "embed" else (block.shape[0], rows, block.shape[2])
        self.buf[site], self.start[site], self.fill[site] = np.empty(shape, block.dtype), start, 0

    def add(self, site: str, start: int, block: np.ndarray) -> None:
        """Append rows ``start : start + n`` (contiguous with what came before)."""
        axis = 0 if site == "embed" else 1
        if site in self.buf and start != self.start[site] + self.fill[site]:
            raise ValueError(f"rows of {site!r} must arrive in order: expected "
                             f"{self.start[site] + self.fill[site]}, got {start}")
        done, n = 0, block.shape[axis]
        while done < n:
            if site not in self.buf:
                self._new_buffer(site, block, start + done)
            buf, fill = self.buf[site], self.fill[site]
            take = min(n - done, buf.shape[axis] - fill)
            if axis == 0:
                buf[fill:fill + take] = block[done:done + take]
            else:
                buf[:, fill:fill + take] = block[:, done:done + take]
            self.fill[site] += take
            done += take
            if self.fill[site] == buf.shape[axis]:
                self._submit(site)

    def _submit(self, site: str) -> None:
        while len(self.pending) >= self.max_pending:
            self.pending.pop(0).result()          # re-raises a failed write
        axis = 0 if site == "embed" else 1
        buf, fill = self.buf.pop(site), self.fill.pop(site)
        data = buf if fill == buf.shape[axis] else (buf[:fill] if axis == 0 else buf[:, :fill])
        self.pending.append(self.pool.submit(self.store.write, site, self.index, self.start.pop(site), data))

    def close(self) -> None:
        """Write what is left and wait for every write."""
        try:
            for site in list(self.buf):
                if self.fill[site]:
                    self._submit(site)
            for f in self.pending:
                f.result()
        finally:
            self.pending = []
            self.pool.shutdown(wait=True)


def _site_attrs(site: str) -> dict:
    text = {
        "embed": "input of decoder block 0 (HF hidden_states[0]): token embeddings with visual features merged in",
        "hidden": "output of decoder block `layer` (HF hidden_states[layer + 1]; the last block is before the final norm)",
        "key": "output of block `layer`'s key projection (k_proj), all key/value heads concatenated",
        "query": "output of block `layer`'s query projection (q_proj), all heads concatenated",
    }[site]
    return {"long_name": site, "definition": text, "units": "model units"}


def _strs(values) -> np.ndarray:
    """A fixed-width unicode array from any string array (zarr returns numpy StringDType,
    which cannot be cast with ``astype(str)``)."""
    return np.array([str(v) for v in np.asarray(values).tolist()], dtype=str)


def _jsonable(meta: dict) -> dict:
    return json.loads(json.dumps(meta, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def open_store(path, include_incomplete: bool = False):
    """Open an activation store lazily as an :class:`xarray.Dataset`.

    Parameters
    ----------
    path : str or Path
        The store folder written by :func:`driftlens.capture`.
    include_incomplete : bool
        Keep checkpoints whose capture was interrupted (their unwritten rows read as 0).

    Returns
    -------
    xarray.Dataset
        Dims ``checkpoint``, ``layer``, ``token``, ``hidden_dim`` / ``key_dim``; variables
        ``embed``, ``hidden``, ``key`` (those captured); token coordinates ``sample``,
        ``group`` (probes sharing an image), ``position``, ``modality``, ``lang``. Nothing is read until values are used.
    """
    import xarray as xr

    path = Path(path)
    if not (path / "zarr.json").exists():
        raise FileNotFoundError(f"no driftlens store at {path} (missing {path / 'zarr.json'})")
    ds = xr.open_zarr(str(path), consolidated=False)
    if ds.attrs.get("format") != "driftlens-store/1":
        raise StoreMismatchError(f"{path} is a zarr store but not a driftlens store.")
    ds = ds.set_coords([c for c in TOKEN_COORDS if c in ds.data_vars])
    strings = {c: (ds[c].dims, _strs(ds[c].values)) for c in ("checkpoint",) + TOKEN_COORDS
               if c in ds.coords and c != "position"}
    ds = ds.assign_coords(strings)
    if not include_incomplete:
        done = list(ds.attrs.get("completed", []))
        ds = ds.sel(checkpoint=[c for c in ds.checkpoint.values if c in done])
    return ds
