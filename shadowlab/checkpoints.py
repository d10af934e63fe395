"""Weights on disk: safetensors plus a JSON sidecar; loading never unpickles."""

from __future__ import annotations

import fnmatch
import json
import math
import os
import platform
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy
import safetensors
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from shadowlab.data import DATA_DIR, file_sha256
from shadowlab.models import build

MODELS_DIR = DATA_DIR / "models"
REQUIRED_KEYS = ("arch", "arch_kwargs", "sha256")
MAX_ARCH_INT = 4096   # the largest integer an arch_kwargs entry may hold (a width, a layer size, a class count)
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


def exists(name_or_path: str | os.PathLike) -> bool:
    """Whether a checkpoint's weights or sidecar are on disk (a bare name: in the models folder)."""
    return any(p.exists() for p in _paths(name_or_path))


def refuse_existing(name_or_path: str | os.PathLike, force: bool = False, option: str = "--force") -> None:
    """CheckpointError naming the file when a checkpoint of that name or path exists and ``force`` is False: a new
    checkpoint never replaces one silently (``option`` is what the message tells the user to pass)."""
    if not force and exists(name_or_path):
        weights, _ = _paths(name_or_path)
        raise CheckpointError(f"checkpoint {str(name_or_path)!r} already exists ({str(weights)!r}); choose another "
                              f"name, or pass {option} to replace it")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_sidecar(meta: Any, where: str) -> dict[str, Any]:
    """The sidecar schema, checked before anything is built (CheckpointError naming the field, ``where`` naming
    the checkpoint): a JSON object; ``arch`` a non-empty string; ``arch_kwargs`` an object of string keys to
    numbers, strings, booleans or null, integers in [0, MAX_ARCH_INT] (so a forged width cannot allocate memory);
    ``sha256`` 64 hex digits; ``defense`` a string when present; ``defense_parameter`` an object of finite numbers
    (sigma > 0, eps >= 0) when present."""
    def bad(field: str, value: Any, what: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {where}: sidecar field {field}={value!r} must be {what}")

    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {where}: sidecar must be a JSON object, got {type(meta).__name__}")
    missing_keys = [k for k in REQUIRED_KEYS if k not in meta]
    if missing_keys:
        raise CheckpointError(f"checkpoint {where}: sidecar lacks {missing_keys}")
    if not isinstance(meta["arch"], str) or not meta["arch"]:
        raise bad("arch", meta["arch"], "an architecture name (a string)")
    kwargs = meta["arch_kwargs"]
    if not isinstance(kwargs, dict):
        raise bad("arch_kwargs", kwargs, "a JSON object of keyword arguments")
    for k, v in kwargs.items():
        if not isinstance(k, str) or not (v is None or isinstance(v, (str, bool, int, float))):
            raise bad(f"arch_kwargs.{k}", v, "a number, string, boolean or null")
        if _is_int(v) and not 0 <= v <= MAX_ARCH_INT:
            raise bad(f"arch_kwargs.{k}", v, f"an integer in [0, {MAX_ARCH_INT}]")
        if isinstance(v, float) and not math.isfinite(v):
            raise bad(f"arch_kwargs.{k}", v, "a finite number")
    digest = meta["sha256"]
    if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise bad("sha256", digest, "64 lowercase hex digits (the weights file's sha256)")
    if "defense" in meta and not isinstance(meta["defense"], str):
        raise bad("defense", meta["defense"], "a string ('none', 'gaussian', 'pgd', 'crown-ibp')")
    params = meta.get("defense_parameter", {})
    if not isinstance(params, dict):
        raise bad("defense_parameter", params, "a JSON object")
    for k, v in params.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise bad(f"defense_parameter.{k}", v, "a finite number")
        if (k == "sigma" and not v > 0) or (k == "eps" and v < 0):
            raise bad(f"defense_parameter.{k}", v, "> 0" if k == "sigma" else ">= 0")
    return meta


def library_versions() -> dict[str, str]:
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
    """The JSON sidecar of a checkpoint, checked against the sidecar schema (``check_sidecar``)."""
    weights, sidecar = _paths(name_or_path)
    if not sidecar.exists() or not weights.exists():
        missing = sidecar if not sidecar.exists() else weights
        if not models_dir().is_dir() and weights.parent == models_dir():
            raise CheckpointError(f"checkpoint {str(name_or_path)!r}: the models folder {str(models_dir())!r} does "
                                  "not exist: run from a checkout of the repository (data/models), install the "
                                  "wheel (it carries the committed models), or set SHADOWLAB_MODELS")
        raise CheckpointError(f"checkpoint {str(name_or_path)!r}: {str(missing)!r} is missing; "
                              f"available in {str(models_dir())!r}: {', '.join(available()) or 'none'}")
    try:
        meta = json.loads(sidecar.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(
            f"checkpoint {str(name_or_path)!r}: sidecar {str(sidecar)!r} is not valid JSON ({err})") from None
    return check_sidecar(meta, repr(str(name_or_path)))


def load(name_or_path: str | os.PathLike, device: str | torch.device | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the architecture from the sidecar and load verified weights: (model in eval mode, metadata)."""
    weights, _ = _paths(name_or_path)
    meta = read_metadata(name_or_path)
    digest = file_sha256(weights)
    if digest != meta["sha256"]:
        raise CheckpointError(f"checkpoint {str(name_or_path)!r}: sha256 of {str(weights)!r} is {digest[:12]}..., "
                              f"sidecar says {meta['sha256'][:12]}...: the file is corrupt or was replaced")
    # shapes first, on the meta device: the architecture is compared with the file before anything is allocated
    try:
        with safe_open(str(weights), framework="pt") as f:
            state_shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"checkpoint {str(name_or_path)!r}: cannot read safetensors ({err})") from None
    try:
        with torch.device("meta"):
            skeleton = build(meta["arch"], **meta["arch_kwargs"])
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"checkpoint {str(name_or_path)!r}: arch {meta['arch']!r} with arch_kwargs "
                              f"{meta['arch_kwargs']}: {err}") from None
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    missing = sorted(set(expected) - set(state_shapes))
    unexpected = sorted(set(state_shapes) - set(expected))
    wrong = [k for k in expected if k in state_shapes and state_shapes[k] != expected[k]]
    if missing or unexpected or wrong:
        details = "; ".join(s for s in (
            f"missing {missing[:5]}" if missing else "",
            f"unexpected {unexpected[:5]}" if unexpected else "",
            "shape mismatch " + ", ".join(f"{k}: file {state_shapes[k]} vs model {expected[k]}"
                                          for k in wrong[:5]) if wrong else "") if s)
        raise CheckpointError(f"checkpoint {str(name_or_path)!r} does not match architecture "
                              f"{meta['arch']!r} {meta['arch_kwargs']}: {details}")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"checkpoint {str(name_or_path)!r}: cannot read safetensors ({err})") from None
    model = build(meta["arch"], **meta["arch_kwargs"])
    model.load_state_dict(state)
    model.eval()
    if device is not None:
        model.to(device)
    return model, meta


def resolve(pattern: str) -> str:
    """A committed checkpoint name: ``pattern`` itself if it exists, else the first name matching it as a glob."""
    names = available()
    if pattern in names:
        return pattern
    matches = sorted(n for n in names if fnmatch.fnmatchcase(n, pattern))
    if not matches:
        raise ValueError(f"no checkpoint matches {pattern!r} in {models_dir()}; available: "
                         f"{', '.join(names) or 'none'} (train the zoo with `make models`)")
    return matches[0]
