"""What every lesson notebook uses: the first cell's setup (device, seed, figure size), a grid sweep over a dataclass,
the most likely wrong class per image, and a loss plot that updates while an attack runs."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from shadowlab import plots
from shadowlab.models import default_device


def lesson_setup(device: str | torch.device | None = "auto", seed: int = 0, dpi: int = 90) -> torch.device:
    """Common first cell of every lesson: pick the device ("auto" = CUDA if available), seed torch, set figure dpi."""
    import matplotlib  # start-up cost (matplotlib)

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
        from matplotlib.figure import Figure  # start-up cost (matplotlib)

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
                from IPython import get_ipython  # optional dependency (IPython)
                from IPython.display import display as ipy_display  # optional dependency (IPython)

                if get_ipython() is not None:
                    self._handle = ipy_display(self._image(), display_id=True)
            except ImportError:  # pragma: no cover - IPython is a dependency of ipywidgets
                self._handle = None

    def _image(self) -> Any:
        from IPython.display import Image  # optional dependency (IPython)

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
