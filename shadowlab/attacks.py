"""Norm-bounded attacks: FGSM and PGD (paper eq. 1, the baseline the Shadow Attack is contrasted with).

PGD (Madry et al. 2018) solves  max_{||delta||_p <= eps} L(theta, x + delta, y)  by projected steepest ascent:
a signed-gradient step for L-inf, a normalised-gradient step for L2, each followed by a projection onto the
eps-ball intersected with the image box [0, 1]. Everything is batched on the device; the loop does no host
synchronisation unless a callback is given.

Two attacks for checking an evaluation (lesson 07): ``smoothadv`` (Salman et al. 2019), PGD on the soft smoothed
classifier ``SoftSmoothed`` of a randomized-smoothing base network, and ``random_search``, a gradient-free L-inf
attack after the Square Attack, which gradient masking cannot stop (Athalye, Carlini and Wagner 2018).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shadowlab import validate

NORMS = ("linf", "l2")
SCHEDULES = ("constant", "cosine", "linear")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put the model in eval mode (batch norm uses running statistics) and restore its mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def resolve_schedule(step_schedule: Callable[[int], float] | str | None, steps: int) -> Callable[[int], float]:
    """Turn None / "constant" / "cosine" / "linear" / a callable into a map step -> step-size factor."""
    if step_schedule is None or step_schedule == "constant":
        return lambda step: 1.0
    if step_schedule == "cosine":
        return lambda step: 0.5 * (1.0 + math.cos(math.pi * step / steps))
    if step_schedule == "linear":
        return lambda step: 1.0 - step / steps
    if callable(step_schedule):
        return step_schedule
    raise ValueError(f"step_schedule={step_schedule!r} is unknown; accepted: None, a callable step -> factor, "
                     f"{', '.join(repr(s) for s in SCHEDULES)}")


# ----------------------------------------------------------------------------------------------- results
@dataclass
class AttackResult:
    """Outcome of an attack on a batch (``fgsm``, ``pgd``): adversarial images, loss curve(s), per-image success and
    final loss. FGSM's loss_history holds its one step's loss at x."""

    x_adv: torch.Tensor          # N x C x H x W in [0, 1]
    loss_history: torch.Tensor   # [steps] mean over the batch (restarts == 1) or [restarts, steps]
    success: torch.Tensor        # bool [N]: prediction != y (untargeted) or == y (targeted)
    loss: torch.Tensor           # [N] cross-entropy at x_adv (w.r.t. y)
    linf: torch.Tensor           # [N] ||x_adv - x||_inf
    l2: torch.Tensor             # [N] ||x_adv - x||_2
    eps: float
    norm: str
    targeted: bool

    def to_dict(self, include_images: bool = False) -> dict[str, Any]:
        """JSON-friendly record (lists of floats); images only when include_images."""
        out: dict[str, Any] = {
            "eps": self.eps, "norm": self.norm, "targeted": self.targeted,
            "loss_history": self.loss_history.detach().cpu().tolist(),
            "success": self.success.detach().cpu().tolist(),
            "success_rate": float(self.success.float().mean()),
            "loss": self.loss.detach().cpu().tolist(),
            "linf": self.linf.detach().cpu().tolist(),
            "l2": self.l2.detach().cpu().tolist(),
        }
        if include_images:
            out["x_adv"] = self.x_adv.detach().cpu().tolist()
        return out


# ----------------------------------------------------------------------------------------------- helpers
def _flat_norm(d: torch.Tensor) -> torch.Tensor:
    return d.flatten(1).norm(dim=1)


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Project x_adv onto {x' : ||x' - x||_norm <= eps} and then clip to the box [0, 1]."""
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
        return (x + delta).clamp(0.0, 1.0)
    n = _flat_norm(delta).clamp_min(1e-12)
    delta = delta * (eps / n).clamp(max=1.0).view(-1, *([1] * (x.dim() - 1)))
    # clipping to [0, 1] moves each coordinate towards x, so the L2 constraint still holds afterwards
    return (x + delta).clamp(0.0, 1.0)


def _attack_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(x)
    return F.cross_entropy(logits, y, reduction="none"), logits


