"""Capture visual- and text-token vectors layer by layer across checkpoints with nnsight.

One checkpoint at a time: load it, trace every probe batch once, gather the selected token
rows of every captured (site, layer) inside the trace, stream them into the activation store,
mark the checkpoint complete, free the model. Memory is bounded by one model (plus the base
model when PEFT adapters are applied) and one batch.
"""
from __future__ import annotations

import gc
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from driftlens.sources import (
    SourceError,
    describe,
    load_model_dir,
    load_processor,
    load_source,
    normalize_checkpoints,
    source_kind,
)
from driftlens.store import UNLAYERED, ActivationStore, StoreMismatchError

SITES = ("embed", "hidden", "key", "query", "final")
SITE_ORDER = {s: i for i, s in enumerate(SITES)}


class CaptureError(RuntimeError):
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
        return len(self.tokens["sample"])

    def selection_hash(self) -> str:
        h = hashlib.sha256()
        for name in ("sample", "position", "modality"):
            h.update("\x00".join(map(str, self.tokens[name])).encode())
        return h.hexdigest()[:16]


def resolve_device(device: str | None = "auto"):
    """``"auto"`` -> CUDA when present, else CPU; anything else is passed to torch.device."""
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def plan_tokens(processor, spec, config, probes, batch_size: int = 8,
                tokens_per_sample: int | None = None, seed: int = 0) -> Plan:
    """Tokenize every probe and choose the captured token rows.

    Rows are all non-padding positions of each probe, or -- with ``tokens_per_sample`` --
    at most that many visual and that many text positions per probe, drawn with a
    generator seeded by ``(seed, probe index)``: the same rows for every checkpoint and
    every rerun.
    """
    from driftlens.inputs import model_inputs

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    image_id = spec.image_token_id(config)
    batches: list[Batch] = []
    cols: dict[str, list] = {"sample": [], "group": [], "cluster": [], "position": [], "modality": [], "lang": []}
    start = 0
    for b0 in range(0, len(probes), batch_size):
        idx = list(range(b0, min(b0 + batch_size, len(probes))))
        items = [probes[i] for i in idx]
        images = [probes.image(p) for p in items]
        inputs = dict(model_inputs(processor, spec, images, [p.prompt for p in items]))
        ids = inputs["input_ids"].numpy()                       # [B, S]
        mask = inputs.get("attention_mask")
        mask = np.ones_like(ids) if mask is None else mask.numpy()
        rows_b, rows_p = [], []
        for j, (i, p) in enumerate(zip(idx, items)):
            pos = np.flatnonzero(mask[j] > 0)
            vis = pos[ids[j, pos] == image_id]
            txt = pos[ids[j, pos] != image_id]
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
                rows_b, rows_p, stop_after: bool = True, stack: bool = True) -> dict:
    """Run one nnsight trace and return the gathered rows per site.

    Returns
    -------
    dict
        ``embed`` / ``final`` -> ``[r, d]``; ``hidden`` / ``key`` / ``query`` ->
        ``[n_layers, r, width]`` (with ``stack=False``: a list of ``n_layers`` tensors
        ``[r, width]``, saving a copy). Modules are read in forward order (embed, then per layer
        q_proj, k_proj, output, then the final norm).
    """
    import torch

    out: dict[str, list] = {s: [] for s in sites}   # created before the trace (nnsight gotcha)
    decoder = _envoy(nmodel, spec.decoder_layers)
    with torch.inference_mode(), nmodel.trace(**inputs, use_cache=False) as tracer:
        if "embed" in sites:
            out["embed"].append(_first(decoder[0].input)[rows_b, rows_p].save())
        for i in layers:
            block = decoder[i]
            if "query" in sites:
                out["query"].append(_envoy(block, spec.query_proj).output[rows_b, rows_p].save())
            if "key" in sites:
                out["key"].append(_envoy(block, spec.key_proj).output[rows_b, rows_p].save())
            if "hidden" in sites:
                out["hidden"].append(_first(block.output)[rows_b, rows_p].save())
        if "final" in sites:
            out["final"].append(_first(_envoy(nmodel, spec.final_norm).output)[rows_b, rows_p].save())
        if stop_after:
            tracer.stop()
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


def _config_of(model):
    if isinstance(model, (str, Path)):
        from transformers import AutoConfig

        path = Path(model)
        if not (path / "config.json").exists():
            raise SourceError(f"model directory {path} has no config.json")
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    return model.config


