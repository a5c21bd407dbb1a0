"""Probe sets shipped with driftlens, as the package ``driftlens.data`` (``probes/<name>/``).

Read with ``importlib.resources.files("driftlens.data")`` (see :mod:`driftlens.probes`).
"""
