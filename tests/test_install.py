"""A non-editable install (``pip install .``) ships the configs: the stage scripts find their defaults and the
README's ``--cfg configs/…`` paths from a working directory that has no configs/ folder and no source package."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.paths import REPO_ROOT

pytestmark = pytest.mark.slow
SOURCE = ("ldm", "configs", "setup.py", "pyproject.toml", "README.md")


def test_a_non_editable_install_finds_its_configs(tmp_path):
    source, site, work = tmp_path / "source", tmp_path / "site", tmp_path / "work"
    source.mkdir()
    for name in SOURCE:  # a copy, so that building leaves no build/ or egg-info in the checkout
        if (REPO_ROOT / name).is_dir():
            shutil.copytree(REPO_ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO_ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(source)], check=True, capture_output=True)
    assert (site / "ldm" / "configs" / "vae" / "shapes-kl-f4.yaml").is_file()
    assert not (site / "ldm" / "configs" / "__init__.py").exists()  # data, shipped as it is
    assert (site / "ldm" / "serve" / "static" / "index.html").is_file()  # the web page ships too

    shutil.copytree(REPO_ROOT / "stages", work / "stages")
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "stages/train_vae.py", "--cfg", "configs/tiny/vae.yaml", "--runs-dir",
                             "runs", "trainer.max_steps=2", "callbacks=[]"], cwd=work, env=env, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (work / "runs" / "vae" / "latest" / "checkpoints" / "last.ckpt").is_file()
    imported = subprocess.run([sys.executable, "-c", "import ldm, sys; print(ldm.__file__)"], cwd=work, env=env,
                              capture_output=True, text=True).stdout
    assert imported.startswith(str(site))  # the installed copy ran, not the checkout
