"""Build progress: whole lines at least every HEARTBEAT seconds when the stream is not a terminal (no
progress-bar carriage returns in logs), a status line rewritten in place on a terminal; worker
reports round-trip through their stdout lines."""
from __future__ import annotations

import io

from driftlens.organism.progress import HEARTBEAT, Board, Reporter, emit, parse


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_board_writes_whole_lines_at_least_every_heartbeat_off_a_terminal():
    out, clock = io.StringIO(), Clock()
    board = Board(out, tty=False, clock=clock)
    times = []
    for second in range(0, 100):
        clock.t = float(second)
        before = out.getvalue().count("\n")
        stage = "English base" if second < 60 else "Korean adaptation"
        board.update(0, stage, second, 100, "loss 1.0")
        board.update(1, "English base", second // 2, 100)
        times += [second] * (out.getvalue().count("\n") - before)
    board.finish(0, "built in 100 s")
    board.close()
    text = out.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert lines[0] == "organism seed 0: English base (100 steps)"
    assert "organism seed 0: Korean adaptation (100 steps)" in lines and lines[-1] == "organism seed 0: built in 100 s"
    status = [ln for ln in lines if ln.startswith("organism build, ")]
    assert status and "seed 0 English base" in status[0] and "seed 1 English base" in status[0]
    gaps = [b - a for a, b in zip([0, *times], [*times, 99])]
    assert max(gaps) <= HEARTBEAT and len(lines) < 20                  # a line per heartbeat, not per step


def test_board_rewrites_one_status_line_on_a_terminal():
    out, clock = io.StringIO(), Clock()
    board = Board(out, tty=True, clock=clock)
    for i in range(10):
        clock.t = i * 0.5
        board.update(2, "evaluation", i, 11, "ko-1")
    board.close()
    text = out.getvalue()
    assert text.count("\r\x1b[K") >= 5 and text.count("\n") == 1       # the stage line; the rest redraws


def test_reporter_throttles_and_workers_round_trip():
    clock, got = Clock(), []
    rep = Reporter(4, lambda *a: got.append(a), clock=clock, throttle=1.0)
    for i in range(1, 11):
        clock.t = i * 0.3
        rep("English base", i, 10, "")
    assert [g[2] for g in got] == [1, 5, 9, 10]                         # stage start, each second, the last step
    buf = io.StringIO()
    emit(4, "Korean adaptation", 7, 600, "loss 0.5", stream=buf)
    assert parse(buf.getvalue().strip()) == {"seed": 4, "stage": "Korean adaptation", "step": 7, "total": 600,
                                             "note": "loss 0.5"}
    assert parse("Loading weights: 100%") is None and parse("@driftlens-progress {not json") is None
