"""Shared fixtures of the integration tier.

The real model organism (three seeds: base, Korean trajectory, English control) is built once
per test session into a temporary cache -- never the user's -- by whichever ``slow`` test needs
it first, so the slow tests do not depend on their order. ``DRIFTLENS_TEST_CACHE=DIR`` points
the session at a cache you choose instead (built there when missing): to rerun the slow tier
without rebuilding, or to run it against a build made with another thread count.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from driftlens import organism
from driftlens.organism.demo import DEMO_SEEDS


@pytest.fixture(scope="session")
def organism_cache():
    return Path(os.environ["DRIFTLENS_TEST_CACHE"])        # set by tests/conftest.py for the session


@pytest.fixture(scope="session")
def organisms(organism_cache, request):
    """The default recipe over the demo's seeds, built (in parallel processes) into the session cache.

    The session started that build in the background when it collected a ``slow`` test
    (tests/conftest.py); this waits for it, then loads the builds.
    """
    from tests.conftest import wait_for_background_build

    wait_for_background_build(request.config)
    return organism.build_seeds(DEMO_SEEDS, cache=organism_cache, progress=False)


@pytest.fixture(scope="session")
def demo_run(organisms, organism_cache, tmp_path_factory):
    """``driftlens demo`` over the session's organisms, run once: ``(output folder, printed text)``."""
    import contextlib
    import io

    from driftlens.cli import main

    out = tmp_path_factory.mktemp("demo") / "demo"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["demo", "--out", str(out), "--cache", str(organism_cache), "--no-progress"])
    assert code == 0
    return out, printed.getvalue()
