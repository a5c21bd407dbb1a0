"""Probe sets: the images and prompts a capture runs through every checkpoint.

A probe set is a folder with a ``manifest.jsonl`` (one JSON object per line, UTF-8) and its images::

    {"id": "s03-en-caption", "image": "images/s03.png", "lang": "en",
     "prompt": "Describe the image.", "answer": "a red circle at the top left.", "group": "red-circle-top-left",
     "cluster": "red-circle-top-left"}

``image`` is relative to the manifest's folder; ``answer`` is the reference answer or caption;
probes that show the same image (its English and Korean twins, its caption and question probes)
share ``group``; ``cluster`` (optional, default: the ``group``) names the independent unit the
image belongs to -- all renders, crops and language twins of one scene or source photograph
share it, and drift inference resamples clusters, never tokens. Shipped sets live in
``data/probes/<name>/`` (the package ``driftlens.data``); the format is documented in that
folder's ``README.md``.

>>> ps = ProbeSet.load("shapes-bilingual")
>>> len(ps), ps[0].id, ps.image(0).mode
(64, 's00-en-caption', 'RGB')
"""
from __future__ import annotations

import hashlib
import json
import operator
import posixpath
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path, PurePosixPath

from driftlens.errors import ArgumentTypeError, DataError
from driftlens.outputs import atomic_write

FIELDS = ("id", "image", "lang", "prompt", "answer", "group", "cluster")
REQUIRED = FIELDS[:-1]              # ``cluster`` defaults to ``group``
CAPTION_PROMPTS = {"en": "Describe the image.", "ko": "이미지를 설명하세요."}
MANIFEST = "manifest.jsonl"


class ProbeError(DataError):
    """A probe set is missing, malformed or points at a bad image; the message names it."""


@dataclass(frozen=True)
class Probe:
    """One image + prompt (+ reference answer) in one language.

    Attributes
    ----------
    id : str
        Unique within its set, e.g. ``"s03-en-caption"``.
    image : str
        Image path relative to the manifest's folder (POSIX separators).
    lang : str
        Language code of ``prompt`` and ``answer`` (``"en"``, ``"ko"``, ...).
    prompt : str
        The user prompt shown with the image.
    answer : str
        Reference answer or caption (may be empty).
    group : str
        Shared by every probe of the same image (e.g. its English/Korean twins).
    cluster : str
        The independent unit (scene, source photograph) the image belongs to; shared by all
        renders, crops and twins of it. Defaults to ``group``.
    """

    id: str
    image: str
    lang: str
    prompt: str
    answer: str
    group: str
    cluster: str = ""

    def __post_init__(self):
        if not self.cluster:
            object.__setattr__(self, "cluster", self.group)


# --------------------------------------------------------------------------- locating sets

def _shipped_root() -> Path:
    return Path(str(resources.files("driftlens.data") / "probes"))


def list_probe_sets() -> list[str]:
    """Names of the probe sets shipped with driftlens (folders under ``data/probes/`` with a manifest)."""
    root = _shipped_root()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / MANIFEST).is_file())


def _looks_like_path(x) -> bool:
    if isinstance(x, Path):
        return True
    s = str(x)
    return "/" in s or "\\" in s or s.endswith(".jsonl") or s in (".", "..") or s.startswith("~")


def _resolve(name_or_path) -> tuple[Path, str]:
    """(manifest path, set name) for a shipped name, a manifest path or a folder holding one."""
    if not isinstance(name_or_path, (str, Path)):
        raise ArgumentTypeError(f"a probe set is named by a str or a path, got {type(name_or_path).__name__}")
    shipped = list_probe_sets()
    if not _looks_like_path(name_or_path) and str(name_or_path) in shipped:
        manifest = _shipped_root() / str(name_or_path) / MANIFEST
        return manifest, str(name_or_path)
    path = Path(name_or_path).expanduser()
    if _looks_like_path(name_or_path) or path.exists():
        if path.is_dir():
            manifest = path / MANIFEST
            if not manifest.is_file():
                raise ProbeError(f"probe-set folder {path} holds no {MANIFEST}")
        else:
            manifest = path
            if not manifest.is_file():
                raise ProbeError(f"probe manifest {manifest} not found")
        return manifest, manifest.parent.name
    raise ProbeError(
        f"unknown probe set {str(name_or_path)!r}: not a shipped set (available: {', '.join(shipped) or 'none'}) "
        f"and not a path to a {MANIFEST} or a folder holding one"
    )


