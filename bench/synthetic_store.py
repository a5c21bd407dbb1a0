"""A synthetic activation store of any size, written block by block (for the out-of-core and grid benchmarks).

    .venv/bin/python bench/synthetic_store.py PATH [--gb 20] [--checkpoints 6] [--layers 32] [--dim 2048]
                                                  [--clusters N] [--tokens-per-cluster 128] [--final] [--seed 0]

Writes a valid driftlens store (``driftlens check PATH`` passes; ``open_store(PATH, verify="full")``
opens it) through driftlens's own writer: :class:`driftlens.store.ActivationStore` creates the
arrays and checkpoint slots, every chunk is written through zarr, and
:meth:`~driftlens.store.ActivationStore.mark_complete` records each checkpoint's chunk sizes and
CRC32s once all its rows are on disk -- exactly what a capture does.

Tokens (cluster-major): ``n_clusters`` scenes, each seen by ``samples_per_cluster`` probes (one
per language, alternating ``en`` / ``ko``), each probe ``n_visual`` visual tokens (positions
``0 .. n_visual - 1``) then ``n_text`` text tokens after the image; ``tokens_per_cluster =
samples_per_cluster * (n_visual + n_text)``.

Values, per layer ``l`` and token ``i`` of cluster ``a`` (stored as ``dtype``)::

    x = u[l, a] + 0.4 e[l, i] + m[l, modality(i)]          # latent: cluster effect + token effect + modality offset
    observed at checkpoint c: x + 0.2 v[c, l, a] + 0.2 eta[c, l, i] (+ drift[c, l] w[l] on visual tokens)

``u, v`` standard normal, ``e, eta`` of mean 0 and variance 1 (uniform on 256 levels: random
bytes, ten times cheaper than normal draws), ``m`` a random offset of norm 2 per modality and
layer, ``w[l]`` a random unit direction. The planted drift grows linearly with the checkpoint index (0 at the
reference, ``drift`` at the last checkpoint) and with depth over the second half of the layers
(0 before layer ``n_layers // 2``, full at the last layer), on visual tokens only. ``final``
(optional) is a layer of its own (index ``n_layers``), scaled by 0.5.

Memory: values are generated one chunk (about 8 MB of rows) at a time, the latent re-drawn
from a per-(layer, chunk) seed for every checkpoint, so at most a few chunks are ever held --
well under one (checkpoint, layer) block.
"""
from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

GIB = 2**30
INT8_SD = float(np.sqrt((256**2 - 1) / 12))                 # sd of a uniform draw on -128 .. 127
SAMPLE_LANGS = ("en", "ko")


def token_table(n_clusters: int, samples_per_cluster: int, n_visual: int, n_text: int) -> dict[str, np.ndarray]:
    """The per-token coordinates (cluster-major; each probe's visual tokens, then its text tokens)."""
    per_sample = n_visual + n_text
    a = np.repeat(np.arange(n_clusters), samples_per_cluster * per_sample)
    j = np.tile(np.repeat(np.arange(samples_per_cluster), per_sample), n_clusters)
    pos = np.tile(np.arange(per_sample), n_clusters * samples_per_cluster)
    lang = np.asarray(SAMPLE_LANGS)[(a + j) % 2]
    scene = np.char.add("scene", a.astype(str))
    render = np.char.add("#r", j.astype(str))
    return {
        "sample": np.char.add(np.char.add(np.char.add(scene, render), "-"), lang),
        "group": np.char.add(scene, render),
        "cluster": scene,
        "position": pos.astype(np.int64),
        "modality": np.where(pos < n_visual, "visual", "text"),
        "lang": lang,
    }


