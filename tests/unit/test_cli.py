"""The command line: every subcommand has --help; drift and plot run on a synthetic store."""
from __future__ import annotations

import subprocess
import sys

import pytest

from driftlens.cli import build_parser, main

from .test_drift import store  # noqa: F401  (module-scoped synthetic store fixture)


def _commands():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sorted(sub.choices)


def test_every_command_has_help(capsys):
    cmds = _commands()
    assert {"capture", "drift", "plot"} <= set(cmds)
    for cmd in cmds:
        with pytest.raises(SystemExit) as exc:
            main([cmd, "--help"])
        assert exc.value.code == 0
        assert "usage: driftlens " + cmd in capsys.readouterr().out


def test_every_command_help_has_examples_and_shows_its_defaults(capsys):
    """Each ``--help`` ends with examples of that command, and every option with a default says it."""
    import argparse

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for cmd, command in sub.choices.items():
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        text = " ".join(capsys.readouterr().out.split())          # unwrapped
        assert f"examples: driftlens {cmd}" in text, cmd
        for action in command._actions:
            if isinstance(action, argparse._HelpAction) or not action.option_strings:
                continue
            assert action.help, (cmd, action.option_strings)           # every option says what it does
            shown = action.default is not None and not isinstance(action.default, bool) and action.default != []
            if shown and not action.required:
                help_text = " ".join((action.help % {"default": action.default}
                                      if "%(default)" in action.help else action.help).split())
                assert "default" in help_text.lower() or f"(default: {action.default})" in text, (cmd, action.dest)


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "driftlens.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "capture" in out and "drift" in out


def test_drift_and_plot_commands(store, tmp_path, capsys):  # noqa: F811
    rep = tmp_path / "r.nc"
    assert main(["drift", str(store), "--metrics", "mmd", "gap", "--permutations", "20", "--bootstrap", "20",
                 "--out", str(rep), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"report: {rep}" in out and "visual MMD^2 (hidden)" in out and "95% interval" in out
    figs = tmp_path / "figs"
    assert main(["plot", str(rep), "--out", str(figs)]) == 0
    assert (figs / "mmd_heatmap_hidden_visual.png").stat().st_size > 1000
    assert (figs / "gap_by_layer_hidden.png").is_file()
    assert main(["plot", str(rep), "--var", "gap", "--svg", "--out", str(tmp_path / "g")]) == 0
    assert {p.name for p in (tmp_path / "g").iterdir()} >= {"gap_by_layer_hidden.png", "gap_by_layer_hidden.svg"}
    assert all(p.name.startswith("gap_by_layer_") for p in (tmp_path / "g").iterdir())


def test_errors_are_one_line(store, tmp_path, capsys):  # noqa: F811
    assert main(["drift", str(store), "--reference", "nope", "--out", str(tmp_path / "x.nc")]) == 2   # usage
    err = capsys.readouterr().err
    assert "driftlens drift: error: reference 'nope' is not a checkpoint" in err
