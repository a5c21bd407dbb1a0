"""Where computations run: one place that turns a user's device string into a usable torch device."""
from __future__ import annotations

from driftlens.errors import EnvironmentProblem, UsageError


def resolve_device(device: str | None = "auto"):
    """A torch device that exists on this machine.

    Parameters
    ----------
    device : str or torch.device or None
        ``"auto"`` / None: CUDA when present, else CPU. Otherwise any torch device string
        (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``).

    Raises
    ------
    UsageError
        The string is not a device name.
    EnvironmentProblem
        The device is not available here (CUDA asked on a CPU build, an index beyond the GPUs).
    """
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise UsageError(f"device {device!r} is not a device name ('auto', 'cpu', 'cuda', 'cuda:0', ...)") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise EnvironmentProblem(f"device {device!r}: CUDA is not available here (torch {torch.__version__}"
                                     f"{', a CPU build' if torch.version.cuda is None else ''}); use --device cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise EnvironmentProblem(f"device {device!r}: this machine has {n} CUDA device(s) (0..{n - 1})")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise EnvironmentProblem(f"device {device!r}: MPS is not available here; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"device {device!r}: driftlens runs on 'cpu', 'cuda' or 'mps'")
    return dev
