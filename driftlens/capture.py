"""Capture visual- and text-token vectors layer by layer across checkpoints with nnsight.

One checkpoint at a time: load it, trace every probe batch once, gather the selected token
rows of every captured (site, layer) inside the trace, stream them into the activation store,
mark the checkpoint complete, free the model. Memory is bounded by one model (plus the base
model when PEFT adapters are applied) and one batch.
"""
from __future__ import annotations

import gc
import hashlib
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from driftlens.devices import resolve_device
from driftlens.errors import (
    CheckpointIdentityError,
    DataError,
    EnvironmentProblem,
    UsageError,
    raise_if_interrupted,
)
from driftlens.schema import SITES, UNLAYERED, Site
from driftlens.sources import (
    SourceError,
    check_remote_code,
    describe,
    hub_record,
    hub_snapshot,
    identity,
    load_config,
    load_model_dir,
    load_processor,
    load_source,
    normalize_checkpoints,
    resolve_source,
    source_kind,
)
from driftlens.store import ActivationStore, StoreMismatchError, root_attrs
from driftlens.store import prepare as store_prepare

if TYPE_CHECKING:
    import torch
    from distributed import Client

    from driftlens.probes import ProbeSet
    from driftlens.specs import Spec

SITE_ORDER = {s: i for i, s in enumerate(SITES)}


class CaptureError(DataError, RuntimeError):
    """A capture cannot proceed; the message says which checkpoint, module or input."""


@dataclass
class Batch:
    """One model batch and the token rows it contributes to the store."""

    probe_index: list[int]          # indices into the probe set
    inputs: dict                    # processor output (tensors on CPU)
    rows_b: np.ndarray              # [r] batch index of each captured row
    rows_p: np.ndarray              # [r] sequence position of each captured row
    start: int                      # first token row in the store
    n_image_tokens: int             # image-placeholder tokens in input_ids


@dataclass
class Plan:
    """Weight-independent part of a capture: batches and the token table."""

    batches: list[Batch]
    tokens: dict = field(default_factory=dict)   # sample, group, cluster, position, modality, lang; one per row

    @property
    def n_tokens(self) -> int:
        """Number of selected token rows."""
        return len(self.tokens["sample"])

    def selection_hash(self) -> str:
        """A hash of the token selection (sample, position, modality), stored with the capture."""
        h = hashlib.sha256()
        for name in ("sample", "position", "modality"):
            h.update("\x00".join(map(str, self.tokens[name])).encode())
        return h.hexdigest()[:16]


def plan_tokens(processor, spec, config, probes, batch_size: int = 8,
                tokens_per_sample: int | None = None, seed: int = 0) -> Plan:
    """Tokenize every probe and choose the captured token rows.

    Rows are all non-padding positions of each probe, or -- with ``tokens_per_sample`` --
    at most that many visual and that many text positions per probe, drawn with a
    generator seeded by ``(seed, probe index)``: the same rows for every checkpoint and
    every rerun.
    """
    from driftlens.inputs import check_positions, model_inputs, token_rows

    _check_count("batch_size", batch_size)
    if tokens_per_sample is not None:
        _check_count("tokens_per_sample", tokens_per_sample)
    image_id = spec.image_token_id(config)
    batches: list[Batch] = []
    cols: dict[str, list] = {"sample": [], "group": [], "cluster": [], "position": [], "modality": [], "lang": []}
    start = 0
    for b0 in range(0, len(probes), batch_size):
        idx = list(range(b0, min(b0 + batch_size, len(probes))))
        items = [probes[i] for i in idx]
        images = [probes.image(p) for p in items]
        inputs = dict(model_inputs(processor, spec, images, [p.prompt for p in items]))
        check_positions(inputs, config, items)                  # before any forward (and any OOM)
        ids = inputs["input_ids"].numpy()                       # [B, S]
        mask = inputs.get("attention_mask")
        visual, text = token_rows(ids, None if mask is None else mask.numpy(), image_id)    # [B, S] each
        rows_b, rows_p = [], []
        for j, (i, p) in enumerate(zip(idx, items)):
            vis, txt = np.flatnonzero(visual[j]), np.flatnonzero(text[j])
            if len(vis) == 0:
                raise CaptureError(
                    f"probe {p.id!r}: input_ids hold no image token (id {image_id}); "
                    "the processor did not insert the image placeholder"
                )
            if tokens_per_sample is not None:
                rng = np.random.default_rng([seed, i])
                vis = np.sort(rng.permutation(vis)[:tokens_per_sample])
                txt = np.sort(rng.permutation(txt)[:tokens_per_sample])
            keep = np.sort(np.concatenate([vis, txt]))
            is_vis = np.isin(keep, vis)
            rows_b.append(np.full(len(keep), j))
            rows_p.append(keep)
            cols["sample"] += [p.id] * len(keep)
            cols["group"] += [p.group] * len(keep)
            cols["cluster"] += [p.cluster] * len(keep)
            cols["position"] += keep.tolist()
            cols["modality"] += ["visual" if v else "text" for v in is_vis]
            cols["lang"] += [p.lang] * len(keep)
        rb, rp = np.concatenate(rows_b), np.concatenate(rows_p)
        batches.append(Batch(idx, inputs, rb, rp, start, int((ids == image_id).sum())))
        start += len(rb)
    tokens = {k: np.asarray(v) for k, v in cols.items()}
    return Plan(batches, tokens)


