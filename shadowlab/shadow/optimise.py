"""The Shadow Attack's optimisation loop (paper eq. 2), shared by the smoothing and the CROWN-IBP attack: plain
gradient descent on  classification loss + lambda_c C + lambda_tv TV + lambda_s Dissim (+ l2_penalty ||delta||)  of
every (image, target) candidate at once, with early stop, target pruning and the best iterate kept on the device.
What differs between the attacks is the classification step (``ClassStep``) and the judge."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from shadowlab.perception import quantize, ssim
from shadowlab.regularisers import color_penalty, dissimilarity, l2_size, total_variation
from shadowlab.shadow.config import HISTORY_TERMS, ShadowConfig
from shadowlab.shadow.inputs import Candidates, initial_delta, rgb
from shadowlab.shadow.judge import better_iterate

# class_step(d, act) -> (grad of the summed classification loss w.r.t. d (full size), loss[act], stat[act])
ClassStep = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
# judge(images) -> (certified as the target, score) for the 2M images [best iterates; last iterates]
Judge = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def step_direction(optimiser: str, grad: torch.Tensor, moments: list[torch.Tensor], step: int,
                   betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.Tensor:
    """The direction the loop subtracts (times the step size) for ``ShadowConfig.optimiser``: the gradient itself
    ("gd", the authors'), its sign ("sign") or Adam's bias-corrected m / (sqrt(v) + eps) ("adam", Kingma and Ba
    2015, Algorithm 1; ``moments`` holds m and v between calls, empty before the first). Written here rather than
    with torch.optim so that a frozen candidate's zero gradient and the per-step schedule stay in this loop's hands,
    on the device, for every candidate at once."""
    if optimiser == "gd":
        return grad
    if optimiser == "sign":
        return grad.sign()
    if not moments:
        moments.extend([torch.zeros_like(grad), torch.zeros_like(grad)])
    m, v = moments
    m.mul_(betas[0]).add_(grad, alpha=1 - betas[0])
    v.mul_(betas[1]).addcmul_(grad, grad, value=1 - betas[1])
    t = step + 1
    return (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps)


def _regularisers(cfg: ShadowConfig, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. 2's penalty lambda_c C + lambda_tv TV + lambda_s Dissim (3 channels) + l2_penalty ||delta|| of every
    candidate: (its gradient w.r.t. delta, the penalty, the terms "color", "tv", "dissim", "l2")."""
    d = delta.detach().requires_grad_(True)
    drgb = rgb(d)
    terms = {"color": color_penalty(drgb), "tv": total_variation(drgb), "dissim": dissimilarity(drgb),
             "l2": l2_size(drgb)}
    reg = cfg.lambda_tv * terms["tv"] + cfg.lambda_c * terms["color"] + cfg.l2_penalty * terms["l2"]
    if cfg.channels == 3 and cfg.lambda_s > 0:
        reg = reg + cfg.lambda_s * terms["dissim"]
    (grad,) = torch.autograd.grad(reg.sum(), d)
    return grad, reg.detach(), {k: v.detach() for k, v in terms.items()}


def _stopped(cfg: ShadowConfig, stat: torch.Tensor, sim: torch.Tensor, total: torch.Tensor,
             totals: list[torch.Tensor], step: int, b: int, t: int) -> torch.Tensor:
    """The candidates the early stop freezes at this step (``optimise``'s docstring): reached with margin AND
    imperceptible (for the whole image with early_stop_scope "image"), or settled over cfg.settle_window steps."""
    reached = (stat >= cfg.early_stop_margin) & (sim >= cfg.min_ssim)
    if cfg.early_stop_scope == "image":   # one target reached: the image's other targets stop too
        reached = reached.view(b, t).any(1, keepdim=True).expand(b, t).reshape(-1)
    if cfg.settle_window is not None and step >= cfg.settle_window:   # relative fall over the window
        before = totals[step - cfg.settle_window]
        reached = reached | ((before - total) <= cfg.settle_tol * before.abs().clamp_min(1e-12))
    return reached


def _record(per: dict[str, torch.Tensor], step: int, lr: float, frozen: torch.Tensor, x_c: torch.Tensor,
            delta: torch.Tensor | None, b: int, t: int) -> dict[str, Any]:
    """The callback's record of a step: the mean of every term, and with ``delta`` the B x T deltas and shadows."""
    rec: dict[str, Any] = {k: float(v.mean()) for k, v in per.items()}
    rec.update(step=step, lr=lr, active=int((~frozen).sum()))
    if delta is not None:
        dr = rgb(delta.detach())
        rec["delta"] = dr.view(b, t, *dr.shape[1:])
        rec["x_shadow"] = (x_c + dr).clamp(0, 1).view(b, t, *dr.shape[1:])
    return rec


def optimise(cfg: ShadowConfig, cands: Candidates, delta: torch.Tensor, class_step: ClassStep, stat_name: str,
             reached_at: float, callback: Callable[[int, dict[str, Any]], None] | None, delta_every: int,
             progress: bool, desc: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any], int]:
    """Gradient descent on  cls + lambda_c C + lambda_tv TV + lambda_s Dissim + l2_penalty ||delta||  per candidate.

    Returns (last delta, best delta, history, steps run). The best delta is each candidate's best iterate by the
    loop's own view of success: first the iterates whose statistic is >= ``reached_at`` (its target is reached:
    certified margin >= 0, or more than half of the training noise on the target) AND that are imperceptible
    (SSIM >= cfg.min_ssim), then reached ones, then imperceptible ones, within a group the largest statistic
    (``prefer``). It is kept on the device, no host synchronisation. The regularisers keep pulling delta towards 0
    after the target is reached, so without it a long run can end on an iterate that lost what an earlier one found.

    With cfg.early_stop_margin a candidate freezes (keeps its delta) once its statistic reaches the margin AND its
    image is imperceptible (SSIM >= cfg.min_ssim), or once its objective has settled; so an early stop can never
    return the noisy initialisation as a success."""
    x_c, b, t = cands.x_c, cands.b, cands.t
    m = x_c.shape[0]
    dev = x_c.device
    all_idx = torch.arange(m, device=dev)
    frozen = torch.zeros(m, dtype=torch.bool, device=dev)
    cls_cur = torch.zeros(m, device=dev)
    stat_cur = torch.zeros(m, device=dev)
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in (*HISTORY_TERMS, stat_name, "ssim")}
    lrs: list[float] = []
    early = cfg.early_stop_margin is not None
    prune = cfg.keep_targets is not None and cfg.keep_targets < t
    kept = torch.ones(b, t, dtype=torch.bool, device=dev)
    freezing = early or prune   # candidates can be frozen: run the active ones only
    steps_run = cfg.steps
    best = delta.detach().clone()
    best_rank = torch.full((m,), -1, dtype=torch.long, device=dev)
    best_stat = torch.full((m,), -math.inf, device=dev)
    moments: list[torch.Tensor] = []   # Adam's running moments (optimiser "adam")
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        act = (~frozen).nonzero().squeeze(1) if freezing else all_idx
        g_cls, cls_act, stat_act = class_step(delta, act)
        cls_cur = cls_cur.index_copy(0, act, cls_act)
        stat_cur = stat_cur.index_copy(0, act, stat_act)
        g_reg, reg, terms = _regularisers(cfg, delta)
        grad = g_reg + g_cls
        total = cls_cur + reg
        sim = ssim(x_c, quantize(x_c + rgb(delta.detach())))   # what the candidate looks like now (before this step)
        per = {"classification": cls_cur, **terms, "total": total, stat_name: stat_cur, "ssim": sim}
        for k, v in per.items():
            rows[k].append(v.clone())
        # the best iterate so far (see the docstring): rank as prefer(), then the statistic
        rank = 2 * (stat_cur >= reached_at).long() + (sim >= cfg.min_ssim).long()
        # within the top group (reached and imperceptible) cfg.best_by == "ssim" keeps the most natural-looking one
        key = torch.where(rank == 3, sim, stat_cur) if cfg.best_by == "ssim" else stat_cur
        better = (rank > best_rank) | ((rank == best_rank) & (key > best_stat))
        best = torch.where(better.view(-1, 1, 1, 1), delta.detach(), best)
        best_rank, best_stat = torch.where(better, rank, best_rank), torch.where(better, key, best_stat)
        lr = cfg.lr_at(step)
        lrs.append(lr)
        if early:
            frozen = frozen | _stopped(cfg, stat_cur, sim, total, rows["total"], step, b, t)
        if prune and step + 1 == cfg.prune_step:   # keep each image's keep_targets lowest-loss targets
            rank = cls_cur.view(b, t).argsort(1).argsort(1)
            kept = rank < cfg.keep_targets
            frozen = frozen | (~kept).reshape(-1)
        direction = step_direction(cfg.optimiser, grad, moments, step)
        if freezing:   # frozen candidates keep the delta that made it
            direction = direction.masked_fill(frozen.view(-1, 1, 1, 1), 0.0)
        delta = delta - lr * direction
        if callback is not None:
            with_images = bool(delta_every) and (step % delta_every == 0 or step == cfg.steps - 1)
            callback(step, _record(per, step, lr, frozen, x_c, delta if with_images else None, b, t))
        if freezing and bool(frozen.all()):
            steps_run = step + 1
            break
    bar.close()
    history: dict[str, Any] = {k: torch.stack([r.mean() for r in v]) for k, v in rows.items()}
    history["lr"] = lrs
    history["per_candidate"] = {k: torch.stack(v).view(len(v), b, t) for k, v in rows.items()}
    history["kept"] = kept   # B x T: the candidates still optimised after the prune step (all without pruning)
    return delta.detach(), best, history, steps_run