# --------------------------------------------------------------------------- parsing

def _parse(manifest: Path) -> list[Probe]:
    """Validated probes of ``manifest``; :class:`ProbeError` naming ``file:line`` on the first problem."""
    try:
        text = manifest.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ProbeError(f"{manifest}: not UTF-8 ({exc})") from exc
    items: list[Probe] = []
    seen: dict[str, int] = {}
    # split on "\n" only: json.dumps(ensure_ascii=False) may leave U+2028 etc. inside strings
    for n, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        where = f"{manifest}:{n}"
        obj = _fields(line, where)
        pid = obj["id"]
        if pid in seen:
            raise ProbeError(f"{where}: duplicate id {pid!r} (first on line {seen[pid]})")
        seen[pid] = n
        _check_image(obj["image"], where, manifest.parent)
        items.append(Probe(**obj))
    if not items:
        raise ProbeError(f"{manifest} holds no probes")
    return items


def _json_line(line: str, where: str):
    """The JSON value of one manifest line; :class:`ProbeError` for anything ``json`` refuses."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise ProbeError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})") from exc
    except RecursionError:
        raise ProbeError(f"{where}: malformed JSON (nested too deeply)") from None
    except ValueError as exc:                    # e.g. an integer beyond the str -> int digit limit
        raise ProbeError(f"{where}: malformed JSON ({exc})") from None


def _fields(line: str, where: str) -> dict[str, str]:
    """The :data:`FIELDS` of one manifest line, checked to be text (``where`` is ``file:line``)."""
    obj = _json_line(line, where)
    if not isinstance(obj, dict):
        raise ProbeError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [f for f in REQUIRED if f not in obj]
    if missing:
        raise ProbeError(f"{where}: missing required field(s) {', '.join(map(repr, missing))}; "
                         f"a probe needs {list(REQUIRED)} (and may name its `cluster`)")
    obj.setdefault("cluster", obj["group"])
    bad = [f for f in FIELDS if not isinstance(obj[f], str) or (f != "answer" and not obj[f].strip())]
    if bad:
        raise ProbeError(f"{where}: field(s) {', '.join(map(repr, bad))} must be non-empty strings "
                         f"(answer may be empty)")
    bad = [f for f in FIELDS if not _is_unicode(obj[f])]
    if bad:
        raise ProbeError(f"{where}: field(s) {', '.join(map(repr, bad))} hold an unpaired surrogate escape "
                         f"(\\ud800-\\udfff alone), which is not Unicode text")
    return {f: obj[f] for f in FIELDS}


def _is_unicode(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_image(rel: str, where: str, root: Path) -> None:
    """:class:`ProbeError` unless ``rel`` is a relative path to an existing file under ``root``."""
    if PurePosixPath(rel).is_absolute() or Path(rel).is_absolute():
        raise ProbeError(f"{where}: image path {rel!r} must be relative to the manifest's folder")
    if posixpath.normpath(rel.replace("\\", "/")).split("/")[0] == "..":
        raise ProbeError(f"{where}: image path {rel!r} leads out of the manifest's folder ({root}); a probe set "
                         f"holds its images under its own folder")
    image = root / rel
    try:
        found = image.is_file()
    except OSError as exc:                       # a name too long for the file system, a loop, no access
        raise ProbeError(f"{where}: image {rel!r} cannot be used as a path ({exc.strerror or exc})") from None
    if not found:
        raise ProbeError(f"{where}: image {rel!r} not found (looked for {image})")


# --------------------------------------------------------------------------- the set

class ProbeSet:
    """An ordered, validated set of probes.

    Parameters
    ----------
    manifest : str or Path
        The ``manifest.jsonl``; use :meth:`load` to go from a name or a folder.
    name : str, optional
        Defaults to the manifest's folder name.

    Attributes
    ----------
    name : str
    root : Path
        The manifest's folder; image paths are relative to it.
    manifest : Path
    items : list of Probe

    Notes
    -----
    Loading parses and checks every manifest line and that every image file exists; images are
    decoded only by :meth:`image` (lazily) or :meth:`validate` (all at once).
    """

    def __init__(self, manifest, name: str | None = None):
        self.manifest = Path(manifest)
        self.root = self.manifest.parent
        self.name = name or self.root.name
        self.items: list[Probe] = _parse(self.manifest)
        self._index = {p.id: i for i, p in enumerate(self.items)}
        self._fingerprint: str | None = None

    @classmethod
    def load(cls, name_or_path) -> ProbeSet:
        """A shipped set by name (``"shapes-bilingual"``), or a manifest path or a folder holding one.

        Raises
        ------
        ProbeError
            Unknown name (lists the shipped sets), missing manifest, or a bad manifest line
            (``file:line``), a duplicate id or a missing image file.
        """
        if isinstance(name_or_path, ProbeSet):
            return name_or_path
        manifest, name = _resolve(name_or_path)
        return cls(manifest, name=name)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Probe]:
        return iter(self.items)

    def __getitem__(self, i):
        """A probe by position (int; slices give a list) or by id (str)."""
        if isinstance(i, str):
            try:
                return self.items[self._index[i]]
            except KeyError:
                raise KeyError(f"no probe with id {i!r} in probe set {self.name!r} ({self.manifest})") from None
        return self.items[i]

    def __repr__(self) -> str:
        langs = sorted({p.lang for p in self.items})
        return (f"ProbeSet({self.name!r}: {len(self)} probes, {len(self.groups())} groups, "
                f"{len({p.cluster for p in self.items})} clusters, "
                f"langs {langs}, {self.root})")

    def groups(self) -> dict[str, list[Probe]]:
        """Probes by ``group``, in first-appearance order."""
        out: dict[str, list[Probe]] = {}
        for p in self.items:
            out.setdefault(p.group, []).append(p)
        return out

    @property
    def fingerprint(self) -> str:
        """sha256 (hex) over the manifest bytes and every distinct image's path and bytes, in manifest order.

        Computed once and cached; a set edited after loading must be re-loaded.
        """
        if self._fingerprint is None:
            h = hashlib.sha256()
            data = self.manifest.read_bytes()
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
            for rel in dict.fromkeys(p.image for p in self.items):
                img = (self.root / rel).read_bytes()
                h.update(rel.encode("utf-8") + b"\0")
                h.update(len(img).to_bytes(8, "little"))
                h.update(img)
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def _probe(self, i_or_probe) -> Probe:
        if isinstance(i_or_probe, Probe):
            return i_or_probe
        if isinstance(i_or_probe, str):
            return self[i_or_probe]
        try:
            return self.items[operator.index(i_or_probe)]
        except TypeError:
            raise TypeError(f"expected a probe index, id or Probe, got {type(i_or_probe).__name__}") from None

    def image_path(self, i_or_probe) -> Path:
        """Path of a probe's image file."""
        return self.root / self._probe(i_or_probe).image

    def image(self, i_or_probe):
        """The probe's image as an RGB ``PIL.Image.Image``.

        Parameters
        ----------
        i_or_probe : int, str or Probe
            Position, id, or the probe itself.

        Raises
        ------
        ProbeError
            The file is missing, or PIL cannot open, verify or decode it (the message names the file).
        """
        from PIL import Image, UnidentifiedImageError

        p = self._probe(i_or_probe)
        path = self.root / p.image
        try:
            with Image.open(path) as im:      # structural check (chunk CRCs, ...) ...
                im.verify()
            with Image.open(path) as im:      # ... then a full decode (catches truncation)
                im.load()
                return im.convert("RGB")
        except FileNotFoundError as exc:
            raise ProbeError(f"probe {p.id!r} ({self.manifest}): image file {path} is missing") from exc
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
            raise ProbeError(f"probe {p.id!r} ({self.manifest}): image file {path} is corrupt or not an "
                             f"image ({type(exc).__name__}: {exc})") from exc

    def validate(self) -> ProbeSet:
        """Open and decode every distinct image; returns ``self``.

        Raises
        ------
        ProbeError
            Listing every bad image file.
        """
        errors = []
        for p in {q.image: q for q in self.items}.values():
            try:
                self.image(p)
            except ProbeError as exc:
                errors.append(str(exc))
        if errors:
            raise ProbeError(f"{len(errors)} bad image(s) in probe set {self.name!r}:\n  " + "\n  ".join(errors))
        return self


