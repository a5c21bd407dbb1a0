"""Figures of a drift report (matplotlib; every function takes an optional ``ax`` and returns it)."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg",) and not _interactive():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _interactive() -> bool:
    try:
        from IPython import get_ipython

        return get_ipython() is not None
    except ImportError:
        return False


def _ax(ax, size=(6, 4)):
    if ax is not None:
        return ax
    plt = _plt()
    _, ax = plt.subplots(figsize=size)
    return ax


def _select(report, var, site, modality, need_values: bool = False):
    from driftlens.errors import UsageError

    if var not in report.data_vars:
        raise UsageError(f"{var!r} is not in the report; it has {sorted(report.data_vars)}")
    da = report[var]
    sel = {k: v for k, v in (("site", site), ("modality", modality)) if k in da.dims and v is not None}
    for dim, value in sel.items():
        have = [str(v) for v in da[dim].values]
        if str(value) not in have:
            raise UsageError(f"{dim} {value!r} is not in the report; it has {have}")
    for dim in ("checkpoint", "layer"):
        if dim in da.dims and da.sizes[dim] == 0:
            raise UsageError(f"the report has no {dim}: nothing to draw")
    out = da.sel(sel)
    if need_values and not np.isfinite(out.values).any():
        raise UsageError(f"{var} ({', '.join(map(str, sel.values()))}) holds no finite value: nothing to draw")
    return out, sel


def drift_heatmap(report, var: str = "mmd", site: str = "hidden", modality: str = "visual", ax=None,
                  annotate: bool = True, alpha: float = 0.05):
    """Checkpoint x layer heatmap of one report variable (default: the visual MMD^2 effect).

    Cells whose adjusted p-value (``{var}_q``, else ``{var}_p``) is at most ``alpha`` are marked
    with ``*``.
    """
    da, sel = _select(report, var, site, modality, need_values=True)
    sig_var = next((v for v in (f"{var}_q", f"{var}_p") if v in report.data_vars), None)
    sig = _select(report, sig_var, site, modality)[0].transpose("checkpoint", "layer").values \
        if sig_var else None
    ax = _ax(ax, (1.6 + 0.8 * da.sizes["layer"], 1.0 + 0.45 * da.sizes["checkpoint"]))
    vals = da.transpose("checkpoint", "layer").values
    im = ax.imshow(vals, aspect="auto", cmap="magma")
    ax.set_xticks(range(da.sizes["layer"]), [str(v) for v in da.layer.values])
    ax.set_yticks(range(da.sizes["checkpoint"]), [str(v) for v in da.checkpoint.values])
    ax.set_xlabel("layer")
    ax.set_ylabel("checkpoint")
    title = f"{var} ({', '.join(f'{v}' for v in sel.values())})"
    if sig_var:
        title += f"; * {sig_var.rsplit('_', 1)[1]} <= {alpha:g}"
    ax.set_title(title, fontsize=9)
    if annotate:
        finite = vals[np.isfinite(vals)]
        mid = float(np.median(finite)) if finite.size else 0.0
        for (i, j), v in np.ndenumerate(vals):
            star = "*" if sig is not None and np.isfinite(sig[i, j]) and sig[i, j] <= alpha else ""
            ax.text(j, i, f"{v:.3g}{star}", ha="center", va="center", fontsize=7,
                    color="white" if v < mid else "black")
    units = report[var].attrs.get("units", "")
    ax.figure.colorbar(im, ax=ax, label=var + (f" ({units})" if units and units != "1" else ""))
    return ax


def per_layer(report, var: str, site: str = "hidden", ax=None, modality: str | None = "visual"):
    """One line per checkpoint of a per-layer variable, with its interval band when the report
    has ``{var}_lo`` / ``{var}_hi`` (``gap``, ``mir``, ``mmd``, ``paired_shift`` ...)."""
    da, sel = _select(report, var, site, modality, need_values=True)
    band = all(f"{var}_{s}" in report.data_vars for s in ("lo", "hi"))
    ax = _ax(ax)
    cmap = _plt().get_cmap("viridis")
    n = da.sizes["checkpoint"]
    for i, label in enumerate(da.checkpoint.values):
        color = cmap(i / max(1, n - 1))
        ax.plot(da.layer.values, da.sel(checkpoint=label).values, marker="o", color=color, label=str(label))
        if band:
            lo = _select(report, f"{var}_lo", site, modality)[0].sel(checkpoint=label).values
            hi = _select(report, f"{var}_hi", site, modality)[0].sel(checkpoint=label).values
            ax.fill_between(da.layer.values, lo, hi, color=color, alpha=0.2, lw=0)
    ax.set_xticks(da.layer.values)                       # layers are integers
    ax.set_xlabel("layer")
    units = da.attrs.get("units", "")
    ax.set_ylabel(f"{var}" + (f" ({units})" if units and units != "1" else ""))
    where = ", ".join(str(v) for v in sel.values())
    ax.set_title(f"{da.attrs.get('long_name', var)}" + (f" ({where})" if where else ""), fontsize=9)
    ax.legend(fontsize=7)
    return ax


def accuracy_vs_drift(accuracy: dict, drift: dict, ax=None, chance: float | None = None,
                      xlabel: str = "visual drift (mean MMD^2 over layers)", tag: str = ""):
    """Grounding accuracy (per language) against mean visual drift, one point per checkpoint.

    Parameters
    ----------
    accuracy : dict
        ``{checkpoint: {"en": float, "ko": float}}``.
    drift : dict
        ``{checkpoint: float}`` (e.g. mean over layers of the visual MMD^2 effect).
    """
    ax = _ax(ax)
    labels = [c for c in drift if c in accuracy]
    langs = sorted({lang for c in labels for lang in accuracy[c]})
    for lang in langs:
        xs = [drift[c] for c in labels]
        ys = [accuracy[c][lang] for c in labels]
        ax.plot(xs, ys, marker="o" if not tag else "s", ls="-" if not tag else "--", label=lang + tag)
        for x, y, c in zip(xs, ys, labels):
            ax.annotate(c, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if chance is not None:
        ax.axhline(chance, color="grey", ls="--", lw=1, label="chance")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("grounding accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    ax.set_title("grounding vs drift")
    return ax


def seeds_by_layer(series: dict, ax=None, ylabel: str = "visual MMD^2"):
    """Per-layer values over seeds: one line per series (its mean), one dot per seed.

    Parameters
    ----------
    series : dict
        ``{label: array [seeds, layers]}``, e.g. the last Korean checkpoint and the control's.
    """
    ax = _ax(ax)
    cmap = _plt().get_cmap("tab10")
    for i, (label, vals) in enumerate(series.items()):
        vals = np.asarray(vals, dtype=float)
        layers = np.arange(vals.shape[1])
        ax.plot(layers, vals.mean(0), marker="o", color=cmap(i), label=f"{label} (mean of {len(vals)} seeds)")
        for row in vals:
            ax.scatter(layers + 0.06 * (i - 0.5), row, s=12, color=cmap(i), alpha=0.5)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(np.arange(np.asarray(next(iter(series.values()))).shape[1]))
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title("visual drift by layer: Korean adaptation vs English control", fontsize=9)
    ax.legend(fontsize=7)
    return ax


def save(ax, path) -> Path:
    """Save the figure of ``ax`` to ``path`` (PNG) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = ax.figure
    with warnings.catch_warnings():      # a colorbar makes tight_layout say it changed the layout
        warnings.simplefilter("ignore", UserWarning)
        fig.tight_layout()
    fig.savefig(path, dpi=120)
    _plt().close(fig)
    return path
