"""Figures: certified-accuracy curves (more plot helpers live here too)."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from shadowlab.data import CLASSES
from shadowlab.perception import MIN_SSIM

if TYPE_CHECKING:
    from matplotlib.axes import Axes


def plot_certified_accuracy(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], ax: Axes | None = None
                            ) -> Axes:
    """Certified accuracy against L2 radius (Cohen et al. Fig. 1 style step curves), one line per label.

    ``curves`` maps a legend label to (radii, accuracy) as ``smoothing.certified_accuracy_curve`` returns them:
    accuracy[i] holds on (radii[i-1], radii[i]]. The x axis ends at the largest radius. A new figure is created only
    when ``ax`` is None.
    """
    if not curves:
        raise ValueError("curves is empty; pass {label: smoothing.certified_accuracy_curve(records, labels)}")
    if ax is None:
        import matplotlib.pyplot as plt  # start-up cost (matplotlib.pyplot)

        _, ax = plt.subplots(figsize=(5, 3.5), layout="constrained")
    for label, (radii, acc) in curves.items():
        if len(radii) != len(acc) or len(radii) == 0:
            raise ValueError(f"curve {label!r}: radii and accuracy must be non-empty and of the same length")
        ax.step(radii, acc, where="pre", label=label)
    ax.set_xlim(0, max(float(r[-1]) for r, _ in curves.values()))
    ax.set_ylim(0, 1)
    ax.set_xlabel("L2 radius r")
    ax.set_ylabel("certified accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    return ax


def plot_shadow_examples(result: Any, n_images: int = 6):
    """Paper Fig. 1 for every row of a reproduced table: for the first ``n_images`` images (not hand-picked) of each
    sigma / channel mode or model, the natural image, the perturbation (amplified, grey = no change) and the shadow
    image, captioned with its target, radius or margin, SSIM, and whether it counts as a success (certified and
    SSIM >= min_ssim), was spoofed but visible, or failed."""
    import matplotlib.pyplot as plt  # start-up cost (matplotlib.pyplot)

    if not result.examples:
        raise ValueError("result has no examples to plot")
    k = min(n_images, min(len(ex["x"]) for ex in result.examples.values()))
    blocks = list(result.examples.items())
    fig, axes = plt.subplots(3 * len(blocks), k, figsize=(1.55 * k, 1.75 * 3 * len(blocks)), squeeze=False)
    for b, (key, ex) in enumerate(blocks):
        for i in range(k):
            x, xs = ex["x"][i], ex["x_shadow"][i]
            verdict = ("success" if ex["success"][i] else "visible" if ex["spoofed"][i] else "failed")
            top, mid, bot = axes[3 * b, i], axes[3 * b + 1, i], axes[3 * b + 2, i]
            top.imshow(_as_hwc(x), interpolation="nearest")
            top.set_title((f"{key}\n" if i == 0 else "\n") + f"natural: {CLASSES[int(ex['y'][i])]}", fontsize=6.5,
                          loc="left" if i == 0 else "center")
            mid.imshow(_as_hwc(visible_perturbation(xs - x)), interpolation="nearest")
            mid.set_title("perturbation x amp.", fontsize=6.5)
            bot.imshow(_as_hwc(xs), interpolation="nearest")
            bot.set_title(f"{CLASSES[int(ex['target'][i])]} {ex['score_name']}={float(ex['score'][i]):.2f}\n"
                          f"SSIM {float(ex['ssim'][i]):.2f} {verdict}", fontsize=6.5,
                          color="green" if verdict == "success" else "red")
            for ax in (top, mid, bot):
                ax.axis("off")
    fig.tight_layout()
    return fig


def plot_ssim_vs_l2(points: Mapping[str, tuple[Any, Any]], min_ssim: float | None = None, ax: Axes | None = None):
    """SSIM against L2 size, one scatter per kind of perturbation ({label: (l2 values, ssim values)}), with the
    imperceptibility threshold as a dashed line: the l_p critique (an L2 ball is not what a person sees)."""
    if not points:
        raise ValueError("points is empty; pass {label: (l2 values, ssim values)}")
    if ax is None:
        import matplotlib.pyplot as plt  # start-up cost (matplotlib.pyplot)

        _, ax = plt.subplots(figsize=(5.5, 3.8), layout="constrained")
    markers = "os^vD<>xP*"
    for j, (label, (l2, sim)) in enumerate(points.items()):
        ax.scatter(np.asarray(l2, dtype=float), np.asarray(sim, dtype=float), s=12, alpha=0.6, label=label,
                   marker=markers[j % len(markers)])
    threshold = MIN_SSIM if min_ssim is None else min_ssim
    ax.axhline(threshold, color="k", ls="--", lw=1, label=f"min_ssim = {threshold}")
    ax.set_xlabel("||x' - x||_2")
    ax.set_ylabel("SSIM(x, x')")
    ax.set_ylim(min(0.0, ax.get_ylim()[0]), 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return ax.figure


# ----------------------------------------------------------------------------------------------- lesson figures
# Image grids, loss curves, accuracy-against-eps curves and maps used by the notebooks and shadowlab.lab.widgets.
# Every function draws into ``ax`` / ``fig`` when given (so widgets can redraw in place) and returns it.
def _as_hwc(image: Any) -> np.ndarray:
    """One image (C x H x W tensor/array, C in 1 or 3) as an H x W x 3 float array clipped to [0, 1]."""
    arr = image.detach().float().cpu().numpy() if hasattr(image, "detach") else np.asarray(image, dtype=float)
    if arr.ndim != 3 or arr.shape[0] not in (1, 3):
        raise ValueError(f"image must have shape C x H x W with C in (1, 3), got {arr.shape}")
    if arr.shape[0] == 1:
        arr = np.repeat(arr, 3, axis=0)
    return np.clip(arr.transpose(1, 2, 0), 0.0, 1.0)


def visible_perturbation(delta: Any, factor: float | None = None) -> Any:
    """Perturbation made visible, same layout as delta: 0.5 + factor * delta clipped to [0, 1] (grey = no change).

    factor defaults to 0.5 / max|delta| per image, so the largest change of each image spans the full range.
    Works on a C x H x W image or an N x C x H x W batch (torch tensor or numpy array).
    """
    is_torch = hasattr(delta, "detach")
    d = delta.detach().float().cpu() if is_torch else np.asarray(delta, dtype=float)
    batched = d.ndim == 4
    if d.ndim not in (3, 4):
        raise ValueError(f"delta must have shape C x H x W or N x C x H x W, got {tuple(d.shape)}")
    if factor is None:
        flat = abs(d).reshape(d.shape[0], -1) if batched else abs(d).reshape(1, -1)
        peak = flat.max(1).values if is_torch else flat.max(1)
        peak = peak.clamp_min(1e-12) if is_torch else np.maximum(peak, 1e-12)
        scale = 0.5 / peak
        scale = scale.view(-1, 1, 1, 1) if (is_torch and batched) else (
            scale.reshape(-1, 1, 1, 1) if batched else scale[0])
    else:
        if not factor > 0:
            raise ValueError(f"factor={factor!r} must be > 0 or None")
        scale = factor
    out = 0.5 + scale * d
    return out.clamp(0.0, 1.0) if is_torch else np.clip(out, 0.0, 1.0)


def show_images(images: Sequence[Any] | Any, titles: Sequence[str] | None = None, ncols: int | None = None,
                axes: Sequence[Axes] | None = None, size: float = 1.7, suptitle: str | None = None) -> Any:
    """A grid of images (N x C x H x W batch or a list of C x H x W images) with optional titles; returns the axes."""
    imgs = [images[i] for i in range(len(images))]
    if not imgs:
        raise ValueError("images is empty")
    if titles is not None and len(titles) != len(imgs):
        raise ValueError(f"titles has {len(titles)} entries but there are {len(imgs)} images")
    if axes is None:
        import matplotlib.pyplot as plt  # start-up cost (matplotlib.pyplot)

        ncols = ncols or min(len(imgs), 8)
        nrows = -(-len(imgs) // ncols)
        fig, grid = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + (0.3 if suptitle else 0)),
                                 squeeze=False)
        axes = list(grid.ravel())
        if suptitle:
            fig.suptitle(suptitle)
    axes = list(axes)
    for i, ax in enumerate(axes):
        ax.clear()
        ax.axis("off")
        if i < len(imgs):
            ax.imshow(_as_hwc(imgs[i]), interpolation="nearest")
            if titles is not None:
                ax.set_title(titles[i], fontsize=8)
    return axes


def plot_perturbations(x: Any, x_adv: Any, labels: Sequence[str] | None = None,
                       adv_labels: Sequence[str] | None = None, factor: float | None = None,
                       row_titles: Sequence[str] = ("natural", "perturbation (amplified)", "perturbed"),
                       size: float = 1.7) -> Any:
    """Three rows per batch: natural images, amplified perturbations x_adv - x, perturbed images; returns the figure."""
    import matplotlib.pyplot as plt  # start-up cost (matplotlib.pyplot)

    if tuple(x.shape) != tuple(x_adv.shape) or len(x.shape) != 4:
        raise ValueError(f"x and x_adv must be N x C x H x W batches of the same shape, got {tuple(x.shape)} "
                         f"and {tuple(x_adv.shape)}")
    n = x.shape[0]
    fig, grid = plt.subplots(3, n, figsize=(size * n + 0.9, size * 3 + 0.2), squeeze=False)
    show_images(x, labels, axes=grid[0])
    show_images(visible_perturbation(x_adv - x, factor), axes=grid[1])
    show_images(x_adv, adv_labels, axes=grid[2])
    for row, title in zip(grid, row_titles):
        row[0].axis("on")
        row[0].set_xticks([])
        row[0].set_yticks([])
        for side in row[0].spines.values():
            side.set_visible(False)
        row[0].set_ylabel(title, fontsize=8)
    fig.tight_layout()
    return fig


# legend names of a Shadow Attack history's keys, where the key misleads: "color" is the paper's C, the mean |delta|
# of each channel, not a colour term (Dissim is that); other keys (PGD's "loss", a run's label) are shown as they are
LEGEND_LABELS = {"color": "C (mean |δ| per channel)"}


def plot_loss_curves(history: Mapping[str, Sequence[float]], ax: Axes | None = None, keys: Sequence[str] | None = None,
                     logy: bool = False, xlabel: str = "step", ylabel: str = "loss", title: str | None = None,
                     steps: Sequence[float] | None = None) -> Axes:
    """One line per entry of ``history`` (name -> values per step); zero/negative values are dropped on a log axis."""
    if ax is None:
        import matplotlib.pyplot as plt  # start-up cost (matplotlib.pyplot)

        _, ax = plt.subplots(figsize=(5, 3.2))
    keys = list(keys) if keys is not None else list(history)
    for key in keys:
        values = np.asarray(_to_list(history[key]), dtype=float).reshape(-1)
        xs = np.asarray(steps, dtype=float) if steps is not None else np.arange(len(values))
        if logy:
            values = np.where(values > 0, values, np.nan)
        ax.plot(xs[:len(values)], values, label=LEGEND_LABELS.get(key, key), lw=1.5)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if keys:
        ax.legend(fontsize=8)
    return ax


def _to_list(values: Any) -> list[float]:
    if hasattr(values, "detach"):
        return values.detach().float().cpu().reshape(-1).tolist()
    return list(np.asarray(values, dtype=float).reshape(-1))


def plot_against(xs: Sequence[float], curves: Mapping[str, Sequence[float]], ax: Axes | None = None,
                 xlabel: str = "eps", ylabel: str = "accuracy", title: str | None = None, percent: bool = True,
                 logx: bool = False, xticklabels: Sequence[str] | None = None) -> Axes:
    """Curves y(x) with markers, one per label (accuracy against eps, Dissim against lambda_s, ...)."""
    if ax is None:
        import matplotlib.pyplot as plt  # start-up cost (matplotlib.pyplot)

        _, ax = plt.subplots(figsize=(5, 3.2))
    xs = np.asarray(xs, dtype=float)
    for label, ys in curves.items():
        ys = np.asarray(_to_list(ys), dtype=float)
        if len(ys) != len(xs):
            raise ValueError(f"curve {label!r} has {len(ys)} values for {len(xs)} x positions")
        ax.plot(xs, 100 * ys if percent else ys, marker="o", label=label)
    if logx:
        ax.set_xscale("symlog", linthresh=min((v for v in xs if v > 0), default=1.0))
    if xticklabels is not None:
        ax.set_xticks(xs)
        ax.set_xticklabels(xticklabels)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel + (" (%)" if percent else ""))
    if percent:
        ax.set_ylim(-2, 102)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return ax


def plot_heatmap(values: Any, xvalues: Sequence[float], yvalues: Sequence[float], ax: Axes | None = None,
                 xlabel: str = "", ylabel: str = "", title: str | None = None, fmt: str = "{:.2f}",
                 cmap: str = "viridis", vmin: float | None = None, vmax: float | None = None) -> Axes:
    """A map values[i, j] over (yvalues[i], xvalues[j]) with every cell annotated (ablation grids)."""
    vals = np.asarray(_to_list(values) if hasattr(values, "detach") else values, dtype=float)
    vals = vals.reshape(len(yvalues), len(xvalues))
    if ax is None:
        import matplotlib.pyplot as plt  # start-up cost (matplotlib.pyplot)

        _, ax = plt.subplots(figsize=(1.1 * len(xvalues) + 1.8, 0.8 * len(yvalues) + 1.2))
    im = ax.imshow(vals, cmap=cmap, vmin=vmin, vmax=vmax, origin="lower", aspect="auto")
    ax.set_xticks(range(len(xvalues)))
    ax.set_xticklabels([f"{v:g}" for v in xvalues])
    ax.set_yticks(range(len(yvalues)))
    ax.set_yticklabels([f"{v:g}" for v in yvalues])
    lo, hi = np.nanmin(vals) if vals.size else 0.0, np.nanmax(vals) if vals.size else 1.0
    mid = (lo + hi) / 2
    for i in range(vals.shape[0]):
        for j in range(vals.shape[1]):
            ax.text(j, i, fmt.format(vals[i, j]), ha="center", va="center", fontsize=8,
                    color="black" if vals[i, j] > mid else "white")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return ax


def plot_radius_comparison(natural: Any, spoofed: Any, ax: Axes | None = None, success: Any = None,
                           title: str = "natural vs spoofed certified radius") -> Axes:
    """Scatter of the natural image's certified radius (true label) against the shadow image's (wrong label)."""
    nat = np.asarray(_to_list(natural), dtype=float)
    spo = np.asarray(_to_list(spoofed), dtype=float)
    if nat.shape != spo.shape:
        raise ValueError(f"natural has {nat.size} radii but spoofed has {spo.size}")
    if ax is None:
        import matplotlib.pyplot as plt  # start-up cost (matplotlib.pyplot)

        _, ax = plt.subplots(figsize=(3.8, 3.6))
    ok = np.ones_like(nat, dtype=bool) if success is None else np.asarray(_to_list(success), dtype=bool)
    ax.scatter(nat[ok], spo[ok], label="spoofed certificate", color="tab:red")
    if (~ok).any():
        ax.scatter(nat[~ok], spo[~ok], marker="x", label="attack failed (radius 0)", color="grey")
    top = max(float(np.max(nat, initial=0.0)), float(np.max(spo, initial=0.0)), 1e-3) * 1.1
    ax.plot([0, top], [0, top], "k--", lw=0.8, label="equal radius")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("natural image, true label: radius")
    ax.set_ylabel("shadow image, wrong label: radius")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return ax


def plot_margin_bounds(lower: Any, classes: Sequence[str], target: int, ax: Axes | None = None,
                       title: str | None = None) -> Axes:
    """Bars of certified lower bounds of the margins z_target - z_j (j != target); all >= 0 means certified."""
    lb = np.asarray(_to_list(lower), dtype=float)
    others = [c for k, c in enumerate(classes) if k != target]
    if lb.size != len(others):
        raise ValueError(f"lower has {lb.size} margins, expected {len(others)} (every class but the target)")
    if ax is None:
        import matplotlib.pyplot as plt  # start-up cost (matplotlib.pyplot)

        _, ax = plt.subplots(figsize=(5, 3))
    ax.bar(range(lb.size), lb, color=np.where(lb >= 0, "tab:green", "tab:red"))
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(lb.size))
    ax.set_xticklabels(others, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel(f"lower bound of z[{classes[target]}] - z[j]")
    ax.set_title(title or f"certified margins of target '{classes[target]}'", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    return ax


def figure_png(fig: Any, dpi: int = 80) -> bytes:
    """PNG bytes of a matplotlib figure (what the live widgets send to the browser)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


