"""The authors' released checkpoints as shadowlab checkpoints: Cohen et al.'s smoothing models, CROWN-IBP's CNNs.

Source files are pickles, so they are read with ``torch.load(path, map_location="cpu", weights_only=True)`` only:
PyTorch's restricted unpickler accepts tensors and plain containers (dict, list, tuple, str, numbers) and refuses
anything else before it is built, so no code in a file runs. The weights are renamed into a shadowlab architecture
(every key and shape checked against it), the input normalisation the authors applied becomes the model's first
layer (``models.Normalize``: pixels in [0, 1] in, as everywhere in shadowlab), and ``checkpoints.save`` writes
safetensors plus a sidecar recording the source file's sha256, its format, its own metadata and the defense
parameter, so ``checkpoints.load(name)`` and every command taking ``--model`` use it like a committed model.

Formats (see also ../shared/reference/authors-checkpoints.md, and docs/research-scale.md for the commands):

- ``cohen`` (locuslab/smoothing ``train.py``): ``{"epoch", "arch", "state_dict", "optimizer"}``, arch
  ``cifar_resnet110`` / ``cifar_resnet20`` (bearpaw's BasicBlock CIFAR ResNet) or ``resnet50`` (torchvision,
  inside ``DataParallel``); the model was ``Sequential(NormalizeLayer, net)`` so keys start with ``1.`` (ImageNet:
  ``1.module.``). Normalisation: CIFAR-10 mean (0.4914, 0.4822, 0.4465), std (0.2023, 0.1994, 0.2010); ImageNet
  mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225).
- ``crown-ibp`` (huanzhang12/CROWN-IBP): ``{"state_dict", "epoch", ...}`` of an ``nn.Sequential`` with keys
  ``0.weight``, ``2.weight``, ...; the CIFAR-10 normalisation above was done in the data loader.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shadowlab import checkpoints, validate
from shadowlab.data import file_sha256
from shadowlab.models import IMAGENET_MEAN, IMAGENET_STD, Normalize, build

COHEN_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
COHEN_CIFAR_STD = (0.2023, 0.1994, 0.2010)  # Cohen et al.'s and CROWN-IBP's datasets.py (not shadowlab's CIFAR_STD)
CROWN_IBP_MEAN, CROWN_IBP_STD = COHEN_CIFAR_MEAN, COHEN_CIFAR_STD
# Cohen et al.'s "arch" -> (shadowlab architecture, dataset, BasicBlocks per stage)
COHEN_ARCHS: dict[str, tuple[str, str, int | None]] = {
    "cifar_resnet110": ("resnet110", "cifar10", 18),
    "cifar_resnet20": ("resnet20", "cifar10", 3),
    "resnet50": ("resnet50-imagenet", "imagenet", None),
}
# CROWN-IBP model classes (model_defs.py, model_defs_gowal.py) -> shadowlab architecture; shadowlab names map to
# themselves. The keyword defaults are CROWN-IBP's (model_cnn_2layer: linear_size 128).
CROWN_IBP_ARCHS: dict[str, str] = {
    "model_cnn_2layer": "cnn-2layer", "model_cnn_3layer_fixed": "cnn-3layer-fixed",
    "model_cnn_4layer": "cnn-4layer", "IBP_large": "dm-large",
    "cnn-2layer": "cnn-2layer", "cnn-3layer-fixed": "cnn-3layer-fixed", "cnn-4layer": "cnn-4layer",
    "dm-large": "dm-large",
}
CROWN_IBP_KWARGS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {  # (required, defaults), CROWN-IBP's
    "cnn-2layer": (("width",), {"linear_size": 128}),
    "cnn-3layer-fixed": (("kernel_size", "width"), {"linear_size": None}),
    "cnn-4layer": (("width", "linear_size"), {}),
    "dm-large": ((), {"linear_size": 512}),
}


class ImportCheckpointError(checkpoints.CheckpointError):
    """A source checkpoint is unsafe, unreadable, or not in the expected format or architecture."""


def read_torch_file(path: str | os.PathLike) -> Any:
    """The object in a ``torch.save`` file, read with ``weights_only=True`` (tensors and plain containers only).

    Raises ImportCheckpointError when the file is missing or unreadable, or when its pickle holds anything else
    (a class, a function call): that file is refused before any object in it is built, so nothing in it runs.
    Both the zip format (torch >= 1.6) and the legacy format of older releases are read.
    """
    path = Path(path)
    if not path.is_file():
        raise ImportCheckpointError(f"source checkpoint {str(path)!r} does not exist or is not a file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        lines = str(err).strip().splitlines()
        detail = next((line for line in lines if "unsupported" in line.lower()), lines[0] if lines else "").strip()
        if "global" not in detail.lower():  # not a reference to a class or function: a corrupt or foreign file
            raise ImportCheckpointError(f"cannot read {str(path)!r} as a torch.save file (corrupt or not a "
                                        f"checkpoint: {detail}); nothing in it was run") from None
        raise ImportCheckpointError(
            f"refused {str(path)!r}: its pickle holds objects other than tensors and plain containers, which "
            f"weights_only loading does not build, so nothing in the file was run ({detail})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise ImportCheckpointError(f"cannot read {str(path)!r} as a torch.save file: {err}") from None


def _state_dict(obj: Any, path: Path, fmt: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict) or "state_dict" not in obj:
        keys = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise ImportCheckpointError(f"{str(path)!r} is not a {fmt} checkpoint: expected a dict with a 'state_dict' "
                                    f"entry, got {keys}")
    state = obj["state_dict"]
    if isinstance(state, (list, tuple)) and len(state) == 1:  # some CROWN-IBP loaders saved [state_dict]
        state = state[0]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ImportCheckpointError(f"{str(path)!r}: 'state_dict' must map names to tensors, got "
                                    f"{type(state).__name__}")
    return dict(state)


def _match(model: nn.Module, state: dict[str, torch.Tensor], source_names: dict[str, str], what: str,
           path: Path) -> None:
    """Load ``state`` (shadowlab names) into model, or raise naming every missing, unexpected or mis-shaped key
    (by its name in the source file, via ``source_names``)."""
    expected = model.state_dict()
    # num_batches_tracked only matters in training (momentum=None); files from before it existed lack it
    for k, v in expected.items():
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = torch.zeros_like(v)
    src = lambda k: source_names.get(k, k)  # noqa: E731
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys the architecture needs, e.g. "
                         f"{[src(k) for k in missing[:4]]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys, e.g. {[src(k) for k in unexpected[:4]]}")
        if wrong:
            parts.append("shape mismatch " + ", ".join(
                f"{src(k)}: file {tuple(state[k].shape)}, expected {tuple(expected[k].shape)}" for k in wrong[:4]))
        raise ImportCheckpointError(f"{str(path)!r} does not match {what}: " + "; ".join(parts))
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})


def _set_normalization(model: nn.Sequential, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    norm = model[0]
    assert isinstance(norm, Normalize)
    norm.mean.copy_(torch.tensor(mean).view(1, -1, 1, 1))
    norm.std.copy_(torch.tensor(std).view(1, -1, 1, 1))


# ------------------------------------------------------------------------------------------------- Cohen et al.
def _cohen_cifar_names(keys: list[str], blocks: int) -> dict[str, str]:
    """bearpaw CIFAR ResNet names (after the '1.' prefix) -> shadowlab ``models.resnet`` names.

    shadowlab's resnet is Sequential(Normalize, conv, bn, ReLU, 3 x blocks BasicBlocks, pool, Flatten, Linear);
    a block's ``downsample`` is its ``shortcut``.
    """
    out = {}
    fc = 4 + 3 * blocks + 2
    for k in keys:
        m = re.fullmatch(r"layer([1-3])\.(\d+)\.(.+)", k)
        if m:
            stage, i, rest = int(m[1]), int(m[2]), m[3].replace("downsample.", "shortcut.")
            out[k] = f"{4 + (stage - 1) * blocks + i}.{rest}" if i < blocks else f"extra-block.{k}"
        elif k.startswith("conv1."):
            out[k] = "1." + k[len("conv1."):]
        elif k.startswith("bn1."):
            out[k] = "2." + k[len("bn1."):]
        elif k.startswith("fc."):
            out[k] = f"{fc}." + k[len("fc."):]
        else:
            out[k] = f"unknown.{k}"
    return out


def _cohen_cifar_source_name(key: str, blocks: int) -> str:
    """The inverse of ``_cohen_cifar_names``: a shadowlab resnet key as Cohen et al.'s file names it."""
    i, rest = key.split(".", 1)
    j = int(i)
    if j == 1:
        return f"1.conv1.{rest}"
    if j == 2:
        return f"1.bn1.{rest}"
    if 4 <= j < 4 + 3 * blocks:
        stage, b = divmod(j - 4, blocks)
        return f"1.layer{stage + 1}.{b}.{rest.replace('shortcut.', 'downsample.')}"
    return f"1.fc.{rest}" if j == 4 + 3 * blocks + 2 else key


