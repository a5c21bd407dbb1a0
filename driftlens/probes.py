"""Probe sets: the images and prompts a capture runs through every checkpoint.

A probe set is a folder with a ``manifest.jsonl`` (one JSON object per line) and its images::

    {"id": "s03-en-caption", "image": "images/s03.png", "lang": "en",
     "prompt": "Describe the image.", "answer": "a red circle at the top left.", "group": "red-circle-top-left"}

``image`` is relative to the manifest; ``answer`` is the reference answer or caption; probes
that share an image (its English and Korean twins) share ``group``. Shipped sets live in
``driftlens/data/probes/<name>/``; see that folder's README.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

FIELDS = ("id", "image", "lang", "prompt", "answer", "group")
CAPTION_PROMPTS = {"en": "Describe the image.", "ko": "이미지를 설명하세요."}


class ProbeError(ValueError):
    """A probe set is missing, malformed or points at a bad image; the message names it."""


@dataclass(frozen=True)
class Probe:
    """One image + prompt (+ reference answer) in one language."""

    id: str
    image: str
    lang: str
    prompt: str
    answer: str
    group: str


def _shipped_root() -> Path:
    return Path(str(resources.files("driftlens") / "data" / "probes"))


def list_probe_sets() -> list[str]:
    """Names of the probe sets shipped with driftlens."""
    root = _shipped_root()
    return sorted(p.name for p in root.iterdir() if (p / "manifest.jsonl").is_file()) if root.is_dir() else []


def _resolve(name_or_path) -> Path:
    path = Path(name_or_path)
    if path.suffix == ".jsonl" or path.exists():
        manifest = path / "manifest.jsonl" if path.is_dir() else path
        if not manifest.is_file():
            raise ProbeError(f"no probe manifest at {manifest}")
        return manifest
    manifest = _shipped_root() / str(name_or_path) / "manifest.jsonl"
    if not manifest.is_file():
        raise ProbeError(
            f"unknown probe set {str(name_or_path)!r}: not a shipped set ({', '.join(list_probe_sets()) or 'none'}) "
            "and not a path to a manifest.jsonl or a folder holding one"
        )
    return manifest


def _parse(manifest: Path) -> list[Probe]:
    items, seen = [], {}
    for n, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{manifest}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ProbeError(f"{where}: malformed JSON ({exc.msg})") from exc
        if not isinstance(obj, dict):
            raise ProbeError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        missing = [f for f in FIELDS if f not in obj]
        if missing:
            raise ProbeError(f"{where}: missing field(s) {missing}; a probe needs {list(FIELDS)}")
        bad = [f for f in FIELDS if not isinstance(obj[f], str) or (f != "answer" and not obj[f])]
        if bad:
            raise ProbeError(f"{where}: field(s) {bad} must be non-empty strings")
        if obj["id"] in seen:
            raise ProbeError(f"{where}: duplicate id {obj['id']!r} (first on line {seen[obj['id']]})")
        seen[obj["id"]] = n
        image = manifest.parent / obj["image"]
        if not image.is_file():
            raise ProbeError(f"{where}: image {obj['image']!r} not found (looked for {image})")
        items.append(Probe(**{f: obj[f] for f in FIELDS}))
    if not items:
        raise ProbeError(f"{manifest} holds no probes")
    return items


class ProbeSet:
    """An ordered, validated set of probes.

    Parameters
    ----------
    manifest : Path
        The ``manifest.jsonl``; use :meth:`load` to go from a name or folder.
    """

    def __init__(self, manifest: Path, name: str | None = None):
        self.manifest = Path(manifest)
        self.root = self.manifest.parent
        self.name = name or self.root.name
        self.items = _parse(self.manifest)
        self._fingerprint: str | None = None

    @classmethod
    def load(cls, name_or_path) -> "ProbeSet":
        """A shipped set by name (``"shapes-bilingual"``), or a manifest path or folder."""
        if isinstance(name_or_path, ProbeSet):
            return name_or_path
        return cls(_resolve(name_or_path))

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Probe]:
        return iter(self.items)

    def __getitem__(self, i: int) -> Probe:
        return self.items[i]

    def __repr__(self) -> str:
        langs = sorted({p.lang for p in self.items})
        return (f"ProbeSet({self.name!r}: {len(self)} probes, {len({p.group for p in self.items})} groups, "
                f"langs {langs}, {self.root})")

    @property
    def fingerprint(self) -> str:
        """sha256 over the manifest bytes and every image's bytes (in manifest order)."""
        if self._fingerprint is None:
            h = hashlib.sha256(self.manifest.read_bytes())
            for rel in dict.fromkeys(p.image for p in self.items):
                h.update(rel.encode())
                h.update((self.root / rel).read_bytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def image(self, probe):
        """The probe's image as an RGB ``PIL.Image`` (index or :class:`Probe`)."""
        from PIL import Image, UnidentifiedImageError

        p = self.items[probe] if isinstance(probe, int) else probe
        path = self.root / p.image
        try:
            with Image.open(path) as im:
                im.load()
                return im.convert("RGB")
        except FileNotFoundError as exc:
            raise ProbeError(f"probe {p.id!r}: image {path} is missing") from exc
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise ProbeError(f"probe {p.id!r}: image {path} is corrupt or not an image ({exc})") from exc

    def validate(self) -> None:
        """Open every image once; raises :class:`ProbeError` naming the first bad file."""
        for p in dict((q.image, q) for q in self.items).values():
            self.image(p)


def write_manifest(path: Path, probes) -> Path:
    """Write probes (``Probe`` objects or dicts) as a manifest.jsonl; returns the path."""
    lines = [json.dumps(asdict(p) if isinstance(p, Probe) else p, ensure_ascii=False) for p in probes]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def make_shapes_probes(out_dir, seed: int = 0, n_scenes: int = 16, size: int = 64) -> Path:
    """Regenerate the ``shapes-bilingual`` probe set from a seed.

    ``n_scenes`` distinct scenes (held-out combinations first, see
    :func:`driftlens.shapes.split_scenes`), each drawn once; per scene and language a caption
    probe and a color-question probe. Byte-identical for the same arguments.

    Returns
    -------
    Path
        The manifest.
    """
    import random

    from driftlens import shapes

    train, held = shapes.split_scenes(seed=0)
    rng = random.Random(seed)
    pool = rng.sample(held, len(held)) + rng.sample(train, len(train))
    if not 1 <= n_scenes <= len(pool):
        raise ValueError(f"n_scenes must be in 1..{len(pool)}, got {n_scenes}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    probes = []
    for k, scene in enumerate(pool[:n_scenes]):
        rel = f"images/s{k:02d}.png"
        shapes.render(scene, size=size, seed=seed * 1000 + k).save(out / rel, format="PNG", optimize=False)
        for lang in shapes.LANGS:
            probes.append(Probe(f"s{k:02d}-{lang}-caption", rel, lang, CAPTION_PROMPTS[lang],
                                shapes.caption(scene, lang), scene.key))
            q = shapes.questions(scene, lang)[0]      # color
            probes.append(Probe(f"s{k:02d}-{lang}-color", rel, lang, q.prompt, q.answer, scene.key))
    return write_manifest(out / "manifest.jsonl", probes)
