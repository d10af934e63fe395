"""Training: standard, Gaussian-noise augmentation (Cohen et al. 2019), PGD adversarial training (Madry et al. 2018)
and CROWN-IBP (Zhang et al. 2020)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from shadowlab import validate
from shadowlab.attacks import pgd
from shadowlab.certify.bounds import crown_ibp_training_loss
from shadowlab.models import default_device

DEFENSES = ("none", "gaussian", "pgd", "crown-ibp")
INIT_SCHEMES = ("default", "ibp")
LR_SCHEDULES = ("step", "constant")


@dataclass
class TrainConfig:
    """Everything that determines a training run (stored in the checkpoint sidecar)."""

    arch: str = "cnn"
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    defense: str = "none"
    sigma: float = 0.0            # Gaussian augmentation std (defense "gaussian")
    eps: float = 0.0              # L-inf radius (defenses "pgd" and "crown-ibp")
    pgd_steps: int = 7            # PGD steps per training batch (defense "pgd"; step size 2.5 eps / pgd_steps)
    epochs: int = 15
    batch_size: int = 256
    optimizer: str = "sgd"        # "sgd" (nesterov, one-cycle) or "adam"
    lr_schedule: str = "step"     # adam only: "step" (x0.1 twice after the ramp) or "constant"
    lr: float = 0.2
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    augment: bool = True          # random crop (pad 4) and horizontal flip
    seed: int = 0
    init: str | None = None       # checkpoint to start from
    init_scheme: str = "default"  # "default" (PyTorch's) or "ibp" (Shi et al. 2021), for fresh weights only
    # CROWN-IBP schedule (Zhang et al. 2020): fractions of the total number of steps
    warmup_frac: float = 0.05     # eps = 0
    ramp_frac: float = 0.5        # eps rises linearly to its target, beta beta_start -> beta_end, kappa 1 -> kappa_end
    kappa_end: float = 0.0
    beta_start: float = 1.0       # 0 with beta_end 0: plain IBP training (Gowal et al. 2018), no CROWN pass
    beta_end: float = 0.0
    beta_frac: float = 1.0        # beta reaches beta_end after this fraction of the ramp (Zhang et al.: 1.0)
    train_eps_factor: float = 1.0  # train at eps * factor (Zhang et al. train slightly above the test eps)
    warmup_reg: float = 0.0       # lambda_0 of Shi et al. 2021's warm-up regulariser (0.5 there), fading to 0 with eps
    max_steps: int | None = None   # stop early (smoke tests)

    def __post_init__(self) -> None:
        validate.choice(self.defense, "defense", DEFENSES)
        validate.number(self.sigma, "sigma", low=0.0)
        if self.defense == "gaussian" and self.sigma <= 0:
            raise ValueError(f"defense='gaussian' needs sigma > 0, got sigma={self.sigma}")
        validate.eps(self.eps)
        if self.defense == "pgd" and self.eps <= 0:
            raise ValueError(f"defense='pgd' needs eps > 0, got eps={self.eps}")
        validate.count(self.pgd_steps, "pgd_steps")
        validate.number(self.warmup_reg, "warmup_reg", low=0.0)
        validate.count(self.epochs, "epochs")
        validate.count(self.batch_size, "batch_size")
        validate.choice(self.init_scheme, "init_scheme", INIT_SCHEMES)
        if self.init is not None and self.init_scheme != "default":
            raise ValueError(f"init_scheme={self.init_scheme!r} draws fresh weights, but init={self.init!r} loads a "
                             "checkpoint: give one of them")
        validate.choice(self.lr_schedule, "lr_schedule", LR_SCHEDULES)
        validate.choice(self.optimizer, "optimizer", ("sgd", "adam"))
        for name in ("warmup_frac", "ramp_frac", "beta_frac", "beta_start", "beta_end", "kappa_end"):
            validate.probability(getattr(self, name), name, low_open=name == "beta_frac")


def augment_batch(x: torch.Tensor, generator: torch.Generator | None = None, pad: int = 4) -> torch.Tensor:
    """Random crop after zero padding and random horizontal flip, vectorised over the batch."""
    n, c, h, w = x.shape
    dev = x.device
    xp = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (n,), device=dev, generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (n,), device=dev, generator=generator)
    rows = (oy[:, None] + torch.arange(h, device=dev))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w, device=dev))
    flip = torch.rand(n, device=dev, generator=generator) < 0.5
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]
    batch = torch.arange(n, device=dev)[:, None, None, None]
    chan = torch.arange(c, device=dev)[None, :, None, None]
    return xp[batch, chan, rows, cols]


@torch.no_grad()
def ibp_initialise(model: nn.Module, generator: torch.Generator | None = None) -> None:
    """IBP initialisation (Shi et al. 2021, sec. 3.2): w ~ N(0, 2 pi / fan_in^2) for every layer but the last.

    With it the width of an interval bound neither grows nor shrinks from layer to layer at initialisation,
    where PyTorch's default lets it grow with every layer. Biases keep their default initialisation.
    """
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not layers:
        raise ValueError("ibp_initialise needs a model with Conv2d or Linear layers")
    for layer in layers[:-1]:
        fan_in = layer.weight[0].numel()
        layer.weight.normal_(0.0, math.sqrt(2 * math.pi) / fan_in, generator=generator)


def crown_ibp_schedule(step: int, total: int, cfg: TrainConfig) -> tuple[float, float, float, float]:
    """(eps, beta, kappa, reg) at a step: warm-up at eps 0, then a linear ramp (Zhang et al. 2020, sec. 4); reg, the
    weight of Shi et al. 2021's warm-up regulariser, fades linearly from warmup_reg to 0 over the same ramp."""
    warm = int(cfg.warmup_frac * total)
    ramp = max(1, int(cfg.ramp_frac * total))
    t = min(max(step - warm, 0) / ramp, 1.0) if step >= warm else 0.0
    eps = cfg.eps * cfg.train_eps_factor * t
    beta = cfg.beta_start + (cfg.beta_end - cfg.beta_start) * min(t / cfg.beta_frac, 1.0)
    kappa = 1.0 + (cfg.kappa_end - 1.0) * t
    return eps, beta, kappa, cfg.warmup_reg * (1.0 - t)


