import tarfile

import numpy as np
import pytest
import torch

from shadowlab import data
from shadowlab.data import CLASSES, DataError, load_cifar10

from .conftest import make_fake_archive


def test_subset_shapes_dtypes_balance():
    x, y, classes = load_cifar10("test", source="subset")
    assert x.shape == (1000, 3, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and classes == CLASSES
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert torch.bincount(y, minlength=10).tolist() == [100] * 10
    # interleaved order: the first 10 images hold one of each class
    assert y[:10].tolist() == list(range(10))


def test_subset_file_is_uint8_with_provenance():
    with np.load(data.SUBSET_PATH) as f:
        assert f["images"].dtype == np.uint8 and f["images"].shape == (1000, 32, 32, 3)
    import json
    meta = json.loads(data.SUBSET_META_PATH.read_text())
    assert meta["jpeg_reencoding"] is True and len(meta["source_sha256"]) == 64
    assert "selection_rule" in meta


def test_first_n():
    x, y, _ = load_cifar10("test", n=20, source="subset")
    assert x.shape[0] == 20 and y.tolist() == list(range(10)) * 2


@pytest.mark.parametrize("kwargs, words", [
    ({"split": "valid"}, ["valid", "train", "test"]),
    ({"split": "test", "n": 5000, "source": "subset"}, ["5000", "1000"]),
    ({"split": "test", "n": 0, "source": "subset"}, ["n=0"]),
    ({"split": "train", "source": "subset"}, ["train", "test"]),
    ({"split": "test", "source": "imagenet"}, ["imagenet", "subset"]),
    ({"split": "test", "source": "torchvision", "root": "/nonexistent"}, ["/nonexistent", "download"]),
    ({"split": "test", "source": "jpeg", "jpeg": "/nonexistent.tar.xz"}, ["/nonexistent.tar.xz"]),
])
def test_errors_name_what_was_asked(kwargs, words, monkeypatch):
    monkeypatch.delenv("SHADOWLAB_CIFAR10_JPEG", raising=False)
    with pytest.raises(DataError) as err:
        load_cifar10(**kwargs)
    for w in words:
        assert w in str(err.value)


def test_auto_train_without_sources_explains(monkeypatch, tmp_path):
    monkeypatch.delenv("SHADOWLAB_CIFAR10_JPEG", raising=False)
    monkeypatch.setenv("SHADOWLAB_DATA", str(tmp_path))
    with pytest.raises(DataError, match="no CIFAR-10 source for split='train'"):
        load_cifar10("train")


def test_jpeg_archive_decoded_once_and_cached(tmp_path, monkeypatch, fake_jpeg_archive):
    archive = fake_jpeg_archive
    monkeypatch.setenv("SHADOWLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SHADOWLAB_DATA", str(tmp_path / "none"))
    x, y, _ = load_cifar10("train", jpeg=archive)
    assert x.shape == (30, 3, 32, 32) and torch.bincount(y).tolist() == [3] * 10
    cached = list((tmp_path / "cache").glob("*.npz"))
    assert len(cached) == 1
    monkeypatch.setattr(data, "_decode_jpegs", lambda *a: pytest.fail("decoded twice"))
    x2, y2, _ = load_cifar10("train", jpeg=archive)
    assert torch.equal(x, x2) and torch.equal(y, y2)


def test_build_subset_from_folder(tmp_path):
    archive = make_fake_archive(tmp_path / "fake2.tar", per_class=2)
    folder = tmp_path / "extracted"
    with tarfile.open(archive) as tar:
        tar.extractall(folder)
    out = tmp_path / "subset.npz"
    meta = data.build_subset(folder, out=out, per_class=2)
    with np.load(out) as f:
        assert f["images"].shape == (20, 32, 32, 3) and f["labels"].tolist() == list(range(10)) * 2
    assert meta["selection_rule"].startswith("for each class, the first 2")
    with pytest.raises(DataError, match="per_class=5"):
        data.build_subset(folder, out=out, per_class=5)
