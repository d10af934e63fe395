"""Interactive lesson widgets: the Shadow Attack lab (paper eq. 2, live) and small helpers shared by the notebooks.

``ShadowLab`` puts ipywidgets sliders (lambda_c, lambda_tv, lambda_s on log sliders, steps, lr, channels, image,
target, defense, min SSIM) next to a figure that is redrawn *during* the optimisation through the attack's
``callback(step, record)``: every loss term, the natural image, the amplified perturbation, the shadow image and
the spoofed certificate as it forms (smoothing: the certified radius of the current shadow image from a quick
CERTIFY every few steps against the natural image's radius; CROWN-IBP: certified lower bounds of the target
margins). The figure is a PNG in an ``ipywidgets.Image``, so it updates live in JupyterLab whether the attack was
started by the Run button or by ``ShadowLab.run()`` in a cell, and the same code runs headless (papermill, nbval,
tests) where nothing is clicked.

The lab is assembled from three modules: ``lab.sliders`` (the widgets and their rules), ``lab.figure`` (the
figure) and ``lab.adapters`` (``Defense`` and one ``DefenseAdapter`` per kind of defense: everything that differs
between smoothing and CROWN-IBP). What every lesson uses besides the lab is ``lab.notebook``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from shadowlab import checkpoints
from shadowlab.data import CLASSES, load_cifar10
from shadowlab.lab.adapters import (
    Defense,
    DefenseAdapter,
    LabSettings,
    default_defense_names,
)
from shadowlab.lab.figure import LOSS_TERMS, REGULARISERS, LabFigure
from shadowlab.lab.notebook import most_likely_wrong
from shadowlab.lab.sliders import SETTINGS, LabSliders
from shadowlab.models import default_device
from shadowlab.perception import quantize, shadow_success, ssim


def _check_lab_inputs(x: torch.Tensor, y: torch.Tensor, defenses: Sequence[Defense], **counts: int) -> None:
    """ShadowLab's arguments: x N x 3 x H x W (N >= 1), y of shape (N,), defenses not empty, counts integers >= 1."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3 or x.shape[0] < 1:
        raise ValueError(f"x must be an N x 3 x H x W image batch, got {getattr(x, 'shape', type(x).__name__)}")
    if not isinstance(y, torch.Tensor) or y.shape != (x.shape[0],):
        raise ValueError(f"y must be a label tensor of shape ({x.shape[0]},), got {getattr(y, 'shape', y)}")
    if not defenses:
        raise ValueError("defenses is empty; pass Defense objects (or use ShadowLab.from_checkpoints)")
    for name, value in counts.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an integer >= 1")