# --------------------------------------------------------------------------- writing sets

def write_manifest(path, probes: Iterable) -> Path:
    """Write probes (:class:`Probe` objects or dicts with :data:`FIELDS`) as a manifest; returns its path.

    One compact JSON object per line, keys in :data:`FIELDS` order, UTF-8 without ASCII escaping,
    ``\\n`` line ends: the same probes always give the same bytes.
    """
    path = Path(path)
    lines = []
    for p in probes:
        d = asdict(p) if isinstance(p, Probe) else dict(p)
        d.setdefault("cluster", d["group"])
        d["cluster"] = d["cluster"] or d["group"]
        lines.append(json.dumps({f: d[f] for f in FIELDS}, ensure_ascii=False))
    return atomic_write(path, ("\n".join(lines) + "\n").encode("utf-8"))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _stored_zlib(raw: bytes) -> bytes:
    """A zlib stream of uncompressed (stored) deflate blocks: identical bytes on every zlib build."""
    out = bytearray(b"\x78\x01")
    step = 65535
    for start in range(0, max(len(raw), 1), step):
        block = raw[start:start + step]
        final = 1 if start + step >= len(raw) else 0
        out += bytes([final]) + struct.pack("<HH", len(block), len(block) ^ 0xFFFF) + block
    out += struct.pack(">I", zlib.adler32(raw) & 0xFFFFFFFF)
    return bytes(out)


