"""The Shadow Attack lab's figure: natural image, amplified perturbation, shadow image, certificate, loss curves.

``LabFigure`` builds a matplotlib figure once and afterwards only changes its artists' data (a full re-layout
costs about ten times more), then renders it as a PNG into an ``ipywidgets.Image`` (``widget``), which updates live
in JupyterLab and works headless. The certificate panel (top right) is drawn by the defense's adapter
(``DefenseAdapter.build_panel`` / ``draw_panel``) and rebuilt when the kind of defense changes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from shadowlab import plots
from shadowlab.lab.adapters import CertificatePanel, DefenseAdapter

LOSS_TERMS = ("classification", "total")
REGULARISERS = ("color", "tv", "dissim", "l2")


class LabFigure:
    """The lab's 2 x 4 figure for images of size ``hw`` (H, W), rendered at ``dpi`` into ``widget``."""

    def __init__(self, hw: tuple[int, int], dpi: int = 72) -> None:
        import ipywidgets as w  # optional dependency (ipywidgets)
        from matplotlib.figure import Figure  # start-up cost (matplotlib)

        self.dpi = dpi
        self.widget = w.Image(format="png", layout=w.Layout(width="100%", max_width="900px"))
        self.fig = Figure(figsize=(11, 5.4))
        grid = self.fig.add_gridspec(2, 4, height_ratios=[1, 1.1], left=0.05, right=0.985, bottom=0.09, top=0.94,
                                     wspace=0.32, hspace=0.42)
        self.ax_natural, self.ax_delta, self.ax_shadow = (self.fig.add_subplot(grid[0, k]) for k in range(3))
        self.ax_cert = self.fig.add_subplot(grid[0, 3])
        self.ax_loss = self.fig.add_subplot(grid[1, :2])
        self.ax_reg = self.fig.add_subplot(grid[1, 2:])
        blank = np.full((*hw, 3), 0.5)
        self._images = {}
        for key, ax in (("natural", self.ax_natural), ("delta", self.ax_delta), ("shadow", self.ax_shadow)):
            ax.set_xticks([])
            ax.set_yticks([])
            self._images[key] = ax.imshow(blank, interpolation="nearest", vmin=0, vmax=1)
        self._lines = {}
        for ax, keys, title in ((self.ax_loss, LOSS_TERMS, "classification loss and total objective (log)"),
                                (self.ax_reg, REGULARISERS, "regularisers (unweighted, log scale)")):
            for k in keys:
                (self._lines[k],) = ax.plot([], [], label=plots.TERM_TITLES.get(k, k), lw=1.5)
            ax.set_yscale("log")
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("SGD step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="upper right")
        self._placeholder = self.ax_loss.text(0.5, 0.5, "press Run", ha="center", va="center",
                                              transform=self.ax_loss.transAxes, color="grey")
        self._panel: CertificatePanel | None = None
        self._panel_adapter: type[DefenseAdapter] | None = None

    def draw(self, x: torch.Tensor, shadow: torch.Tensor, titles: tuple[str, str], history: Mapping[str, Any],
             steps: int, adapter: DefenseAdapter, certificate: Sequence[Mapping[str, Any]],
             natural: Mapping[str, Any]) -> None:
        """Redraw everything and render the PNG into ``widget``.

        ``x`` and ``shadow.attack`` are 3 x H x W images, ``titles`` the natural image's class and the target's name,
        ``history`` the loss terms per step (with "step"), ``steps`` the run's length (x range), ``certificate``
        the recorded certificates and ``natural`` the natural image's, both drawn by ``adapter``.
        """
        delta = shadow - x
        gain = 0.5 / max(float(delta.abs().max()), 1e-12)
        for key, img, title in (("natural", x, f"natural: {titles[0]}"),
                                ("delta", plots.visible_perturbation(delta), f"perturbation ×{gain:.3g}"),
                                ("shadow", shadow, f"shadow image → target {titles[1]}")):
            self._images[key].set_data(plots._as_hwc(img))
            self._images[key].axes.set_title(title, fontsize=9)
        step = np.asarray(history.get("step", []), dtype=float)
        xmax = max(steps - 1, 1)
        for ax, keys in ((self.ax_loss, LOSS_TERMS), (self.ax_reg, REGULARISERS)):
            finite = False
            for k in keys:
                v = np.asarray(history.get(k, []), dtype=float)
                v = np.where(v > 0, v, np.nan)          # log scale
                self._lines[k].set_data(step, v)
                finite = finite or bool(np.isfinite(v).any())
            ax.set_xlim(-0.5, xmax + 0.5)
            if finite:
                ax.relim()
                ax.autoscale_view(scalex=False)
        self._placeholder.set_visible(len(step) == 0)
        if self._panel is None or self._panel_adapter is not type(adapter):
            self._panel = self._build_panel(adapter)
        title = adapter.draw_panel(self._panel, self.ax_cert, certificate, natural)
        self.ax_cert.set_xlim(-0.5, xmax + 0.5)
        self.ax_cert.set_title(title, fontsize=9)
        self.widget.value = self.png()

    def _build_panel(self, adapter: DefenseAdapter) -> CertificatePanel:
        panel = adapter.build_panel(self.ax_cert)
        self.ax_cert.set_xlabel("SGD step")
        self.ax_cert.grid(alpha=0.3)
        self.ax_cert.legend(fontsize=7, loc="best")
        self._panel_adapter = type(adapter)
        return panel

    def png(self) -> bytes:
        """The figure as PNG bytes."""
        return plots.figure_png(self.fig, self.dpi)