def _envoy(root, path: str):
    """Follow a dotted module path on an nnsight Envoy (integer parts index ModuleLists)."""
    env = root
    for part in path.split("."):
        env = env[int(part)] if part.isdigit() else getattr(env, part)
    return env


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def trace_batch(nmodel, spec, inputs: dict, layers: list[int], sites: tuple[str, ...],
                rows_b, rows_p, stop_after: bool = True, stack: bool = True,
                route_layers: Sequence[int] = (), n_experts: int | None = None) -> dict:
    """Run one nnsight trace and return the gathered rows per site.

    Returns
    -------
    dict
        ``embed`` / ``final`` -> ``[r, d]``; ``hidden`` / ``key`` / ``query`` / ``route`` ->
        ``[n_layers, r, width]`` (with ``stack=False``: a list of ``n_layers`` tensors
        ``[r, width]``, saving a copy). ``route`` holds the routing distribution over the
        ``n_experts`` experts at the sparse blocks ``route_layers`` (the spec's router logits
        through :meth:`Spec.route_probabilities`) and NaN at dense blocks. Modules are read in
        forward order (embed, then per layer q_proj, k_proj, the router, output, then the final norm).
    """
    import torch

    out: dict[str, list] = {s: [] for s in sites}   # created before the trace (nnsight gotcha)
    decoder = _envoy(nmodel, spec.decoder_layers)
    sparse = set(route_layers) if "route" in sites else set()
    seq = int(inputs["input_ids"].shape[1])
    flat = rows_b * seq + rows_p                     # routers see the batch flattened to [B * S, hidden]
    with torch.inference_mode(), nmodel.trace(**inputs, use_cache=False) as tracer:
        if "embed" in sites:
            out["embed"].append(_first(decoder[0].input)[rows_b, rows_p].save())
        for i in layers:
            block = decoder[i]
            if "query" in sites:
                out["query"].append(_envoy(block, spec.query_proj).output[rows_b, rows_p].save())
            if "key" in sites:
                out["key"].append(_envoy(block, spec.key_proj).output[rows_b, rows_p].save())
            if i in sparse:
                logits = _envoy(block, spec.router).output[spec.router_logits]
                out["route"].append((logits[rows_b, rows_p] if logits.ndim == 3 else logits[flat]).save())
            if "hidden" in sites:
                out["hidden"].append(_first(block.output)[rows_b, rows_p].save())
        if "final" in sites:
            out["final"].append(_first(_envoy(nmodel, spec.final_norm).output)[rows_b, rows_p].save())
        if stop_after:
            tracer.stop()
    if "route" in sites:
        probs = iter([spec.route_probabilities(t) for t in out["route"]])
        out["route"] = [next(probs) if i in sparse else
                        torch.full((len(rows_b), int(n_experts or 1)), float("nan"), device=flat.device)
                        for i in layers]
    result = {}
    for s in sites:
        if s in UNLAYERED:
            result[s] = out[s][0]
        else:
            result[s] = torch.stack(list(out[s])) if stack else list(out[s])
    return result


def _to_device(inputs: dict, device, dtype):
    import torch

    moved = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device)
            if v.is_floating_point() and dtype is not None:
                v = v.to(dtype)
        moved[k] = v
    return moved


def _model_dtype(model):
    for p in model.parameters():
        return p.dtype
    return None


def _config_of(model, trust_remote_code: bool = False):
    if isinstance(model, (str, Path)):
        return load_config(model, trust_remote_code=trust_remote_code)
    return model.config


