"""Merged checkpoints as trajectory points: ``base + alpha * (adapted - base)``, linear, TIES or DARE.

The standard recipe for keeping a VLM's visual skills while adding a language is to merge the
adapted weights back towards the base. A merge sweep (alpha 0, 0.25, ..., 1) is a trajectory whose
points are merges, not training steps: capture it like any other and read the drift against alpha.

A :class:`Merge` is a checkpoint source (:mod:`driftlens.sources`) of the composed kind: it implements
:class:`driftlens.sources.ComposedSource`, so the sources' functions ask it about itself and it loads
its parts with them (this module imports :mod:`driftlens.sources`, never the reverse). Its task vector is
``tau = adapted - base`` per weight tensor (an adapted *model directory*, or a PEFT *adapter
directory* applied to the base and merged, whose task vector is then the adapter's dense delta);
the merged tensor is ``base + alpha * m(tau)`` with

- ``linear``: ``m(tau) = tau`` (task arithmetic; alpha 0 is the base, alpha 1 the adapted model);
- ``ties``: the ``density`` fraction of entries of largest magnitude kept (TIES-merging's trim; with
  one task vector its sign election keeps every kept entry) -- PEFT's ``merge_utils.ties``;
- ``dare``: entries kept at random with probability ``density`` and rescaled by ``1 / density``
  (DARE) -- PEFT's ``merge_utils.dare_linear`` -- with a generator seeded by ``seed`` and the
  tensor's name, so a merge is the same in every process and run.

Arithmetic in float64, cast back to the base's dtype (alpha 0 and linear alpha 1 reproduce the
base's and the adapted model's weights exactly). Tensors that are not floating point must be equal
in both models. Loading follows the sources' rules: safetensors only unless ``allow_pickle``, no
code from a folder unless ``trust_remote_code``.

On the command line a merge is a checkpoint source string (``driftlens capture -c LABEL=SOURCE``; the
capture turns it into a :class:`Merge` with :func:`as_source`)::

    merge:METHOD:ALPHA[,density=D][,seed=S]:[BASE:]ADAPTED

    merge:linear:0.5:base-model:ko-model          # halfway between two model folders
    merge:linear:0.25:ko-adapter                  # BASE omitted: the capture's MODEL
    merge:ties:1,density=0.2:base-model:ko-model
    merge:dare:0.5,density=0.3,seed=1:ko-adapter

From Python: ``Merge(adapted, alpha, method, base=None, density=None, seed=0)``, or
:func:`sweep` for a whole trajectory. A merge's identity (the store's record of what a label
was captured from) is its recipe and the fingerprints of both models, so two recipes never share
a label's data.
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from driftlens.errors import UsageError
from driftlens.sources import SourceError, apply_adapter, describe, fingerprint, load_model_dir, source_kind

if TYPE_CHECKING:
    import torch
    import xarray as xr

MergeMethod = Literal["linear", "ties", "dare"]
METHODS: tuple[str, ...] = ("linear", "ties", "dare")
PREFIX = "merge:"
SYNTAX = "merge:METHOD:ALPHA[,density=D][,seed=S]:[BASE:]ADAPTED"
DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class Merge:
    """A merged checkpoint: ``base + alpha * m(adapted - base)`` (see the module docstring).

    Attributes
    ----------
    adapted : str, path or nn.Module
        The adapted model: a model directory, a PEFT adapter directory (applied to ``base``), or a
        module in memory.
    alpha : float
        The merge coefficient (0: the base; 1 with ``linear``: the adapted model). Any finite value
        (above 1 extrapolates).
    method : {"linear", "ties", "dare"}
        How the task vector is merged.
    base : str, path, nn.Module or None
        The base model; None: the capture's MODEL.
    density : float or None
        Fraction of task-vector entries kept, in (0, 1]; required by ``ties`` and ``dare``.
    seed : int
        DARE's random drop (ignored by the other methods).

    Notes
    -----
    ``kind``, :meth:`spec`, :meth:`check`, :meth:`identity` and :meth:`materialize` make it a
    :class:`driftlens.sources.ComposedSource`; the last three are this module's functions of the same names.
    """

    #: what :func:`driftlens.sources.source_kind` returns for a merge
    kind: ClassVar[str] = "merge"

    adapted: Any
    alpha: float
    method: MergeMethod = "linear"
    base: Any = None
    density: float | None = None
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise UsageError(f"merge method {self.method!r}: choose from {list(METHODS)} ({SYNTAX})")
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(float(a)):
            raise UsageError(f"merge alpha must be a finite number, got {a!r} ({SYNTAX})")
        object.__setattr__(self, "alpha", float(a))
        if self.method in ("ties", "dare"):
            d = self.density
            if d is None:
                raise UsageError(f"merge method {self.method!r} needs density= (the fraction of task-vector entries "
                                 f"kept, in (0, 1], e.g. 0.2): {SYNTAX}")
            if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 < float(d) <= 1:
                raise UsageError(f"merge density must be in (0, 1], got {d!r}")
            object.__setattr__(self, "density", float(d))
        elif self.density is not None:
            raise UsageError(f"merge method 'linear' takes no density (got {self.density!r}); use 'ties' or 'dare'")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise UsageError(f"merge seed must be an integer, got {self.seed!r}")

    def recipe(self) -> dict:
        """The merge's definition as plain data (method, alpha, density, seed where used)."""
        out = {"method": self.method, "alpha": self.alpha}
        if self.density is not None:
            out["density"] = self.density
        if self.method == "dare":
            out["seed"] = self.seed
        return out

    def spec(self) -> str:
        """The source string of this merge (paths as given; in-memory modules shown as such)."""
        opts = "".join(f",{k}={v:g}" if isinstance(v, float) else f",{k}={v}"
                       for k, v in self.recipe().items() if k not in ("method", "alpha"))
        parts = [PREFIX + self.method, f"{self.alpha:g}{opts}"]
        if self.base is not None:
            parts.append(describe(self.base))
        parts.append(describe(self.adapted))
        return ":".join(parts)

    def __str__(self) -> str:
        return self.spec()

    def check(self, model=None) -> None:
        """Refuse parts that are not sources of the right kind: :func:`driftlens.merges.check`."""
        check(self, model)

    def identity(self, model=None) -> dict:
        """What a store records about this merge: :func:`driftlens.merges.identity`."""
        return identity(self, model)

    def materialize(self, model=None, cache: dict | None = None, allow_pickle: bool = False,
                    trust_remote_code: bool = False):
        """The merged model in eval mode: :func:`driftlens.merges.materialize`."""
        return materialize(self, model, cache, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)