# how the paper's terms read on a plot: C penalises the mean |delta| of each channel, not colour (Dissim does that)
TERM_TITLES = {"classification": "classification loss L", "color": "C: mean |δ| per channel", "tv": "TV",
               "dissim": "Dissim (colour)", "l2": "||δ||_2"}


def plot_loss_terms(history: Mapping[str, Any], terms: Sequence[str] = ("classification", "color", "tv", "dissim"),
                    axes: Sequence[Axes] | None = None, labels: Sequence[str] | None = None, logy: bool = True) -> Any:
    """One panel per loss term of a Shadow Attack history: a faint line per candidate (image, target), mean in bold.

    ``history`` is ShadowResult.history (curves of the mean plus "per_candidate" [steps, B, T]); returns the axes.
    """
    per = history.get("per_candidate", {})
    if axes is None:
        import matplotlib.pyplot as plt  # start-up cost (matplotlib.pyplot)

        _, axes = plt.subplots(1, len(terms), figsize=(3.2 * len(terms), 2.8), squeeze=False)
        axes = list(axes[0])
    for ax, term in zip(axes, terms):
        if term not in history:
            raise ValueError(f"history has no term {term!r}; available: {sorted(k for k in history if k != 'lr')}")
        if term in per:
            curves = np.asarray(_to_list(per[term]), dtype=float).reshape(len(_to_list(history[term])), -1)
            for k in range(curves.shape[1]):
                c = np.where(curves[:, k] > 0, curves[:, k], np.nan) if logy else curves[:, k]
                ax.plot(c, color="tab:blue", alpha=0.35, lw=0.8, label=labels[k] if labels is not None else None)
        mean = np.asarray(_to_list(history[term]), dtype=float)
        if logy:
            mean = np.where(mean > 0, mean, np.nan)
        ax.plot(mean, color="k", lw=2, label="mean")
        if logy and np.isfinite(mean).any():
            ax.set_yscale("log")
        ax.set_title(TERM_TITLES.get(term, term), fontsize=10)
        ax.set_xlabel("SGD step")
        ax.grid(alpha=0.3)
    axes[0].figure.tight_layout()
    return axes