def plan(gigabytes: float | None = None, n_checkpoints: int = 6, n_layers: int = 32, dim: int = 2048,
         n_clusters: int | None = None, tokens_per_cluster: int = 128, dtype: str = "float16",
         sites=("hidden",)) -> dict:
    """Shapes of the store: ``n_clusters`` from ``gigabytes`` (GiB of chunk files) when not given."""
    itemsize = np.dtype(dtype).itemsize
    n_layered = sum(s != "final" for s in sites)
    per_token = n_checkpoints * (n_layers * n_layered + ("final" in sites)) * dim * itemsize
    if n_clusters is None:
        if gigabytes is None:
            n_clusters = 64
        else:
            n_clusters = max(2, math.ceil(gigabytes * GIB / (per_token * tokens_per_cluster)))
    n_tokens = n_clusters * tokens_per_cluster
    from driftlens.store import _chunk_rows

    rows = _chunk_rows(dim, itemsize, n_tokens)
    padded = -(-n_tokens // rows) * rows                      # edge chunks are stored at full size
    return {"n_clusters": int(n_clusters), "n_tokens": int(n_tokens), "chunk_rows": int(rows),
            "bytes": int(per_token * padded), "block_bytes": int(n_tokens * dim * itemsize),
            "n_blocks": n_checkpoints * (n_layers * n_layered + ("final" in sites))}


def write_synthetic_store(path, gigabytes: float | None = None, n_checkpoints: int = 6, n_layers: int = 32,
                          dim: int = 2048, n_clusters: int | None = None, tokens_per_cluster: int = 128,
                          dtype: str = "float16", sites=("hidden",), seed: int = 0, *,
                          samples_per_cluster: int = 2, text_fraction: float = 0.25, drift: float = 3.0,
                          overwrite: bool = False, progress: bool = True, threads: int = 2) -> Path:
    """Write a valid driftlens activation store of about ``gigabytes`` GiB, one chunk at a time.

    Parameters
    ----------
    path : str or Path
        Store folder (must not exist unless ``overwrite``).
    gigabytes : float, optional
        Target size in GiB (2**30 bytes) of the chunk files; sets ``n_clusters``. Default:
        ``n_clusters`` (64 when that is not given either).
    n_checkpoints, n_layers, dim : int
        Checkpoints (``base``, ``step-1``, ...), decoder layers, feature width of every site.
    n_clusters : int, optional
        Number of clusters (scenes); overrides ``gigabytes``.
    tokens_per_cluster : int
        Token rows per cluster (``samples_per_cluster`` probes of visual then text tokens).
    dtype : str
        Storage dtype (``float16`` or ``float32``).
    sites : sequence of str
        Layered sites among ``hidden``, ``key``, ``query``, plus ``final`` for the unlayered
        post-norm site (MIR's last layer).
    seed : int
        Seeds every value; the same arguments write the same bytes.
    samples_per_cluster : int
        Probes per cluster (one per language, alternating).
    text_fraction : float
        Share of each probe's tokens that are text (after its image tokens).
    drift : float
        Size of the planted drift at the last checkpoint and layer (the latent's per-feature
        standard deviation is about 1.1; the default 3.0 moves a visual token by 3 along one direction,
        spread over all features).
    overwrite : bool
        Remove ``path`` first when it exists.
    progress : bool
        tqdm bar over the bytes written.
    threads : int
        Generator threads (numpy's normal draws release the GIL); chunks are written in order.

    Returns
    -------
    pathlib.Path
    """
    from tqdm.auto import tqdm

    from driftlens.store import ActivationStore

    path = Path(path)
    sites = tuple(sites)
    bad = [s for s in sites if s not in ("hidden", "key", "query", "final")]
    if bad or not any(s != "final" for s in sites):
        raise ValueError(f"sites must hold at least one of hidden/key/query (and optionally final), got {sites}")
    if samples_per_cluster < 1 or tokens_per_cluster % samples_per_cluster:
        raise ValueError("tokens_per_cluster must be a multiple of samples_per_cluster")
    per_sample = tokens_per_cluster // samples_per_cluster
    n_text = max(1, round(per_sample * text_fraction))
    n_visual = per_sample - n_text
    if n_visual < 1:
        raise ValueError("each probe needs at least one visual and one text token")
    shape = plan(gigabytes, n_checkpoints, n_layers, dim, n_clusters, tokens_per_cluster, dtype, sites)
    K, T, rows = shape["n_clusters"], shape["n_tokens"], shape["chunk_rows"]
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
        shutil.rmtree(path)

    tok = token_table(K, samples_per_cluster, n_visual, n_text)
    codes = np.repeat(np.arange(K), tokens_per_cluster)
    visual = tok["modality"] == "visual"
    cell = 2 * codes + (~visual)                                 # row of the (cluster, modality) table
    labels = ["base"] + [f"step-{c}" for c in range(1, n_checkpoints)]
    layered = [s for s in sites if s != "final"]
    meta = {"model_type": "llava", "family": "llava", "probe_set": "synthetic-bench",
            "probe_fingerprint": f"synthetic-K{K}-tpc{tokens_per_cluster}-seed{seed}",
            "n_layers": n_layers, "layers": list(range(n_layers)), "sites": list(sites),
            "dims": {s: dim for s in sites}, "dtype": dtype, "token_selection": "all"}
    store = ActivationStore(path, meta, tok)
    np_dtype = np.dtype(dtype)
    half = n_layers // 2

    def layer_terms(site_ix: int, layer: int):
        """Cluster effects [K, d], modality offsets [2, d] and drift direction [d] of one (site, layer)."""
        g = np.random.default_rng([seed, 1, site_ix, layer])
        u = g.standard_normal((K, dim), dtype=np.float32)
        m = g.standard_normal((2, dim), dtype=np.float32)
        m *= 2.0 / np.linalg.norm(m, axis=1, keepdims=True)
        w = g.standard_normal(dim, dtype=np.float32)
        return u, m, w / np.linalg.norm(w)

    def uniform(key, n: int) -> np.ndarray:
        """[n, dim] float32 of mean 0 and variance 1: uniform on 256 levels (random bytes; a normal draw
        costs ~10x more and dominated writing a 20 GB store)."""
        b = np.random.default_rng([seed, *key]).bytes(n * dim)
        x = np.frombuffer(b, dtype=np.int8).reshape(n, dim).astype(np.float32)
        x += 0.5
        x *= 1.0 / INT8_SD
        return x

    def piece(ci: int, site_ix: int, layer: int, table, w, shift: float, r0: int) -> np.ndarray:
        r1 = min(r0 + rows, T)
        x = uniform((2, site_ix, layer, r0), r1 - r0)
        x *= 0.4                                                  # token effect (same at every checkpoint)
        eta = uniform((3, ci, site_ix, layer, r0), r1 - r0)
        eta *= 0.2                                                # this checkpoint's token noise
        x += eta
        del eta
        x += table[cell[r0:r1]]                                   # cluster effect + its noise + modality offset
        if shift:
            x[visual[r0:r1]] += shift * w
        if layer == n_layers:                                      # the final-norm site
            x *= 0.5
        return x.astype(np_dtype)

    bar = tqdm(total=shape["bytes"], unit="B", unit_scale=True, unit_divisor=1024, desc=f"write {path.name}",
               disable=not progress, mininterval=1.0, file=sys.stderr)
    pool = ThreadPoolExecutor(max_workers=max(1, threads))
    try:
        for ci, label in enumerate(labels):
            index = store.slot(label)
            blocks = [(si, site, layer) for si, site in enumerate(layered) for layer in range(n_layers)]
            if "final" in sites:
                blocks.append((len(sites), "final", n_layers))
            for si, site, layer in blocks:
                u, m, w = layer_terms(si, layer)
                g = np.random.default_rng([seed, 4, ci, si, layer])
                u += 0.2 * g.standard_normal((K, dim), dtype=np.float32)            # this checkpoint's cluster noise
                table = (u[:, None, :] + m[None, :, :]).reshape(2 * K, dim)         # row 2a + (text): cluster a
                del u
                depth = (layer - half + 1) / (n_layers - half) if half <= layer < n_layers else 0.0
                shift = drift * depth * ci / max(1, n_checkpoints - 1)
                arr = store.root[site]
                starts = list(range(0, T, rows))
                # at most `threads` chunks generated ahead of the one being written
                futures = [pool.submit(piece, ci, si, layer, table, w, shift, r0)
                           for r0 in starts[:max(1, threads)]]
                for k, r0 in enumerate(starts):
                    block = futures.pop(0).result()
                    nxt = k + max(1, threads)
                    if nxt < len(starts):
                        futures.append(pool.submit(piece, ci, si, layer, table, w, shift, starts[nxt]))
                    if site == "final":
                        arr[index, r0:r0 + len(block), :] = block
                    else:
                        arr[index, layer, r0:r0 + len(block), :] = block
                    bar.update(rows * dim * np_dtype.itemsize)
            store.mark_complete(label, identity={
                "kind": "synthetic", "source": "bench/synthetic_store.py", "fingerprint": f"seed-{seed}-{label}",
                "options": {"tokens_per_sample": per_sample, "seed": seed, "drift": drift}})
    finally:
        pool.shutdown(wait=True)
        bar.close()
    return path


def store_bytes(path) -> int:
    """Bytes on disk under ``path`` (``du``'s allocated blocks)."""
    total = 0
    for f in Path(path).rglob("*"):
        if f.is_file():
            total += f.stat().st_blocks * 512
    return total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", type=Path)
    ap.add_argument("--gb", type=float, default=None, help="target size in GiB (sets --clusters)")
    ap.add_argument("--checkpoints", type=int, default=6)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--clusters", type=int, default=None)
    ap.add_argument("--tokens-per-cluster", type=int, default=128)
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    ap.add_argument("--sites", nargs="+", default=["hidden"], choices=["hidden", "key", "query", "final"])
    ap.add_argument("--final", action="store_true", help="also the unlayered `final` site")
    ap.add_argument("--drift", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    sites = tuple(dict.fromkeys(list(args.sites) + (["final"] if args.final else [])))
    shape = plan(args.gb, args.checkpoints, args.layers, args.dim, args.clusters, args.tokens_per_cluster,
                 args.dtype, sites)
    print(f"{args.path}: {args.checkpoints} checkpoints x {args.layers} layers x {shape['n_tokens']} tokens "
          f"({shape['n_clusters']} clusters x {args.tokens_per_cluster}) x d={args.dim} {args.dtype}, sites "
          f"{list(sites)}: {shape['bytes'] / GIB:.2f} GiB in {shape['n_blocks']} blocks of "
          f"{shape['block_bytes'] / 2**20:.0f} MiB", flush=True)
    t = time.perf_counter()
    write_synthetic_store(args.path, args.gb, args.checkpoints, args.layers, args.dim, args.clusters,
                          args.tokens_per_cluster, args.dtype, sites, args.seed, drift=args.drift,
                          overwrite=args.overwrite, progress=not args.no_progress)
    dt = time.perf_counter() - t
    size = store_bytes(args.path)
    print(f"wrote {size / GIB:.2f} GiB ({size / 1e9:.2f} GB) in {dt:.0f} s ({size / dt / 2**20:.0f} MiB/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
