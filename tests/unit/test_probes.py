"""Probe sets: loading, validation errors that name the culprit, fingerprint, regeneration."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from driftlens.organism import shapes
from driftlens.organism.probe_sets import make_shapes_probes
from driftlens.probes import FIELDS, Probe, ProbeError, ProbeSet, list_probe_sets, png_bytes, write_manifest

SHIPPED = ("shapes-bilingual", "photos-bilingual")


def copy_set(name: str, dest: Path) -> Path:
    src = ProbeSet.load(name).root
    shutil.copytree(src, dest)
    return dest


def manifest_lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def write_lines(path: Path, rows: list) -> None:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows) + "\n",
                    encoding="utf-8")


@pytest.fixture
def tiny_set(tmp_path) -> Path:
    """A two-probe set (one image, en + ko) in tmp_path/set."""
    root = tmp_path / "set"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (8, 6), (10, 200, 30)).save(root / "images" / "a.png")
    write_lines(root / "manifest.jsonl", [
        {"id": "a-en", "image": "images/a.png", "lang": "en", "prompt": "Describe the image.",
         "answer": "green.", "group": "a", "cluster": "scene-a"},
        {"id": "a-ko", "image": "images/a.png", "lang": "ko", "prompt": "이미지를 설명하세요.",
         "answer": "초록색.", "group": "a", "cluster": "scene-a"},
    ])
    return root


# --------------------------------------------------------------------------- shipped sets

def test_list_probe_sets_has_shipped_sets():
    names = list_probe_sets()
    assert names == sorted(names)
    for name in SHIPPED:
        assert name in names


@pytest.mark.parametrize("name", SHIPPED)
def test_load_by_name_path_and_folder_agree(name):
    by_name = ProbeSet.load(name)
    assert by_name.name == name
    by_manifest = ProbeSet.load(by_name.root / "manifest.jsonl")
    by_folder = ProbeSet.load(str(by_name.root))
    assert by_manifest.items == by_name.items == by_folder.items
    assert by_manifest.fingerprint == by_name.fingerprint == by_folder.fingerprint
    assert ProbeSet.load(by_name) is by_name


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_sets_are_complete_and_paired(name):
    ps = ProbeSet.load(name)
    assert ps.validate() is ps
    ids = [p.id for p in ps]
    assert len(set(ids)) == len(ids) == len(ps)
    for i, p in enumerate(ps):
        assert isinstance(p, Probe) and ps[i] is p and ps[p.id] is p
        assert all(getattr(p, f) for f in FIELDS), p
    # every image opens as RGB, and every group is one image with its en and ko twins
    for group, probes in ps.groups().items():
        assert {p.lang for p in probes} == {"en", "ko"}, group
        assert len({p.image for p in probes}) == 1, group
        en = sorted(p.prompt for p in probes if p.lang == "en")
        ko = sorted(p.prompt for p in probes if p.lang == "ko")
        assert len(en) == len(ko), group
        im = ps.image(probes[0])
        assert im.mode == "RGB" and min(im.size) > 0
    # different groups show different images
    assert len({p.image for p in ps}) == len(ps.groups())


def test_shapes_set_content_matches_the_world():
    ps = ProbeSet.load("shapes-bilingual")
    assert len(ps) == 64 and len(ps.groups()) == 16
    _, held = shapes.split_scenes(seed=0)
    by_key = {s.key: s for s in shapes.all_scenes()}
    for group, probes in ps.groups().items():
        scene = by_key[group]
        assert scene in held                      # 16 <= 24 held-out scenes, so all are held out
        got = {(p.lang, p.prompt): p.answer for p in probes}
        for lang in ("en", "ko"):
            assert got[(lang, {"en": "Describe the image.", "ko": "이미지를 설명하세요."}[lang])] == \
                shapes.caption(scene, lang)
            q = shapes.questions(scene, lang)[0]
            assert q.attribute == "color" and got[(lang, q.prompt)] == q.answer
    # the image is the scene: its most common non-background color is the scene's color
    for group, probes in ps.groups().items():
        px = np.asarray(ps.image(probes[0])).reshape(-1, 3)
        fg = px[(px != shapes.BACKGROUND).any(axis=1)]
        assert len(fg) > 50
        assert tuple(np.unique(fg, axis=0)[0]) == shapes.RGB[by_key[group].color]


def test_photos_set_size_and_images():
    ps = ProbeSet.load("photos-bilingual")
    assert len(ps.groups()) >= 12 and len(ps) >= 24
    for probes in ps.groups().values():
        assert {p.prompt for p in probes} >= {"Describe the image.", "이미지를 설명하세요."}
        ko = next(p.answer for p in probes if p.lang == "ko")
        assert any("\uac00" <= ch <= "\ud7a3" for ch in ko)          # Korean is Hangul
        im = ps.image(probes[0])
        assert max(im.size) <= 256
    sources = (ps.root / "SOURCES.md").read_text(encoding="utf-8")
    for image in {p.image for p in ps}:                          # every image has its source and licence
        row = next((line for line in sources.splitlines() if line.startswith(f"| {image} |")), None)
        assert row is not None, image
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        assert len(cells) == 4 and all(cells), row                  # image, source file, what, licence
    en_ko = [sorted(p.lang for p in probes) for probes in ps.groups().values()]
    assert all(langs == ["en", "ko"] for langs in en_ko)            # one caption per language per image


def test_regenerating_shapes_is_byte_identical(tmp_path):
    shipped = ProbeSet.load("shapes-bilingual")
    manifest = make_shapes_probes(tmp_path / "regen", seed=0)
    assert manifest.read_bytes() == shipped.manifest.read_bytes()
    for rel in {p.image for p in shipped}:
        assert (tmp_path / "regen" / rel).read_bytes() == (shipped.root / rel).read_bytes(), rel
    assert ProbeSet.load(manifest).fingerprint == shipped.fingerprint


def test_make_shapes_probes_other_seed_and_size(tmp_path):
    a = ProbeSet.load(make_shapes_probes(tmp_path / "a", seed=1, n_scenes=30, size=32))
    assert len(a) == 120 and len(a.groups()) == 30
    _, held = shapes.split_scenes(seed=0)
    keys = [g for g in a.groups()]
    held_keys = {s.key for s in held}
    assert all(k in held_keys for k in keys[:len(held)])          # held-out scenes first ...
    assert not any(k in held_keys for k in keys[len(held):])      # ... then training scenes
    assert a.image(0).size == (32, 32)
    assert a.fingerprint != ProbeSet.load("shapes-bilingual").fingerprint
    with pytest.raises(ValueError, match="n_scenes"):
        make_shapes_probes(tmp_path / "b", n_scenes=0)


def test_make_shapes_probes_renders_and_alternate_langs(tmp_path):
    """The demo's layout: every scene rendered twice, one language per image, a group per image."""
    ps = ProbeSet.load(make_shapes_probes(tmp_path / "w", n_scenes=72, size=32, kinds=("caption",),
                                          renders=2, alternate_langs=True))
    assert len(ps) == 144 and len(ps.groups()) == 144                  # one probe, one image, one group
    assert len({p.image for p in ps}) == 144
    assert sorted(p.lang for p in ps).count("en") == 72                 # languages balanced
    assert len({p.answer for p in ps if p.lang == "en"}) == 72           # every scene once in English ...
    # ... and once in Korean: the two renders of a scene carry the two languages
    by_scene: dict = {}
    for p in ps:
        by_scene.setdefault(p.group.split("#")[0], set()).add(p.lang)
    assert len(by_scene) == 72 and all(v == {"en", "ko"} for v in by_scene.values())
    # the two renders of a scene are one cluster (the unit of independence), named by the scene
    assert len({p.cluster for p in ps}) == 72
    assert all(p.cluster == p.group.split("#")[0] for p in ps)
    first, second = ps.image(0), ps.image(1)
    assert np.asarray(first).shape == (32, 32, 3)
    # render 0 is the same image as without renders; render 1 is a different rendering of the scene
    plain = ProbeSet.load(make_shapes_probes(tmp_path / "p", n_scenes=72, size=32, kinds=("caption",)))
    assert (tmp_path / "w" / "images" / "s00.png").read_bytes() == (tmp_path / "p" / "images" / "s00.png").read_bytes()
    assert (tmp_path / "w" / "images" / "s00r1.png").read_bytes() != (tmp_path / "w" / "images" / "s00.png").read_bytes()
    assert len(plain) == 144 and len(plain.groups()) == 72              # both languages share each image
    assert first.size == second.size
    with pytest.raises(ValueError, match="renders"):
        make_shapes_probes(tmp_path / "b", renders=0)


