"""LoRA rank allocation over plain arrays: per-unit signals in, integer ranks summing to a budget out.

:func:`allocate` is the arithmetic :func:`driftlens.ranks.allocate_ranks` applies to a report's
signal; it knows nothing of models or reports. Signal values that are NaN or negative count as 0
(:func:`clean_signal`), ``+inf`` as the largest finite value; if every signal is 0, every rule
falls back to ``uniform``.

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
"""
from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import Literal

import numpy as np

from driftlens.errors import ScheduleError

Rule = Literal["proportional", "waterfill", "cumulative", "uniform"]
RULES: tuple[Rule, ...] = ("proportional", "waterfill", "cumulative", "uniform")


def clean_signal(values) -> np.ndarray:
    """NaN and negative values -> 0 (no evidence of drift), +inf -> the largest finite value; float64 ``[n]``."""
    s = np.asarray(values, dtype=np.float64)  # [n]
    finite = np.isfinite(s) & (s > 0)
    top = float(s[finite].max()) if finite.any() else 1.0
    s = np.where(np.isposinf(s), top, s)  # a zero-spread null gives z = +inf: count it as the top signal
    return np.maximum(np.nan_to_num(s, nan=0.0, neginf=0.0), 0.0)


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


def allocate(signal, budget: int, rule: Rule = "proportional", min_rank: int = 1, max_rank: int = 64, *,
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
