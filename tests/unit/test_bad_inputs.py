"""Bad inputs and faults through the CLI (subprocesses) and the API, on synthetic stores (no model).

Every case asserts what a user sees: the exit code of its kind (usage 2, data 3, environment 4),
one ``driftlens <command>: error:`` line naming the file / flag / value at fault, no traceback, and
stores and reports on disk unchanged. The capture-side cases (a model is loaded) are in
``tests/integration/test_bad_inputs_capture.py``.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import xarray as xr

import driftlens as dl
from driftlens.errors import DataError, DriftlensError, StoreIntegrityError
from driftlens.store import open_store, verify_store
from driftlens.testing import make_store

from ..badinput import clean_exit, cli, refused, snapshot

pytestmark = pytest.mark.heavy      # simulations / CLI subprocesses: not in `dev.py test --fast`

FAST = ("--permutations", "20", "--bootstrap", "20", "--no-progress")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A synthetic store (24 scenes x 2 renders, 3 checkpoints) and its report."""
    root = tmp_path_factory.mktemp("bad")
    store = make_store(root / "s.zarr")
    report = root / "r.nc"
    dl.drift(store, metrics=("mmd",), n_permutations=20, n_bootstrap=20, progress=False, out=report)
    return store, report


@pytest.fixture
def store(pristine, tmp_path):
    """A fresh copy of the synthetic store, to damage."""
    return shutil.copytree(pristine[0], tmp_path / "s.zarr")


def _chunk(store, label="shifted", site="hidden", layer=1):
    from driftlens.store import checkpoint_chunks

    index = json.loads((store / "zarr.json").read_text())["attributes"]["checkpoints"].index(label)
    rel = next(r for r, lay, _ in checkpoint_chunks(store, site, index) if lay == layer)
    return store / rel


# ------------------------------------------------------------------ store integrity (silent case 1)

@pytest.mark.parametrize("damage", ["delete", "truncate", "alter"])
def test_damaged_chunk_is_refused_before_any_metric(store, tmp_path, damage):
    f = _chunk(store)
    if damage == "delete":
        f.unlink()
    elif damage == "truncate":
        f.write_bytes(f.read_bytes()[:100])
    else:
        data = bytearray(f.read_bytes())
        data[40] ^= 0xFF
        f.write_bytes(bytes(data))
    before = snapshot(store)
    out = tmp_path / "r.nc"
    err = refused(cli("drift", store, "--out", out, *FAST), "data",
                  "checkpoint 'shifted'", "site 'hidden'", "layer 1", f.relative_to(store).as_posix(),
                  "--overwrite shifted")
    assert {"delete": "missing", "truncate": "bytes, expected", "alter": "CRC32"}[damage] in err
    assert not out.exists() and not out.with_suffix(".nc.tmp").exists()
    assert snapshot(store) == before
    refused(cli("check", store), "data", "shifted")
    with pytest.raises(StoreIntegrityError, match="shifted"):       # the API: before anything is read
        dl.drift(store, progress=False)
    if damage != "alter":                                           # presence and size: on every open
        with pytest.raises(StoreIntegrityError):
            open_store(store)
    else:                                  # contents: drift checks a store opened and selected by the user
        ds = open_store(store).sel(layer=[0, 1])
        with pytest.raises(StoreIntegrityError, match="layer 1"):
            dl.drift(ds, metrics=("mmd",), progress=False)


def test_every_single_chunk_damage_is_detected(pristine, tmp_path):
    """Deleting, cutting or flipping a byte of any one chunk file is found by the full check."""
    from driftlens.store import checkpoint_chunks

    store = shutil.copytree(pristine[0], tmp_path / "s.zarr")
    attrs = json.loads((store / "zarr.json").read_text())["attributes"]
    files = [store / rel for site in attrs["sites"] for i, _ in enumerate(attrs["completed"])
             for rel, _, _ in checkpoint_chunks(store, site, i)]
    assert len(files) >= 9
    for f in files:
        original = f.read_bytes()
        for damage in (b"", original[:-4], original[:8] + bytes([original[8] ^ 1]) + original[9:]):
            f.write_bytes(damage)
            problems, _ = verify_store(store, "full")
            assert [p.file for p in problems] == [f.relative_to(store).as_posix()], f
        f.write_bytes(original)
    assert verify_store(store, "full") == ([], [])