@pytest.mark.parametrize("shape,levels", [((7, 5), 2), ((9, 13), 3), ((4, 20), 16), ((11, 3), 200), ((6, 7), 256)])
def test_png_bytes_round_trips_pixels(shape, levels):
    rng = np.random.default_rng(levels)
    if levels == 256:      # truecolor path: more than 256 distinct colors
        arr = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    else:
        palette = rng.integers(0, 256, (levels, 3), dtype=np.uint8)
        arr = palette[rng.integers(0, levels, shape)]
    data = png_bytes(Image.fromarray(arr))
    back = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_array_equal(back, arr)
    assert png_bytes(Image.fromarray(arr)) == data


def test_png_bytes_spans_several_deflate_blocks():
    arr = np.random.default_rng(0).integers(0, 256, (200, 150, 3), dtype=np.uint8)    # > 65535 raw bytes
    back = np.asarray(Image.open(io.BytesIO(png_bytes(Image.fromarray(arr)))))
    np.testing.assert_array_equal(back, arr)


# --------------------------------------------------------------------------- fingerprint

def test_fingerprint_tracks_image_and_manifest_bytes(tmp_path):
    root = copy_set("shapes-bilingual", tmp_path / "s")
    base = ProbeSet.load(root)
    assert base.fingerprint == ProbeSet.load("shapes-bilingual").fingerprint
    # independent reference for the image part: flipping one image byte changes it
    img = root / base[5].image
    data = bytearray(img.read_bytes())
    data[-20] ^= 0x01
    img.write_bytes(bytes(data))
    changed = ProbeSet.load(root)
    assert changed.fingerprint != base.fingerprint
    assert len(changed.fingerprint) == 64 and int(changed.fingerprint, 16) >= 0
    # and restoring it restores the fingerprint
    data[-20] ^= 0x01
    img.write_bytes(bytes(data))
    assert ProbeSet.load(root).fingerprint == base.fingerprint
    # a manifest edit (answer text) changes it too
    rows = manifest_lines(root / "manifest.jsonl")
    rows[0]["answer"] += "!"
    write_lines(root / "manifest.jsonl", rows)
    assert ProbeSet.load(root).fingerprint != base.fingerprint