def _uses_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def make_optimizer(model: nn.Module, cfg: TrainConfig, total: int
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The optimiser and its per-step learning-rate schedule for a run of `total` steps."""
    if cfg.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True,
                                                     weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=0.25,
                                                    anneal_strategy="linear", div_factor=10, final_div_factor=100)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        # step decay at 50% and 75% of the steps after the ramp, as in Zhang et al.; "constant" never decays
        milestones = ([int(0.5 * total + 0.5 * cfg.ramp_frac * total), int(0.75 * total + 0.25 * cfg.ramp_frac * total)]
                      if cfg.lr_schedule == "step" else [])
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, 0.1)
    return opt, sched


def adversarial_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, step: int
                      ) -> torch.Tensor:
    """The batch PGD adversarial training (Madry et al. 2018) trains on: ``attacks.pgd`` (L-inf, cfg.eps,
    cfg.pgd_steps steps, random start seeded by cfg.seed + step) against the current weights, with batch norm in eval
    mode during the attack so that the attack's forward passes do not move its running statistics. Returns
    the adversarial images (no gradient), every one within cfg.eps of its x in L-inf and in [0, 1]."""
    model.eval()
    x_adv = pgd(model, x, y, cfg.eps, norm="linf", steps=cfg.pgd_steps, seed=cfg.seed + step).x_adv
    model.train()
    return x_adv.detach()


def train(model: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor, cfg: TrainConfig,
          device: torch.device | str | None = None, progress: bool = True,
          callback: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    """Train in place (after redrawing the weights if cfg.init_scheme asks); returns a summary (final loss, steps,
    seconds, per-epoch losses)."""
    if cfg.init_scheme == "ibp":
        ibp_initialise(model)
    device = torch.device(device) if device is not None else default_device()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    dev_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    channels_last = _uses_conv(model) and cfg.defense != "crown-ibp"
    model.to(device)
    if channels_last:  # about 2x faster convolutions on CPU (oneDNN)
        model.to(memory_format=torch.channels_last)
    n = len(x_train)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    opt, sched = make_optimizer(model, cfg, total)
    robust_loss = crown_ibp_training_loss if cfg.defense == "crown-ibp" else None
    step, t0 = 0, time.time()
    epoch_losses: list[float] = []
    bar = tqdm(total=total, desc=f"train {cfg.arch} {cfg.defense}", disable=not progress)
    model.train()
    while step < total:
        perm = torch.randperm(n, generator=gen)
        running, count = torch.zeros((), device=device), 0
        for i in range(0, n, cfg.batch_size):
            if step >= total:
                break
            idx = perm[i:i + cfg.batch_size]
            xb = x_train[idx].to(device, non_blocking=True)
            yb = y_train[idx].to(device, non_blocking=True)
            if cfg.augment:
                xb = augment_batch(xb, dev_gen)
            if cfg.defense == "gaussian":
                xb = xb + cfg.sigma * torch.randn(xb.shape, device=device, generator=dev_gen)
            if cfg.defense == "pgd":
                xb = adversarial_batch(model, xb, yb, cfg, step)
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            record: dict[str, float] = {}
            if robust_loss is not None:
                eps, beta, kappa, reg = crown_ibp_schedule(step, total, cfg)
                logits = model(xb)
                natural = F.cross_entropy(logits, yb)
                robust = robust_loss(model, xb, yb, eps, beta, reg) if eps > 0 else natural
                loss = kappa * natural + (1 - kappa) * robust
                record.update(eps=eps, beta=beta, kappa=kappa)
            else:
                loss = F.cross_entropy(model(xb), yb, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.detach()
            count += 1
            step += 1
            bar.update(1)
            if callback is not None:
                callback(step, {"loss": float(loss.detach()), **record})
        epoch_losses.append(float(running / max(count, 1)))
        bar.set_postfix(loss=f"{epoch_losses[-1]:.3f}")
    bar.close()
    model.eval()
    if channels_last:
        model.to(memory_format=torch.contiguous_format)
    return {"steps": step, "seconds": round(time.time() - t0, 1), "epoch_losses": epoch_losses,
            "final_loss": epoch_losses[-1] if epoch_losses else float("nan"), "config": asdict(cfg)}


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, sigma: float = 0.0, seed: int = 0,
             batch_size: int = 500, device: torch.device | str | None = None, progress: bool = False) -> float:
    """Top-1 accuracy on (x, y), optionally under one seeded draw of N(0, sigma^2) pixel noise."""
    device = torch.device(device) if device is not None else default_device()
    model.eval().to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    correct = torch.zeros((), dtype=torch.long, device=device)
    for i in tqdm(range(0, len(x), batch_size), desc="accuracy", disable=not progress, leave=False):
        xb = x[i:i + batch_size].to(device)
        if sigma > 0:
            xb = xb + sigma * torch.randn(xb.shape, device=device, generator=gen)
        correct += (model(xb).argmax(1) == y[i:i + batch_size].to(device)).sum()
    return float(correct) / len(x)
