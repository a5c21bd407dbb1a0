"""Choosing from a store or a report: one module, one default rule per choice, one error.

Every reader of a store (:func:`driftlens.open_store`) or a report (:func:`driftlens.drift`) that
picks a checkpoint, the reference or the unit of independence calls this module, so the same
omission means the same thing everywhere. An unknown value raises :class:`SelectionError` (a
:class:`~driftlens.errors.UsageError`) naming it and what the data holds. The rules:

- **reference** (:func:`reference_of`): the one given; else the one the data records
  (``attrs["reference"]``: every report records it); else the first checkpoint (a store records
  none: its first checkpoint, the base model of the capture). A caller that reads the reference's
  tokens names the checkpoints it reads (``among``), and a reference outside them is refused --
  never replaced by another checkpoint.
- **checkpoint** (:func:`pick_checkpoint`, the one a signal is read at): the one given (a label or a
  position); else, besides the reference, the only checkpoint, or the last of the only trajectory
  (the end of training). A report with several trajectories (``ko-1 .. ko-5`` and its English
  control ``en-1 .. en-5``) is refused, naming them: there is no "last" checkpoint that is
  obviously the one meant, so it is never guessed. A checkpoint's trajectory is its label without
  a trailing step number (``ko-3`` -> ``ko``; ``step-200`` -> ``step``).
- **checkpoints** (:func:`pick_checkpoints`): the ones given, in their order; else every
  checkpoint of the data, in its order.
- **site** (:func:`pick_site`): named by the caller (each has its own default, ``hidden`` for most);
  it must be a per-token site of the data (a variable over ``checkpoint`` and ``token``).
- **layers** (:func:`pick_layers`): the ones given, in their order, each once; else every layer of
  the data, in its order.
- **cluster unit** (:func:`cluster_unit`): the first per-token coordinate of
  :data:`~driftlens.schema.CLUSTER_COORDS` the data has -- ``cluster`` (the scene), else ``group``
  (probes sharing an image; a store captured before clusters existed), else ``sample``.
"""
from __future__ import annotations

import numbers
import re
from collections.abc import Sequence

import numpy as np

from driftlens.errors import SelectionError
from driftlens.schema import CLUSTER_COORDS

_STEP = re.compile(r"[-_]?\d+$")


def checkpoint_labels(data) -> list[str]:
    """The checkpoint labels of a store or report, in order (``[]`` when it has no ``checkpoint`` coordinate)."""
    coords = getattr(data, "coords", {})
    if "checkpoint" not in coords:
        return []
    return [str(c) for c in np.asarray(data["checkpoint"].values).astype(str)]


def reference_of(data, reference=None, *, among: Sequence[str] | None = None, where: str = "the data") -> str:
    """The reference checkpoint: ``reference`` if given; else the recorded one; else the first checkpoint.

    Parameters
    ----------
    data : xarray.Dataset
        A store or a report (its ``attrs["reference"]`` and ``checkpoint`` coordinate are read).
    reference : str, optional
        The caller's choice.
    among : sequence of str, optional
        The checkpoints the caller reads the reference from: the reference must be one of them, and
        the first of them is the fallback. Default: the data's checkpoints, where a recorded
        reference is taken as it is (a report's reference names what it was measured against, also
        after a selection left it out) and a given one must be a checkpoint.
    where : str
        Whose checkpoints they are, in the error message (``"the store"``, ``"the map"``).

    Raises
    ------
    SelectionError
        The reference is not among the checkpoints, or there is no checkpoint at all.
    """
    labels = checkpoint_labels(data) if among is None else [str(c) for c in among]
    recorded = getattr(data, "attrs", {}).get("reference")
    if reference is None and recorded is not None:
        if among is None or str(recorded) in labels:
            return str(recorded)
        raise SelectionError(f"the recorded reference {str(recorded)!r} (attrs['reference']) is not a checkpoint "
                             f"of {where}; it has {labels}: pass reference= one of them")
    if reference is None:
        if not labels:
            raise SelectionError(f"{where} holds no checkpoint, so there is no reference")
        return labels[0]
    if str(reference) not in labels:
        raise SelectionError(f"reference {str(reference)!r} is not a checkpoint of {where}; it has {labels}")
    return str(reference)


def sites_of(data, layered: bool | None = None) -> list[str]:
    """The per-token sites of a store (variables over ``checkpoint`` and ``token``); ``layered``: only those
    with (True) or without (False) a ``layer`` dim."""
    out = []
    for name, var in getattr(data, "data_vars", {}).items():
        if "token" in var.dims and "checkpoint" in var.dims and (layered is None or layered == ("layer" in var.dims)):
            out.append(str(name))
    return out


def pick_site(data, site: str, *, layered: bool | None = None, where: str = "the store") -> str:
    """``site`` when it is a per-token site of ``data`` (``layered``: one with / without layers).

    Raises
    ------
    SelectionError
        Naming the site and the sites the data has.
    """
    have = sites_of(data, layered)
    if site not in have:
        kind = {None: "", True: " layered", False: " per-checkpoint (unlayered)"}[layered]
        raise SelectionError(f"site {site!r} is not a{kind} site of {where}; it has {have}")
    return str(site)


