"""The package as users get it: a wheel in a fresh (non-editable) environment, and an editable install
that sees a spec added to ``hooks/`` without reinstalling."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from importlib import resources
from pathlib import Path

import pytest

import driftlens
from driftlens.testing import make_store

ROOT = Path(__file__).resolve().parents[2]


def _run(cmd, **kw):
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert out.returncode == 0, (cmd, out.stdout[-2000:], out.stderr[-3000:])
    return out


def _source_copy(dest: Path) -> Path:
    """The tracked files of the checkout (a clean checkout's tree; no .venv, no build outputs)."""
    files = _run(["git", "ls-files", "-z"], cwd=ROOT).stdout.split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def _untracked_sources() -> list[str]:
    out = _run(["git", "status", "--porcelain", "--untracked-files=all", "--", "driftlens", "hooks", "data",
                "pyproject.toml"], cwd=ROOT).stdout
    return [line[3:] for line in out.splitlines() if line.startswith("??")]


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs the git checkout")
def test_wheel_in_a_fresh_environment(tmp_path):
    if _untracked_sources():      # a file git does not know would be missing from the wheel: say so
        pytest.skip(f"untracked package files {_untracked_sources()}: `git add` them first")
    src = _source_copy(tmp_path / "src")
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", wheels, src])
    (wheel,) = wheels.glob("driftlens_vlm-*.whl")     # the distribution name (the import package is driftlens)
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # the dependencies come from this environment's site-packages (a path entry: its .pth files, among
    # them the editable driftlens finder, are not run), driftlens only from the wheel
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "-q", wheel])
    probe = _run([py, "-c", "import driftlens as dl, importlib.resources as r; "
                            "print(dl.__file__); print(len(dl.list_specs())); print(','.join(dl.list_probe_sets())); "
                            "print(dl.__version__); print(r.files('driftlens.hooks'))"], cwd=tmp_path).stdout.split("\n")
    assert probe[0].startswith(str(site)), probe            # the installed copy, not the checkout
    shipped = len(list((ROOT / "hooks").glob("*.toml")))           # every spec of the checkout is in the wheel
    assert probe[1] == str(shipped) and shipped >= 15 and probe[2] == "photos-bilingual,shapes-bilingual", probe
    assert probe[3] == driftlens.__version__ and str(site) in probe[4], probe
    store = make_store(tmp_path / "run.zarr", n_clusters=12)
    _run([env_dir / "bin" / "driftlens", "drift", store, "--reference", "base", "--out", tmp_path / "r.nc",
          "--metrics", "mmd", "--permutations", "50", "--bootstrap", "50", "--no-progress"], cwd=tmp_path)
    assert (tmp_path / "r.nc").stat().st_size > 0
    # the report page's viewer (driftlens/web) ships in the wheel; the distribution is driftlens-vlm
    _run([env_dir / "bin" / "driftlens", "report", tmp_path / "r.nc", "--html", tmp_path / "r.html"], cwd=tmp_path)
    assert "export default { render }" in (tmp_path / "r.html").read_text()
    meta = _run([py, "-c", "import importlib.metadata as m; print(m.version('driftlens-vlm'))"], cwd=tmp_path)
    assert meta.stdout.strip() == driftlens.__version__


def test_editable_install_sees_a_new_spec_file():
    hooks = Path(str(resources.files("driftlens.hooks")))
    if hooks.resolve() != (ROOT / "hooks").resolve():
        pytest.skip(f"driftlens is not installed editable from this checkout (hooks at {hooks})")
    new = ROOT / "hooks" / "zz_test_family.toml"
    text = (ROOT / "hooks" / "llava.toml").read_text().replace('family = "llava"', 'family = "zz_test_family"')
    text = text.replace('model_types = ["llava"]', 'model_types = ["zz_test_model"]')
    try:
        new.write_text(text)
        out = _run([sys.executable, "-c", "import driftlens as dl; print(dl.load_spec('zz_test_model').family)"],
                   cwd=ROOT.parent).stdout.strip()
        assert out == "zz_test_family"
    finally:
        new.unlink(missing_ok=True)


def test_user_spec_directory_comes_first(tmp_path, monkeypatch):
    """``$DRIFTLENS_HOOKS``: a user's spec replaces the shipped one of its family; a bad directory is an error."""
    text = (ROOT / "hooks" / "llava.toml").read_text().replace('final_norm = "model.language_model.norm"',
                                                                'final_norm = "model.language_model.my_norm"')
    assert "my_norm" in text
    (tmp_path / "llava.toml").write_text(text)
    monkeypatch.setenv("DRIFTLENS_HOOKS", str(tmp_path))
    assert driftlens.load_spec("llava").final_norm == "model.language_model.my_norm"
    assert sum(s.family == "llava" for s in driftlens.list_specs()) == 1
    monkeypatch.setenv("DRIFTLENS_HOOKS", str(tmp_path / "missing") + os.pathsep + str(tmp_path))
    with pytest.raises(driftlens.SpecError, match="missing"):
        driftlens.load_spec("llava")
