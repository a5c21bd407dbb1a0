"""Checkpoint sources: where the weights of one point of the trajectory come from.

A source is one of

- an ``nn.Module`` already in memory (used as is);
- a transformers model directory (``config.json`` + ``*.safetensors``), loaded with
  ``from_pretrained``;
- a PEFT adapter directory (``adapter_config.json``), applied on a fresh copy of the base
  model and merged;
- a checkpoint composed of other sources (:class:`ComposedSource`): a merge of a base and an adapted
  model, :class:`driftlens.merges.Merge`. This module knows it only through that protocol -- it
  asks the object for its kind, description, checks, identity and weights -- and never imports
  :mod:`driftlens.merges` (which builds on this module). A merge's source string
  ``merge:METHOD:ALPHA[,density=D][,seed=S]:[BASE:]ADAPTED`` is parsed by
  :func:`driftlens.merges.as_source`, which :func:`driftlens.capture.capture` applies to its
  checkpoints before anything here sees them; here such a string is a path like any other.

A path-like string that is not a folder here but reads as a Hugging Face Hub id (``org/name``,
optionally pinned: ``org/name@REVISION``, a branch, tag or commit) is resolved through
``huggingface_hub``'s cache (:func:`resolve_source`): offline (``HF_HUB_OFFLINE=1``) only from
the cache, otherwise downloaded into it -- safetensors and configs only, no pickle weights unless
``allow_pickle`` and no ``.py`` files unless ``trust_remote_code``. The checkpoint's identity
records the repository, the revision asked for and the commit it resolved to.

Loading is safe by default: safetensors only (a directory holding only pickle weights is
refused unless ``allow_pickle=True``), ``trust_remote_code=False`` unless the user asks.
"""
from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

from driftlens.errors import ArgumentTypeError, DataError, UsageError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class SourceError(DataError):
    """A checkpoint source cannot be loaded; the message names it."""


@runtime_checkable
class ComposedSource(Protocol):
    """A checkpoint made from other sources, which describes, checks, identifies and loads itself.

    :class:`driftlens.merges.Merge` is one (``kind == "merge"``). Its parts are plain sources (a
    module, a model or adapter directory), never composed ones, so the functions here ask it and it
    calls them back on its parts: one level deep.
    """

    #: what :func:`source_kind` returns for it
    kind: str

    def spec(self) -> str:
        """Its source string (what :func:`describe` shows)."""

    def check(self, model=None) -> None:
        """Refuse parts that are not sources of the right kind (raises :class:`SourceError` or a UsageError)."""

    def identity(self, model=None) -> dict:
        """What a store records about it (with ``"kind"`` and ``"fingerprint"``); ``model``: the capture's MODEL."""

    def materialize(self, model=None, cache: dict | None = None, allow_pickle: bool = False,
                    trust_remote_code: bool = False):
        """Its weights as an ``nn.Module`` in eval mode; ``model``: the capture's MODEL."""


#: ``org/name`` or ``org/name@revision``: what a hub id looks like (a local folder of that name wins).
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?$")
#: files of a hub repository that capture needs (weights, configs, tokenizer and processor files)
HUB_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken", "*.py", "*.bin",
                "*.pt", "*.pth")