# ----------------------------------------------------------------------------------------------- FGSM
def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, targeted: bool = False) -> AttackResult:
    """FGSM (Goodfellow et al. 2015): one signed-gradient step, a one-step answer to paper eq. 1 under L-inf.

    Computes clamp(x + eps sign(grad_x CE(model(x), y)), 0, 1) (minus the sign when targeted, y then being the
    target). Guarantee: ||x_adv - x||_inf <= eps and x_adv in [0, 1]; no success guarantee.

    Args:
        model: pixels in [0, 1] -> logits, run in eval mode.
        x: N x C x H x W floats in [0, 1] that the model takes (3 channels, its height and width); y: N integer
            labels in [0, K) for a model of K outputs (the targets when targeted).
        eps: the L-inf budget (>= 0).
        targeted: descend the loss of y instead of ascending it.

    Returns:
        An ``AttackResult`` as ``pgd``'s (x_adv N x C x H x W detached, success, loss, sizes), one step long.

    >>> x_adv = fgsm(model, x, y, eps=8 / 255).x_adv
    """
    num_classes = validate.model_input(model, x)
    validate.labels(y, x.shape[0], num_classes=num_classes)
    eps = validate.eps(eps)
    with eval_mode(model), torch.enable_grad():   # works inside a caller's torch.no_grad() too
        xg = x.detach().clone().requires_grad_(True)
        loss, _ = _attack_loss(model, xg, y)
        (grad,) = torch.autograd.grad(loss.sum(), xg)
    direction = -grad.sign() if targeted else grad.sign()
    return _result(model, x, (x + eps * direction).clamp(0.0, 1.0).detach(), y, loss.detach().mean().view(1), eps,
                   "linf", targeted)


def _result(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor, loss_history: torch.Tensor,
            eps: float, norm: str, targeted: bool) -> AttackResult:
    """The AttackResult of x_adv: loss and prediction at x_adv, success, and the size of x_adv - x."""
    with torch.no_grad(), eval_mode(model):
        final_loss, logits = _attack_loss(model, x_adv, y)
        pred = logits.argmax(1)
    d = x_adv - x
    return AttackResult(x_adv=x_adv, loss_history=loss_history, success=(pred == y) if targeted else (pred != y),
                        loss=final_loss, linf=d.flatten(1).abs().amax(1), l2=_flat_norm(d), eps=float(eps), norm=norm,
                        targeted=targeted)


# ----------------------------------------------------------------------------------------------- PGD
def _random_start(x: torch.Tensor, eps: float, norm: str, gen: torch.Generator) -> torch.Tensor:
    if norm == "linf":
        delta = (torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype) * 2 - 1) * eps
    else:
        g = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        g = g / _flat_norm(g).clamp_min(1e-12).view(-1, 1, 1, 1)
        r = torch.rand(x.shape[0], generator=gen, device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)
        delta = g * eps * r
    return project(x + delta, x, eps, norm)


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str = "linf", steps: int = 20,
        step_size: float | None = None, targeted: bool = False, restarts: int = 1,
        step_schedule: Callable[[int], float] | str | None = None, seed: int = 0,
        callback: Callable[[int, dict[str, Any]], None] | None = None) -> AttackResult:
    """Projected gradient descent, paper eq. 1:  max_{||delta||_p <= eps} L(theta, x + delta)  (p = inf or 2).

    Untargeted: ascend the cross-entropy of the true label y. Targeted: y is the target and the cross-entropy
    to it is minimised. step_size defaults to 2.5 eps / steps (Madry et al.); step_schedule multiplies it by
    a factor per step (a callable or "constant", "cosine", "linear"). Each restart starts at a random point of the
    ball (restarts = 0: one run from x itself, no random start); with restarts > 1 every image keeps its best
    restart (a successful one first, then the best final loss). loss_history holds the batch-mean
    cross-entropy (w.r.t. y) at the iterate where each step's gradient is taken: shape [steps], or
    [restarts, steps] when restarts > 1. callback(step, record) gets floats (loss, success_rate, restart).

    Guarantee: every returned image lies in the eps-ball of its x (L-inf or L2) and in [0, 1]; success is measured,
    not promised. Args: x N x C x H x W floats in [0, 1] that the model takes (``validate.model_input``), y N integer
    labels in [0, K) for a model of K outputs, eps >= 0, steps >= 1, restarts >= 0,
    seed >= 0 (the random start; same seed, same result). Returns an AttackResult (x_adv, loss_history, success,
    loss, linf, l2).

    >>> res = pgd(model, x, y, eps=8 / 255, norm="linf", steps=20)
    >>> robust_accuracy = 1 - res.success.float().mean()
    """
    num_classes = validate.model_input(model, x)
    validate.labels(y, x.shape[0], num_classes=num_classes)
    eps = validate.eps(eps)
    validate.choice(norm, "norm", NORMS)
    steps = validate.count(steps, "steps")
    random_start = validate.count(restarts, "restarts", minimum=0) > 0
    restarts = max(restarts, 1)
    seed = validate.count(seed, "seed", minimum=0)
    step_size = validate.eps(2.5 * eps / steps if step_size is None else step_size, "step_size")
    factor = resolve_schedule(step_schedule, steps)
    x = x.detach()
    sign = -1.0 if targeted else 1.0   # ascend sign * CE
    gen = torch.Generator(device=x.device)
    gen.manual_seed(seed)
    view = (-1,) + (1,) * (x.dim() - 1)

    best_x = x.clone()
    best_obj = torch.full((x.shape[0],), -math.inf, device=x.device)
    best_succ = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    histories = []
    with eval_mode(model), torch.enable_grad():   # works inside a caller's torch.no_grad() too
        for r in range(restarts):
            x_adv = _random_start(x, eps, norm, gen) if random_start else x.clone()
            hist = torch.empty(steps, device=x.device)
            for step in range(steps):
                xg = x_adv.detach().requires_grad_(True)
                loss, logits = _attack_loss(model, xg, y)
                (grad,) = torch.autograd.grad(loss.sum(), xg)
                hist[step] = loss.detach().mean()
                alpha = step_size * factor(step)
                if norm == "linf":
                    x_adv = x_adv + sign * alpha * grad.sign()
                else:
                    x_adv = x_adv + sign * alpha * grad / _flat_norm(grad).clamp_min(1e-12).view(view)
                x_adv = project(x_adv.detach(), x, eps, norm)
                if callback is not None:
                    pred = logits.argmax(1)
                    succ = (pred == y) if targeted else (pred != y)
                    callback(step, {"restart": r, "loss": float(hist[step]), "step_size": float(alpha),
                                    "success_rate": float(succ.float().mean())})
            histories.append(hist)
            with torch.no_grad():
                loss, logits = _attack_loss(model, x_adv, y)
                pred = logits.argmax(1)
                succ = (pred == y) if targeted else (pred != y)
                obj = sign * loss
                better = (succ & ~best_succ) | ((succ == best_succ) & (obj > best_obj))
                best_x = torch.where(better.view(view), x_adv, best_x)
                best_obj = torch.where(better, obj, best_obj)
                best_succ = best_succ | succ
    return _result(model, x, best_x, y, histories[0] if restarts == 1 else torch.stack(histories), eps, norm, targeted)


