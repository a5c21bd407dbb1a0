"""Checkpoint sources: where the weights of one point of the trajectory come from.

A source is one of

- an ``nn.Module`` already in memory (used as is);
- a transformers model directory (``config.json`` + ``*.safetensors``), loaded with
  ``from_pretrained``;
- a PEFT adapter directory (``adapter_config.json``), applied on a fresh copy of the base
  model and merged.

Loading is safe by default: safetensors only (a directory holding only pickle weights is
refused unless ``allow_pickle=True``), ``trust_remote_code=False`` unless the user asks.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class SourceError(ValueError):
    """A checkpoint source cannot be loaded; the message names it."""


def describe(source) -> str:
    """A short human-readable description of a source (for messages and attrs)."""
    if isinstance(source, (str, Path)):
        return str(source)
    return f"<in-memory {type(source).__name__}>"


def source_kind(source) -> str:
    """``"module"``, ``"model_dir"`` or ``"adapter_dir"``; raises :class:`SourceError`."""
    import torch

    if isinstance(source, torch.nn.Module):
        return "module"
    if not isinstance(source, (str, Path)):
        raise SourceError(
            f"checkpoint source {source!r} is neither an nn.Module nor a directory path"
        )
    path = Path(source)
    if not path.exists():
        raise SourceError(f"checkpoint directory {path} does not exist")
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


def load_model_dir(path, allow_pickle: bool = False, trust_remote_code: bool = False, dtype=None):
    """Load a transformers image-text-to-text model from a local directory (no network)."""
    from transformers import AutoModelForImageTextToText

    path = Path(path)
    safe = _check_weights(path, allow_pickle, adapter=False)
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            str(path), use_safetensors=safe, trust_remote_code=trust_remote_code,
            local_files_only=True, **({"dtype": dtype} if dtype is not None else {}),
        )
    except (OSError, ValueError) as exc:
        raise SourceError(f"cannot load the model in {path}: {exc}") from exc
    return model.eval()


def load_processor(path, trust_remote_code: bool = False):
    """Load the processor saved beside a model (``AutoProcessor``, local files only)."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(str(path), local_files_only=True,
                                             trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise SourceError(f"cannot load a processor from {path}: {exc}; pass processor=") from exc


def apply_adapter(base, path, allow_pickle: bool = False):
    """A fresh copy of ``base`` with the PEFT adapter in ``path`` applied and merged."""
    from peft import PeftModel

    path = Path(path)
    safe = _check_weights(path, allow_pickle, adapter=True)
    model = copy.deepcopy(base)
    try:
        peft_model = PeftModel.from_pretrained(model, str(path), use_safetensors=safe)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise SourceError(f"cannot apply the PEFT adapter in {path} to the base model: {exc}") from exc
    return peft_model.merge_and_unload().eval()


def load_source(source, base=None, allow_pickle: bool = False, trust_remote_code: bool = False):
    """Materialize one checkpoint source as an ``nn.Module`` in eval mode.

    Parameters
    ----------
    source : nn.Module or path
        See the module docstring.
    base : nn.Module, optional
        The base model PEFT adapters are applied to.
    """
    kind = source_kind(source)
    if kind == "module":
        return source.eval()
    if kind == "model_dir":
        return load_model_dir(source, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    if base is None:
        raise SourceError(
            f"{source} is a PEFT adapter; it needs a base model (pass the base as `model`)"
        )
    return apply_adapter(base, source, allow_pickle=allow_pickle)


def normalize_checkpoints(model, checkpoints) -> dict:
    """The ordered mapping label -> source (a single model becomes ``{"model": model}``)."""
    if checkpoints is None:
        return {"model": model}
    if not isinstance(checkpoints, Mapping):
        raise TypeError("checkpoints must be an ordered mapping label -> source (e.g. a dict)")
    if not checkpoints:
        raise ValueError("checkpoints is empty")
    for label in checkpoints:
        if not isinstance(label, str) or not label:
            raise ValueError(f"checkpoint labels must be non-empty strings, got {label!r}")
    return dict(checkpoints)
