"""A block source that waits before each read: makes a grid's tasks long enough to kill a worker mid-run."""
from __future__ import annotations

import time


class DelayedBlocks:
    """Wraps a :class:`driftlens.engine.BlockSource`; every read sleeps ``delay`` seconds first."""

    def __init__(self, source, delay: float = 0.2):
        self.source, self.delay = source, float(delay)

    def read(self, site, checkpoint, layer):
        """The wrapped source's block, ``delay`` seconds later."""
        time.sleep(self.delay)
        return self.source.read(site, checkpoint, layer)
