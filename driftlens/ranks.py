"""Layer-wise LoRA rank allocation from measured drift, exported for PEFT and axolotl.

A drift report says, per decoder layer, how far the visual tokens moved during language adaptation.
:func:`allocate_ranks` turns one per-layer variable of that report (the *signal*) into an integer
LoRA rank for every adapted module, to an exact total *budget*, and returns a :class:`RankSchedule`:
one anchored full module path per adapted module, with its rank and alpha, plus the metadata needed
to reproduce it. The schedule exports a ``peft.LoraConfig`` (``rank_pattern`` / ``alpha_pattern``),
a PEFT adapter-config JSON or an axolotl YAML fragment (``lora_rank_pattern`` / ``lora_alpha_pattern``).

Units, signals and the edge cases
---------------------------------
A *unit* is one adapted module: (decoder layer ``l``, target ``t``) with full path
``spec.module_path(l, t)``, e.g. ``model.language_model.layers.3.self_attn.q_proj``. Units are
ordered by layer, then by the order of the targets; that order breaks every tie (lower layer first).
The budget is the sum of the ranks of all units.

A signal expression reads ``NAME[@SITE][:MODALITY]``: ``"mmd"``, ``"mmd@key"``,
``"sinkhorn@hidden:text"``, ``"mmd_lo"``, ``"gap@key"``. ``NAME`` is any report variable with a ``layer`` dim;
the checkpoint (default: the last one), site (default ``"hidden"``) and modality (default
``"visual"``) are selected where the variable has those dims. Per-module signals: pass a mapping
``{target: expression}`` (``"*"`` is the fallback for targets not named), e.g.
``{"self_attn.q_proj": "mmd@key", "self_attn.k_proj": "mmd@key", "*": "mmd@hidden"}`` so that
key-space drift weighs the q/k projections and hidden-state drift the others; or keep one expression
and pass ``site_for_module={"self_attn.q_proj": "key", "self_attn.k_proj": "key"}`` (a site written
in an expression wins over it). Mixing variables of different units in one schedule is allowed but
is the caller's responsibility (MMD^2 lies in [0, 2] at every site; distances in model units do not).
A conservative choice is the lower end of the interval (``"mmd_lo"``): capacity goes where the
drift is certain, not where it is noisy.

Signal values that are negative are set to 0 before allocation: a negative effect (less drift than
the null) is no evidence that a layer needs capacity. If every signal is 0, every rule falls back to
``uniform``. :func:`allocate_ranks` refuses a profile with a NaN or infinite value at the selected
checkpoint (:class:`ScheduleError` naming the signal, the checkpoint and the layers): a missing
measurement there is a damaged or degenerate report, not "no drift". :func:`allocate` over plain
arrays still cleans them (:func:`clean_signal`): NaN -> 0, ``+inf`` (a null with zero spread) -> the
largest finite value.

Targets are relative to one decoder block; a spec's optional ``block_modules`` lists the valid ones,
and a target outside it is refused before any schedule is written (with a model, every scheduled
path is checked against the model instead).

Rules (``lo = min_rank``, ``hi = max_rank``, ``B = budget``, ``s_i`` the clipped signal):

``uniform``
    ``B // n`` each; the ``B % n`` leftover ranks go one each to the lowest units.
``proportional``
    continuous quotas ``q_i = clip(lam * s_i, lo, hi)`` with ``lam`` solved exactly so that
    ``sum q_i = B`` (the fixed point of iterated clipping), then integers by largest remainder:
    ``floor(q_i)`` plus one for the largest fractional parts (ties: larger signal, then lower unit).
    A larger signal never gets a smaller rank. If the positive-signal units all reach ``hi`` and the
    budget is not spent, the rest goes uniformly to the zero-signal units.
``waterfill``
    a common water level ``lam`` is lowered until the budget is spent, each unit holding
    ``clip(floor(s_i / lam), lo, hi)`` (highest-averages / D'Hondt apportionment; computed greedily:
    the next rank goes to the unit with the largest ``s_i / (r_i + 1)``, ties to the lower unit).
    Against ``proportional`` it never rounds a unit up past its share, so scarce ranks go to the
    strongest signals.
``cumulative``
    as in LoRA-drop: layers are sorted by their summed signal (ties: lower layer first) and the
    smallest prefix holding at least ``share`` of the total signal is kept (more layers are added
    while the budget cannot fit under ``hi``); the kept layers' units get equal ranks (leftover ranks
    to the larger signals, then the lower units); the other layers are *not adapted* -- they are
    left out of ``target_modules`` (PEFT ranks must be > 0).

Alpha: ``alpha = alpha_ratio * r`` per module, so the LoRA scaling ``alpha / r`` is the same
everywhere; with ``use_rslora=True`` one alpha ``alpha_ratio * sqrt(mean rank)`` serves every module
(rsLoRA's scaling ``alpha / sqrt(r)`` then equals ``alpha_ratio`` at the mean rank).

PEFT matching (peft >= 0.15): ``rank_pattern`` / ``alpha_pattern`` keys are regexes matched as
``re.match(rf"(.*\\.)?({key})$", module_name)``, first match wins. driftlens writes every key as
``"^" + re.escape(full_path)``: the ``^`` can only match at position 0 (the optional ``(.*\\.)?``
group must then be empty), the ``$`` ends it, so a key names exactly one module and never a suffix
of a vision-tower module. ``target_modules`` is the list of full paths (PEFT matches list entries
by equality or by a ``"." + entry`` suffix, which a path from the top-level model cannot be for
another module). With 20 or more targets PEFT may rewrite the list to an equivalent set of shorter
suffixes computed against the model it is applied to; the selected modules stay the same.
"""
from __future__ import annotations

import difflib
import heapq
import json
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from driftlens.errors import EXIT_DATA, DataError, UsageError

RULES = ("proportional", "waterfill", "cumulative", "uniform")
FORMATS = ("peft", "axolotl")
DEFAULT_SITE = "hidden"
DEFAULT_MODALITY = "visual"
_SIGNAL_RE = re.compile(
    r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:@(?P<site>[A-Za-z_][A-Za-z0-9_]*))?(?::(?P<modality>[A-Za-z_]+))?$"
)
_AXOLOTL_META = "# driftlens-schedule: "
_MIN_PEFT = (0, 15)  # "^" in rank_pattern keys anchors from peft 0.15 on


class ScheduleError(UsageError):
    """A rank schedule cannot be built, read or applied (the message names the offending thing)."""


class ScheduleFileError(ScheduleError, DataError):
    """A rank-schedule file is unreadable, damaged or holds impossible values (a data error: exit code 3)."""

    exit_code = EXIT_DATA


# ----------------------------------------------------------------------------------------------
# signals
# ----------------------------------------------------------------------------------------------

def parse_signal(expr: str) -> tuple[str, str | None, str | None]:
    """Split a signal expression ``NAME[@SITE][:MODALITY]``.

    Returns
    -------
    (name, site or None, modality or None)
    """
    m = _SIGNAL_RE.match(str(expr).strip())
    if m is None:
        raise ScheduleError(
            f"signal {expr!r} is not of the form NAME[@SITE][:MODALITY], e.g. 'mmd', 'mmd@key', "
            f"'sinkhorn@hidden:text'"
        )
    return m["name"], m["site"], m["modality"]