# ----------------------------------------------------------------------------------------------- the lab
class ShadowLab:
    """Interactive Shadow Attack (paper eq. 2) with plots that update during the optimisation.

    Build it from tensors and ``Defense`` objects (tests, custom models) or with ``from_checkpoints`` (lessons).
    Display it in a notebook (it is its own widget), then press Run, or call ``run(**settings)`` from code: both
    take the same path. Settings are the names in ``sliders.SETTINGS``.

    The lab is three parts: its sliders (``sliders``, a ``LabSliders``; their widgets are reachable as the
    lab's ``w_<name>`` attributes), its figure (``figure``, a ``LabFigure``) and one ``DefenseAdapter`` per
    defense (``adapter``: attack, certificates, certificate panel and status wording for that kind of defense).
    ``history`` holds the loss terms per step and ``certificate`` the quick certificates of the shadow image taken
    during the run (each with "step", "certified", "ssim" and "success" = ``perception.shadow_success``).

    Args:
        x: N x 3 x H x W images in [0, 1] (N >= 1) the image slider picks from; y: their N labels.
        defenses: the ``Defense`` objects the defense menu offers (smoothed classifiers, CROWN-IBP networks).
        classes: the class names shown.
        lambda_c, lambda_tv, lambda_s, steps, lr, channels, image, target: the sliders' starting values (None: the
            chosen defense's paper setting, ``ShadowConfig.paper_smoothing`` / ``paper_crown_ibp``).
        noise_samples: Gaussian copies per attack step (smoothing).
        plot_every: steps between figure redraws; certify_every: steps between the quick certificates.
        certify_n0, certify_n, alpha: the quick CERTIFY's samples and failure probability (smoothing).
        seed: the attack's and the quick certificates' seed; device: where the attack runs (default CUDA when
            available); dpi: the figure's resolution.

    ValueError names a bad argument (images not N x 3 x H x W, labels of another length, no defenses, a count < 1).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, defenses: Sequence[Defense], classes: Sequence[str] = CLASSES,
                 *, lambda_c: float | None = None, lambda_tv: float | None = None, lambda_s: float = 0.5,
                 steps: int = 30, lr: float | None = None, channels: int = 1, image: int = 0, target: int | None = None,
                 noise_samples: int = 32, plot_every: int = 5, certify_every: int = 10, certify_n0: int = 32,
                 certify_n: int = 128, alpha: float = 0.001, seed: int = 0,
                 device: str | torch.device | None = None, dpi: int = 72) -> None:
        import ipywidgets as w  # optional dependency (ipywidgets)

        _check_lab_inputs(x, y, defenses, noise_samples=noise_samples, plot_every=plot_every,
                          certify_every=certify_every, certify_n0=certify_n0, certify_n=certify_n)
        self.device = torch.device(device) if device is not None else default_device()
        self.x, self.y = x.detach().float().cpu(), y.detach().long().cpu()
        self.classes = list(classes)
        self.defenses = {d.name: d for d in defenses}
        self.noise_samples, self.plot_every, self.certify_every = noise_samples, plot_every, certify_every
        self.certify_n0, self.certify_n, self.alpha, self.seed, self.dpi = certify_n0, certify_n, alpha, seed, dpi
        settings = LabSettings(self.device, len(self.classes), noise_samples, plot_every, certify_n0, certify_n,
                               alpha, seed)
        self.adapters = {d.name: d.adapter(settings) for d in defenses}
        self.history: dict[str, list[float]] = {}
        self.certificate: list[dict[str, Any]] = []   # quick certificates of the shadow image during the run
        self.result: Any = None
        self.runs = 0
        self.renders = 0
        self._natural_cache: dict[tuple[str, int], dict[str, Any]] = {}
        self._shadow: torch.Tensor | None = None
        self._running = False
        self._cfg: Any = None

        self.sliders = LabSliders(self.y, self.classes, defenses, image=image, channels=channels, lambda_s=lambda_s,
                                  steps=steps)
        self.figure = LabFigure(tuple(self.x.shape[2:]), dpi)
        self.w_figure = self.figure.widget
        c = self.sliders
        c.apply_paper_settings(self.adapter)
        for name, value in (("lambda_c", lambda_c), ("lambda_tv", lambda_tv), ("lr", lr)):
            if value is not None:
                c.set(name, value)
        self._update_targets(target)
        c.sync_enabled()
        c.w_image.observe(lambda _: (self._update_targets(), self._reset_view()), names="value")
        c.w_target.observe(lambda _: self._reset_view(), names="value")
        c.w_defense.observe(lambda _: (c.apply_paper_settings(self.adapter), self._reset_view()), names="value")
        c.w_channels.observe(lambda _: c.sync_enabled(), names="value")
        c.w_run.on_click(lambda _: self.run())
        self._redraw()
        self.widget = w.VBox([c.box(), self.w_figure], layout=w.Layout(border="1px solid #ddd", padding="6px"))
        self.widget.add_class("shadowlab-widget")

    @classmethod
    def from_checkpoints(cls, names: Sequence[str] | None = None, n_images: int = 10, source: str = "auto",
                         device: str | torch.device | None = None, **kwargs: Any) -> ShadowLab:
        """Lab over the first ``n_images`` CIFAR-10 test images and committed defenses.

        Args:
            names: checkpoint names (default ``adapters.default_defense_names()``: the committed smoothing and
                CROWN-IBP models).
            n_images: test images to offer; source: where they come from (``data.load_cifar10``).
            device: where the attack runs; kwargs: the constructor's keyword arguments (starting values).
        """
        names = list(names) if names is not None else default_defense_names()
        if not names:
            raise ValueError(f"no defended checkpoints in {checkpoints.models_dir()}: expected "
                             "smooth-sigma*.safetensors or crownibp-*.safetensors (train them with `make models`)")
        x, y, classes = load_cifar10("test", n=n_images, source=source)
        return cls(x, y, [Defense.from_checkpoint(n, device=device) for n in names], classes, device=device, **kwargs)

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        """Shown as its widget when it is the value of a notebook cell."""
        return self.widget._repr_mimebundle_(**kwargs)

    def __getattr__(self, name: str) -> Any:
        """The sliders' widgets as the lab's own attributes: ``lab.w_lambda_tv`` is ``lab.sliders.w_lambda_tv``."""
        if name.startswith("w_") and "sliders" in self.__dict__:
            return getattr(self.__dict__["sliders"], name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def defense(self) -> Defense:
        """The defense chosen in the dropdown."""
        return self.defenses[self.sliders.w_defense.value]

    @property
    def adapter(self) -> DefenseAdapter:
        """The chosen defense's adapter."""
        return self.adapters[self.sliders.w_defense.value]

    @property
    def fig(self) -> Any:
        """The matplotlib figure (``figure.fig``)."""
        return self.figure.fig

    def _update_targets(self, preferred: int | None = None) -> None:
        self.sliders.update_targets(self._likely_target, preferred)

    def _likely_target(self, i: int) -> int:
        """Default target: the wrong class the base model ranks highest on the natural image."""
        model = self.defense.model.to(self.device)
        return int(most_likely_wrong(model, self.x[i:i + 1], self.y[i:i + 1])[0])

    def _reset_view(self) -> None:
        """Forget the previous run's curves and images (new image, target or defense) and redraw."""
        if self._running:
            return
        self.history, self.certificate, self._shadow = {}, [], None
        self._redraw()

    def config(self) -> Any:
        """The ShadowConfig the sliders describe (paper defaults for the chosen defense otherwise)."""
        return self.sliders.config(self.adapter, self.seed)

    # ------------------------------------------------------------------ certificates
    def _natural(self) -> dict[str, Any]:
        """Certificate of the natural image for its true label (cached per defense and image)."""
        i = self.sliders.w_image.value
        key = (self.defense.name, i)
        if key not in self._natural_cache:
            self._natural_cache[key] = self.adapter.natural_certificate(self.x[i:i + 1], self.y[i:i + 1])
        return self._natural_cache[key]

    def _record_certificate(self, step: int) -> None:
        """Certify the current (8-bit) shadow image for the target; judge success by the one definition."""
        t, i = int(self.sliders.w_target.value), int(self.sliders.w_image.value)
        x = quantize(self._shadow[None])
        sim = float(ssim(self.x[i:i + 1].cpu(), x)[0])
        record = {"step": step, **self.adapter.record_certificate(x, t)}
        # the one definition of success: certified as the target AND imperceptible
        ok = bool(shadow_success(torch.tensor([record["certified"]]), torch.tensor([sim]), self._cfg.min_ssim)[0])
        self.certificate.append({**record, "ssim": sim, "success": ok})

    # ------------------------------------------------------------------ running
    def run(self, **settings: Any) -> Any:
        """Set the sliders (names in SETTINGS), run the attack with live plots and return the ShadowResult."""
        unknown = [k for k in settings if k not in SETTINGS]
        if unknown:
            raise ValueError(f"unknown settings {unknown}; accepted: {', '.join(SETTINGS)}")
        if self._running:
            return self.result
        for name in ("defense", "image", "channels", "lambda_c", "lambda_tv", "lambda_s", "steps", "lr"):
            if name in settings:
                self.sliders.set(name, settings[name])
        if "target" in settings:
            self._update_targets(int(settings["target"]))
        return self._run()

    def _run(self) -> Any:
        self._running = True
        self.sliders.busy(True)
        try:
            cfg = self.config()
            i, t = self.sliders.w_image.value, int(self.sliders.w_target.value)
            self.history = {k: [] for k in (*LOSS_TERMS, *REGULARISERS, "step")}
            self.certificate = []
            self._shadow = None
            self._cfg = cfg
            natural = self._natural()
            self._status(f"running {cfg.steps} steps …", natural)
            x, y = self.x[i:i + 1], self.y[i:i + 1]
            self.result = self.adapter.attack(x, y, cfg, torch.tensor([t]), self._on_step)
            self._shadow = self.result.x_shadow[0].detach().cpu()
            self.runs += 1
            self._redraw()
            self._status("done", natural)
            return self.result
        finally:
            self._running = False
            self.sliders.busy(False)

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

    # ------------------------------------------------------------------ drawing
    def _redraw(self) -> None:
        i, t = self.sliders.w_image.value, int(self.sliders.w_target.value)
        x = self.x[i]
        shadow = self._shadow if self._shadow is not None else x
        titles = (self.classes[int(self.y[i])], self.classes[t])
        self.figure.draw(x, shadow, titles, self.history, int(self.sliders.w_steps.value), self.adapter,
                         self.certificate, self._natural())
        self.renders += 1

    def _status(self, prefix: str, natural: Mapping[str, Any]) -> None:
        last = self.certificate[-1] if self.certificate else None
        self.sliders.show_status(prefix, self.runs, self.history, self._cfg,
                                  self.adapter.status_text(natural, last), last)

    def snapshot(self) -> Any:
        """The current figure as a static IPython Image (kept in papermill output, where widgets are not)."""
        from IPython.display import Image  # optional dependency (IPython)

        return Image(self.figure.png())
