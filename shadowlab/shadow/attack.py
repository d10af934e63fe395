"""The Shadow Attack (Ghiasi, Shafahi, Goldstein, ICLR 2020, paper eq. 2) against randomized smoothing and CROWN-IBP.

    maximise_delta  -L(theta, x + delta, target) - lambda_c C(delta) - lambda_tv TV(delta) - lambda_s Dissim(delta)

implemented as plain gradient *descent* on the negated objective (no sign, no projection). Every (image, target)
pair is a "candidate"; all candidates of a call are optimised together in one tensor of shape
(B * T) x C_delta x H x W on the device, and the loop does no host synchronisation unless a callback is given or
early stopping is on. Regularisers are computed on the perturbation as applied to the image (the 1-channel
map repeated over R, G, B), as in the authors' code.

This module holds the two attacks; the loop is ``shadow.optimise``, how candidates are judged ``shadow.judge``, the
settings and the result ``shadow.config``, the target grid and the per-image seeds ``shadow.inputs``, the
regularisers ``regularisers``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shadowlab.attacks import eval_mode
from shadowlab.models import fold_batch_norm
from shadowlab.precision import compute_precision, prepare_model
from shadowlab.shadow.config import LOSS_BOUNDS, ShadowConfig, ShadowResult
from shadowlab.shadow.inputs import (
    candidates,
    check_attack_inputs,
    chunks,
    rgb,
    training_noise,
)
from shadowlab.shadow.judge import (
    certify_as_targets,
    judge_crown_ibp,
    judge_smoothing,
)
from shadowlab.shadow.optimise import search


# ----------------------------------------------------------------------------------------------- smoothing
def attack_smoothing(model: nn.Module, sigma: float, x: torch.Tensor, y: torch.Tensor, cfg: ShadowConfig | None = None,
                     targets: str | torch.Tensor = "all", n0: int = 100, n_select: int = 200,
                     n: int | None = 100_000, alpha: float = 0.001, certify_batch_size: int = 1000,
                     callback: Callable[[int, dict[str, Any]], None] | None = None, progress: bool = True,
                     device: torch.device | str | None = None, num_classes: int = 10, batch_size: int = 1024,
                     delta_every: int = 10, certify_natural: bool = False,
                     image_ids: torch.Tensor | Sequence[int] | None = None) -> ShadowResult:
    """Shadow Attack on a randomized-smoothing classifier (paper eq. 2, sec. 4; Cohen et al.'s CERTIFY to score).

    Loss per (image, target) candidate: mean cross-entropy to the target over cfg.noise_samples Gaussian copies
    clamp(x + delta, 0, 1) + N(0, sigma^2) (noise drawn once per image and reused every step, as the authors;
    they add delta to the noisy copies without clamping) + lambda_c C + lambda_tv TV + lambda_s Dissim
    (+ l2_penalty ||delta||_2). All B * T candidates are optimised together; the B * T * noise_samples forward
    batch runs in chunks of batch_size with the gradient accumulated exactly. The candidates are then judged by
    ``judge_smoothing``: CERTIFY(n0, n_select, alpha) picks each image's target (certified and imperceptible
    first, then the largest radius), CERTIFY(n0, n, alpha) certifies it (n=None: the selection certificate), and
    success needs the wrong label certified AND SSIM(x, x_shadow) >= cfg.min_ssim.

    Args:
        model: the base classifier (pixels in [0, 1] -> logits) of the smoothed classifier.
        sigma: its Gaussian noise level (> 0).
        x: B x 3 x H x W natural images in [0, 1]; y: their B labels.
        cfg: the attack's settings (default ``ShadowConfig()``; ``ShadowConfig.paper_smoothing()`` the authors').
        targets: "all" (every wrong class) or B or B x T target labels.
        n0, n_select, n, alpha: CERTIFY's samples for the class, for ranking the candidates, and for the final
            certificate (n=None: report the ranking certificate), and its failure probability.
        certify_batch_size: noise samples per forward pass of CERTIFY.
        callback: called as callback(step, record) with the mean loss terms (and every delta_every steps the
            current delta and shadow images); None for no host synchronisation in the loop.
        progress: tqdm bar; device: where to run (default CUDA when available); num_classes: K.
        batch_size: forward batch of the attack step (candidates x noise samples run in chunks of it).
        certify_natural: also CERTIFY the natural images (``natural_prediction``, ``natural_radius``).
        image_ids: B integers (default 0 .. B - 1) seeding each image's initialisation and training noise, so an
            image's result does not depend on the batch or shard it is in.

    Returns:
        A ``ShadowResult``: per image the kept shadow image, target, prediction, radius, SSIM and success, per
        candidate the scores, and the loss history (history["target_fraction"]: the share of training-noise
        predictions equal to the target; history["ssim"]: the candidates' SSIM per step).

    Example: ``attack_smoothing(model, 0.25, x, y, ShadowConfig(steps=40), n=1000).success``.
    """
    from shadowlab.certify.smoothing import Smooth

    cfg = cfg if cfg is not None else ShadowConfig()
    check_attack_inputs(model, x, y, cfg, num_classes, batch_size)
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"sigma={sigma} must be a finite number > 0")
    for name, value in (("n0", n0), ("n_select", n_select), ("certify_batch_size", certify_batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value} must be an integer >= 1")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"n={n} must be None (skip the final certification) or an integer >= 1")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise ValueError(f"alpha={alpha} must lie in (0, 1)")
    if cfg.early_stop_margin is not None and not 0 < cfg.early_stop_margin <= 1:
        raise ValueError(f"early_stop_margin={cfg.early_stop_margin} must lie in (0, 1] for smoothing "
                         "(fraction of noisy predictions equal to the target)")
    start = time.perf_counter()
    dev, x, y, tg, img_of, ids = candidates(model, x, y, targets, num_classes, device, image_ids)
    b, t = tg.shape
    m, ns = b * t, cfg.noise_samples
    x_c, tgt = x[img_of], tg.reshape(-1)
    noise = training_noise(sigma, ns, tuple(x.shape[1:]), cfg.seed, ids, dev)
    prepare_model(model, cfg.precision)
    resample_round = 0
    full_chunks = chunks(m * ns, batch_size)
    # channels_last speeds CPU convolutions up by about a fifth (measured on the 'cnn' architecture)
    fmt = torch.channels_last if any(isinstance(u, nn.Conv2d) for u in model.modules()) else torch.contiguous_format
    net = fold_batch_norm(model)   # the same function in eval mode with fewer operations (models.fold_batch_norm)

    def class_step(delta: torch.Tensor, act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        nonlocal noise, resample_round
        if cfg.resample_noise:
            resample_round += 1
            noise = training_noise(sigma, ns, tuple(x.shape[1:]), cfg.seed + 7919 * resample_round, ids, dev)
        d = delta.detach().requires_grad_(True)
        grad = torch.zeros_like(d)
        loss = torch.zeros(m, device=dev)
        hit = torch.zeros(m, device=dev)
        ranges = full_chunks if act.shape[0] == m else chunks(act.shape[0] * ns, batch_size)
        for s, e in ranges:
            p = torch.arange(s, e, device=dev)
            ca, ni = act[p // ns], p % ns
            shifted = x_c[ca] + rgb(d[ca])
            inp = (shifted if cfg.faithful else shifted.clamp(0.0, 1.0)) + noise[img_of[ca], ni]
            with compute_precision(cfg.precision, dev):
                logits = net(inp.contiguous(memory_format=fmt)).float()
            ce = F.cross_entropy(logits, tgt[ca], reduction="none")
            grad += torch.autograd.grad(ce.sum() / ns, d)[0]
            loss.index_add_(0, ca, ce.detach() / ns)
            hit.index_add_(0, ca, (logits.detach().argmax(1) == tgt[ca]).float() / ns)
        return grad, loss[act], hit[act]

    smooth = Smooth(model, num_classes, float(sigma), device=dev, precision=cfg.precision)

    def judge(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        both = torch.cat([tgt, tgt])
        _, pred, rad, _ = certify_as_targets(smooth, images, both, n0, n_select, alpha, certify_batch_size, cfg.seed)
        ok = pred == both
        return ok, torch.where(ok, rad, torch.zeros_like(rad))

    with eval_mode(model):
        x_cand, history, steps_run = search(cfg, x_c, b, t, ids, class_step, "target_fraction", 0.5, judge, callback,
                                            delta_every, progress, "shadow attack (smoothing)")
        # only the candidates still optimised after pruning are scored (the pruned ones froze after prune_step)
        kept = history["kept"]
        tg_judged = tg[kept].view(b, -1)
        x_cand = x_cand.view(b, t, *x.shape[1:])[kept].reshape(-1, *x.shape[1:])
        judged = judge_smoothing(smooth, x, tg_judged, x_cand, n0, n_select, n, alpha, certify_batch_size, cfg.seed,
                                 cfg.min_ssim)
        nat_pred = nat_rad = None
        if certify_natural:
            nat = smooth.certify(x, n0, n if n is not None else n_select, alpha, batch_size=certify_batch_size,
                                 seed=cfg.seed + 2, progress=False)
            nat_pred = torch.tensor([c.prediction for c in nat], device=dev)
            nat_rad = torch.tensor([float(c.radius) if c.prediction == yi else 0.0 for c, yi in zip(nat, y.tolist())],
                                   device=dev)
    return ShadowResult(
        method="smoothing", history=history, config=cfg, seconds=time.perf_counter() - start, steps_run=steps_run,
        candidate_targets=tg_judged, min_ssim=cfg.min_ssim, natural_prediction=nat_pred, natural_radius=nat_rad,
        sigma=float(sigma), extra={"n0": n0, "n_select": n_select, "n": n, "alpha": alpha, "init_targets": tg},
        **judged,
    )


# ----------------------------------------------------------------------------------------------- CROWN-IBP
BOUNDS = LOSS_BOUNDS   # the bounds the loss can read (ShadowConfig.loss_bound)


def _lower(model: nn.Module, xa: torch.Tensor, eps: float, c: torch.Tensor, which: str) -> torch.Tensor:
    from shadowlab.certify.bounds import crown_bounds, ibp_bounds

    if which == "ibp":
        return ibp_bounds(model, xa, eps, C=c)[0]
    return crown_bounds(model, xa, eps, C=c, intermediate="ibp", upper=False)[0]


def attack_crown_ibp(model: nn.Module, eps: float, x: torch.Tensor, y: torch.Tensor, cfg: ShadowConfig | None = None,
                     targets: str | torch.Tensor = "all", callback: Callable[[int, dict[str, Any]], None] | None = None,
                     progress: bool = True, device: torch.device | str | None = None, num_classes: int = 10,
                     batch_size: int = 512, delta_every: int = 10, bound: str | None = None,
                     certify_natural: bool = False,
                     image_ids: torch.Tensor | Sequence[int] | None = None) -> ShadowResult:
    """Shadow Attack on a certifiably trained network (paper eq. 2, sec. 5; bounds of Zhang et al.'s CROWN-IBP).

    Loss per candidate: robust cross-entropy of the certified target margins, CE(cat([0, -lb]), 0) with lb the
    lower bounds of z_t - z_j (j != t) over the L-inf ball of radius eps around clamp(x + delta, 0, 1)
    (crown_bounds with IBP intermediates, or ibp_bounds with bound="ibp"; the authors' evaluation config used
    interval bounds) + lambda_tv TV + l2_penalty ||delta||_2 (+ lambda_c C + lambda_s Dissim if nonzero).
    The candidates are judged by ``judge_crown_ibp``: certified when all margin lower bounds (the larger, still
    sound, of CROWN-IBP and IBP) are >= 0 at eps on the 8-bit shadow image; success needs that AND
    SSIM(x, x_shadow) >= cfg.min_ssim.

    Args:
        model: a certifiably trained nn.Sequential (layers with rules in ``certify.rules``), in eval mode.
        eps: the L-inf radius its certificates are for (>= 0).
        x: B x 3 x H x W natural images in [0, 1]; y: their B labels.
        cfg: the attack's settings (default ``ShadowConfig.tuned_crown_ibp()``, shadowlab's tuned recipe;
            ``ShadowConfig.paper_crown_ibp()`` the paper's numbers; cfg.faithful runs the authors' released
            procedure, ``shadow.faithful``).
        targets: "all" (every wrong class) or B or B x T target labels.
        callback, progress, device, num_classes, delta_every, image_ids: as in ``attack_smoothing``.
        batch_size: candidates bounded together.
        bound: the bound the loss uses, "crown-ibp" or "ibp" (None: cfg.loss_bound; the verdict always takes the
            tighter of the two).
        certify_natural: also bound the natural images' own margins (``natural_margin``).

    Returns:
        A ``ShadowResult`` (history["min_margin"]: the mean over candidates of the smallest target-margin bound).

    Example: ``attack_crown_ibp(model, 2 / 255, x, y, ShadowConfig.tuned_crown_ibp(steps=40)).success``.
    """
    from shadowlab.certify.bounds import certified_margins, margin_spec

    cfg = cfg if cfg is not None else ShadowConfig.tuned_crown_ibp()
    check_attack_inputs(model, x, y, cfg, num_classes, batch_size)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps={eps} must be a finite number >= 0")
    bound = cfg.loss_bound if bound is None else bound
    if bound not in BOUNDS:
        raise ValueError(f"bound={bound!r} is unknown; accepted: {', '.join(BOUNDS)}")
    start = time.perf_counter()
    dev, x, y, tg, img_of, ids = candidates(model, x, y, targets, num_classes, device, image_ids)
    if cfg.faithful:
        from shadowlab.shadow.faithful import attack_crown_ibp_faithful

        res = attack_crown_ibp_faithful(model, eps, x, y, cfg, tg, img_of, ids, callback, progress, num_classes)
        if certify_natural:
            res.natural_margin = certified_margins(model, x, eps, margin_spec(y, num_classes), batch_size).amin(1)
        return res
    b, t = tg.shape
    x_c, y_c, tgt = x[img_of], y[img_of], tg.reshape(-1)
    spec = margin_spec(y_c, num_classes, target=tgt)          # M x (K-1) x K, rows e_t - e_j

    def class_step(delta: torch.Tensor, act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        d = delta.detach().requires_grad_(True)
        grad = torch.zeros_like(d)
        losses, margins = [], []
        for s, e in chunks(act.shape[0], batch_size):
            ca = act[s:e]
            xa = (x_c[ca] + rgb(d[ca])).clamp(0.0, 1.0)
            lb = _lower(model, xa, eps, spec[ca], bound)
            logits = torch.cat([torch.zeros_like(lb[:, :1]), -lb], dim=1)
            ce = F.cross_entropy(logits, torch.zeros(len(ca), dtype=torch.long, device=dev), reduction="none")
            grad += torch.autograd.grad(ce.sum(), d)[0]
            losses.append(ce.detach())
            margins.append(lb.detach().amin(1))
        return grad, torch.cat(losses), torch.cat(margins)

    def judge(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        margin = certified_margins(model, images, eps, torch.cat([spec, spec]), batch_size).amin(1)
        return margin >= 0, margin

    with eval_mode(model):
        x_cand, history, steps_run = search(cfg, x_c, b, t, ids, class_step, "min_margin", 0.0, judge, callback,
                                            delta_every, progress, "shadow attack (CROWN-IBP)")
        judged = judge_crown_ibp(model, eps, x, y, tg, x_cand, batch_size, cfg.min_ssim, num_classes)
        nat_margin = None
        if certify_natural:
            nat_margin = certified_margins(model, x, eps, margin_spec(y, num_classes), batch_size).amin(1)
    return ShadowResult(
        method="crown-ibp", history=history, config=cfg, seconds=time.perf_counter() - start, steps_run=steps_run,
        candidate_targets=tg, min_ssim=cfg.min_ssim, natural_margin=nat_margin, eps=float(eps),
        extra={"bound": bound}, **judged,
    )