def test_dataset_assembled_from_two_stores_is_not_checked_against_one(pristine, tmp_path):
    """xr.concat keeps the first store's attrs: drift must not verify the other's labels there."""
    other = make_store(tmp_path / "o.zarr", seed=1)
    a = open_store(pristine[0]).sel(checkpoint=["base"])
    b = open_store(other).sel(checkpoint=["shifted"]).assign_coords(checkpoint=["other-shifted"])
    rep = dl.drift(xr.concat([a, b], "checkpoint"), metrics=("mmd",), n_permutations=20, n_bootstrap=20,
                   progress=False)
    assert list(rep.checkpoint.values) == ["base", "other-shifted"]


def test_check_on_intact_store(pristine):
    out = clean_exit(cli("check", pristine[0]))
    assert out == ""


def test_damaged_metadata_is_named(store):
    (store / "zarr.json").write_text("{not json")
    refused(cli("drift", store, *FAST), "data", "zarr.json")
    refused(cli("check", store), "data", "zarr.json")


def test_damaged_record_is_named(store):
    rec = store / "checkpoint" / "records" / "1.json"
    rec.write_text("[]")
    refused(cli("drift", store, *FAST), "data", "1.json")


# ------------------------------------------------------------------ drift: values at the edge

@pytest.mark.parametrize("args, kind, named", [
    (("--blur", "-1"), "usage", "--blur"),
    (("--permutations", "0"), "usage", "--permutations"),
    (("--bootstrap", "-5"), "usage", "--bootstrap"),
    (("--level", "1.5"), "usage", "--level"),
    (("--sites", "hiden"), "usage", "hiden"),
    (("--reference", "nope"), "usage", "nope"),
    (("--metrics", "mmdd"), "usage", "mmdd"),
    (("--device", "cuda:0"), "environment", "cuda"),
    (("--device", "tpu9"), "usage", "tpu9"),
])
def test_drift_flags(pristine, tmp_path, args, kind, named):
    if kind == "environment":
        import torch

        if torch.cuda.is_available():
            pytest.skip("CUDA is available here")
    out = tmp_path / "r.nc"
    refused(cli("drift", pristine[0], "--out", out, *args, *FAST), kind, named)
    assert not out.exists()


def test_drift_out_paths_checked_before_computing(pristine, tmp_path):
    refused(cli("drift", pristine[0], "--out", tmp_path, *FAST), "usage", str(tmp_path), "folder")
    assert list(tmp_path.iterdir()) == []                       # no <out>.tmp left behind
    blocker = tmp_path / "file"
    blocker.write_text("x")
    refused(cli("drift", pristine[0], "--out", blocker / "r.nc", *FAST), "usage", "file")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes anywhere")