def test_fingerprint_is_cached(tiny_set):
    ps = ProbeSet.load(tiny_set)
    fp = ps.fingerprint
    (tiny_set / "images" / "a.png").write_bytes(png_bytes(Image.new("RGB", (8, 6), (0, 0, 0))))
    assert ps.fingerprint == fp
    assert ProbeSet.load(tiny_set).fingerprint != fp


def test_fingerprint_matches_a_direct_sha256(tiny_set):
    ps = ProbeSet.load(tiny_set)
    m = (tiny_set / "manifest.jsonl").read_bytes()
    im = (tiny_set / "images" / "a.png").read_bytes()
    h = hashlib.sha256(len(m).to_bytes(8, "little") + m + b"images/a.png\0" + len(im).to_bytes(8, "little") + im)
    assert ps.fingerprint == h.hexdigest()


# --------------------------------------------------------------------------- access

def test_image_accepts_index_id_probe_and_numpy_int(tiny_set):
    ps = ProbeSet.load(tiny_set)
    ref = np.asarray(ps.image(0))
    assert ref.shape == (6, 8, 3) and (ref == (10, 200, 30)).all()
    for key in (1, np.int64(1), "a-ko", ps[1]):
        np.testing.assert_array_equal(np.asarray(ps.image(key)), ref)
    with pytest.raises(KeyError, match="nope"):
        ps["nope"]
    with pytest.raises(TypeError):
        ps.image(1.5)


def test_image_converts_to_rgb(tmp_path, tiny_set):
    Image.new("L", (5, 5), 7).save(tiny_set / "images" / "a.png")
    im = ProbeSet.load(tiny_set).image(0)
    assert im.mode == "RGB" and im.getpixel((0, 0)) == (7, 7, 7)