# ----------------------------------------------------------------------------------------------- smoothed classifier
class SoftSmoothed(nn.Module):
    """The soft smoothed classifier of Salman et al. 2019 (SmoothAdv) as a module PGD can attack.

    For a base network f (pixels in [0, 1] -> logits) and noise level sigma, the soft smoothed classifier is
    G(x) = E_{e ~ N(0, sigma^2 I)} softmax(f(x + e)); ``forward`` returns log G(x), estimated with ``noise_samples``
    fresh Gaussian draws per image and call (from a generator seeded with ``seed`` on the input's device), so that
    its cross-entropy w.r.t. a label y is SmoothAdv's loss -log G(x)_y and ``pgd`` on this module is SmoothAdv's
    PGD (fresh noise at every step). Its argmax is a Monte Carlo estimate of the soft classifier's class, not the
    hard smoothed classifier g of Cohen et al. (judge g with ``Smooth.predict`` or ``Smooth.certify``).

    Guarantee: the output is N x K, each row log-probabilities (logsumexp 0) of the average of noise_samples base
    softmaxes; gradients flow to the input. Args: base: the base network (put in eval mode by ``eval_mode``),
    sigma > 0, noise_samples >= 1, seed >= 0.

    >>> res = pgd(SoftSmoothed(model, 0.25, noise_samples=8), x, y, eps=0.5, norm="l2", steps=10)
    """

    def __init__(self, base: nn.Module, sigma: float, noise_samples: int = 8, seed: int = 0) -> None:
        super().__init__()
        if not isinstance(base, nn.Module):
            raise ValueError(f"base must be a torch.nn.Module, got {type(base).__name__}")
        self.base = base
        self.sigma = validate.sigma(sigma)
        self.noise_samples = validate.count(noise_samples, "noise_samples")
        self.seed = validate.count(seed, "seed", minimum=0)
        self._gen: torch.Generator | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._gen is None or self._gen.device != x.device:
            self._gen = torch.Generator(device=x.device).manual_seed(self.seed)
        m = self.noise_samples
        noise = torch.randn((x.shape[0], m, *x.shape[1:]), generator=self._gen, device=x.device, dtype=x.dtype)
        logits = self.base((x[:, None] + self.sigma * noise).flatten(0, 1))
        log_p = F.log_softmax(logits, dim=1).view(x.shape[0], m, -1)
        return torch.logsumexp(log_p, dim=1) - math.log(m)


