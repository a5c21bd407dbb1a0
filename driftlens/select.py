"""Choosing a checkpoint of a report: one default rule, one error.

A report holds a reference and one or more trajectories of checkpoints (``ko-1 .. ko-5``, an English
control ``en-1 .. en-5``). A checkpoint's trajectory is its label without a trailing step number
(``ko-3`` -> ``ko``; ``step-200`` -> ``step``). When a caller leaves the checkpoint out:

- one checkpoint besides the reference: that one;
- one trajectory: its last checkpoint (the end of training);
- several trajectories: refused, naming them -- there is no "last" checkpoint that is obviously the
  one meant (a Korean adaptation and its English control), so it is never guessed.
"""
from __future__ import annotations

import numbers
import re
from collections.abc import Sequence

from driftlens.errors import UsageError

_STEP = re.compile(r"[-_]?\d+$")


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
    UsageError
        An unknown label or position, or several trajectories and no ``checkpoint``.
    """
    labels = [str(c) for c in labels]
    if checkpoint is None:
        groups = trajectories(labels, reference)
        if not groups:
            raise UsageError(f"the report holds no checkpoint besides its reference {reference!r}")
        if len(groups) > 1:
            raise UsageError(f"say which checkpoint {what} is read at ({flag}=...): the report holds "
                             f"{len(groups)} trajectories {', '.join(f'{g}: {v}' for g, v in groups.items())}; "
                             f"for the difference between two, use a contrast")
        return next(iter(groups.values()))[-1]
    if isinstance(checkpoint, numbers.Integral) and not isinstance(checkpoint, bool):
        try:
            return labels[int(checkpoint)]
        except IndexError:
            raise UsageError(f"checkpoint index {checkpoint} out of range; the report has {labels}") from None
    if str(checkpoint) not in labels:
        raise UsageError(f"checkpoint {checkpoint!r} is not in the report; it has {labels}")
    return str(checkpoint)


def pick_checkpoints(labels: list[str], checkpoints, where: str) -> list[str]:
    """``checkpoints`` (default all ``labels``) as strings, each one of ``labels``.

    ``where`` names the labels' owner in the error (``"the store"``, ``"the report"``).
    """
    chosen = labels if checkpoints is None else [str(c) for c in as_labels(checkpoints, "checkpoints")]
    unknown = [c for c in chosen if c not in labels]
    if unknown or not chosen:
        raise UsageError(f"checkpoint(s) {unknown} not in {where}; it has {labels}" if unknown else
                         "checkpoints is empty: give at least one checkpoint")
    return chosen


def as_labels(values, what: str) -> list:
    """``values`` as a list: one label (a string) or a sequence of labels; ``what`` names them in the error."""
    if isinstance(values, str):
        return [values]
    try:
        return list(values)
    except TypeError:
        raise UsageError(f"{what} must be a label or a sequence of labels, got {values!r}") from None


__all__ = ["as_labels", "pick_checkpoint", "pick_checkpoints", "trajectories", "trajectory_of"]
