"""CIFAR-10 in pixel space: official files, a JPEG copy, or the committed 1,000-image test subset."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from shadowlab import validate
from shadowlab.models import default_device

CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
SPLITS = ("train", "test")
SOURCES = ("auto", "torchvision", "jpeg", "subset")

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _data_dir() -> Path:
    """The committed data: the checkout's ``data/`` (a run from the repository, an editable install), else the copy
    a wheel installs under ``<prefix>/share/shadowlab/data``; the checkout's path when neither exists (the messages
    of a missing model or subset then name it)."""
    checkout = PROJECT_ROOT / "data"
    installed = Path(sys.prefix) / "share" / "shadowlab" / "data"
    return installed if not checkout.is_dir() and installed.is_dir() else checkout


DATA_DIR = _data_dir()
SUBSET_PATH = DATA_DIR / "cifar10_test_subset.npz"
SUBSET_META_PATH = DATA_DIR / "cifar10_test_subset.json"
SUBSET_PER_CLASS = 100


class DataError(RuntimeError):
    """A requested CIFAR-10 source, split or size is not available."""


def default_root() -> Path:
    """Folder of the official CIFAR-10 files: ``$SHADOWLAB_DATA`` or ``data/cifar10``."""
    return Path(os.environ.get("SHADOWLAB_DATA", DATA_DIR / "cifar10"))


def cache_dir() -> Path:
    """Where decoded JPEG arrays are cached (gitignored): ``$SHADOWLAB_CACHE`` or ``data/cache``."""
    return Path(os.environ.get("SHADOWLAB_CACHE", DATA_DIR / "cache"))


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"split={split!r} is unknown; accepted: {', '.join(SPLITS)}")


def _official_available(root: Path) -> bool:
    return (root / "cifar-10-batches-py" / "batches.meta").exists()


def _load_torchvision(split: str, root: Path, download: bool) -> tuple[np.ndarray, np.ndarray]:
    from torchvision.datasets import CIFAR10  # start-up cost (torchvision takes seconds to import)

    if not download and not _official_available(root):
        raise DataError(
            f"official CIFAR-10 not found under root={str(root)!r} (expected cifar-10-batches-py/); "
            "pass download=True (CLI: --download) on a machine with internet"
        )
    ds = CIFAR10(str(root), train=(split == "train"), download=download)
    return np.asarray(ds.data, dtype=np.uint8), np.asarray(ds.targets, dtype=np.int64)


def _interleave(per_class: list[list]) -> list:
    """Order items as class 0, 1, ..., 9, 0, 1, ...: the first 10k items hold k of each class."""
    out = []
    longest = max(len(c) for c in per_class)
    for k in range(longest):
        for items in per_class:
            if k < len(items):
                out.append(items[k])
    return out


def _decode_jpegs(source: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Decode ``split/<class>/<file>.jpg`` from a folder or a tar archive, in interleaved class order."""
    per_class: list[list[tuple[int, str]]] = [[] for _ in CLASSES]
    blobs: dict[str, bytes] = {}
    if source.is_dir():
        base = source / split if (source / split).is_dir() else source
        for c, name in enumerate(CLASSES):
            folder = base / name
            if not folder.is_dir():
                raise DataError(f"JPEG folder {str(source)!r} has no {split}/{name}/ folder")
            per_class[c] = [(c, str(p)) for p in sorted(folder.glob("*.jpg"))]
    else:
        with tarfile.open(source) as tar:
            for member in tar:
                parts = Path(member.name).parts
                if member.isfile() and len(parts) >= 3 and parts[-3] == split and parts[-2] in CLASSES:
                    data = tar.extractfile(member)
                    assert data is not None
                    blobs[member.name] = data.read()
        for name in sorted(blobs):
            c = CLASSES.index(Path(name).parts[-2])
            per_class[c].append((c, name))
        if not any(per_class):
            raise DataError(f"JPEG archive {str(source)!r} has no {split}/<class>/*.jpg files")
    order = _interleave(per_class)
    images = np.empty((len(order), 32, 32, 3), dtype=np.uint8)
    labels = np.empty(len(order), dtype=np.int64)
    for i, (c, key) in enumerate(tqdm(order, desc=f"decoding {split} JPEGs", leave=False)):
        raw = blobs[key] if blobs else Path(key).read_bytes()
        images[i] = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"), dtype=np.uint8)
        labels[i] = c
    return images, labels


def _load_jpeg(split: str, source: Path) -> tuple[np.ndarray, np.ndarray]:
    if not source.exists():
        raise DataError(f"JPEG source {str(source)!r} does not exist")
    stat = source.stat()
    key = hashlib.sha256(f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = cache_dir() / f"cifar10-jpeg-{key}-{split}.npz"
    if cached.exists():
        with np.load(cached) as f:
            return f["images"], f["labels"]
    images, labels = _decode_jpegs(source, split)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f"{cached.stem}.{os.getpid()}.tmp.npz")   # one temp file per process: no race
    np.savez(tmp, images=images, labels=labels)
    tmp.replace(cached)
    return images, labels