def hub_id(source) -> tuple[str, str | None] | None:
    """``(repo_id, revision or None)`` when ``source`` reads as a hub id and is not a path here, else None."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    text = os.fspath(source)
    match = HUB_ID.match(text)
    if match is None or Path(text).expanduser().exists() or ".." in text.split("@")[0].split("/"):
        return None
    return match["repo"], match["revision"]


def hub_snapshot(path) -> dict | None:
    """``{"repo_id", "commit"}`` when ``path`` is a snapshot folder of a hub cache
    (``.../models--ORG--NAME/snapshots/COMMIT``), else None."""
    parts = Path(path).parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return {"repo_id": parts[-3][len("models--"):].replace("--", "/"), "commit": parts[-1]}
    return None


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def resolve_source(source, *, allow_pickle: bool = False, trust_remote_code: bool = False,
                   local_files_only: bool | None = None):
    """A checkpoint source with hub ids replaced by their snapshot folder in the hub cache.

    A module or an existing path is returned as is. ``org/name[@revision]`` that is not a path here
    is resolved with ``huggingface_hub.snapshot_download``: from the cache only when
    ``local_files_only`` (default: when ``HF_HUB_OFFLINE`` is set), otherwise downloading what is
    missing -- configs, tokenizer files and safetensors weights; pickle weights only with
    ``allow_pickle``, Python files only with ``trust_remote_code``. The folder is then checked like
    any model folder (safetensors only, no ``auto_map`` without ``trust_remote_code``).

    Raises
    ------
    SourceError
        In one line: the model is neither a folder here nor in the cache (naming the cache, the
        command that downloads it and ``HF_HOME``), the hub has no such repository or revision,
        or the hub could not be reached.
    """
    parsed = hub_id(source)
    if parsed is None:
        return source
    repo, revision = parsed
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError as exc:           # pragma: no cover - transformers depends on it
        raise SourceError(f"{source}: not a folder here, and huggingface_hub is missing to look it up as a hub "
                          f"id ({exc})") from None
    offline = _offline() if local_files_only is None else bool(local_files_only)
    patterns = [p for p in HUB_PATTERNS if (allow_pickle or p not in ("*.bin", "*.pt", "*.pth"))
                and (trust_remote_code or p != "*.py")]
    get = f"`hf download {repo}{f' --revision {revision}' if revision else ''}`"
    try:
        path = snapshot_download(repo, revision=revision, local_files_only=offline, allow_patterns=patterns)
    except RevisionNotFoundError:
        raise SourceError(f"{source}: the hub repository {repo} has no revision {revision!r} (a branch, tag or "
                          f"commit)") from None
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise SourceError(f"{source} is not a folder here, and the hub has no model {repo} you can read "
                          f"({type(exc).__name__}; a gated or private model needs `hf auth login`)") from None
    except LocalEntryNotFoundError:
        cache = constants.HF_HUB_CACHE
        why = "HF_HUB_OFFLINE is set" if offline else "the hub could not be reached"
        raise SourceError(f"{source} is not a folder here nor in the Hugging Face cache {cache} ({why}): download "
                          f"it with {get} (or `huggingface-cli download {repo}`), or set HF_HOME / HF_HUB_CACHE "
                          f"to the cache that has it") from None
    except (OSError, ValueError) as exc:
        raise SourceError(f"{source}: cannot fetch it from the hub into its cache ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}); download it with {get}") from None
    return Path(path)


def hub_record(source, resolved) -> dict | None:
    """What a checkpoint's identity records about a hub source: repository, revision asked for, commit."""
    parsed = hub_id(source)
    snap = hub_snapshot(resolved) if isinstance(resolved, (str, os.PathLike)) else None
    if parsed is None or snap is None:
        return None
    return {"repo_id": parsed[0], "revision": parsed[1] or "main", "commit": snap["commit"]}


def describe(source) -> str:
    """A short human-readable description of a source (for messages and attrs)."""
    if isinstance(source, (str, Path)):
        return str(source)
    if isinstance(source, ComposedSource):
        return source.spec()
    return f"<in-memory {type(source).__name__}>"


def source_kind(source) -> str:
    """``"module"``, ``"model_dir"``, ``"adapter_dir"`` or a composed source's kind (``"merge"``, after
    its checks); raises :class:`SourceError`."""
    import torch

    if isinstance(source, torch.nn.Module):
        return "module"
    if isinstance(source, ComposedSource):
        source.check()
        return source.kind
    if not isinstance(source, (str, Path)):
        raise SourceError(
            f"checkpoint source {source!r} is neither an nn.Module nor a directory path"
        )
    path = Path(source)
    if not path.exists():
        hint = "" if os.path.isabs(path) else " (a Hugging Face Hub id is org/name or org/name@revision)"
        raise SourceError(f"checkpoint directory {path} does not exist{hint}")
    if not path.is_dir():
        raise SourceError(f"checkpoint source {path} is not a directory")
    if (path / "adapter_config.json").exists():
        return "adapter_dir"
    if (path / "config.json").exists():
        return "model_dir"
    raise SourceError(
        f"checkpoint directory {path} holds neither config.json (a transformers model) "
        f"nor adapter_config.json (a PEFT adapter); it has: {sorted(p.name for p in path.iterdir())[:10]}"
    )


