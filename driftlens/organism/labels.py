"""Probe labels of the organism's world: color, shape and position read from group strings.

A probe of the world's probe sets (:mod:`driftlens.organism.probe_sets`) belongs to the group
``scene.key`` (first render) or ``f"{scene.key}#r{j}"`` (render ``j``), where ``scene.key`` is
``color-shape-position`` with the position's space turned into a hyphen. The labels here turn
those strings back into attributes, for :func:`driftlens.probing.linear_probe`:

>>> from driftlens.organism.labels import parse_group, world_label
>>> parse_group("red-circle-top-right#r1")
Scene(color='red', shape='circle', position='top right')
>>> world_label("position")("blue-square-bottom-left")
'bottom left'
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from driftlens.errors import DataError, UsageError
from driftlens.organism.shapes import COLORS, POSITIONS, SHAPES, Scene

WorldAttribute = Literal["color", "shape", "position", "scene"]
KINDS: tuple[str, ...] = ("color", "shape", "position", "scene")


def parse_group(group: str) -> Scene:
    """The scene of a world probe's group string.

    Parameters
    ----------
    group : str
        ``color-shape-position`` with an optional render suffix, e.g. ``'red-circle-top-right'``
        or ``'red-circle-top-right#r1'``.

    Returns
    -------
    Scene
        Its color, shape and position (English keys of :mod:`driftlens.organism.shapes`).

    Raises
    ------
    DataError
        The string is not a scene key of the world.
    """
    key = str(group).split("#", 1)[0]
    parts = key.split("-")
    if len(parts) >= 3 and parts[0] in COLORS and parts[1] in SHAPES:
        position = " ".join(parts[2:])
        if position in POSITIONS:
            return Scene(parts[0], parts[1], position)
    raise DataError(f"group {group!r} is not a scene of the organism's world (expected color-shape-position "
                    f"with an optional '#r<j>' suffix, colors {list(COLORS)}, shapes {list(SHAPES)}, positions "
                    f"{[p.replace(' ', '-') for p in POSITIONS]})")


def world_label(kind: WorldAttribute) -> Callable[[str], str]:
    """A label function for :func:`driftlens.probing.linear_probe`: one attribute of a group's scene.

    Parameters
    ----------
    kind : {"color", "shape", "position", "scene"}
        The attribute returned (``"scene"``: the scene key without render suffix, e.g.
        ``'red-circle-top-right'``; ``"position"``: e.g. ``'top right'``).

    Returns
    -------
    callable
        ``group string -> label``; named ``world_<kind>``. Raises
        :class:`~driftlens.errors.DataError` on a string that is not a scene of the world.

    Examples
    --------
    >>> world_label("color")("red-circle-top-right#r1")
    'red'
    """
    if kind not in KINDS:
        raise UsageError(f"unknown world attribute {kind!r}; choose from {KINDS}")

    def label(group: str) -> str:
        scene = parse_group(group)
        return scene.key if kind == "scene" else getattr(scene, kind)

    label.__name__ = label.__qualname__ = f"world_{kind}"
    label.__doc__ = f"The {kind} of a world group string such as 'red-circle-top-right#r1'."
    return label


__all__ = ["KINDS", "WorldAttribute", "parse_group", "world_label"]
