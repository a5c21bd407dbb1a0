"""The installed version, read from the package metadata (the one place it is written: pyproject.toml).

The distribution is ``driftlens-vlm`` (``pip install driftlens-vlm``) while the import package is
``driftlens``: the name ``driftlens`` on the package index belongs to an unrelated project.
"""
from importlib.metadata import PackageNotFoundError, version

#: The name to ``pip install`` (the import package is ``driftlens``).
DISTRIBUTION = "driftlens-vlm"


def install_hint(extra: str | None = None) -> str:
    """The pip command that installs driftlens (with ``extra``), for messages: ``pip install 'driftlens-vlm[x]'``."""
    return f"pip install '{DISTRIBUTION}[{extra}]'" if extra else f"pip install {DISTRIBUTION}"


try:
    __version__ = version(DISTRIBUTION)
except PackageNotFoundError:  # pragma: no cover - a source tree that was never installed
    __version__ = "0+unknown"