def test_drift_out_not_writable(pristine, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        refused(cli("drift", pristine[0], "--out", ro / "r.nc", *FAST), "environment", "not writable")
    finally:
        ro.chmod(0o700)


@pytest.mark.parametrize("what", ["missing", "file", "other folder", "other zarr"])
def test_not_a_store(tmp_path, what):
    path = tmp_path / "x"
    if what == "file":
        path.write_text("x")
    elif what == "other folder":
        path.mkdir()
        (path / "a.txt").write_text("x")
    elif what == "other zarr":
        import zarr

        zarr.open_group(str(path), mode="w", zarr_format=3)
    refused(cli("drift", path, *FAST), "data", str(path))


# ------------------------------------------------------------------ degenerate data (silent cases 5)

def test_two_images_give_finite_values_and_a_recorded_warning(tmp_path):
    store = make_store(tmp_path / "two.zarr", n_clusters=2, renders=1)
    out = tmp_path / "r.nc"
    err = clean_exit(cli("drift", store, "--out", out, *FAST))
    assert "driftlens drift: warning:" in err and "2 clusters" in err
    rep = dl.load_report(out)
    assert "2 clusters" in rep.attrs["warnings"]
    other = rep.sel(checkpoint=["same", "shifted"])
    for v in ("mmd", "mmd_lo", "mmd_hi", "mmd_p"):
        assert np.isfinite(other[v].values).all(), v
    with pytest.warns(UserWarning, match="2 clusters"):           # the schedule repeats the caveat
        sched = dl.allocate_ranks(rep, budget=64, checkpoint="shifted")
    assert sched.budget == 64 and all(np.isfinite(m.signal) for m in sched.modules)
    err = clean_exit(cli("ranks", out, "--budget", "64", "--checkpoint", "shifted", "--out", tmp_path / "ranks.json"))
    assert "driftlens ranks: warning: the drift report says:" in err


def test_unwritable_output_is_an_environment_error(pristine, tmp_path, monkeypatch):
    """Permission checks without relying on the user (root writes anywhere): os.access says no."""
    from driftlens.capture import _check_out
    from driftlens.errors import EnvironmentProblem
    from driftlens.report import check_report_path

    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    with pytest.raises(EnvironmentProblem, match="not writable"):
        check_report_path(tmp_path / "r.nc")
    with pytest.raises(EnvironmentProblem, match="not writable"):
        _check_out(tmp_path / "s.zarr")


def test_one_cluster_is_refused(tmp_path):
    store = make_store(tmp_path / "one.zarr", n_clusters=1, renders=2)
    refused(cli("drift", store, *FAST), "usage", "1 cluster")


def test_incomplete_store_is_reported(store, tmp_path):
    import zarr

    root = zarr.open_group(str(store), mode="r+")
    root.attrs["completed"] = ["base"]                              # 'same' and 'shifted' unfinished
    out = tmp_path / "r.nc"
    err = clean_exit(cli("drift", store, "--out", out, *FAST))
    assert "['same', 'shifted'] were started but their capture did not finish" in err
    assert "only the reference" in err
    assert "did not finish" in dl.load_report(out).attrs["warnings"]


# ------------------------------------------------------------------ plot and ranks on bad reports

def test_plot_refusals(pristine, tmp_path):
    report = pristine[1]
    empty = tmp_path / "empty.nc"
    dl.load_report(report).isel(checkpoint=slice(0, 0)).to_netcdf(empty, engine="h5netcdf")
    png = tmp_path / "figs"
    refused(cli("plot", empty, "--out", png), "data", "no checkpoint")
    refused(cli("plot", report, "--var", "nope", "--out", png), "usage", "'nope'")
    refused(cli("plot", report, "--site", "hiden", "--out", png), "usage", "'hiden'")
    refused(cli("plot", report, "--schedule", tmp_path / "no-ranks.json", "--out", png), "data", "no-ranks.json")
    refused(cli("plot", tmp_path / "missing.nc"), "data", "missing.nc")
    junk = tmp_path / "junk.nc"
    junk.write_bytes(b"\x89HDF not really")
    refused(cli("plot", junk, "--out", png), "data", "junk.nc")
    assert not png.exists()


def test_ranks_refuses_a_module_the_family_lacks(pristine, tmp_path):
    out = tmp_path / "ranks.json"
    refused(cli("ranks", pristine[1], "--budget", "32", "--modules", "self_attn.kproj", "--out", out),
            "usage", "self_attn.kproj")
    assert not out.exists()


# ------------------------------------------------------------------ the error family

def test_every_library_error_is_a_driftlens_error():
    from driftlens.capture import CaptureError
    from driftlens.drift import DriftError
    from driftlens.errors import ScheduleError
    from driftlens.probes import ProbeError
    from driftlens.sources import SourceError
    from driftlens.specs import SpecError
    from driftlens.store import StoreMismatchError

    for cls in (CaptureError, DriftError, ProbeError, ScheduleError, SourceError, SpecError,
                StoreMismatchError, StoreIntegrityError, DataError):
        assert issubclass(cls, DriftlensError) and issubclass(cls, ValueError), cls


def test_debug_shows_the_traceback(tmp_path):
    r = cli("--debug", "drift", tmp_path / "missing")
    assert r.returncode != 0 and "Traceback" in r.stderr
    r = cli("drift", tmp_path / "missing", "--debug")
    assert "Traceback" in r.stderr


def test_report_and_store_readable_after_refusals(pristine):
    """The shared fixtures are untouched by every case above (each damaged a copy)."""
    assert verify_store(pristine[0], "full") == ([], [])
    assert isinstance(dl.load_report(pristine[1]), xr.Dataset)


# ------------------------------------------------------------------ issue 22: outputs never inside an input

def _fsize_limit(nbytes):
    """``preexec_fn`` of a subprocess: a file-size limit of ``nbytes`` (``ulimit -f``)."""
    import resource

    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))


