"""Layer-wise LoRA rank allocation from measured drift: a drift report in, a :class:`RankSchedule` out.

A drift report says, per decoder layer, how far the visual tokens moved during language adaptation.
:func:`allocate_ranks` turns one per-layer variable of that report (the *signal*) into an integer
LoRA rank for every adapted module, to an exact total *budget*, and returns a :class:`RankSchedule`:
one anchored full module path per adapted module, with its rank and alpha, plus the metadata needed
to reproduce it. The schedule exports a ``peft.LoraConfig`` (``rank_pattern`` / ``alpha_pattern``),
a PEFT adapter-config JSON or an axolotl YAML fragment (``lora_rank_pattern`` / ``lora_alpha_pattern``).

Units, signals and the edge cases
---------------------------------
A *unit* is one adapted module: (decoder layer ``l``, target ``t``) with full path
``spec.module_path(l, t)``, e.g. ``model.language_model.layers.3.self_attn.q_proj``. Units are
ordered by layer, then by the order of the targets; that order breaks every tie (lower layer first).
The budget is the sum of the ranks of all units.

A signal expression reads ``NAME[@SITE][:MODALITY]``: ``"mmd"``, ``"mmd@key"``,
``"sinkhorn@hidden:text"``, ``"mmd_lo"``, ``"gap@key"``. ``NAME`` is any report variable with a ``layer`` dim;
the checkpoint (default: the last one of the report's one trajectory; a report with several
trajectories must name it -- :mod:`driftlens.select`), site (default ``"hidden"``) and modality (default
``"visual"``) are selected where the variable has those dims. With ``contrast=`` the signal is the
variable's contrast between two checkpoints (``{NAME}_contrast``, e.g. Korean minus the English
control: the drift the language change adds), averaged over runs when the report has several.
Per-module signals: pass a mapping ``{target: expression}`` (``"*"`` is the fallback for targets not named), e.g.
``{"self_attn.q_proj": "mmd@key", "self_attn.k_proj": "mmd@key", "*": "mmd@hidden"}`` so that
key-space drift weighs the q/k projections and hidden-state drift the others; or keep one expression
and pass ``site_for_module={"self_attn.q_proj": "key", "self_attn.k_proj": "key"}`` (a site written
in an expression wins over it). Mixing variables of different units in one schedule is allowed but
is the caller's responsibility (MMD^2 lies in [0, 2] at every site; distances in model units do not).
A conservative choice is the lower end of the interval (``"mmd_lo"``): capacity goes where the
drift is certain, not where it is noisy.

Signal values that are negative are set to 0 before allocation: a negative effect (less drift than
the null) is no evidence that a layer needs capacity. If every signal is 0, every rule falls back to
``uniform``. Neither happens silently where it matters: a zero signal, and a negative value its
own interval does not explain (the interval below 0, or the value outside it: a damaged or
hand-edited report), are warned about and kept in the schedule's ``meta["warnings"]``. The report's
reference checkpoint is refused as the signal's checkpoint (its drift against itself is 0 at every
layer by construction). :func:`allocate_ranks` refuses a profile with a NaN or infinite value at the
selected checkpoint (:class:`ScheduleError` naming the signal, the checkpoint and the layers): a
missing measurement there is a damaged or degenerate report, not "no drift". :func:`allocate` over
plain arrays still cleans them (:func:`clean_signal`): NaN -> 0, ``+inf`` (a null with zero spread)
-> the largest finite value.

Targets are relative to one decoder block; a spec's optional ``block_modules`` lists the valid ones,
and a target outside it is refused before any schedule is written (with a model, every scheduled
path is checked against the model instead).

The rules themselves are in :mod:`driftlens.allocation` (plain arrays); the schedule, its export and
its files in :mod:`driftlens.schedule`; its figure is :func:`driftlens.plot.rank_schedule`.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from driftlens.allocation import Rule, allocate, clean_signal
from driftlens.errors import ScheduleError, SelectionError, check_count
from driftlens.schedule import ModuleRank, RankSchedule, library_versions, nearest_names, plain_number
from driftlens.schema import Modality, Site
from driftlens.select import checkpoint_labels, pick_checkpoint, reference_of

if TYPE_CHECKING:
    import torch
    import xarray as xr

    from driftlens.specs import Spec

DEFAULT_SITE: Site = "hidden"
DEFAULT_MODALITY: Modality = "visual"
_SIGNAL_RE = re.compile(
    r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:@(?P<site>[A-Za-z_][A-Za-z0-9_]*))?(?::(?P<modality>[A-Za-z_]+))?$"
)


def parse_signal(expr: str) -> tuple[str, str | None, str | None]:
    """Split a signal expression ``NAME[@SITE][:MODALITY]``.

    Returns
    -------
    (name, site or None, modality or None)
    """
    m = _SIGNAL_RE.match(str(expr).strip())
    if m is None:
        raise ScheduleError(
            f"signal {expr!r} is not of the form NAME[@SITE][:MODALITY], e.g. 'mmd', 'mmd@key', "
            f"'sinkhorn@hidden:text'"
        )
    return m["name"], m["site"], m["modality"]


def available_signals(report) -> list[str]:
    """Names of the report variables usable as a signal (those with a ``layer`` dim)."""
    return sorted(str(k) for k, v in report.data_vars.items() if "layer" in v.dims)


def _select_checkpoint(report, checkpoint):
    """The checkpoint the signal is read at (:func:`driftlens.select.pick_checkpoint`'s rule)."""
    labels = checkpoint_labels(report)
    if not labels:
        raise ScheduleError("the report has no checkpoints")
    try:
        return pick_checkpoint(labels, checkpoint, reference=reference_of(report),
                               what="the rank signal", flag="checkpoint")
    except SelectionError as exc:
        raise ScheduleError(str(exc)) from None


def _select_contrast(report, contrast) -> str:
    """A contrast of the report by label (``"ko-5 - en-5"``) or as ``"ko-5:en-5"``."""
    have = [str(c) for c in report["contrast"].values] if "contrast" in report.coords else []
    text = str(contrast)
    if ":" in text and text not in have:
        a, _, b = text.partition(":")
        text = f"{a} - {b}"
    if text not in have:
        raise ScheduleError(f"contrast {contrast!r} is not in the report; it has {have or 'no contrasts'} "
                            f"(compute them with driftlens drift --contrast A:B or --trajectories)")
    return text


def signal_profile(report, signal: str, *, checkpoint=None, contrast=None, site: str = DEFAULT_SITE,
                   modality: str = DEFAULT_MODALITY) -> np.ndarray:
    """One per-layer signal from a drift report, as given (not clipped).

    Parameters
    ----------
    report : xarray.Dataset
        Drift report (dims ``checkpoint``, ``layer``, ``site``, ``modality``).
    signal : str
        ``NAME[@SITE][:MODALITY]``; a site/modality written here wins over the keyword defaults.
    checkpoint : str or int, optional
        Checkpoint label or position; default: the last checkpoint of the report's one trajectory
        (refused when it holds several: :func:`driftlens.select.pick_checkpoint`).
    contrast : str, optional
        Read ``NAME``'s contrast instead (``"ko-5 - en-5"`` or ``"ko-5:en-5"``; the report's
        ``{NAME}_contrast``): excess drift over a control.
    site, modality : str
        Used where the variable has that dim and the expression does not name one.

    Returns
    -------
    numpy.ndarray
        ``[n_layers]`` float64, in ``layer`` coordinate order. With a ``run`` dim (several training
        runs), the mean over runs.
    """
    name, esite, emod = parse_signal(signal)
    if contrast is not None:
        name = f"{name}_contrast"
        if name not in report.data_vars:
            raise ScheduleError(f"signal {signal!r} with a contrast needs the report variable {name!r}; the report "
                                f"has no contrasts of it (driftlens drift --contrast A:B)")
    if name not in report.data_vars or "layer" not in report[name].dims:
        raise ScheduleError(
            f"unknown signal {name!r} (from {signal!r}); available per-layer signals in the report: "
            f"{available_signals(report)}"
        )
    da = report[name]
    if "run" in da.dims:
        da = da.mean("run", keep_attrs=True)          # several training runs: their mean is the signal
    if contrast is not None:
        da = da.sel(contrast=_select_contrast(report, contrast))
    elif "checkpoint" in da.dims:
        da = da.sel(checkpoint=_select_checkpoint(report, checkpoint))
    for dim, explicit, default in (("site", esite, site), ("modality", emod, modality)):
        value = explicit if explicit is not None else default
        if dim in da.dims:
            have = [str(v) for v in da[dim].values]
            if value not in have:
                raise ScheduleError(f"signal {signal!r}: {dim} {value!r} is not in the report; it has {have}")
            da = da.sel({dim: value})
        elif explicit is not None:
            raise ScheduleError(f"signal {signal!r}: variable {name!r} has no {dim!r} dim (dims {da.dims})")
    extra = [d for d in da.dims if d != "layer"]
    if extra:
        raise ScheduleError(f"signal {signal!r}: variable {name!r} still has dims {extra} after selection")
    return np.asarray(da.transpose("layer").values, dtype=np.float64)  # [n_layers]


def _resolve_spec(report, spec, model):
    if spec is not None:
        _check_spec_serves(report, spec)
        return spec
    from driftlens.specs import load_spec

    if model is not None:
        return load_spec(model.get_base_model() if hasattr(model, "get_base_model") else model)
    mtype = report.attrs.get("model_type")
    if not mtype:
        raise ScheduleError("the report has no 'model_type' attribute; pass spec= or model=")
    return load_spec(mtype)


def _check_spec_serves(report, spec) -> None:
    """Refuse an explicit spec of another family than the report's (its paths would fail later in PEFT)."""
    mtype, fam = report.attrs.get("model_type"), report.attrs.get("family")
    served = list(getattr(spec, "model_types", ()) or ())
    if mtype and served and mtype not in served and fam != spec.family:
        raise ScheduleError(f"spec {getattr(spec, 'path', None) or spec.family!r} (family {spec.family!r}, model types "
                            f"{served}) does not serve the report's model_type {mtype!r} (family {fam!r}); its module "
                            f"paths would not exist in that model -- leave the spec out, or pass one for {mtype!r}")


def _check_signal_meaning(profiles: Mapping[str, np.ndarray], ck, report, rule, contrast=None) -> list[str]:
    """The reference is refused (its drift against itself is 0 by construction); a signal that is negative
    somewhere, or 0 everywhere, is said in warnings (returned, for the schedule's metadata). A contrast may
    be negative (the control moved more there): those layers count as 0 without a warning."""
    ref = reference_of(report)
    if ck is not None and ck == ref:
        raise ScheduleError(f"checkpoint {ck!r} is the report's reference: its drift against itself is 0 at every "
                            f"layer by construction, so every rule would fall back to uniform ranks; choose a "
                            f"checkpoint that moved (default: the last; the report has "
                            f"{[str(c) for c in report['checkpoint'].values]})")
    notes = []
    layers = [int(v) for v in report["layer"].values]
    at = f"contrast {contrast!r}" if contrast is not None else f"checkpoint {ck!r}"
    for expr in sorted(profiles):
        values = profiles[expr]  # [n_layers]
        if contrast is not None:
            if not (values > 0).any() and rule != "uniform":
                notes.append(f"signal {expr!r} at {at} is 0 or negative at every layer (the control moved as much "
                             f"or more everywhere): the {rule!r} rule fell back to uniform ranks")
            continue
        lo, hi = _interval_of(report, expr, ck)
        odd = (values < 0) if lo is None else (values < 0) & ((hi < 0) | (values < lo) | (values > hi))
        neg = [lay for lay, bad in zip(layers, odd) if bad]
        if neg:
            why = ("" if lo is None else " and its own interval does not explain it (the whole interval below 0, "
                   "or the value outside it)")
            notes.append(f"signal {expr!r} at checkpoint {ck!r} is negative at layer(s) {neg} (min "
                         f"{float(values[odd].min()):.3g}){why}: impossible for a drift measure, so the report is "
                         f"damaged or hand-edited; those layers count as 0")
        if not (values > 0).any() and rule != "uniform":
            notes.append(f"signal {expr!r} is 0 or negative at every layer at checkpoint {ck!r}: it carries no "
                         f"information, so the {rule!r} rule fell back to uniform ranks")
    return notes


def _interval_of(report, expr: str, ck):
    """``(lo, hi)`` per layer of a signal's interval variables (``NAME_lo`` / ``NAME_hi``), or ``(None, None)``."""
    name, site, modality = parse_signal(expr)
    if f"{name}_lo" not in report.data_vars or f"{name}_hi" not in report.data_vars:
        return None, None
    tail = (f"@{site}" if site else "") + (f":{modality}" if modality else "")
    return tuple(signal_profile(report, f"{name}_{end}{tail}", checkpoint=ck) for end in ("lo", "hi"))


def _report_layers(report, spec, model) -> int:
    if "layer" not in report.dims:
        raise ScheduleError("the report has no 'layer' dim")
    layers = [int(v) for v in report["layer"].values]
    n = len(layers)
    if model is not None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        n_model = spec.num_layers(base)
        fam = report.attrs.get("family")
        if fam and fam != spec.family:
            raise ScheduleError(f"the report was measured on family {fam!r} (model_type "
                                f"{report.attrs.get('model_type')!r}) but the model is family {spec.family!r}")
        if layers != list(range(n_model)):
            raise ScheduleError(f"the report's layers {layers} do not match the model's {n_model} decoder layers "
                                f"(0..{n_model - 1} at {spec.decoder_layers!r})")
        return n_model
    n_attr = report.attrs.get("n_layers")
    if layers != list(range(int(n_attr) if n_attr is not None else n)):
        raise ScheduleError(f"the report's layers {layers} are not 0..{(n_attr or n) - 1}; a schedule needs a "
                            f"signal for every decoder layer (capture all layers)")
    return n


def _resolve_signals(signal, targets, site_for_module, site, modality) -> dict[str, str]:
    """target -> full expression NAME@SITE[:MODALITY]."""
    site_for_module = dict(site_for_module or {})
    unknown = sorted(set(site_for_module) - set(targets))
    if unknown:
        raise ScheduleError(f"site_for_module names {unknown}, which are not adapted modules {list(targets)}")
    if isinstance(signal, Mapping):
        unknown = sorted(set(signal) - set(targets) - {"*"})
        if unknown:
            raise ScheduleError(f"signal names modules {unknown}, which are not adapted modules {list(targets)}")
        missing = [t for t in targets if t not in signal and "*" not in signal]
        if missing:
            raise ScheduleError(f"signal has no entry for modules {missing} (add them or a '*' fallback)")
        exprs = {t: signal.get(t, signal.get("*")) for t in targets}
    elif isinstance(signal, str):
        exprs = {t: signal for t in targets}
    else:
        raise ScheduleError(f"signal must be a string or a mapping, got {type(signal).__name__}")
    out = {}
    for t, e in exprs.items():
        name, s, m = parse_signal(e)
        s = s or site_for_module.get(t, site)
        out[t] = f"{name}@{s}" + (f":{m}" if m else "")
    return out


def _check_targets(modules, spec, model) -> tuple[str, ...]:
    """The LoRA targets as a tuple: distinct strings relative to one decoder block and, when no model
    is given and the spec lists its ``block_modules``, among those (a model checks them itself)."""
    if isinstance(modules, str):
        modules = [modules]
    targets = tuple(modules)
    if not targets or len(set(targets)) != len(targets) or not all(isinstance(t, str) and t for t in targets):
        raise ScheduleError(f"modules must be a non-empty list of distinct targets, got {list(targets)}")
    for t in targets:
        if t.startswith(spec.decoder_layers) or re.match(r"^\d+\.", t):
            raise ScheduleError(f"module {t!r} must be relative to one decoder block, e.g. 'self_attn.q_proj'")
    known = tuple(getattr(spec, "block_modules", ()) or ())
    unknown = [t for t in targets if t not in known]
    if model is None and known and unknown:
        t = unknown[0]
        raise ScheduleError(
            f"module {t!r} is not a module of a {spec.family!r} decoder block (block_modules in "
            f"{getattr(spec, 'path', 'the spec')}); nearest: {nearest_names(t, known)}; all: {list(known)}"
            + (f" ({len(unknown)} unknown targets: {unknown})" if len(unknown) > 1 else "")
        )
    return targets


def _check_finite(profiles: Mapping[str, np.ndarray], ck, report) -> None:
    """Refuse a signal profile holding NaN or +-inf at the selected checkpoint, naming the layers."""
    for expr in sorted(profiles):
        values = profiles[expr]  # [n_layers]
        bad = np.flatnonzero(~np.isfinite(values))
        if not bad.size:
            continue
        layers = [int(report["layer"].values[i]) for i in bad]
        shown = ", ".join(f"layer {lay}: {values[i]}" for lay, i in list(zip(layers, bad))[:8])
        at = f" at checkpoint {ck!r}" if ck is not None else ""
        why = (f"; {ck!r} is the report's reference checkpoint, which is not tested against itself"
               if ck is not None and ck == reference_of(report) else "")
        raise ScheduleError(
            f"signal {expr!r}{at} is not finite at {len(layers)} layer(s) {layers} ({shown}){why}; a missing "
            f"measurement is no evidence of no drift: choose another checkpoint or signal, or recompute the report"
        )


def _pass_on_report_warnings(report) -> None:
    """A schedule inherits its report's caveats (few clusters, unfinished checkpoints): say them again."""
    import warnings

    for w in filter(None, str(report.attrs.get("warnings", "")).split("\n")):
        warnings.warn(f"the drift report says: {w}", stacklevel=3)


def _runs_of(report) -> list[str] | None:
    """The training runs a signal was averaged over (one, when a run was picked with ``sel``)."""
    if "run" not in report.coords:
        return None
    return [str(v) for v in np.atleast_1d(report["run"].values)]


def allocate_ranks(report: xr.Dataset, budget: int, signal: str | Mapping[str, str] = "mmd",
                   rule: Rule = "proportional", min_rank: int = 1, max_rank: int = 64,
                   modules: Sequence[str] | None = None, *, checkpoint: str | int | None = None,
                   contrast: str | None = None, site: Site = DEFAULT_SITE, modality: Modality = DEFAULT_MODALITY,
                   site_for_module: Mapping[str, Site] | None = None, share: float = 0.9,
                   alpha_ratio: float = 2.0, use_rslora: bool = False, spec: Spec | None = None,
                   model: torch.nn.Module | None = None, source: str | None = None) -> RankSchedule:
    """Allocate LoRA ranks to the decoder modules from a drift report.

    Parameters
    ----------
    report : xarray.Dataset
        Drift report (see :func:`driftlens.drift.drift`); its ``layer`` coordinate must be 0..L-1.
    budget : int
        Sum of the ranks of all adapted modules.
    signal : str or mapping
        ``NAME[@SITE][:MODALITY]`` for all modules, or ``{target: expression}`` with an optional
        ``"*"`` fallback (see the module docstring). Unknown names raise, listing the available ones.
    rule : {"proportional", "waterfill", "cumulative", "uniform"}
    min_rank, max_rank : int
        Floor and ceiling of every adapted module's rank.
    modules : sequence of str, optional
        Targets relative to one decoder block; default ``spec.lora_targets``. Without ``model``,
        each must be one of the spec's ``block_modules`` (when it lists them), or ScheduleError
        names the bad target, the spec file and the nearest valid names.
    checkpoint : str or int, optional
        Report checkpoint the signal is read at; default the last of the report's one trajectory. A
        report with several trajectories (an adaptation and its control) refuses to guess: name the
        checkpoint, or better a ``contrast``.
    contrast : str, optional
        Allocate from a contrast of the report instead of one checkpoint (``"ko-5 - en-5"``, or
        ``"ko-5:en-5"``): the excess drift over a control, the mean over runs when the report has
        several. Negative layers (the control moved more) get the floor rank.
    site, modality : str
        Defaults for the signal selection.
    site_for_module : mapping, optional
        ``{target: site}`` overriding ``site`` per module.
    share : float
        ``cumulative`` only: share of the signal the kept layers hold.
    alpha_ratio : float
        ``alpha = alpha_ratio * r`` (constant scaling); with ``use_rslora`` see the module docstring.
    use_rslora : bool
        Export ``use_rslora=True`` with one alpha for every module.
    spec : driftlens.specs.Spec, optional
        Architecture spec; default ``load_spec(model)`` or ``load_spec(report.attrs["model_type"])``.
    model : torch.nn.Module, optional
        When given, the report's layers, the spec and the module paths are checked against it.
    source : str, optional
        Where the report came from (recorded in the metadata); default from the report's attrs.

    Returns
    -------
    RankSchedule

    Raises
    ------
    ScheduleError
        A target outside the spec's ``block_modules``, a signal with a NaN / infinite value at
        the selected checkpoint (the layers are named), the report's reference as the checkpoint
        (its drift is 0 by construction), an explicit ``spec`` that does not serve the report's
        model_type, a count that is not an integer >= 1, an ``alpha_ratio`` that is not a finite
        number > 0, a budget the ranks cannot meet, ...

    Warns
    -----
    UserWarning
        The signal is negative at some layer where its own interval does not allow it (a damaged or
        hand-edited report; counted as 0), or 0 everywhere (the rule falls back to uniform ranks);
        the schedule's ``meta["warnings"]`` keeps the same lines. A small negative estimate inside
        its interval (an unbiased MMD dips below 0 by chance) is counted as 0 without a warning.
    """
    import warnings

    budget = check_count("budget", budget, error=ScheduleError)
    min_rank = check_count("min_rank", min_rank, error=ScheduleError)
    max_rank = check_count("max_rank", max_rank, error=ScheduleError)
    for name, value, ok in (("alpha_ratio", alpha_ratio, lambda v: v > 0), ("share", share, lambda v: 0 < v <= 1)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
                or not math.isfinite(value) or not ok(value):
            raise ScheduleError(f"{name} must be a finite number {'> 0' if name == 'alpha_ratio' else 'in (0, 1]'}, "
                                f"got {value!r}")
    spec = _resolve_spec(report, spec, model)
    _pass_on_report_warnings(report)
    n_layers = _report_layers(report, spec, model)
    targets = _check_targets(spec.lora_targets if modules is None else modules, spec, model)
    exprs = _resolve_signals(signal, targets, site_for_module, site, modality)
    if contrast is not None and checkpoint is not None:
        raise ScheduleError("give checkpoint= or contrast=, not both")
    if contrast is not None:
        ck, con = None, _select_contrast(report, contrast)
    else:
        ck, con = (_select_checkpoint(report, checkpoint) if "checkpoint" in report.coords else None), None
    profiles = {e: signal_profile(report, e, checkpoint=ck, contrast=con, site=site, modality=modality)
                for e in set(exprs.values())}  # expr -> [n_layers]
    _check_finite(profiles, ck, report)
    notes = _check_signal_meaning(profiles, ck, report, rule, con)
    for note in notes:
        warnings.warn(note, stacklevel=2)

    paths, layer_of, mod_of, raw = [], [], [], []
    for i in range(n_layers):
        for t in targets:
            paths.append(spec.module_path(i, t))
            layer_of.append(i)
            mod_of.append(t)
            raw.append(profiles[exprs[t]][i])
    s = clean_signal(raw)  # [n_units]
    r = allocate(s, budget, rule, min_rank, max_rank, groups=np.asarray(layer_of), share=share)

    mean_rank = float(r[r > 0].mean())
    lora_alpha = round(alpha_ratio * math.sqrt(mean_rank), 4) if use_rslora else None
    units = tuple(
        ModuleRank(p, int(li), t, float(si), int(ri),
                   (plain_number(lora_alpha) if use_rslora else plain_number(alpha_ratio * ri)) if ri else 0)
        for p, li, t, si, ri in zip(paths, layer_of, mod_of, s, r)
    )
    if source is None:
        src = report.encoding.get("source") if hasattr(report, "encoding") else None
        source = src or ", ".join(f"{k}={report.attrs[k]}" for k in ("probe_set", "reference") if k in report.attrs)
    meta = {
        "signal": dict(signal) if isinstance(signal, Mapping) else signal,
        "signals": exprs, "rule": rule, "budget": int(budget), "min_rank": int(min_rank),
        "max_rank": int(max_rank), "share": share if rule == "cumulative" else None, "checkpoint": ck,
        "contrast": con, "runs": _runs_of(report),
        "modality_default": modality, "alpha_ratio": alpha_ratio, "use_rslora": bool(use_rslora),
        "lora_alpha": lora_alpha, "family": spec.family,
        "model_type": (getattr(getattr(model, "config", None), "model_type", None) if model is not None else None)
        or report.attrs.get("model_type") or (spec.model_types[0] if spec.model_types else None),
        "n_layers": n_layers, "decoder_layers": spec.decoder_layers, "targets": list(targets),
        "source": source or None, **library_versions(),
    }
    if notes:
        meta["warnings"] = notes
    sched = RankSchedule(units, meta)
    if model is not None:
        sched.check(model)
    return sched
