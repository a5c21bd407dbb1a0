"""Probe sets of the organism's shapes world (the shipped ``shapes-bilingual`` set and the demo's)."""
from __future__ import annotations

import random
from pathlib import Path

from driftlens.organism import shapes
from driftlens.probes import CAPTION_PROMPTS, MANIFEST, Probe, png_bytes, write_manifest


def make_shapes_probes(out_dir, seed: int = 0, n_scenes: int = 16, size: int = 64,
                       kinds: tuple[str, ...] = ("caption", "color"), renders: int = 1,
                       alternate_langs: bool = False) -> Path:
    """Generate the ``shapes-bilingual`` probe set from a seed; returns the manifest path.

    ``n_scenes`` distinct scenes are drawn with ``random.Random(seed)``: held-out combinations of
    :func:`driftlens.organism.shapes.split_scenes` (``seed=0``) first, then training scenes if more are
    needed. Scene ``k`` is rendered once (``render(scene, size, seed=seed * 1000 + k)``) to
    ``images/s{k:02d}.png``; per scene and language (en, ko) there is a caption probe
    (``s{k:02d}-{lang}-caption``) and a color-question probe (``s{k:02d}-{lang}-color``), all
    four in group ``scene.key``. Manifest and images are byte-identical for the same arguments
    on any platform (see :func:`driftlens.probes.png_bytes`).

    With ``renders > 1`` scene ``k`` is also rendered with seeds ``seed * 1000 + 100 * j + k``
    (``j = 1 .. renders - 1``) to ``images/s{k:02d}r{j}.png`` (probe ids ``s{k:02d}r{j}-...``,
    group ``{scene.key}#r{j}``: a group is the probes that share one image, as everywhere).
    Every probe's ``cluster`` is its scene (``scene.key``): renders of one scene are one
    independent unit.
    With ``alternate_langs`` each image gets the probes of one language only
    (``LANGS[(k + j) % 2]``), so no two probes share an image: the visual tokens are not
    duplicated across languages (in a causal decoder, EN and KO probes of one image with the
    same prefix have identical visual-token states) while both languages stay balanced.

    Parameters
    ----------
    out_dir : str or Path
        Created if needed; existing files of the same names are overwritten.
    seed : int
        Scene choice and rendering jitter.
    n_scenes : int
        Number of distinct scenes (1 .. number of scenes).
    size : int
        Image side in pixels.
    kinds : tuple of str
        Which probes per scene and language: ``"caption"`` and/or ``"color"``.
    renders : int
        Renderings per scene (1 .. 10), each a distinct image.
    alternate_langs : bool
        One language per image instead of both.
    """
    if not kinds or set(kinds) - {"caption", "color"}:
        raise ValueError(f"kinds must be a non-empty subset of ('caption', 'color'), got {kinds!r}")

    plan = shapes_probe_renders(seed, n_scenes, renders)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    probes = []
    for k, j, scene, render_seed in plan:
        name = f"s{k:02d}" if j == 0 else f"s{k:02d}r{j}"
        rel = f"images/{name}.png"
        group = scene.key if j == 0 else f"{scene.key}#r{j}"   # a group is the probes of one image
        (out / rel).write_bytes(png_bytes(shapes.render(scene, size=size, seed=render_seed)))
        langs = (shapes.LANGS[(k + j) % 2],) if alternate_langs else shapes.LANGS
        for lang in langs:
            if "caption" in kinds:
                probes.append(Probe(f"{name}-{lang}-caption", rel, lang, CAPTION_PROMPTS[lang],
                                    shapes.caption(scene, lang), group, scene.key))
            if "color" in kinds:
                q = next(q for q in shapes.questions(scene, lang) if q.attribute == "color")
                probes.append(Probe(f"{name}-{lang}-color", rel, lang, q.prompt, q.answer, group, scene.key))
    return write_manifest(out / MANIFEST, probes)


MAX_RENDERS = 10


def shapes_probe_renders(seed: int = 0, n_scenes: int = 16,
                         renders: int = 1) -> list[tuple[int, int, shapes.Scene, int]]:
    """The images :func:`make_shapes_probes` draws: ``[(scene number k, render j, scene, render seed)]``.

    Scenes in the order described there (``split_scenes(seed=0)``'s held-out scenes first, shuffled
    by ``random.Random(seed)``), render ``j`` of scene ``k`` with seed ``seed * 1000 + 100 * j + k``.
    """
    train, held = shapes.split_scenes(seed=0)
    rng = random.Random(seed)
    pool = rng.sample(held, len(held)) + rng.sample(train, len(train))
    if not 1 <= n_scenes <= len(pool):
        raise ValueError(f"n_scenes must be in 1..{len(pool)}, got {n_scenes}")
    if not 1 <= renders <= MAX_RENDERS:
        raise ValueError(f"renders must be in 1..{MAX_RENDERS}, got {renders}")
    return [(k, j, scene, seed * 1000 + 100 * j + k) for k, scene in enumerate(pool[:n_scenes]) for j in range(renders)]