def capture(model, probes, checkpoints=None, out="driftlens.zarr", sites=("hidden", "key", "final"),
            layers=None, batch_size: int = 8, device="auto", *, processor=None, spec=None,
            dtype: str = "float32", tokens_per_sample: int | None = None, seed: int = 0,
            progress: bool = True, allow_pickle: bool = False, trust_remote_code: bool = False):
    """Capture token vectors of a probe set across a trajectory of checkpoints into a store.

    Parameters
    ----------
    model : nn.Module or path
        The base model: a transformers model in memory or a local model directory. Its
        processor is loaded from the directory unless ``processor`` is given. PEFT adapters
        in ``checkpoints`` are applied to it.
    probes : ProbeSet, str or path
        A probe set or its name / manifest path (see :class:`driftlens.ProbeSet`).
    checkpoints : mapping label -> source, optional
        The trajectory, in order. A source is an ``nn.Module``, a model directory or a PEFT
        adapter directory. Default: ``{"model": model}``.
    out : str or Path
        Store folder (zarr). Completed checkpoints already in it are skipped; an
        interrupted one is redone; new labels are appended.
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

    Returns
    -------
    pathlib.Path
        The store path; open it with :func:`driftlens.open_store`.
    """
    import torch
    from tqdm.auto import tqdm

    from driftlens.probes import ProbeSet
    from driftlens.specs import Spec, load_spec

    sites = tuple(sorted(dict.fromkeys(sites), key=lambda s: SITE_ORDER.get(s, 99)))
    bad = [s for s in sites if s not in SITES]
    if bad or not sites:
        raise ValueError(f"unknown site(s) {bad}; choose from {SITES}")
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
    probes = probes if isinstance(probes, ProbeSet) else ProbeSet.load(probes)
    ckpts = normalize_checkpoints(model, checkpoints)
    for label, src in ckpts.items():
        source_kind(src)                       # fail early on a missing/odd directory
    config = _config_of(model)
    if spec is None:
        spec = load_spec(config)
    elif not isinstance(spec, Spec):
        spec = load_spec(path=spec)
    if processor is None:
        where = model if isinstance(model, (str, Path)) else getattr(config, "_name_or_path", "")
        if not where or not Path(where).is_dir():
            raise CaptureError("`model` is an in-memory module without a saved processor: pass processor=")
        processor = load_processor(where, trust_remote_code=trust_remote_code)
    plan = plan_tokens(processor, spec, config, probes, batch_size, tokens_per_sample, seed)
    dev = resolve_device(device)
    out = Path(out)
    _precheck_store(out, probes, config, spec)

    store = None
    base_cache: dict = {}
    done = set(_peek(out).get("completed", []))
    bar = tqdm(total=len(ckpts), desc="checkpoints", disable=not progress, unit="ckpt")
    for label, src in ckpts.items():
        if label in done:
            bar.update(1)
            continue
        bar.set_postfix_str(label)
        net = _materialize(src, model, base_cache, allow_pickle, trust_remote_code)
        if getattr(net.config, "model_type", None) != config.model_type:
            raise CaptureError(
                f"checkpoint {label!r} ({describe(src)}) is a {net.config.model_type!r} model, "
                f"the base is {config.model_type!r}: one store holds one architecture"
            )
        spec.validate(net)
        n_layers = spec.num_layers(net)
        layer_ids = list(range(n_layers)) if layers is None else [int(i) for i in layers]
        badl = [i for i in layer_ids if not 0 <= i < n_layers]
        if badl:
            raise ValueError(f"layers {badl} out of range: {describe(src)} has {n_layers} decoder layers")
        net = net.to(dev)
        store = _capture_one(net, spec, plan, label, layer_ids, sites, dev, out, store,
                             {"probes": probes, "config": config, "n_layers": n_layers,
                              "dtype": dtype}, progress, src)
        loaded = not isinstance(src, torch.nn.Module)
        del net
        if loaded:                  # free a model we loaded before the next one arrives
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        bar.update(1)
    bar.close()
    return out


def _materialize(src, model, base_cache, allow_pickle, trust_remote_code):
    kind = source_kind(src)
    base = None
    if kind == "adapter_dir":
        if "base" not in base_cache:
            base_cache["base"] = (
                load_model_dir(model, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
                if isinstance(model, (str, Path)) else model
            )
        base = base_cache["base"]
    return load_source(src, base=base, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)


def _peek(out: Path) -> dict:
    f = out / "zarr.json"
    if not f.exists():
        return {}
    try:
        return json.loads(f.read_text()).get("attributes", {})
    except (OSError, json.JSONDecodeError) as exc:
        raise StoreMismatchError(f"{f} is unreadable: {exc}") from exc


def _precheck_store(out: Path, probes, config, spec) -> None:
    """Refuse a store of another probe set or architecture before loading any model."""
    have = _peek(out)
    if not have:
        return
    checks = {
        "probe_fingerprint": (probes.fingerprint, "another probe set (or an edited one)"),
        "model_type": (config.model_type, "another architecture"),
    }
    for key, (want, what) in checks.items():
        if have.get(key) != want:
            raise StoreMismatchError(
                f"{out} holds data from {what}: store has {key}={have.get(key)!r}, "
                f"this capture has {key}={want!r}. Write to a new `out` instead."
            )


def _capture_one(net, spec, plan: Plan, label, layer_ids, sites, dev, out, store, ctx,
                 progress, src):
    from nnsight import NNsight
    from tqdm.auto import tqdm

    nmodel = NNsight(net)
    fdtype = _model_dtype(net)
    writer = None
    try:
        for batch in tqdm(plan.batches, desc=f"capture {label}", leave=False, disable=not progress):
            arrays = _trace_arrays(nmodel, spec, batch, layer_ids, sites, dev, fdtype, label, src)
            if store is None:
                store = ActivationStore(out, _meta(ctx, spec, layer_ids, sites, arrays, plan), plan.tokens)
            if writer is None:
                writer = store.writer(store.slot(label))
            for s, arr in arrays.items():
                writer.add(s, batch.start, arr)
    finally:
        if writer is not None:       # also on an error mid-checkpoint: finish queued writes, close files
            writer.close()
    store.mark_complete(label)       # only after every row is on disk
    return store


def _trace_arrays(nmodel, spec, batch: Batch, layer_ids, sites, dev, fdtype, label, src) -> dict:
    """One batch's captured rows as host arrays: ``embed`` ``[r, d]``; layered sites a list of
    ``n_layers`` arrays ``[r, width]`` (cast to the storage dtype when written)."""
    import torch

    inputs = _to_device(batch.inputs, dev, fdtype)
    rb = torch.as_tensor(batch.rows_b, device=dev)
    rp = torch.as_tensor(batch.rows_p, device=dev)
    try:
        got = trace_batch(nmodel, spec, inputs, layer_ids, sites, rb, rp, stack=False)
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


def _meta(ctx, spec, layer_ids, sites, arrays, plan) -> dict:
    probes, config = ctx["probes"], ctx["config"]
    return {
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