def convert_cohen(obj: Any, path: str | os.PathLike = "<checkpoint>") -> tuple[nn.Module, str, dict[str, Any]]:
    """(model in eval mode, shadowlab arch, source info) from the object of a Cohen et al. checkpoint file.

    Accepts the keys of ``Sequential(NormalizeLayer, net)`` (``1.``) and of ``DataParallel`` inside it
    (``1.module.``). Raises ImportCheckpointError naming what was expected: an unknown ``arch``, bearpaw's
    Bottleneck ResNet-164 (its "resnet110"), a missing, unexpected or mis-shaped key.
    """
    path = Path(path)
    state = _state_dict(obj, path, "Cohen et al.")
    arch = obj.get("arch")
    # Bottleneck blocks belong to the ImageNet ResNet-50 only; in a CIFAR file (or one without "arch") they are
    # bearpaw's ResNet-164
    if arch != "resnet50" and any(re.search(r"layer\d+\.\d+\.(conv3|bn3)\.", k) for k in state):
        raise ImportCheckpointError(
            f"{str(path)!r} holds Bottleneck blocks (keys like 'layer1.0.conv3.weight'): this looks like bearpaw's "
            "ResNet-164 (pytorch-classification's 'resnet110' with block_name='Bottleneck', keys 'module.*'), "
            "a different network; Cohen et al.'s cifar_resnet110 has 18 BasicBlocks per stage (conv1, bn1, conv2, "
            "bn2 per block) under keys '1.layer1.0.conv1.weight', ...")
    if arch not in COHEN_ARCHS:
        raise ImportCheckpointError(f"{str(path)!r}: arch={arch!r} is not one of Cohen et al.'s architectures "
                                    f"{', '.join(COHEN_ARCHS)} (the 'arch' entry written by their train.py)")
    name, dataset, blocks = COHEN_ARCHS[arch]
    prefixes = ("1.module.", "1.")
    stripped, source_names = {}, {}
    for k, v in state.items():
        prefix = next((p for p in prefixes if k.startswith(p)), None)
        if prefix is None:
            raise ImportCheckpointError(
                f"{str(path)!r}: key {k!r} does not start with '1.' or '1.module.'; Cohen et al. saved "
                "Sequential(NormalizeLayer, net), whose weights are all under '1.' (e.g. '1.conv1.weight')")
        stripped[k[len(prefix):]] = v
        source_names[k[len(prefix):]] = k
    model = build(name)
    if blocks is None:  # torchvision ResNet-50: same names under Sequential index 1
        renamed = {f"1.{k}": v for k, v in stripped.items()}
        names = {f"1.{k}": source_names[k] for k in stripped}
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        mapping = _cohen_cifar_names(list(stripped), blocks)
        renamed = {mapping[k]: v for k, v in stripped.items()}
        names = {mapping[k]: source_names[k] for k in stripped}
        for k in model.state_dict():  # missing keys are reported by the name the file should have had
            names.setdefault(k, _cohen_cifar_source_name(k, blocks))
        mean, std = COHEN_CIFAR_MEAN, COHEN_CIFAR_STD
    # the Normalize buffers are ours, not the file's: take them from the model, then set the authors' constants
    norm = {k: v for k, v in model.state_dict().items() if k.startswith("0.")}
    names.update({k: f"(shadowlab Normalize) {k}" for k in norm})
    what = f"Cohen et al.'s {arch} (shadowlab {name}" + (f", {blocks} BasicBlocks per stage)" if blocks else ")")
    _match(model, {**renamed, **norm}, names, what, path)
    _set_normalization(model, mean, std)
    info = {"arch": arch, "dataset": dataset, "epoch": obj.get("epoch"),
            "normalization": {"mean": list(mean), "std": list(std)}}
    return model.eval(), name, info


