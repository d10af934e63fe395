"""Interactive lesson widgets: the Shadow Attack lab (paper eq. 2, live) and small helpers shared by the notebooks.

``ShadowLab`` puts ipywidgets controls (lambda_c, lambda_tv, lambda_s on log sliders, steps, lr, channels, image,
target, defense) next to a figure that is redrawn *during* the optimisation through the attack's
``callback(step, record)``: every loss term, the natural image, the amplified perturbation, the shadow image and
the spoofed certificate as it forms (smoothing: the certified radius of the current shadow image from a quick
CERTIFY every few steps against the natural image's radius; CROWN-IBP: certified lower bounds of the target
margins). The figure is a PNG in an ``ipywidgets.Image``, so it updates live in JupyterLab whether the attack was
started by the Run button or by ``ShadowLab.run()`` in a cell, and the same code runs headless (papermill, nbval,
tests) where nothing is clicked.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from . import plots
from .bounds import margin_lower_bounds as certified_margins
from .checkpoints import resolve as resolve_checkpoint
from .data import CLASSES, load_test_images
from .evaluate import accuracy_vs_eps
from .models import default_device
from .perception import MIN_SSIM, quantize, shadow_success, ssim

# lesson helpers that live in the modules named for what they do, importable from here as the notebooks do
__all__ = ["accuracy_vs_eps", "certified_margins", "load_test_images", "resolve_checkpoint"]

KINDS = ("smoothing", "crown-ibp")
CONTROLS = ("lambda_c", "lambda_tv", "lambda_s", "steps", "lr", "channels", "image", "target", "defense")
LOSS_TERMS = ("classification", "total")
REGULARISERS = ("color", "tv", "dissim", "l2")


# ----------------------------------------------------------------------------------------------- lesson helpers
def lesson_setup(device: str | torch.device | None = "auto", seed: int = 0, dpi: int = 90) -> torch.device:
    """Common first cell of every lesson: pick the device ("auto" = CUDA if available), seed torch, set figure dpi."""
    import matplotlib

    dev = default_device() if device in (None, "auto") else torch.device(device)
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r} must be an integer >= 0")
    torch.manual_seed(seed)
    matplotlib.rcParams["figure.dpi"] = dpi
    return dev


def sweep(run: Callable[[Any], Any], base: Any, grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Run ``run(config)`` for every combination of ``grid`` (field -> values) applied to the dataclass ``base``.

    Returns one record per combination: the field values plus "result" (whatever ``run`` returned).
    """
    if not grid:
        raise ValueError("grid is empty; pass {field: [values, ...]}")
    names = list(grid)
    fields = {f.name for f in dataclasses.fields(base)}
    unknown = [n for n in names if n not in fields]
    if unknown:
        raise ValueError(f"grid fields {unknown} are not fields of {type(base).__name__}; accepted: {sorted(fields)}")
    records = []
    for combo in itertools.product(*(grid[n] for n in names)):
        cfg = dataclasses.replace(base, **dict(zip(names, combo)))
        records.append({**dict(zip(names, combo)), "result": run(cfg)})
    return records


