"""The installed version, read from the package metadata (the one place it is written: pyproject.toml)."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("driftlens")
except PackageNotFoundError:  # pragma: no cover - a source tree that was never installed
    __version__ = "0+unknown"