def png_bytes(img) -> bytes:
    """Encode an RGB ``PIL.Image`` as PNG bytes that depend only on its pixels.

    Pillow's encoder goes through whatever zlib it was built with (zlib, zlib-ng), so its bytes
    change between installs. This writer stores the pixels uncompressed: as a palette image with
    the smallest bit depth when there are at most 256 colors (sorted palette), else as 8-bit RGB.
    """
    img = img.convert("RGB")
    w, h = img.size
    pixels = list(img.getdata())
    colors = sorted(set(pixels))
    header = b"\x89PNG\r\n\x1a\n"
    if len(colors) <= 256:
        bits = next(b for b in (1, 2, 4, 8) if len(colors) <= 1 << b)
        index = {c: i for i, c in enumerate(colors)}
        per_byte = 8 // bits
        raw = bytearray()
        for y in range(h):
            raw.append(0)                                        # filter: none
            row = [index[c] for c in pixels[y * w:(y + 1) * w]]
            for x0 in range(0, w, per_byte):
                byte = 0
                for k, v in enumerate(row[x0:x0 + per_byte]):
                    byte |= v << (8 - bits * (k + 1))
                raw.append(byte)
        ihdr = struct.pack(">IIBBBBB", w, h, bits, 3, 0, 0, 0)
        plte = b"".join(bytes(c) for c in colors)
        body = _chunk(b"IHDR", ihdr) + _chunk(b"PLTE", plte)
    else:
        raw = bytearray()
        for y in range(h):
            raw.append(0)
            for c in pixels[y * w:(y + 1) * w]:
                raw += bytes(c)
        body = _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    return header + body + _chunk(b"IDAT", _stored_zlib(bytes(raw))) + _chunk(b"IEND", b"")
