"""Shared test setup: one torch thread, the tiny test models, isolated model folders and a fake JPEG archive.

The tiny models are plain functions (``from tests.conftest import tiny_conv``) so that a test builds a fresh one
with its own seed and no test sees another's changes.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

# every test model is tiny: one thread avoids thread-synchronisation stalls on a busy 2-core machine
torch.set_num_threads(1)

TINY_CROWN = {"width": 1, "linear_size": 16}   # arch_kwargs of the tiny cnn-2layer


def run_one_and_ranks(args: list[str], one: Path, ranks_out: Path, nproc: int = 2, timeout: int = 900,
                      in_process: bool = False, extra_env: dict[str, str] | None = None) -> None:
    """Run ``python -m shadowlab ARGS --out-dir ONE`` in one process (in this process with ``in_process``) and the
    same under ``torchrun --nproc_per_node NPROC`` into RANKS_OUT, one thread per process so that no sum is split
    differently; assert both exit 0 (with the last of stderr). The caller compares the files."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(extra_env or {})}
    if in_process:
        from shadowlab.cli.main import main

        assert main([*args, "--out-dir", str(one)]) == 0
    else:
        proc = subprocess.run([sys.executable, "-m", "shadowlab", *args, "--out-dir", str(one)], env=env,
                              capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, proc.stderr[-3000:]
    # "--": torchrun would read options such as --n itself
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), "-m", "shadowlab", "--", *args, "--out-dir", str(ranks_out)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]


def tiny_conv(seed: int = 0) -> nn.Module:
    """Conv(3 -> 8) - ReLU - AvgPool(4) - Flatten - Linear(512 -> 10), eval mode: a CNN for attacks and smoothing."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(4), nn.Flatten(),
                         nn.Linear(8 * 8 * 8, 10)).eval()


def tiny_crown_cnn(seed: int = 0) -> nn.Module:
    """The registry's cnn-2layer at width 1 with 16 hidden units (TINY_CROWN), eval mode: bound-propagation ready."""
    from shadowlab.models import build

    torch.manual_seed(seed)
    return build("cnn-2layer", **TINY_CROWN).eval()


def tiny_normalized_net(seed: int = 0) -> nn.Module:
    """Normalize - Conv(3 -> 4, stride 2) - ReLU - Flatten - Linear(1024 -> 10), train mode as built."""
    from shadowlab.models import Normalize

    torch.manual_seed(seed)
    return nn.Sequential(Normalize(), nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 16 * 16, 10))


def random_images(n: int, seed: int = 0) -> torch.Tensor:
    """n uniform random images, n x 3 x 32 x 32 in [0, 1], from their own generator."""
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def predicted(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's own predictions as labels (every image then starts correctly classified)."""
    with torch.no_grad():
        return model(x).argmax(1)


@pytest.fixture
def models_tmp(tmp_path, monkeypatch):
    """A temporary models folder (SHADOWLAB_MODELS) so tests never touch data/models."""
    monkeypatch.setenv("SHADOWLAB_MODELS", str(tmp_path))
    return tmp_path


def make_fake_archive(path, per_class=3):
    """A tar archive in the CIFAR-10 JPEG class-folder layout, with random images."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    from shadowlab.data import CLASSES

    rng = np.random.default_rng(0)
    with tarfile.open(path, "w") as tar:
        for split in ("train", "test"):
            for c in CLASSES:
                for k in range(per_class):
                    buf = io.BytesIO()
                    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
                    info = tarfile.TarInfo(f"{split}/{c}/{k:04d}.jpg")
                    info.size = buf.tell()
                    buf.seek(0)
                    tar.addfile(info, buf)
    return path


@pytest.fixture
def fake_jpeg_archive(tmp_path, monkeypatch):
    """Fake JPEG archive with 3 images per class and split; decode cache and official root isolated."""
    monkeypatch.setenv("SHADOWLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SHADOWLAB_DATA", str(tmp_path / "no-official"))
    return make_fake_archive(tmp_path / "fake.tar")
