"""The Shadow Attack (Ghiasi, Shafahi, Goldstein, ICLR 2020, paper eq. 2) against any certificate.

    maximise_delta  -L(theta, x + delta, target) - lambda_c C(delta) - lambda_tv TV(delta) - lambda_s Dissim(delta)

implemented as plain gradient *descent* on the negated objective (no sign, no projection). Every (image, target) pair
is a "candidate"; all candidates of a call are optimised together in one tensor of shape (B * T) x C_delta x H x W on
the device, and the loop does no host synchronisation unless a callback is given or early stopping is on.
Regularisers are computed on the perturbation as applied to the image (the 1-channel map repeated over R, G, B), as
in the authors' code.

``shadow_attack(objective, x, y, cfg)`` runs the attack against one certificate, described by a
``shadow.objectives.Objective`` (L, the loop's statistic and the verdict); ``attack_smoothing`` and
``attack_crown_ibp`` build the two objectives of the paper from loose arguments. The loop is ``shadow.optimise``, how
candidates are judged ``shadow.judge``, the settings and the result ``shadow.config``, the target grid and the
per-image seeds ``shadow.inputs``, the regularisers ``regularisers``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from shadowlab import validate
from shadowlab.attacks import eval_mode
from shadowlab.certify.smoothing import Smooth
from shadowlab.models import default_device
from shadowlab.shadow.config import LOSS_BOUNDS, ShadowConfig, ShadowResult
from shadowlab.shadow.inputs import candidates, check_attack_inputs
from shadowlab.shadow.objectives import BoundObjective, Objective, SmoothingObjective
from shadowlab.shadow.optimise import search

BOUNDS = LOSS_BOUNDS   # the bounds the CROWN-IBP loss can read (ShadowConfig.loss_bound)


def shadow_attack(objective: Objective, x: torch.Tensor, y: torch.Tensor, cfg: ShadowConfig | None = None,
                  targets: str | torch.Tensor = "all", callback: Callable[[int, dict[str, Any]], None] | None = None,
                  progress: bool = True, device: torch.device | str | None = None, delta_every: int = 10,
                  certify_natural: bool = False, image_ids: torch.Tensor | Sequence[int] | None = None
                  ) -> ShadowResult:
    """The Shadow Attack on the certificate ``objective`` describes (paper eq. 2; ``shadow.objectives``).

    Every (image, target) candidate is optimised together by ``shadow.optimise.search`` with the objective's class
    step; only the candidates still optimised after target pruning (cfg.keep_targets) are judged, by
    ``objective.judge``, which keeps one per image; success = the wrong label certified AND SSIM(x, x_shadow) >=
    cfg.min_ssim. With cfg.faithful an objective may run the authors' own procedure instead
    (``Objective.faithful_attack``).

    Args:
        objective: the certificate (``SmoothingObjective``, ``BoundObjective`` or a registered subclass).
        x: B x 3 x H x W natural images in [0, 1]; y: their B labels.
        cfg: the attack's settings (default ``objective.default_config()``).
        targets: "all" (every wrong class) or B or B x T target labels.
        callback: called as callback(step, record) with the mean loss terms (and every delta_every steps the
            current delta and shadow images); None for no host synchronisation in the loop.
        progress: tqdm bar; device: where to run (default CUDA when available).
        certify_natural: also give the natural images' own verdict (``objective.natural``).
        image_ids: B integers (default 0 .. B - 1) seeding each image's initialisation and noise, so an image's
            result does not depend on the batch or shard it is in.

    Returns:
        A ``ShadowResult``: per image the kept shadow image, target, verdict, SSIM and success, per candidate the
        scores, and the loss history (history[objective.statistic], history["ssim"] per step).
    """
    cfg = cfg if cfg is not None else objective.default_config()
    check_attack_inputs(objective.model, x, y, cfg, objective.num_classes, objective.batch_size)
    objective.check(cfg)
    start = time.perf_counter()
    cands = candidates(objective.model, x, y, targets, objective.num_classes, device, image_ids)
    objective = objective.bind(cands.dev, cfg)
    natural: dict[str, Any] = {}
    with eval_mode(objective.model):
        res = objective.faithful_attack(cands, cfg, callback, progress) if cfg.faithful else None
        if res is None:
            both = torch.cat([cands.tgt, cands.tgt])
            x_cand, history, steps_run = search(
                cfg, cands, objective.class_step(cands, cfg), objective.statistic, objective.reached_at,
                lambda images: objective.certify_as_targets(images, both, cfg), callback, delta_every, progress,
                f"shadow attack ({objective.title})")
            # only the candidates still optimised after pruning are judged (the pruned ones froze at prune_step)
            kept = history["kept"]
            tg = cands.tg[kept].view(cands.b, -1)
            x_cand = x_cand.view(cands.b, cands.t, *x_cand.shape[1:])[kept].reshape(-1, *x_cand.shape[1:])
            judged = objective.judge(cands.x, cands.y, tg, x_cand, cfg)
        if certify_natural:
            natural = objective.natural(cands.x, cands.y, cfg)
    if res is not None:
        for k, v in natural.items():
            setattr(res, k, v)
        return res
    return ShadowResult(method=objective.name, history=history, config=cfg, seconds=time.perf_counter() - start,
                        steps_run=steps_run, candidate_targets=tg, min_ssim=cfg.min_ssim,
                        **objective.result_fields(cands.tg, cfg), **natural, **judged)


# ----------------------------------------------------------------------------------------------- smoothing
def attack_smoothing(model: nn.Module, sigma: float, x: torch.Tensor, y: torch.Tensor, cfg: ShadowConfig | None = None,
                     targets: str | torch.Tensor = "all", n0: int = 100, n_select: int = 200,
                     n: int | None = 100_000, alpha: float = 0.001, **run: Any) -> ShadowResult:
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
    cfg = cfg if cfg is not None else ShadowConfig()
    sizes = {k: run.pop(k) for k in ("certify_batch_size", "batch_size") if k in run}
    num_classes = _num_classes(run)
    check_attack_inputs(model, x, y, cfg, num_classes, sizes.get("batch_size"))
    dev = torch.device(run["device"]) if run.get("device") is not None else default_device()
    smooth = Smooth(model, num_classes, validate.sigma(sigma), device=dev, precision=cfg.precision)
    return shadow_attack(SmoothingObjective(smooth, n0, n_select, n, alpha, **sizes), x, y, cfg, targets, **run)


def _num_classes(run: dict[str, Any]) -> int:
    """num_classes from a builder's keyword arguments (popped: ``shadow_attack`` takes it from the objective)."""
    return validate.count(run.pop("num_classes", 10), "num_classes", minimum=2)


# ----------------------------------------------------------------------------------------------- CROWN-IBP
def attack_crown_ibp(model: nn.Module, eps: float, x: torch.Tensor, y: torch.Tensor, cfg: ShadowConfig | None = None,
                     targets: str | torch.Tensor = "all", bound: str | None = None, **run: Any) -> ShadowResult:
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
    sizes = {k: run.pop(k) for k in ("batch_size",) if k in run}
    objective = BoundObjective(model, eps, bound, num_classes=_num_classes(run), **sizes)
    return shadow_attack(objective, x, y, cfg, targets, **run)


__all__ = ["BOUNDS", "attack_crown_ibp", "attack_smoothing", "shadow_attack"]
