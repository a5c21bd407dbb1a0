"""The synthetic bilingual world: rendering says what the scene says, in both languages."""
from __future__ import annotations

import numpy as np
import pytest

from driftlens.organism import shapes


def test_render_is_deterministic_and_correct():
    for k, scene in enumerate(shapes.all_scenes()):
        a = np.asarray(shapes.render(scene, 64, seed=k))
        b = np.asarray(shapes.render(scene, 64, seed=k))
        assert np.array_equal(a, b)
        cx, cy = shapes.CENTRES[scene.position]
        centre = a[int(cy * 64), int(cx * 64)]
        assert tuple(centre) == shapes.RGB[scene.color]        # the shape's color at its quadrant centre
        # the opposite quadrant is background
        assert tuple(a[int((1 - cy) * 64), int((1 - cx) * 64)]) == shapes.BACKGROUND
    assert not np.array_equal(np.asarray(shapes.render(scene, 64, seed=1)), np.asarray(shapes.render(scene, 64, seed=2)))


def test_rendered_shape_is_the_scene_shape():
    # probe pixels that tell the three shapes apart (no jitter: seed=None puts the shape at the
    # quadrant centre with radius 0.24 * size): a square's corner lies outside the circle and the
    # triangle; the triangle's apex lies above the square; the circle's left edge at mid-height
    # lies outside the triangle (whose sides slope inwards) but inside the square.
    size = 128
    for scene in shapes.all_scenes():
        a = np.asarray(shapes.render(scene, size))
        cx, cy = (v * size for v in shapes.CENTRES[scene.position])
        r = 0.24 * size
        fill = shapes.RGB[scene.color]
        corner, apex, upper_side = (tuple(a[round(cy + dy), round(cx + dx)]) == fill
                                    for dx, dy in ((0.78 * r, 0.7 * r), (0, -0.92 * r), (-0.8 * r, -0.3 * r)))
        expected = {"square": (True, False, True), "circle": (False, True, True),
                    "triangle": (True, True, False)}[scene.shape]
        assert (corner, apex, upper_side) == expected, scene
        # everything outside the shape's quadrant is background
        qx, qy = int(cx >= size / 2), int(cy >= size / 2)
        other = a[(1 - qy) * size // 2:(2 - qy) * size // 2, :]
        assert (other == shapes.BACKGROUND).all(), scene
        other = a[:, (1 - qx) * size // 2:(2 - qx) * size // 2]
        assert (other == shapes.BACKGROUND).all(), scene


def test_captions_and_questions_both_languages():
    s = shapes.Scene("blue", "triangle", "bottom right")
    assert shapes.caption(s, "en") == "a blue triangle at the bottom right."
    assert shapes.caption(s, "ko") == "오른쪽 아래에 파란색 삼각형이 있습니다."
    assert shapes.caption(shapes.Scene("red", "circle", "top left"), "ko") == "왼쪽 위에 빨간색 원이 있습니다."
    for lang in shapes.LANGS:
        qs = shapes.questions(s, lang)
        assert [q.attribute for q in qs] == ["color", "shape", "position"]
        for q in qs:
            assert q.answer in q.candidates and len(set(q.candidates)) == len(q.candidates)
    assert shapes.questions(s, "ko")[0].answer == "파란색"
    with pytest.raises(ValueError, match="unknown language 'fr'"):
        shapes.caption(s, "fr")
    with pytest.raises(ValueError, match="unknown color 'pink'"):
        shapes.Scene("pink", "circle", "top left")


def test_split_is_disjoint_and_covers_every_value():
    train, held = shapes.split_scenes(seed=0)
    assert set(train).isdisjoint(held) and len(train) + len(held) == len(shapes.all_scenes())
    for attr, table in (("color", shapes.COLORS), ("shape", shapes.SHAPES), ("position", shapes.POSITIONS)):
        assert {getattr(s, attr) for s in train} == set(table)     # held-out = new combinations only
    assert shapes.split_scenes(seed=0) == (train, held)
    assert shapes.sample_scenes(5, seed=3) == shapes.sample_scenes(5, seed=3)