def capture(model: torch.nn.Module | str | os.PathLike, probes: ProbeSet | str | os.PathLike,
            checkpoints: Mapping[str, torch.nn.Module | str | os.PathLike] | None = None,
            out: str | os.PathLike = "driftlens.zarr", sites: Sequence[Site] = ("hidden", "key", "final"),
            layers: Sequence[int] | None = None, batch_size: int = 8, device: str | torch.device = "auto", *,
            processor: Any = None, spec: Spec | str | os.PathLike | None = None,
            dtype: Literal["float32", "float16"] = "float32", tokens_per_sample: int | None = None, seed: int = 0,
            progress: bool = True, allow_pickle: bool = False, trust_remote_code: bool = False,
            overwrite: Sequence[str] = (), client: Client | None = None) -> Path:
    """Capture token vectors of a probe set across a trajectory of checkpoints into a store.

    Parameters
    ----------
    model : nn.Module, path or hub id
        The base model: a transformers model in memory, a local model directory or a Hugging
        Face Hub id (``org/name``, pinned: ``org/name@REVISION``) resolved through the hub's cache
        (:func:`driftlens.sources.resolve_source`; offline with ``HF_HUB_OFFLINE=1``). Its
        processor is loaded from the directory unless ``processor`` is given. PEFT adapters
        in ``checkpoints`` are applied to it.
    probes : ProbeSet, str or path
        A probe set or its name / manifest path (see :class:`driftlens.ProbeSet`).
    checkpoints : mapping label -> source, optional
        The trajectory, in order. A source is an ``nn.Module``, a model directory, a PEFT
        adapter directory or a hub id of either (the store records its repository, the revision
        asked for and the commit). Default: ``{"model": model}``.
    out : str or Path
        Store folder (zarr). Completed checkpoints already in it are skipped (after checking
        that their label still names the same weights); an interrupted one is redone; new
        labels are appended. Every value is checked before any model is loaded: another probe
        set, architecture, site / layer / dtype selection or token selection is refused.
    sites : tuple of str
        Any of ``"embed"``, ``"hidden"``, ``"key"``, ``"query"``, ``"final"`` (the decoder's
        final-norm output, HF's last ``hidden_states`` entry: what MIR's last layer uses).
    layers : sequence of int, optional
        Decoder blocks to capture (default all).
    batch_size : int
        Probes per forward pass.
    device : str
        ``"auto"`` uses CUDA when present.
    processor : transformers processor, optional
        Needed when ``model`` is an in-memory module without a saved processor.
    spec : Spec or path, optional
        Architecture spec; default picked by ``config.model_type``.
    dtype : {"float32", "float16"}
        Storage dtype.
    tokens_per_sample : int, optional
        Keep at most this many visual and this many text tokens per probe (fixed-seed rows).
    seed : int
        Seed of the token subsampling.
    progress : bool
        Show tqdm progress bars.
    allow_pickle, trust_remote_code : bool
        Off by default: safetensors only, no remote code.
    overwrite : sequence of str
        Labels of completed checkpoints to capture again (replacing their rows), for example
        after their source changed or ``driftlens check`` found a damaged chunk. Without it, a
        completed label whose source (weights fingerprint) differs from the recorded one is
        refused.
    client : distributed.Client, optional
        Capture the checkpoints as Dask tasks on this client's cluster, one checkpoint per task,
        each writing its own slot of the store (give each worker its own GPU, e.g. with
        ``dask_cuda.LocalCUDACluster``; ``device`` is resolved on the worker). Every check runs
        here first; the first checkpoint of a new store is captured alone (it creates the
        store), the others' slots are then registered in trajectory order and they run in
        parallel. A task killed mid-write is rerun by the scheduler and redoes its checkpoint;
        the workers must see ``out`` and the sources at the same paths.

    Returns
    -------
    pathlib.Path
        The store path; open it with :func:`driftlens.open_store`.
    """
    import torch
    from tqdm.auto import tqdm

    from driftlens.probes import ProbeSet
    from driftlens.specs import Spec, load_spec

    sites = _check_sites(sites)
    if dtype not in ("float32", "float16"):
        raise UsageError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
    layers = _check_layers(layers)        # batch_size and tokens_per_sample: plan_tokens, before any load
    if client is not None:
        from driftlens.scaleout import check_client

        check_client(client)              # closed, or no worker within the Dask timeout: refused, not a hang
    dev = resolve_device(device)
    out = _check_out(out)
    probes = probes if isinstance(probes, ProbeSet) else ProbeSet.load(probes)
    from driftlens.merges import as_source

    # merge:... strings become Merge objects here: driftlens.sources knows no merge syntax
    ckpts = {label: as_source(src) for label, src in normalize_checkpoints(model, checkpoints).items()}
    overwrite = _check_overwrite(overwrite, ckpts)
    asked = dict(ckpts)
    model, ckpts = _resolve_hub_ids(model, ckpts, allow_pickle, trust_remote_code)
    for src in ckpts.values():
        source_kind(src)                       # fail early on a missing/odd directory
    _check_out_not_in_inputs(out, model, ckpts, probes)
    config = _config_of(model, trust_remote_code)
    _check_sources(model, ckpts, config, trust_remote_code)
    if spec is None:
        spec = load_spec(config)
    elif not isinstance(spec, Spec):
        spec = load_spec(path=spec)
    if "route" in sites and spec.router is None:
        raise UsageError(f"site 'route' reads a mixture-of-experts router, and spec {spec.path} (family "
                         f"{spec.family!r}) names none (a dense decoder); leave 'route' out of --sites, or add "
                         f"`router` to the spec")
    n_config = _config_layers(config)
    if layers is not None and n_config is not None:
        _layers_in_range(layers, n_config, describe(model))
    if processor is None:
        where = model if isinstance(model, (str, Path)) else getattr(config, "_name_or_path", "")
        if not where or not Path(where).is_dir():
            raise CaptureError("`model` is an in-memory module without a saved processor: pass processor=")
        processor = load_processor(where, trust_remote_code=trust_remote_code)
    plan = plan_tokens(processor, spec, config, probes, batch_size, tokens_per_sample, seed)
    options = {"sites": list(sites), "dtype": dtype, "tokens_per_sample": tokens_per_sample, "seed": int(seed),
               "batch_size": int(batch_size), "token_selection": plan.selection_hash()}
    want = {"probe_fingerprint": probes.fingerprint, "model_type": config.model_type, "sites": list(sites),
            "dtype": dtype, "token_selection": plan.selection_hash(), "n_layers": n_config,
            "layers": None if layers is None and n_config is None else
            (list(range(n_config)) if layers is None else layers)}
    idents = {label: identity(src, model if source_kind(src) in ("adapter_dir", "merge") else None)
              for label, src in ckpts.items()}
    for label, src in ckpts.items():          # a hub id: repository, the revision asked for, the commit it is
        hub = hub_record(asked[label], src)
        if hub is not None:
            idents[label]["hub"] = hub
    done = store_prepare(out, want, idents, overwrite)     # the store's checks, before any model is loaded

    if client is not None:
        options = {"sites": sites, "layers": layers, "batch_size": batch_size, "device": device,
                   "processor": processor, "spec": spec, "dtype": dtype, "tokens_per_sample": tokens_per_sample,
                   "seed": seed, "allow_pickle": allow_pickle, "trust_remote_code": trust_remote_code}
        return _capture_on_dask(client, model, probes, ckpts, done, out, options, progress)
    store = None
    base_cache: dict = {}
    bar = tqdm(total=len(ckpts), desc="checkpoints", disable=not progress, unit="ckpt")
    for label, src in ckpts.items():
        raise_if_interrupted()
        if label in done:
            bar.update(1)
            continue
        bar.set_postfix_str(label)
        net = _materialize(src, model, base_cache, allow_pickle, trust_remote_code)
        _same_architecture(label, src, net.config, model, config)
        spec.validate(net)
        n_layers = spec.num_layers(net)
        layer_ids = list(range(n_layers)) if layers is None else layers
        _layers_in_range(layer_ids, n_layers, describe(src))
        net = net.to(dev)
        store = _capture_one(net, spec, plan, label, layer_ids, sites, dev, out, store,
                             {"probes": probes, "config": config, "n_layers": n_layers,
                              "dtype": dtype, "identity": {**idents[label], "options": options}},
                             progress, src)
        loaded = not isinstance(src, torch.nn.Module)
        del net
        if loaded:                  # free a model we loaded before the next one arrives
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        bar.update(1)
    bar.close()
    return out


