"""The report's options, validated once and carried by the engine's plan to every cell.

A CLI flag or a :func:`driftlens.drift` argument becomes a field of :class:`Settings` in
:func:`driftlens.engine.make_plan`; the cell functions of the metric families read it from there
(with the resampling draws it names, :func:`driftlens.stats.resampling.draws`), so no option is
threaded through the engine argument by argument.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from driftlens.errors import DriftError, check_count

#: the multiplicity corrections of the report's ``{m}_q`` (None: none)
CORRECTIONS = ("bh", "holm", None)


@dataclass(frozen=True)
class Settings:
    """Options of a drift report (parameters as :func:`driftlens.drift`).

    Attributes
    ----------
    n_permutations, n_bootstrap : int
        Cluster sign flips and cluster-bootstrap draws of the kernel, paired, routing and expert cells.
    level : float
        Interval coverage.
    correction : {"bh", "holm", None}
        Multiplicity correction of the p-values over the grid.
    transport_resamples : int
        At most this many flips and draws for the transport metrics (each resample recomputes them).
    mir_bootstrap : int or None
        Bootstrap draws of MIR (None: ``n_bootstrap``).
    seed : int
        Sign flips use ``seed``, bootstrap draws ``seed + 1``; also the median subsample, Sinkhorn's
        subsample and the sliced projections.
    device : str
        Where the cells run (``"auto"``: CUDA when available).
    blur : float
        Sinkhorn blur in units of the reference's median-heuristic sigma.
    n_projections : int
        Random directions of the sliced Wasserstein distance.
    bandwidth_scale : float
        The kernel bandwidth in units of the reference's median-heuristic sigma.
    """

    n_permutations: int = 1000
    n_bootstrap: int = 1000
    level: float = 0.95
    correction: str | None = "bh"
    transport_resamples: int = 200
    mir_bootstrap: int | None = None
    seed: int = 0
    device: Any = "auto"
    blur: float = 0.1
    n_projections: int = 128
    bandwidth_scale: float = 1.0

    def validated(self) -> Settings:
        """These settings checked (counts integral and >= 1, level in (0, 1) ...), normalised to plain types.

        Raises
        ------
        DriftError
            Naming the option at fault and its value.
        """
        for name, val in (("n_permutations", self.n_permutations), ("n_bootstrap", self.n_bootstrap),
                          ("transport_resamples", self.transport_resamples), ("n_projections", self.n_projections),
                          ("mir_bootstrap", self.n_bootstrap if self.mir_bootstrap is None else self.mir_bootstrap)):
            check_count(name, val, error=DriftError)       # 2.5 or True refused, never rounded
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise DriftError(f"seed must be an integer, got {self.seed!r}")
        if not 0 < self.level < 1:
            raise DriftError(f"level must be in (0, 1), got {self.level}")
        if self.correction not in CORRECTIONS:
            raise DriftError(f"correction must be one of {CORRECTIONS}, got {self.correction!r}")
        if not self.blur > 0:
            raise DriftError(f"blur must be > 0, got {self.blur}")
        if not (isinstance(self.bandwidth_scale, (int, float)) and 0 < self.bandwidth_scale < float("inf")):
            raise DriftError(f"bandwidth_scale must be a positive number, got {self.bandwidth_scale!r}")
        return replace(self, n_permutations=int(self.n_permutations), n_bootstrap=int(self.n_bootstrap),
                       level=float(self.level), transport_resamples=int(self.transport_resamples),
                       mir_bootstrap=int(self.n_mir), seed=int(self.seed), device=str(self.device),
                       blur=float(self.blur), n_projections=int(self.n_projections),
                       bandwidth_scale=float(self.bandwidth_scale))

    @property
    def n_transport(self) -> tuple[int, int]:
        """Sign flips and bootstrap draws of the transport metrics."""
        return min(self.transport_resamples, self.n_permutations), min(self.transport_resamples, self.n_bootstrap)

    @property
    def n_mir(self) -> int:
        """Bootstrap draws of MIR."""
        return self.n_bootstrap if self.mir_bootstrap is None else self.mir_bootstrap

    def resamples(self, draws: str) -> tuple[int, int]:
        """(sign flips, bootstrap draws) of a metric whose registry ``draws`` is ``"bootstrap"``,
        ``"transport"`` or ``"mir"``."""
        if draws == "transport":
            return self.n_transport
        if draws == "mir":
            return self.n_permutations, self.n_mir
        return self.n_permutations, self.n_bootstrap


class Cell(NamedTuple):
    """One (checkpoint, layer, site, modality) cell's input to a family's cell function.

    ``r``, ``c`` [n, d]: the reference's and the checkpoint's rows of the cell, centred on the
    reference's mean; ``rows`` their clusters (:class:`driftlens.stats.resampling.Rows`); ``sigma``
    the kernel bandwidth; ``cache`` the reference's kernel tiles kept across checkpoints (or None);
    ``where`` the cell, named for error messages.
    """

    r: Any
    c: Any
    rows: Any
    sigma: float
    cache: dict | None = None
    where: str = ""
