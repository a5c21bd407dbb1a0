"""Output files: where they may go, and how they are written.

Two rules hold for every file driftlens writes (reports, rank schedules, figures, summaries,
manifests, JSON):

- **Never inside an input.** :func:`check_output` refuses, before any work, an output path that
  equals an input file or lies inside an input folder (a store, a model or adapter directory),
  after resolving symlinks on both sides, and an output path that is a URL (an fsspec URL such as
  ``memory://`` would be a local folder named ``memory:`` here, or vanish at exit).
- **Atomically.** :func:`atomic_write` (and :func:`atomic_path` for writers that want a file name)
  writes a temporary file with a name unique to this process in the same folder, flushes it to
  disk, then renames it over the target: a reader sees the old file or the new one, never a part;
  a process killed mid-write leaves the old file intact. On a full disk or a file-size limit
  (``ENOSPC``, ``EFBIG``; ``ulimit -f``) the error is an :class:`~driftlens.errors.EnvironmentProblem`
  naming the file, the previous file is unchanged and the temporary file is removed.
"""
from __future__ import annotations

import contextlib
import errno
import os
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from driftlens.errors import DriftlensError, EnvironmentProblem, UsageError

_WHY = {
    errno.ENOSPC: "no space left on the device",
    errno.EFBIG: "the file is larger than this process may write (file-size limit, `ulimit -f`)",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
}


def real(path) -> Path:
    """``path`` with ``~`` expanded, made absolute, every symlink resolved (missing tails kept)."""
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def is_url(path) -> bool:
    """Whether ``path`` is an fsspec URL other than ``file://`` (``s3://``, ``memory://`` ...)."""
    if not isinstance(path, (str, os.PathLike)):
        return hasattr(path, "protocol")                     # a UPath
    text = os.fspath(path)
    return "://" in text and not text.startswith("file://")


def local(path, flag: str = "--out") -> Path:
    """A local output file path; a URL is refused (:class:`~driftlens.errors.UsageError`)."""
    if is_url(path):
        raise UsageError(f"{flag} {path}: a URL cannot receive this file (only activation stores may live at an "
                         f"fsspec URL); give a local path")
    text = os.fspath(path)
    return Path(text[len("file://"):] if text.startswith("file://") else text)


def check_output(out, inputs: Iterable, flag: str = "--out") -> None:
    """Refuse an output path that would replace an input or write into one.

    Parameters
    ----------
    out : path
        The output file or folder.
    inputs : iterable of path or (description, path)
        The inputs of the same command: files (a report, a rank schedule, a manifest) and folders
        (an activation store, a model or adapter directory). ``None`` entries and URLs are skipped.
    flag : str
        How the message names the output (``--out``, ``--plot``, ``out=``).

    Raises
    ------
    driftlens.errors.UsageError
        ``out`` is an input, or lies inside an input folder; the message names both paths.
    """
    if out is None or is_url(out):
        return
    target = real(out)
    for item in inputs:
        what, path = item if isinstance(item, tuple) else ("input", item)
        if path is None or is_url(path):
            continue
        source = real(path)
        if target == source:
            raise UsageError(f"{flag} {out} is the {what} {path}: writing it would destroy the input; "
                             f"choose another output path")
        if source.is_dir() and target.is_relative_to(source):
            raise UsageError(f"{flag} {out} lies inside the {what} {path}: writing there would change or damage "
                             f"the input; choose an output path outside it")


def check_distinct(outputs: dict) -> None:
    """Refuse two outputs of one command that are the same file (``{flag: path}``; None skipped)."""
    seen: dict[Path, str] = {}
    for flag, path in outputs.items():
        if path is None or is_url(path):
            continue
        key = real(path)
        if key in seen:
            raise UsageError(f"{seen[key]} and {flag} name the same file {path}: give each output its own path")
        seen[key] = flag


def write_error(path, exc: OSError) -> DriftlensError:
    """An :class:`~driftlens.errors.EnvironmentProblem` for a failed write of ``path``: the file and why."""
    if isinstance(exc, DriftlensError):
        return exc
    why = _WHY.get(exc.errno) or exc.strerror or str(exc)
    return EnvironmentProblem(f"cannot write {path}: {why}; the previous file (if any) is unchanged")


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:                        # a platform without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path) -> Iterator[Path]:
    """A temporary file name beside ``path``; on a clean exit its file is flushed and renamed to ``path``.

    The writer inside the ``with`` writes the temporary file (any library that takes a file name);
    on an error the temporary file is removed and ``path`` keeps its previous content. An ``OSError``
    (full disk, file-size limit, permissions) becomes an
    :class:`~driftlens.errors.EnvironmentProblem` naming ``path``.
    """
    path = Path(path)
    tmp = _temporary(path)
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            yield tmp
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            raise write_error(path, exc) from exc
        _fsync_dir(path.parent)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def atomic_write(path, data: bytes | str, encoding: str = "utf-8") -> Path:
    """Write ``data`` (bytes, or text in ``encoding``) to ``path`` atomically; returns ``path``."""
    path = Path(path)
    blob = data.encode(encoding) if isinstance(data, str) else bytes(data)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(blob)
        fh.flush()
    return path


__all__ = ["atomic_path", "atomic_write", "check_distinct", "check_output", "is_url", "local", "real",
           "write_error"]
