"""One objective per certificate: what the Shadow Attack (paper eq. 2) needs to know about a certified defense.

The attack's loop (``shadow.optimise``) is the same for every defense; what changes with the certificate is written
once, in one ``Objective`` subclass per certificate, and registered in ``OBJECTIVES`` (as ``certify.rules.register``
registers one bound rule per layer):

- ``class_step``: the gradient of eq. 2's classification term L(theta, x + delta, target) and the loop's statistic;
- ``statistic`` / ``reached_at``: the loop's view of success (a candidate whose statistic reaches it has its target);
- ``certify_as_targets``: the verdict on 8-bit candidate images for their targets (the loop keeps the best or the
  last iterate by it);
- ``judge``: the verdict on each image's candidates, one kept per image (``shadow.judge``); the controls
  (``experiments.controls``) are judged by the same method and ``wrong_label``;
- ``natural``: the natural image's own verdict; ``score``: the statistic a table reports ("radius", "margin").

``SmoothingObjective(smooth)`` takes a ``certify.smoothing.Smooth``, as Cohen et al.'s callers pass one certifier
object; ``BoundObjective(model, eps)`` a certifiably trained network and the radius of its bounds.
``shadow.attack.shadow_attack(objective, x, y, cfg)`` runs any of them. Adding a certificate is one subclass and a
test (README, "Extending it: a defense"; ``tests/test_objectives.py`` plugs in a toy Lipschitz-margin certificate).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from shadowlab import validate
from shadowlab.certify.bounds import certified_margins, lower_bounds, margin_spec
from shadowlab.certify.smoothing import Smooth
from shadowlab.models import fold_batch_norm
from shadowlab.precision import compute_precision, prepare_model
from shadowlab.shadow.config import LOSS_BOUNDS, ShadowConfig, ShadowResult
from shadowlab.shadow.faithful import attack_crown_ibp_faithful
from shadowlab.shadow.inputs import Candidates, chunks, rgb, training_noise
from shadowlab.shadow.judge import certify_as_targets, judge_crown_ibp, judge_smoothing
from shadowlab.shadow.optimise import ClassStep


class Objective(ABC):
    """What the Shadow Attack needs from one kind of certificate (module docstring); one subclass per certificate.

    Class attributes: ``name`` (``ShadowResult.method`` and the registry key), ``title`` (the progress bar's),
    ``statistic`` (the loop's per-candidate statistic, a key of ``ShadowResult.history``), ``reached_at`` (a
    statistic >= it means the candidate's target is reached) and ``score`` (the verdict's per-image score a table
    reports). Instances hold the defended ``model``, ``num_classes`` and ``batch_size`` (the forward batch of a
    class step).
    """

    name: ClassVar[str]
    title: ClassVar[str]
    statistic: ClassVar[str]
    reached_at: ClassVar[float]
    score: ClassVar[str]

    model: nn.Module
    num_classes: int
    batch_size: int

    def default_config(self) -> ShadowConfig:
        """The attack's settings when the caller gives none."""
        return ShadowConfig()

    def check(self, cfg: ShadowConfig) -> None:  # noqa: B027 - optional hook, nothing to check by default
        """Raise ValueError naming the setting when ``cfg`` does not fit this certificate."""

    def bind(self, device: torch.device, cfg: ShadowConfig) -> Objective:
        """This objective on ``device`` with cfg's arithmetic (itself when nothing changes)."""
        self.model.to(device)
        return self

    @abstractmethod
    def class_step(self, cands: Candidates, cfg: ShadowConfig) -> ClassStep:
        """The loop's classification step for the candidates ``cands`` (``shadow.optimise.ClassStep``)."""

    @abstractmethod
    def certify_as_targets(self, images: torch.Tensor, targets: torch.Tensor, cfg: ShadowConfig
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """(certified as its target, score) of N 8-bit images for N targets (bool N, float N)."""

    @abstractmethod
    def judge(self, x: torch.Tensor, y: torch.Tensor, tg: torch.Tensor, x_cand: torch.Tensor, cfg: ShadowConfig,
              spoof_only: bool = False) -> dict[str, Any]:
        """The verdict on candidates x_cand ((B * T) x 3 x H x W, image-major, 8-bit) for targets tg (B x T) of the
        natural images x, y: per image the kept candidate's "x_shadow", "target", "spoofed", "success", "ssim",
        sizes and ``score``, per candidate "candidate_success", "candidate_score", "candidate_ssim"
        (``shadow.judge``). spoof_only: a control's verdict, where only those fields are needed."""

    @abstractmethod
    def natural(self, x: torch.Tensor, y: torch.Tensor, cfg: ShadowConfig) -> dict[str, torch.Tensor]:
        """The natural images' own verdict, as ``ShadowResult`` fields (natural_prediction / radius / margin)."""

    @abstractmethod
    def wrong_label(self, x: torch.Tensor, y: torch.Tensor, images: torch.Tensor, tg: torch.Tensor,
                    cfg: ShadowConfig, seed: int) -> dict[str, torch.Tensor]:
        """Whether some wrong label (one of tg's B x T targets) is certified on each of the B ``images`` made from
        x, y: {"spoofed": bool B, score: float B (0 where not spoofed)}; seed: the verdict's noise seed, if any."""

    def natural_wrong_label(self, x: torch.Tensor, y: torch.Tensor, tg: torch.Tensor, cfg: ShadowConfig,
                            natural: Any = None) -> dict[str, torch.Tensor]:
        """``wrong_label`` of the natural images themselves; ``natural``: their verdicts if already computed."""
        return self.wrong_label(x, y, x, tg, cfg, cfg.seed)

    def control_targets(self, result: ShadowResult) -> torch.Tensor:
        """The targets (B x T) whose initialisation the "init" control judges: every candidate's."""
        return result.candidate_targets

    def result_fields(self, tg: torch.Tensor, cfg: ShadowConfig) -> dict[str, Any]:
        """The certificate's own ``ShadowResult`` fields (sigma or eps, extra) for the target grid tg."""
        return {}

    def faithful_attack(self, cands: Candidates, cfg: ShadowConfig, callback: Any, progress: bool
                        ) -> ShadowResult | None:
        """The authors' released procedure when it is not the loop with cfg.faithful (None: it is the loop)."""
        return None


OBJECTIVES: dict[str, type[Objective]] = {}


def register(cls: type[Objective]) -> type[Objective]:
    """Class decorator: make an Objective subclass known by its ``name`` (``OBJECTIVES``)."""
    OBJECTIVES[cls.name] = cls
    return cls


def _fmt(model: nn.Module) -> torch.memory_format:
    # channels_last speeds CPU convolutions up by about a fifth (measured on the 'cnn' architecture)
    return torch.channels_last if any(isinstance(u, nn.Conv2d) for u in model.modules()) else torch.contiguous_format


@register
class SmoothingObjective(Objective):
    """Randomized smoothing (Cohen et al. 2019; paper sec. 4): eq. 2's L is the mean cross-entropy to the target over
    cfg.noise_samples Gaussian copies clamp(x + delta, 0, 1) + N(0, sigma^2) (drawn once per image and reused every
    step, as the authors; with cfg.faithful delta is added to the noisy copies without the clamp); the statistic is
    the share of those copies classified as the target. Candidates are judged by CERTIFY(n0, n_select, alpha)
    (ranking) and CERTIFY(n0, n, alpha) (the final certificate; n=None: the ranking one), ``judge_smoothing``.

    smooth: the smoothed classifier (its base model, sigma, num_classes, device and precision); n0, n_select, n,
    alpha: CERTIFY's samples and failure probability; certify_batch_size: noise samples per CERTIFY forward pass;
    batch_size: (candidate, noise sample) pairs per forward pass of the attack step (both default to the Smooth's
    ``batch_size``, ``certify.smoothing.default_batch_size`` of its device).
    """

    name, title, statistic, reached_at, score = "smoothing", "smoothing", "target_fraction", 0.5, "radius"

    def __init__(self, smooth: Smooth, n0: int = 100, n_select: int = 200, n: int | None = 100_000,
                 alpha: float = 0.001, certify_batch_size: int | None = None, batch_size: int | None = None) -> None:
        if not isinstance(smooth, Smooth):
            raise ValueError(f"smooth must be a shadowlab.certify.smoothing.Smooth, got {type(smooth).__name__}")
        certify_batch_size = smooth.batch_size if certify_batch_size is None else certify_batch_size
        batch_size = smooth.batch_size if batch_size is None else batch_size
        for name, value in (("n0", n0), ("n_select", n_select), ("certify_batch_size", certify_batch_size),
                            ("batch_size", batch_size)):
            validate.count(value, name)
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"n={n} must be None (skip the final certification) or an integer >= 1")
        validate.alpha(alpha)
        self.smooth, self.n0, self.n_select, self.n, self.alpha = smooth, n0, n_select, n, alpha
        self.certify_batch_size, self.batch_size = certify_batch_size, batch_size
        self.model, self.num_classes = smooth.base_model, smooth.num_classes

    def check(self, cfg: ShadowConfig) -> None:
        if cfg.early_stop_margin is not None and not 0 < cfg.early_stop_margin <= 1:
            raise ValueError(f"early_stop_margin={cfg.early_stop_margin} must lie in (0, 1] for smoothing "
                             "(fraction of noisy predictions equal to the target)")

    def bind(self, device: torch.device, cfg: ShadowConfig) -> SmoothingObjective:
        s = self.smooth
        if s.device == device and s.precision == cfg.precision:
            return self
        smooth = Smooth(s.base_model, s.num_classes, s.sigma, device=device, precision=cfg.precision)
        # sizes that were the old device's default become the new device's
        sizes = [None if v == s.batch_size else v for v in (self.certify_batch_size, self.batch_size)]
        return SmoothingObjective(smooth, self.n0, self.n_select, self.n, self.alpha, *sizes)

    def class_step(self, cands: Candidates, cfg: ShadowConfig) -> ClassStep:
        sigma, ns, m, dev = self.smooth.sigma, cfg.noise_samples, cands.m, cands.dev
        shape = tuple(cands.x.shape[1:])
        noise = training_noise(sigma, ns, shape, cfg.seed, cands.ids, dev)
        prepare_model(self.model, cfg.precision)
        full_chunks = chunks(m * ns, self.batch_size)
        fmt = _fmt(self.model)
        net = fold_batch_norm(self.model)   # the same function in eval mode with fewer operations
        x_c, tgt, img_of = cands.x_c, cands.tgt, cands.img_of
        rounds = [0]   # resample_noise: how many fresh draws so far

        def step(delta: torch.Tensor, act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            nonlocal noise
            if cfg.resample_noise:
                rounds[0] += 1
                noise = training_noise(sigma, ns, shape, cfg.seed + 7919 * rounds[0], cands.ids, dev)
            d = delta.detach().requires_grad_(True)
            grad = torch.zeros_like(d)
            loss = torch.zeros(m, device=dev)
            hit = torch.zeros(m, device=dev)
            ranges = full_chunks if act.shape[0] == m else chunks(act.shape[0] * ns, self.batch_size)
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

        return step

    def certify_as_targets(self, images: torch.Tensor, targets: torch.Tensor, cfg: ShadowConfig
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        _, pred, rad, _ = certify_as_targets(self.smooth, images, targets, self.n0, self.n_select, self.alpha,
                                             self.certify_batch_size, cfg.seed)
        ok = pred == targets
        return ok, torch.where(ok, rad, torch.zeros_like(rad))

    def judge(self, x: torch.Tensor, y: torch.Tensor, tg: torch.Tensor, x_cand: torch.Tensor, cfg: ShadowConfig,
              spoof_only: bool = False) -> dict[str, Any]:
        return judge_smoothing(self.smooth, x, tg, x_cand, self.n0, self.n_select, self.n, self.alpha,
                               self.certify_batch_size, cfg.seed, cfg.min_ssim, spoof_only=spoof_only)

    def natural(self, x: torch.Tensor, y: torch.Tensor, cfg: ShadowConfig) -> dict[str, torch.Tensor]:
        n = self.n if self.n is not None else self.n_select
        nat = self.smooth.certify(x, self.n0, n, self.alpha, batch_size=self.certify_batch_size, seed=cfg.seed + 2,
                                  progress=False)
        return {"natural_prediction": torch.tensor([c.prediction for c in nat], device=x.device),
                "natural_radius": torch.tensor([float(c.radius) if c.prediction == yi else 0.0
                                                for c, yi in zip(nat, y.tolist())], device=x.device)}

    def wrong_label(self, x: torch.Tensor, y: torch.Tensor, images: torch.Tensor, tg: torch.Tensor,
                    cfg: ShadowConfig, seed: int) -> dict[str, torch.Tensor]:
        # only a wrong label can count: an image whose CERTIFY selection picks its true label needs no n samples
        certs = self.smooth.certify_where(images, self.n0, self.n, self.alpha, lambda c_a: c_a != y.to(c_a.device),
                                          self.certify_batch_size, seed)
        return self._wrong([-1 if c is None else c.prediction for c in certs],
                           [0.0 if c is None else c.radius for c in certs], y)

    def natural_wrong_label(self, x: torch.Tensor, y: torch.Tensor, tg: torch.Tensor, cfg: ShadowConfig,
                            natural: Any = None) -> dict[str, torch.Tensor]:
        """From the natural images' certificates (``natural``: one ``Certificate`` each) when given."""
        if natural is None:
            return super().natural_wrong_label(x, y, tg, cfg)
        return self._wrong([c.prediction for c in natural], [c.radius for c in natural], y)

    @staticmethod
    def _wrong(pred: list[int], radius: list[float], y: torch.Tensor) -> dict[str, torch.Tensor]:
        dev = y.device
        p = torch.tensor(pred, device=dev)
        wrong = (p != y) & (p >= 0)
        rad = torch.tensor(radius, device=dev, dtype=torch.float32)
        return {"spoofed": wrong, "radius": torch.where(wrong, rad, torch.zeros_like(rad))}

    def control_targets(self, result: ShadowResult) -> torch.Tensor:
        """Only the attack's chosen target: the control then costs one final CERTIFY per image, as the attack."""
        return result.target[:, None]

    def result_fields(self, tg: torch.Tensor, cfg: ShadowConfig) -> dict[str, Any]:
        return {"sigma": self.smooth.sigma, "extra": {"n0": self.n0, "n_select": self.n_select, "n": self.n,
                                                      "alpha": self.alpha, "init_targets": tg}}


@register
class BoundObjective(Objective):
    """A certifiably trained network (Zhang et al.'s CROWN-IBP; paper sec. 5): eq. 2's L is the robust
    cross-entropy CE(cat([0, -lb]), 0) of the lower bounds lb of the target margins z_t - z_j (j != t) over the L-inf
    ball of radius eps around clamp(x + delta, 0, 1), by ``bound`` ("crown-ibp" or "ibp", ``bounds.lower_bounds``;
    None: cfg.loss_bound); the statistic is the smallest of those bounds. The verdict takes the tighter of IBP and
    CROWN-IBP on the 8-bit image (``bounds.certified_margins``, ``judge_crown_ibp``).

    model: an nn.Sequential with bound rules (``certify.rules``), in eval mode; eps: the L-inf radius (>= 0);
    batch_size: candidates bounded together.
    """

    name, title, statistic, reached_at, score = "crown-ibp", "CROWN-IBP", "min_margin", 0.0, "margin"

    def __init__(self, model: nn.Module, eps: float, bound: str | None = None, num_classes: int = 10,
                 batch_size: int = 512) -> None:
        if bound is not None:
            validate.choice(bound, "bound", LOSS_BOUNDS)
        self.model, self.eps, self.bound = model, validate.eps(eps), bound
        self.num_classes, self.batch_size = num_classes, batch_size

    def default_config(self) -> ShadowConfig:
        return ShadowConfig.tuned_crown_ibp()

    def class_step(self, cands: Candidates, cfg: ShadowConfig) -> ClassStep:
        bound = cfg.loss_bound if self.bound is None else self.bound
        spec = margin_spec(cands.y_c, self.num_classes, target=cands.tgt)   # M x (K-1) x K, rows e_t - e_j
        x_c, dev = cands.x_c, cands.dev

        def step(delta: torch.Tensor, act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            d = delta.detach().requires_grad_(True)
            grad = torch.zeros_like(d)
            losses, margins = [], []
            for s, e in chunks(act.shape[0], self.batch_size):
                ca = act[s:e]
                xa = (x_c[ca] + rgb(d[ca])).clamp(0.0, 1.0)
                lb = lower_bounds(self.model, xa, self.eps, spec[ca], bound)
                logits = torch.cat([torch.zeros_like(lb[:, :1]), -lb], dim=1)
                ce = F.cross_entropy(logits, torch.zeros(len(ca), dtype=torch.long, device=dev), reduction="none")
                grad += torch.autograd.grad(ce.sum(), d)[0]
                losses.append(ce.detach())
                margins.append(lb.detach().amin(1))
            return grad, torch.cat(losses), torch.cat(margins)

        return step

    def certify_as_targets(self, images: torch.Tensor, targets: torch.Tensor, cfg: ShadowConfig
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        margin = certified_margins(self.model, images, self.eps, margin_spec(targets, self.num_classes),
                                   self.batch_size).amin(1)
        return margin >= 0, margin

    def judge(self, x: torch.Tensor, y: torch.Tensor, tg: torch.Tensor, x_cand: torch.Tensor, cfg: ShadowConfig,
              spoof_only: bool = False) -> dict[str, Any]:
        return judge_crown_ibp(self.model, self.eps, x, y, tg, x_cand, self.batch_size, cfg.min_ssim,
                               self.num_classes)

    def natural(self, x: torch.Tensor, y: torch.Tensor, cfg: ShadowConfig) -> dict[str, torch.Tensor]:
        spec = margin_spec(y, self.num_classes)
        return {"natural_margin": certified_margins(self.model, x, self.eps, spec, self.batch_size).amin(1)}

    def wrong_label(self, x: torch.Tensor, y: torch.Tensor, images: torch.Tensor, tg: torch.Tensor,
                    cfg: ShadowConfig, seed: int) -> dict[str, torch.Tensor]:
        """Every wrong target of tg bounded on each image, the best kept as the attack's candidates are."""
        judged = self.judge(x, y, tg, images.repeat_interleave(tg.shape[1], dim=0), cfg)
        return {"spoofed": judged["spoofed"], "margin": judged["margin"]}

    def result_fields(self, tg: torch.Tensor, cfg: ShadowConfig) -> dict[str, Any]:
        return {"eps": self.eps, "extra": {"bound": cfg.loss_bound if self.bound is None else self.bound}}

    def faithful_attack(self, cands: Candidates, cfg: ShadowConfig, callback: Any, progress: bool
                        ) -> ShadowResult | None:
        return attack_crown_ibp_faithful(self.model, self.eps, cands, cfg, callback, progress, self.num_classes)


__all__ = ["OBJECTIVES", "BoundObjective", "ClassStep", "Objective", "SmoothingObjective", "register"]
