"""What a Shadow Attack starts from: the target grid, the argument checks and each image's seeded random numbers.

Every image's random numbers (initial perturbation, training noise) come from its own generator, seeded from
(seed, image id, stream) by ``image_generator``, so an image gets the same start whichever batch or shard it is
attacked in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from shadowlab import validate
from shadowlab.models import default_device
from shadowlab.shadow.config import ShadowConfig


def resolve_targets(targets: str | torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Targets as a LongTensor B x T: "all" = the K - 1 wrong classes in increasing order, or a B / B x T tensor."""
    b = y.shape[0]
    if isinstance(targets, str):
        if targets != "all":
            raise ValueError(f"targets={targets!r} must be 'all' or an integer tensor of shape (B,) or (B, T)")
        j = torch.arange(num_classes - 1, device=y.device).expand(b, -1)
        return j + (j >= y[:, None]).long()
    if not isinstance(targets, torch.Tensor) or targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must be 'all' or an integer tensor of shape ({b},) or ({b}, T), got {targets!r}")
    t = targets.to(y.device).long()
    if t.dim() == 1:
        t = t[:, None]
    if t.dim() != 2 or t.shape[0] != b or t.shape[1] < 1:
        raise ValueError(f"targets must have shape ({b},) or ({b}, T) with T >= 1, got {tuple(targets.shape)}")
    if int(t.min()) < 0 or int(t.max()) >= num_classes:
        raise ValueError(f"targets entries must lie in [0, {num_classes - 1}], "
                         f"got range [{int(t.min())}, {int(t.max())}]")
    if bool((t == y[:, None]).any()):
        raise ValueError("targets must differ from the true labels y (a shadow image needs a wrong label)")
    return t


def check_attack_inputs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: ShadowConfig, num_classes: int,
                  batch_size: int | None) -> None:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(cfg, ShadowConfig):
        raise ValueError(f"cfg must be a ShadowConfig, got {type(cfg).__name__}")
    validate.images(x)
    if x.shape[1] != 3:
        raise ValueError(f"x must have 3 channels (N x 3 x H x W), got shape {tuple(x.shape)}")
    validate.model_input(model, x)   # a height and width the model's layers fit (28 x 28 on a 32 x 32 model: refused)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes={num_classes} must be an integer >= 2")
    validate.labels(y, x.shape[0], num_classes=num_classes)
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size={batch_size} must be an integer >= 1")


def image_generator(seed: int, image_id: int, stream: str, device: torch.device | str) -> torch.Generator:
    """A generator for one image's random numbers, seeded from (seed, image id, stream): an image gets the same
    initialisation and training noise whichever batch or shard it is attacked in."""
    tag = int.from_bytes(stream.encode()[:8].ljust(8, b"\0"), "little")
    state = np.random.SeedSequence([int(seed), int(image_id), tag]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device=device).manual_seed(int(state[0]) << 32 | int(state[1]))


def _per_image(draw: Callable[[torch.Generator], torch.Tensor], seed: int, image_ids: torch.Tensor, stream: str,
               device: torch.device) -> torch.Tensor:
    return torch.stack([draw(image_generator(seed, i, stream, device)) for i in image_ids.tolist()])


def initial_delta(cfg: ShadowConfig, b: int, t: int, hw: tuple[int, int], image_ids: torch.Tensor,
                  device: torch.device) -> torch.Tensor:
    """The attack's starting perturbation for B images x T targets: (B * T) x channels x H x W, image-major.

    "uniform": U(-init_scale, init_scale) per value (the authors' initialisation), drawn per image from
    image_generator(cfg.seed, image id, "init"); "zeros": all zero."""
    shape = (t, cfg.channels, *hw)
    if cfg.init == "zeros":
        return torch.zeros((b * t, *shape[1:]), device=device)
    u = _per_image(lambda g: torch.rand(shape, generator=g, device=device), cfg.seed, image_ids, "init", device)
    return ((u * 2 - 1) * cfg.init_scale).reshape(b * t, *shape[1:])


def training_noise(sigma: float, noise_samples: int, shape: tuple[int, ...], seed: int, image_ids: torch.Tensor,
                   device: torch.device) -> torch.Tensor:
    """The attack's Gaussian copies: B x noise_samples x C x H x W, N(0, sigma^2), drawn per image from
    image_generator(seed, image id, "noise") (never the certification seeds' streams)."""
    return sigma * _per_image(lambda g: torch.randn((noise_samples, *shape), generator=g, device=device), seed,
                              image_ids, "noise", device)


def rgb(d: torch.Tensor) -> torch.Tensor:
    """The perturbation as applied to the image: a 1-channel map repeated on R, G, B."""
    return d.expand(-1, 3, -1, -1) if d.shape[1] == 1 else d


def chunks(total: int, size: int) -> list[tuple[int, int]]:
    """[start, end) ranges of at most ``size`` covering range(total)."""
    return [(s, min(s + size, total)) for s in range(0, total, size)]


@dataclass(frozen=True)
class Candidates:
    """Every (image, target) candidate of one attack call, on the device, image-major: candidate k is image
    img_of[k] with target tgt[k]. x: B x 3 x H x W natural images in [0, 1]; y: their B labels; tg: the B x T target
    grid; img_of: the M = B * T candidates' images; ids: the B image ids (CPU) that seed each image's random
    numbers."""

    x: torch.Tensor
    y: torch.Tensor
    tg: torch.Tensor
    img_of: torch.Tensor
    ids: torch.Tensor

    @property
    def dev(self) -> torch.device:
        return self.x.device

    @property
    def b(self) -> int:
        return self.tg.shape[0]

    @property
    def t(self) -> int:
        return self.tg.shape[1]

    @property
    def m(self) -> int:
        return self.b * self.t

    @property
    def x_c(self) -> torch.Tensor:
        """The candidates' natural images, M x 3 x H x W."""
        return self.x[self.img_of]

    @property
    def y_c(self) -> torch.Tensor:
        """The candidates' true labels, M."""
        return self.y[self.img_of]

    @property
    def tgt(self) -> torch.Tensor:
        """The candidates' targets, M."""
        return self.tg.reshape(-1)


def candidates(model: nn.Module, x: torch.Tensor, y: torch.Tensor, targets: str | torch.Tensor, num_classes: int,
               device: torch.device | str | None, image_ids: torch.Tensor | Sequence[int] | None) -> Candidates:
    """The ``Candidates`` of one attack call: model, images and labels moved to the device (default CUDA when
    available), the B x T target grid (``resolve_targets``) and the image ids that seed each image's random numbers
    (default 0 .. B - 1; ValueError unless B integers >= 0)."""
    dev = torch.device(device) if device is not None else default_device()
    model.to(dev)
    x, y = x.to(dev).float(), y.to(dev).long()
    tg = resolve_targets(targets, y, num_classes)
    img_of = torch.arange(tg.shape[0], device=dev).repeat_interleave(tg.shape[1])
    if image_ids is None:
        ids = torch.arange(x.shape[0])
    else:
        ids = torch.as_tensor(image_ids)
        if ids.shape != (x.shape[0],) or ids.dtype.is_floating_point or ids.dtype == torch.bool or (
                len(ids) and int(ids.min()) < 0):
            raise ValueError(f"image_ids must be {x.shape[0]} integers >= 0 (one per image), got {image_ids!r}")
    return Candidates(x, y, tg, img_of, ids.long().cpu())
