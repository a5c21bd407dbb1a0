"""The registry kind -> cell function table the engine dispatches on.

:mod:`driftlens.registry` says what kind each metric is (a leaf, no torch); this table says which
family computes a kind's cells and at which grain, so :func:`driftlens.engine.run_task` never
branches on a metric's name. Grains:

``cell``
    One (checkpoint, layer, site, modality) cell from the reference's and the checkpoint's rows:
    ``fn(name, cell: Cell, settings) -> (Inference, draws [B])``; the variables the metric's
    registry ``outputs`` name are filled from it (``kernel``, ``transport``, ``paired``).
``cross_modal``
    One checkpoint's visual against text rows at a (layer, site):
    ``fn(name, v, t, cv, ct, k, n_draws, settings) -> (value, lo, hi, draws [B])``.
``routing``
    One (checkpoint, sparse layer, modality) of the routing distributions (store site ``route``):
    ``fn(names, r, c, rows, settings) -> {name: (Inference, draws)}``.
``expert``
    A ``cell`` restricted to the rows the reference routes to one expert:
    ``fn(name, cell, member, settings) -> (Inference, draws)``.

A new kind of grain ``cell`` needs no engine code: :func:`register_kind` (with the metric itself
added by :func:`driftlens.registry.register`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from driftlens.errors import UsageError

GRAINS = ("cell", "cross_modal", "routing", "expert")


@dataclass(frozen=True)
class KindCells:
    """How the engine computes the cells of one registry kind: the grain and the family's function."""

    grain: str
    fn: Callable


def _builtin() -> dict[str, KindCells]:
    from driftlens.stats import crossmodal, mmd, routing, shift, transport

    return {"kernel": KindCells("cell", mmd.cell), "transport": KindCells("cell", transport.cell),
            "paired": KindCells("cell", shift.cell), "cross_modal": KindCells("cross_modal", crossmodal.cell),
            "routing": KindCells("routing", routing.routing_cell), "expert": KindCells("expert", routing.expert_cell)}


_EXTRA: dict[str, KindCells] = {}


def cells_of(kind: str) -> KindCells:
    """The grain and cell function of ``kind``; UsageError for a kind nothing computes."""
    table = {**_builtin(), **_EXTRA}
    if kind not in table:
        raise UsageError(f"no cell function for metric kind {kind!r}; kinds with one: {sorted(table)} "
                         f"(add one with driftlens.stats.kinds.register_kind)")
    return table[kind]


def register_kind(kind: str, fn: Callable, grain: str = "cell") -> None:
    """Add a metric kind computed by ``fn`` at ``grain`` (see the module docstring); its metrics are
    added with :func:`driftlens.registry.register`. :func:`unregister_kind` removes it."""
    if grain not in GRAINS:
        raise UsageError(f"grain must be one of {GRAINS}, got {grain!r}")
    if kind in _builtin():
        raise UsageError(f"metric kind {kind!r} is built in; choose another name")
    _EXTRA[kind] = KindCells(grain, fn)


def unregister_kind(kind: str) -> None:
    """Remove a kind added by :func:`register_kind` (no error when it is not there)."""
    _EXTRA.pop(kind, None)
