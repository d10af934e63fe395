"""Controls for the Shadow Attack's tables: how often a wrong label is certified *without* the attack's work.

The paper's claim is about what the attack adds. On the same images and models, each control is judged exactly as
the attack is (``shadow.judge.judge_smoothing`` / ``shadow.judge.judge_crown_ibp`` and ``perception.shadow_success``):

- ``natural``: the natural image itself (delta = 0). Its wrong label is "already certified" when the defense
  certifies a wrong class on it (SSIM is 1, so it always counts as imperceptible).
- ``init``: the attack's initialisation alone (the same uniform delta, from the same per-image seeds): for
  smoothing the starting point of the attack's chosen target, certified by the same final CERTIFY; for CROWN-IBP
  every target's starting point, bounded and selected as the attack's candidates are.
- ``smooth_noise``: random smooth grey noise (white Gaussian noise blurred by a Gaussian of ``blur_sigma`` pixels,
  the same map on R, G, B) scaled to the L2 size of that image's shadow perturbation, then certified (smoothing)
  or bounded against every wrong target (CROWN-IBP).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchvision.transforms.functional import gaussian_blur

from shadowlab.perception import quantize, shadow_success, ssim
from shadowlab.shadow.config import ShadowConfig
from shadowlab.shadow.inputs import image_generator, initial_delta, rgb
from shadowlab.shadow.judge import judge_crown_ibp, judge_smoothing

CONTROLS = ("natural", "init", "smooth_noise")


def smooth_noise(x: torch.Tensor, l2: torch.Tensor, seed: int = 0, image_ids: torch.Tensor | None = None,
                 blur_sigma: float = 2.0) -> torch.Tensor:
    """Random smooth grey noise of L2 size ``l2`` (shape B) added to x (B x 3 x H x W in [0, 1]): 8-bit images.

    Each image's noise comes from shadow.image_generator(seed, image id, "smooth-noise"), is blurred with a Gaussian
    of blur_sigma pixels (kernel 4 blur_sigma + 1, odd), repeated on R, G, B and scaled so that the 3-channel map
    has L2 norm l2[i]; clamping to [0, 1] and 8-bit rounding can change the final size slightly (measure it)."""
    if l2.shape != (x.shape[0],):
        raise ValueError(f"l2 must have shape ({x.shape[0]},), one size per image, got {tuple(l2.shape)}")
    if not blur_sigma > 0:
        raise ValueError(f"blur_sigma={blur_sigma!r} must be a number > 0 (pixels)")
    ids = torch.arange(x.shape[0]) if image_ids is None else torch.as_tensor(image_ids)
    h, w = x.shape[-2:]
    white = torch.stack([torch.randn((1, h, w), generator=image_generator(seed, i, "smooth-noise", x.device),
                                     device=x.device) for i in ids.tolist()])
    k = int(4 * blur_sigma) // 2 * 2 + 1
    smooth = rgb(gaussian_blur(white, [k, k], [blur_sigma, blur_sigma]))
    smooth = smooth / smooth.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return quantize(x + smooth * l2.to(x.device).view(-1, 1, 1, 1))


def white_noise(x: torch.Tensor, l2: torch.Tensor, seed: int = 0, generator: torch.Generator | None = None
                ) -> torch.Tensor:
    """x plus white Gaussian noise scaled to L2 size l2[i] per image, then clamped and rounded to 8 bits
    (``perception.quantize``; that can change the size slightly: measure it). x: B x C x H x W; l2: B. The noise
    is drawn from ``generator`` when given (a caller drawing several in a row), else from one seeded with seed."""
    if l2.shape != (x.shape[0],):
        raise ValueError(f"l2 must have shape ({x.shape[0]},), one size per image, got {tuple(l2.shape)}")
    gen = generator if generator is not None else torch.Generator(device=x.device).manual_seed(seed)
    noise = torch.randn(x.shape, generator=gen, device=x.device)
    noise = noise / noise.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    return quantize(x + noise * l2.to(x.device).view(-1, 1, 1, 1))


def _untargeted(x: torch.Tensor, x_other: torch.Tensor, spoofed: torch.Tensor, min_ssim: float,
                **extra: torch.Tensor) -> dict[str, torch.Tensor]:
    sim = ssim(x, x_other)
    return {"spoofed": spoofed, "success": shadow_success(spoofed, sim, min_ssim), "ssim": sim,
            "l2": (x_other - x).flatten(1).norm(dim=1), **extra}


def smoothing_controls(smooth: Any, x: torch.Tensor, y: torch.Tensor, natural: list, result: Any,
                       image_ids: torch.Tensor | None, n0: int, n_select: int, n: int, alpha: float,
                       batch_size: int = 1000, blur_sigma: float = 2.0) -> dict[str, dict[str, torch.Tensor]]:
    """The three controls on a smoothed classifier ``smooth`` (shadowlab.certify.smoothing.Smooth) for the images x, y
    (natural certificates ``natural``, one per image) and the attack's ShadowResult ``result`` (its config, targets,
    seeds and L2 sizes). Per control a dict of per-image tensors: spoofed, success, ssim, l2, radius. A control's
    final CERTIFY draws its n samples only for the images where a wrong label can still be certified (its n0
    selection picks the target, or any wrong label): the verdicts are those of certifying every image, for a
    fraction of the cost (``Smooth.certify_where``)."""
    cfg: ShadowConfig = result.config
    min_ssim = cfg.min_ssim
    dev = x.device
    ids = torch.arange(x.shape[0]) if image_ids is None else torch.as_tensor(image_ids)
    out: dict[str, dict[str, torch.Tensor]] = {}
    pred = torch.tensor([c.prediction for c in natural], device=dev)
    wrong = (pred != y.to(dev)) & (pred >= 0)
    rad = torch.tensor([c.radius for c in natural], device=dev)
    out["natural"] = _untargeted(x, x, wrong, min_ssim, radius=torch.where(wrong, rad, torch.zeros_like(rad)))
    # the initialisation the attack started its chosen target from, judged by the same final CERTIFY
    grid = result.extra.get("init_targets", result.candidate_targets).to(dev)
    b, t = grid.shape
    col = (grid == result.target.to(dev)[:, None]).float().argmax(1)
    d0 = initial_delta(cfg, b, t, tuple(x.shape[2:]), ids, dev).view(b, t, cfg.channels, *x.shape[2:])
    x_init = quantize(x + rgb(d0[torch.arange(b, device=dev), col]))
    judged = judge_smoothing(smooth, x, result.target.to(dev)[:, None], x_init, n0, n_select, n, alpha, batch_size,
                             cfg.seed, min_ssim, spoof_only=True)
    out["init"] = {k: judged[k] for k in ("spoofed", "success", "ssim", "l2", "radius")}
    x_noise = smooth_noise(x, result.l2.to(dev), cfg.seed, ids, blur_sigma)
    # only a wrong label can count: an image whose CERTIFY selection picks its true label needs no n samples
    certs = smooth.certify_where(x_noise, n0, n, alpha, lambda c_a: c_a != y.to(c_a.device), batch_size,
                                 cfg.seed + 3)
    pred = torch.tensor([-1 if c is None else c.prediction for c in certs], device=dev)
    wrong = (pred != y.to(dev)) & (pred >= 0)
    rad = torch.tensor([0.0 if c is None else c.radius for c in certs], device=dev)
    out["smooth_noise"] = _untargeted(x, x_noise, wrong, min_ssim,
                                      radius=torch.where(wrong, rad, torch.zeros_like(rad)))
    return out


def crown_ibp_controls(model: nn.Module, eps: float, x: torch.Tensor, y: torch.Tensor, result: Any,
                       image_ids: torch.Tensor | None, batch_size: int = 512, num_classes: int = 10,
                       blur_sigma: float = 2.0) -> dict[str, dict[str, torch.Tensor]]:
    """The three controls on a certifiably trained network at eps, for the images x, y and the attack's
    ShadowResult ``result``: each perturbed image is bounded against every wrong target, exactly as the attack's
    candidates (judge_crown_ibp). Per control a dict of per-image tensors: spoofed, success, ssim, l2, margin."""
    cfg: ShadowConfig = result.config
    dev = x.device
    ids = torch.arange(x.shape[0]) if image_ids is None else torch.as_tensor(image_ids)
    tg = result.candidate_targets.to(dev)
    b, t = tg.shape
    keys = ("spoofed", "success", "ssim", "l2", "margin")
    candidates = {
        "natural": x.repeat_interleave(t, dim=0),
        "init": quantize(x.repeat_interleave(t, dim=0) + rgb(initial_delta(cfg, b, t, tuple(x.shape[2:]), ids,
                                                                            dev))),
        "smooth_noise": smooth_noise(x, result.l2.to(dev), cfg.seed, ids, blur_sigma).repeat_interleave(t, dim=0),
    }
    return {name: {k: v for k, v in judge_crown_ibp(model, eps, x, y.to(dev), tg, xc, batch_size, cfg.min_ssim,
                                                    num_classes).items() if k in keys}
            for name, xc in candidates.items()}


__all__ = ["CONTROLS", "crown_ibp_controls", "smooth_noise", "smoothing_controls"]