def _number(text: str, what: str, spec: str, kind=float):
    try:
        value = kind(text)
    except ValueError:
        raise UsageError(f"checkpoint source {spec!r}: {what} {text!r} is not a number ({SYNTAX})") from None
    return value


def parse(text: str) -> Merge:
    """A :class:`Merge` from its source string ``merge:METHOD:ALPHA[,density=D][,seed=S]:[BASE:]ADAPTED``.

    Paths may hold ``:`` when the split is unambiguous (exactly one split point gives two existing
    paths); otherwise they are refused with the syntax.
    """
    if not text.startswith(PREFIX):
        raise UsageError(f"checkpoint source {text!r} is not a merge ({SYNTAX})")
    parts = text[len(PREFIX):].split(":", 2)
    if len(parts) != 3 or not all(parts):
        raise UsageError(f"checkpoint source {text!r}: a merge is {SYNTAX}, e.g. merge:linear:0.5:BASE:ADAPTED")
    method, params, rest = parts
    alpha_text, *opts = params.split(",")
    alpha = _number(alpha_text, "alpha", text)
    kw: dict = {}
    for opt in opts:
        key, _, value = opt.partition("=")
        if key == "density":
            kw["density"] = _number(value, "density", text)
        elif key == "seed":
            kw["seed"] = _number(value, "seed", text, int)
        else:
            raise UsageError(f"checkpoint source {text!r}: unknown merge option {opt!r}; options are density=D and "
                             f"seed=S ({SYNTAX})")
    base, adapted = _split_paths(rest, text)
    return Merge(adapted, alpha, method, base=base, **kw)


def _split_paths(rest: str, text: str) -> tuple[str | None, str]:
    """``[BASE:]ADAPTED`` -> (base or None, adapted), choosing the split where the paths exist."""
    if Path(rest).exists() or ":" not in rest:
        return None, rest
    cuts = [i for i, ch in enumerate(rest) if ch == ":"]
    found = [(rest[:i], rest[i + 1:]) for i in cuts if Path(rest[:i]).exists() and Path(rest[i + 1:]).exists()]
    if len(found) == 1:
        return found[0]
    if not found and len(cuts) == 1:
        return rest[:cuts[0]], rest[cuts[0] + 1:]           # let the source checks name the missing folder
    raise UsageError(f"checkpoint source {text!r}: cannot tell BASE from ADAPTED in {rest!r} "
                     f"({'several' if found else 'no'} split(s) give two existing folders); {SYNTAX}")


