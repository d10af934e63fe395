"""The Shadow Attack lab's sliders: the ipywidgets that set eq. 2's weights and the run's settings (log sliders, with
the menus for defense, image and target, the channel toggle, the Run button and the status line).

``LabSliders`` owns the widgets (attributes ``w_<name>`` for every name in ``SETTINGS`` plus ``w_min_ssim``,
``w_run`` and ``w_status``), checks values set from code (``set``), loads a defense's paper settings and turns the
widgets' values into a ``ShadowConfig`` through the defense's adapter (``config``). It knows nothing about how a
defense certifies; that is the adapter's job (``shadowlab.lab.adapters``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from shadowlab.lab.adapters import Defense, DefenseAdapter
from shadowlab.perception import MIN_SSIM

SETTINGS = ("lambda_c", "lambda_tv", "lambda_s", "steps", "lr", "channels", "image", "target", "defense")
CHOICES = ("defense", "image", "channels")    # settings whose value is one of their options


class LabSliders:
    """The lab's widgets and the rules for setting them; ``box`` lays them out above the figure."""

    def __init__(self, y: torch.Tensor, classes: Sequence[str], defenses: Sequence[Defense], *, image: int = 0,
                 channels: int = 1, lambda_s: float = 0.5, steps: int = 30) -> None:
        import ipywidgets as w  # optional dependency (ipywidgets)

        self.y, self.classes = y, list(classes)
        style = {"description_width": "110px"}
        wide = w.Layout(width="360px")
        self.w_defense = w.Dropdown(options=[(d.label, d.name) for d in defenses], description="defense",
                                    style=style, layout=wide)
        self.w_image = w.Dropdown(options=[(f"#{i}: {self.classes[int(c)]}", i) for i, c in enumerate(y)],
                                  value=image, description="image", style=style, layout=wide)
        self.w_target = w.Dropdown(description="target (wrong)", style=style, layout=wide)
        self.w_channels = w.ToggleButtons(options=[("1 channel", 1), ("3 channels", 3)], value=channels,
                                          description="perturbation", style={**style, "button_width": "100px"})
        self.w_lambda_c = w.FloatLogSlider(value=1.0, base=10, min=-4, max=2, step=0.001, description="λ_c (mean |δ|)",
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

    def box(self) -> Any:
        """The widgets in one column, the Run button and the status line on the last row."""
        import ipywidgets as w  # optional dependency (ipywidgets)

        return w.VBox([self.w_defense, self.w_image, self.w_target, self.w_channels, self.w_lambda_c,
                       self.w_lambda_tv, self.w_lambda_s, self.w_steps, self.w_lr, self.w_min_ssim,
                       w.HBox([self.w_run, self.w_status])])

    def widget_of(self, name: str) -> Any:
        """The widget of setting ``name`` (one of SETTINGS)."""
        return getattr(self, f"w_{name}")

    def set(self, name: str, value: Any) -> None:
        """Set ``name`` (not target, see ``update_targets``) from code, checking it as a student cannot.

        Choices must be among the widget's options; steps an integer in the slider's range; the weights and lr
        finite numbers > 0 within the log slider's range. Raises ValueError naming the setting and the range.
        """
        widget = self.widget_of(name)
        if name in CHOICES:
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

    def update_targets(self, likely_target: Callable[[int], int], preferred: int | None = None) -> None:
        """Offer the wrong classes of the chosen image; keep the target, else ``preferred``, else the likely one."""
        i = self.w_image.value
        true = int(self.y[i])
        options = [(f"{k}: {c}", k) for k, c in enumerate(self.classes) if k != true]
        if preferred is None:
            preferred = self.w_target.value if self.w_target.value not in (None, true) else likely_target(i)
        if preferred == true or not 0 <= preferred < len(self.classes):
            raise ValueError(f"target={preferred!r} must be a wrong class of image {i} (label {true}): "
                             f"one of {[k for _, k in options]}")
        self.w_target.options = options
        self.w_target.value = preferred

    def apply_paper_settings(self, adapter: DefenseAdapter) -> None:
        """Load the defense's paper settings (shadow.ShadowConfig.paper_*) into lambda_c, lambda_tv and lr.

        Without a colour term (``adapter.color_term`` False) the lambda_c slider goes to its minimum, which
        ``config`` reads as lambda_c = 0.
        """
        cfg = adapter.paper_config()
        self.w_lambda_c.value = cfg.lambda_c if adapter.color_term else 10 ** self.w_lambda_c.min
        self.w_lambda_tv.value, self.w_lr.value = cfg.lambda_tv, cfg.lr

    def sync_enabled(self) -> None:
        """Disable lambda_s for a 1-channel attack (its Dissim is 0 by construction)."""
        self.w_lambda_s.disabled = self.w_channels.value == 1

    def config(self, adapter: DefenseAdapter, seed: int) -> Any:
        """The ShadowConfig the widgets describe: the defense's paper settings with the widgets' values."""
        settings = dict(lambda_c=float(self.w_lambda_c.value), lambda_tv=float(self.w_lambda_tv.value),
                        lambda_s=float(self.w_lambda_s.value) if self.w_channels.value == 3 else 0.0,
                        steps=int(self.w_steps.value), lr=float(self.w_lr.value),
                        channels=int(self.w_channels.value), seed=seed, min_ssim=float(self.w_min_ssim.value))
        if not adapter.color_term and self.w_lambda_c.value <= 10 ** self.w_lambda_c.min:
            settings["lambda_c"] = 0.0
        return adapter.paper_config(**settings)

    def busy(self, running: bool) -> None:
        """Show the Run button as "Running…" (disabled) or as "Run"."""
        self.w_run.disabled = running
        self.w_run.description = "Running…" if running else "Run"

    def show_status(self, prefix: str, runs: int, history: Mapping[str, Sequence[float]], cfg: Any,
                    certificate_text: str, last: Mapping[str, Any] | None) -> None:
        """Write the status line: the run, the last loss terms, the settings and the certificate with its SSIM."""
        parts = [f"<b>{prefix}</b> (run {runs})"]
        if history.get("total"):
            h = history
            parts.append(f"total {h['total'][-1]:.4g}, classification {h['classification'][-1]:.4g}, "
                         f"C {h['color'][-1]:.3g}, TV {h['tv'][-1]:.3g}, Dissim {h['dissim'][-1]:.3g}")
        parts.append(f"λ_c={cfg.lambda_c:.3g}, λ_tv={cfg.lambda_tv:.3g}, λ_s={cfg.lambda_s:.3g}, "
                     f"lr={cfg.lr:.3g}, {cfg.channels} channel(s)")
        cert = certificate_text
        if last is not None:
            cert += (f", SSIM {last['ssim']:.3f} → " + ("<b>success</b>" if last["success"] else
                     "not a success" + (f" (visible: SSIM < {cfg.min_ssim})" if last["certified"] else "")))
        parts.append(cert)
        self.w_status.value = "<span class='shadowlab-status'>" + " · ".join(parts) + "</span>"