def smoothadv(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, sigma: float, noise_samples: int = 8,
              steps: int = 10, restarts: int = 1, seed: int = 0) -> AttackResult:
    """SmoothAdv (Salman et al. 2019): L2 PGD (``pgd``) on the soft smoothed classifier ``SoftSmoothed`` of the base
    network ``model`` at noise level sigma, ascending -log E[softmax(f(x' + e))]_y with noise_samples fresh noise
    draws per step.

    Guarantee: as ``pgd``'s, every x_adv lies in the L2 ball of radius eps around its x and in [0, 1]. The result's
    loss, success and loss_history are Monte Carlo estimates on the soft smoothed classifier (fresh noise), not
    verdicts of the smoothed classifier g: judge g on x_adv with ``Smooth.predict`` (or ``certify``). Args: model
    pixels in [0, 1] -> logits; x N x 3 x H x W in [0, 1]; y N labels (e.g. CERTIFY's classes); eps >= 0 (L2);
    sigma > 0; noise_samples, steps, restarts >= 1; seed >= 0 (the random start and the noise).

    >>> x_adv = smoothadv(model, x, y, eps=0.5, sigma=0.25).x_adv
    """
    return pgd(SoftSmoothed(model, sigma, noise_samples, seed), x, y, eps, norm="l2", steps=steps,
               restarts=restarts, seed=seed)


# ----------------------------------------------------------------------------------------------- gradient-free
def _margin(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """max_{j != y} z_j - z_y per image: > 0 exactly when the model misclassifies x."""
    logits = model(x)
    other = logits.scatter(1, y[:, None], -math.inf).amax(1)
    return other - logits.gather(1, y[:, None])[:, 0]


def random_search(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, queries: int = 100,
                  window: float = 0.1, seed: int = 0) -> AttackResult:
    """A gradient-free L-inf attack: random search over the corners of the eps-ball, after the Square Attack
    (Andriushchenko et al. 2020), simplified to a fixed window size.

    It starts every image at x + eps s (one random sign s per channel and column, clipped to [0, 1]) and then, for
    ``queries`` rounds, redraws the signs of one random square window (its side about sqrt(window H W) pixels, one
    sign per channel) and keeps the change when it raises the margin max_{j != y} z_j - z_y. It reads only the
    model's outputs (one forward pass per round on the images not yet misclassified), never a gradient, so gradient
    masking cannot stop it. Guarantee: every x_adv lies in the L-inf ball of radius eps around its x and in [0, 1];
    an image once misclassified is kept. Args: x N x C x H x W in [0, 1] that the model takes, y N labels,
    eps >= 0, queries >= 1, window in (0, 1], seed >= 0. Returns an ``AttackResult`` (its loss the cross-entropy
    at x_adv; loss_history the batch-mean margin after each round, not a cross-entropy).

    >>> res = random_search(model, x, y, eps=8 / 255, queries=100)
    """
    num_classes = validate.model_input(model, x)
    validate.labels(y, x.shape[0], num_classes=num_classes)
    eps = validate.eps(eps)
    queries = validate.count(queries, "queries")
    window = validate.probability(window, "window", low_open=True)
    seed = validate.count(seed, "seed", minimum=0)
    x = x.detach()
    n, c, h, w = x.shape
    gen = torch.Generator(device=x.device).manual_seed(seed)
    side = max(1, min(h, w, round(math.sqrt(window * h * w))))

    def signs(shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randint(0, 2, shape, generator=gen, device=x.device).to(x.dtype) * 2 - 1

    x_adv = (x + eps * signs((n, c, 1, w))).clamp(0.0, 1.0)
    hist = torch.empty(queries, device=x.device)
    rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    with torch.no_grad(), eval_mode(model):
        margin = _margin(model, x_adv, y)
        for q in range(queries):
            r = torch.randint(0, h - side + 1, (n,), generator=gen, device=x.device)
            s = torch.randint(0, w - side + 1, (n,), generator=gen, device=x.device)
            box = (((rows[None] >= r[:, None]) & (rows[None] < r[:, None] + side))[:, :, None]
                   & ((cols[None] >= s[:, None]) & (cols[None] < s[:, None] + side))[:, None, :])[:, None]
            candidate = torch.where(box, (x + eps * signs((n, c, 1, 1))).clamp(0.0, 1.0), x_adv)
            todo = (margin <= 0).nonzero().flatten()
            if len(todo):
                m_new = _margin(model, candidate[todo], y[todo])
                better = m_new > margin[todo]
                x_adv[todo[better]] = candidate[todo[better]]
                margin[todo[better]] = m_new[better]
            hist[q] = margin.mean()
    return _result(model, x, x_adv, y, hist, eps, "linf", False)
