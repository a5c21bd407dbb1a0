"""One family of errors: every failure driftlens raises on purpose derives from :class:`DriftlensError`.

The message of a driftlens error is written for the user: it names the file, the flag or the
value at fault and, where there is one, the way out. Library code raises these and never prints;
the CLI prints the message as one line, ``driftlens <command>: error: <message>``, and exits
with the class's ``exit_code``:

====  ============================================================================
code  meaning
====  ============================================================================
0     success
1     an unexpected error (a bug: rerun with ``--debug`` and report the traceback)
2     usage: a flag or argument value is invalid (:class:`UsageError`)
3     data: a store, report, probe set, spec, rank file or model directory is missing,
      damaged or inconsistent with what is asked (:class:`DataError`, ``FileNotFoundError``)
4     environment: a file cannot be read or written (permissions, disk), a device is
      not available (:class:`EnvironmentProblem`)
130   interrupted (Ctrl-C); completed work is kept and a rerun resumes
====  ============================================================================

Each specific error also derives from the builtin it refines (``ValueError``, ``TypeError``,
``RuntimeError``, ``OSError``), so ``except ValueError`` written against earlier versions keeps working.
"""
from __future__ import annotations

import threading

EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_DATA = 3
EXIT_ENVIRONMENT = 4
EXIT_INTERRUPTED = 130


class DriftlensError(Exception):
    """Base of every error driftlens raises on purpose; ``str(err)`` is the user-facing message."""

    exit_code = EXIT_DATA


class UsageError(DriftlensError, ValueError):
    """A value the caller passed is invalid (a count < 1, an unknown name, a bad path)."""

    exit_code = EXIT_USAGE


class ArgumentTypeError(UsageError, TypeError):
    """An argument of the wrong type (a list where a tensor is expected, a number where a mapping is)."""


class SelectionError(UsageError):
    """A checkpoint, reference, layer, site or cluster unit asked of a store or report is not in it
    (:mod:`driftlens.select`); the message names the value and what the data holds."""


class DataError(DriftlensError, ValueError):
    """Data on disk is missing, damaged or inconsistent with the request."""

    exit_code = EXIT_DATA


class StoreIntegrityError(DataError):
    """A completed checkpoint of an activation store is damaged (a chunk missing, cut or altered)."""


class CheckpointIdentityError(DataError):
    """A checkpoint label of a store is bound to another source or other capture options."""


class DriftError(UsageError):
    """The report cannot be computed from this input; the message names the store, cell or value."""


class ScheduleError(UsageError):
    """A rank schedule cannot be built, read or applied (the message names the offending thing)."""


class ScheduleFileError(ScheduleError, DataError):
    """A rank-schedule file is unreadable, damaged or holds impossible values (a data error: exit code 3)."""

    exit_code = EXIT_DATA


class EnvironmentProblem(DriftlensError, OSError):
    """The machine cannot do what is asked: a path is not writable, a device is not available."""

    exit_code = EXIT_ENVIRONMENT


def exit_code_of(exc: BaseException) -> int:
    """The CLI exit code for an exception (see the module docstring)."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, DriftlensError):
        return int(exc.exit_code)
    if isinstance(exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        return EXIT_DATA                 # an input named on the command line is not there
    if isinstance(exc, OSError):
        return EXIT_ENVIRONMENT
    return EXIT_INTERNAL


# Set by the CLI's SIGINT handler. Python may swallow the KeyboardInterrupt of a Ctrl-C that lands
# inside a destructor or weakref callback ("Exception ignored in ..."); long loops call
# :func:`raise_if_interrupted` between steps so such an interrupt still stops the work.
INTERRUPT = threading.Event()


def raise_if_interrupted() -> None:
    """Raise ``KeyboardInterrupt`` when an interrupt was requested and not yet delivered."""
    if INTERRUPT.is_set():
        raise KeyboardInterrupt


def check_count(name: str, value, least: int = 1, error: type[UsageError] = UsageError) -> int:
    """``value`` as an ``int`` when it is an integer (Python or numpy) ``>= least``; else ``error``.

    A ``bool`` (``True`` is not a count) and a float (``2.5``, and ``2.0`` too: a count written
    as a float is a mistake somewhere upstream) are refused, never rounded.
    """
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < least:
        raise error(f"{name} must be an integer >= {least}, got {value!r}")
    return int(value)
