"""The package as a user installs it: pyproject declares the runtime dependencies, and a wheel built from the
checkout, installed into a fresh virtual environment without network (``--no-index --no-deps``, the dependencies
seen through a .pth pointing at this environment's site-packages: torch is not reinstalled), runs
``python -m shadowlab --help`` and one certificate from a folder outside the checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_declares_the_runtime_dependencies():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {d.split(">")[0].split("=")[0].split("<")[0].strip().lower() for d in project["dependencies"]}
    assert {"torch", "torchvision", "numpy", "scipy", "statsmodels", "safetensors", "tqdm", "matplotlib",
            "pytorch-msssim", "scikit-image", "pillow"} <= names
    assert not any("==" in d for d in project["dependencies"])   # the pins stay in requirements.txt
    assert "otter-grader>=7.0" in project["optional-dependencies"]["assignments"]


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_certifies(tmp_path):
    # built from a copy of what the wheel needs, so that the build leaves nothing in the checkout
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "shadowlab", src / "shadowlab", ignore=ignore)
    for name in ("pyproject.toml", "README.md", "LICENSE", "data/cifar10_test_subset.npz",
                 "data/cifar10_test_subset.json"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "data" / "models", src / "data" / "models")
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-w", str(wheels), str(src)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    (wheel,) = wheels.glob("shadowlab-*.whl")
    env_dir = tmp_path / "fresh"
    venv.EnvBuilder(with_pip=False, system_site_packages=False).create(env_dir)
    python = env_dir / "bin" / "python"
    fresh_site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                     capture_output=True, text=True, check=True).stdout.strip())
    # the dependencies (torch, numpy, ...) from this environment, after the fresh one's own site-packages
    (fresh_site / "zz-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                              "--no-index", str(wheel)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHADOWLAB_") and k != "PYTHONPATH"}
    run = lambda *args: subprocess.run([str(python), "-m", "shadowlab", *args], cwd=work, env=env,  # noqa: E731
                                       capture_output=True, text=True, timeout=600)
    where = subprocess.run([str(python), "-c", "import shadowlab, shadowlab.data as d; print(shadowlab.__file__); "
                            "print(d.DATA_DIR)"], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    module, data_dir = where.stdout.split()
    assert not module.startswith(str(ROOT)) and not data_dir.startswith(str(ROOT)), where.stdout
    helped = run("--help")
    assert helped.returncode == 0 and "reproduce" in helped.stdout, helped.stderr
    out = work / "cert"
    cert = run("certify", "smoothing", "--model", "smooth-sigma0.25", "--n-images", "1", "--n", "64", "--n0", "16",
               "--source", "subset", "--device", "cpu", "--out-dir", str(out))
    assert cert.returncode == 0, cert.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_images"] == 1 and summary["sigma"] == 0.25
