"""Property-based fuzzing of the two file parsers users hand-edit: probe manifests and rank files.

For arbitrary bytes, text, JSON values and mutations of a valid file, each parser either returns a
usable result or raises its own error (:class:`~driftlens.probes.ProbeError`,
:class:`~driftlens.errors.ScheduleError`) -- never a ``KeyError`` / ``TypeError`` / json / yaml
traceback. Valid files round-trip. Hypothesis runs with modest ``max_examples`` and no deadline, so
the file takes a few seconds; temporary files live in a module-scoped folder (hypothesis does not
mix with the function-scoped ``tmp_path``).
"""
from __future__ import annotations

import functools
import json
import math

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from driftlens.errors import DriftlensError, ScheduleError
from driftlens.probes import FIELDS, MANIFEST, Probe, ProbeError, _parse, write_manifest
from driftlens.ranks import allocate_ranks
from driftlens.schedule import _AXOLOTL_META, RankSchedule
from driftlens.specs import load_spec
from driftlens.testing import make_report

FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.integers(),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)


def _mutation_paths(obj, prefix=()):
    """Every path (tuple of keys / indices) into a JSON tree, the root included."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _mutation_paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _mutation_paths(v, (*prefix, i))


def _mutate(draw, obj):
    """A copy of the JSON tree ``obj`` with one node replaced, deleted or given an extra key."""
    obj = json.loads(json.dumps(obj))
    paths = list(_mutation_paths(obj))
    path = draw(st.sampled_from(paths[1:] if len(paths) > 1 else paths))
    if not path:
        return draw(JSON_VALUES)
    parent = obj
    for key in path[:-1]:
        parent = parent[key]
    action = draw(st.sampled_from(["replace", "delete", "add"]))
    if action == "delete":
        del parent[path[-1]]
    elif action == "add" and isinstance(parent, dict):
        parent[draw(st.text(max_size=8))] = draw(JSON_VALUES)
    else:
        parent[path[-1]] = draw(JSON_VALUES)
    return obj


def _text_mutation(draw, data: bytes) -> bytes:
    """Truncate, flip a byte, drop a line or splice random bytes into ``data``."""
    kind = draw(st.sampled_from(["truncate", "flip", "drop_line", "splice"]))
    i = draw(st.integers(0, max(len(data) - 1, 0)))
    if kind == "truncate":
        return data[:i]
    if kind == "flip" and data:
        return data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1:]
    if kind == "drop_line":
        lines = data.split(b"\n")
        del lines[draw(st.integers(0, len(lines) - 1))]
        return b"\n".join(lines)
    return data[:i] + draw(st.binary(min_size=1, max_size=16)) + data[i:]


# ------------------------------------------------------------------------------------------------
# probe manifests
# ------------------------------------------------------------------------------------------------

IMAGES = ("a.png", "images/b.png", "이미지 c.png", "sp ace/d.jpg")


@pytest.fixture(scope="module")
def probe_root(tmp_path_factory):
    """A folder holding a few (empty) image files; each example overwrites its manifest."""
    root = tmp_path_factory.mktemp("fuzz-probes")
    for rel in IMAGES:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")
    return root


def _parse_or_refuse(root, data: bytes):
    """``_parse`` of ``data`` written as a manifest: a list of probes, or None after a ProbeError."""
    manifest = root / MANIFEST
    manifest.write_bytes(data)
    try:
        probes = _parse(manifest)
    except ProbeError as exc:
        assert str(manifest) in str(exc), exc   # every refusal names the file
        return None
    assert probes and all(isinstance(p, Probe) for p in probes)
    for p in probes:
        for f in FIELDS:
            value = getattr(p, f)
            assert isinstance(value, str) and (f == "answer" or value.strip()), (f, value)
            value.encode("utf-8")                   # plain Unicode text, writable back
        assert (root / p.image).is_file()
    assert len({p.id for p in probes}) == len(probes)
    return probes


NON_EMPTY = st.text(min_size=1, max_size=20).filter(str.strip)


@st.composite
def probe_rows(draw):
    """Valid probes with unique ids, images from :data:`IMAGES`, cluster given or left to default."""
    n = draw(st.integers(1, 6))
    ids = draw(st.lists(NON_EMPTY, min_size=n, max_size=n, unique=True))
    rows = []
    for pid in ids:
        group = draw(NON_EMPTY)
        cluster = draw(st.one_of(st.just(""), NON_EMPTY))
        rows.append(Probe(pid, draw(st.sampled_from(IMAGES)), draw(NON_EMPTY), draw(NON_EMPTY),
                          draw(st.text(max_size=20)), group, cluster))
    return rows


@FUZZ
@given(rows=probe_rows())
def test_valid_manifests_round_trip(probe_root, rows):
    write_manifest(probe_root / MANIFEST, rows)
    assert _parse(probe_root / MANIFEST) == rows


@FUZZ
@given(data=st.binary(max_size=300))
@example(data=b"\xff\xfe{}")                                            # not UTF-8
@example(data=b"[" * 100_000)                                           # nested beyond the recursion limit
@example(data=b'{"id": ' + b"1" * 5000 + b"}")                          # int beyond str->int conversion limit
def test_arbitrary_bytes(probe_root, data):
    _parse_or_refuse(probe_root, data)


@FUZZ
@given(lines=st.lists(JSON_VALUES, min_size=1, max_size=4))
def test_arbitrary_json_lines(probe_root, lines):
    data = "\n".join(json.dumps(x, ensure_ascii=False) for x in lines).encode("utf-8", "surrogatepass")
    _parse_or_refuse(probe_root, data)


def _probe_dict(p: Probe) -> dict:
    return {f: getattr(p, f) for f in FIELDS}


@FUZZ
@given(st.data())
def test_mutated_manifests(probe_root, data):
    rows = [_probe_dict(p) for p in data.draw(probe_rows())]
    i = data.draw(st.integers(0, len(rows) - 1))
    rows[i] = _mutate(data.draw, rows[i])
    raw = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode("utf-8", "surrogatepass")
    if data.draw(st.booleans()):
        raw = _text_mutation(data.draw, raw)
    _parse_or_refuse(probe_root, raw)


@pytest.mark.parametrize("field,value", [
    ("image", "x" * 300 + ".png"),              # ENAMETOOLONG from stat()
    ("image", "가" * 100 + "/a.png"),             # 300 bytes in one path component
    ("image", "a\x00.png"),                     # embedded NUL
    ("id", "\ud800"),                           # a lone surrogate escape: not Unicode text
    ("group", "\udcff"),
    ("image", "../" * 3 + "a.png"),
])
def test_edge_values_are_refused_cleanly(probe_root, field, value):
    row = _probe_dict(Probe("p0", "a.png", "en", "Describe.", "", "g"))
    row[field] = value
    raw = json.dumps(row).encode("ascii")      # \\uXXXX escapes stay escapes
    _parse_or_refuse(probe_root, raw)


def test_edge_value_messages(probe_root):
    row = _probe_dict(Probe("p0", "x" * 300 + ".png", "en", "Describe.", "", "g"))
    manifest = probe_root / MANIFEST
    manifest.write_text(json.dumps(row) + "\n")
    with pytest.raises(ProbeError, match=rf"{MANIFEST}:1: image 'x{{10}}.*cannot be used"):
        _parse(manifest)
    manifest.write_text(json.dumps(dict(row, image="a.png", id="\ud800")) + "\n")
    with pytest.raises(ProbeError, match=r":1: field\(s\) 'id' hold an unpaired surrogate"):
        _parse(manifest)
    manifest.write_bytes(b"[" * 100_000 + b"\n")
    with pytest.raises(ProbeError, match=r":1: malformed JSON \(nested too deeply\)"):
        _parse(manifest)
    manifest.write_bytes(b'{"id": ' + b"1" * 5000 + b"}\n")
    with pytest.raises(ProbeError, match=r":1: malformed JSON \(.*4300 digits"):
        _parse(manifest)


# ------------------------------------------------------------------------------------------------
# rank files
# ------------------------------------------------------------------------------------------------

SPEC = load_spec("llava")


@functools.cache
def _report(n_layers: int, seed: int):
    return make_report(n_layers=n_layers, seed=seed)


@st.composite
def schedules(draw):
    """Schedules :func:`allocate_ranks` makes from synthetic reports: every rule, rsLoRA or not."""
    n_layers = draw(st.integers(1, 5))
    targets = draw(st.lists(st.sampled_from(SPEC.lora_targets), min_size=1, max_size=4, unique=True))
    n = n_layers * len(targets)
    lo = draw(st.integers(1, 4))
    hi = draw(st.integers(lo, 16))
    rule = draw(st.sampled_from(["proportional", "waterfill", "cumulative", "uniform"]))
    budget = draw(st.integers(n * lo, n * hi))
    return allocate_ranks(_report(n_layers, draw(st.integers(0, 3))), budget,
                          draw(st.sampled_from(["mmd", "mmd@key", "sinkhorn_lo", "gap"])), rule, lo, hi,
                          targets, spec=SPEC, share=draw(st.sampled_from([0.5, 0.9, 1.0])),
                          alpha_ratio=draw(st.sampled_from([0.5, 1.0, 2.0, 16.0])),
                          use_rslora=draw(st.booleans()))


@pytest.fixture(scope="module")
def rank_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz-ranks")


@pytest.fixture(scope="module")
def valid_files(rank_dir):
    """The texts of a few valid schedules, per format."""
    rep = _report(3, 0)
    out = {"peft": [], "axolotl": []}
    for kw in ({"rule": "proportional"}, {"rule": "cumulative", "share": 0.5}, {"use_rslora": True}):
        sch = allocate_ranks(rep, 30, "mmd", min_rank=1, max_rank=8, spec=SPEC, **kw)
        for fmt, texts in out.items():
            texts.append(sch.save(rank_dir / "v.any", format=fmt).read_bytes())
    return out


def _same(a: RankSchedule, b: RankSchedule) -> None:
    assert a.modules == b.modules
    assert a.ranks == b.ranks and a.alphas == b.alphas
    assert a.layer_ranks().tolist() == b.layer_ranks().tolist() and a.n_layers == b.n_layers
    assert a.use_rslora == b.use_rslora and a.base_alpha == b.base_alpha


def _load_or_refuse(rank_dir, data: bytes, suffix: str = ".json"):
    """``RankSchedule.load`` of ``data``: a schedule that works, or None after a ScheduleError."""
    path = rank_dir / f"fuzz{suffix}"
    path.write_bytes(data)
    try:
        sch = RankSchedule.load(path)
    except ScheduleError as exc:
        assert str(path) in str(exc), exc   # every refusal names the file
        return None
    # usable: every view works, ranks are positive ints, alphas finite, and it saves and reloads equal
    assert sch.ranks and all(type(r) is int and r > 0 for r in sch.ranks.values())
    assert all(math.isfinite(a) and a >= 0 for a in sch.alphas.values())
    assert sch.budget == sum(sch.ranks.values()) == int(sch.layer_ranks().sum())
    repr(sch)
    sch.base_rank, sch.base_alpha, sch.rank_pattern, sch.alpha_pattern, sch.layer_signal()
    for fmt in ("peft", "axolotl"):
        sch.to_dict(fmt)
        _same(RankSchedule.load(sch.save(rank_dir / f"again.{fmt}", format=fmt)), sch)
    return sch


@FEW
@given(sch=schedules(), fmt=st.sampled_from(["peft", "axolotl"]))
def test_saved_schedules_load_back_equal(rank_dir, sch, fmt):
    back = RankSchedule.load(sch.save(rank_dir / "rt.file", format=fmt))
    _same(back, sch)
    assert back.meta["targets"] == sch.meta["targets"] and back.meta["rule"] == sch.meta["rule"]
    assert back.meta["n_layers"] == sch.meta["n_layers"]
    assert back.rank_pattern == sch.rank_pattern and back.alpha_pattern == sch.alpha_pattern


@FUZZ
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".json", ".yaml"]))
@example(data=b"\xff{", suffix=".json")                       # invalid UTF-8
@example(data=b"[1, 2]", suffix=".json")                      # JSON, but a list
@example(data=b"- 1\n- 2\n", suffix=".yaml")                  # YAML, but not a mapping
@example(data=b"x: 2001-13-45\n", suffix=".yaml")             # a YAML timestamp datetime refuses
@example(data=b'{"a": ' * 3_000, suffix=".json")              # nested beyond the recursion limit
@example(data=b"[" * 1_000 + b"]" * 1_000, suffix=".yaml")
def test_arbitrary_bytes_rank_file(rank_dir, data, suffix):
    _load_or_refuse(rank_dir, data, suffix)


@FUZZ
@given(value=JSON_VALUES)
def test_arbitrary_json_rank_file(rank_dir, value):
    _load_or_refuse(rank_dir, json.dumps(value).encode())
    _load_or_refuse(rank_dir, json.dumps({"rank_pattern": {"^a": 1}, "driftlens": value}).encode())


@FUZZ
@given(st.data())
def test_mutated_peft_files(rank_dir, valid_files, data):
    body = json.loads(data.draw(st.sampled_from(valid_files["peft"])))
    for _ in range(data.draw(st.integers(1, 3))):
        body = _mutate(data.draw, body)
    raw = json.dumps(body).encode()
    if data.draw(st.integers(0, 3)) == 0:
        raw = _text_mutation(data.draw, raw)
    _load_or_refuse(rank_dir, raw, ".json")


@FUZZ
@given(st.data())
def test_mutated_axolotl_files(rank_dir, valid_files, data):
    import yaml

    text = data.draw(st.sampled_from(valid_files["axolotl"])).decode()
    lines = text.splitlines()
    meta_at = next(i for i, x in enumerate(lines) if x.startswith(_AXOLOTL_META))
    meta = json.loads(lines[meta_at][len(_AXOLOTL_META):])
    body = yaml.safe_load(text)
    what = data.draw(st.sampled_from(["meta", "body", "both"]))
    if what in ("meta", "both"):
        meta = _mutate(data.draw, meta)
    if what in ("body", "both"):
        body = _mutate(data.draw, body)
    raw = (lines[0] + "\n" + _AXOLOTL_META + json.dumps(meta) + "\n"
           + yaml.safe_dump(body, sort_keys=False)).encode()
    if data.draw(st.integers(0, 3)) == 0:
        raw = _text_mutation(data.draw, raw)
    _load_or_refuse(rank_dir, raw, ".yaml")


def test_every_refusal_is_a_driftlens_error():
    assert issubclass(ProbeError, DriftlensError) and issubclass(ScheduleError, DriftlensError)