def _load_subset(split: str) -> tuple[np.ndarray, np.ndarray]:
    if split != "test":
        raise DataError(f"the committed subset holds only split='test', not split={split!r}")
    if not SUBSET_PATH.exists():
        raise DataError(f"committed subset {str(SUBSET_PATH)!r} is missing: run from a checkout of the repository "
                        "(its data/ folder), install the wheel (it carries the subset), or rebuild it with "
                        "`python -m shadowlab data build-subset --from PATH`")
    with np.load(SUBSET_PATH) as f:
        return f["images"], f["labels"].astype(np.int64)


def _jpeg_source(jpeg: str | os.PathLike | None) -> Path | None:
    if jpeg is not None:
        return Path(jpeg)
    env = os.environ.get("SHADOWLAB_CIFAR10_JPEG")
    return Path(env) if env else None


def resolve_source(split: str, source: str = "auto", root: str | os.PathLike | None = None,
                   jpeg: str | os.PathLike | None = None) -> str:
    """Name the source ``load_cifar10`` would read for these arguments (for provenance records)."""
    _check_split(split)
    if source not in SOURCES:
        raise DataError(f"source={source!r} is unknown; accepted: {', '.join(SOURCES)}")
    if source != "auto":
        return source
    if _official_available(Path(root) if root else default_root()):
        return "torchvision"
    jp = _jpeg_source(jpeg)
    if jp is not None and jp.exists():
        return "jpeg"
    if split == "test" and SUBSET_PATH.exists():
        return "subset"
    where = str(Path(root) if root else default_root())
    raise DataError(
        f"no CIFAR-10 source for split={split!r}: official files not under {where!r}, "
        "no JPEG copy given (argument jpeg= or $SHADOWLAB_CIFAR10_JPEG), and the committed subset has only split='test'"
    )


def load_cifar10(split: str, n: int | None = None, source: str = "auto",
                 root: str | os.PathLike | None = None, jpeg: str | os.PathLike | None = None,
                 download: bool = False) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """CIFAR-10 as (images N x 3 x 32 x 32 float in [0, 1], int64 labels, class names).

    ``source="auto"`` prefers the official files under ``root``, then a JPEG copy (``jpeg`` or
    ``$SHADOWLAB_CIFAR10_JPEG``), then the committed 1,000-image test subset. ``n`` takes the first
    ``n`` images (JPEG and subset orders interleave classes, so the first 10k hold k per class).
    """
    if n is not None:
        try:
            n = validate.count(n, "n")
        except ValueError as err:   # a data request: reported as DataError, like every other one here
            raise DataError(f"{err} (or None for the whole split)") from None
    chosen = resolve_source(split, source, root, jpeg)
    if chosen == "torchvision":
        images, labels = _load_torchvision(split, Path(root) if root else default_root(), download)
    elif chosen == "jpeg":
        jp = _jpeg_source(jpeg)
        if jp is None:
            raise DataError("source='jpeg' needs jpeg=PATH or $SHADOWLAB_CIFAR10_JPEG")
        images, labels = _load_jpeg(split, jp)
    else:
        images, labels = _load_subset(split)
    if n is not None:
        if n > len(images):
            raise DataError(f"n={n} asked, but source {chosen!r} split {split!r} holds {len(images)} images")
        images, labels = images[:n], labels[:n]
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    return x.contiguous(), torch.from_numpy(np.asarray(labels, dtype=np.int64)), CLASSES


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read 1 MiB at a time (the one file hash of the package)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_subset(source: str | os.PathLike, out: Path = SUBSET_PATH,
                 per_class: int = SUBSET_PER_CLASS) -> dict:
    """Write the committed test subset (first ``per_class`` JPEGs of each class, sorted by file name)."""
    src = Path(source)
    images, labels = _decode_jpegs(src, "test") if src.exists() else (None, None)
    if images is None:
        raise DataError(f"--from {str(src)!r} does not exist")
    n = per_class * len(CLASSES)  # interleaved order: the first n hold per_class of each class
    if n > len(images):
        raise DataError(f"per_class={per_class} asked, but {str(src)!r} holds {len(images)} test images")
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, images=images[:n], labels=labels[:n].astype(np.uint8))
    meta = {
        "description": "CIFAR-10 test subset for shadowlab: 1,000 images, 100 per class, uint8 NHWC",
        "source_archive": src.name,
        "source_sha256": file_sha256(src) if src.is_file() else None,
        "selection_rule": (f"for each class, the first {per_class} files of test/<class>/ sorted by file name; "
                           "order interleaves classes (airplane, automobile, ..., truck, airplane, ...)"),
        "jpeg_reencoding": True,
        "note": "a JPEG re-encoding of CIFAR-10, not the bit-exact official release; pixel values differ slightly",
        "classes": list(CLASSES),
        "subset_sha256": file_sha256(out),
    }
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def load_test_images(n: int, device: str | torch.device | None = None,
                     source: str = "auto") -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """The first n CIFAR-10 test images (one per class first) and labels on the device, and the class names."""
    x, y, classes = load_cifar10("test", n=n, source=source)
    dev = torch.device(device) if device is not None else default_device()
    return x.to(dev), y.to(dev), classes