def search(cfg: ShadowConfig, cands: Candidates, class_step: ClassStep, stat_name: str, reached_at: float,
           judge: Judge, callback: Callable[[int, dict[str, Any]], None] | None, delta_every: int, progress: bool,
           desc: str) -> tuple[torch.Tensor, dict[str, Any], int]:
    """The skeleton every objective runs: the initial delta of every candidate (seeded per image by cands.ids), the
    loop (``optimise``), and the 8-bit candidate images, each the best or the last iterate as ``judge`` prefers when
    cfg.judges_best_iterate (else the last). Returns (candidate images M x 3 x H x W, history, steps run)."""
    x_c = cands.x_c
    delta0 = initial_delta(cfg, cands.b, cands.t, tuple(x_c.shape[2:]), cands.ids, x_c.device)
    delta, best, history, steps_run = optimise(cfg, cands, delta0, class_step, stat_name, reached_at, callback,
                                               delta_every, progress, desc)
    with torch.no_grad():
        x_cand = quantize(x_c + rgb(delta))
        if cfg.judges_best_iterate:
            x_cand = better_iterate(x_c, quantize(x_c + rgb(best)), x_cand, cfg.min_ssim, judge,
                                    by_ssim=cfg.best_by == "ssim")
    return x_cand, history, steps_run