def most_likely_wrong(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per image, the wrong class with the largest logit: the easiest target for a shadow attack (LongTensor B)."""
    dev = next(model.parameters()).device
    with torch.no_grad():
        logits = model.eval()(x.to(dev)).clone()
    logits[torch.arange(len(y), device=dev), y.to(dev)] = -math.inf
    return logits.argmax(1).cpu()


class LiveLossPlot:
    """A loss-curve figure that redraws itself while an optimisation runs: pass the object as ``callback``.

    Records are (step, dict of floats); keys not in ``keys`` are ignored. Inside a notebook the figure is shown
    with a display handle and updated in place every ``every`` steps (static in papermill output, live in
    JupyterLab); outside a notebook it only collects the history.
    """

    def __init__(self, keys: Sequence[str], every: int = 5, logy: bool = False, title: str | None = None,
                 ylabel: str = "loss", figsize: tuple[float, float] = (5.5, 3.2), dpi: int = 80,
                 display: bool = True) -> None:
        from matplotlib.figure import Figure

        if not keys:
            raise ValueError("keys is empty; name the record entries to plot")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every={every!r} must be an integer >= 1")
        self.keys, self.every, self.logy, self.title = list(keys), every, logy, title
        self.ylabel, self.dpi = ylabel, dpi
        self.history: dict[str, list[float]] = {k: [] for k in self.keys}
        self.steps: list[int] = []
        self.renders = 0
        self.fig = Figure(figsize=figsize, layout="constrained")
        self.ax = self.fig.add_subplot()
        self._handle = None
        if display:
            try:
                from IPython import get_ipython
                from IPython.display import display as ipy_display

                if get_ipython() is not None:
                    self._handle = ipy_display(self._image(), display_id=True)
            except ImportError:  # pragma: no cover - IPython is a dependency of ipywidgets
                self._handle = None

    def _image(self) -> Any:
        from IPython.display import Image

        self.ax.clear()
        plots.plot_loss_curves(self.history, ax=self.ax, keys=self.keys, logy=self.logy, ylabel=self.ylabel,
                               title=self.title, steps=self.steps)
        self.renders += 1
        return Image(plots.figure_png(self.fig, self.dpi))

    def __call__(self, step: int, record: Mapping[str, Any]) -> None:
        self.steps.append(int(step))
        for k in self.keys:
            self.history[k].append(float(record.get(k, math.nan)))
        if self._handle is not None and step % self.every == 0:
            self._handle.update(self._image())

    def finish(self) -> None:
        """Final redraw (call after the optimisation so the last steps are shown)."""
        img = self._image()
        if self._handle is not None:
            self._handle.update(img)

    def reset(self) -> None:
        """Forget the curves (before a new run)."""
        self.history = {k: [] for k in self.keys}
        self.steps = []


# ----------------------------------------------------------------------------------------------- defenses
@dataclass
class Defense:
    """A certified defense the lab attacks: randomized smoothing at ``sigma`` or a CROWN-IBP network at ``eps``."""

    name: str
    kind: str
    model: nn.Module
    sigma: float | None = None
    eps: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r} is unknown; accepted: {', '.join(KINDS)}")
        if self.kind == "smoothing" and not (self.sigma is not None and self.sigma > 0):
            raise ValueError(f"defense {self.name!r}: smoothing needs sigma > 0, got sigma={self.sigma!r}")
        if self.kind == "crown-ibp" and not (self.eps is not None and self.eps >= 0):
            raise ValueError(f"defense {self.name!r}: CROWN-IBP needs eps >= 0, got eps={self.eps!r}")

    @property
    def label(self) -> str:
        if self.kind == "smoothing":
            return f"randomized smoothing, sigma={self.sigma:g} ({self.name})"
        return f"CROWN-IBP, eps={self.eps * 255:.3g}/255 ({self.name})"

    @classmethod
    def from_checkpoint(cls, name: str, device: str | torch.device | None = None) -> Defense:
        """Load a committed model by name; its sidecar says smoothing ("gaussian", sigma) or CROWN-IBP (eps)."""
        from . import checkpoints

        model, meta = checkpoints.load(name, device=device)
        param = meta.get("defense_parameter", {}) or {}
        if meta.get("defense") == "gaussian":
            return cls(name, "smoothing", model, sigma=float(param["sigma"]))
        if meta.get("defense") == "crown-ibp":
            return cls(name, "crown-ibp", model, eps=float(param["eps"]))
        raise ValueError(f"checkpoint {name!r} has defense={meta.get('defense')!r}; the lab attacks 'gaussian' "
                         "(randomized smoothing) or 'crown-ibp' models")


def default_defense_names(available: Sequence[str] | None = None) -> list[str]:
    """Committed defended models, smoothing first (sigma 0.25 first), then CROWN-IBP."""
    from . import checkpoints

    names = list(available) if available is not None else checkpoints.available()
    smooth = sorted((n for n in names if n.startswith("smooth-")), key=lambda n: (n != "smooth-sigma0.25", n))
    crown = sorted(n for n in names if n.startswith("crownibp-"))
    return smooth + crown


# ----------------------------------------------------------------------------------------------- the lab
class ShadowLab:
    """Interactive Shadow Attack (paper eq. 2) with plots that update during the optimisation.

    Build it from tensors and ``Defense`` objects (tests, custom models) or with ``from_checkpoints`` (lessons).
    Display it in a notebook (it is its own widget), then press Run, or call ``run(**settings)`` from code: both
    take the same path. Settings are the control names in ``CONTROLS``.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, defenses: Sequence[Defense], classes: Sequence[str] = CLASSES,
                 *, lambda_c: float | None = None, lambda_tv: float | None = None, lambda_s: float = 0.5,
                 steps: int = 30, lr: float | None = None, channels: int = 1, image: int = 0, target: int | None = None,
                 noise_samples: int = 32, plot_every: int = 5, certify_every: int = 10, certify_n0: int = 32,
                 certify_n: int = 128, alpha: float = 0.001, seed: int = 0,
                 device: str | torch.device | None = None, dpi: int = 72) -> None:
        import ipywidgets as w

        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3 or x.shape[0] < 1:
            raise ValueError(f"x must be an N x 3 x H x W image batch, got {getattr(x, 'shape', type(x).__name__)}")
        if not isinstance(y, torch.Tensor) or y.shape != (x.shape[0],):
            raise ValueError(f"y must be a label tensor of shape ({x.shape[0]},), got {getattr(y, 'shape', y)}")
        if not defenses:
            raise ValueError("defenses is empty; pass Defense objects (or use ShadowLab.from_checkpoints)")
        for name, value in (("noise_samples", noise_samples), ("plot_every", plot_every),
                            ("certify_every", certify_every), ("certify_n0", certify_n0), ("certify_n", certify_n)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        self.device = torch.device(device) if device is not None else default_device()
        self.x, self.y = x.detach().float().cpu(), y.detach().long().cpu()
        self.classes = list(classes)
        self.defenses = {d.name: d for d in defenses}
        self.noise_samples, self.plot_every, self.certify_every = noise_samples, plot_every, certify_every
        self.certify_n0, self.certify_n, self.alpha, self.seed, self.dpi = certify_n0, certify_n, alpha, seed, dpi
        self.history: dict[str, list[float]] = {}
        self.certificate: list[dict[str, Any]] = []   # quick certificates of the shadow image during the run
        self.result: Any = None
        self.runs = 0
        self.renders = 0
        self._natural_cache: dict[tuple[str, int], dict[str, Any]] = {}
        self._shadow: torch.Tensor | None = None
        self._running = False

        style = {"description_width": "110px"}
        wide = w.Layout(width="360px")
        self.w_defense = w.Dropdown(options=[(d.label, d.name) for d in defenses], description="defense",
                                    style=style, layout=wide)
        self.w_image = w.Dropdown(options=[(f"#{i}: {self.classes[int(c)]}", i) for i, c in enumerate(self.y)],
                                  value=image, description="image", style=style, layout=wide)
        self.w_target = w.Dropdown(description="target (wrong)", style=style, layout=wide)
        self.w_channels = w.ToggleButtons(options=[("1 channel", 1), ("3 channels", 3)], value=channels,
                                          description="perturbation", style={**style, "button_width": "100px"})
        self.w_lambda_c = w.FloatLogSlider(value=1.0, base=10, min=-4, max=2, step=0.001, description="λ_c (color)",
                                           style=style, layout=wide, readout_format=".3g")
        self.w_lambda_tv = w.FloatLogSlider(value=0.3, base=10, min=-4, max=2, step=0.001, description="λ_tv (TV)",
                                            style=style, layout=wide, readout_format=".3g")
        self.w_lambda_s = w.FloatLogSlider(value=lambda_s, base=10, min=-4, max=2, step=0.001,
                                           description="λ_s (dissim)", style=style, layout=wide, readout_format=".3g")
        self.w_steps = w.IntSlider(value=steps, min=1, max=300, step=1, description="SGD steps", style=style,
                                   layout=wide)
        self.w_lr = w.FloatLogSlider(value=0.1, base=10, min=-3, max=1, step=0.001, description="step size lr",
                                     style=style, layout=wide, readout_format=".3g")
        self.w_min_ssim = w.FloatSlider(value=MIN_SSIM, min=0.5, max=1.0, step=0.01, description="min SSIM",
                                        style=style, layout=wide, readout_format=".2f")
        self.w_run = w.Button(description="Run", button_style="primary", icon="play")
        self.w_status = w.HTML(value="ready: press Run")
        self.w_figure = w.Image(format="png", layout=w.Layout(width="100%", max_width="900px"))
        self._cfg: Any = None
        self._build_figure()
        self._apply_paper_settings()
        for name, value in (("lambda_c", lambda_c), ("lambda_tv", lambda_tv), ("lr", lr)):
            if value is not None:
                self._set(name, value)
        self._update_targets(target)
        self._sync_enabled()
        self.w_image.observe(lambda _: (self._update_targets(), self._reset_view()), names="value")
        self.w_target.observe(lambda _: self._reset_view(), names="value")
        self.w_defense.observe(lambda _: (self._apply_paper_settings(), self._reset_view()), names="value")
        self.w_channels.observe(lambda _: self._sync_enabled(), names="value")
        self.w_run.on_click(lambda _: self.run())
        self._redraw()
        controls = w.VBox([self.w_defense, self.w_image, self.w_target, self.w_channels, self.w_lambda_c,
                           self.w_lambda_tv, self.w_lambda_s, self.w_steps, self.w_lr, self.w_min_ssim,
                           w.HBox([self.w_run, self.w_status])])
        self.widget = w.VBox([controls, self.w_figure], layout=w.Layout(border="1px solid #ddd", padding="6px"))
        self.widget.add_class("shadowlab-widget")

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_checkpoints(cls, names: Sequence[str] | None = None, n_images: int = 10, source: str = "auto",
                         device: str | torch.device | None = None, **kwargs: Any) -> ShadowLab:
        """Lab over the first ``n_images`` CIFAR-10 test images (one per class first) and committed defenses."""
        from . import checkpoints
        from .data import load_cifar10

        names = list(names) if names is not None else default_defense_names()
        if not names:
            raise ValueError(f"no defended checkpoints in {checkpoints.models_dir()}: expected "
                             "smooth-sigma*.safetensors or crownibp-*.safetensors (train them with `make models`)")
        x, y, classes = load_cifar10("test", n=n_images, source=source)
        return cls(x, y, [Defense.from_checkpoint(n, device=device) for n in names], classes, device=device, **kwargs)

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        """Shown as its widget when it is the value of a notebook cell."""
        return self.widget._repr_mimebundle_(**kwargs)

    @property
    def defense(self) -> Defense:
        return self.defenses[self.w_defense.value]

    def _widget_of(self, name: str) -> Any:
        return getattr(self, f"w_{name}")

    def _update_targets(self, preferred: int | None = None) -> None:
        i = self.w_image.value
        true = int(self.y[i])
        options = [(f"{k}: {c}", k) for k, c in enumerate(self.classes) if k != true]
        if preferred is None:
            preferred = self.w_target.value if self.w_target.value not in (None, true) else self._likely_target(i)
        if preferred == true or not 0 <= preferred < len(self.classes):
            raise ValueError(f"target={preferred!r} must be a wrong class of image {i} (label {true}): "
                             f"one of {[k for _, k in options]}")
        self.w_target.options = options
        self.w_target.value = preferred

    def _likely_target(self, i: int) -> int:
        """Default target: the wrong class the base model ranks highest on the natural image."""
        model = self.defense.model.to(self.device)
        return int(most_likely_wrong(model, self.x[i:i + 1], self.y[i:i + 1])[0])

    def _apply_paper_settings(self) -> None:
        """Load the chosen defense's paper settings (shadow.ShadowConfig.paper_*) into lambda_c, lambda_tv and lr."""
        from .shadow import ShadowConfig

        if self.defense.kind == "crown-ibp":
            cfg = ShadowConfig.paper_crown_ibp()
            self.w_lambda_c.value = 10 ** self.w_lambda_c.min  # the CROWN-IBP variant has no colour term
        else:
            cfg = ShadowConfig.paper_smoothing()
            self.w_lambda_c.value = cfg.lambda_c
        self.w_lambda_tv.value, self.w_lr.value = cfg.lambda_tv, cfg.lr

    def _reset_view(self) -> None:
        """Forget the previous run's curves and images (new image, target or defense) and redraw."""
        if self._running:
            return
        self.history, self.certificate, self._shadow = {}, [], None
        self._redraw()

    def _sync_enabled(self) -> None:
        self.w_lambda_s.disabled = self.w_channels.value == 1  # 1-channel attack: Dissim is 0 by construction

    def config(self) -> Any:
        """The ShadowConfig the controls describe (paper defaults for the chosen defense otherwise)."""
        from .shadow import ShadowConfig

        common = dict(lambda_c=float(self.w_lambda_c.value), lambda_tv=float(self.w_lambda_tv.value),
                      lambda_s=float(self.w_lambda_s.value) if self.w_channels.value == 3 else 0.0,
                      steps=int(self.w_steps.value), lr=float(self.w_lr.value), channels=int(self.w_channels.value),
                      seed=self.seed, min_ssim=float(self.w_min_ssim.value))
        if self.defense.kind == "crown-ibp":
            if self.w_lambda_c.value <= 10 ** self.w_lambda_c.min:
                common["lambda_c"] = 0.0
            return ShadowConfig.paper_crown_ibp(**common)
        return ShadowConfig.paper_smoothing(noise_samples=self.noise_samples, **common)

    # ------------------------------------------------------------------ certificates
    def _natural(self) -> dict[str, Any]:
        """Certificate of the natural image for its true label (cached per defense and image)."""
        d, i = self.defense, self.w_image.value
        key = (d.name, i)
        if key not in self._natural_cache:
            x, y = self.x[i:i + 1], self.y[i:i + 1]
            if d.kind == "smoothing":
                cert = self._certify(x)
                ok = cert["prediction"] == int(y)
                self._natural_cache[key] = {**cert, "radius": cert["radius"] if ok else 0.0, "certified": ok}
            else:
                lb = self._margins(x, int(y))
                self._natural_cache[key] = {"margins": lb, "certified": bool(min(lb) >= 0)}
        return self._natural_cache[key]

    def _certify(self, x: torch.Tensor) -> dict[str, Any]:
        from .smoothing import Smooth

        smooth = Smooth(self.defense.model, len(self.classes), float(self.defense.sigma), device=self.device)
        c = smooth.certify(x, self.certify_n0, self.certify_n, self.alpha, seed=self.seed)[0]
        return {"prediction": c.prediction, "radius": float(c.radius), "pA_lower": float(c.pA_lower)}

    def _margins(self, x: torch.Tensor, label: int) -> list[float]:
        """Certified lower bounds of z_label - z_j (j != label) over the eps-ball (see certified_margins)."""
        model = self.defense.model.to(self.device).eval()
        return certified_margins(model, x, label, float(self.defense.eps), len(self.classes))[0].tolist()

    # ------------------------------------------------------------------ running
    def run(self, **settings: Any) -> Any:
        """Set controls (names in CONTROLS), run the attack with live plots and return the ShadowResult."""
        unknown = [k for k in settings if k not in CONTROLS]
        if unknown:
            raise ValueError(f"unknown settings {unknown}; accepted: {', '.join(CONTROLS)}")
        if self._running:
            return self.result
        for name in ("defense", "image", "channels", "lambda_c", "lambda_tv", "lambda_s", "steps", "lr"):
            if name in settings:
                self._set(name, settings[name])
        if "target" in settings:
            self._update_targets(int(settings["target"]))
        return self._run()

    def _set(self, name: str, value: Any) -> None:
        widget = self._widget_of(name)
        if name in ("defense", "image", "channels"):
            allowed = [v for _, v in widget.options]
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not available; accepted: {allowed}")
        elif name == "steps" and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"steps={value!r} must be an integer in [{widget.min}, {widget.max}]")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name}={value!r} must be a finite number > 0")
        else:
            lo, hi = (widget.min, widget.max) if name == "steps" else (widget.base ** widget.min,
                                                                       widget.base ** widget.max)
            if not lo <= value <= hi:
                raise ValueError(f"{name}={value!r} must lie in [{lo:g}, {hi:g}]")
        widget.value = value

    def _run(self) -> Any:
        from .shadow import attack_crown_ibp, attack_smoothing

        self._running = True
        self.w_run.disabled = True
        self.w_run.description = "Running…"
        try:
            cfg = self.config()
            d, i, t = self.defense, self.w_image.value, int(self.w_target.value)
            self.history = {k: [] for k in (*LOSS_TERMS, *REGULARISERS, "step")}
            self.certificate = []
            self._shadow = None
            self._cfg = cfg
            natural = self._natural()
            self._status(f"running {cfg.steps} steps …", natural)
            x, y, target = self.x[i:i + 1], self.y[i:i + 1], torch.tensor([t])
            if d.kind == "smoothing":
                self.result = attack_smoothing(d.model, float(d.sigma), x, y, cfg, targets=target,
                                               n0=self.certify_n0, n_select=self.certify_n, n=None, alpha=self.alpha,
                                               callback=self._on_step, progress=False, device=self.device,
                                               num_classes=len(self.classes), delta_every=self.plot_every)
            else:
                self.result = attack_crown_ibp(d.model, float(d.eps), x, y, cfg, targets=target,
                                               callback=self._on_step, progress=False, device=self.device,
                                               num_classes=len(self.classes), delta_every=self.plot_every)
            self._shadow = self.result.x_shadow[0].detach().cpu()
            self.runs += 1
            self._redraw()
            self._status("done", natural)
            return self.result
        finally:
            self._running = False
            self.w_run.disabled = False
            self.w_run.description = "Run"

    def _on_step(self, step: int, record: Mapping[str, Any]) -> None:
        for k in (*LOSS_TERMS, *REGULARISERS):
            self.history[k].append(float(record.get(k, math.nan)))
        self.history["step"].append(step)
        if "x_shadow" not in record:
            return
        self._shadow = record["x_shadow"][0, 0].detach().cpu()
        last = step == self._cfg.steps - 1
        due = not self.certificate or step - self.certificate[-1]["step"] >= self.certify_every
        if due or last:
            self._record_certificate(step)
        self._redraw()
        self._status(f"step {step + 1}/{self._cfg.steps}", self._natural())

    def _record_certificate(self, step: int) -> None:
        t = int(self.w_target.value)
        x = quantize(self._shadow[None])
        i = int(self.w_image.value)
        sim = float(ssim(self.x[i:i + 1].cpu(), x)[0])
        if self.defense.kind == "smoothing":
            c = self._certify(x)
            spoofed = c["prediction"] == t
            record = {"step": step, **c, "spoofed_radius": c["radius"] if spoofed else 0.0, "certified": spoofed}
        else:
            lb = self._margins(x, t)
            spoofed = bool(min(lb) >= 0)
            record = {"step": step, "margins": lb, "certified": spoofed}
        # the one definition of success: certified as the target AND imperceptible
        ok = bool(shadow_success(torch.tensor([spoofed]), torch.tensor([sim]), self._cfg.min_ssim)[0])
        self.certificate.append({**record, "ssim": sim, "success": ok})

    # ------------------------------------------------------------------ drawing
    # Artists are created once and only their data change per redraw (a full re-layout costs ~10x more).
    def _build_figure(self) -> None:
        from matplotlib.figure import Figure

        self.fig = Figure(figsize=(11, 5.4))
        grid = self.fig.add_gridspec(2, 4, height_ratios=[1, 1.1], left=0.05, right=0.985, bottom=0.09, top=0.94,
                                     wspace=0.32, hspace=0.42)
        self.ax_natural, self.ax_delta, self.ax_shadow = (self.fig.add_subplot(grid[0, k]) for k in range(3))
        self.ax_cert = self.fig.add_subplot(grid[0, 3])
        self.ax_loss = self.fig.add_subplot(grid[1, :2])
        self.ax_reg = self.fig.add_subplot(grid[1, 2:])
        blank = np.full((*self.x.shape[2:], 3), 0.5)
        self._images = {}
        for key, ax in (("natural", self.ax_natural), ("delta", self.ax_delta), ("shadow", self.ax_shadow)):
            ax.set_xticks([])
            ax.set_yticks([])
            self._images[key] = ax.imshow(blank, interpolation="nearest", vmin=0, vmax=1)
        self._lines = {}
        for ax, keys, logy, title in ((self.ax_loss, LOSS_TERMS, True, "classification loss and total objective (log)"),
                                      (self.ax_reg, REGULARISERS, True, "regularisers (unweighted, log scale)")):
            for k in keys:
                (self._lines[k],) = ax.plot([], [], label=k, lw=1.5)
            if logy:
                ax.set_yscale("log")
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("SGD step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="upper right")
        self._placeholder = self.ax_loss.text(0.5, 0.5, "press Run", ha="center", va="center",
                                              transform=self.ax_loss.transAxes, color="grey")
        self._cert_kind: str | None = None

    def _build_certificate_panel(self) -> None:
        ax = self.ax_cert
        ax.clear()
        kind = self.defense.kind
        if kind == "smoothing":
            self._cert_faint = []
            (self._cert_line,) = ax.plot([], [], "o-", color="tab:red", ms=3, label="shadow image, target")
            self._cert_natural = ax.axhline(0.0, color="tab:blue", ls="--", label="natural image, true label")
            ax.set_ylabel("certified L2 radius")
        else:
            self._cert_faint = [ax.plot([], [], color="tab:red", alpha=0.3, lw=0.8)[0]
                                for _ in range(len(self.classes) - 1)]
            (self._cert_line,) = ax.plot([], [], "o-", color="tab:red", ms=3, label="min target margin")
            self._cert_natural = ax.axhline(0.0, color="tab:blue", ls="--", label="natural, true label (min)")
            ax.axhline(0.0, color="k", lw=0.8)
            ax.set_ylabel("certified lower bound")
        ax.set_xlabel("SGD step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        self._cert_kind = kind

    def _redraw(self) -> None:
        i, t = self.w_image.value, int(self.w_target.value)
        x = self.x[i]
        shadow = self._shadow if self._shadow is not None else x
        names = self.classes
        delta = shadow - x
        gain = 0.5 / max(float(delta.abs().max()), 1e-12)
        for key, img, title in (("natural", x, f"natural: {names[int(self.y[i])]}"),
                                ("delta", plots.visible_perturbation(delta), f"perturbation ×{gain:.3g}"),
                                ("shadow", shadow, f"shadow image → target {names[t]}")):
            self._images[key].set_data(plots._as_hwc(img))
            self._images[key].axes.set_title(title, fontsize=9)
        steps = np.asarray(self.history.get("step", []), dtype=float)
        xmax = max(int(self.w_steps.value) - 1, 1)
        for ax, keys, logy in ((self.ax_loss, LOSS_TERMS, True), (self.ax_reg, REGULARISERS, True)):
            finite = False
            for k in keys:
                v = np.asarray(self.history.get(k, []), dtype=float)
                if logy:
                    v = np.where(v > 0, v, np.nan)
                self._lines[k].set_data(steps, v)
                finite = finite or bool(np.isfinite(v).any())
            ax.set_xlim(-0.5, xmax + 0.5)
            if finite:
                ax.relim()
                ax.autoscale_view(scalex=False)
        self._placeholder.set_visible(len(steps) == 0)
        self._draw_certificate(xmax)
        self.w_figure.value = plots.figure_png(self.fig, self.dpi)
        self.renders += 1

    def _draw_certificate(self, xmax: int) -> None:
        if self._cert_kind != self.defense.kind:
            self._build_certificate_panel()
        ax, natural = self.ax_cert, self._natural()
        steps = [c["step"] for c in self.certificate]
        if self.defense.kind == "smoothing":
            values = [c["spoofed_radius"] for c in self.certificate]
            self._cert_line.set_data(steps, values)
            self._cert_natural.set_ydata([natural["radius"]] * 2)
            ax.set_ylim(0, 1.15 * max([natural["radius"], *values, 0.05]))
            title = "spoofed certificate" + (f": r = {values[-1]:.2f}" if values else "")
        else:
            margins = np.array([c["margins"] for c in self.certificate]).reshape(len(steps), len(self.classes) - 1)
            for k, line in enumerate(self._cert_faint):
                line.set_data(steps, margins[:, k] if len(steps) else [])
            self._cert_line.set_data(steps, margins.min(1) if len(steps) else [])
            nat = min(natural["margins"])
            self._cert_natural.set_ydata([nat] * 2)
            lo = min([nat, 0.0, *(margins.min(1) if len(steps) else [])])
            hi = max([nat, 0.0, *(margins.max(1) if len(steps) else [])])
            pad = 0.08 * (hi - lo) + 1e-3
            ax.set_ylim(lo - pad, hi + pad)
            title = "target margins (≥ 0: certified)"
        ax.set_xlim(-0.5, xmax + 0.5)
        ax.set_title(title, fontsize=9)

    def _status(self, prefix: str, natural: Mapping[str, Any]) -> None:
        h = self.history
        parts = [f"<b>{prefix}</b> (run {self.runs})"]
        if h.get("total"):
            parts.append(f"total {h['total'][-1]:.4g}, classification {h['classification'][-1]:.4g}, "
                         f"C {h['color'][-1]:.3g}, TV {h['tv'][-1]:.3g}, Dissim {h['dissim'][-1]:.3g}")
        cfg = self._cfg
        parts.append(f"λ_c={cfg.lambda_c:.3g}, λ_tv={cfg.lambda_tv:.3g}, λ_s={cfg.lambda_s:.3g}, "
                     f"lr={cfg.lr:.3g}, {cfg.channels} channel(s)")
        if self.defense.kind == "smoothing":
            cert = f"natural radius {natural['radius']:.3f}"
            if self.certificate:
                cert += f", shadow radius {self.certificate[-1]['spoofed_radius']:.3f}"
        else:
            cert = f"natural certified: {natural['certified']}"
            if self.certificate:
                cert += f", shadow certified as target: {self.certificate[-1]['certified']}"
        if self.certificate:
            last = self.certificate[-1]
            cert += (f", SSIM {last['ssim']:.3f} → " + ("<b>success</b>" if last["success"] else
                     "not a success" + (f" (visible: SSIM < {cfg.min_ssim})" if last["certified"] else "")))
        parts.append(cert)
        self.w_status.value = "<span class='shadowlab-status'>" + " · ".join(parts) + "</span>"

    def snapshot(self) -> Any:
        """The current figure as a static IPython Image (kept in papermill output, where widgets are not)."""
        from IPython.display import Image

        return Image(plots.figure_png(self.fig, self.dpi))
