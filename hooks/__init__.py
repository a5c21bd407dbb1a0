"""Architecture specs, one TOML file per VLM family, shipped as the package ``driftlens.hooks``.

Read with ``importlib.resources.files("driftlens.hooks")`` (see :mod:`driftlens.specs`); a user's
own specs go in a directory named by ``DRIFTLENS_HOOKS`` (no write into site-packages).
"""
