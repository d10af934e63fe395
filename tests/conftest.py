"""Shared test setup: one torch thread, isolated model folders and a fake JPEG archive when asked."""

import pytest
import torch

# every test model is tiny: one thread avoids thread-synchronisation stalls on a busy 2-core machine
torch.set_num_threads(1)


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
