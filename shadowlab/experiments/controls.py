"""Controls for the Shadow Attack's tables: how often a wrong label is certified *without* the attack's work.

The paper's claim is about what the attack adds. On the same images and models, each control is judged exactly as
the attack is (the certificate's ``shadow.objectives.Objective`` and ``perception.shadow_success``):

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
from torchvision.transforms.functional import gaussian_blur

from shadowlab.perception import quantize, shadow_success, ssim
from shadowlab.shadow.config import ShadowConfig, ShadowResult
from shadowlab.shadow.inputs import image_generator, initial_delta, rgb
from shadowlab.shadow.objectives import Objective

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


def _verdict(x: torch.Tensor, x_other: torch.Tensor, judged: dict[str, torch.Tensor], score: str,
             min_ssim: float) -> dict[str, torch.Tensor]:
    """A control's per-image columns from its verdict ``judged`` on the images x_other made from x."""
    sim = ssim(x, x_other)
    return {"spoofed": judged["spoofed"], "success": shadow_success(judged["spoofed"], sim, min_ssim), "ssim": sim,
            "l2": (x_other - x).flatten(1).norm(dim=1), score: judged[score]}


def controls(objective: Objective, x: torch.Tensor, y: torch.Tensor, result: ShadowResult,
             image_ids: torch.Tensor | None = None, natural: Any = None, blur_sigma: float = 2.0
             ) -> dict[str, dict[str, torch.Tensor]]:
    """The three controls (module docstring) of the attack's ShadowResult ``result`` on the certificate
    ``objective`` (``shadow.objectives``), for the images x, y (B x 3 x H x W, B) and their ids (default 0 .. B-1).

    natural: the natural images' own verdicts if the caller has them (smoothing: their CERTIFY ``Certificate``s),
    else the objective computes them. Each control is judged as the attack is: ``natural`` and ``smooth_noise`` by
    ``objective.natural_wrong_label`` / ``objective.wrong_label`` (some wrong label certified), ``init`` by
    ``objective.judge`` on the initialisation of ``objective.control_targets(result)`` (smoothing: the chosen target,
    whose final CERTIFY draws its n samples only where the target can still be certified; CROWN-IBP: every target).
    Per control a dict of per-image tensors: spoofed, success, ssim, l2 and the objective's score (radius, margin).
    """
    cfg: ShadowConfig = result.config
    dev = x.device
    y = y.to(dev)
    ids = torch.arange(x.shape[0]) if image_ids is None else torch.as_tensor(image_ids)
    tg = result.candidate_targets.to(dev)
    score = objective.score
    out = {"natural": _verdict(x, x, objective.natural_wrong_label(x, y, tg, cfg, natural), score, cfg.min_ssim)}
    # the initialisation the attack started each control target from (same per-image seeds)
    grid = result.extra.get("init_targets", result.candidate_targets).to(dev)
    b, t = grid.shape
    ctl = objective.control_targets(result).to(dev)
    col = (grid[:, None, :] == ctl[:, :, None]).float().argmax(2)           # B x T_ctl: each one's column in grid
    d0 = initial_delta(cfg, b, t, tuple(x.shape[2:]), ids, dev).view(b, t, cfg.channels, *x.shape[2:])
    x_init = quantize(x.repeat_interleave(ctl.shape[1], dim=0)
                      + rgb(d0[torch.arange(b, device=dev)[:, None], col].flatten(0, 1)))
    judged = objective.judge(x, y, ctl, x_init, cfg, spoof_only=True)
    out["init"] = {k: judged[k] for k in ("spoofed", "success", "ssim", "l2", score)}
    x_noise = smooth_noise(x, result.l2.to(dev), cfg.seed, ids, blur_sigma)
    out["smooth_noise"] = _verdict(x, x_noise, objective.wrong_label(x, y, x_noise, tg, cfg, cfg.seed + 3), score,
                                   cfg.min_ssim)
    return out


__all__ = ["CONTROLS", "controls", "smooth_noise", "white_noise"]
