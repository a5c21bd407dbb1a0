"""The :class:`RankSchedule`: per-module LoRA ranks, their PEFT / axolotl export and their files.

A schedule holds one anchored full module path per adapted module, with its rank and alpha, plus
the metadata needed to reproduce it (:func:`driftlens.ranks.allocate_ranks` builds one from a drift
report). It exports a ``peft.LoraConfig`` (``rank_pattern`` / ``alpha_pattern``), a PEFT
adapter-config JSON or an axolotl YAML fragment (``lora_rank_pattern`` / ``lora_alpha_pattern``),
and reads both back (:meth:`RankSchedule.load`), refusing a damaged file with
:class:`~driftlens.errors.ScheduleFileError`.

Alpha: ``alpha = alpha_ratio * r`` per module, so the LoRA scaling ``alpha / r`` is the same
everywhere; with ``use_rslora=True`` one alpha ``alpha_ratio * sqrt(mean rank)`` serves every module
(rsLoRA's scaling ``alpha / sqrt(r)`` then equals ``alpha_ratio`` at the mean rank).

PEFT matching (peft >= 0.15): ``rank_pattern`` / ``alpha_pattern`` keys are regexes matched as
``re.match(rf"(.*\\.)?({key})$", module_name)``, first match wins. driftlens writes every key as
``"^" + re.escape(full_path)``: the ``^`` can only match at position 0 (the optional ``(.*\\.)?``
group must then be empty), the ``$`` ends it, so a key names exactly one module and never a suffix
of a vision-tower module. ``target_modules`` is the list of full paths (PEFT matches list entries
by equality or by a ``"." + entry`` suffix, which a path from the top-level model cannot be for
another module). With 20 or more targets PEFT may rewrite the list to an equivalent set of shorter
suffixes computed against the model it is applied to; the selected modules stay the same.
"""
from __future__ import annotations

import difflib
import json
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from driftlens.errors import ScheduleError, ScheduleFileError

Format = Literal["peft", "axolotl"]
FORMATS: tuple[Format, ...] = ("peft", "axolotl")
_AXOLOTL_META = "# driftlens-schedule: "
_MIN_PEFT = (0, 15)  # "^" in rank_pattern keys anchors from peft 0.15 on


@dataclass(frozen=True)
class ModuleRank:
    """One unit of a schedule: a module of one decoder layer, its signal and its rank (0: not adapted)."""

    path: str        # full module path from the top-level model
    layer: int
    module: str      # relative to the decoder block, e.g. "self_attn.q_proj"
    signal: float    # the cleaned signal the rule saw
    rank: int
    alpha: float


def pattern_key(path: str) -> str:
    """PEFT ``rank_pattern`` / ``alpha_pattern`` key naming exactly the module ``path``."""
    return "^" + re.escape(path)


def key_to_path(key: str) -> str:
    """Inverse of :func:`pattern_key`."""
    return re.sub(r"\\(.)", r"\1", key.removeprefix("^"))


def plain_number(x: float):
    """``x`` as an ``int`` when it is whole, else rounded to 6 decimals (what schedule files and metadata hold)."""
    x = float(x)
    return int(x) if x.is_integer() else round(x, 6)


def library_versions() -> dict:
    """The versions of transformers, peft and driftlens, for a schedule's metadata."""
    out = {}
    for mod in ("transformers", "peft"):
        try:
            out[f"{mod}_version"] = __import__(mod).__version__
        except ImportError:  # pragma: no cover - both are dependencies
            out[f"{mod}_version"] = None
    from driftlens._version import __version__

    out["driftlens_version"] = __version__
    return out


