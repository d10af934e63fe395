"""The Shadow Attack on CROWN-IBP models as the authors' released code runs it (``ShadowConfig.faithful``).

shadowlab's own attack (``shadow.attack.attack_crown_ibp``) departs from the authors' ``CROWN-IBP/tv.py`` on
purpose; this module follows their procedure instead, so that a table can be run both ways (docs/results.md names
every departure). What it does as they do:

- delta is a 1-channel map in the *normalised* input space (divided by the per-channel std of the model's leading
  ``Normalize``), repeated on the three channels; it starts uniform in [-0.5, 0.5] there;
- the image is clamped to [0, 1] by value only: the gradient passes through the clamp unchanged (their
  ``data.data = get_normal(get_unit01(data))``);
- the bound box is x +- eps / std in the normalised space, not clipped to the image range;
- the loss is the robust cross-entropy of the margins' lower bounds averaged over a batch of
  ``cfg.faithful_batch`` images (their test batch: 600; each target is one batch), plus lambda_tv times the summed
  smooth TV and l2_penalty times the L2 norm of the whole batch's perturbation; the raw step sizes 200.5 / 3 / 9
  apply (``ShadowConfig.paper_crown_ibp(rescale=False, faithful=True)``);
- the margins are bounded with plain IBP for the attack and for the verdict;
- the verdict is the bound computed at the last step (on the last iterate before its update), not the best iterate.

Each image's share of that batch loss is computed per image (1 / N of its cross-entropy, ||d_i|| / sqrt(N) of the
batch norm, exact when the batch's norms are equal), so the images a call holds, and so ``--chunk`` and the device,
do not change the result: the step each image gets is the step it got in the authors' batch of N. The 8-bit shadow
image, its SSIM and the choice of one target per image (``shadow.judge.prefer``) are shadowlab's, so that both
modes fill the same table columns.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from shadowlab.attacks import eval_mode
from shadowlab.certify.bounds import box_lower_bounds, margin_spec
from shadowlab.models import Normalize
from shadowlab.perception import quantize, ssim
from shadowlab.regularisers import total_variation
from shadowlab.shadow.config import HISTORY_TERMS, ShadowConfig, ShadowResult
from shadowlab.shadow.inputs import Candidates, initial_delta
from shadowlab.shadow.judge import judge_by_score


def normalised_split(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    """(mean, std, rest) of a model ``nn.Sequential(Normalize, ...)``: the normalisation the authors' data loader
    applied and the network that reads its output. ValueError for a model without a leading Normalize."""
    if not isinstance(model, nn.Sequential) or len(model) < 2 or not isinstance(model[0], Normalize):
        raise ValueError("the authors' procedure perturbs the normalised input: the model must be an nn.Sequential "
                         f"whose first layer is shadowlab.models.Normalize, got {type(model).__name__}")
    return model[0].mean, model[0].std, model[1:]


def attack_crown_ibp_faithful(model: nn.Module, eps: float, cands: Candidates, cfg: ShadowConfig,
                              callback: Callable[[int, dict[str, Any]], None] | None = None, progress: bool = True,
                              num_classes: int = 10) -> ShadowResult:
    """The authors' Shadow Attack on a CROWN-IBP model (module docstring), for every (image, target) candidate.

    cands: the (image, target) candidates on the device (``shadow.inputs.Candidates``; ``shadow.attack`` prepares
    them and ``objectives.BoundObjective`` dispatches here when cfg.faithful). A candidate is spoofed when every IBP
    lower bound of its target margins, computed at the last step over the unclipped box, is >= 0; each image keeps
    one candidate by ``shadow.judge.prefer`` and succeeds when that candidate is spoofed and its 8-bit image has
    SSIM >= cfg.min_ssim. history as ``attack_crown_ibp``.
    """
    start = time.perf_counter()
    mean, std, net = normalised_split(model)
    x, tg, b, t, dev = cands.x, cands.tg, cands.b, cands.t, cands.dev
    spec = margin_spec(cands.y_c, num_classes, target=cands.tgt)
    x_n = ((x - mean) / std)[cands.img_of]
    eps_n = eps / std
    delta = initial_delta(cfg, b, t, tuple(x.shape[2:]), cands.ids, dev)
    zeros = torch.zeros(b * t, dtype=torch.long, device=dev)
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in (*HISTORY_TERMS, "min_margin", "ssim")}
    x_rep = cands.x_c
    lrs: list[float] = []
    last = x_n
    margin = torch.zeros(b * t, device=dev)
    with eval_mode(model):
        for step in tqdm(range(cfg.steps), desc="shadow attack (CROWN-IBP, authors' procedure)",
                         disable=not progress, leave=False):
            d = delta.detach().requires_grad_(True)
            ct = d.expand(-1, 3, -1, -1)
            data = x_n + ct
            clipped = ((data * std + mean).clamp(0, 1) - mean) / std
            data = data + (clipped - data).detach()            # the clamp's value, the identity's gradient
            lb = box_lower_bounds(net, data - eps_n, data + eps_n, spec, "ibp", check=False)
            ce = F.cross_entropy(torch.cat([torch.zeros_like(lb[:, :1]), -lb], 1), zeros, reduction="none")
            tv = total_variation(ct)                            # per candidate, summed over the channels
            # Their loss is a mean over a batch of N = cfg.faithful_batch images (each target one batch) plus one L2
            # norm of the whole batch's perturbation. Each image's share is written per image, so that the result
            # does not depend on how many images this call holds (--chunk): 1 / N of its cross-entropy, and of the
            # batch norm sqrt(sum_j ||d_j||^2) the part whose gradient is theirs when the N norms are equal,
            # ||d_i|| / sqrt(N) (the same assumption as ShadowConfig.paper_crown_ibp's rescaling).
            n_batch = float(cfg.faithful_batch)
            l2 = ct.flatten(1).norm(dim=1) / n_batch ** 0.5
            objective = (ce.sum() / n_batch + cfg.lambda_tv * tv.sum() + cfg.l2_penalty * l2.sum())
            (grad,) = torch.autograd.grad(objective, d)
            margin, last = lb.detach().amin(1), data.detach()   # the verdict of the last step is this one
            per = {"classification": ce.detach(), "color": torch.zeros_like(margin), "tv": tv.detach(),
                   "dissim": torch.zeros_like(margin), "l2": ct.detach().flatten(1).norm(dim=1),
                   "min_margin": margin, "ssim": ssim(x_rep, quantize((last * std + mean).clamp(0, 1)))}
            per["total"] = per["classification"] + cfg.lambda_tv * per["tv"] + cfg.l2_penalty * per["l2"]
            for k, v in per.items():
                rows[k].append(v)
            lr = cfg.lr_at(step)
            lrs.append(lr)
            delta = delta - lr * grad
            if callback is not None:
                callback(step, {**{k: float(v.mean()) for k, v in per.items()}, "step": step, "lr": lr,
                                "active": b * t})
        with torch.no_grad():   # shadowlab's choice of one candidate per image on the last step's IBP margins
            judged = judge_by_score(x, tg, quantize((last * std + mean).clamp(0, 1)), margin, cfg.min_ssim)
            judged["prediction"] = model(judged["x_shadow"]).argmax(1)
    history: dict[str, Any] = {k: torch.stack([r.mean() for r in v]) for k, v in rows.items()}
    history["lr"] = lrs
    history["per_candidate"] = {k: torch.stack(v).view(len(v), b, t) for k, v in rows.items()}
    history["kept"] = torch.ones(b, t, dtype=torch.bool, device=dev)
    return ShadowResult(
        method="crown-ibp", history=history, config=cfg, seconds=time.perf_counter() - start, steps_run=cfg.steps,
        candidate_targets=tg, min_ssim=cfg.min_ssim, eps=float(eps), extra={"bound": "ibp", "procedure": "faithful"},
        **judged)


__all__: Sequence[str] = ("attack_crown_ibp_faithful", "normalised_split")
