"""Progress of organism builds, for people at a terminal and for logs.

A build reports ``(stage, step, total, note)`` for its seed through a :class:`Reporter`; a
:class:`Board` shows what every seed is doing. On a terminal it rewrites one status line in place;
anywhere else (a log file, a pipe, a notebook's captured stderr) it writes whole lines only: one
when a seed starts a stage or finishes, and one with every seed's state at least every
:data:`HEARTBEAT` seconds -- never a progress bar's carriage returns. Build worker processes send
their reports to the parent as lines on their stdout (:data:`PREFIX` and JSON), which the parent
reads into its board (:func:`driftlens.organism.train.build_seeds`).
"""
from __future__ import annotations

import json
import sys
import time

PREFIX = "@driftlens-progress "
HEARTBEAT = 15.0     # seconds between status lines when the stream is not a terminal (at most)
THROTTLE = 1.0       # a reporter passes on at most one step update per second (stage changes always)
REDRAW = 0.2         # seconds between redraws of the terminal's status line


class Board:
    """The state of every seed being built, written to ``stream``.

    Parameters
    ----------
    stream : file, optional
        Default ``sys.stderr`` (looked up when the board is made).
    interval : float
        Seconds between status lines when ``stream`` is not a terminal.
    tty : bool, optional
        Whether ``stream`` is a terminal (default: ``stream.isatty()``).
    clock : callable
        Seconds (monotonic); replaced in tests.
    title : str
        Start of every status line.
    """

    def __init__(self, stream=None, *, interval: float = HEARTBEAT, tty: bool | None = None, clock=time.monotonic,
                 title: str = "organism build"):
        self.stream = sys.stderr if stream is None else stream
        if tty is None:
            isatty = getattr(self.stream, "isatty", None)
            tty = bool(isatty()) if callable(isatty) else False
        self.tty, self.interval, self.clock, self.title = tty, float(interval), clock, title
        self.state: dict[int, tuple[str, int, int, str]] = {}
        self.t0 = clock()
        self._last_line = self.t0
        self._last_draw = float("-inf")
        self._drawn = False

    def update(self, seed: int, stage: str, step: int, total: int, note: str = "") -> None:
        """Seed ``seed`` is at ``step`` of ``total`` in ``stage``."""
        previous = self.state.get(seed)
        self.state[seed] = (stage, int(step), int(total), note)
        if previous is None or previous[0] != stage:
            self.line(f"organism seed {seed}: {stage} ({total} {'checkpoints' if stage == 'evaluation' else 'steps'})")
        self.tick()

    def finish(self, seed: int, text: str) -> None:
        """Seed ``seed`` is done (``text``: how it ended)."""
        self.state.pop(seed, None)
        self.line(f"organism seed {seed}: {text}")

    def status(self) -> str:
        """One line: the elapsed time and every running seed's stage, step and note."""
        parts = [f"seed {s} {st} {i}/{n}" + (f" ({note})" if note else "")
                 for s, (st, i, n, note) in sorted(self.state.items())]
        return f"{self.title}, {self.clock() - self.t0:.0f} s: " + ("; ".join(parts) or "waiting")

    def tick(self) -> None:
        """Write the status if it is due (a heartbeat line, or a terminal redraw)."""
        now = self.clock()
        if self.tty:
            if now - self._last_draw >= REDRAW and self.state:
                self._write("\r\x1b[K" + self.status())
                self._last_draw, self._drawn = now, True
        elif now - self._last_line >= self.interval:
            self.line(self.status())

    def line(self, text: str) -> None:
        """Write ``text`` as a line of its own (above the terminal's status line)."""
        self._write(("\r\x1b[K" if self._drawn else "") + text + "\n")
        self._drawn = False
        self._last_line = self.clock()
        self._last_draw = float("-inf")

    def close(self) -> None:
        """End the terminal's status line."""
        if self._drawn:
            self._write("\r\x1b[K")
            self._drawn = False

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


class Reporter:
    """One seed's progress callback: ``reporter(stage, step, total, note="")``.

    Passes a call on to ``sink(seed, stage, step, total, note)`` when the stage changes, at the
    stage's last step, and otherwise at most every :data:`THROTTLE` seconds.
    """

    def __init__(self, seed: int, sink, clock=time.monotonic, throttle: float = THROTTLE):
        self.seed, self.sink, self.clock, self.throttle = int(seed), sink, clock, float(throttle)
        self._stage: str | None = None
        self._last = float("-inf")

    def __call__(self, stage: str, step: int, total: int, note: str = "") -> None:
        """Report ``step`` of ``total`` in ``stage``."""
        now = self.clock()
        if stage != self._stage or step >= total or now - self._last >= self.throttle:
            self._stage, self._last = stage, now
            self.sink(self.seed, stage, step, total, note)


def emit(seed: int, stage: str, step: int, total: int, note: str = "", stream=None) -> None:
    """Write one report as a :data:`PREFIX` line (a build worker's stdout; see :func:`parse`)."""
    stream = sys.stdout if stream is None else stream
    stream.write(PREFIX + json.dumps({"seed": seed, "stage": stage, "step": step, "total": total, "note": note})
                 + "\n")
    stream.flush()


def parse(line: str) -> dict | None:
    """The report in a worker's output line, or None for any other line."""
    if not line.startswith(PREFIX):
        return None
    try:
        event = json.loads(line[len(PREFIX):])
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) and {"seed", "stage", "step", "total"} <= set(event) else None