def _resolve_hub_ids(model, ckpts: dict, allow_pickle: bool, trust_remote_code: bool) -> tuple:
    """MODEL and the checkpoint sources with hub ids (``org/name[@rev]``) replaced by their cache folders."""
    memo: dict = {}

    def resolve(src):
        key = os.fspath(src) if isinstance(src, (str, os.PathLike)) else id(src)
        if key not in memo:
            memo[key] = resolve_source(src, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
        return memo[key]

    return resolve(model), {label: resolve(src) for label, src in ckpts.items()}


def _capture_on_dask(client, model, probes, ckpts: dict, done: set, out: Path, options: dict, progress: bool) -> Path:
    """One Dask task per pending checkpoint; the driver owns the order of the store's slots."""
    from tqdm.auto import tqdm

    from driftlens.scaleout import gather
    from driftlens.store import register_checkpoints

    pending = [label for label in ckpts if label not in done]
    bar = tqdm(total=len(ckpts), initial=len(ckpts) - len(pending), desc="checkpoints", disable=not progress,
               unit="ckpt")
    lock = f"driftlens-store-{out.resolve() if isinstance(out, Path) else out}"
    try:
        if pending and not root_attrs(out, missing_ok=True):   # the first checkpoint creates the store
            first = pending.pop(0)
            client.submit(_capture_task, first, ckpts[first], model, probes, out, options, lock, pure=False,
                          key=f"driftlens-capture-{first}-{uuid.uuid4().hex[:8]}").result()
            bar.update(1)
        if pending:
            register_checkpoints(out, None, list(ckpts))        # trajectory order, before any task runs
            futures = [client.submit(_capture_task, label, ckpts[label], model, probes, out, options, lock,
                                     pure=False, key=f"driftlens-capture-{label}-{uuid.uuid4().hex[:8]}")
                       for label in pending]
            gather(client, futures, bar)
    finally:
        bar.close()
    return out


def _capture_task(label, src, model, probes, out, options, lock_name) -> str:
    """Capture one checkpoint on a Dask worker; the store's metadata updates hold a cluster-wide lock."""
    import distributed

    from driftlens.store import METADATA_LOCK

    token = METADATA_LOCK.set(lambda: distributed.Lock(lock_name))
    try:
        capture(model, probes, {label: src}, out=out, progress=False, **options)
    finally:
        METADATA_LOCK.reset(token)
    return label


def _materialize(src, model, base_cache, allow_pickle, trust_remote_code):
    kind = source_kind(src)
    base = None
    if kind == "adapter_dir" or (kind == "merge" and src.base is None):
        if "base" not in base_cache:
            base_cache["base"] = (
                load_model_dir(model, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
                if isinstance(model, (str, Path)) else model
            )
        base = base_cache["base"]
    return load_source(src, base=base, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                       base_name=describe(model), cache=base_cache)


def _check_sites(sites) -> tuple[str, ...]:
    if isinstance(sites, str):
        sites = (sites,)
    sites = tuple(sorted(dict.fromkeys(sites), key=lambda s: SITE_ORDER.get(s, 99)))
    bad = [s for s in sites if s not in SITES]
    if bad or not sites:
        raise UsageError(f"unknown site(s) {bad or '(none given)'}; choose from {SITES}")
    return sites


def _check_count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UsageError(f"{name} must be an integer >= 1, got {value!r}")


def _check_layers(layers) -> list[int] | None:
    if layers is None:
        return None
    if isinstance(layers, (int, np.integer)):
        layers = [layers]
    try:
        ids = [int(i) for i in layers]
    except (TypeError, ValueError):
        raise UsageError(f"layers must be integers, got {layers!r}") from None
    if not ids:
        raise UsageError("layers is empty (leave it out to capture every layer)")
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise UsageError(f"layers {ids} repeat {dup}; give each decoder layer once")
    return sorted(ids)


def _layers_in_range(layers: list[int], n_layers: int, where: str) -> None:
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise UsageError(f"layers {bad} out of range: {where} has {n_layers} decoder layers (0..{n_layers - 1})")


def _config_layers(config) -> int | None:
    """Decoder layer count from a config (None when the config does not say)."""
    try:
        text = config.get_text_config()
    except (AttributeError, TypeError, ValueError):
        text = config
    n = getattr(text, "num_hidden_layers", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def _check_out(out) -> Path:
    """The store folder: not a file, not a non-store folder, and writable -- checked before any work."""
    import os

    from driftlens.store import is_local, location

    out = location(out)
    if not is_local(out) and getattr(out, "protocol", None) == "memory":
        raise UsageError(f"--out {out}: an in-memory (memory://) store vanishes when this process exits, so "
                         f"nothing captured would survive; give a folder or a persistent URL (s3://, gs://, ...)")
    if not is_local(out):             # a URL: zarr writes through fsspec; the backend says what it refuses
        if out.is_dir() and not (out / "zarr.json").exists() and any(out.iterdir()):
            raise StoreMismatchError(f"{out} exists and is not a driftlens store (no zarr.json); "
                                     "choose another --out or remove it")
        return out
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; a store is a folder")
    if out.is_dir() and not (out / "zarr.json").exists() and any(out.iterdir()):
        raise StoreMismatchError(f"{out} exists and is not a driftlens store (no zarr.json); "
                                 "choose another --out or remove the folder")
    probe = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not probe.is_dir():
        raise UsageError(f"--out {out}: {probe} is a file, so the store folder cannot be created")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise EnvironmentProblem(f"--out {out}: {probe} is not writable")
    return out


#: Config fields that make two checkpoints one architecture for capture: every checkpoint is fed MODEL's
#: processor and read through one spec, so these must agree (vocab_size may differ: a checkpoint that
#: added tokens still reads MODEL's token ids, and is warned about).
_TEXT_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "intermediate_size")
_VISION_FIELDS = ("model_type", "hidden_size", "image_size", "patch_size", "num_hidden_layers")
_TOP_FIELDS = ("model_type", "image_token_id", "image_token_index", "vision_feature_layer",
               "vision_feature_select_strategy", "image_seq_length", "mm_tokens_per_image")


def architecture(config) -> dict:
    """The fields of a model config that capture needs equal across a trajectory (see ``_TEXT_FIELDS``)."""
    def pick(cfg, fields, prefix):
        return {f"{prefix}{f}": _plain(getattr(cfg, f, None)) for f in fields if getattr(cfg, f, None) is not None}

    try:
        text = config.get_text_config()
    except (AttributeError, TypeError, ValueError):
        text = config
    out = pick(config, _TOP_FIELDS, "")
    if text is not config:
        out.update(pick(text, _TEXT_FIELDS, "text_config."))
    else:
        out.update(pick(config, _TEXT_FIELDS[1:], ""))
    vision = getattr(config, "vision_config", None)
    if vision is not None:
        out.update(pick(vision, _VISION_FIELDS, "vision_config."))
    return out


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


def _vocab(config) -> int | None:
    try:
        text = config.get_text_config()
    except (AttributeError, TypeError, ValueError):
        text = config
    v = getattr(text, "vocab_size", None)
    return int(v) if isinstance(v, int) else None


def _same_architecture(label, src, have_config, model, want_config) -> None:
    """Refuse a checkpoint whose architecture is not MODEL's, naming both and the fields that differ."""
    import warnings

    want, have = architecture(want_config), architecture(have_config)
    diff = [k for k in sorted(set(want) | set(have)) if want.get(k) != have.get(k)]
    if diff:
        shown = "; ".join(f"{k} {have.get(k)!r} vs {want.get(k)!r}" for k in diff[:4])
        raise CaptureError(
            f"checkpoint {label!r} ({describe(src)}) is not the architecture of MODEL {describe(model)} ({shown}"
            f"{f'; {len(diff) - 4} more' if len(diff) > 4 else ''}): every checkpoint is read with MODEL's "
            f"processor and spec, so a trajectory shares one architecture -- pass the checkpoints' own base as MODEL"
        )
    vh, vw = _vocab(have_config), _vocab(want_config)
    if vh is not None and vw is not None and vh != vw:
        warnings.warn(f"checkpoint {label!r} ({describe(src)}) has vocab_size {vh}, MODEL {describe(model)} {vw}: "
                      f"every checkpoint is fed MODEL's tokenizer (the paired design), so tokens one side added "
                      f"are never used", stacklevel=4)


def _check_sources(model, ckpts: dict, config, trust_remote_code: bool) -> None:
    """Before any weights load: no folder's own code unless trusted, every model-directory checkpoint of
    MODEL's architecture, every adapter trained on MODEL (see :func:`_check_adapter_base`)."""
    from driftlens.outputs import real

    for label, src in ckpts.items():
        kind = source_kind(src)
        if kind == "model_dir":
            check_remote_code(src, trust_remote_code)
            if isinstance(model, (str, os.PathLike)) and real(src) == real(model):
                continue
            _same_architecture(label, src, load_config(src, trust_remote_code), model, config)
        elif kind == "adapter_dir":
            _check_adapter_base(label, src, model)
        elif kind == "merge":              # its parts, as checkpoints of their own (an adapter: on the merge's base)
            from driftlens.merges import components

            parts = components(src, model)
            _check_sources(parts["base"], {f"{label} (merge ADAPTED)": parts["adapted"]}, config, trust_remote_code)
            if parts["base"] is not model:
                _check_sources(model, {f"{label} (merge BASE)": parts["base"]}, config, trust_remote_code)


def _check_adapter_base(label, src, model) -> None:
    """An adapter whose recorded base is a folder here must have been trained on MODEL's weights.

    ``base_model_name_or_path`` (adapter_config.json) that is a local model folder is compared by
    identity: the same folder, or a folder with the same weights fingerprint, passes; another is
    refused (the adapter would be applied to weights it was not trained on). A hub name or a path
    that is not here cannot be checked: a warning says so when its last part is not MODEL's folder
    name (PEFT itself checks only the tensor shapes).
    """
    import warnings

    from driftlens.outputs import real
    from driftlens.sources import adapter_base_name, fingerprint, hub_id

    name = adapter_base_name(src)
    if not name or not isinstance(model, (str, os.PathLike)):
        return
    recorded = Path(name).expanduser()
    model_hub = hub_snapshot(model)
    if not recorded.is_dir() and hub_id(name) is not None:       # a hub id: its folder in the cache, if there
        if model_hub is not None and model_hub["repo_id"] == hub_id(name)[0] and hub_id(name)[1] is None:
            return                                               # MODEL is that repository (some revision of it)
        try:
            recorded = Path(resolve_source(name, local_files_only=True))
        except SourceError:
            pass
    if recorded.is_dir() and (recorded / "config.json").is_file():
        if real(recorded) == real(model):
            return
        theirs, ours = fingerprint(recorded), fingerprint(model)
        if theirs != ours:
            raise CheckpointIdentityError(
                f"checkpoint {label!r}: the PEFT adapter {src} was trained on {name} (base_model_name_or_path in "
                f"its adapter_config.json, weights fingerprint {theirs}), not on MODEL {model} (fingerprint {ours}); "
                f"pass {name} as MODEL (a PEFT adapter applies only to the weights it was trained on)")
    elif recorded.name != real(model).name and (model_hub is None or model_hub["repo_id"] != name):
        warnings.warn(f"checkpoint {label!r}: the PEFT adapter {src} was trained on {name!r} (adapter_config.json), "
                      f"which is not a folder here; it is applied to MODEL {model} without checking that they are "
                      f"the same weights", stacklevel=4)


def _check_out_not_in_inputs(out, model, ckpts: dict, probes) -> None:
    """Refuse a store folder that is (or lies inside) the model's or a checkpoint's directory.

    A store inside the probe set's folder is allowed: capture writes only into the store folder, which
    must be new or a store, and the probe set's fingerprint covers its manifest and images.
    """
    from driftlens.merges import Merge, components
    from driftlens.outputs import check_output

    inputs = [("model directory", model)] if isinstance(model, (str, os.PathLike)) else []
    inputs += [(f"checkpoint {label!r} directory", src) for label, src in ckpts.items()
               if isinstance(src, (str, os.PathLike))]
    inputs += [(f"checkpoint {label!r} merge {role} directory", part) for label, src in ckpts.items()
               if isinstance(src, Merge) for role, part in components(src).items()
               if isinstance(part, (str, os.PathLike))]
    inputs.append(("probe manifest", probes.manifest))
    check_output(out, inputs)


def _check_overwrite(overwrite, ckpts: dict) -> list[str]:
    if isinstance(overwrite, str):
        overwrite = [overwrite]
    overwrite = list(overwrite or ())
    unknown = [lab for lab in overwrite if lab not in ckpts]
    if unknown:
        raise UsageError(f"--overwrite {unknown}: not among this capture's checkpoints {list(ckpts)}")
    return overwrite


def _capture_one(net, spec, plan: Plan, label, layer_ids, sites, dev, out, store, ctx,
                 progress, src):
    from nnsight import NNsight
    from tqdm.auto import tqdm

    nmodel = NNsight(net)
    fdtype = _model_dtype(net)
    writer = None
    route = _route_info(net, spec, layer_ids, label, src) if "route" in sites else {}
    try:
        for batch in tqdm(plan.batches, desc=f"capture {label}", leave=False, disable=not progress):
            raise_if_interrupted()
            arrays = _trace_arrays(nmodel, spec, batch, layer_ids, sites, dev, fdtype, label, src, route)
            if store is None:
                store = ActivationStore(out, _meta(ctx, spec, layer_ids, sites, arrays, plan, route), plan.tokens)
            if writer is None:
                writer = store.writer(store.slot(label))
            for s, arr in arrays.items():
                writer.add(s, batch.start, arr)
    finally:
        if writer is not None:       # also on an error mid-checkpoint: finish queued writes, close files
            writer.close()
    # only after every row is on disk; the chunk files' CRC32s were computed as they were written
    store.mark_complete(label, ctx["identity"], writer.checksums() if writer is not None else None)
    return store


def _route_info(net, spec, layer_ids, label, src) -> dict:
    """The sparse blocks among ``layer_ids``, the number of experts and experts per token (site ``route``)."""
    sparse = [i for i in spec.router_layers(net) if i in layer_ids]
    if not sparse:
        raise CaptureError(f"checkpoint {label!r} ({describe(src)}): site 'route' asked, but none of the captured "
                           f"decoder blocks {list(layer_ids)} has the router {spec.router!r} of spec {spec.path} "
                           f"(sparse blocks: {spec.router_layers(net)}); capture a sparse block or leave 'route' out")
    return {"route_layers": sparse, "n_experts": spec.n_experts(net), "route_top_k": spec.top_k(net.config),
            "route_scores": spec.router_scores}


def _trace_arrays(nmodel, spec, batch: Batch, layer_ids, sites, dev, fdtype, label, src, route=None) -> dict:
    """One batch's captured rows as host arrays: ``embed`` ``[r, d]``; layered sites a list of
    ``n_layers`` arrays ``[r, width]`` (cast to the storage dtype when written)."""
    import torch

    inputs = _to_device(batch.inputs, dev, fdtype)
    rb = torch.as_tensor(batch.rows_b, device=dev)
    rp = torch.as_tensor(batch.rows_p, device=dev)
    route = route or {}
    try:
        got = trace_batch(nmodel, spec, inputs, layer_ids, sites, rb, rp, stack=False,
                          route_layers=route.get("route_layers", ()), n_experts=route.get("n_experts"))
    except Exception as exc:  # noqa: BLE001 - re-raised with context
        raise _explain(exc, label, src, batch) from exc
    return {s: _host(v) if s in UNLAYERED else [_host(t) for t in v] for s, v in got.items()}


def _host(t) -> np.ndarray:
    """A captured tensor as a host numpy array (no copy for CPU float32 / float16)."""
    import torch

    t = t.detach()
    if t.dtype not in (torch.float32, torch.float16):
        t = t.float()                        # bfloat16 and others: numpy has no such dtype
    return t.cpu().numpy()


def _meta(ctx, spec, layer_ids, sites, arrays, plan, route=None) -> dict:
    probes, config = ctx["probes"], ctx["config"]
    route = {k: v for k, v in (route or {}).items() if k != "n_experts"}   # the width is in `dims`
    return {
        **route,
        "model_type": config.model_type,
        "family": spec.family,
        "probe_set": probes.name,
        "probe_fingerprint": probes.fingerprint,
        "n_layers": int(ctx["n_layers"]),
        "layers": [int(i) for i in layer_ids],
        "sites": list(sites),
        "dims": {s: int(a.shape[-1] if s in UNLAYERED else a[0].shape[-1]) for s, a in arrays.items()},
        "dtype": ctx["dtype"],
        "token_selection": plan.selection_hash(),
        "image_token_id": int(spec.image_token_id(config)),
    }


def _explain(exc: Exception, label, src, batch: Batch) -> Exception:
    text = str(exc)
    if "do not match" in text or "image token" in text.lower() or "features" in text.lower():
        return CaptureError(
            f"checkpoint {label!r} ({describe(src)}): the number of image tokens in input_ids "
            f"({batch.n_image_tokens} in the batch of probes {batch.probe_index}) does not match "
            f"the visual features the model produced. Check that the processor and the model "
            f"config agree (patch size, image size, vision_feature_select_strategy='default' for "
            f"LLaVA with a CLIP tower). Original error: {text}"
        )
    if isinstance(exc, (CaptureError, StoreMismatchError, SourceError)):
        return exc
    return CaptureError(f"checkpoint {label!r} ({describe(src)}), probes {batch.probe_index}: "
                        f"{type(exc).__name__}: {text}")