def _check_weights(path: Path, allow_pickle: bool, adapter: bool) -> bool:
    """Return True when safetensors weights are present; refuse pickle-only dirs."""
    safe = list(path.glob("*.safetensors"))
    pickles = [p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if safe:
        return True
    if pickles and not allow_pickle:
        raise SourceError(
            f"{path} holds only pickle weights ({', '.join(p.name for p in pickles)}); "
            "unpickling can run arbitrary code, so driftlens refuses it. Convert the checkpoint "
            "to safetensors, or pass allow_pickle=True if you trust the file."
        )
    if not pickles:
        what = "adapter weights (adapter_model.safetensors)" if adapter else "weights (*.safetensors)"
        raise SourceError(f"{path} holds no {what}")
    return False


#: Files of a model folder whose ``auto_map`` makes transformers import the folder's own Python code.
REMOTE_CODE_FILES = ("config.json", "processor_config.json", "preprocessor_config.json", "tokenizer_config.json",
                     "video_preprocessor_config.json", "feature_extractor_config.json", "image_processor_config.json")


def check_remote_code(path, trust_remote_code: bool) -> None:
    """Refuse a folder that ships its own model code (an ``auto_map``) unless the user trusts it.

    transformers imports the ``.py`` files an ``auto_map`` names -- and, asked without an explicit
    ``trust_remote_code``, may prompt on stdin and run them on a ``y``. driftlens passes the flag
    explicitly to every loader and refuses such a folder up front, naming it and the flag, so no
    code from it runs and no prompt can appear.
    """
    if trust_remote_code:
        return
    import json

    path = Path(path)
    for name in REMOTE_CODE_FILES:
        f = path / name
        if not f.is_file():
            continue
        try:
            body = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue                      # unreadable: the loader reports it
        auto = body.get("auto_map") if isinstance(body, dict) else None
        if auto:
            named = ", ".join(sorted(map(str, auto.values() if isinstance(auto, dict) else auto)))[:200]
            raise SourceError(
                f"{path} ships its own Python code ({name} has an auto_map: {named}); driftlens runs no code "
                f"from a model folder unless you pass --trust-remote-code (trust_remote_code=True in Python) "
                f"-- do so only if you trust that folder"
            )


def load_config(path, trust_remote_code: bool = False):
    """A model folder's config (``AutoConfig``, offline; no code from the folder unless trusted)."""
    from transformers import AutoConfig

    path = Path(path)
    if not (path / "config.json").exists():
        raise SourceError(f"model directory {path} has no config.json")
    check_remote_code(path, trust_remote_code)
    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SourceError(f"cannot read the model config in {path}: {exc}") from exc


def load_model_dir(path, allow_pickle: bool = False, trust_remote_code: bool = False, dtype=None):
    """Load a transformers image-text-to-text model from a local directory (no network).

    A folder that ships its own code is refused unless ``trust_remote_code`` (:func:`check_remote_code`).
    """
    from transformers import AutoModelForImageTextToText

    path = Path(path)
    check_remote_code(path, trust_remote_code)
    safe = _check_weights(path, allow_pickle, adapter=False)
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            str(path), use_safetensors=safe, trust_remote_code=trust_remote_code,
            local_files_only=True, **({"dtype": dtype} if dtype is not None else {}),
        )
    except Exception as exc:  # noqa: BLE001 - safetensors, json, torch and config errors alike
        raise SourceError(f"cannot load the model in {path}: {type(exc).__name__}: {exc}") from exc
    return model.eval()


_IMAGE_ONLY: dict = {}


def image_only_processor(cls):
    """A subclass of processor ``cls`` with the same name that leaves out ``video_processor``
    from its parts (init checks, save and ``from_pretrained``); cached per class.

    transformers 5 makes a video processor mandatory for Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision
    and InternVL processors, and video processors need torchvision; driftlens only feeds images.
    """
    if cls not in _IMAGE_ONLY:
        attrs = [a for a in cls.get_attributes() if a != "video_processor"]
        _IMAGE_ONLY[cls] = type(cls.__name__, (cls,), {
            "__module__": cls.__module__, "__doc__": cls.__doc__,
            "get_attributes": classmethod(lambda c, _a=tuple(attrs): list(_a)),
            "video_processor": None,
        })
    return _IMAGE_ONLY[cls]


