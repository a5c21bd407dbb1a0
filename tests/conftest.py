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
# The suite runs its unit tier beside the organism's background build on 2 cores. OpenMP's default
# wait policy keeps idle threads spinning after a parallel region (and after a test's
# torch.set_num_threads), which made small torch ops 40-100x slower under that contention; a passive
# wait costs nothing here and changes no number. Set before anything imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def pytest_collection_modifyitems(config, items):
    _skip_gpu_tests_without_cuda(items)
    # the organism-building (slow) tests, then the notebooks, last: the organism builds in the
    # background (pytest_collection_finish) while everything else runs
    items.sort(key=lambda item: 2 if item.path.suffix == ".ipynb" else 1 if "slow" in item.keywords else 0)


def _skip_gpu_tests_without_cuda(items) -> None:
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


def pytest_collection_finish(session):
    """Start building the organism (``slow`` tests and notebooks need it) in a background process.

    The build is CPU-bound for minutes; run beside the unit and integration tests it overlaps
    them instead of following them. The ``organisms`` fixture waits for it (see
    tests/integration/conftest.py); a build already in the cache is only loaded.
    """
    needs = any("slow" in item.keywords or item.path.suffix == ".ipynb" for item in session.items)
    if not needs or session.config.option.collectonly:
        return
    import subprocess
    import sys

    cache = os.environ["DRIFTLENS_TEST_CACHE"]
    log = open(os.path.join(cache, "background-build.log"), "w")  # noqa: SIM115 - closed by pytest_unconfigure
    code = ("from driftlens import organism\n"
            "from driftlens.organism.demo import DEMO_SEEDS\n"
            f"organism.build_seeds(DEMO_SEEDS, cache={cache!r}, progress=False)\n")
    session.config._driftlens_build = (subprocess.Popen([sys.executable, "-c", code], stdout=log,
                                                        stderr=subprocess.STDOUT), log)


def pytest_runtest_setup(item):
    if item.path.suffix == ".ipynb":     # a notebook builds the organism itself when absent: not beside us
        wait_for_background_build(item.config)


def wait_for_background_build(config) -> None:
    """Block until the session's background organism build ends; raise with its log if it failed."""
    started = getattr(config, "_driftlens_build", None)
    if started is None:
        return
    proc, log = started
    code = proc.wait()
    log.flush()
    if code != 0:
        text = open(log.name).read()[-4000:]
        raise RuntimeError(f"the background organism build failed (exit {code}):\n{text}")


def pytest_configure(config):
    if not os.environ.get("DRIFTLENS_TEST_CACHE"):
        folder = tempfile.mkdtemp(prefix="driftlens-test-cache-")
        os.environ["DRIFTLENS_TEST_CACHE"] = folder
        config._driftlens_temporary_cache = folder
    os.environ["DRIFTLENS_CACHE"] = os.environ["DRIFTLENS_TEST_CACHE"]


def pytest_unconfigure(config):
    started = getattr(config, "_driftlens_build", None)
    if started is not None:
        proc, log = started
        if proc.poll() is None:          # interrupted run: do not leave the build behind
            proc.kill()
            proc.wait()
        log.close()
    folder = getattr(config, "_driftlens_temporary_cache", None)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)