def pick_layers(data, layers=None, *, where: str = "the store") -> list[int]:
    """``layers`` (default every layer of ``data``) as ints, each a distinct layer of ``data``.

    Raises
    ------
    SelectionError
        A layer the data does not have (named, with the layers it has), a layer given twice, or none.
    """
    have = [int(v) for v in np.asarray(data["layer"].values)] if "layer" in getattr(data, "coords", {}) else []
    if layers is None:
        return have
    try:
        chosen = [int(v) for v in ([layers] if isinstance(layers, numbers.Integral) else as_labels(layers, "layers"))]
    except (TypeError, ValueError):
        raise SelectionError(f"layers must be integers, got {layers!r}") from None
    bad = [v for v in chosen if v not in have]
    if bad:
        raise SelectionError(f"layer(s) {bad} not in {where}; it has layers {have}")
    if not chosen:
        raise SelectionError(f"layers is empty: give at least one of {where}'s layers {have}")
    twice = sorted({v for v in chosen if chosen.count(v) > 1})
    if twice:
        raise SelectionError(f"layers {chosen} repeat {twice}: give each layer of {where} once")
    return chosen


def cluster_unit(data) -> str:
    """The per-token coordinate whose values are the units of independence (the module's rule).

    Raises
    ------
    SelectionError
        The data has none of :data:`~driftlens.schema.CLUSTER_COORDS` as a coordinate.
    """
    coords = getattr(data, "coords", {})
    for name in CLUSTER_COORDS:
        if name in coords:
            return name
    raise SelectionError(f"the data has no per-token {', '.join(f'`{c}`' for c in CLUSTER_COORDS)} coordinate "
                         f"to resample by; it has coordinates {sorted(str(c) for c in coords)}")


def cluster_labels(data) -> tuple[np.ndarray, str]:
    """Per-token labels of the unit of independence (as strings) and the coordinate they came from."""
    name = cluster_unit(data)
    return np.asarray(data[name].values).astype(str), name


def trajectory_of(label: str) -> str:
    """A checkpoint's trajectory: its label without a trailing step number (``ko-3`` -> ``ko``)."""
    return _STEP.sub("", str(label)) or str(label)


def trajectories(labels: Sequence[str], reference: str | None = None) -> dict[str, list[str]]:
    """``{trajectory: [labels in order]}`` of the checkpoints other than ``reference``."""
    out: dict[str, list[str]] = {}
    for lab in labels:
        if str(lab) != reference:
            out.setdefault(trajectory_of(lab), []).append(str(lab))
    return out


def pick_checkpoint(labels: Sequence[str], checkpoint=None, *, reference: str | None = None,
                    what: str = "the signal", flag: str = "checkpoint") -> str:
    """The checkpoint a caller means: ``checkpoint`` if given (a label, or a position), else the default rule.

    Parameters
    ----------
    labels : sequence of str
        The report's checkpoint labels, in order.
    checkpoint : str or int, optional
        A label, or a position in ``labels``.
    reference : str, optional
        The report's reference (never a default: it is not measured against itself).
    what : str
        What the checkpoint is for, in the error message.
    flag : str
        The argument name in the error message (``checkpoint=``, ``--checkpoint``).

    Raises
    ------
    SelectionError
        An unknown label or position, or several trajectories and no ``checkpoint``.
    """
    labels = [str(c) for c in labels]
    if checkpoint is None:
        groups = trajectories(labels, reference)
        if not groups:
            raise SelectionError(f"the report holds no checkpoint besides its reference {reference!r}")
        if len(groups) > 1:
            raise SelectionError(f"say which checkpoint {what} is read at ({flag}=...): the report holds "
                             f"{len(groups)} trajectories {', '.join(f'{g}: {v}' for g, v in groups.items())}; "
                             f"for the difference between two, use a contrast")
        return next(iter(groups.values()))[-1]
    if isinstance(checkpoint, numbers.Integral) and not isinstance(checkpoint, bool):
        try:
            return labels[int(checkpoint)]
        except IndexError:
            raise SelectionError(f"checkpoint index {checkpoint} out of range; the report has {labels}") from None
    if str(checkpoint) not in labels:
        raise SelectionError(f"checkpoint {checkpoint!r} is not in the report; it has {labels}")
    return str(checkpoint)


def pick_checkpoints(labels: list[str], checkpoints, where: str) -> list[str]:
    """``checkpoints`` (default all ``labels``) as strings, each one of ``labels``.

    ``where`` names the labels' owner in the error (``"the store"``, ``"the report"``).
    """
    chosen = labels if checkpoints is None else [str(c) for c in as_labels(checkpoints, "checkpoints")]
    unknown = [c for c in chosen if c not in labels]
    if unknown or not chosen:
        raise SelectionError(f"checkpoint(s) {unknown} not in {where}; it has {labels}" if unknown else
                         "checkpoints is empty: give at least one checkpoint")
    return chosen


def as_labels(values, what: str) -> list:
    """``values`` as a list: one label (a string) or a sequence of labels; ``what`` names them in the error."""
    if isinstance(values, str):
        return [values]
    try:
        return list(values)
    except TypeError:
        raise SelectionError(f"{what} must be a label or a sequence of labels, got {values!r}") from None


__all__ = ["SelectionError", "as_labels", "checkpoint_labels", "cluster_labels", "cluster_unit", "pick_checkpoint",
           "pick_checkpoints", "pick_layers", "pick_site", "reference_of", "sites_of", "trajectories", "trajectory_of"]
