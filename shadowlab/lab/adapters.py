"""The certified defenses the Shadow Attack lab attacks, one adapter class per defense.

A ``Defense`` names a model and its certificate parameter (sigma for randomized smoothing, eps for CROWN-IBP). Each
kind of defense has one ``DefenseAdapter`` subclass that writes down everything the lab does differently for it:
its paper settings, how it runs the attack, how it certifies the natural and the shadow image, how it draws the
certificate panel and how it words the status line. ``ShadowLab`` (``shadowlab.lab.widgets``) only ever calls these
methods, so adding a defense to the lab means writing one adapter class and registering it in ``ADAPTERS``.

    >>> lab_settings = LabSettings(device=torch.device("cpu"), num_classes=10)
    >>> adapter = Defense("smooth", "smoothing", model, sigma=0.25).adapter(lab_settings)   # doctest: +SKIP
    >>> adapter.natural_certificate(x[:1], y[:1])["radius"]                                  # doctest: +SKIP
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from shadowlab import checkpoints
from shadowlab.certify.bounds import certified_margins, margin_spec
from shadowlab.certify.smoothing import Smooth
from shadowlab.experiments.settings import Table1Settings
from shadowlab.shadow.attack import shadow_attack
from shadowlab.shadow.config import ShadowConfig
from shadowlab.shadow.objectives import BoundObjective, Objective, SmoothingObjective

StepCallback = Callable[[int, Mapping[str, Any]], None]


@dataclass(frozen=True)
class LabSettings:
    """What every adapter needs from the lab: device, number of classes and the quick-certificate budget.

    ``noise_samples`` is the attack's number of noise copies per step (smoothing), ``plot_every`` how often the
    attack hands the current shadow image to the callback, ``certify_n0`` / ``certify_n`` / ``alpha`` the quick
    CERTIFY's selection and estimation samples and failure probability, ``seed`` its noise seed.
    """

    device: torch.device
    num_classes: int
    noise_samples: int = Table1Settings.noise_samples   # the CPU-size Table 1's (one place for the CPU defaults)
    plot_every: int = 5
    certify_n0: int = 32
    certify_n: int = 128
    alpha: float = Table1Settings.alpha
    seed: int = 0


@dataclass
class CertificatePanel:
    """The artists of the certificate panel, created once by ``build_panel`` and updated by ``draw_panel``."""

    line: Any                      # the shadow image's certificate per recorded step
    natural: Any                   # horizontal line: the natural image's certificate
    faint: list[Any] = field(default_factory=list)   # CROWN-IBP: one faint line per target margin


@dataclass
class Defense:
    """A certified defense the lab attacks: randomized smoothing at ``sigma`` or a CROWN-IBP network at ``eps``.

    ``kind`` is one of ``KINDS``; its adapter class (``ADAPTERS[kind]``) checks the parameter and names the defense.
    """

    name: str
    kind: str
    model: nn.Module
    sigma: float | None = None
    eps: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in ADAPTERS:
            raise ValueError(f"kind={self.kind!r} is unknown; accepted: {', '.join(KINDS)}")
        ADAPTERS[self.kind].check(self)

    @property
    def label(self) -> str:
        """How the defense is listed in the lab's dropdown, e.g. "randomized smoothing, sigma=0.25 (name)"."""
        return ADAPTERS[self.kind].describe(self)

    def adapter(self, settings: LabSettings) -> DefenseAdapter:
        """This defense's adapter for a lab with ``settings``."""
        return ADAPTERS[self.kind](self, settings)

    @classmethod
    def from_checkpoint(cls, name: str, device: str | torch.device | None = None) -> Defense:
        """Load a committed model by name; its sidecar says smoothing ("gaussian", sigma) or CROWN-IBP (eps)."""
        model, meta = checkpoints.load(name, device=device)
        param = meta.get("defense_parameter", {}) or {}
        for kind, adapter in ADAPTERS.items():
            if meta.get("defense") == adapter.checkpoint_defense:
                return cls(name, kind, model, **{adapter.parameter: float(param[adapter.parameter])})
        raise ValueError(f"checkpoint {name!r} has defense={meta.get('defense')!r}; the lab attacks 'gaussian' "
                         "(randomized smoothing) or 'crown-ibp' models")


def default_defense_names(available: Sequence[str] | None = None) -> list[str]:
    """Committed defended models, smoothing first (sigma 0.25 first), then CROWN-IBP."""
    names = list(available) if available is not None else checkpoints.available()
    smooth = sorted((n for n in names if n.startswith("smooth-")), key=lambda n: (n != "smooth-sigma0.25", n))
    crown = sorted(n for n in names if n.startswith("crownibp-"))
    return smooth + crown


