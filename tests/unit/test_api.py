"""The public API's promises: one error family, all of it exported; typed entry points; no flag that
changes a return type; the fixed names spelled once."""
from __future__ import annotations

import importlib
import inspect
import pkgutil
import typing
from importlib import resources

import distributed
import pytest
import torch
import xarray as xr

import driftlens as dl
from driftlens import registry, schema
from driftlens.probes import ProbeSet
from driftlens.specs import Spec

CORE = [m.name for m in pkgutil.iter_modules(dl.__path__, "driftlens.") if not m.ispkg and m.name != "driftlens.cli"]


def _classes():
    for name in CORE:
        mod = importlib.import_module(name)
        for obj in vars(mod).values():
            if inspect.isclass(obj) and obj.__module__ == name:
                yield obj


def test_every_error_derives_from_the_base_and_is_exported():
    errors = [c for c in _classes() if issubclass(c, BaseException)]
    assert len(errors) >= 10
    for cls in errors:
        assert issubclass(cls, dl.DriftlensError), cls
        assert getattr(dl, cls.__name__, None) is cls, f"{cls.__module__}.{cls.__name__} is not exported by driftlens"
        assert cls.__name__ in dl.__all__


ENTRY_POINTS = [dl.capture, dl.drift, dl.allocate_ranks, dl.open_store]
NAMESPACE = {"torch": torch, "xr": xr, "ProbeSet": ProbeSet, "Spec": Spec, "Client": distributed.Client}


@pytest.mark.parametrize("fn", ENTRY_POINTS, ids=lambda f: f.__name__)
def test_entry_points_are_fully_annotated_and_the_annotations_resolve(fn):
    sig = inspect.signature(fn)
    unannotated = [p for p, v in sig.parameters.items() if v.annotation is inspect.Parameter.empty]
    assert not unannotated, f"{fn.__name__}: parameters without a type: {unannotated}"
    assert sig.return_annotation is not inspect.Signature.empty
    hints = typing.get_type_hints(fn, localns=NAMESPACE)      # raises on a misspelt name
    assert set(hints) == set(sig.parameters) | {"return"}


def _literal_values(tp) -> set:
    out = set()
    for arg in typing.get_args(tp) or ():
        out |= _literal_values(arg) if typing.get_origin(arg) is not None else {arg}
    return out if typing.get_origin(tp) is not None else {tp}


@pytest.mark.parametrize("fn, param, values", [
    (dl.drift, "metrics", set(registry.BUILTIN) | set(registry.ALIASES)),   # every registered name
    (dl.drift, "correction", {"bh", "holm", type(None)}),
    (dl.drift, "verify", {"full", "fast", "none"}),
    (dl.drift, "sites", set(schema.SITES)),
    (dl.allocate_ranks, "rule", {"proportional", "waterfill", "cumulative", "uniform"}),
    (dl.capture, "dtype", {"float32", "float16"}),
    (dl.open_store, "verify", {"full", "fast", "none"}),
])
def test_option_strings_are_literal_types(fn, param, values):
    hint = typing.get_type_hints(fn, localns=NAMESPACE)[param]
    assert values <= _literal_values(hint), f"{fn.__name__}({param}=...): {hint}"


def test_no_flag_changes_a_return_type():
    """Details come from a second function or a result object, never from return_x= / as_x= / per_x=."""
    def functions():
        for name in CORE:
            mod = importlib.import_module(name)
            for fname, obj in vars(mod).items():
                if getattr(obj, "__module__", None) != name or fname.startswith("_"):
                    continue
                if inspect.isfunction(obj):
                    yield f"{name}.{fname}", obj
                elif inspect.isclass(obj):
                    for mname, meth in vars(obj).items():
                        if inspect.isfunction(meth) and (not mname.startswith("_") or mname == "__call__"):
                            yield f"{name}.{fname}.{mname}", meth

    offenders = [f"{where}({p})" for where, fn in functions()
                 for p, v in inspect.signature(fn).parameters.items()
                 if p.startswith(("return_", "as_", "per_")) and isinstance(v.default, bool)]
    assert len(list(functions())) > 100
    assert not offenders


def test_the_fixed_names_are_defined_once():
    capture, store = importlib.import_module("driftlens.capture"), importlib.import_module("driftlens.store")
    assert capture.SITES is schema.SITES and store.SITE_DIMS is schema.SITE_DIMS
    assert set(schema.SITE_DIMS) == set(schema.SITES)
    assert set(typing.get_args(schema.Site)) == set(schema.SITES)
    assert set(typing.get_args(schema.Modality)) == set(schema.MODALITIES)


def test_the_package_ships_its_type_marker():
    assert resources.files("driftlens").joinpath("py.typed").is_file()
