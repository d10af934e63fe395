"""The settings of the paper's Tables 1 and 2: one dataclass per table, CPU-size defaults, ``.paper()`` for the
authors' full settings (Ghiasi et al. 2020, Sec. 5 and Appendix; ../shared/reference/shadow-attack.md).

These are the one place the tables' defaults live: ``reproduce.table1`` / ``table2``, the CLI (``python -m shadowlab
reproduce``, ``--paper``), the lessons and the cost model all start from them. What is a property of the hardware
and not of the experiment (device, chunk, output folder, resume, torchrun context) is an argument of the run, not a
setting.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from shadowlab import validate
from shadowlab.perception import MIN_SSIM, check_min_ssim
from shadowlab.precision import PRECISIONS
from shadowlab.shadow.config import EARLY_STOP_SCOPES, RECIPES, ShadowConfig

SIGMAS = (0.12, 0.25, 0.50, 1.00)
# the pruned paper-settings search (Table1Settings.paper_pruned), chosen on held-out images (docs/results.md): one
# target kept after PRUNED_PRUNE_STEP steps, and a candidate stops once all its training noise is on the target (its
# best iterate cannot change then) or its objective fell by less than PRUNED_SETTLE_TOL over PRUNED_SETTLE_WINDOW steps
PRUNED = {"keep_targets": 1, "prune_step": 2, "early_stop_margin": 1.0, "early_stop_scope": "candidate",
          "settle_window": 10, "settle_tol": 0.05}
MODEL_TEMPLATE = "smooth-sigma{sigma:.2f}"   # Table 1's checkpoint per sigma (the committed models)


@dataclass(frozen=True)
class _Settings:
    """What both tables' settings share: the settings below, a checked copy with changes, and a JSON-ready dict.

    Args:
        min_ssim: the imperceptibility threshold a shadow image must reach to count (perception.MIN_SSIM).
        controls: also judge the three controls of shadowlab.experiments.controls on the same images.
        seed: the seed of the attack (Table 1: and of CERTIFY's noise).
        source: where the test images come from, one of ``data.SOURCES``: "auto" (official CIFAR-10 when present,
            then a JPEG copy, else the committed subset), "torchvision", "jpeg" or "subset".
        faithful: the authors' released procedure instead of shadowlab's (``ShadowConfig.faithful``).

    These fields come first in ``dataclasses.fields`` and ``to_dict`` (a dataclass lists its base's fields first).
    """

    min_ssim: float = MIN_SSIM
    controls: bool = True
    seed: int = 0
    source: str = "auto"
    faithful: bool = False

    def __post_init__(self) -> None:
        """Check the shared settings (ValueError naming the setting); a table's own __post_init__ calls it last."""
        object.__setattr__(self, "min_ssim", check_min_ssim(self.min_ssim))

    def replace(self, **changes: Any) -> Any:
        """A copy with ``changes`` (ValueError naming any unknown setting)."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = set(changes) - names
        if unknown:
            raise ValueError(f"unknown {type(self).__name__} settings {sorted(unknown)}; accepted: "
                             f"{', '.join(sorted(names))}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The settings as a dict of JSON values (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class Table1Settings(_Settings):
    """Table 1 (randomized smoothing): the Shadow Attack on each sigma's smoothed classifier, judged by CERTIFY.

    Args:
        sigmas: the noise levels, one smoothed classifier each (``model_template`` names its checkpoint).
        n_images: test images per sigma (the paper: 500).
        n, n0, alpha: CERTIFY's estimation samples, selection samples and failure probability (Cohen et al.).
        n_select: CERTIFY samples spent ranking the attack's candidate targets before the final certificate.
        steps: attack steps (the paper: 300); noise_samples: Gaussian draws per step (the paper: 400).
        channels: attack modes, 1 (one channel repeated: grey perturbation) and/or 3 (full colour).
        lr: the attack's step size on delta.
        early_stop_margin: stop an image once every kept target's smoothed margin reaches this (None: never).
        early_stop_scope: "image" or "candidate": what the early stop watches.
        keep_targets: candidate targets kept per image (None: every wrong class, the paper), after prune_step steps.
        settle_window, settle_tol: with an early stop, a candidate whose objective fell by less than settle_tol
            (relative) over the last settle_window steps stops too (``ShadowConfig``; settle_window None: never).
        model_template: format string of sigma naming each checkpoint.
        precision: the base network's arithmetic, "fp32", "tf32" or "bf16" (shadowlab.precision).
    """

    sigmas: tuple[float, ...] = SIGMAS
    n_images: int = 3
    n: int = 1000
    n0: int = 100
    alpha: float = 0.001
    n_select: int = 200
    steps: int = 40
    noise_samples: int = 32
    channels: tuple[int, ...] = (1, 3)
    lr: float = 0.1
    early_stop_margin: float | None = 0.95
    early_stop_scope: str = "image"
    keep_targets: int | None = 3
    prune_step: int = 5
    settle_window: int | None = 10
    settle_tol: float = 1e-3
    model_template: str = MODEL_TEMPLATE
    precision: str = "fp32"

    def __post_init__(self) -> None:
        for name in ("n_images", "n", "n0", "n_select", "steps", "noise_samples", "prune_step"):
            validate.count(getattr(self, name), name)
        if self.settle_window is not None:
            validate.count(self.settle_window, "settle_window")
        validate.number(self.settle_tol, "settle_tol", low=0.0)
        if self.keep_targets is not None:
            validate.count(self.keep_targets, "keep_targets")
        validate.alpha(self.alpha)
        validate.positive(self.lr, "lr")
        if not self.sigmas or any(not s > 0 for s in self.sigmas):
            raise ValueError(f"sigmas={self.sigmas!r} must be a non-empty list of noise levels > 0")
        if not self.channels or any(c not in (1, 3) for c in self.channels):
            raise ValueError(f"channels={self.channels!r} must be a non-empty subset of (1, 3)")
        validate.choice(self.early_stop_scope, "early_stop_scope", EARLY_STOP_SCOPES)
        validate.choice(self.precision, "precision", PRECISIONS)
        object.__setattr__(self, "sigmas", tuple(float(s) for s in self.sigmas))
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        super().__post_init__()

    @classmethod
    def paper(cls, **changes: Any) -> Table1Settings:
        """The authors' settings: 500 images, CERTIFY with n = 100,000, n0 = 100, alpha = 0.001, 300 steps of 400
        noise samples, every wrong target, no early stop (GPU hours); ``changes`` on top."""
        return cls(n_images=500, n=100_000, n0=100, alpha=0.001, steps=300, noise_samples=400,
                   early_stop_margin=None, keep_targets=None).replace(**changes)

    @classmethod
    def paper_pruned(cls, **changes: Any) -> Table1Settings:
        """The paper's settings with a search that fits a CPU (docs/results.md, "Table 1 at the paper's settings"):
        everything the certificate sees is the paper's (500 images, CERTIFY n = 100,000, n0 = 100, alpha = 0.001,
        400 noise copies per step, at most 300 steps, both channel modes), but the search is ``PRUNED``: each image
        keeps its lowest-loss target after 2 steps, and a candidate stops once every training-noise copy is on the
        target and it is imperceptible, or once its objective has settled (less than 5% fall over 10 steps);
        ``changes`` on top."""
        return cls.paper(**PRUNED).replace(**changes)

    def model_name(self, sigma: float) -> str:
        """The checkpoint of ``sigma``: ``model_template.format(sigma=sigma)``; ValueError naming model_template when
        it is not a format string of sigma."""
        try:
            return self.model_template.format(sigma=sigma)
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"model_template={self.model_template!r} must be a format string of sigma, e.g. "
                             f"{MODEL_TEMPLATE!r} ({type(err).__name__}: {err})") from None

    def shadow_config(self, channels: int, **changes: Any) -> ShadowConfig:
        """The Shadow Attack's settings for one channel mode: the authors' lambdas (``ShadowConfig.paper_smoothing``)
        with this table's budget; ``changes`` override (e.g. steps, for the cost model)."""
        kw = {"steps": self.steps, "noise_samples": self.noise_samples, "lr": self.lr, "seed": self.seed,
              "early_stop_margin": self.early_stop_margin, "early_stop_scope": self.early_stop_scope,
              "keep_targets": self.keep_targets, "prune_step": self.prune_step, "settle_window": self.settle_window,
              "settle_tol": self.settle_tol, "min_ssim": self.min_ssim, **changes}
        return ShadowConfig.paper_smoothing(channels=channels, faithful=self.faithful, precision=self.precision, **kw)


@dataclass(frozen=True)
class Table2Settings(_Settings):
    """Table 2 (CROWN-IBP): the Shadow Attack on certifiably trained networks, judged by their own bound.

    Args:
        models: the checkpoints (None: every committed ``crownibp-*``).
        n_images: test images per model (the paper: 500).
        steps: attack steps (the paper: 300).
        early_stop_margin: stop an image once a target's certified margin reaches this (None: never, the paper).
        min_ssim, controls, seed, source, faithful: the shared settings (``_Settings``).
        recipe: "tuned" (default: ``ShadowConfig.tuned_crown_ibp``, shadowlab's attack tuned on held-out images) or
            "paper" (``ShadowConfig.paper_crown_ibp``, the paper's numbers rescaled to shadowlab's per-candidate
            loss); ignored with ``faithful``, which runs the authors' own procedure.
        faithful_batch: with ``faithful``, the batch of images the authors' loss is averaged over (their 600); each
            image gets the step it would get in such a batch, whatever the run's chunk (``ShadowConfig``).
    """

    models: tuple[str, ...] | None = None
    n_images: int = 10
    steps: int = 40
    early_stop_margin: float | None = 0.0
    faithful_batch: int = 600
    recipe: str = "tuned"

    def __post_init__(self) -> None:
        validate.count(self.n_images, "n_images")
        validate.count(self.faithful_batch, "faithful_batch")
        validate.choice(self.recipe, "recipe", RECIPES)
        validate.count(self.steps, "steps")
        if self.models is not None:
            if isinstance(self.models, str) or not self.models:
                raise ValueError(f"models={self.models!r} must be a non-empty list of checkpoint names or None")
            object.__setattr__(self, "models", tuple(self.models))
        super().__post_init__()

    @classmethod
    def paper(cls, **changes: Any) -> Table2Settings:
        """The authors' settings: 500 images, 300 steps, no early stop; ``changes`` on top."""
        return cls(n_images=500, steps=300, early_stop_margin=None).replace(**changes)

    def shadow_config(self, **changes: Any) -> ShadowConfig:
        """The Shadow Attack's settings: the recipe's (``ShadowConfig.tuned_crown_ibp`` or ``paper_crown_ibp``) with
        this table's budget; faithful: the authors' raw settings and procedure, which has no early stop."""
        kw = {"steps": self.steps, "seed": self.seed, "min_ssim": self.min_ssim,
              "early_stop_margin": self.early_stop_margin, **changes}
        if self.faithful:
            kw.pop("early_stop_margin")
            return ShadowConfig.paper_crown_ibp(faithful=True, faithful_batch=self.faithful_batch, **kw)
        if self.recipe == "paper":
            return ShadowConfig.paper_crown_ibp(**kw)
        return ShadowConfig.tuned_crown_ibp(**kw)