def as_source(source):
    """``source`` with a merge string turned into a :class:`Merge` (anything else unchanged).

    A string that names an existing path stays a path, even when it starts with ``merge:``.
    """
    if isinstance(source, str) and source.startswith(PREFIX) and not Path(source).exists():
        return parse(source)
    return source


def sweep(adapted, alphas: Iterable[float] = DEFAULT_ALPHAS, method: MergeMethod = "linear", base=None, *,
          prefix: str = "merge", density: float | None = None, seed: int = 0) -> dict[str, Merge]:
    """A merge sweep as an ordered trajectory ``{f"{prefix}-{alpha:g}": Merge, ...}``.

    Parameters
    ----------
    adapted, method, base, density, seed
        As :class:`Merge`.
    alphas : iterable of float
        Merge coefficients, in trajectory order (default 0, 0.25, 0.5, 0.75, 1).
    prefix : str
        Label prefix.
    """
    out: dict[str, Merge] = {}
    for a in alphas:
        m = Merge(adapted, a, method, base=base, density=density, seed=seed)
        label = f"{prefix}-{m.alpha:g}"
        if label in out:
            raise UsageError(f"merge sweep: alpha {a!r} is given twice")
        out[label] = m
    if not out:
        raise UsageError("merge sweep: no alpha given")
    return out


# ----------------------------------------------------------------------------- checks and identity


def components(merge: Merge, model=None) -> dict[str, Any]:
    """``{"base": ..., "adapted": ...}``: the sources the merge reads (base None -> ``model``)."""
    return {"base": model if merge.base is None else merge.base, "adapted": merge.adapted}


def check(merge: Merge, model=None) -> None:
    """Refuse a merge whose parts are not sources of the right kind (base: a model; adapted: a model or adapter)."""
    parts = components(merge, model)
    if any(isinstance(p, Merge) or (isinstance(p, str) and p.startswith(PREFIX) and not Path(p).exists())
           for p in parts.values()):
        raise UsageError(f"merge {merge.spec()}: BASE and ADAPTED are models or adapters, not merges (merge the "
                         f"weights first, save them, and merge that folder)")
    if parts["base"] is not None and source_kind(parts["base"]) == "adapter_dir":
        raise SourceError(f"merge {merge.spec()}: BASE {parts['base']} is a PEFT adapter; a merge's base is a model "
                          f"(a model directory, or the capture's MODEL when BASE is left out)")
    source_kind(parts["adapted"])


def identity(merge: Merge, model=None) -> dict:
    """What a store records about a merged checkpoint: its recipe, both parts and a fingerprint of all three."""
    import hashlib
    import json

    parts = components(merge, model)
    if parts["base"] is None:
        raise UsageError(f"merge {merge.spec()}: no BASE and no MODEL to merge into")
    info = {}
    for role, part in parts.items():
        kind = source_kind(part)
        info[role] = describe(part) if kind == "module" else str(Path(part).resolve())
        info[f"{role}_fingerprint"] = fingerprint(part)
    recipe = merge.recipe()
    h = hashlib.sha256(json.dumps({"recipe": recipe, "base": info["base_fingerprint"],
                                   "adapted": info["adapted_fingerprint"]}, sort_keys=True).encode())
    source = Merge(info["adapted"], merge.alpha, merge.method, base=info["base"], density=merge.density,
                   seed=merge.seed).spec()
    return {"kind": "merge", "source": source, "fingerprint": h.hexdigest()[:16], "recipe": recipe, **info}


# ----------------------------------------------------------------------------- the merge itself


def _tensor_seed(seed: int, name: str) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def merge_tensor(base: torch.Tensor, adapted: torch.Tensor, merge: Merge, name: str = "") -> torch.Tensor:
    """One merged weight tensor, ``base + alpha * m(adapted - base)`` in float64, cast to ``base``'s dtype."""
    import torch
    from peft.utils import merge_utils

    if base.shape != adapted.shape:
        raise UsageError(f"merge {merge.spec()}: tensor {name} has shape {tuple(base.shape)} in BASE and "
                         f"{tuple(adapted.shape)} in ADAPTED; a merge needs one architecture")
    if not base.is_floating_point():
        if not torch.equal(base, adapted):
            raise UsageError(f"merge {merge.spec()}: the non-float tensor {name} differs between BASE and ADAPTED")
        return base.clone()
    b = base.detach().to(torch.float64)
    tau = adapted.detach().to(device=b.device, dtype=torch.float64) - b
    weight = torch.tensor([merge.alpha], dtype=torch.float64, device=b.device)
    if merge.method == "linear" or not bool(tau.any()):
        delta = merge.alpha * tau
    elif merge.method == "ties":
        delta = merge_utils.ties([tau], weight, merge.density)
    else:                                       # dare: a generator seeded by (seed, tensor name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_tensor_seed(merge.seed, name))
            delta = merge_utils.dare_linear([tau.cpu()], weight.cpu(), merge.density).to(b.device)
    return (b + delta).to(base.dtype)