# ----------------------------------------------------------------------------------------------------- CROWN-IBP
def crown_ibp_arch(family: str, arch_kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(shadowlab arch, its keyword arguments) for a CROWN-IBP model class and its model_params.

    ``family`` is a CROWN-IBP class (model_cnn_2layer, model_cnn_3layer_fixed, model_cnn_4layer, IBP_large) or the
    shadowlab name; ``arch_kwargs`` takes CROWN-IBP's model_params (in_ch 3 and in_dim 32 if given, width,
    linear_size, kernel_size) with CROWN-IBP's defaults. Example: ``crown_ibp_arch("model_cnn_2layer",
    {"width": 2, "linear_size": 256})`` -> ``("cnn-2layer", {"width": 2, "linear_size": 256, "normalize": True})``.
    """
    if family not in CROWN_IBP_ARCHS:
        raise ImportCheckpointError(f"arch={family!r} is not a CROWN-IBP CIFAR-10 family; accepted: "
                                    f"{', '.join(CROWN_IBP_ARCHS)}")
    if not isinstance(arch_kwargs, dict):
        raise ImportCheckpointError(f"arch_kwargs must be a JSON object, got {arch_kwargs!r}")
    name = CROWN_IBP_ARCHS[family]
    kw = dict(arch_kwargs)
    for key, want in (("in_ch", 3), ("in_dim", 32)):
        if kw.pop(key, want) != want:
            raise ImportCheckpointError(f"arch_kwargs {key}={arch_kwargs[key]!r}: only CIFAR-10 models "
                                        f"({key} {want}) can be imported")
    required, defaults = CROWN_IBP_KWARGS[name]
    allowed = set(required) | set(defaults)
    bad = sorted(set(kw) - allowed)
    missing = [k for k in required if k not in kw]
    if bad or missing:
        raise ImportCheckpointError(f"arch_kwargs for {family} ({name}) take {sorted(allowed)} (required: "
                                    f"{list(required)}); got {arch_kwargs}" + (f", unknown {bad}" if bad else "")
                                    + (f", missing {missing}" if missing else ""))
    return name, {**defaults, **kw, "normalize": True}


def convert_crown_ibp(obj: Any, family: str, arch_kwargs: dict[str, Any], path: str | os.PathLike = "<checkpoint>"
                      ) -> tuple[nn.Module, str, dict[str, Any], dict[str, Any]]:
    """(model in eval mode, shadowlab arch, its kwargs, source info) from a CROWN-IBP checkpoint object.

    Source index i of the Sequential becomes i + 1 behind shadowlab's Normalize (CROWN-IBP's CIFAR-10 constants);
    keys containing "prev" are dropped, as CROWN-IBP's own loader does. Errors name the expected keys and shapes.
    """
    path = Path(path)
    name, kwargs = crown_ibp_arch(family, arch_kwargs)
    state = {k: v for k, v in _state_dict(obj, path, "CROWN-IBP").items() if "prev" not in k}
    renamed, names = {}, {}
    for k, v in state.items():
        m = re.fullmatch(r"(\d+)\.(weight|bias)", k)
        new = f"{int(m[1]) + 1}.{m[2]}" if m else f"unknown.{k}"
        renamed[new], names[new] = v, k
    try:
        model = build(name, **kwargs)
    except ValueError as err:
        raise ImportCheckpointError(str(err)) from None
    norm = {k: v for k, v in model.state_dict().items() if k.startswith("0.")}
    # the expected names are reported in the file's numbering (index - 1)
    for k in model.state_dict():
        if k not in norm:
            i, rest = k.split(".", 1)
            names.setdefault(k, f"{int(i) - 1}.{rest}")
    _match(model, {**renamed, **norm}, names, f"CROWN-IBP {family} {arch_kwargs} (shadowlab {name})", path)
    _set_normalization(model, CROWN_IBP_MEAN, CROWN_IBP_STD)
    info = {"family": family, "model_params": dict(arch_kwargs), "epoch": obj.get("epoch"),
            **{k: obj[k] for k in ("robust_err", "clean_err") if isinstance(obj.get(k), (int, float))},
            "normalization": {"mean": list(CROWN_IBP_MEAN), "std": list(CROWN_IBP_STD)}}
    return model.eval(), name, {k: v for k, v in kwargs.items()}, info


# ------------------------------------------------------------------------------------------------- entry points
def _out(name: str, out_dir: str | os.PathLike | None, force: bool) -> str | Path:
    """Where the checkpoint goes (``validate.checkpoint_name``), refused when it exists unless ``force``."""
    name = validate.checkpoint_name(name, "name")
    out = Path(out_dir) / name if out_dir is not None else name
    checkpoints.refuse_existing(out, force)
    return out


def import_cohen(path: str | os.PathLike, sigma: float, name: str, out_dir: str | os.PathLike | None = None,
                 command: str | None = None, force: bool = False) -> Path:
    """Convert a Cohen et al. checkpoint (``checkpoint.pth.tar``) trained at noise level ``sigma`` (> 0, pixel
    units) into ``<out_dir or models folder>/<name>.safetensors`` + ``.json``; returns the weights path.

    The sidecar holds defense "gaussian", defense_parameter {"sigma": sigma} (what ``certify smoothing`` and the
    tables read), and source {format "cohen", path, sha256, arch, dataset, epoch, normalization}. Example:
    ``import_cohen("models/cifar10/resnet110/noise_0.25/checkpoint.pth.tar", 0.25, "cohen-resnet110-sigma0.25")``.
    An existing checkpoint of that name is refused (CheckpointError) unless ``force``.
    """
    sigma = validate.sigma(sigma)
    out = _out(name, out_dir, force)
    path = Path(path)
    model, arch, info = convert_cohen(read_torch_file(path), path)
    return checkpoints.save(model, out, arch=arch, arch_kwargs={}, defense="gaussian",
                            defense_parameter={"sigma": sigma},
                            source={"format": "cohen", "path": str(path), "sha256": file_sha256(path),
                                    **info},
                            **({"command": command} if command else {}))


def import_crown_ibp(path: str | os.PathLike, family: str, arch_kwargs: dict[str, Any], eps: float, name: str,
                     out_dir: str | os.PathLike | None = None, command: str | None = None,
                     force: bool = False) -> Path:
    """Convert a CROWN-IBP CIFAR-10 checkpoint (``<model_id>_best.pth``) trained at L-inf radius ``eps`` (pixel
    units, e.g. 8/255) into a shadowlab checkpoint; returns the weights path.

    ``family`` and ``arch_kwargs`` are the model's class and model_params from CROWN-IBP's config (see
    ``crown_ibp_arch``). The sidecar holds defense "crown-ibp", defense_parameter {"eps": eps} and source
    {format "crown-ibp", path, sha256, family, model_params, epoch, robust_err / clean_err when present}. Example:
    ``import_crown_ibp(p, "model_cnn_4layer", {"width": 1, "linear_size": 512}, 8 / 255, "crownibp-authors-4l")``.
    An existing checkpoint of that name is refused (CheckpointError) unless ``force``.
    """
    eps = validate.eps(eps)
    out = _out(name, out_dir, force)
    path = Path(path)
    model, arch, kwargs, info = convert_crown_ibp(read_torch_file(path), family, arch_kwargs, path)
    return checkpoints.save(model, out, arch=arch, arch_kwargs=kwargs, defense="crown-ibp",
                            defense_parameter={"eps": eps},
                            source={"format": "crown-ibp", "path": str(path),
                                    "sha256": file_sha256(path), **info},
                            **({"command": command} if command else {}))
