"""Test tiers (see tests/README.md): unit (no model), integration (tiny random models,
the organism), notebooks (executed by nbmake). Tests marked ``gpu`` skip without CUDA.

One organism cache serves the whole session, never the user's: ``$DRIFTLENS_TEST_CACHE`` when set,
else a temporary folder removed at the end. It is also the session's ``$DRIFTLENS_CACHE``, which
the notebooks' kernels inherit, so the notebooks (run after tests/) find the organism the slow
tests built.
"""
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch missing means nothing runs anyway
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config):
    if not os.environ.get("DRIFTLENS_TEST_CACHE"):
        folder = tempfile.mkdtemp(prefix="driftlens-test-cache-")
        os.environ["DRIFTLENS_TEST_CACHE"] = folder
        config._driftlens_temporary_cache = folder
    os.environ["DRIFTLENS_CACHE"] = os.environ["DRIFTLENS_TEST_CACHE"]


def pytest_unconfigure(config):
    folder = getattr(config, "_driftlens_temporary_cache", None)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)