def merged_state(base_sd: Mapping[str, torch.Tensor], adapted_sd: Mapping[str, torch.Tensor],
                 merge: Merge) -> dict[str, torch.Tensor]:
    """Every tensor of ``base_sd`` merged with its namesake in ``adapted_sd`` (both state dicts of one architecture)."""
    only = sorted(set(base_sd) ^ set(adapted_sd))
    if only:
        raise UsageError(f"merge {merge.spec()}: BASE and ADAPTED hold different tensors (e.g. {only[:3]}); a merge "
                         f"needs one architecture")
    return {name: merge_tensor(t, adapted_sd[name], merge, name) for name, t in base_sd.items()}


def materialize(merge: Merge, model=None, cache: dict | None = None, allow_pickle: bool = False,
                trust_remote_code: bool = False):
    """The merged model as an ``nn.Module`` in eval mode.

    ``model`` (the capture's MODEL: a module or a directory) is the base when the merge names none.
    ``cache`` keeps the loaded base and the adapted weights between the points of a sweep.
    """
    import copy

    import torch

    cache = {} if cache is None else cache
    parts = components(merge, model)
    if parts["base"] is None:
        raise UsageError(f"merge {merge.spec()}: no BASE and no MODEL to merge into")

    def module(src):
        if isinstance(src, torch.nn.Module):
            return src
        key = ("merge-model", str(Path(src).resolve()))
        if key not in cache:
            cache[key] = load_model_dir(src, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
        return cache[key]

    base = module(parts["base"])
    adapted = parts["adapted"]
    key = ("merge-adapted", describe(adapted) if isinstance(adapted, torch.nn.Module) else
           str(Path(adapted).resolve()), describe(parts["base"]))
    if key not in cache:
        if source_kind(adapted) == "adapter_dir":
            net = apply_adapter(base, adapted, allow_pickle=allow_pickle, base_name=describe(parts["base"]))
        else:
            net = module(adapted)
        cache[key] = {k: v.detach() for k, v in net.state_dict().items()}
    state = merged_state(base.state_dict(), cache[key], merge)
    out = copy.deepcopy(base)
    out.load_state_dict(state)
    return out.eval()


# ----------------------------------------------------------------------------- reports


def merge_alphas(ds) -> dict[str, float]:
    """``{label: alpha}`` of the merged checkpoints of a store (its records; {} when none is a merge).

    ``ds`` is a store path or a Dataset opened from one (attribute ``store_path``).
    """
    from driftlens.store import location, read_record

    path = ds if isinstance(ds, (str, Path)) else getattr(ds, "attrs", {}).get("store_path")
    if not path:
        return {}
    path = location(path)
    if not (path / "zarr.json").exists():
        return {}
    import json

    order = list(json.loads((path / "zarr.json").read_text()).get("attributes", {}).get("checkpoints", []))
    out = {}
    for i, label in enumerate(order):
        record = read_record(path, i) or {}
        recipe = (record.get("identity") or {}).get("recipe")
        if isinstance(recipe, dict) and "alpha" in recipe:
            out[label] = float(recipe["alpha"])
    return out


def with_merge_alpha(report: xr.Dataset, alphas: Mapping[str, float]) -> xr.Dataset:
    """``report`` with a ``merge_alpha`` coordinate on ``checkpoint`` (NaN for checkpoints that are not merges)."""
    import numpy as np

    if not alphas:
        return report
    values = np.array([alphas.get(str(c), np.nan) for c in report.checkpoint.values], dtype=float)
    report = report.assign_coords(merge_alpha=("checkpoint", values))
    report["merge_alpha"].attrs.update({"long_name": "merge coefficient alpha", "units": "1",
                                        "definition": "the checkpoint is base + alpha * (adapted - base) "
                                                      "(driftlens.merges); NaN: not a merge"})
    return report


__all__ = ["DEFAULT_ALPHAS", "METHODS", "Merge", "SYNTAX", "as_source", "check", "components", "identity",
           "materialize", "merge_alphas", "merge_tensor", "merged_state", "parse", "sweep", "with_merge_alpha"]