def available_signals(report) -> list[str]:
    """Names of the report variables usable as a signal (those with a ``layer`` dim)."""
    return sorted(str(k) for k, v in report.data_vars.items() if "layer" in v.dims)


def _select_checkpoint(report, checkpoint):
    labels = [str(c) for c in report["checkpoint"].values] if "checkpoint" in report.coords else []
    if checkpoint is None:
        if not labels:
            raise ScheduleError("the report has no checkpoints")
        return labels[-1]
    if isinstance(checkpoint, (int, np.integer)) and not isinstance(checkpoint, bool):
        try:
            return labels[int(checkpoint)]
        except IndexError:
            raise ScheduleError(f"checkpoint index {checkpoint} out of range; the report has {labels}") from None
    if str(checkpoint) not in labels:
        raise ScheduleError(f"checkpoint {checkpoint!r} is not in the report; it has {labels}")
    return str(checkpoint)


def signal_profile(report, signal: str, *, checkpoint=None, site: str = DEFAULT_SITE,
                   modality: str = DEFAULT_MODALITY) -> np.ndarray:
    """One per-layer signal from a drift report, as given (not clipped).

    Parameters
    ----------
    report : xarray.Dataset
        Drift report (dims ``checkpoint``, ``layer``, ``site``, ``modality``).
    signal : str
        ``NAME[@SITE][:MODALITY]``; a site/modality written here wins over the keyword defaults.
    checkpoint : str or int, optional
        Checkpoint label or position; default the last checkpoint.
    site, modality : str
        Used where the variable has that dim and the expression does not name one.

    Returns
    -------
    numpy.ndarray
        ``[n_layers]`` float64, in ``layer`` coordinate order.
    """
    name, esite, emod = parse_signal(signal)
    if name not in report.data_vars or "layer" not in report[name].dims:
        raise ScheduleError(
            f"unknown signal {name!r} (from {signal!r}); available per-layer signals in the report: "
            f"{available_signals(report)}"
        )
    da = report[name]
    if "checkpoint" in da.dims:
        da = da.sel(checkpoint=_select_checkpoint(report, checkpoint))
    for dim, explicit, default in (("site", esite, site), ("modality", emod, modality)):
        value = explicit if explicit is not None else default
        if dim in da.dims:
            have = [str(v) for v in da[dim].values]
            if value not in have:
                raise ScheduleError(f"signal {signal!r}: {dim} {value!r} is not in the report; it has {have}")
            da = da.sel({dim: value})
        elif explicit is not None:
            raise ScheduleError(f"signal {signal!r}: variable {name!r} has no {dim!r} dim (dims {da.dims})")
    extra = [d for d in da.dims if d != "layer"]
    if extra:
        raise ScheduleError(f"signal {signal!r}: variable {name!r} still has dims {extra} after selection")
    return np.asarray(da.transpose("layer").values, dtype=np.float64)  # [n_layers]


def clean_signal(values) -> np.ndarray:
    """NaN and negative values -> 0 (no evidence of drift), +inf -> the largest finite value; float64 ``[n]``."""
    s = np.asarray(values, dtype=np.float64)  # [n]
    finite = np.isfinite(s) & (s > 0)
    top = float(s[finite].max()) if finite.any() else 1.0
    s = np.where(np.isposinf(s), top, s)  # a zero-spread null gives z = +inf: count it as the top signal
    return np.maximum(np.nan_to_num(s, nan=0.0, neginf=0.0), 0.0)


# ----------------------------------------------------------------------------------------------
# allocation over plain arrays
# ----------------------------------------------------------------------------------------------

def _check_budget(n: int, budget: int, min_rank: int, max_rank: int, what: str = "adapted modules") -> None:
    if n * min_rank > budget:
        raise ScheduleError(
            f"budget {budget} is below min_rank {min_rank} x {n} {what} = {n * min_rank}; "
            f"raise the budget or lower min_rank"
        )
    if n * max_rank < budget:
        raise ScheduleError(
            f"budget {budget} is above max_rank {max_rank} x {n} {what} = {n * max_rank}; "
            f"lower the budget or raise max_rank"
        )


