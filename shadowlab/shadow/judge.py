"""How the Shadow Attack's candidates and its controls are judged: which candidate each image keeps (``prefer``),
what the shadow image measures (``measure_shadow``), and the verdict of each certifier: CERTIFY for a smoothed
classifier (``judge_smoothing``, Cohen et al. 2019) and the tightest sound bound for a certifiably trained network
(``judge_crown_ibp``). Success needs the wrong label certified AND the image imperceptible
(``perception.shadow_success``)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from shadowlab.certify.bounds import certified_margins, margin_spec
from shadowlab.perception import MIN_SSIM, check_min_ssim, shadow_success, ssim, tv_per_pixel


def prefer(score: torch.Tensor, certified: torch.Tensor, imperceptible: torch.Tensor) -> torch.Tensor:
    """Each image's best candidate (column index, shape B) from B x T scores: first the candidates that are
    certified as their target and imperceptible, then certified ones, then imperceptible ones, then the rest; within
    the best group the largest score (radius, votes or margin)."""
    rank = 2 * certified.long() + imperceptible.long()
    best_rank = rank.amax(1, keepdim=True)
    return torch.where(rank == best_rank, score, torch.full_like(score, -math.inf)).argmax(1)


def better_iterate(x_c: torch.Tensor, x_best: torch.Tensor, x_last: torch.Tensor, min_ssim: float,
                   judge: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], by_ssim: bool = False
                   ) -> torch.Tensor:
    """Per candidate, whichever of two 8-bit candidate images (the loop's best iterate, the last iterate) the
    attack's own judge prefers: ``judge(images) -> (certified as the target, score)`` on the 2M images, ranked by
    ``prefer`` with SSIM(x, image) >= min_ssim; by_ssim: of two certified imperceptible images the one with the
    larger SSIM (the more natural-looking), else the larger score. Returns the M chosen images."""
    both = torch.cat([x_best, x_last])
    certified, score = judge(both)
    m = x_c.shape[0]
    sim = ssim(torch.cat([x_c, x_c]), both)
    if by_ssim:
        score = torch.where(certified & (sim >= min_ssim), sim, score)
    pick = prefer(score.view(2, m).T, certified.view(2, m).T, (sim >= min_ssim).view(2, m).T)
    return torch.where(pick.view(-1, 1, 1, 1) == 0, x_best, x_last)


def measure_shadow(x: torch.Tensor, x_shadow: torch.Tensor) -> dict[str, torch.Tensor]:
    """SSIM, TV per value, L2 and L-inf size of x_shadow - x, per image."""
    diff = (x_shadow - x).flatten(1)
    return {"ssim": ssim(x, x_shadow), "tv": tv_per_pixel(x, x_shadow), "l2": diff.norm(dim=1),
            "linf": diff.abs().amax(1)}


def certify_as_targets(smooth: Any, images: torch.Tensor, targets: torch.Tensor, n0: int, n: int, alpha: float,
                       batch_size: int, seed: int) -> tuple[list, torch.Tensor, torch.Tensor, torch.Tensor]:
    """CERTIFY(n0, n, alpha) of M candidate images meant for M targets: (the certificates, and on the targets'
    device the M predictions (-1: abstain), radii and shares of the n votes that went to each target)."""
    certs = smooth.certify(images, n0, n, alpha, batch_size=batch_size, seed=seed, progress=False)
    dev = targets.device
    pred = torch.tensor([c.prediction for c in certs], device=dev)
    rad = torch.tensor([float(c.radius) for c in certs], device=dev)
    votes = torch.tensor([c.counts[k] / max(1, sum(c.counts)) for c, k in zip(certs, targets.tolist())], device=dev)
    return certs, pred, rad, votes


def select_candidates(smooth: Any, x_cand: torch.Tensor, tg: torch.Tensor, n0: int, n_select: int, alpha: float,
                      batch_size: int, seed: int, candidate_ssim: torch.Tensor | None = None,
                      min_ssim: float = MIN_SSIM) -> tuple[torch.Tensor, list, torch.Tensor, torch.Tensor,
                                                           torch.Tensor]:
    """The authors' choice of target, preferring imperceptible candidates: CERTIFY(n0, n_select) every (image,
    target) candidate (rows of x_cand in image-major order, targets tg of shape B x T) and keep, per image, the
    candidate certified as its target with SSIM >= min_ssim and the largest radius; failing that a certified one,
    then an imperceptible one with the most target votes (``prefer``). Without candidate_ssim every candidate
    counts as imperceptible (the authors' rule).

    Returns the best column per image, the certificates, and B x T predictions, radii and "certified as target".
    """
    b, t = tg.shape
    dev = tg.device
    sel, pred, rad, share = certify_as_targets(smooth, x_cand, tg.reshape(-1), n0, n_select, alpha, batch_size, seed)
    pred_c, rad_c, votes = pred.view(b, t), rad.view(b, t), share.view(b, t)
    ok_c = pred_c == tg
    imp = (torch.ones_like(ok_c) if candidate_ssim is None
           else candidate_ssim.to(dev).view(b, t) >= check_min_ssim(min_ssim))
    return prefer(torch.where(ok_c, rad_c, votes), ok_c, imp), sel, pred_c, rad_c, ok_c


def judge_smoothing(smooth: Any, x: torch.Tensor, tg: torch.Tensor, x_cand: torch.Tensor, n0: int, n_select: int,
                    n: int | None, alpha: float, batch_size: int, seed: int, min_ssim: float = MIN_SSIM,
                    spoof_only: bool = False) -> dict[str, Any]:
    """How the attack and its controls are judged on a smoothed classifier: candidates x_cand ((B * T) x 3 x H x W,
    image-major, already 8-bit) for targets tg (B x T) on the natural images x (B x 3 x H x W); select_candidates
    picks one per image, CERTIFY(n0, n, alpha) certifies it (n=None: report the selection certificate), and
    success = perception.shadow_success(certified as the target, SSIM, min_ssim). Returns per-image tensors.

    spoof_only: only the verdict is wanted (a control's): the final CERTIFY draws its n samples only for the images
    whose n0 selection picks their target (``Smooth.certify_where``; any other can never be certified as it), and
    the result has no "prediction", "certificate_radius" or "pA_lower". The verdict, "radius" and the rest are
    those of spoof_only=False (identical on a CPU)."""
    abstain = -1
    b, t = tg.shape
    dev = x.device
    rows = torch.arange(b, device=dev)
    x_rep = x.repeat_interleave(t, dim=0)
    ssim_c = ssim(x_rep, x_cand).view(b, t)
    best, sel, pred_c, rad_c, ok_c = select_candidates(smooth, x_cand, tg, n0, n_select, alpha, batch_size, seed,
                                                       ssim_c, min_ssim)
    target = tg[rows, best]
    x_shadow = x_cand.view(b, t, *x.shape[1:])[rows, best]
    if n is not None and spoof_only:
        final = smooth.certify_where(x_shadow, n0, n, alpha, lambda c_a: c_a == target.to(c_a.device), batch_size,
                                     seed + 1)
        pred = torch.tensor([abstain if c is None else c.prediction for c in final], device=dev)
        rad = torch.tensor([0.0 if c is None else float(c.radius) for c in final], device=dev)
    elif n is not None:
        final = smooth.certify(x_shadow, n0, n, alpha, batch_size=batch_size, seed=seed + 1, progress=False)
        pred = torch.tensor([c.prediction for c in final], device=dev)
        rad = torch.tensor([float(c.radius) for c in final], device=dev)
        pa = torch.tensor([float(c.pA_lower) for c in final], device=dev)
    else:
        pred, rad = pred_c[rows, best], rad_c[rows, best]
        pa = torch.tensor([float(sel[i * t + j].pA_lower) for i, j in enumerate(best.tolist())], device=dev)
    spoofed = (pred == target) & (pred != abstain)
    out = measure_shadow(x, x_shadow)
    verdict = {**out, "x_shadow": x_shadow, "target": target, "spoofed": spoofed,
               "success": shadow_success(spoofed, out["ssim"], min_ssim),
               "radius": torch.where(spoofed, rad, torch.zeros_like(rad)),
               "candidate_success": ok_c, "candidate_score": torch.where(ok_c, rad_c, torch.zeros_like(rad_c)),
               "candidate_ssim": ssim_c}
    if spoof_only and n is not None:
        return verdict
    return {**verdict, "prediction": pred, "certificate_radius": rad, "pA_lower": pa}


def judge_by_score(x: torch.Tensor, tg: torch.Tensor, x_cand: torch.Tensor, score_c: torch.Tensor,
                   min_ssim: float = MIN_SSIM, score: str = "margin") -> dict[str, Any]:
    """The verdict of a certificate that scores each candidate (a certified margin, >= 0 when the target is
    certified): candidates x_cand ((B * T) x 3 x H x W, image-major, 8-bit) for targets tg (B x T) of the natural
    images x, with scores score_c ((B * T) or B x T). Per image the certified imperceptible candidate with the largest
    score is kept (``prefer``); success = perception.shadow_success(score >= 0, SSIM, min_ssim). Returns per-image
    "x_shadow", "target", ``score``, "spoofed", "success", SSIM and sizes, and per candidate "candidate_success",
    "candidate_score", "candidate_ssim"."""
    b, t = tg.shape
    rows = torch.arange(b, device=x.device)
    score_c = score_c.reshape(b, t)
    ssim_c = ssim(x.repeat_interleave(t, dim=0), x_cand).view(b, t)
    best = prefer(score_c, score_c >= 0, ssim_c >= check_min_ssim(min_ssim))
    x_shadow = x_cand.view(b, t, *x.shape[1:])[rows, best]
    out = measure_shadow(x, x_shadow)
    spoofed = score_c[rows, best] >= 0
    return {**out, "x_shadow": x_shadow, "target": tg[rows, best], score: score_c[rows, best], "spoofed": spoofed,
            "success": shadow_success(spoofed, out["ssim"], min_ssim), "candidate_success": score_c >= 0,
            "candidate_score": score_c, "candidate_ssim": ssim_c}


def judge_crown_ibp(model: nn.Module, eps: float, x: torch.Tensor, y: torch.Tensor, tg: torch.Tensor,
                    x_cand: torch.Tensor, batch_size: int = 512, min_ssim: float = MIN_SSIM,
                    num_classes: int = 10) -> dict[str, Any]:
    """How the attack and its controls are judged on a certifiably trained network: candidates x_cand
    ((B * T) x 3 x H x W, image-major, 8-bit) for targets tg (B x T); a candidate is certified when all its target
    margins have lower bound >= 0 at eps (``bounds.certified_margins``); the rest is ``judge_by_score`` on the
    smallest margin, plus "prediction" (the network's argmax on the kept shadow)."""
    spec = margin_spec(y.repeat_interleave(tg.shape[1]), num_classes, target=tg.reshape(-1))
    margin_c = certified_margins(model, x_cand, eps, spec, batch_size).amin(1)
    judged = judge_by_score(x, tg, x_cand, margin_c, min_ssim)
    with torch.no_grad():
        judged["prediction"] = model(judged["x_shadow"]).argmax(1)
    return judged
