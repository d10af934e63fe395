"""Weights on disk: safetensors plus a JSON sidecar; loading never unpickles."""

from __future__ import annotations

import json
import os
import platform
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from shadowlab.data import DATA_DIR, file_sha256
from shadowlab.models import build

MODELS_DIR = DATA_DIR / "models"
REQUIRED_KEYS = ("arch", "arch_kwargs", "sha256")
COMMITTED_MAX_BYTES = 5 * 2**20  # a committed checkpoint must stay under this (the foundation issue: "at most 5 MB")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not match its architecture."""


def models_dir() -> Path:
    """Folder of named checkpoints: ``$SHADOWLAB_MODELS`` or ``data/models``."""
    return Path(os.environ.get("SHADOWLAB_MODELS", MODELS_DIR))


def _paths(name_or_path: str | os.PathLike) -> tuple[Path, Path]:
    """(weights, sidecar) for a bare name (in the models folder) or a path; names may hold dots (sigma0.25)."""
    p = Path(name_or_path)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    elif not p.parent.parts or str(p.parent) == ".":
        p = models_dir() / p.name
    return p.parent / f"{p.name}.safetensors", p.parent / f"{p.name}.json"


def available() -> list[str]:
    """Names of the checkpoints in the models folder."""
    return sorted(p.name[:-len(".safetensors")] for p in models_dir().glob("*.safetensors")
                  if p.parent.joinpath(p.name[:-len(".safetensors")] + ".json").exists())



def library_versions() -> dict[str, str]:
    import numpy
    import safetensors

    return {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": numpy.__version__,
            "safetensors": safetensors.__version__, "platform": platform.platform()}


def save(model: nn.Module, name_or_path: str | os.PathLike, arch: str, arch_kwargs: dict[str, Any],
         **metadata: Any) -> Path:
    """Write ``<name>.safetensors`` and ``<name>.json`` (architecture, recipe, metrics, sha256, versions)."""
    weights, sidecar = _paths(name_or_path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(weights))
    size = weights.stat().st_size
    if weights.parent.resolve() == models_dir().resolve() and size >= COMMITTED_MAX_BYTES:
        warnings.warn(f"{weights} is {size:,} bytes; committed checkpoints in the models folder must stay under "
                      f"{COMMITTED_MAX_BYTES:,} bytes, so it cannot be committed as it is", stacklevel=2)
    meta = {"arch": arch, "arch_kwargs": dict(arch_kwargs), **metadata,
            "sha256": file_sha256(weights), "versions": library_versions()}
    sidecar.write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")
    return weights


def read_metadata(name_or_path: str | os.PathLike) -> dict[str, Any]:
    """The JSON sidecar of a checkpoint, checked for the keys loading needs."""
    weights, sidecar = _paths(name_or_path)
    if not sidecar.exists() or not weights.exists():
        missing = sidecar if not sidecar.exists() else weights
        raise CheckpointError(f"checkpoint {str(name_or_path)!r}: {str(missing)!r} is missing; "
                              f"available in {str(models_dir())!r}: {', '.join(available()) or 'none'}")
    try:
        meta = json.loads(sidecar.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(
            f"checkpoint {str(name_or_path)!r}: sidecar {str(sidecar)!r} is not valid JSON ({err})") from None
    missing_keys = [k for k in REQUIRED_KEYS if k not in meta]
    if missing_keys:
        raise CheckpointError(f"checkpoint {str(name_or_path)!r}: sidecar lacks {missing_keys}")
    return meta


def load(name_or_path: str | os.PathLike, device: str | torch.device | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the architecture from the sidecar and load verified weights: (model in eval mode, metadata)."""
    weights, _ = _paths(name_or_path)
    meta = read_metadata(name_or_path)
    digest = file_sha256(weights)
    if digest != meta["sha256"]:
        raise CheckpointError(f"checkpoint {str(name_or_path)!r}: sha256 of {str(weights)!r} is {digest[:12]}..., "
                              f"sidecar says {meta['sha256'][:12]}...: the file is corrupt or was replaced")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"checkpoint {str(name_or_path)!r}: cannot read safetensors ({err})") from None
    try:
        model = build(meta["arch"], **meta["arch_kwargs"])
    except ValueError as err:
        raise CheckpointError(f"checkpoint {str(name_or_path)!r}: {err}") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        details = "; ".join(s for s in (
            f"missing {missing[:5]}" if missing else "",
            f"unexpected {unexpected[:5]}" if unexpected else "",
            "shape mismatch " + ", ".join(f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                                          for k in wrong[:5]) if wrong else "") if s)
        raise CheckpointError(f"checkpoint {str(name_or_path)!r} does not match architecture "
                              f"{meta['arch']!r} {meta['arch_kwargs']}: {details}")
    model.load_state_dict(state)
    model.eval()
    if device is not None:
        model.to(device)
    return model, meta


def resolve(pattern: str) -> str:
    """A committed checkpoint name: ``pattern`` itself if it exists, else the first name matching it as a glob."""
    import fnmatch

    names = available()
    if pattern in names:
        return pattern
    matches = sorted(n for n in names if fnmatch.fnmatchcase(n, pattern))
    if not matches:
        raise ValueError(f"no checkpoint matches {pattern!r} in {models_dir()}; available: "
                         f"{', '.join(names) or 'none'} (train the zoo with `make models`)")
    return matches[0]