def _no_tmp(folder):
    return [p.name for p in folder.rglob("*.tmp")]


@pytest.mark.parametrize("case", ["zarr.json", "chunk", "symlink"])
def test_drift_out_inside_the_store_is_refused(store, tmp_path, case):
    """Silent case: `drift st.zarr --out st.zarr/zarr.json` replaced the store's metadata (exit 0)."""
    if case == "zarr.json":
        out = store / "zarr.json"
    elif case == "chunk":
        out = _chunk(store, "base", "hidden", 0)
    else:
        link = tmp_path / "link"
        link.symlink_to(store, target_is_directory=True)
        out = link / "zarr.json"
    before = snapshot(store)
    refused(cli("drift", store, "--out", out, *FAST), "usage", str(out), str(store), "inside")
    assert snapshot(store) == before
    with pytest.raises(DriftlensError, match="inside the activation store"):
        dl.drift(store, out=out, progress=False)
    assert snapshot(store) == before


def test_report_outputs_inside_an_input_are_refused(pristine, tmp_path):
    """`ranks R.nc --out R.nc` overwrote the report with the schedule; plot / --plot / save_report alike."""
    from driftlens.errors import UsageError

    report = shutil.copy(pristine[1], tmp_path / "r.nc")
    before = snapshot(report)
    refused(cli("ranks", report, "--budget", "32", "--checkpoint", "shifted", "--out", report), "usage", "--out",
            str(report))
    refused(cli("ranks", report, "--budget", "32", "--checkpoint", "shifted", "--out", tmp_path / "k.json", "--plot",
                report),
            "usage", "--plot", str(report))
    refused(cli("ranks", report, "--budget", "32", "--checkpoint", "shifted", "--out", tmp_path / "k.png", "--plot",
                tmp_path / "k.png"),
            "usage", "--out", "--plot")
    refused(cli("plot", report, "--out", pristine[0] / "figures"), "usage", str(pristine[0]))
    assert snapshot(report) == before and not (tmp_path / "k.json").exists()
    rep = dl.load_report(report)
    sched = dl.allocate_ranks(rep, budget=32, source=str(report), checkpoint="shifted")
    with pytest.raises(UsageError, match="drift report"):
        sched.save(report)
    with pytest.raises(UsageError, match="activation store"):
        dl.save_report(rep, pristine[0] / "copy.nc")
    with pytest.raises(UsageError, match="activation store"):
        dl.plot.plot_report(rep, pristine[0] / "figures")
    renamed = shutil.copy(report, tmp_path / "mmd_heatmap_hidden_visual.png")   # a report named like a figure
    with pytest.raises(UsageError, match="drift report"):
        dl.plot.plot_report(dl.load_report(renamed), tmp_path)
    assert snapshot(report) == before
    assert verify_store(pristine[0], "full") == ([], []) and not (pristine[0] / "figures").exists()


@pytest.mark.parametrize("url", ["memory://r.nc", "s3://bucket/r.nc"])
def test_report_to_a_url_is_refused(pristine, tmp_path, url):
    """`drift --out memory://x.nc` made a local folder `memory:` and exited 0."""
    r = cli("drift", pristine[0], "--out", url, *FAST, cwd=tmp_path)
    refused(r, "usage", url, "local path")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ issue 22: atomic writes

def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    from driftlens.errors import EnvironmentProblem
    from driftlens.outputs import atomic_path, atomic_write

    target = atomic_write(tmp_path / "a.json", '{"v": 1}')
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:     # the writer dies mid-file
        tmp.write_text('{"v": 2, "trunc')
        raise RuntimeError("killed")
    assert target.read_text() == '{"v": 1}' and os.listdir(tmp_path) == ["a.json"]
    import errno

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(EnvironmentProblem, match=r"cannot write .*a\.json: no space left"):
        atomic_write(target, '{"v": 3}')
    assert target.read_text() == '{"v": 1}' and os.listdir(tmp_path) == ["a.json"]


def test_two_writers_use_distinct_temporary_names(tmp_path):
    from driftlens.outputs import atomic_path

    with atomic_path(tmp_path / "x") as a, atomic_path(tmp_path / "x") as b:
        assert a != b and a.parent == b.parent == tmp_path
        a.write_text("a")
        b.write_text("b")
    assert (tmp_path / "x").read_text() == "a" and os.listdir(tmp_path) == ["x"]