class DefenseAdapter(ABC):
    """What the lab does for one kind of defense; one subclass per kind, registered in ``ADAPTERS``.

    Class attributes: ``kind`` (a ``Defense.kind``), ``checkpoint_defense`` (the checkpoint sidecar's "defense"),
    ``parameter`` (the ``Defense`` field holding the certificate parameter) and ``color_term`` (whether the
    paper's settings for this defense use the colour term; without it the lab's lambda_c slider at its minimum
    means lambda_c = 0).
    """

    kind: ClassVar[str]
    checkpoint_defense: ClassVar[str]
    parameter: ClassVar[str]
    color_term: ClassVar[bool] = True

    def __init__(self, defense: Defense, settings: LabSettings) -> None:
        self.defense, self.settings = defense, settings

    @classmethod
    @abstractmethod
    def check(cls, defense: Defense) -> None:
        """Raise ValueError naming the defense when its certificate parameter is missing or out of range."""

    @classmethod
    @abstractmethod
    def describe(cls, defense: Defense) -> str:
        """The defense's label in the lab's dropdown."""

    @abstractmethod
    def paper_config(self, **settings: Any) -> Any:
        """The authors' ShadowConfig for this defense with ``settings`` (ShadowConfig fields) applied."""

    @abstractmethod
    def objective(self) -> Objective:
        """The defense's certificate as the Shadow Attack sees it (``shadow.objectives``), with the lab's quick
        certificate budget."""

    def attack(self, x: torch.Tensor, y: torch.Tensor, cfg: Any, target: torch.Tensor,
               callback: StepCallback) -> Any:
        """Run the Shadow Attack on one image (x: 1 x 3 x H x W, y and target: LongTensor 1) -> ShadowResult."""
        s = self.settings
        return shadow_attack(self.objective(), x, y, cfg, targets=target, callback=callback, progress=False,
                             device=s.device, delta_every=s.plot_every)

    @abstractmethod
    def natural_certificate(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        """The natural image's certificate for its true label; has "certified" (bool)."""

    @abstractmethod
    def record_certificate(self, x_shadow: torch.Tensor, target: int) -> dict[str, Any]:
        """Certificate of the (8-bit) shadow image 1 x 3 x H x W for ``target``; has "certified" (bool)."""

    @abstractmethod
    def build_panel(self, ax: Any) -> CertificatePanel:
        """Clear ``ax`` and draw the empty certificate panel (labels, reference lines, legend)."""

    @abstractmethod
    def draw_panel(self, panel: CertificatePanel, ax: Any, certificate: Sequence[Mapping[str, Any]],
                   natural: Mapping[str, Any]) -> str:
        """Put the recorded certificates and the natural one into ``panel``, set the y range; return the title."""

    @abstractmethod
    def status_text(self, natural: Mapping[str, Any], last: Mapping[str, Any] | None) -> str:
        """The status line's certificate part, from the natural certificate and the last recorded one (or None)."""


class SmoothingAdapter(DefenseAdapter):
    """Randomized smoothing (Cohen et al.): certificates are quick CERTIFY radii of the smoothed classifier."""

    kind, checkpoint_defense, parameter = "smoothing", "gaussian", "sigma"

    @classmethod
    def check(cls, defense: Defense) -> None:
        if not (defense.sigma is not None and defense.sigma > 0):
            raise ValueError(f"defense {defense.name!r}: smoothing needs sigma > 0, got sigma={defense.sigma!r}")

    @classmethod
    def describe(cls, defense: Defense) -> str:
        return f"randomized smoothing, sigma={defense.sigma:g} ({defense.name})"

    def paper_config(self, **settings: Any) -> Any:
        return ShadowConfig.paper_smoothing(noise_samples=self.settings.noise_samples, **settings)

    def _smooth(self) -> Smooth:
        s = self.settings
        return Smooth(self.defense.model, s.num_classes, float(self.defense.sigma), device=s.device)

    def objective(self) -> Objective:
        """CERTIFY(certify_n0, certify_n) ranks the candidates and is the shadow's certificate (n=None)."""
        s = self.settings
        return SmoothingObjective(self._smooth(), s.certify_n0, s.certify_n, None, s.alpha)

    def _certify(self, x: torch.Tensor) -> dict[str, Any]:
        s = self.settings
        c = self._smooth().certify(x, s.certify_n0, s.certify_n, s.alpha, seed=s.seed)[0]
        return {"prediction": c.prediction, "radius": float(c.radius), "pA_lower": float(c.pA_lower)}

    def natural_certificate(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        cert = self._certify(x)
        ok = cert["prediction"] == int(y)
        return {**cert, "radius": cert["radius"] if ok else 0.0, "certified": ok}

    def record_certificate(self, x_shadow: torch.Tensor, target: int) -> dict[str, Any]:
        c = self._certify(x_shadow)
        spoofed = c["prediction"] == target
        return {**c, "spoofed_radius": c["radius"] if spoofed else 0.0, "certified": spoofed}

    def build_panel(self, ax: Any) -> CertificatePanel:
        ax.clear()
        (line,) = ax.plot([], [], "o-", color="tab:red", ms=3, label="shadow image, target")
        natural = ax.axhline(0.0, color="tab:blue", ls="--", label="natural image, true label")
        ax.set_ylabel("certified L2 radius")
        return CertificatePanel(line, natural)

    def draw_panel(self, panel: CertificatePanel, ax: Any, certificate: Sequence[Mapping[str, Any]],
                   natural: Mapping[str, Any]) -> str:
        steps = [c["step"] for c in certificate]
        values = [c["spoofed_radius"] for c in certificate]
        panel.line.set_data(steps, values)
        panel.natural.set_ydata([natural["radius"]] * 2)
        ax.set_ylim(0, 1.15 * max([natural["radius"], *values, 0.05]))
        return "spoofed certificate" + (f": r = {values[-1]:.2f}" if values else "")

    def status_text(self, natural: Mapping[str, Any], last: Mapping[str, Any] | None) -> str:
        text = f"natural radius {natural['radius']:.3f}"
        if last is not None:
            text += f", shadow radius {last['spoofed_radius']:.3f}"
        return text


class CrownIbpAdapter(DefenseAdapter):
    """A CROWN-IBP network (Zhang et al.): certificates are lower bounds of the margins over the eps-ball."""

    kind, checkpoint_defense, parameter = "crown-ibp", "crown-ibp", "eps"
    color_term = False   # the authors' CROWN-IBP variant has no colour term

    @classmethod
    def check(cls, defense: Defense) -> None:
        if not (defense.eps is not None and defense.eps >= 0):
            raise ValueError(f"defense {defense.name!r}: CROWN-IBP needs eps >= 0, got eps={defense.eps!r}")

    @classmethod
    def describe(cls, defense: Defense) -> str:
        return f"CROWN-IBP, eps={defense.eps * 255:.3g}/255 ({defense.name})"

    def paper_config(self, **settings: Any) -> Any:
        return ShadowConfig.paper_crown_ibp(**settings)

    def objective(self) -> Objective:
        return BoundObjective(self.defense.model, float(self.defense.eps), num_classes=self.settings.num_classes)

    def _margins(self, x: torch.Tensor, label: int) -> list[float]:
        """Certified lower bounds of z_label - z_j (j != label) over the eps-ball (``bounds.certified_margins``)."""
        s = self.settings
        model = self.defense.model.to(s.device).eval()
        x = x.to(s.device)
        spec = margin_spec(torch.full((x.shape[0],), int(label), device=s.device), s.num_classes)
        return certified_margins(model, x, float(self.defense.eps), spec)[0].tolist()

    def natural_certificate(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        lb = self._margins(x, int(y))
        return {"margins": lb, "certified": bool(min(lb) >= 0)}

    def record_certificate(self, x_shadow: torch.Tensor, target: int) -> dict[str, Any]:
        lb = self._margins(x_shadow, target)
        return {"margins": lb, "certified": bool(min(lb) >= 0)}

    def build_panel(self, ax: Any) -> CertificatePanel:
        ax.clear()
        faint = [ax.plot([], [], color="tab:red", alpha=0.3, lw=0.8)[0] for _ in range(self.settings.num_classes - 1)]
        (line,) = ax.plot([], [], "o-", color="tab:red", ms=3, label="min target margin")
        natural = ax.axhline(0.0, color="tab:blue", ls="--", label="natural, true label (min)")
        ax.axhline(0.0, color="k", lw=0.8)
        ax.set_ylabel("certified lower bound")
        return CertificatePanel(line, natural, faint)

    def draw_panel(self, panel: CertificatePanel, ax: Any, certificate: Sequence[Mapping[str, Any]],
                   natural: Mapping[str, Any]) -> str:
        steps = [c["step"] for c in certificate]
        margins = np.array([c["margins"] for c in certificate]).reshape(len(steps), self.settings.num_classes - 1)
        for k, line in enumerate(panel.faint):
            line.set_data(steps, margins[:, k] if len(steps) else [])
        panel.line.set_data(steps, margins.min(1) if len(steps) else [])
        nat = min(natural["margins"])
        panel.natural.set_ydata([nat] * 2)
        lo = min([nat, 0.0, *(margins.min(1) if len(steps) else [])])
        hi = max([nat, 0.0, *(margins.max(1) if len(steps) else [])])
        pad = 0.08 * (hi - lo) + 1e-3
        ax.set_ylim(lo - pad, hi + pad)
        return "target margins (≥ 0: certified)"

    def status_text(self, natural: Mapping[str, Any], last: Mapping[str, Any] | None) -> str:
        text = f"natural certified: {natural['certified']}"
        if last is not None:
            text += f", shadow certified as target: {last['certified']}"
        return text


ADAPTERS: dict[str, type[DefenseAdapter]] = {a.kind: a for a in (SmoothingAdapter, CrownIbpAdapter)}
KINDS = tuple(ADAPTERS)   # ("smoothing", "crown-ibp")