def _uniform(n: int, budget: int, order: Sequence[int] | None = None) -> np.ndarray:
    r = np.full(n, budget // n, dtype=np.int64)
    order = range(n) if order is None else order
    for i in list(order)[: budget - int(r.sum())]:
        r[i] += 1
    return r


def _quotas(s: np.ndarray, budget: int, lo: int, hi: int) -> np.ndarray:
    """Continuous ``q = clip(s / mu, lo, hi)`` with ``sum q == budget``; the level ``mu`` solved exactly.

    ``sum q`` is piecewise linear in ``1 / mu`` and falls as ``mu`` rises, with breakpoints
    ``s_i / lo`` (unit i sits at the floor above it) and ``s_i / hi`` (at the ceiling below it). In
    the interval that holds the solution the floor, ceiling and free units are known and the free
    ones share the rest in proportion to ``s`` (the fixed point of iterated clipping). ``s`` is in
    (0, 1] for positive units, so no breakpoint overflows.
    """
    pos = s > 0
    A = np.where(pos, s / lo, 0.0)  # [n] at the floor when mu >= A
    C = np.where(pos, s / hi, 0.0)  # [n] at the ceiling when mu <= C

    def parts(bottom: float, top: float):
        at_lo = ~pos | (A <= bottom)
        at_hi = ~at_lo & (C >= top)
        return at_lo, at_hi, ~(at_lo | at_hi)

    def total(mu: float) -> float:
        at_lo, at_hi, free = parts(mu, mu)
        rest = float(s[free].sum()) / mu if free.any() else 0.0
        return lo * float(at_lo.sum()) + hi * float(at_hi.sum()) + rest

    top = np.inf
    bps = np.unique(np.concatenate([A[pos], C[pos]]))[::-1]  # descending
    b = float(bps[-1])
    for x in bps:
        if total(float(x)) >= budget:
            b = float(x)
            break
        top = float(x)
    at_lo, at_hi, free = parts(b, top)
    q = np.where(at_hi, float(hi), float(lo))  # [n]
    if free.any():
        rest = budget - lo * int(at_lo.sum()) - hi * int(at_hi.sum())
        q[free] = np.clip(rest * (s[free] / float(s[free].sum())), lo, hi)
    return q


def _largest_remainder(q: np.ndarray, s: np.ndarray, budget: int, lo: int, hi: int) -> np.ndarray:
    r = np.clip(np.floor(q), lo, hi).astype(np.int64)
    frac = q - r
    k = budget - int(r.sum())
    n = len(q)
    if k > 0:
        order = sorted((i for i in range(n) if r[i] < hi), key=lambda i: (-frac[i], -s[i], i))
        for i in order[:k]:
            r[i] += 1
    elif k < 0:  # float round-off only
        order = sorted((i for i in range(n) if r[i] > lo), key=lambda i: (frac[i], s[i], -i))
        for i in order[:-k]:
            r[i] -= 1
    return r


def _proportional(s: np.ndarray, budget: int, lo: int, hi: int) -> np.ndarray:
    pos = s > 0
    cap = hi * int(pos.sum()) + lo * int((~pos).sum())
    if budget >= cap:  # positive units saturate; the rest goes to the zero-signal units
        r = np.where(pos, hi, lo).astype(np.int64)
        zero = np.flatnonzero(~pos)
        extra = _uniform(len(zero), budget - cap) if len(zero) else np.zeros(0, np.int64)
        r[zero] += extra
        return r
    s = s / s.max()  # scale-free
    q = _quotas(s, budget, lo, hi)  # [n] continuous quotas, sum == budget up to round-off
    return _largest_remainder(q, s, budget, lo, hi)


def _waterfill(s: np.ndarray, budget: int, lo: int, hi: int) -> np.ndarray:
    n = len(s)
    r = np.full(n, lo, dtype=np.int64)
    heap = [(-s[i] / (lo + 1), i) for i in range(n) if lo < hi]
    heapq.heapify(heap)
    for _ in range(budget - n * lo):
        _, i = heapq.heappop(heap)
        r[i] += 1
        if r[i] < hi:
            heapq.heappush(heap, (-s[i] / (r[i] + 1), i))
    return r


def _cumulative(s: np.ndarray, budget: int, lo: int, hi: int, groups: np.ndarray, share: float) -> np.ndarray:
    layers = list(dict.fromkeys(groups.tolist()))  # in unit order
    totals = {g: float(s[groups == g].sum()) for g in layers}
    order = sorted(layers, key=lambda g: (-totals[g], layers.index(g)))
    grand = sum(totals.values())
    kept: list = []
    acc = 0.0
    for g in order:
        if kept and acc >= share * grand * (1 - 1e-12):
            break
        kept.append(g)
        acc += totals[g]
    size = {g: int((groups == g).sum()) for g in layers}
    for g in order[len(kept):]:  # keep more layers while the budget cannot fit under max_rank
        if sum(size[k] for k in kept) * hi >= budget:
            break
        kept.append(g)
    idx = np.flatnonzero(np.isin(groups, kept))
    m = len(idx)
    if m * lo > budget:
        held = sum(totals[k] for k in kept) / grand
        raise ScheduleError(
            f"rule 'cumulative' keeps {len(kept)} layers ({m} modules) holding {held:.0%} "
            f"of the signal (share={share}), but budget {budget} is below min_rank {lo} x {m} = {m * lo}; "
            f"raise the budget, lower min_rank or lower share"
        )
    r = np.zeros(len(s), dtype=np.int64)
    local = sorted(range(m), key=lambda j: (-s[idx[j]], idx[j]))
    r[idx] = _uniform(m, budget, local)
    return r


def allocate(signal, budget: int, rule: str = "proportional", min_rank: int = 1, max_rank: int = 64, *,
             groups=None, share: float = 0.9) -> np.ndarray:
    """Integer ranks for units with the given signal, summing exactly to ``budget``.

    Parameters
    ----------
    signal : array-like
        ``[n]`` per-unit signal; NaN / negative values count as 0 (see module docstring).
    budget : int
        Total rank over all units.
    rule : {"proportional", "waterfill", "cumulative", "uniform"}
    min_rank, max_rank : int
        Floor and ceiling of every adapted unit (``1 <= min_rank <= max_rank``).
    groups : array-like, optional
        ``[n]`` layer index of each unit (``cumulative`` keeps or drops whole groups); default one
        group per unit.
    share : float
        ``cumulative``: fraction of the total signal the kept layers must hold, in (0, 1].

    Returns
    -------
    numpy.ndarray
        ``[n]`` int64 ranks; 0 only for units dropped by ``cumulative``.
    """
    s = clean_signal(signal)  # [n]
    n = len(s)
    if n == 0:
        raise ScheduleError("no units to allocate ranks to")
    if rule not in RULES:
        raise ScheduleError(f"unknown rule {rule!r}; choose one of {list(RULES)}")
    for name, v in (("budget", budget), ("min_rank", min_rank), ("max_rank", max_rank)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ScheduleError(f"{name} must be an integer, got {v!r}")
    budget, lo, hi = int(budget), int(min_rank), int(max_rank)
    if lo < 1:
        raise ScheduleError(f"min_rank must be >= 1 (PEFT ranks must be > 0), got {lo}")
    if hi < lo:
        raise ScheduleError(f"max_rank {hi} is below min_rank {lo}")
    if not 0 < share <= 1:
        raise ScheduleError(f"share must be in (0, 1], got {share}")
    if rule == "cumulative":
        g = np.arange(n) if groups is None else np.asarray(groups)
        if len(g) != n:
            raise ScheduleError(f"groups has {len(g)} entries for {n} units")
        if n * hi < budget:
            _check_budget(n, budget, lo, hi)
        if s.sum() == 0:
            _check_budget(n, budget, lo, hi)
            return _uniform(n, budget)
        return _cumulative(s, budget, lo, hi, g, share)
    _check_budget(n, budget, lo, hi)
    if rule == "uniform" or s.sum() == 0:
        return _uniform(n, budget)
    if rule == "proportional":
        return _proportional(s, budget, lo, hi)
    return _waterfill(s, budget, lo, hi)


# ----------------------------------------------------------------------------------------------
# the schedule
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModuleRank:
    """One unit of a schedule: a module of one decoder layer, its signal and its rank (0: not adapted)."""

    path: str        # full module path from the top-level model
    layer: int
    module: str      # relative to the decoder block, e.g. "self_attn.q_proj"
    signal: float    # the cleaned signal the rule saw
    rank: int
    alpha: float


def pattern_key(path: str) -> str:
    """PEFT ``rank_pattern`` / ``alpha_pattern`` key naming exactly the module ``path``."""
    return "^" + re.escape(path)


def key_to_path(key: str) -> str:
    """Inverse of :func:`pattern_key`."""
    return re.sub(r"\\(.)", r"\1", key.removeprefix("^"))


def _num(x: float):
    x = float(x)
    return int(x) if x.is_integer() else round(x, 6)


def _versions() -> dict:
    out = {}
    for mod in ("transformers", "peft"):
        try:
            out[f"{mod}_version"] = __import__(mod).__version__
        except ImportError:  # pragma: no cover - both are dependencies
            out[f"{mod}_version"] = None
    from driftlens._version import __version__

    out["driftlens_version"] = __version__
    return out


@dataclass
class RankSchedule:
    """Per-module LoRA ranks for one model architecture.

    Attributes
    ----------
    modules : tuple of ModuleRank
        Every unit considered, in (layer, target) order, including dropped ones (rank 0).
    meta : dict
        ``signal``, ``signals`` (resolved per target), ``rule``, ``budget``, ``min_rank``, ``max_rank``,
        ``share``, ``checkpoint``, ``alpha_ratio``, ``use_rslora``, ``lora_alpha`` (rsLoRA), ``family``,
        ``model_type``, ``n_layers``, ``decoder_layers``, ``targets``, ``source``,
        ``transformers_version``, ``peft_version``, ``driftlens_version``.
    """

    modules: tuple[ModuleRank, ...]
    meta: dict = field(default_factory=dict)

    # --- views ---------------------------------------------------------------------------------
    @property
    def adapted(self) -> list[ModuleRank]:
        """The modules with rank > 0."""
        return [m for m in self.modules if m.rank > 0]

    @property
    def ranks(self) -> dict[str, int]:
        """Full path -> rank, adapted modules only."""
        return {m.path: m.rank for m in self.adapted}

    @property
    def alphas(self) -> dict[str, float]:
        """``{module path: alpha}`` of the adapted modules."""
        return {m.path: m.alpha for m in self.adapted}

    @property
    def budget(self) -> int:
        """Sum of the ranks."""
        return int(sum(m.rank for m in self.modules))

    @property
    def n_layers(self) -> int:
        """Decoder layers of the model the schedule is for."""
        return int(self.meta.get("n_layers", max(m.layer for m in self.modules) + 1))

    @property
    def family(self):
        """The spec family (or None)."""
        return self.meta.get("family")

    @property
    def model_type(self):
        """The model's ``config.model_type`` (or None)."""
        return self.meta.get("model_type")

    @property
    def use_rslora(self) -> bool:
        """Whether the schedule exports ``use_rslora=True``."""
        return bool(self.meta.get("use_rslora", False))

    def layer_ranks(self) -> np.ndarray:
        """``[n_layers]`` total rank per decoder layer."""
        out = np.zeros(self.n_layers, dtype=np.int64)
        for m in self.modules:
            out[m.layer] += m.rank
        return out

    def layer_signal(self) -> np.ndarray:
        """``[n_layers]`` mean cleaned signal per decoder layer (over its units)."""
        tot = np.zeros(self.n_layers)
        cnt = np.zeros(self.n_layers)
        for m in self.modules:
            tot[m.layer] += m.signal
            cnt[m.layer] += 1
        return tot / np.maximum(cnt, 1)

    @property
    def base_rank(self) -> int:
        """Most common adapted rank (ties: the smaller); PEFT's ``r``, used for no module here."""
        c = Counter(m.rank for m in self.adapted)
        return min(c, key=lambda r: (-c[r], r))

    @property
    def base_alpha(self):
        """The exported ``lora_alpha``."""
        if self.use_rslora:
            return self.meta["lora_alpha"]
        return _num(self.meta.get("alpha_ratio", 2.0) * self.base_rank)

    @property
    def rank_pattern(self) -> dict[str, int]:
        """PEFT ``rank_pattern``: anchored full module names -> rank."""
        return {pattern_key(m.path): m.rank for m in self.adapted}

    @property
    def alpha_pattern(self) -> dict[str, float]:
        """PEFT ``alpha_pattern``: anchored full module names -> alpha (empty with rsLoRA)."""
        if self.use_rslora:
            return {}
        return {pattern_key(m.path): m.alpha for m in self.adapted}

    def __repr__(self) -> str:
        return (f"RankSchedule(family={self.family!r}, rule={self.meta.get('rule')!r}, "
                f"signal={self.meta.get('signal')!r}, budget={self.budget}, adapted={len(self.adapted)}/"
                f"{len(self.modules)}, layer_ranks={self.layer_ranks().tolist()})")

    # --- PEFT ------------------------------------------------------------------------------------
    def to_lora_config(self, model=None, **kwargs):
        """A ``peft.LoraConfig`` adapting exactly the scheduled modules at their ranks.

        Parameters
        ----------
        model : torch.nn.Module, optional
            When given, :meth:`check` runs first (architecture, layer count, module paths).
        **kwargs
            Passed to ``LoraConfig`` (``lora_dropout``, ``task_type``, ``bias``, ...); the fields the
            schedule owns (``r``, ``lora_alpha``, ``target_modules``, ``rank_pattern``, ``alpha_pattern``,
            ``use_rslora``, ``layers_to_transform``, ``layers_pattern``, ``exclude_modules``) cannot be
            overridden.
        """
        import peft
        from peft import LoraConfig

        _check_peft(peft.__version__)
        owned = {"r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora",
                 "layers_to_transform", "layers_pattern", "exclude_modules"}
        clash = sorted(owned & set(kwargs))
        if clash:
            raise ScheduleError(f"to_lora_config: {clash} are set by the schedule and cannot be overridden")
        if model is not None:
            self.check(model)
        return LoraConfig(r=self.base_rank, lora_alpha=self.base_alpha, target_modules=list(self.ranks),
                          rank_pattern=self.rank_pattern, alpha_pattern=self.alpha_pattern,
                          use_rslora=self.use_rslora, **kwargs)

    def get_peft_model(self, model, adapter_name: str = "default", **kwargs):
        """``peft.get_peft_model(model, self.to_lora_config(model, **kwargs))`` after :meth:`check`."""
        from peft import get_peft_model

        return get_peft_model(model, self.to_lora_config(model, **kwargs), adapter_name=adapter_name)

    def check(self, model) -> None:
        """Raise :class:`ScheduleError` unless ``model`` is the architecture this schedule was made for.

        Checks ``config.model_type`` (a model of another type is accepted only when its spec family is
        the same), the number of decoder layers, and that every scheduled path exists.
        """
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        mtype = getattr(getattr(base, "config", None), "model_type", None)
        if self.model_type is not None and mtype != self.model_type:
            family = None
            try:
                from driftlens.specs import load_spec

                family = load_spec(base).family
            except (ImportError, ValueError):  # no spec serves this model: another architecture
                family = None
            if family is None or family != self.family:
                raise ScheduleError(
                    f"this schedule was made for family {self.family!r} (model_type {self.model_type!r}); "
                    f"the model is {type(base).__name__} with model_type {mtype!r}"
                    + (f" (family {family!r})" if family else "")
                )
        names = {n for n, _ in base.named_modules()}
        dl = self.meta.get("decoder_layers")
        if dl:
            if dl not in names:
                raise ScheduleError(f"the model ({type(base).__name__}) has no module {dl!r} (the schedule's "
                                    f"decoder layers); nearest: {_nearest(dl, names)}")
            n = len(base.get_submodule(dl))
            if n != self.n_layers:
                raise ScheduleError(f"the schedule covers {self.n_layers} decoder layers but the model has {n} "
                                    f"at {dl!r}")
        missing = [p for p in self.ranks if p not in names]
        if missing:
            raise ScheduleError(
                f"{len(missing)} scheduled module(s) do not exist in {type(base).__name__} "
                f"(model_type {mtype!r}), e.g. {missing[0]!r}; nearest existing: {_nearest(missing[0], names)}"
            )

    # --- files ---------------------------------------------------------------------------------
    def _meta_block(self) -> dict:
        meta = dict(self.meta)
        meta["modules"] = [asdict(m) for m in self.modules]
        return meta

    def to_dict(self, format: str = "peft") -> dict:
        """The exported fields: PEFT adapter-config keys, or axolotl's ``lora_*`` keys."""
        if format == "peft":
            d = {"peft_type": "LORA", "r": self.base_rank, "lora_alpha": self.base_alpha,
                 "target_modules": list(self.ranks), "rank_pattern": self.rank_pattern,
                 "alpha_pattern": self.alpha_pattern, "use_rslora": self.use_rslora}
            return d
        if format == "axolotl":
            d = {"adapter": "lora", "lora_r": self.base_rank, "lora_alpha": self.base_alpha,
                 "lora_target_modules": list(self.ranks), "lora_rank_pattern": self.rank_pattern}
            if self.use_rslora:
                d["peft_use_rslora"] = True
            else:
                d["lora_alpha_pattern"] = self.alpha_pattern
            return d
        raise ScheduleError(f"unknown format {format!r}; choose one of {list(FORMATS)}")

    def save(self, path, format: str | None = None) -> Path:
        """Write the schedule.

        Parameters
        ----------
        path : str or Path
        format : {"peft", "axolotl"}, optional
            ``peft``: JSON with the PEFT adapter-config fields and a ``driftlens`` block (metadata and
            every unit). ``axolotl``: YAML with ``adapter``, ``lora_r``, ``lora_alpha``,
            ``lora_target_modules``, ``lora_rank_pattern``, ``lora_alpha_pattern`` (or
            ``peft_use_rslora``), metadata in a ``# driftlens-schedule:`` comment line so the file stays
            a valid axolotl config fragment. Default: axolotl for ``.yaml`` / ``.yml``, else peft.
        """
        path = Path(path)
        if format is None:
            format = "axolotl" if path.suffix.lower() in (".yaml", ".yml") else "peft"
        body = self.to_dict(format)
        if format == "peft":
            body["driftlens"] = self._meta_block()
            text = json.dumps(body, indent=2) + "\n"
        else:
            import yaml

            text = (f"# LoRA rank schedule written by driftlens {self.meta.get('driftlens_version')}: rule "
                    f"{self.meta.get('rule')}, signal {self.meta.get('signal')}, budget {self.budget}\n"
                    + _AXOLOTL_META + json.dumps(self._meta_block(), separators=(",", ":")) + "\n"
                    + yaml.safe_dump(body, sort_keys=False, width=10_000))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    @classmethod
    def load(cls, path) -> RankSchedule:
        """Read a schedule written by :meth:`save` (either format).

        Ranks and alphas come from the config fields (``rank_pattern`` / ``lora_rank_pattern``), so a
        hand-edited file is honoured; layer, target and signal come from the driftlens metadata.

        Raises
        ------
        FileNotFoundError
            No file at ``path``.
        ScheduleFileError
            (a :class:`ScheduleError`) The file is not UTF-8, not JSON / YAML, not a mapping, has no
            rank pattern or no driftlens metadata, or holds a value a schedule cannot have: a rank
            that is not a positive integer, an alpha that is negative or not finite, a metadata field
            missing or of the wrong type. The message names the file and the module path or field.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no rank schedule at {path}")
        body, meta = _read_schedule(path)
        cfg = _config_fields(body, path)
        if meta is None:
            raise ScheduleFileError(f"{path}: not a driftlens rank schedule (no driftlens metadata)")
        meta = _check_meta(meta, path)
        ranks, alphas = cfg["ranks"], cfg["alphas"]
        units = []
        for u in meta.pop("modules"):
            r = ranks.pop(u["path"], 0)
            a = cfg["lora_alpha"] if cfg["use_rslora"] else alphas.pop(u["path"], u["alpha"])
            units.append(ModuleRank(u["path"], u["layer"], u["module"], float(u["signal"]), r, _num(a) if r else 0))
        if ranks:
            raise ScheduleFileError(f"{path}: rank pattern names modules that the metadata does not list: "
                                    f"{sorted(ranks)[:3]}")
        if alphas and not cfg["use_rslora"]:
            raise ScheduleFileError(f"{path}: alpha pattern names modules that the metadata does not list: "
                                    f"{sorted(alphas)[:3]}")
        meta["use_rslora"] = cfg["use_rslora"]
        if cfg["use_rslora"]:
            meta["lora_alpha"] = cfg["lora_alpha"]
        return cls(tuple(units), meta)


# the metadata fields a schedule reads back; every file RankSchedule.save writes has them
_META_REQUIRED = ("modules", "n_layers", "decoder_layers", "targets", "family", "model_type", "rule", "alpha_ratio")
_UNIT_REQUIRED = ("path", "layer", "module", "signal", "alpha")
_MAX_RANK = 2 ** 31 - 1


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _read_schedule(path: Path) -> tuple[dict, object]:
    """(config mapping, driftlens metadata or None) of a schedule file; JSON when it starts with ``{``."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ScheduleFileError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None
    if text.lstrip().startswith("{"):
        body = _json_value(text, path, "the file")
        if not isinstance(body, dict):  # pragma: no cover - a text starting with "{" parses to a dict or fails
            raise ScheduleFileError(f"{path}: expected a JSON object, got {type(body).__name__}")
        return body, body.get("driftlens")
    body = _yaml_value(text, path)
    meta = None
    for n, line in enumerate(text.splitlines(), start=1):
        if line.startswith(_AXOLOTL_META):
            meta = _json_value(line[len(_AXOLOTL_META):], path, f"line {n} (driftlens metadata)")
    return body, meta


def _json_value(text: str, path: Path, what: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ScheduleFileError(f"{path}: {what} is not valid JSON ({exc.msg} at line {exc.lineno}, "
                                f"column {exc.colno})") from None
    except RecursionError:
        raise ScheduleFileError(f"{path}: {what} is not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # e.g. an integer beyond the str -> int digit limit
        raise ScheduleFileError(f"{path}: {what} is not valid JSON ({_one_line(exc)})") from None


def _yaml_value(text: str, path: Path) -> dict:
    import yaml

    try:
        body = yaml.safe_load(text)
    except RecursionError:
        raise ScheduleFileError(f"{path}: not valid YAML (nested too deeply)") from None
    except (yaml.YAMLError, ValueError, TypeError, OverflowError) as exc:  # bad dates, tags, keys
        raise ScheduleFileError(f"{path}: not valid YAML ({_one_line(exc)})") from None
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise ScheduleFileError(f"{path}: expected a mapping of PEFT fields (JSON object) or axolotl fields "
                                f"(YAML mapping), got a {type(body).__name__}")
    return body


def _config_fields(body: dict, path: Path) -> dict:
    """Ranks, alphas and the rsLoRA fields of a PEFT (JSON) or axolotl (YAML) body, checked."""
    peft = "rank_pattern" in body or "lora_rank_pattern" not in body
    names = (("rank_pattern", "alpha_pattern", "use_rslora") if peft
             else ("lora_rank_pattern", "lora_alpha_pattern", "peft_use_rslora"))
    rp, ap, rs = (body.get(k) for k in names)
    if not isinstance(rp, dict) or not rp:
        raise ScheduleFileError(f"{path}: no rank pattern (rank_pattern / lora_rank_pattern) found")
    rs = False if rs is None else rs
    if not isinstance(rs, bool):
        raise ScheduleFileError(f"{path}: {names[2]} must be true or false, got {rs!r}")
    ranks = {p: _rank(v, path, p) for p, v in _pattern(rp, path, names[0]).items()}
    alphas = {p: _alpha(v, path, f"alpha of {p!r}") for p, v in _pattern(ap or {}, path, names[1]).items()}
    alpha0 = _alpha(body.get("lora_alpha"), path, "lora_alpha (the rsLoRA alpha)") if rs else None
    return {"ranks": ranks, "alphas": alphas, "use_rslora": rs, "lora_alpha": alpha0}


def _pattern(pattern, path: Path, name: str) -> dict:
    """``{module path: value}`` from a ``rank_pattern``-like mapping of anchored keys."""
    if not isinstance(pattern, dict):
        raise ScheduleFileError(f"{path}: {name} must be a mapping of module patterns, got {type(pattern).__name__}")
    bad = [k for k in pattern if not isinstance(k, str) or not k]
    if bad:
        raise ScheduleFileError(f"{path}: {name} has a key {bad[0]!r} that is not a module pattern string")
    out = {key_to_path(k): v for k, v in pattern.items()}
    if len(out) < len(pattern):
        twice = Counter(key_to_path(k) for k in pattern).most_common(1)[0][0]
        raise ScheduleFileError(f"{path}: {name} names module {twice!r} twice")
    return out


def _rank(value, path: Path, module: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= _MAX_RANK:
        raise ScheduleFileError(f"{path}: rank of {module!r} must be a positive integer, got {value!r} "
                                f"(leave a module out of the rank pattern to not adapt it)")
    return int(value)


def _finite(value) -> bool:
    """Whether ``value`` is an int or float (not a bool) with a finite float value."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer beyond the float range
        return False


def _alpha(value, path: Path, what: str):
    """``value`` if it is a finite number >= 0, else :class:`ScheduleFileError` naming ``what``."""
    if not _finite(value) or value < 0:
        raise ScheduleFileError(f"{path}: {what} must be a finite number >= 0, got {value!r}")
    return value


def _check_meta(meta, path: Path) -> dict:
    """The driftlens metadata block, checked field by field; returns a copy."""
    where = f"{path}: driftlens metadata"
    if not isinstance(meta, dict):
        raise ScheduleFileError(f"{where} must be a mapping, got {type(meta).__name__}")
    missing = [k for k in _META_REQUIRED if k not in meta]
    if missing:
        raise ScheduleFileError(f"{where} lacks field(s) {missing}; it was not written by driftlens or was cut")
    meta = dict(meta)
    n = meta["n_layers"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ScheduleFileError(f"{where}: n_layers must be a positive integer, got {n!r}")
    checks = (("decoder_layers", lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
              ("targets", lambda v: isinstance(v, list) and bool(v) and all(isinstance(t, str) for t in v),
               "a non-empty list of strings"),
              ("family", lambda v: v is None or isinstance(v, str), "a string or null"),
              ("model_type", lambda v: v is None or isinstance(v, str), "a string or null"),
              ("rule", lambda v: isinstance(v, str), "a string"),
              ("signals", lambda v: v is None or isinstance(v, dict), "a mapping or null"),
              ("modules", lambda v: isinstance(v, list) and bool(v), "a non-empty list of units"))
    for key, ok, kind in checks:
        if key in meta and not ok(meta[key]):
            raise ScheduleFileError(f"{where}: {key} must be {kind}, got {meta[key]!r}")
    _alpha(meta["alpha_ratio"], path, "driftlens metadata: alpha_ratio")
    meta["modules"] = _check_units(meta, path)
    return meta


def _check_units(meta: dict, path: Path) -> list[dict]:
    """Every unit of ``meta["modules"]``: fields present and typed, path = decoder_layers.layer.module."""
    units, seen = [], set()
    for i, u in enumerate(meta["modules"]):
        where = f"{path}: driftlens metadata, modules[{i}]"
        if not isinstance(u, dict):
            raise ScheduleFileError(f"{where} must be a mapping, got {type(u).__name__}")
        missing = [k for k in _UNIT_REQUIRED if k not in u]
        if missing:
            raise ScheduleFileError(f"{where} ({u.get('path', '?')!r}) lacks field(s) {missing}")
        p, layer, module, signal = u["path"], u["layer"], u["module"], u["signal"]
        if not isinstance(p, str) or not isinstance(module, str):
            raise ScheduleFileError(f"{where}: path and module must be strings, got {p!r} and {module!r}")
        if module not in meta["targets"]:
            raise ScheduleFileError(f"{where} ({p!r}): module {module!r} is not one of the metadata's targets "
                                    f"{meta['targets']}")
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < meta["n_layers"]:
            raise ScheduleFileError(f"{where} ({p!r}): layer must be an integer in 0..{meta['n_layers'] - 1}, "
                                    f"got {layer!r}")
        if p != f"{meta['decoder_layers']}.{layer}.{module}":
            raise ScheduleFileError(f"{where}: path {p!r} is not decoder_layers.layer.module = "
                                    f"{meta['decoder_layers']!r}.{layer}.{module!r}")
        if p in seen:
            raise ScheduleFileError(f"{where}: module {p!r} is listed twice")
        seen.add(p)
        if not _finite(signal):
            raise ScheduleFileError(f"{where} ({p!r}): signal must be a finite number, got {signal!r}")
        _alpha(u["alpha"], path, f"driftlens metadata, modules[{i}] ({p!r}): alpha")
        units.append(u)
    covered = {u["layer"] for u in units}
    if covered != set(range(meta["n_layers"])):
        raise ScheduleFileError(f"{path}: driftlens metadata has n_layers {meta['n_layers']} but lists units for "
                                f"layers {sorted(covered)}")
    return units


def _check_peft(version: str) -> None:
    parts = tuple(int(p) for p in re.findall(r"\d+", version)[:2])
    if parts < _MIN_PEFT:
        raise ScheduleError(f"peft {version} does not anchor rank_pattern keys with '^'; driftlens schedules "
                            f"need peft >= {'.'.join(map(str, _MIN_PEFT))}")


def _nearest(name: str, names, n: int = 3) -> list[str]:
    return difflib.get_close_matches(name, sorted(names), n=n, cutoff=0.0)


# ----------------------------------------------------------------------------------------------
# from a report
# ----------------------------------------------------------------------------------------------

def _resolve_spec(report, spec, model):
    if spec is not None:
        return spec
    from driftlens.specs import load_spec

    if model is not None:
        return load_spec(model.get_base_model() if hasattr(model, "get_base_model") else model)
    mtype = report.attrs.get("model_type")
    if not mtype:
        raise ScheduleError("the report has no 'model_type' attribute; pass spec= or model=")
    return load_spec(mtype)


def _report_layers(report, spec, model) -> int:
    if "layer" not in report.dims:
        raise ScheduleError("the report has no 'layer' dim")
    layers = [int(v) for v in report["layer"].values]
    n = len(layers)
    if model is not None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        n_model = spec.num_layers(base)
        fam = report.attrs.get("family")
        if fam and fam != spec.family:
            raise ScheduleError(f"the report was measured on family {fam!r} (model_type "
                                f"{report.attrs.get('model_type')!r}) but the model is family {spec.family!r}")
        if layers != list(range(n_model)):
            raise ScheduleError(f"the report's layers {layers} do not match the model's {n_model} decoder layers "
                                f"(0..{n_model - 1} at {spec.decoder_layers!r})")
        return n_model
    n_attr = report.attrs.get("n_layers")
    if layers != list(range(int(n_attr) if n_attr is not None else n)):
        raise ScheduleError(f"the report's layers {layers} are not 0..{(n_attr or n) - 1}; a schedule needs a "
                            f"signal for every decoder layer (capture all layers)")
    return n


def _resolve_signals(signal, targets, site_for_module, site, modality) -> dict[str, str]:
    """target -> full expression NAME@SITE[:MODALITY]."""
    site_for_module = dict(site_for_module or {})
    unknown = sorted(set(site_for_module) - set(targets))
    if unknown:
        raise ScheduleError(f"site_for_module names {unknown}, which are not adapted modules {list(targets)}")
    if isinstance(signal, Mapping):
        unknown = sorted(set(signal) - set(targets) - {"*"})
        if unknown:
            raise ScheduleError(f"signal names modules {unknown}, which are not adapted modules {list(targets)}")
        missing = [t for t in targets if t not in signal and "*" not in signal]
        if missing:
            raise ScheduleError(f"signal has no entry for modules {missing} (add them or a '*' fallback)")
        exprs = {t: signal.get(t, signal.get("*")) for t in targets}
    elif isinstance(signal, str):
        exprs = {t: signal for t in targets}
    else:
        raise ScheduleError(f"signal must be a string or a mapping, got {type(signal).__name__}")
    out = {}
    for t, e in exprs.items():
        name, s, m = parse_signal(e)
        s = s or site_for_module.get(t, site)
        out[t] = f"{name}@{s}" + (f":{m}" if m else "")
    return out


def _check_targets(modules, spec, model) -> tuple[str, ...]:
    """The LoRA targets as a tuple: distinct strings relative to one decoder block and, when no model
    is given and the spec lists its ``block_modules``, among those (a model checks them itself)."""
    if isinstance(modules, str):
        modules = [modules]
    targets = tuple(modules)
    if not targets or len(set(targets)) != len(targets) or not all(isinstance(t, str) and t for t in targets):
        raise ScheduleError(f"modules must be a non-empty list of distinct targets, got {list(targets)}")
    for t in targets:
        if t.startswith(spec.decoder_layers) or re.match(r"^\d+\.", t):
            raise ScheduleError(f"module {t!r} must be relative to one decoder block, e.g. 'self_attn.q_proj'")
    known = tuple(getattr(spec, "block_modules", ()) or ())
    unknown = [t for t in targets if t not in known]
    if model is None and known and unknown:
        t = unknown[0]
        raise ScheduleError(
            f"module {t!r} is not a module of a {spec.family!r} decoder block (block_modules in "
            f"{getattr(spec, 'path', 'the spec')}); nearest: {_nearest(t, known)}; all: {list(known)}"
            + (f" ({len(unknown)} unknown targets: {unknown})" if len(unknown) > 1 else "")
        )
    return targets


def _check_finite(profiles: Mapping[str, np.ndarray], ck, report) -> None:
    """Refuse a signal profile holding NaN or +-inf at the selected checkpoint, naming the layers."""
    for expr in sorted(profiles):
        values = profiles[expr]  # [n_layers]
        bad = np.flatnonzero(~np.isfinite(values))
        if not bad.size:
            continue
        layers = [int(report["layer"].values[i]) for i in bad]
        shown = ", ".join(f"layer {lay}: {values[i]}" for lay, i in list(zip(layers, bad))[:8])
        at = f" at checkpoint {ck!r}" if ck is not None else ""
        why = (f"; {ck!r} is the report's reference checkpoint, which is not tested against itself"
               if ck is not None and ck == report.attrs.get("reference") else "")
        raise ScheduleError(
            f"signal {expr!r}{at} is not finite at {len(layers)} layer(s) {layers} ({shown}){why}; a missing "
            f"measurement is no evidence of no drift: choose another checkpoint or signal, or recompute the report"
        )


def _pass_on_report_warnings(report) -> None:
    """A schedule inherits its report's caveats (few clusters, unfinished checkpoints): say them again."""
    import warnings

    for w in filter(None, str(report.attrs.get("warnings", "")).split("\n")):
        warnings.warn(f"the drift report says: {w}", stacklevel=3)


def allocate_ranks(report, budget: int, signal: str | Mapping[str, str] = "mmd", rule: str = "proportional",
                   min_rank: int = 1, max_rank: int = 64, modules: Sequence[str] | None = None, *,
                   checkpoint=None, site: str = DEFAULT_SITE, modality: str = DEFAULT_MODALITY,
                   site_for_module: Mapping[str, str] | None = None, share: float = 0.9,
                   alpha_ratio: float = 2.0, use_rslora: bool = False, spec=None, model=None,
                   source: str | None = None) -> RankSchedule:
    """Allocate LoRA ranks to the decoder modules from a drift report.

    Parameters
    ----------
    report : xarray.Dataset
        Drift report (see :func:`driftlens.drift.drift`); its ``layer`` coordinate must be 0..L-1.
    budget : int
        Sum of the ranks of all adapted modules.
    signal : str or mapping
        ``NAME[@SITE][:MODALITY]`` for all modules, or ``{target: expression}`` with an optional
        ``"*"`` fallback (see the module docstring). Unknown names raise, listing the available ones.
    rule : {"proportional", "waterfill", "cumulative", "uniform"}
    min_rank, max_rank : int
        Floor and ceiling of every adapted module's rank.
    modules : sequence of str, optional
        Targets relative to one decoder block; default ``spec.lora_targets``. Without ``model``,
        each must be one of the spec's ``block_modules`` (when it lists them), or ScheduleError
        names the bad target, the spec file and the nearest valid names.
    checkpoint : str or int, optional
        Report checkpoint the signal is read at; default the last.
    site, modality : str
        Defaults for the signal selection.
    site_for_module : mapping, optional
        ``{target: site}`` overriding ``site`` per module.
    share : float
        ``cumulative`` only: share of the signal the kept layers hold.
    alpha_ratio : float
        ``alpha = alpha_ratio * r`` (constant scaling); with ``use_rslora`` see the module docstring.
    use_rslora : bool
        Export ``use_rslora=True`` with one alpha for every module.
    spec : driftlens.specs.Spec, optional
        Architecture spec; default ``load_spec(model)`` or ``load_spec(report.attrs["model_type"])``.
    model : torch.nn.Module, optional
        When given, the report's layers, the spec and the module paths are checked against it.
    source : str, optional
        Where the report came from (recorded in the metadata); default from the report's attrs.

    Returns
    -------
    RankSchedule

    Raises
    ------
    ScheduleError
        A target outside the spec's ``block_modules``, a signal with a NaN / infinite value at
        the selected checkpoint (the layers are named), a budget the ranks cannot meet, ...
    """
    spec = _resolve_spec(report, spec, model)
    _pass_on_report_warnings(report)
    n_layers = _report_layers(report, spec, model)
    targets = _check_targets(spec.lora_targets if modules is None else modules, spec, model)
    exprs = _resolve_signals(signal, targets, site_for_module, site, modality)
    ck = _select_checkpoint(report, checkpoint) if "checkpoint" in report.coords else None
    profiles = {e: signal_profile(report, e, checkpoint=ck, site=site, modality=modality)
                for e in set(exprs.values())}  # expr -> [n_layers]
    _check_finite(profiles, ck, report)

    paths, layer_of, mod_of, raw = [], [], [], []
    for i in range(n_layers):
        for t in targets:
            paths.append(spec.module_path(i, t))
            layer_of.append(i)
            mod_of.append(t)
            raw.append(profiles[exprs[t]][i])
    s = clean_signal(raw)  # [n_units]
    r = allocate(s, budget, rule, min_rank, max_rank, groups=np.asarray(layer_of), share=share)

    mean_rank = float(r[r > 0].mean())
    lora_alpha = round(alpha_ratio * math.sqrt(mean_rank), 4) if use_rslora else None
    units = tuple(
        ModuleRank(p, int(li), t, float(si), int(ri),
                   (_num(lora_alpha) if use_rslora else _num(alpha_ratio * ri)) if ri else 0)
        for p, li, t, si, ri in zip(paths, layer_of, mod_of, s, r)
    )
    if source is None:
        src = report.encoding.get("source") if hasattr(report, "encoding") else None
        source = src or ", ".join(f"{k}={report.attrs[k]}" for k in ("probe_set", "reference") if k in report.attrs)
    meta = {
        "signal": dict(signal) if isinstance(signal, Mapping) else signal,
        "signals": exprs, "rule": rule, "budget": int(budget), "min_rank": int(min_rank),
        "max_rank": int(max_rank), "share": share if rule == "cumulative" else None, "checkpoint": ck,
        "modality_default": modality, "alpha_ratio": alpha_ratio, "use_rslora": bool(use_rslora),
        "lora_alpha": lora_alpha, "family": spec.family,
        "model_type": (getattr(getattr(model, "config", None), "model_type", None) if model is not None else None)
        or report.attrs.get("model_type") or (spec.model_types[0] if spec.model_types else None),
        "n_layers": n_layers, "decoder_layers": spec.decoder_layers, "targets": list(targets),
        "source": source or None, **_versions(),
    }
    sched = RankSchedule(units, meta)
    if model is not None:
        sched.check(model)
    return sched


# ----------------------------------------------------------------------------------------------
# plot and CLI
# ----------------------------------------------------------------------------------------------

def plot_schedule(schedule: RankSchedule, report=None, ax=None):
    """Rank per layer (bars, stacked by module) beside the signal (line, right axis).

    Parameters
    ----------
    schedule : RankSchedule
    report : xarray.Dataset, optional
        When given and the schedule has one signal expression, the raw (unclipped) profile is drawn
        from it; otherwise the cleaned signal the rule saw (mean over the layer's modules).
    ax : matplotlib.axes.Axes, optional
        Default: a new ``matplotlib.figure.Figure`` (no pyplot, no global backend change).

    Returns
    -------
    matplotlib.axes.Axes
    """
    if ax is None:
        from matplotlib.figure import Figure

        ax = Figure(figsize=(max(5.0, 0.35 * schedule.n_layers + 2), 3.4), layout="constrained").subplots()
    L = schedule.n_layers
    x = np.arange(L)
    bottom = np.zeros(L)
    for t in schedule.meta.get("targets") or sorted({m.module for m in schedule.modules}):
        h = np.zeros(L)
        for m in schedule.modules:
            if m.module == t:
                h[m.layer] += m.rank
        ax.bar(x, h, bottom=bottom, label=t, width=0.8)
        bottom += h
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("LoRA rank (sum over modules)")
    exprs = sorted(set((schedule.meta.get("signals") or {}).values()))
    label = exprs[0] if len(exprs) == 1 else "signal (mean over modules)"
    y = schedule.layer_signal()
    if report is not None and len(exprs) == 1:
        y = signal_profile(report, exprs[0], checkpoint=schedule.meta.get("checkpoint"),
                           modality=schedule.meta.get("modality_default", DEFAULT_MODALITY))
    ax2 = ax.twinx()
    ax2.plot(x, y, color="black", marker="o", lw=1.5, label=label)
    ax2.axhline(0, color="gray", lw=0.5)
    ax2.set_ylabel(label)
    ax.set_title(f"{schedule.meta.get('rule')} ranks, budget {schedule.budget}")
    ax.legend(loc="upper left", fontsize="small")
    ax.set_xticks(x)
    return ax


def _signal_arg(values: list[str] | None):
    if not values:
        return "mmd"
    if len(values) == 1 and "=" not in values[0]:
        return values[0]
    out = {}
    for v in values:
        mod, sep, expr = v.partition("=")
        if not sep or not mod or not expr:
            raise ScheduleError(f"--signal {v!r}: with several signals write MODULE=EXPR (MODULE may be '*')")
        out[mod] = expr
    return out


def add_parser(subparsers):
    """Add the ``ranks`` subcommand to an ``argparse`` subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "ranks",
        help="allocate layer-wise LoRA ranks from a drift report (PEFT / axolotl export)",
        description="Turn a per-layer drift signal into integer LoRA ranks summing exactly to a budget, "
                    "one anchored module path per adapted module, and export them as a PEFT config (JSON) "
                    "or an axolotl fragment (YAML).",
    )
    p.add_argument("report", help="drift report (netCDF) written by 'driftlens drift'")
    p.add_argument("--budget", type=int, required=True, help="sum of ranks over all adapted modules")
    p.add_argument("--signal", action="append", default=None, metavar="EXPR|MODULE=EXPR",
                   help="NAME[@SITE][:MODALITY], e.g. mmd or mmd@key; repeat as MODULE=EXPR for per-module "
                        "signals ('*=EXPR' is the fallback). Default: mmd")
    p.add_argument("--rule", default="proportional", choices=list(RULES))
    p.add_argument("--min-rank", type=int, default=1)
    p.add_argument("--max-rank", type=int, default=64)
    p.add_argument("--modules", nargs="+", default=None, help="targets relative to a decoder block, among "
                   "the spec's block_modules (default: the spec's lora_targets)")
    p.add_argument("--checkpoint", default=None, help="report checkpoint (default: the last)")
    p.add_argument("--site", default=DEFAULT_SITE)
    p.add_argument("--modality", default=DEFAULT_MODALITY)
    p.add_argument("--share", type=float, default=0.9, help="cumulative rule: share of signal kept")
    p.add_argument("--alpha-ratio", type=float, default=2.0, help="alpha / r (default: %(default)s)")
    p.add_argument("--rslora", action="store_true", help="use rsLoRA scaling with one alpha")
    p.add_argument("--spec", default=None, help="hooks TOML file (default: by the report's model_type)")
    p.add_argument("--out", "-o", default="ranks.json", help="output file (default: %(default)s)")
    p.add_argument("--format", choices=list(FORMATS), default=None,
                   help="peft (JSON) or axolotl (YAML); default from the --out suffix")
    p.add_argument("--plot", default=None, help="also write a PNG of rank per layer beside the signal")
    p.set_defaults(func=run_ranks)
    return p


def run_ranks(args) -> int:
    """Handler of ``driftlens ranks``."""
    from driftlens.store import load_report

    report = load_report(args.report)
    spec = None
    if args.spec:
        from driftlens.specs import load_spec

        spec = load_spec(path=args.spec)
    sched = allocate_ranks(report, args.budget, _signal_arg(args.signal), args.rule, args.min_rank, args.max_rank,
                           args.modules, checkpoint=args.checkpoint, site=args.site, modality=args.modality,
                           share=args.share, alpha_ratio=args.alpha_ratio, use_rslora=args.rslora, spec=spec,
                           source=str(args.report))
    out = sched.save(args.out, format=args.format)
    print(f"schedule: {out} ({len(sched.adapted)} modules, budget {sched.budget})")
    print(f"rank per layer: {sched.layer_ranks().tolist()}")
    if args.plot:
        ax = plot_schedule(sched, report)
        ax.figure.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")
    return 0