def test_file_size_limit_on_a_schedule_keeps_the_previous_one(pristine, tmp_path):
    """`ulimit -f 2` truncated the previous ranks.json ("File too large", no file named)."""
    out = tmp_path / "ranks.json"
    clean_exit(cli("ranks", pristine[1], "--budget", "32", "--checkpoint", "shifted", "--out", out))
    before = out.read_bytes()
    assert len(before) > 2048
    r = cli("ranks", pristine[1], "--budget", "40", "--checkpoint", "shifted", "--out", out,
            preexec_fn=_fsize_limit(2048))
    refused(r, "environment", str(out), "file-size limit")
    assert out.read_bytes() == before and _no_tmp(tmp_path) == []


def test_file_size_limit_on_a_report_is_a_clean_error(pristine, tmp_path):
    """`ulimit -f 8` during a report write: segmentation fault after h5py tracebacks, a stale .tmp."""
    out = shutil.copy(pristine[1], tmp_path / "r.nc")
    before = out.read_bytes()
    assert len(before) > 8192
    r = cli("drift", pristine[0], "--out", out, "--seed", "3", *FAST, preexec_fn=_fsize_limit(8192))
    refused(r, "environment", str(out), "file-size limit")
    assert out.read_bytes() == before and _no_tmp(tmp_path) == []


def test_file_size_limit_on_a_figure_keeps_the_previous_one(pristine, tmp_path):
    figs = tmp_path / "figs"
    clean_exit(cli("plot", pristine[1], "--out", figs, "--var", "mmd", "--site", "hidden"))
    before = snapshot(figs)
    r = cli("plot", pristine[1], "--out", figs, "--var", "mmd", "--site", "hidden", "--svg",
            preexec_fn=_fsize_limit(4096))
    refused(r, "environment", str(figs))
    assert {k: v for k, v in snapshot(figs).items() if k.endswith(".png")} == before
    assert _no_tmp(figs) == []


# ------------------------------------------------------------------ issue 22: silent misuse