def load_processor(path, trust_remote_code: bool = False):
    """Load the processor saved beside a model, offline.

    ``AutoProcessor.from_pretrained(path, local_files_only=True)``, except that without
    torchvision a processor class that takes a video processor is loaded image-only (same
    class name, image processor, tokenizer and chat template).
    """
    import json

    import transformers
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    path = Path(path)
    check_remote_code(path, trust_remote_code)
    config = path / "processor_config.json"
    try:
        if not is_torchvision_available() and config.is_file():
            name = json.loads(config.read_text()).get("processor_class") or ""
            cls = getattr(transformers, name, None)
            if cls is not None and "video_processor" in cls.get_attributes():
                return image_only_processor(cls).from_pretrained(str(path), local_files_only=True,
                                                                 trust_remote_code=trust_remote_code)
        return AutoProcessor.from_pretrained(str(path), local_files_only=True,
                                             trust_remote_code=trust_remote_code)
    except (OSError, ValueError, ImportError) as exc:
        raise SourceError(f"cannot load a processor from {path}: {exc}; pass processor=") from exc


def adapter_base_name(path) -> str | None:
    """The ``base_model_name_or_path`` an adapter's ``adapter_config.json`` records (None if absent)."""
    import json

    try:
        body = json.loads((Path(path) / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    name = body.get("base_model_name_or_path") if isinstance(body, dict) else None
    return str(name) if name else None


def _size_mismatch(text: str) -> str | None:
    """``"N tensors, e.g. NAME: adapter [a, b], base [c, d]"`` from a PyTorch size-mismatch dump, else None."""
    import re

    found = re.findall(r"size mismatch for ([^:]+): copying a param with shape torch\.Size\(\[([^\]]*)\]\) "
                       r"from checkpoint, the shape in current model is torch\.Size\(\[([^\]]*)\]\)", text)
    if not found:
        return None
    name, have, want = found[0]
    return f"{len(found)} tensor(s) differ in shape, e.g. {name}: adapter [{have}], base [{want}]"


def apply_adapter(base, path, allow_pickle: bool = False, base_name: str | None = None):
    """A fresh copy of ``base`` with the PEFT adapter in ``path`` applied and merged.

    The adapter config is read from its JSON (PEFT runs no code from an adapter folder). An adapter
    trained on a base of other shapes is refused in one line naming the adapter, the base it records
    and ``base_name`` (the base it was applied to).
    """
    from peft import PeftConfig, PeftModel

    path = Path(path)
    safe = _check_weights(path, allow_pickle, adapter=True)
    try:
        config = PeftConfig.from_pretrained(str(path))
    except Exception as exc:  # noqa: BLE001 - json, unknown peft_type, missing fields alike
        raise SourceError(f"cannot read the PEFT adapter config in {path}: {type(exc).__name__}: {exc}") from exc
    model = copy.deepcopy(base)
    try:
        peft_model = PeftModel.from_pretrained(model, str(path), config=config, use_safetensors=safe)
    except Exception as exc:  # noqa: BLE001 - safetensors, json, shape and key errors alike
        shapes = _size_mismatch(str(exc))
        if shapes is not None:
            raise SourceError(f"the PEFT adapter {path} does not fit the base model {base_name or ''}: {shapes}; "
                              f"it was trained on {adapter_base_name(path) or 'another base'} (adapter_config.json "
                              f"base_model_name_or_path) -- pass that base as MODEL") from exc
        raise SourceError(f"cannot apply the PEFT adapter in {path} to the base model: "
                          f"{type(exc).__name__}: {exc}") from exc
    return peft_model.merge_and_unload().eval()


def load_source(source, base=None, allow_pickle: bool = False, trust_remote_code: bool = False,
                base_name: str | None = None, cache: dict | None = None):
    """Materialize one checkpoint source as an ``nn.Module`` in eval mode.

    Parameters
    ----------
    source : nn.Module, path or ComposedSource (a Merge)
        See the module docstring.
    base : nn.Module, optional
        The base model PEFT adapters are applied to (and merges merged into when they name no base).
    base_name : str, optional
        How messages name that base (its directory).
    cache : dict, optional
        Keeps what merges load (their base and adapted weights) between the points of a sweep.
    """
    kind = source_kind(source)
    if kind == "module":
        return source.eval()
    if isinstance(source, ComposedSource):
        return source.materialize(base, cache, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    if kind == "model_dir":
        return load_model_dir(source, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    if base is None:
        raise SourceError(
            f"{source} is a PEFT adapter; it needs a base model (pass the base as `model`)"
        )
    return apply_adapter(base, source, allow_pickle=allow_pickle, base_name=base_name)


def normalize_checkpoints(model, checkpoints) -> dict:
    """The ordered mapping label -> source (a single model becomes ``{"model": model}``).

    Sources are passed through as given: a ``merge:...`` string becomes a Merge in
    :func:`driftlens.merges.as_source`, which the capture applies to this mapping.
    """
    if checkpoints is None:
        return {"model": model}
    if not isinstance(checkpoints, Mapping):
        raise ArgumentTypeError("checkpoints must be an ordered mapping label -> source (e.g. a dict)")
    if not checkpoints:
        raise UsageError("checkpoints is empty")
    for label in checkpoints:
        if not isinstance(label, str) or not label:
            raise UsageError(f"checkpoint labels must be non-empty strings, got {label!r}")
    return dict(checkpoints)


# ---------------------------------------------------------------------------------------------
# identity: what a checkpoint label is bound to in a store
# ---------------------------------------------------------------------------------------------

_SAMPLE_BLOCKS = 16          # blocks of 64 KiB read per weight file, spread over the file
_SAMPLE_BYTES = 2**16
_WHOLE_FILE = 64 * 2**20     # files up to this size (adapters) are hashed whole


def _file_digest(h, f: Path) -> None:
    """Feed ``f``'s name, size, safetensors header and sampled content into hash ``h``."""
    size = f.stat().st_size
    h.update(f"{f.name}\0{size}\0".encode())
    with open(f, "rb") as fh:
        if size <= _WHOLE_FILE:
            while block := fh.read(2**24):
                h.update(block)
            return
        if f.suffix == ".safetensors":          # the header: tensor names, dtypes, shapes, offsets
            n = int.from_bytes(fh.read(8), "little")
            h.update(fh.read(min(n, 2**26)))
        for k in range(_SAMPLE_BLOCKS):          # spread samples of the weights themselves
            fh.seek((size - _SAMPLE_BYTES) * k // (_SAMPLE_BLOCKS - 1))
            h.update(fh.read(_SAMPLE_BYTES))


def _module_digest(h, module) -> None:
    """Feed every parameter's name, shape, dtype and strided sample of values into ``h``."""
    import torch

    with torch.no_grad():
        for name, t in sorted(module.state_dict().items()):
            flat = t.detach().reshape(-1)
            step = max(1, flat.numel() // 4096)
            h.update(f"{name}\0{tuple(t.shape)}\0{t.dtype}\0".encode())
            h.update(flat[::step].to("cpu", torch.float32).numpy().tobytes())


def fingerprint(source) -> str:
    """A cheap fingerprint of a checkpoint's weights (16 hex digits).

    A directory: the names, sizes and safetensors headers of its weight files and 16 blocks of
    64 KiB spread over each (files up to 64 MiB, such as adapters, are hashed whole) -- about
    1 MiB read per weight file. An ``nn.Module``: every parameter's name, shape, dtype and 4096
    evenly strided values. Two checkpoints of one fine-tuning run differ in it; copying or
    moving a directory does not change it. A composed source (a merge): its own identity's
    fingerprint (a merge's recipe and both parts; its base must be named).
    """
    import hashlib

    h = hashlib.sha256()
    kind = source_kind(source)
    if isinstance(source, ComposedSource):      # its recipe and parts (a merge that names its base)
        return source.identity()["fingerprint"]
    if kind == "module":
        _module_digest(h, source)
    else:
        path = Path(source)
        weights = sorted(p for p in path.iterdir() if p.is_file() and
                         (p.suffix == ".safetensors" or p.suffix in PICKLE_SUFFIXES))
        for name in ("adapter_config.json", "config.json"):
            if (path / name).is_file():
                weights.append(path / name)
        for f in weights:
            _file_digest(h, f)
    return h.hexdigest()[:16]


def identity(source, base=None) -> dict:
    """What a store records about a checkpoint's source: kind, path, fingerprint (and base's for adapters;
    a merge's recipe and both parts' fingerprints, :func:`driftlens.merges.identity`)."""
    kind = source_kind(source)
    if isinstance(source, ComposedSource):
        return source.identity(base)
    out = {"kind": kind, "source": describe(source) if kind == "module" else str(Path(source).resolve()),
           "fingerprint": fingerprint(source)}
    snap = hub_snapshot(source) if kind != "module" else None
    if snap is not None:
        out["hub"] = snap
    if kind == "adapter_dir" and base is not None:
        out["base"] = describe(base) if not isinstance(base, (str, Path)) else str(Path(base).resolve())
        out["base_fingerprint"] = fingerprint(base)
        base_snap = hub_snapshot(base) if isinstance(base, (str, Path)) else None
        if base_snap is not None:
            out["base_hub"] = base_snap
    return out
