"""The Shadow Attack's settings (``ShadowConfig``, with the authors' two recipes) and its outcome (``ShadowResult``).

``ShadowConfig`` holds eq. 2's weights, the optimiser's steps and schedule, the initialisation and the optional
speed-ups (early stopping, target pruning); its checks raise ValueError naming the field and the accepted range.
``ShadowResult`` is what ``shadow.attack.attack_smoothing`` and ``shadow.attack.attack_crown_ibp`` return: the 8-bit
shadow images, the chosen targets, success (certified wrong label AND SSIM >= min_ssim) and the loss curves.

    >>> ShadowConfig.paper_smoothing(steps=40).lambda_tv
    0.3
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from shadowlab.perception import MIN_SSIM, check_min_ssim
from shadowlab.precision import check_precision

INITS = ("uniform", "zeros")
OPTIMISERS = ("gd", "sign", "adam")
LOSS_BOUNDS = ("crown-ibp", "ibp")
# shadowlab's tuned CROWN-IBP attack (ShadowConfig.tuned_crown_ibp): the paper's recipe rescaled for a batch of
# TUNED_BATCH images instead of the authors' 600, with IBP in the loss. Chosen on held-out subset images 900-915
# (scripts/shadow_ablation.py, docs/results.md "What the attack's strength depends on")
TUNED_BATCH = 16
RECIPES = ("tuned", "paper")
BEST_BY = ("statistic", "ssim")
EARLY_STOP_SCOPES = ("candidate", "image")
HISTORY_TERMS = ("classification", "color", "tv", "dissim", "l2", "total")   # + the statistic and "ssim"


# ----------------------------------------------------------------------------------------------- config
def _finite_nonneg(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}={value} must be a finite number >= 0")


@dataclass
class ShadowConfig:
    """Hyper-parameters of the Shadow Attack (paper eq. 2); defaults are the authors' smoothing settings."""

    lambda_c: float = 1.0          # colour term C
    lambda_tv: float = 0.3         # smooth total variation TV
    lambda_s: float = 0.5          # channel dissimilarity (3-channel attack only; 0 for 1 channel)
    steps: int = 300
    lr: float = 0.1                # plain gradient step (no sign, no projection)
    # "gd": plain gradient descent, delta -= lr * grad (the authors'); "sign": delta -= lr * sign(grad) (FGSM-like,
    # lr is then the per-step change of each value); "adam": Adam's update (betas 0.9, 0.999) with step lr
    optimiser: str = "gd"
    # piecewise-constant factor on lr: [(fraction, factor), ...]; from step >= fraction * steps the factor applies
    step_schedule: list[tuple[float, float]] | None = None
    channels: int = 1              # 1: one H x W map repeated on R, G, B; 3: a full colour perturbation
    noise_samples: int = 400       # Gaussian copies for the smoothing loss (drawn once, reused every step)
    init: str = "uniform"          # "uniform" in [-init_scale, init_scale] (authors) or "zeros"
    init_scale: float = 0.5
    seed: int = 0
    l2_penalty: float = 0.0        # weight of ||delta||_2 (the CROWN-IBP variant's replacement for C)
    # a shadow image counts as a success only with SSIM(x, x_shadow) >= min_ssim (perception.shadow_success)
    min_ssim: float = MIN_SSIM
    # freeze a candidate once reached with margin AND imperceptible (SSIM >= min_ssim): smoothing -> fraction of its
    # training-noise predictions equal to the target >= early_stop_margin (in (0, 1]); CROWN-IBP -> min certified
    # target margin >= early_stop_margin. A candidate whose objective has settled (relative fall of the total
    # objective over the last settle_window steps below settle_tol) stops too: more steps would not change it
    # (settle_window None: never; with early_stop_margin 1.0 a smoothing candidate then stops only once every
    # training-noise copy is on its target, when its best iterate can no longer change: ``optimise``).
    early_stop_margin: float | None = None
    settle_window: int | None = 10
    settle_tol: float = 1e-3
    # "candidate": each (image, target) candidate stops on its own; "image": all candidates of an image stop as soon
    # as one of them reaches the margin (only the best target per image is kept, so the rest is wasted work)
    early_stop_scope: str = "candidate"
    # keep only the keep_targets most promising targets of each image (lowest classification loss) after prune_step
    # steps; the others are frozen (not in the authors' code: a cheaper search for the same best target)
    keep_targets: int | None = None
    prune_step: int = 5
    # smoothing only: draw fresh noise_samples Gaussian copies at every step instead of one set reused every step
    # (authors, ART): same work per step, a stochastic gradient of the smoothed loss instead of a fit to one sample
    resample_noise: bool = False
    # judge each candidate's best iterate (by the loop's own view of success, see shadow._optimise) against its last
    # one and keep whichever the attack's judge prefers; False: the last iterate, as the authors' code
    keep_best: bool = True
    # which of a candidate's iterates that reach the target AND are imperceptible is its best: "statistic" the one
    # with the largest certificate statistic (margin, votes), "ssim" the most natural-looking one (largest SSIM)
    best_by: str = "statistic"
    # the authors' released procedure where shadowlab departs from it (shadow_faithful; docs/results.md): CROWN-IBP,
    # their normalised-space perturbation, straight-through clamp, unclipped box, batch-mean loss, plain IBP and the
    # last iterate; smoothing, delta added to the noisy copies without a clamp and the last iterate. Implies
    # keep_best=False.
    faithful: bool = False
    # CROWN-IBP attack: the bound of the target margins its loss reads, "crown-ibp" (CROWN with IBP intermediates) or
    # "ibp" (interval bounds, the authors' choice, no backward pass per bound); the verdict takes the tighter of both
    loss_bound: str = "crown-ibp"
    # the batch of images the authors' CROWN-IBP loss is averaged over (their test batch: 600). With ``faithful``
    # each image's share of the batch-mean loss is 1 / faithful_batch whatever the size of the call (--chunk), so a
    # faithful run does not change with the chunk or the device
    faithful_batch: int = 600
    # the base network's arithmetic in the smoothing attack and its CERTIFY runs: "fp32", "tf32" or "bf16"
    # (shadowlab.precision); the CROWN-IBP attack's bounds stay float32
    precision: str = "fp32"

    def __post_init__(self) -> None:
        for name in ("lambda_c", "lambda_tv", "lambda_s", "l2_penalty", "init_scale"):
            _finite_nonneg(name, getattr(self, name))
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps={self.steps} must be an integer >= 1")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not math.isfinite(self.lr) or \
                self.lr <= 0:
            raise ValueError(f"lr={self.lr} must be a finite number > 0")
        if isinstance(self.channels, bool) or self.channels not in (1, 3):
            raise ValueError(f"channels={self.channels} must be 1 (grey map repeated on RGB) or 3 (colour)")
        if isinstance(self.noise_samples, bool) or not isinstance(self.noise_samples, int) or self.noise_samples < 1:
            raise ValueError(f"noise_samples={self.noise_samples} must be an integer >= 1")
        if self.best_by not in BEST_BY:
            raise ValueError(f"best_by={self.best_by!r} is unknown; accepted: {', '.join(BEST_BY)}")
        if self.loss_bound not in LOSS_BOUNDS:
            raise ValueError(f"loss_bound={self.loss_bound!r} is unknown; accepted: {', '.join(LOSS_BOUNDS)}")
        if self.optimiser not in OPTIMISERS:
            raise ValueError(f"optimiser={self.optimiser!r} is unknown; accepted: {', '.join(OPTIMISERS)}")
        if self.faithful and self.optimiser != "gd":
            raise ValueError(f"optimiser={self.optimiser!r} with faithful=True: the authors' procedure is plain "
                             "gradient descent ('gd')")
        if self.init not in INITS:
            raise ValueError(f"init={self.init!r} is unknown; accepted: {', '.join(INITS)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed={self.seed!r} must be an integer")
        check_min_ssim(self.min_ssim)
        if self.settle_window is not None and (isinstance(self.settle_window, bool) or not isinstance(
                self.settle_window, int) or self.settle_window < 1):
            raise ValueError(f"settle_window={self.settle_window!r} must be None (never) or an integer >= 1")
        if isinstance(self.settle_tol, bool) or not isinstance(self.settle_tol, (int, float)) or not math.isfinite(
                self.settle_tol) or self.settle_tol < 0:
            raise ValueError(f"settle_tol={self.settle_tol!r} must be a finite number >= 0")
        if self.early_stop_margin is not None and (isinstance(self.early_stop_margin, bool) or
                not isinstance(self.early_stop_margin, (int, float)) or not math.isfinite(self.early_stop_margin)):
            raise ValueError(f"early_stop_margin={self.early_stop_margin} must be None or a finite number")
        if isinstance(self.faithful_batch, bool) or not isinstance(self.faithful_batch, int) or self.faithful_batch < 1:
            raise ValueError(f"faithful_batch={self.faithful_batch!r} must be an integer >= 1 (the authors': 600)")
        if self.keep_targets is not None and (isinstance(self.keep_targets, bool) or not isinstance(
                self.keep_targets, int) or self.keep_targets < 1):
            raise ValueError(f"keep_targets={self.keep_targets!r} must be None (keep every target) or an integer >= 1")
        if isinstance(self.prune_step, bool) or not isinstance(self.prune_step, int) or self.prune_step < 1:
            raise ValueError(f"prune_step={self.prune_step!r} must be an integer >= 1")
        if not isinstance(self.resample_noise, bool):
            raise ValueError(f"resample_noise={self.resample_noise!r} must be True or False")
        check_precision(self.precision)
        for name in ("keep_best", "faithful"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be True or False")
        if self.early_stop_scope not in EARLY_STOP_SCOPES:
            raise ValueError(f"early_stop_scope={self.early_stop_scope!r} is unknown; accepted: "
                             f"{', '.join(EARLY_STOP_SCOPES)}")
        if self.step_schedule is not None:
            try:
                sched = [(float(f), float(k)) for f, k in self.step_schedule]
            except (TypeError, ValueError):
                raise ValueError(f"step_schedule={self.step_schedule!r} must be None or a list of "
                                 "(fraction, factor) pairs") from None
            for f, k in sched:
                if not 0.0 <= f <= 1.0 or not math.isfinite(k) or k <= 0:
                    raise ValueError(f"step_schedule entry ({f}, {k}) needs 0 <= fraction <= 1 and factor > 0")
            if [f for f, _ in sched] != sorted(f for f, _ in sched):
                raise ValueError(f"step_schedule={sched} fractions must be increasing")
            self.step_schedule = sched
        # gradient descent on lambda_tv * TV diverges when lr * lambda_tv * (largest Hessian eigenvalue) >= 2; that
        # eigenvalue is < 16 per channel (2 x the grid Laplacian's < 8), times 3 for a map repeated on R, G, B
        peak = max(f for _, f in [(0.0, 1.0), *(self.step_schedule or [])])
        if self.optimiser == "gd" and self.lr * peak * self.lambda_tv * 16 * (3 if self.channels == 1 else 1) >= 2:
            warnings.warn(f"lr={self.lr} with lambda_tv={self.lambda_tv} and channels={self.channels} may make the "
                          "TV term diverge (needs lr * lambda_tv * 16 * (3 if channels == 1 else 1) < 2)",
                          RuntimeWarning, stacklevel=3)

    @property
    def judges_best_iterate(self) -> bool:
        """Whether the judge sees each candidate's best iterate beside its last one (``keep_best``, which the
        authors' procedure, ``faithful``, never does)."""
        return self.keep_best and not self.faithful

    def lr_at(self, step: int) -> float:
        """Step size at a step: lr times the factor of the last schedule entry whose fraction * steps <= step."""
        factor = 1.0
        for frac, k in self.step_schedule or ():
            if step >= frac * self.steps:
                factor = k
        return self.lr * factor

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly copy."""
        d = asdict(self)
        d["step_schedule"] = [list(p) for p in self.step_schedule] if self.step_schedule is not None else None
        return d

    @classmethod
    def paper_smoothing(cls, channels: int = 1, faithful: bool = False, **overrides: Any) -> ShadowConfig:
        """Authors' randomized-smoothing settings: 300 steps, lr 0.1, 400 noise copies, uniform init in [-0.5, 0.5],
        lambda_tv 0.3, lambda_c 1.0, lambda_s 0.5, 1 channel by default (3 for the colour variant). faithful=True
        also follows their procedure (``faithful``: no clamp before the noise, the last iterate)."""
        if faithful:
            overrides = {"faithful": True, "keep_best": False, **overrides}
        kw: dict[str, Any] = dict(lambda_c=1.0, lambda_tv=0.3, lambda_s=0.5, steps=300, lr=0.1, step_schedule=None,
                                  channels=channels, noise_samples=400, init="uniform", init_scale=0.5,
                                  l2_penalty=0.0)
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def tuned_crown_ibp(cls, **overrides: Any) -> ShadowConfig:
        """shadowlab's default CROWN-IBP attack, tuned on held-out images (docs/results.md): the paper's recipe
        (``paper_crown_ibp``: 1 channel, 300 steps, the step schedule /3 after half and /9 after 5/6, TV and L2
        penalties, uniform init, each candidate's best iterate) rescaled for a batch of N = TUNED_BATCH (16) instead
        of the authors' 600, so each candidate's step is 37.5x larger and the penalties keep their ratio to it, with
        plain IBP bounds in the loss (as the authors; the verdict still takes the tighter of IBP and CROWN-IBP).
        Departs from the paper's numbers in N and the loss bound only; ``paper_crown_ibp`` returns theirs. Its
        shadows sit close to SSIM 0.9 (docs/results.md, the trade-off curve): ``best_by="ssim"`` keeps the most
        natural-looking certified iterate instead of the one with the largest margin."""
        return cls.paper_crown_ibp(batch=TUNED_BATCH, **{"loss_bound": "ibp", **overrides})

    @classmethod
    def paper_crown_ibp(cls, rescale: bool = True, input_std: float = 0.2, batch: int = 600, faithful: bool = False,
                        **overrides: Any) -> ShadowConfig:
        """Authors' CROWN-IBP settings: 1 channel, 300 steps, step 200.5 (/3 after half, /9 after 5/6 of the steps),
        lambda_tv 9e-6, L2 penalty 0.02 ||delta||_2, no colour term, uniform init in [-0.5, 0.5].

        With rescale=False these raw numbers are returned. They were tuned for a different parametrisation: the
        authors add delta in *normalised* input space (std about 0.2) and average the robust cross-entropy over a
        batch of 600 test images while summing the regularisers. Our loss is per candidate in pixel space, so
        rescale=True (default) returns the equivalent per-candidate step: with s = input_std and N = batch,
        lr = 200.5 s^2 / N, lambda_tv = 9e-6 N / s^2, l2_penalty = 0.02 sqrt(N) / s (their L2 norm is taken over
        the whole batch; sqrt(N) assumes equal norms across it), init_scale = 0.5 s.

        faithful=True returns the raw numbers with ``faithful`` set: the authors' own procedure and parametrisation
        (``shadow.faithful``), where they apply as they are.
        """
        lr, tv, l2, init_scale = 200.5, 9e-6, 0.02, 0.5
        if faithful:
            rescale = False
            overrides = {"faithful": True, "keep_best": False, **overrides}
        if rescale:
            s, n = float(input_std), float(batch)
            lr, tv, l2, init_scale = lr * s * s / n, tv * n / (s * s), l2 * math.sqrt(n) / s, init_scale * s
        kw: dict[str, Any] = dict(lambda_c=0.0, lambda_tv=tv, lambda_s=0.0, steps=300, lr=lr,
                                  step_schedule=[(0.5, 1.0 / 3.0), (5.0 / 6.0, 1.0 / 9.0)], channels=1,
                                  init="uniform", init_scale=init_scale, l2_penalty=l2)
        kw.update(overrides)
        return cls(**kw)


# ----------------------------------------------------------------------------------------------- result
def _tolist(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu()
        return v.float().tolist() if v.is_floating_point() else v.tolist()
    if isinstance(v, dict):
        return {k: _tolist(u) for k, u in v.items()}
    if isinstance(v, (list, tuple)):
        return [_tolist(u) for u in v]
    return v


@dataclass
class ShadowResult:
    """Shadow images, the chosen target per image, whether the attack succeeded, and the loss curves.

    ``spoofed``: the wrong label carries a valid certificate (the plain spoof rate); ``success``: spoofed AND the
    shadow image is imperceptible, SSIM(x, x_shadow) >= min_ssim (perception.shadow_success, the paper's three
    properties). Shadow images are 8-bit (perception.quantize), so re-certifying a saved uint8 image gives the same
    answer up to the certification noise.
    """

    method: str                       # "smoothing" or "crown-ibp"
    x_shadow: torch.Tensor            # B x 3 x H x W, quantize(clamp(x + delta, 0, 1))
    target: torch.Tensor              # B, chosen wrong label
    success: torch.Tensor             # bool B: spoofed and ssim >= min_ssim
    linf: torch.Tensor                # B, ||x_shadow - x||_inf
    l2: torch.Tensor                  # B, ||x_shadow - x||_2
    history: dict[str, Any]           # per-step curves (mean over candidates) + "per_candidate" [steps, B, T]
    config: ShadowConfig
    seconds: float
    steps_run: int                    # = config.steps unless every candidate was frozen early
    candidate_targets: torch.Tensor   # B x T
    candidate_success: torch.Tensor   # bool B x T: certified as its target (selection certify / bound check)
    candidate_score: torch.Tensor     # B x T: selection radius (0 if failed) or min certified margin
    spoofed: torch.Tensor | None = None        # bool B: the wrong label is certified (whatever the SSIM)
    ssim: torch.Tensor | None = None           # B, SSIM(x, x_shadow)
    tv: torch.Tensor | None = None             # B, TV of x_shadow - x per value (perception.tv_per_pixel)
    candidate_ssim: torch.Tensor | None = None  # B x T
    min_ssim: float = MIN_SSIM
    radius: torch.Tensor | None = None        # B, certified radius of the wrong label (0 if not spoofed), smoothing
    certificate_radius: torch.Tensor | None = None  # B, radius of the final certificate whatever its label, smoothing
    pA_lower: torch.Tensor | None = None      # B, smoothing
    prediction: torch.Tensor | None = None    # B, certified prediction (-1 abstain) / model argmax (CROWN-IBP)
    margin: torch.Tensor | None = None        # B, min certified target margin, CROWN-IBP
    natural_prediction: torch.Tensor | None = None
    natural_radius: torch.Tensor | None = None
    natural_margin: torch.Tensor | None = None
    sigma: float | None = None
    eps: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def success_rate(self) -> float:
        """Fraction of images whose wrong label got a certificate on an imperceptible shadow image."""
        return float(self.success.float().mean())

    @property
    def spoof_rate(self) -> float:
        """Fraction of images whose wrong label got a certificate, imperceptible or not."""
        return float((self.spoofed if self.spoofed is not None else self.success).float().mean())

    def to_dict(self, include_images: bool = False, include_per_candidate: bool = False) -> dict[str, Any]:
        """JSON-friendly record (lists of floats); images and per-candidate curves only on request."""
        out: dict[str, Any] = {"method": self.method, "sigma": self.sigma, "eps": self.eps,
                               "seconds": self.seconds, "steps_run": self.steps_run,
                               "success_rate": self.success_rate, "spoof_rate": self.spoof_rate,
                               "min_ssim": self.min_ssim, "config": self.config.to_dict()}
        for name in ("target", "success", "spoofed", "ssim", "tv", "linf", "l2", "candidate_targets",
                     "candidate_success", "candidate_score", "candidate_ssim", "radius", "certificate_radius",
                     "pA_lower", "prediction",
                     "margin", "natural_prediction", "natural_radius", "natural_margin"):
            value = getattr(self, name)
            if value is not None:
                out[name] = _tolist(value)
        hist = {k: v for k, v in self.history.items() if k != "per_candidate"}
        if include_per_candidate and "per_candidate" in self.history:
            hist["per_candidate"] = self.history["per_candidate"]
        out["history"] = _tolist(hist)
        if self.extra:
            out["extra"] = _tolist(self.extra)
        if include_images:
            out["x_shadow"] = _tolist(self.x_shadow)
        return out