@pytest.mark.parametrize("image", ["../secret.png", "../../secret.png", "a/../../secret.png", "..\\secret.png"])
def test_manifest_path_leaving_its_folder_is_refused(tmp_path, image):
    """`../../secret.png` in a manifest was read while absolute paths were refused."""
    from driftlens.probes import ProbeError, ProbeSet

    folder = tmp_path / "set" / "deep"
    folder.mkdir(parents=True)
    (tmp_path / "secret.png").write_bytes(b"")
    (tmp_path / "set" / "secret.png").write_bytes(b"")
    row = {"id": "p0", "image": image, "lang": "en", "prompt": "Describe.", "answer": "", "group": "g"}
    (folder / "manifest.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(ProbeError, match="leads out of the manifest's folder"):
        ProbeSet.load(folder / "manifest.jsonl")
    refused(cli("capture", tmp_path, "--probes", folder / "manifest.jsonl", "--out", tmp_path / "s.zarr"),
            "data", "secret.png", "leads out", "manifest.jsonl")


# ------------------------------------------------------------------ issue 22: Dask addresses that never answer

@pytest.fixture
def silent_port():
    """A TCP port that accepts connections and never says a word."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held, stop = [], threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"tcp://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for c in held:
        c.close()
    server.close()


def test_scheduler_that_never_answers_fails_in_bounded_time(pristine, tmp_path, silent_port):
    """`--scheduler` at a port that accepts and never replies hung for ever (the 30 s timeout never fired)."""
    import time

    out = tmp_path / "r.nc"
    t0 = time.perf_counter()
    r = cli("drift", pristine[0], "--scheduler", silent_port, "--dask-timeout", "2", "--out", out, *FAST,
            timeout=90)
    refused(r, "environment", silent_port, "did not answer within 4 s", "--dask-timeout")
    assert time.perf_counter() - t0 < 60 and not out.exists()


def test_scheduler_without_workers_fails_in_bounded_time(pristine, tmp_path, monkeypatch):
    """A scheduler with no workers: drift waited for ever on tasks no worker would run."""
    distributed = pytest.importorskip("distributed")
    from driftlens.errors import EnvironmentProblem

    out = tmp_path / "r.nc"
    with distributed.LocalCluster(n_workers=0, processes=False, protocol="tcp", dashboard_address=":0") as cluster:
        address = cluster.scheduler_address
        r = cli("drift", pristine[0], "--scheduler", address, "--dask-timeout", "2", "--out", out, *FAST,
                timeout=90)
        refused(r, "environment", address, "no worker after 2 s", "dask worker")
        monkeypatch.setenv("DRIFTLENS_DASK_TIMEOUT", "1")
        with distributed.Client(cluster) as client:
            with pytest.raises(EnvironmentProblem, match="no worker"):
                dl.drift(pristine[0], client=client, progress=False)
        with pytest.raises(EnvironmentProblem, match="client is closed"):     # was distributed's raw message
            dl.drift(pristine[0], client=client, progress=False)
    assert not out.exists()


@pytest.mark.parametrize("address, kind, named", [
    ("notaurl", "usage", "not a Dask scheduler address"),
    ("foo://host:1", "usage", "unknown protocol"),
    ("tcp://127.0.0.1:1", "environment", "no Dask scheduler answered"),
])
def test_scheduler_address_errors_are_one_line(pristine, address, kind, named):
    """`--scheduler notaurl` was "internal error ... please report it" (exit 1)."""
    refused(cli("drift", pristine[0], "--scheduler", address, "--dask-timeout", "2", *FAST, timeout=90), kind,
            address, named)


def test_store_url_without_its_backend_is_an_environment_error(tmp_path):
    """`s3://` without s3fs was "internal error (ImportError: Install s3fs ...)" (exit 1)."""
    try:
        import s3fs  # noqa: F401
        pytest.skip("s3fs is installed here")
    except ImportError:
        pass
    refused(cli("drift", "s3://bucket/run.zarr", *FAST), "environment", "s3://bucket/run.zarr", "s3fs")
    refused(cli("capture", tmp_path, "--out", "s3://bucket/run.zarr"), "environment", "s3fs")


@pytest.mark.parametrize("value", ["nan", "-2", "0", "inf"])
def test_ranks_alpha_ratio_refused_at_parse_time(pristine, tmp_path, value):
    """`ranks --alpha-ratio nan` / `-2` were written (the loader refused them later)."""
    out = tmp_path / "ranks.json"
    refused(cli("ranks", pristine[1], "--budget", "32", "--alpha-ratio", value, "--out", out), "usage",
            "--alpha-ratio", value)
    assert not out.exists()
    with pytest.raises(dl.ScheduleError, match="alpha_ratio"):
        dl.allocate_ranks(dl.load_report(pristine[1]), 32, alpha_ratio=float(value))


def test_ranks_of_the_reference_is_refused(pristine, tmp_path):
    """`ranks --checkpoint base` (all-zero signal) gave a uniform schedule with no note."""
    out = tmp_path / "ranks.json"
    refused(cli("ranks", pristine[1], "--budget", "32", "--checkpoint", "base", "--out", out), "usage",
            "'base'", "reference")
    assert not out.exists()


@pytest.mark.parametrize("values, said", [(-0.5, "negative at layer(s) [0, 1, 2]"),
                                          (0.0, "0 or negative at every layer"),
                                          ("one negative", "negative at layer(s) [1] (min -3)")])
def test_ranks_of_an_uninformative_signal_says_so(pristine, tmp_path, values, said):
    """A report with impossible negative MMD, or a zero signal, gave a uniform schedule with no note."""
    rep = dl.load_report(pristine[1])
    if values == "one negative":
        rep["mmd"].loc[{"checkpoint": "shifted", "layer": 1}] = -3.0       # a hand-edited, impossible value
    else:
        rep["mmd"].loc[{"checkpoint": "shifted"}] = values
    edited = tmp_path / "edited.nc"
    dl.save_report(rep, edited)
    out = tmp_path / "ranks.json"
    err = clean_exit(cli("ranks", edited, "--budget", "36", "--checkpoint", "shifted", "--out", out))
    assert "driftlens ranks: warning:" in err and said in err
    assert any(said in w for w in dl.RankSchedule.load(out).meta["warnings"])


def test_ranks_spec_of_another_family_is_refused(pristine, tmp_path):
    """`--spec` of another family wrote module paths that failed later in PEFT."""
    from importlib import resources

    qwen = resources.files("driftlens.hooks") / "qwen2_vl.toml"
    out = tmp_path / "ranks.json"
    refused(cli("ranks", pristine[1], "--budget", "32", "--spec", qwen, "--out", out), "usage", "qwen2_vl",
            "'llava'")
    assert not out.exists()


def test_drift_on_an_empty_token_selection_raises(pristine):
    """An empty selection returned an all-NaN report without a warning."""
    from driftlens.drift import DriftError

    ds = open_store(pristine[0])
    with pytest.raises(DriftError, match="no visual or text token rows"):
        dl.drift(ds.isel(token=slice(0, 0)), metrics=("mmd",), progress=False)
    with pytest.raises(DriftError, match="no visual or text token rows"):
        dl.drift(ds.isel(token=(ds.lang == "fr").values), metrics=("mmd",), progress=False)
    visual = ds.isel(token=(ds.modality == "visual").values)
    with pytest.raises(DriftError, match="no text token rows"):
        dl.drift(visual, metrics=("mmd", "gap"), progress=False)
    with pytest.warns(UserWarning, match="no text token rows"):
        rep = dl.drift(visual, metrics=("mmd",), n_permutations=20, n_bootstrap=20, progress=False)
    assert "no text token rows" in rep.attrs["warnings"]


@pytest.mark.parametrize("bad", [2.5, True, 2.0, 0, -1, "10"])
def test_count_parameters_take_integers_only(pristine, bad):
    """`n_permutations=2.5` or `True` silently became 2 / 1."""
    import torch

    from driftlens import inference, metrics
    from driftlens.errors import UsageError

    x, y = torch.randn(30, 4), torch.randn(30, 4)
    clusters = np.repeat(np.arange(10), 3)
    rep = dl.load_report(pristine[1])
    calls = {
        "drift n_permutations": lambda: dl.drift(pristine[0], n_permutations=bad, progress=False),
        "drift n_bootstrap": lambda: dl.drift(pristine[0], n_bootstrap=bad, progress=False),
        "drift transport_resamples": lambda: dl.drift(pristine[0], transport_resamples=bad, progress=False),
        "drift mir_bootstrap": lambda: dl.drift(pristine[0], mir_bootstrap=bad, progress=False),
        "drift n_projections": lambda: dl.drift(pristine[0], n_projections=bad, progress=False),
        "mmd_test": lambda: metrics.mmd_test(x, y, n_permutations=bad),
        "sliced_wasserstein": lambda: metrics.sliced_wasserstein(x, y, n_projections=bad),
        "mmd2 block_size": lambda: metrics.mmd2(x, y, block_size=bad),
        "paired_mmd n_permutations": lambda: inference.paired_mmd(x, y, clusters, n_permutations=bad),
        "paired_mmd n_bootstrap": lambda: inference.paired_mmd(x, y, clusters, n_bootstrap=bad),
        "paired_shift": lambda: inference.paired_shift(x, y, clusters, n_bootstrap=bad),
        "allocate_ranks budget": lambda: dl.allocate_ranks(rep, bad),
        "allocate_ranks min_rank": lambda: dl.allocate_ranks(rep, 32, min_rank=bad),
        "from_store n_anchors": lambda: dl.AnchorDriftLoss.from_store(pristine[0], n_anchors=bad),
        "probe n_splits": lambda: dl.linear_probe(open_store(pristine[0]), label="group", n_splits=bad),
    }
    for name, call in calls.items():
        with pytest.raises(UsageError, match="integer"):
            call()
            pytest.fail(name)


@pytest.mark.parametrize("bad", [0, 2.5, True])
def test_drift_callback_counts_are_checked_at_construction(bad):
    """The callback's n_bootstrap=0 failed at the first measurement, inside training."""
    from driftlens.errors import UsageError
    from driftlens.train.hf import make_drift_callback

    with pytest.raises(UsageError, match="n_bootstrap"):
        make_drift_callback()([], [], layers=[0], n_bootstrap=bad)
    with pytest.raises(UsageError, match="every"):
        make_drift_callback()([], [], layers=[0], every=bad)


def test_anchor_weights_from_a_report_of_another_store_are_refused(pristine, tmp_path):
    """`AnchorDriftLoss.from_store(weights=report)` accepted a report of another store and probe set."""

    from driftlens.errors import UsageError

    report = dl.load_report(pristine[1])
    assert report.attrs["probe_fingerprint"] == open_store(pristine[0]).attrs["probe_fingerprint"]
    # (a store's own identity cannot be edited any more: its store record says so; a report of another probe
    # set is the same mismatch seen from the report's side)
    foreign = report.copy()
    foreign.attrs = {**report.attrs, "probe_fingerprint": "another-probe-set"}
    with pytest.raises(UsageError, match="another probe set"):
        dl.AnchorDriftLoss.from_store(pristine[0], layers=[1], n_anchors=16, weights=foreign,
                                      weights_checkpoint="shifted")
    loss = dl.AnchorDriftLoss.from_store(pristine[0], layers=[0, 1], n_anchors=16, weights=report,
                                         weights_checkpoint="shifted")
    assert set(loss.weights) == {0, 1}
    old = report.copy()
    old.attrs = {k: v for k, v in report.attrs.items() if k not in ("probe_fingerprint", "token_selection")}
    with pytest.warns(UserWarning, match="does not record its probe set"):
        dl.AnchorDriftLoss.from_store(pristine[0], layers=[1], n_anchors=16, weights=old, weights_checkpoint="shifted")


def test_unfinished_reference_is_named_unfinished(store):
    """`--reference ko-2` of an unfinished checkpoint said "not a checkpoint"."""
    import zarr

    zarr.open_group(str(store), mode="r+").attrs["completed"] = ["base", "same"]
    refused(cli("drift", store, "--reference", "shifted", *FAST), "usage", "'shifted'", "did not finish")


def test_public_functions_raise_driftlens_errors():
    """Plain ValueError / TypeError from public functions that the README says raise DriftlensError."""
    import ast
    from pathlib import Path

    import driftlens

    root = Path(driftlens.__file__).parent
    builtin = {"ValueError", "TypeError", "RuntimeError", "IndexError", "AssertionError", "Exception"}
    allowed = {("probes.py", "KeyError"), ("probes.py", "TypeError"),      # ProbeSet[...]: the mapping protocol
               ("registry.py", "KeyError"),                                  # an internal lookup
               ("store.py", "ValueError"),                                   # an internal invariant of the writer
               ("scaleout.py", "ValueError")}                                # caught two lines below
    found = []
    for f in sorted(root.rglob("*.py")):
        if f.parent.name == "organism":               # the model organism is not the library's API
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and \
                    isinstance(node.exc.func, ast.Name) and node.exc.func.id in builtin | {"KeyError"}:
                key = (f.name, node.exc.func.id)
                if key not in allowed:
                    found.append(f"{f.relative_to(root)}:{node.lineno} raise {node.exc.func.id}")
    assert found == []
    from driftlens import metrics

    with pytest.raises(dl.DriftlensError):
        metrics.mmd2([[1.0]], [[2.0]])          # a list where a tensor is expected
    with pytest.raises(TypeError):              # ... still a TypeError for code written against 0.1
        metrics.mmd2([[1.0]], [[2.0]])


def test_damaged_organism_cache_is_not_reported_as_built(tmp_path):
    """A damaged organism cache was reported as built (only config.json was looked at)."""
    import dataclasses

    import torch
    from safetensors.torch import save_file

    from driftlens.organism.train import Recipe, _complete

    recipe = Recipe()
    root = tmp_path / "build"
    for name in ("base", "ko-1", "en-1"):
        (root / name).mkdir(parents=True)
        (root / name / "config.json").write_text("{}")
        save_file({"w": torch.zeros(64, 64)}, str(root / name / "model.safetensors"))
    (root / "trajectory.json").write_text(json.dumps({"recipe": dataclasses.asdict(recipe),
                                                      "checkpoints": {"base": "base", "ko-1": "ko-1"},
                                                      "control": {"en-1": "en-1"}}))
    (root / "evaluation.json").write_text("{}")
    assert _complete(root, recipe) is not None
    weights = root / "ko-1" / "model.safetensors"
    whole = weights.read_bytes()
    for damage in (whole[:-100], b"", None):
        if damage is None:
            weights.unlink()
        else:
            weights.write_bytes(damage)
        with pytest.warns(UserWarning, match="ko-1.*rebuilt"):
            assert _complete(root, recipe) is None
    weights.write_bytes(whole)
    (root / "trajectory.json").write_text("{cut")
    with pytest.warns(UserWarning, match="trajectory.json"):
        assert _complete(root, recipe) is None