@dataclass
class RankSchedule:
    """Per-module LoRA ranks for one model architecture.

    Attributes
    ----------
    modules : tuple of ModuleRank
        Every unit considered, in (layer, target) order, including dropped ones (rank 0).
    meta : dict
        ``signal``, ``signals`` (resolved per target), ``rule``, ``budget``, ``min_rank``, ``max_rank``,
        ``share``, ``checkpoint``, ``alpha_ratio``, ``use_rslora``, ``lora_alpha`` (rsLoRA), ``family``,
        ``model_type``, ``n_layers``, ``decoder_layers``, ``targets``, ``source``,
        ``transformers_version``, ``peft_version``, ``driftlens_version``.
    """

    modules: tuple[ModuleRank, ...]
    meta: dict = field(default_factory=dict)

    # --- views ---------------------------------------------------------------------------------
    @property
    def adapted(self) -> list[ModuleRank]:
        """The modules with rank > 0."""
        return [m for m in self.modules if m.rank > 0]

    @property
    def ranks(self) -> dict[str, int]:
        """Full path -> rank, adapted modules only."""
        return {m.path: m.rank for m in self.adapted}

    @property
    def alphas(self) -> dict[str, float]:
        """``{module path: alpha}`` of the adapted modules."""
        return {m.path: m.alpha for m in self.adapted}

    @property
    def budget(self) -> int:
        """Sum of the ranks."""
        return int(sum(m.rank for m in self.modules))

    @property
    def n_layers(self) -> int:
        """Decoder layers of the model the schedule is for."""
        return int(self.meta.get("n_layers", max(m.layer for m in self.modules) + 1))

    @property
    def family(self):
        """The spec family (or None)."""
        return self.meta.get("family")

    @property
    def model_type(self):
        """The model's ``config.model_type`` (or None)."""
        return self.meta.get("model_type")

    @property
    def use_rslora(self) -> bool:
        """Whether the schedule exports ``use_rslora=True``."""
        return bool(self.meta.get("use_rslora", False))

    def layer_ranks(self) -> np.ndarray:
        """``[n_layers]`` total rank per decoder layer."""
        out = np.zeros(self.n_layers, dtype=np.int64)
        for m in self.modules:
            out[m.layer] += m.rank
        return out

    def layer_signal(self) -> np.ndarray:
        """``[n_layers]`` mean cleaned signal per decoder layer (over its units)."""
        tot = np.zeros(self.n_layers)
        cnt = np.zeros(self.n_layers)
        for m in self.modules:
            tot[m.layer] += m.signal
            cnt[m.layer] += 1
        return tot / np.maximum(cnt, 1)

    @property
    def base_rank(self) -> int:
        """Most common adapted rank (ties: the smaller); PEFT's ``r``, used for no module here."""
        c = Counter(m.rank for m in self.adapted)
        return min(c, key=lambda r: (-c[r], r))

    @property
    def base_alpha(self):
        """The exported ``lora_alpha``."""
        if self.use_rslora:
            return self.meta["lora_alpha"]
        return plain_number(self.meta.get("alpha_ratio", 2.0) * self.base_rank)

    @property
    def rank_pattern(self) -> dict[str, int]:
        """PEFT ``rank_pattern``: anchored full module names -> rank."""
        return {pattern_key(m.path): m.rank for m in self.adapted}

    @property
    def alpha_pattern(self) -> dict[str, float]:
        """PEFT ``alpha_pattern``: anchored full module names -> alpha (empty with rsLoRA)."""
        if self.use_rslora:
            return {}
        return {pattern_key(m.path): m.alpha for m in self.adapted}

    def __repr__(self) -> str:
        return (f"RankSchedule(family={self.family!r}, rule={self.meta.get('rule')!r}, "
                f"signal={self.meta.get('signal')!r}, budget={self.budget}, adapted={len(self.adapted)}/"
                f"{len(self.modules)}, layer_ranks={self.layer_ranks().tolist()})")

    # --- PEFT ------------------------------------------------------------------------------------
    def to_lora_config(self, model=None, **kwargs):
        """A ``peft.LoraConfig`` adapting exactly the scheduled modules at their ranks.

        Parameters
        ----------
        model : torch.nn.Module, optional
            When given, :meth:`check` runs first (architecture, layer count, module paths).
        **kwargs
            Passed to ``LoraConfig`` (``lora_dropout``, ``task_type``, ``bias``, ...); the fields the
            schedule owns (``r``, ``lora_alpha``, ``target_modules``, ``rank_pattern``, ``alpha_pattern``,
            ``use_rslora``, ``layers_to_transform``, ``layers_pattern``, ``exclude_modules``) cannot be
            overridden.
        """
        import peft
        from peft import LoraConfig

        _check_peft(peft.__version__)
        owned = {"r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora",
                 "layers_to_transform", "layers_pattern", "exclude_modules"}
        clash = sorted(owned & set(kwargs))
        if clash:
            raise ScheduleError(f"to_lora_config: {clash} are set by the schedule and cannot be overridden")
        if model is not None:
            self.check(model)
        return LoraConfig(r=self.base_rank, lora_alpha=self.base_alpha, target_modules=list(self.ranks),
                          rank_pattern=self.rank_pattern, alpha_pattern=self.alpha_pattern,
                          use_rslora=self.use_rslora, **kwargs)

    def get_peft_model(self, model, adapter_name: str = "default", **kwargs):
        """``peft.get_peft_model(model, self.to_lora_config(model, **kwargs))`` after :meth:`check`."""
        from peft import get_peft_model

        return get_peft_model(model, self.to_lora_config(model, **kwargs), adapter_name=adapter_name)

    def check(self, model) -> None:
        """Raise :class:`ScheduleError` unless ``model`` is the architecture this schedule was made for.

        Checks ``config.model_type`` (a model of another type is accepted only when its spec family is
        the same), the number of decoder layers, and that every scheduled path exists.
        """
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        mtype = getattr(getattr(base, "config", None), "model_type", None)
        if self.model_type is not None and mtype != self.model_type:
            family = None
            try:
                from driftlens.specs import load_spec

                family = load_spec(base).family
            except (ImportError, ValueError):  # no spec serves this model: another architecture
                family = None
            if family is None or family != self.family:
                raise ScheduleError(
                    f"this schedule was made for family {self.family!r} (model_type {self.model_type!r}); "
                    f"the model is {type(base).__name__} with model_type {mtype!r}"
                    + (f" (family {family!r})" if family else "")
                )
        names = {n for n, _ in base.named_modules()}
        dl = self.meta.get("decoder_layers")
        if dl:
            if dl not in names:
                raise ScheduleError(f"the model ({type(base).__name__}) has no module {dl!r} (the schedule's "
                                    f"decoder layers); nearest: {nearest_names(dl, names)}")
            n = len(base.get_submodule(dl))
            if n != self.n_layers:
                raise ScheduleError(f"the schedule covers {self.n_layers} decoder layers but the model has {n} "
                                    f"at {dl!r}")
        missing = [p for p in self.ranks if p not in names]
        if missing:
            raise ScheduleError(
                f"{len(missing)} scheduled module(s) do not exist in {type(base).__name__} "
                f"(model_type {mtype!r}), e.g. {missing[0]!r}; nearest existing: {nearest_names(missing[0], names)}"
            )

    # --- files ---------------------------------------------------------------------------------
    def _meta_block(self) -> dict:
        meta = dict(self.meta)
        meta["modules"] = [asdict(m) for m in self.modules]
        return meta

    def to_dict(self, format: Format = "peft") -> dict:
        """The exported fields: PEFT adapter-config keys, or axolotl's ``lora_*`` keys."""
        if format == "peft":
            d = {"peft_type": "LORA", "r": self.base_rank, "lora_alpha": self.base_alpha,
                 "target_modules": list(self.ranks), "rank_pattern": self.rank_pattern,
                 "alpha_pattern": self.alpha_pattern, "use_rslora": self.use_rslora}
            return d
        if format == "axolotl":
            d = {"adapter": "lora", "lora_r": self.base_rank, "lora_alpha": self.base_alpha,
                 "lora_target_modules": list(self.ranks), "lora_rank_pattern": self.rank_pattern}
            if self.use_rslora:
                d["peft_use_rslora"] = True
            else:
                d["lora_alpha_pattern"] = self.alpha_pattern
            return d
        raise ScheduleError(f"unknown format {format!r}; choose one of {list(FORMATS)}")

    def save(self, path: str | Path, format: Format | None = None) -> Path:
        """Write the schedule.

        Parameters
        ----------
        path : str or Path
        format : {"peft", "axolotl"}, optional
            ``peft``: JSON with the PEFT adapter-config fields and a ``driftlens`` block (metadata and
            every unit). ``axolotl``: YAML with ``adapter``, ``lora_r``, ``lora_alpha``,
            ``lora_target_modules``, ``lora_rank_pattern``, ``lora_alpha_pattern`` (or
            ``peft_use_rslora``), metadata in a ``# driftlens-schedule:`` comment line so the file stays
            a valid axolotl config fragment. Default: axolotl for ``.yaml`` / ``.yml``, else peft.

        The file is written atomically (a temporary file beside it, then a rename): a failed or
        killed write leaves the previous file intact. The drift report the schedule was computed
        from (``meta["source"]``) is never overwritten.

        Raises
        ------
        driftlens.errors.UsageError
            ``path`` is a URL or the schedule's source report.
        driftlens.errors.EnvironmentProblem
            The file cannot be written (no space, file-size limit, permissions); the message names it.
        """
        from driftlens.outputs import atomic_write, check_output, local

        path = local(path, "path")
        source = self.meta.get("source")
        check_output(path, [("drift report", source)] if isinstance(source, str) and source else [])
        if format is None:
            format = "axolotl" if path.suffix.lower() in (".yaml", ".yml") else "peft"
        body = self.to_dict(format)
        if format == "peft":
            body["driftlens"] = self._meta_block()
            text = json.dumps(body, indent=2) + "\n"
        else:
            import yaml

            text = (f"# LoRA rank schedule written by driftlens {self.meta.get('driftlens_version')}: rule "
                    f"{self.meta.get('rule')}, signal {self.meta.get('signal')}, budget {self.budget}\n"
                    + _AXOLOTL_META + json.dumps(self._meta_block(), separators=(",", ":")) + "\n"
                    + yaml.safe_dump(body, sort_keys=False, width=10_000))
        return atomic_write(path, text)

    @classmethod
    def load(cls, path) -> RankSchedule:
        """Read a schedule written by :meth:`save` (either format).

        Ranks and alphas come from the config fields (``rank_pattern`` / ``lora_rank_pattern``), so a
        hand-edited file is honoured; layer, target and signal come from the driftlens metadata.

        Raises
        ------
        FileNotFoundError
            No file at ``path``.
        ScheduleFileError
            (a :class:`ScheduleError`) The file is not UTF-8, not JSON / YAML, not a mapping, has no
            rank pattern or no driftlens metadata, or holds a value a schedule cannot have: a rank
            that is not a positive integer, an alpha that is negative or not finite, a metadata field
            missing or of the wrong type. The message names the file and the module path or field.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no rank schedule at {path}")
        body, meta = _read_schedule(path)
        cfg = _config_fields(body, path)
        if meta is None:
            raise ScheduleFileError(f"{path}: not a driftlens rank schedule (no driftlens metadata)")
        meta = _check_meta(meta, path)
        ranks, alphas = cfg["ranks"], cfg["alphas"]
        units = []
        for u in meta.pop("modules"):
            r = ranks.pop(u["path"], 0)
            a = cfg["lora_alpha"] if cfg["use_rslora"] else alphas.pop(u["path"], u["alpha"])
            units.append(ModuleRank(u["path"], u["layer"], u["module"], float(u["signal"]), r,
                                    plain_number(a) if r else 0))
        if ranks:
            raise ScheduleFileError(f"{path}: rank pattern names modules that the metadata does not list: "
                                    f"{sorted(ranks)[:3]}")
        if alphas and not cfg["use_rslora"]:
            raise ScheduleFileError(f"{path}: alpha pattern names modules that the metadata does not list: "
                                    f"{sorted(alphas)[:3]}")
        meta["use_rslora"] = cfg["use_rslora"]
        if cfg["use_rslora"]:
            meta["lora_alpha"] = cfg["lora_alpha"]
        return cls(tuple(units), meta)


# the metadata fields a schedule reads back; every file RankSchedule.save writes has them
_META_REQUIRED = ("modules", "n_layers", "decoder_layers", "targets", "family", "model_type", "rule", "alpha_ratio")
_UNIT_REQUIRED = ("path", "layer", "module", "signal", "alpha")
_MAX_RANK = 2 ** 31 - 1


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _read_schedule(path: Path) -> tuple[dict, object]:
    """(config mapping, driftlens metadata or None) of a schedule file; JSON when it starts with ``{``."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ScheduleFileError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None
    if text.lstrip().startswith("{"):
        body = _json_value(text, path, "the file")
        if not isinstance(body, dict):  # pragma: no cover - a text starting with "{" parses to a dict or fails
            raise ScheduleFileError(f"{path}: expected a JSON object, got {type(body).__name__}")
        return body, body.get("driftlens")
    body = _yaml_value(text, path)
    meta = None
    for n, line in enumerate(text.splitlines(), start=1):
        if line.startswith(_AXOLOTL_META):
            meta = _json_value(line[len(_AXOLOTL_META):], path, f"line {n} (driftlens metadata)")
    return body, meta


def _json_value(text: str, path: Path, what: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ScheduleFileError(f"{path}: {what} is not valid JSON ({exc.msg} at line {exc.lineno}, "
                                f"column {exc.colno})") from None
    except RecursionError:
        raise ScheduleFileError(f"{path}: {what} is not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # e.g. an integer beyond the str -> int digit limit
        raise ScheduleFileError(f"{path}: {what} is not valid JSON ({_one_line(exc)})") from None


def _yaml_value(text: str, path: Path) -> dict:
    import yaml

    try:
        body = yaml.safe_load(text)
    except RecursionError:
        raise ScheduleFileError(f"{path}: not valid YAML (nested too deeply)") from None
    except (yaml.YAMLError, ValueError, TypeError, OverflowError) as exc:  # bad dates, tags, keys
        raise ScheduleFileError(f"{path}: not valid YAML ({_one_line(exc)})") from None
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise ScheduleFileError(f"{path}: expected a mapping of PEFT fields (JSON object) or axolotl fields "
                                f"(YAML mapping), got a {type(body).__name__}")
    return body


def _config_fields(body: dict, path: Path) -> dict:
    """Ranks, alphas and the rsLoRA fields of a PEFT (JSON) or axolotl (YAML) body, checked."""
    peft = "rank_pattern" in body or "lora_rank_pattern" not in body
    names = (("rank_pattern", "alpha_pattern", "use_rslora") if peft
             else ("lora_rank_pattern", "lora_alpha_pattern", "peft_use_rslora"))
    rp, ap, rs = (body.get(k) for k in names)
    if not isinstance(rp, dict) or not rp:
        raise ScheduleFileError(f"{path}: no rank pattern (rank_pattern / lora_rank_pattern) found")
    rs = False if rs is None else rs
    if not isinstance(rs, bool):
        raise ScheduleFileError(f"{path}: {names[2]} must be true or false, got {rs!r}")
    ranks = {p: _rank(v, path, p) for p, v in _pattern(rp, path, names[0]).items()}
    alphas = {p: _alpha(v, path, f"alpha of {p!r}") for p, v in _pattern(ap or {}, path, names[1]).items()}
    alpha0 = _alpha(body.get("lora_alpha"), path, "lora_alpha (the rsLoRA alpha)") if rs else None
    return {"ranks": ranks, "alphas": alphas, "use_rslora": rs, "lora_alpha": alpha0}


def _pattern(pattern, path: Path, name: str) -> dict:
    """``{module path: value}`` from a ``rank_pattern``-like mapping of anchored keys."""
    if not isinstance(pattern, dict):
        raise ScheduleFileError(f"{path}: {name} must be a mapping of module patterns, got {type(pattern).__name__}")
    bad = [k for k in pattern if not isinstance(k, str) or not k]
    if bad:
        raise ScheduleFileError(f"{path}: {name} has a key {bad[0]!r} that is not a module pattern string")
    out = {key_to_path(k): v for k, v in pattern.items()}
    if len(out) < len(pattern):
        twice = Counter(key_to_path(k) for k in pattern).most_common(1)[0][0]
        raise ScheduleFileError(f"{path}: {name} names module {twice!r} twice")
    return out


def _rank(value, path: Path, module: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= _MAX_RANK:
        raise ScheduleFileError(f"{path}: rank of {module!r} must be a positive integer, got {value!r} "
                                f"(leave a module out of the rank pattern to not adapt it)")
    return int(value)


def _finite(value) -> bool:
    """Whether ``value`` is an int or float (not a bool) with a finite float value."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer beyond the float range
        return False


def _alpha(value, path: Path, what: str):
    """``value`` if it is a finite number >= 0, else :class:`ScheduleFileError` naming ``what``."""
    if not _finite(value) or value < 0:
        raise ScheduleFileError(f"{path}: {what} must be a finite number >= 0, got {value!r}")
    return value


def _check_meta(meta, path: Path) -> dict:
    """The driftlens metadata block, checked field by field; returns a copy."""
    where = f"{path}: driftlens metadata"
    if not isinstance(meta, dict):
        raise ScheduleFileError(f"{where} must be a mapping, got {type(meta).__name__}")
    missing = [k for k in _META_REQUIRED if k not in meta]
    if missing:
        raise ScheduleFileError(f"{where} lacks field(s) {missing}; it was not written by driftlens or was cut")
    meta = dict(meta)
    n = meta["n_layers"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ScheduleFileError(f"{where}: n_layers must be a positive integer, got {n!r}")
    checks = (("decoder_layers", lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
              ("targets", lambda v: isinstance(v, list) and bool(v) and all(isinstance(t, str) for t in v),
               "a non-empty list of strings"),
              ("family", lambda v: v is None or isinstance(v, str), "a string or null"),
              ("model_type", lambda v: v is None or isinstance(v, str), "a string or null"),
              ("rule", lambda v: isinstance(v, str), "a string"),
              ("signals", lambda v: v is None or isinstance(v, dict), "a mapping or null"),
              ("modules", lambda v: isinstance(v, list) and bool(v), "a non-empty list of units"))
    for key, ok, kind in checks:
        if key in meta and not ok(meta[key]):
            raise ScheduleFileError(f"{where}: {key} must be {kind}, got {meta[key]!r}")
    _alpha(meta["alpha_ratio"], path, "driftlens metadata: alpha_ratio")
    meta["modules"] = _check_units(meta, path)
    return meta


def _check_units(meta: dict, path: Path) -> list[dict]:
    """Every unit of ``meta["modules"]``: fields present and typed, path = decoder_layers.layer.module."""
    units, seen = [], set()
    for i, u in enumerate(meta["modules"]):
        where = f"{path}: driftlens metadata, modules[{i}]"
        if not isinstance(u, dict):
            raise ScheduleFileError(f"{where} must be a mapping, got {type(u).__name__}")
        missing = [k for k in _UNIT_REQUIRED if k not in u]
        if missing:
            raise ScheduleFileError(f"{where} ({u.get('path', '?')!r}) lacks field(s) {missing}")
        p, layer, module, signal = u["path"], u["layer"], u["module"], u["signal"]
        if not isinstance(p, str) or not isinstance(module, str):
            raise ScheduleFileError(f"{where}: path and module must be strings, got {p!r} and {module!r}")
        if module not in meta["targets"]:
            raise ScheduleFileError(f"{where} ({p!r}): module {module!r} is not one of the metadata's targets "
                                    f"{meta['targets']}")
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < meta["n_layers"]:
            raise ScheduleFileError(f"{where} ({p!r}): layer must be an integer in 0..{meta['n_layers'] - 1}, "
                                    f"got {layer!r}")
        if p != f"{meta['decoder_layers']}.{layer}.{module}":
            raise ScheduleFileError(f"{where}: path {p!r} is not decoder_layers.layer.module = "
                                    f"{meta['decoder_layers']!r}.{layer}.{module!r}")
        if p in seen:
            raise ScheduleFileError(f"{where}: module {p!r} is listed twice")
        seen.add(p)
        if not _finite(signal):
            raise ScheduleFileError(f"{where} ({p!r}): signal must be a finite number, got {signal!r}")
        _alpha(u["alpha"], path, f"driftlens metadata, modules[{i}] ({p!r}): alpha")
        units.append(u)
    covered = {u["layer"] for u in units}
    if covered != set(range(meta["n_layers"])):
        raise ScheduleFileError(f"{path}: driftlens metadata has n_layers {meta['n_layers']} but lists units for "
                                f"layers {sorted(covered)}")
    return units


def _check_peft(version: str) -> None:
    parts = tuple(int(p) for p in re.findall(r"\d+", version)[:2])
    if parts < _MIN_PEFT:
        raise ScheduleError(f"peft {version} does not anchor rank_pattern keys with '^'; driftlens schedules "
                            f"need peft >= {'.'.join(map(str, _MIN_PEFT))}")


def nearest_names(name: str, names, n: int = 3) -> list[str]:
    """The ``n`` names of ``names`` closest to ``name`` (for "did you mean" in an error)."""
    return difflib.get_close_matches(name, sorted(names), n=n, cutoff=0.0)
