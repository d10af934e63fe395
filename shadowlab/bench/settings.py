"""What the benchmarks measure, and on how much (``BenchSettings``; `python -m shadowlab bench` fills it from its
options)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shadowlab.perception import MIN_SSIM, check_min_ssim
from shadowlab.precision import check_precision
from shadowlab.shadow.config import ShadowConfig

NOISE_MODES = ("fresh", "fixed")


@dataclass
class BenchSettings:
    """What `run_bench` measures, and on how much."""

    model: str = "smooth-sigma0.25"   # smoothing checkpoint for the attack and certification benchmarks
    n_images: int = 20                # test images for the ART comparison
    steps: int = 50
    lr: float = 0.1
    noise_samples: int = 64
    lambda_tv: float = 0.3            # the authors' smoothing lambdas (ShadowConfig.paper_smoothing)
    lambda_c: float = 1.0
    lambda_s: float = 0.5
    # shadowlab only, one run per (early_stop_margin, keep_targets, noise) triple. early_stop_margin: stop an image
    # once one of its targets gets this share of the training-noise votes (None: every step; ART has no early stop);
    # keep_targets: after prune_step steps continue only each image's keep_targets lowest-loss targets (None: all);
    # noise: "fresh" draws new noise_samples copies at every step, "fixed" reuses one draw (the authors, ART)
    runs: tuple[tuple[float | None, int | None, str], ...] = ((None, 1, "fresh"), (None, 1, "fixed"),
                                                             (1.0, None, "fresh"))
    prune_step: int = 5
    early_stop_scope: str = "image"
    n0: int = 100
    n_select: int = 200               # CERTIFY samples that score each (image, target) candidate
    n: int = 1000                     # CERTIFY samples of the final certificate (both attacks, same seeds)
    alpha: float = 0.001
    certify_images: int = 20          # certification benchmark: images per batch ...
    certify_n: int = 2000             # ... and noise samples per image
    bound_images: int = 100
    seed: int = 0
    art: bool = True
    min_ssim: float = MIN_SSIM        # a shadow image counts as a success only with SSIM >= this (both attacks)
    precision: str = "fp32"           # the attack step's and CERTIFY's arithmetic, and their limits' (precision.py)

    def __post_init__(self) -> None:
        check_min_ssim(self.min_ssim)
        check_precision(self.precision)
        for name in ("n_images", "steps", "noise_samples", "n0", "n_select", "n", "certify_images", "certify_n",
                     "bound_images"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        for name in ("lr", "lambda_tv", "lambda_c", "lambda_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0 or (name == "lr" and
                                                                                               value == 0):
                raise ValueError(f"{name}={value!r} must be a finite number {'> 0' if name == 'lr' else '>= 0'}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha={self.alpha} must lie in (0, 1)")
        self.runs = tuple(tuple(r) for r in self.runs)
        self.attack_config()   # ShadowConfig checks prune_step and early_stop_scope
        # the margin's range (0, 1] is attack_smoothing's rule; the rest of each run is ShadowConfig's
        if not self.runs or any(len(r) != 3 or (r[0] is not None and (isinstance(r[0], bool) or not isinstance(
                r[0], (int, float)) or not 0 < r[0] <= 1)) or r[2] not in NOISE_MODES for r in self.runs):
            raise ValueError(f"runs={self.runs!r} must be a non-empty list of (early_stop_margin, keep_targets, noise) "
                             "triples: margin None or in (0, 1], keep_targets None or an integer >= 1, noise "
                             f"{' or '.join(map(repr, NOISE_MODES))}")
        for margin, keep, noise in self.runs:
            try:
                self.attack_config(margin, keep, noise)
            except ValueError as err:
                raise ValueError(f"runs={self.runs!r}: {err}") from None

    def attack_config(self, early_stop_margin: float | None = None, keep_targets: int | None = None,
                      noise: str = "fixed") -> ShadowConfig:
        """The shadowlab side of the ART comparison: the authors' smoothing attack, 3 channels, these settings."""
        return ShadowConfig.paper_smoothing(channels=3, steps=self.steps, lr=self.lr, noise_samples=self.noise_samples,
                                            lambda_tv=self.lambda_tv, lambda_c=self.lambda_c, lambda_s=self.lambda_s,
                                            seed=self.seed, early_stop_scope=self.early_stop_scope,
                                            prune_step=self.prune_step, early_stop_margin=early_stop_margin,
                                            keep_targets=keep_targets, resample_noise=noise == "fresh",
                                            min_ssim=self.min_ssim)