def test_cluster_defaults_to_the_group(tmp_path, tiny_set):
    lines = (tiny_set / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
    old = [json.dumps({k: v for k, v in json.loads(x).items() if k != "cluster"}, ensure_ascii=False)
           for x in lines]
    (tiny_set / "old.jsonl").write_text("\n".join(old) + "\n", encoding="utf-8")
    ps = ProbeSet.load(tiny_set / "old.jsonl")
    assert [p.cluster for p in ps] == ["a", "a"]
    assert [p.cluster for p in ProbeSet.load(tiny_set)] == ["scene-a", "scene-a"]
    assert Probe("x", "i.png", "en", "p", "a", "g").cluster == "g"


def test_write_manifest_round_trips(tmp_path, tiny_set):
    ps = ProbeSet.load(tiny_set)
    out = write_manifest(tiny_set / "copy.jsonl", [ps[0], {**ps[1].__dict__, "extra": 1}])
    again = ProbeSet.load(out)
    assert again.items == ps.items
    assert out.read_bytes() == (tiny_set / "manifest.jsonl").read_bytes()


# --------------------------------------------------------------------------- errors name the culprit

def test_unknown_name_lists_available():
    with pytest.raises(ProbeError) as e:
        ProbeSet.load("no-such-set")
    msg = str(e.value)
    assert "no-such-set" in msg and "shapes-bilingual" in msg and "photos-bilingual" in msg


def test_missing_manifest(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ProbeError, match=r"empty.*manifest\.jsonl"):
        ProbeSet.load(tmp_path / "empty")
    with pytest.raises(ProbeError, match="nothere.jsonl"):
        ProbeSet.load(tmp_path / "nothere.jsonl")
    with pytest.raises(ProbeError, match="missing-dir"):
        ProbeSet.load(str(tmp_path / "missing-dir"))


def _good(i: int, **kw) -> dict:
    d = {"id": f"p{i}", "image": "images/a.png", "lang": "en", "prompt": "Describe the image.",
         "answer": "green.", "group": "a"}
    d.update(kw)
    return d


@pytest.mark.parametrize("rows,pattern", [
    ([_good(0), '{"id": "p1", "image": ', _good(2)], r"manifest\.jsonl:2: malformed JSON"),
    ([_good(0), "", "[1, 2]"], r"manifest\.jsonl:3: expected a JSON object"),
    ([_good(0), {k: v for k, v in _good(1).items() if k != "prompt"}], r"manifest\.jsonl:2: missing .*'prompt'"),
    ([{k: v for k, v in _good(0).items() if k not in ("lang", "group")}], r"manifest\.jsonl:1: missing .*'lang', 'group'"),
    ([_good(0, lang=3)], r"manifest\.jsonl:1: field\(s\) 'lang'"),
    ([_good(0, id="")], r"manifest\.jsonl:1: field\(s\) 'id'"),
    ([_good(0), _good(1), _good(0)], r"manifest\.jsonl:3: duplicate id 'p0' \(first on line 1\)"),
    ([_good(0), _good(1, image="images/gone.png")], r"manifest\.jsonl:2: image 'images/gone.png' not found"),
    ([_good(0, image="/abs/a.png")], r"manifest\.jsonl:1: image path '/abs/a.png' must be relative"),
    ([], r"holds no probes"),
])
def test_bad_manifest_lines_name_file_line_and_field(tiny_set, rows, pattern):
    write_lines(tiny_set / "manifest.jsonl", rows)
    with pytest.raises(ProbeError, match=pattern) as e:
        ProbeSet.load(tiny_set)
    assert str(tiny_set / "manifest.jsonl") in str(e.value)


def test_answer_may_be_empty_and_extra_keys_are_ignored(tiny_set):
    write_lines(tiny_set / "manifest.jsonl", [_good(0, answer="", note="x")])
    assert ProbeSet.load(tiny_set)[0].answer == ""


def test_non_utf8_manifest_names_file(tiny_set):
    (tiny_set / "manifest.jsonl").write_bytes(json.dumps(_good(0)).encode()[:-3] + b"\xff\xfe\"}\n")
    with pytest.raises(ProbeError, match=r"manifest\.jsonl: not UTF-8"):
        ProbeSet.load(tiny_set)


def test_line_separator_inside_a_string_is_not_a_line_break(tiny_set):
    write_manifest(tiny_set / "manifest.jsonl", [Probe("p0", "images/a.png", "en", "a\u2028b", "c\u0085d", "a")])
    assert ProbeSet.load(tiny_set)[0].prompt == "a\u2028b"


def test_image_deleted_after_load_names_the_file(tiny_set):
    ps = ProbeSet.load(tiny_set)
    (tiny_set / "images" / "a.png").unlink()
    with pytest.raises(ProbeError, match=r"'a-en'.*images/a\.png is missing"):
        ps.image(0)


@pytest.mark.parametrize("damage", ["garbage", "truncate", "crc"])
def test_corrupt_image_names_the_file(tiny_set, damage):
    path = tiny_set / "images" / "a.png"
    data = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"this is not an image")
    elif damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:                           # flip a byte inside the IDAT payload: chunk CRC mismatch
        i = data.index(b"IDAT") + 6
        path.write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:])
    ps = ProbeSet.load(tiny_set)                  # the file exists, so loading works ...
    with pytest.raises(ProbeError, match=r"images/a\.png is corrupt"):
        ps.image(0)                               # ... and decoding names it
    with pytest.raises(ProbeError, match=r"(?s)1 bad image\(s\).*images/a\.png is corrupt"):
        ps.validate()


def test_validate_lists_every_bad_image(tmp_path):
    root = copy_set("shapes-bilingual", tmp_path / "s")
    ps = ProbeSet.load(root)
    for rel in ("images/s02.png", "images/s09.png"):
        (root / rel).write_bytes(b"nope")
    with pytest.raises(ProbeError) as e:
        ps.validate()
    msg = str(e.value)
    assert "2 bad image(s)" in msg and "s02.png" in msg and "s09.png" in msg and "s03.png" not in msg
