"""Small computations the lessons state as facts, so that every number in their prose is computed, not typed.

Each function is a one-screen consequence of the project's own code: the CERTIFY radius cap from
``smoothing.lower_confidence_bound``, the disjoint-balls condition of two smoothing certificates, how concentrated
a perturbation's energy is, the first test image of each class whatever the data source's order. Lesson 07 (how
certificates mislead) adds bounds computed in a chosen floating-point precision and a search for counterexamples
(``bounds_by_precision``, ``counterexamples``), a half-space whose smoothed classifier is known exactly
(``halfspace_classifier``, ``halfspace_truth``, ``certify_failure_probability``), the committed shadow images
with weight-free image metrics (``committed_shadows``, ``image_metrics``), and the checks of an attack evaluation:
the loss along the gradient and a random direction (``loss_along_directions``) and the empirical radius of the
smoothed classifier under SmoothAdv (``empirical_radius``). Lesson 03 adds what decides whether IBP
or CROWN-IBP is tighter (``bound_tightness``) and a linear classifier whose smoothed classifier is known in closed
form, for the Neyman-Pearson argument behind CERTIFY's radius (``linear_classifier``, ``linear_smoothing``), and
the true robust error of a tiny network beside an attack's and the bounds' brackets (``exact_margins``,
``robust_brackets``, on ``thumbnails`` with ``tiny_mlp``).

Why this module is long: it is the one home of every computed fact the seven lessons assert, and lesson 07's
precision section (``rounded_box``, ``box_counterexamples``, ``rounding_sources``) and lesson 03's exact margins by
MILP (``exact_margins``) grew it past the limit; splitting it per lesson is the next step (issue 42's clean-up).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import lil_matrix
from scipy.stats import binom, norm
from torch import nn

from shadowlab import validate
from shadowlab.attacks import pgd, smoothadv
from shadowlab.certify.bounds import ibp_bounds, lower_bounds, margin_spec
from shadowlab.certify.smoothing import ABSTAIN, Certificate, Smooth, lower_confidence_bound
from shadowlab.certify.verify import certified, pgd_wrong
from shadowlab.data import DATA_DIR, load_cifar10
from shadowlab.defenses.train import TrainConfig, train
from shadowlab.experiments.rejudge import load_table
from shadowlab.perception import ssim, tv_per_pixel


def radius_cap(sigma: float, n: int, alpha: float) -> float:
    """The largest radius CERTIFY can return with n estimation samples: sigma * Phi^-1(pA_lower(n_A = n)).

    With every vote for c_A the Clopper-Pearson bound is alpha^(1/n) (one-sided, level 1 - alpha), so the cap is
    sigma * Phi^-1(alpha^(1/n)): 1.93 sigma at n = 256, 3.81 sigma at n = 100,000 (alpha = 0.001).
    sigma must be > 0, n an integer >= 1, alpha in (0, 1).
    """
    if not isinstance(sigma, (int, float, np.floating)) or not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"sigma={sigma!r} must be a finite number > 0")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n={n!r} must be an integer >= 1")
    p = float(lower_confidence_bound(int(n), int(n), alpha))
    return float(sigma) * float(norm.ppf(p)) if p > 0.5 else 0.0


def disjoint_balls(x: torch.Tensor, x_shadow: torch.Tensor, r_natural: torch.Tensor,
                   r_spoofed: torch.Tensor) -> torch.Tensor:
    """Bool per image: ||x_shadow - x||_2 >= r_natural + r_spoofed.

    The certificate of x (label y, radius r_natural) and that of x_shadow (label t != y, radius r_spoofed) can both
    hold only if their L2 balls do not overlap, i.e. exactly when this is True; each certificate holds with
    probability >= 1 - alpha, so when it is False at least one of them is wrong (with probability <= 2 alpha
    this happens by chance). x, x_shadow: B x C x H x W; radii: B.
    """
    if x.shape != x_shadow.shape or x.dim() != 4:
        raise ValueError(f"x and x_shadow must have the same shape B x C x H x W, got {tuple(x.shape)} and "
                         f"{tuple(x_shadow.shape)}")
    r_natural, r_spoofed = torch.as_tensor(r_natural).float().cpu(), torch.as_tensor(r_spoofed).float().cpu()
    if r_natural.shape != (x.shape[0],) or r_spoofed.shape != (x.shape[0],):
        raise ValueError(f"r_natural and r_spoofed must have shape ({x.shape[0]},), got {tuple(r_natural.shape)} "
                         f"and {tuple(r_spoofed.shape)}")
    dist = (x_shadow - x).flatten(1).norm(dim=1).float().cpu()
    return dist >= r_natural + r_spoofed


def energy_share(delta: torch.Tensor, fraction: float = 0.05) -> torch.Tensor:
    """Per image, the share of ||delta||_2^2 held by its largest ``fraction`` of coordinates (by |delta_i|).

    A perturbation spread evenly over all d coordinates gives about ``fraction``; one concentrated on a few pixels
    gives close to 1 (the L1 ball's corners are the sparse ones; L-inf spreads, L2 lies in between).
    delta: B x ...; fraction in (0, 1]. Returns a float tensor of shape B (0 for an all-zero delta).
    """
    if not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"fraction={fraction!r} must be a number in (0, 1]")
    sq = delta.detach().flatten(1).float().pow(2)
    k = max(1, int(round(fraction * sq.shape[1])))
    top = sq.topk(k, dim=1).values.sum(1)
    total = sq.sum(1)
    return torch.where(total > 0, top / total.clamp_min(1e-30), torch.zeros_like(total))


def first_image_per_class(num_classes: int = 10, source: str = "auto", device: str | torch.device | None = None,
                          search: int = 1000) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first test image of each class in the source's order (the paper's ablation images), by class.

    Returns images (num_classes x 3 x 32 x 32), labels (0 .. num_classes - 1) and their test-set indices. Looks at
    the first ``search`` test images (the committed subset interleaves classes, so its first 10 are these; the
    official test set does not, but holds every class within its first 100).
    """
    x, y, _ = load_cifar10("test", n=search, source=source)
    idx = []
    for c in range(num_classes):
        hits = (y == c).nonzero()
        if len(hits) == 0:
            raise ValueError(f"class {c} is not among the first search={search} test images; raise search")
        idx.append(int(hits[0]))
    index = torch.tensor(idx)
    dev = torch.device(device) if device is not None else x.device
    return x[index].to(dev), y[index].to(dev), index


# ================================================================================================ lesson 07
DTYPES: dict[str, torch.dtype] = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16,
                                  "float16": torch.float16}


def _dtype(name: str) -> torch.dtype:
    return DTYPES[validate.choice(name, "dtype", DTYPES)]


def in_precision(model: nn.Module, dtype: str) -> nn.Module:
    """A copy of ``model`` (eval mode) whose parameters and buffers are stored in ``dtype`` (a name of ``DTYPES``);
    the model itself is not changed. Its forward passes then run in that arithmetic."""
    return copy.deepcopy(model).eval().to(_dtype(dtype))


def round_weights(model: nn.Module, dtype: str = "bfloat16") -> nn.Module:
    """A float64 copy of ``model`` whose parameters and buffers were first rounded to ``dtype``: the network a
    low-precision copy holds, evaluated (and bounded) in float64 arithmetic. The model itself is not changed."""
    return in_precision(in_precision(model, dtype), "float64")


def ibp_lower_in(model: nn.Module, x: torch.Tensor, eps: float, C: torch.Tensor, dtype: str,
                 batch_size: int = 500) -> torch.Tensor:
    """IBP lower bounds of C z over the L-inf ball of radius eps (B x M), with every operation in ``dtype``.

    The model (a copy, ``in_precision``), the images x (B x C x H x W in [0, 1]) and the specifications C
    (B x M x K, e.g. ``bounds.margin_spec``) are cast to ``dtype`` and ``bounds.ibp_bounds`` runs unchanged: the
    input box, every product and every sum are rounded to nearest in that precision, never outwards. Returns the
    bounds as float64 on the CPU. With "float64" this is the reference the lesson compares with (itself rounded to
    nearest, but 2^29 times more finely than float32); lower precisions can return a bound *above* it, i.e. an
    unsound one.
    """
    net, dt = in_precision(model, dtype), _dtype(dtype)
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            lo, _ = ibp_bounds(net, x[i:i + batch_size].to(dt), eps, C[i:i + batch_size].to(dt))
            out.append(lo.double().cpu())
    return torch.cat(out)


def bounds_by_precision(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                        dtypes: Sequence[str] = ("float64", "float32", "bfloat16", "float16"),
                        num_classes: int = 10) -> dict[str, dict[str, torch.Tensor]]:
    """IBP certificates of the labels y at eps, computed in each precision of ``dtypes`` (``ibp_lower_in``).

    Returns {dtype: {"lower": B x (K-1) float64 margin lower bounds z_y - z_j, "certified": B bool (every margin
    bound >= 0)}}. "float64", the reference, must be among dtypes. x: B x C x H x W in [0, 1]; y: B labels.
    """
    if "float64" not in dtypes:
        raise ValueError(f"dtypes={list(dtypes)!r} must hold 'float64', the reference")
    C = margin_spec(y, num_classes)
    out = {}
    for name in dtypes:
        lower = ibp_lower_in(model, x, eps, C, name)
        out[name] = {"lower": lower, "certified": (lower >= 0).all(1)}
    return out


def precision_rows(results: dict[str, dict[str, torch.Tensor]]) -> list[dict[str, Any]]:
    """One row per precision of ``bounds_by_precision``'s results other than float64, measured against it:
    margins, unsound (margin bounds above the float64 bound), max_excess (the largest amount above it, 0 if none),
    certified (images), gained (certified here, not in float64: certificates the sound computation does not
    give) and lost (certified in float64, not here)."""
    ref = results["float64"]
    rows = []
    for name, res in results.items():
        if name == "float64":
            continue
        excess = res["lower"] - ref["lower"]
        rows.append({"dtype": name, "margins": excess.numel(), "unsound": int((excess > 0).sum()),
                     "max_excess": max(0.0, float(excess.max())), "certified": int(res["certified"].sum()),
                     "gained": int((res["certified"] & ~ref["certified"]).sum()),
                     "lost": int((ref["certified"] & ~res["certified"]).sum())})
    return rows


def counterexamples(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 100,
                    restarts: int = 10, seed: int = 0, shrink: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Search the L-inf ball of radius eps around each image for a point the model misclassifies (L-inf PGD).

    PGD (``attacks.pgd``) runs on the ball of radius eps (1 - shrink), so that rounding cannot carry a point out of
    the eps-ball. Returns (found, x_adv): found[i] is True only when x_adv[i] lies in [0, 1] and within eps of x[i]
    measured in float64, and the model misclassifies it both as it runs (its own precision) and in float64. A True
    proves that no certificate of y[i] at eps can be true; a False proves nothing (the search may have failed).
    An empty batch gives empty results.
    """
    if not 0 <= shrink < 1:
        raise ValueError(f"shrink={shrink!r} must be a number in [0, 1)")
    if x.shape[0] == 0:                                       # nothing to search (e.g. no certificate gained)
        return torch.zeros(0, dtype=torch.bool), x.detach().clone()
    res = pgd(model, x, y, eps * (1 - shrink), norm="linf", steps=steps, restarts=restarts, seed=seed)
    x_adv = res.x_adv.detach()
    dist = (x_adv.double() - x.double()).flatten(1).abs().amax(1)
    inside = (dist <= eps) & (x_adv >= 0).flatten(1).all(1) & (x_adv <= 1).flatten(1).all(1)
    with torch.no_grad():
        wrong = model.eval()(x_adv).argmax(1) != y
        wrong64 = in_precision(model, "float64").to(x.device)(x_adv.double()).argmax(1) != y
    return (inside & wrong & wrong64).cpu(), x_adv


def rounded_box(x: torch.Tensor, eps: float, dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The input box that ``ibp_lower_in`` bounds in ``dtype``, as float64 (lo, hi), each B x C x H x W.

    ``ibp_lower_in`` casts the image itself to ``dtype`` before it builds the box, so the box is centred on the
    rounded image (bfloat16 moves a pixel in [0, 1] by up to 2^-9), and its edges (x - eps and x + eps, clipped to
    [0, 1]) are rounded again. A certificate computed that way is about this box, not the eps-ball around x.
    """
    xd = x.detach().to(_dtype(dtype))
    return (xd - eps).clamp(0, 1).double(), (xd + eps).clamp(0, 1).double()


def box_counterexamples(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                        steps: int = 100, restarts: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Search the box [lo, hi] (e.g. ``rounded_box``) for a point that ``model`` misclassifies: L-inf PGD from a
    uniform start in the box, step 2.5 (hi - lo) / (2 steps) per coordinate, every iterate clipped to the box, each
    restart from its own seeded start. Returns (found, x_adv): found[i] is True only when x_adv[i] lies in the box
    measured in float64 and the model misclassifies it both as it runs (its own precision) and in float64; x_adv[i]
    is the first such point (else the last restart's end); a restart searches only the images not yet refuted.
    A True proves that no certificate of y[i] over that box
    can be true for this model; a False proves nothing. x: B x C x H x W (only its dtype and device are used);
    y: B labels; lo <= hi of x's shape."""
    if x.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool), x.detach().clone()
    if lo.shape != x.shape or hi.shape != x.shape or bool((lo > hi).any()):
        raise ValueError("lo and hi must have x's shape with lo <= hi")
    model = model.eval()
    dt, dev = next(model.parameters()).dtype, x.device
    lo_t, hi_t = lo.to(dev, dt), hi.to(dev, dt)
    step = 2.5 * (hi_t - lo_t) / 2 / steps
    gen = torch.Generator(device=dev).manual_seed(seed)
    found = torch.zeros(len(x), dtype=torch.bool, device=dev)
    best = lo_t.clone()
    net64 = in_precision(model, "float64").to(dev)
    for _ in range(restarts):
        z = lo_t + (hi_t - lo_t) * torch.rand(x.shape, generator=gen, device=dev, dtype=dt)
        todo = (~found).nonzero().flatten()           # images already refuted are not searched again
        if len(todo) == 0:
            break
        zt, a, b, s, yt = z[todo], lo_t[todo], hi_t[todo], step[todo], y[todo]
        for _ in range(steps):
            zt = zt.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(nn.functional.cross_entropy(model(zt), yt, reduction="sum"), zt)
            zt = torch.minimum(torch.maximum(zt.detach() + s * grad.sign(), a), b)
        with torch.no_grad():
            inside = ((zt.double() >= lo.to(dev)[todo]) & (zt.double() <= hi.to(dev)[todo])).flatten(1).all(1)
            wrong = (model(zt).argmax(1) != yt) & (net64(zt.double()).argmax(1) != yt) & inside
        best[todo] = zt
        found[todo[wrong]] = True
    return found.cpu(), best


def outside_box(x_points: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Per point (B x C x H x W), how many coordinates lie outside the box [lo, hi] (compared in float64)."""
    p, lo, hi = x_points.double(), lo.to(x_points.device), hi.to(x_points.device)
    return ((p < lo) | (p > hi)).flatten(1).sum(1).cpu()


def rounding_sources(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, dtype: str = "bfloat16",
                     num_classes: int = 10) -> list[dict[str, Any]]:
    """Which rounding makes a low-precision IBP certificate: the images certified at eps when only the inputs, only
    the weights, or both are rounded to ``dtype`` and the bound is computed in float64, and when everything runs in
    ``dtype`` (``ibp_lower_in``). Each row: "source", "certified" (images), "gained" (certified here and not by the
    float64 bound of the original network and images) and "gained_in_dtype" (of those, also gained in ``dtype``).
    x: B x C x H x W in [0, 1]; y: B labels."""
    C = margin_spec(y, num_classes)
    x_round = x.detach().to(_dtype(dtype)).to(x.dtype)
    ref = (ibp_lower_in(model, x, eps, C, "float64") >= 0).all(1)
    full = (ibp_lower_in(model, x, eps, C, dtype) >= 0).all(1)
    cases = {"inputs rounded, float64 arithmetic": (model, x_round, "float64"),
             "weights rounded, float64 arithmetic": (round_weights(model, dtype), x, "float64"),
             "inputs and weights rounded, float64 arithmetic": (round_weights(model, dtype), x_round, "float64"),
             f"everything in {dtype}": (model, x, dtype)}
    rows = []
    for source, (net, images, arithmetic) in cases.items():
        cert = (ibp_lower_in(net, images, eps, C, arithmetic) >= 0).all(1)
        rows.append({"source": source, "certified": int(cert.sum()), "gained": int((cert & ~ref).sum()),
                     "gained_in_dtype": int((cert & ~ref & full).sum())})
    return rows


def vote_changes(certs_a: Sequence[Certificate], certs_b: Sequence[Certificate]) -> dict[str, float | int]:
    """How two CERTIFY runs of the same images on the same noise differ (e.g. the base network in fp32 and in bf16):
    images whose vote counts differ, votes moved (half the L1 distance of the count vectors, summed over images),
    predictions that differ (abstentions included), radii larger in b, and the largest |radius difference|."""
    if len(certs_a) != len(certs_b) or not certs_a:
        raise ValueError(f"certs_a and certs_b must hold the same images (got {len(certs_a)} and {len(certs_b)})")
    moved = [int(np.abs(np.subtract(a.counts, b.counts)).sum()) // 2 for a, b in zip(certs_a, certs_b)]
    diff = [b.radius - a.radius for a, b in zip(certs_a, certs_b)]
    return {"images": len(certs_a), "counts_differ": sum(m > 0 for m in moved), "votes_moved": sum(moved),
            "predictions_differ": sum(a.prediction != b.prediction for a, b in zip(certs_a, certs_b)),
            "radius_larger": sum(d > 0 for d in diff), "max_radius_change": max(abs(d) for d in diff)}


def halfspace_classifier(threshold: float = 0.5) -> nn.Module:
    """A base classifier on 1-pixel images (B x 1 x 1 x 1 in [0, 1]) whose smoothed classifier is known exactly:
    class 0 when the pixel z < threshold, class 1 when z > threshold (logits threshold - z and z - threshold).

    Under noise N(0, sigma^2) the class of x has probability Phi(|threshold - x| / sigma) (``halfspace_truth``), so
    g's exact robustness radius at x is |threshold - x| and Cohen et al.'s radius sigma Phi^-1(p) equals it:
    a certified radius above |threshold - x| is a wrong certificate, one below it is merely conservative.
    """
    if not isinstance(threshold, (int, float)) or not 0 < threshold < 1:
        raise ValueError(f"threshold={threshold!r} must be a number in (0, 1)")
    layer = nn.Linear(1, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[-1.0], [1.0]]))
        layer.bias.copy_(torch.tensor([threshold, -threshold]))
    return nn.Sequential(nn.Flatten(), layer).eval()


def halfspace_truth(x: Any, threshold: float, sigma: float) -> dict[str, np.ndarray]:
    """For pixel values x (any shape, flattened): g's exact "label" (0 below the threshold, 1 above), the
    probability p of that label under N(0, sigma^2) noise, and g's exact robustness radius |threshold - x|."""
    v = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=float).reshape(-1)
    return {"label": (v > threshold).astype(int), "p": norm.cdf(np.abs(threshold - v) / sigma),
            "radius": np.abs(threshold - v)}


def lcb_exceeds_probability(p: float, n: int, alpha: float) -> float:
    """P(lower_confidence_bound(N, n, alpha) > p) for N ~ Binomial(n, p): how often the one-sided Clopper-Pearson
    bound lands above the true proportion. At most alpha for every p (the bound's guarantee), often well below.
    p in [0, 1], n an integer >= 1, alpha in (0, 1)."""
    if not 0 <= p <= 1:
        raise ValueError(f"p={p!r} must lie in [0, 1]")
    k = np.arange(int(n) + 1)
    above = np.atleast_1d(lower_confidence_bound(k, int(n), alpha)) > p      # increasing in k
    return float(binom.pmf(k[above], int(n), p).sum()) if above.any() else 0.0


def certify_failure_probability(x: float, threshold: float, sigma: float, n0: int, n: int, alpha: float) -> float:
    """The exact probability that CERTIFY on the half-space (``halfspace_classifier``) at pixel value x returns a
    wrong certificate: a class other than g(x), or g(x) with a radius above |threshold - x|.

    CERTIFY guesses c_A from n0 samples (a tie goes to class 0, as ``Smooth.certify``'s argmax) and certifies when
    pA_lower >= 1/2; with the guess's true probability q the certificate is wrong exactly when pA_lower > q and
    pA_lower >= 1/2. Summed over both guesses; at most alpha (Cohen et al., Prop. 2 and Thm. 1).
    """
    p0 = float(norm.cdf((threshold - x) / sigma))                  # probability of class 0 under the noise
    guess0 = float(binom.sf(math.ceil(n0 / 2) - 1, n0, p0))          # N0_0 >= n0 / 2: class 0 wins the selection
    k = np.arange(int(n) + 1)
    low = np.atleast_1d(lower_confidence_bound(k, int(n), alpha))
    fail = 0.0
    for prob_guess, q in ((guess0, p0), (1.0 - guess0, 1.0 - p0)):
        bad = (low > q) & (low >= 0.5)
        fail += prob_guess * float(binom.pmf(k[bad], int(n), q).sum())
    return fail


def repeated_certify(smooth: Any, x: torch.Tensor, n0: int, n: int, alpha: float, runs: int, seed: int = 0,
                     batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """CERTIFY every image of x alone, ``runs`` times, each (run, image) with its own seed (seed + run * B + i), so
    that all certificates are independent. Returns (predictions, radii), each an array runs x B (ABSTAIN = -1).
    smooth: a ``smoothing.Smooth``; x: B x C x H x W in [0, 1]; batch_size: the forward chunk, by default
    max(n, n0), one pass per draw, right for the 1-pixel half-space (pass e.g. 1000 for real images)."""
    b = x.shape[0]
    chunk = batch_size if batch_size is not None else max(n, n0)
    pred, radius = np.zeros((runs, b), dtype=int), np.zeros((runs, b))
    for r in range(runs):
        for i in range(b):
            cert = smooth.certify(x[i:i + 1], n0, n, alpha, batch_size=chunk, seed=seed + r * b + i)[0]
            pred[r, i], radius[r, i] = cert.prediction, cert.radius
    return pred, radius


def wrong_certificates(pred: np.ndarray, radius: np.ndarray, label: np.ndarray, true_radius: np.ndarray
                       ) -> np.ndarray:
    """Bool array: a certificate was issued (not ABSTAIN) and it is wrong, i.e. its class is not the true label or
    its radius exceeds the exact robustness radius. Arrays broadcast (e.g. runs x B against B)."""
    pred, radius = np.asarray(pred), np.asarray(radius)
    return (pred != ABSTAIN) & ((pred != np.asarray(label)) | (radius > np.asarray(true_radius)))


def committed_shadows(table: str = "table1", results_dir: str | Path | None = None) -> dict[str, Any]:
    """The committed shadow images of ``data/results/<table>`` with their natural images, as ``rejudge.load_table``
    reads them: {"rows": the per-image CSV rows (strings, as written), "x": natural images N x 3 x 32 x 32,
    "x_shadow": the uint8 shadows as floats in [0, 1], "y": labels, "settings": the run's settings}, on the CPU."""
    if table not in ("table1", "table2"):
        raise ValueError(f"table={table!r} must be 'table1' or 'table2'")
    root = Path(results_dir) if results_dir is not None else DATA_DIR / "results"
    _, record, rows, shadows = load_table(root / table)
    index = torch.tensor([int(r["index"]) for r in rows])
    x, y, _ = load_cifar10("test", n=int(index.max()) + 1, source=record["settings"]["data"])
    return {"rows": rows, "x": x[index], "x_shadow": torch.from_numpy(shadows).float().div(255), "y": y[index],
            "settings": record["settings"]}


def image_metrics(x: torch.Tensor, x_other: torch.Tensor) -> dict[str, np.ndarray]:
    """Weight-free similarity metrics per image pair (B x C x H x W in [0, 1]): "l2" and "linf" of the difference,
    "psnr" in dB (10 log10(1 / MSE), data range 1; inf for identical images), "ssim" (``perception.ssim``) and
    "tv" (the difference's total variation per value, ``perception.tv_per_pixel``). PSNR is a function of the L2
    size alone (MSE = L2^2 / (C H W)); SSIM and TV also see the difference's structure."""
    d = (x_other - x).double().flatten(1)
    mse = d.pow(2).mean(1)
    with np.errstate(divide="ignore"):
        psnr = 10 * np.log10(1.0 / mse.numpy())
    return {"l2": d.norm(dim=1).numpy(), "linf": d.abs().amax(1).numpy(), "psnr": psnr,
            "ssim": ssim(x, x_other).cpu().double().numpy(), "tv": tv_per_pixel(x, x_other).cpu().double().numpy()}


def bound_tightness(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, eps_values: Sequence[float]
                    ) -> list[dict[str, float]]:
    """Per eps, what decides whether IBP or CROWN-IBP bounds a model's margins more tightly on (x, y).

    Each row: "eps"; "unstable", the share of ReLU inputs (over every top-level ReLU of ``model``, every neuron and
    image) whose IBP box [l, u] has l < 0 < u, the neurons CROWN-IBP must relax; "ibp" and "crown_ibp", the mean
    lower bound of the margins z_y - z_j (j != y) by each method (``bounds.lower_bounds``; larger is tighter);
    "crown_ibp_tighter", the share of those margins whose CROWN-IBP bound is above IBP's.
    model: an nn.Sequential the bounds support, in eval mode; x: B x C x H x W in [0, 1]; y: B labels;
    eps_values: L-inf radii >= 0.
    """
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"model must be an nn.Sequential, got {type(model).__name__}")
    relus = [k for k, layer in enumerate(model) if isinstance(layer, nn.ReLU)]
    C = margin_spec(y, model(x[:1]).shape[1])
    rows = []
    with torch.no_grad():
        for eps in eps_values:
            boxes = [ibp_bounds(model[:k], x, eps) for k in relus]
            unstable = sum(int(((lo < 0) & (hi > 0)).sum()) for lo, hi in boxes)
            ibp, crown_ibp = (lower_bounds(model, x, eps, C, method) for method in ("ibp", "crown-ibp"))
            rows.append({"eps": float(eps), "unstable": unstable / max(1, sum(lo.numel() for lo, _ in boxes)),
                         "ibp": float(ibp.mean()), "crown_ibp": float(crown_ibp.mean()),
                         "crown_ibp_tighter": float((crown_ibp > ibp).float().mean())})
    return rows


def exact_margins(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, eps: float, num_classes: int = 10,
                  time_limit: float = 60.0) -> dict[str, np.ndarray]:
    """Exact minima of the margins z_y - z_j (j != y) over the L-inf ball of radius eps around x clipped to [0, 1],
    for a small fully connected ReLU network, by mixed-integer linear programming (scipy.optimize.milp, HiGHS).

    Each unstable ReLU (IBP box l < 0 < u) is a binary with the big-M constraints of Tjeng et al. (2019): z >= zhat,
    z <= u a, z <= zhat - l (1 - a); stable ones are linear. The program's optimum is the true minimum (complete
    verification), and its minimiser is a real input, returned so that it can be checked by a forward pass.
    model: an nn.Sequential of Flatten, Linear and ReLU layers (Linear first after any Flatten, Linear last), in eval
    mode; x: B x ... images in [0, 1]; y: B labels. Returns {"margin": B x (K-1) exact minima (float64), "argmin": B x
    D input of each image's smallest margin, "robust": B bool (every minimum > 0), "unstable": B counts}.
    Meant for tens of hidden units: the cost grows exponentially with the unstable ReLUs in the worst case.
    """
    eps = validate.eps(eps)
    layers = [m for m in model if not isinstance(m, nn.Flatten)]
    if not layers or not all(isinstance(m, (nn.Linear, nn.ReLU)) for m in layers) or not isinstance(layers[-1],
                                                                                                    nn.Linear):
        raise ValueError("model must be an nn.Sequential of Flatten, Linear and ReLU layers ending in a Linear")
    maps = [(m.weight.detach().double().cpu().numpy(), m.bias.detach().double().cpu().numpy())
            for m in layers if isinstance(m, nn.Linear)]
    xs = x.detach().double().cpu().flatten(1).numpy()
    margins, argmins, robust, unstable = [], [], [], []
    for xi, yi in zip(xs, y.tolist()):
        xl, xu = np.clip(xi - eps, 0, 1), np.clip(xi + eps, 0, 1)
        pre, lo, hi = [], xl, xu                                   # IBP boxes of every ReLU's input
        for W, b in maps[:-1]:
            Wp, Wn = W.clip(min=0), W.clip(max=0)
            pre.append((Wp @ lo + Wn @ hi + b, Wp @ hi + Wn @ lo + b))
            lo, hi = np.maximum(pre[-1][0], 0), np.maximum(pre[-1][1], 0)
        sizes = [len(xl)] + [3 * len(p[0]) for p in pre]          # x, then (zhat, z, a) per ReLU layer
        offs, nv = np.cumsum([0] + sizes), sum(sizes)
        lb, ub, integ = np.zeros(nv), np.zeros(nv), np.zeros(nv)
        lb[:len(xl)], ub[:len(xl)] = xl, xu
        rows, rlo, rhi, prev, n_unstable = [], [], [], np.arange(len(xl)), 0
        for k, (plo, phi) in enumerate(pre):
            n = len(plo)
            zh, z, a = (offs[k + 1] + np.arange(n) + j * n for j in range(3))
            W, b = maps[k]
            lb[zh], ub[zh], ub[z], ub[a] = plo, phi, np.maximum(phi, 0), 1.0
            for i in range(n):
                rows.append(({zh[i]: 1.0, **dict(zip(prev.tolist(), (-W[i]).tolist()))}, b[i], b[i]))
                if phi[i] <= 0:
                    continue                                        # dead: z = 0 from its bounds
                if plo[i] >= 0:
                    rows.append(({z[i]: 1.0, zh[i]: -1.0}, 0.0, 0.0))   # active: z = zhat
                    continue
                n_unstable += 1
                integ[a[i]] = 1.0
                rows.append(({z[i]: 1.0, zh[i]: -1.0}, 0.0, np.inf))
                rows.append(({z[i]: 1.0, a[i]: -phi[i]}, -np.inf, 0.0))
                rows.append(({z[i]: 1.0, zh[i]: -1.0, a[i]: -plo[i]}, -np.inf, -plo[i]))
            prev = z
        A = lil_matrix((len(rows), nv))
        for r, (entries, lo_r, hi_r) in enumerate(rows):
            for col, coef in entries.items():
                A[r, col] = coef
            rlo.append(lo_r), rhi.append(hi_r)
        constraint = LinearConstraint(A.tocsr(), rlo, rhi)
        W, b = maps[-1]
        best, best_x, mins = np.inf, xi, []
        for j in range(num_classes):
            if j == yi:
                continue
            c = np.zeros(nv)
            c[prev] = W[yi] - W[j]
            res = milp(c, integrality=integ, bounds=Bounds(lb, ub), constraints=constraint,
                       options={"time_limit": time_limit, "mip_rel_gap": 1e-9})
            if res.status != 0:
                raise RuntimeError(f"the MILP was not solved to optimality: {res.message}")
            value = float(res.fun + b[yi] - b[j])
            mins.append(value)
            if value < best:
                best, best_x = value, res.x[:len(xl)]
        margins.append(mins), argmins.append(best_x), robust.append(min(mins) > 0), unstable.append(n_unstable)
    return {"margin": np.array(margins), "argmin": np.array(argmins), "robust": np.array(robust),
            "unstable": np.array(unstable)}


BRACKETS = ("pgd", "exact", "crown", "ibp")


def thumbnails(x: torch.Tensor, size: int = 8) -> torch.Tensor:
    """Images shrunk to size x size by averaging blocks of pixels (N x C x H x W -> N x C x size x size, still in
    [0, 1]): a 3 x 8 x 8 thumbnail has 192 inputs, few enough for ``exact_margins``. H and W must be multiples of
    size."""
    if x.dim() != 4 or x.shape[2] % size or x.shape[3] % size:
        raise ValueError(f"x of shape {tuple(x.shape)} must be N x C x H x W with H and W multiples of size={size}")
    return torch.nn.functional.avg_pool2d(x, (x.shape[2] // size, x.shape[3] // size))


def tiny_mlp(x: torch.Tensor, y: torch.Tensor, hidden: int = 32, epochs: int = 30, lr: float = 3e-3,
             seed: int = 0) -> nn.Sequential:
    """A one-hidden-layer ReLU network (Flatten, Linear, ReLU, Linear) trained naturally on (x, y) on the CPU
    (``defenses.train.train``: Adam at lr, batches of 64, no augmentation, ``epochs`` epochs), in eval mode: small
    enough for ``exact_margins`` on thumbnails. The same arguments give the same weights (seeded by ``seed``).
    x: N x C x H x W images in [0, 1]; y: N labels in [0, 10)."""
    validate.count(hidden, "hidden")
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(x[0].numel(), hidden), nn.ReLU(), nn.Linear(hidden, 10))
    cfg = TrainConfig(arch="mlp", epochs=epochs, batch_size=64, optimizer="adam", lr=lr, weight_decay=0.0,
                      augment=False, seed=seed)
    train(model, x.cpu(), y.cpu(), cfg, device="cpu", progress=False)
    return model.eval()


def robust_brackets(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 50,
                    restarts: int = 3, seed: int = 0, time_limit: float = 60.0) -> dict[str, Any]:
    """Four verdicts per image on the L-inf ball of radius eps around x (clipped to [0, 1]), for a small fully
    connected ReLU network (what ``exact_margins`` takes) whose class is the largest logit.

    "pgd": misclassified, or refuted by PGD (``verify.pgd_wrong``, steps, restarts, seed): an attack's lower bracket
    on the true robust error. "exact": not robust, by ``exact_margins`` (MILP, complete): the true robust error.
    "crown" and "ibp": not certified by that bound (``verify.certified``) or misclassified: sound upper brackets.
    Soundness alone implies, image by image, pgd <= exact <= crown and exact <= ibp (``BRACKETS`` order); a PGD
    point counts as refuting only if its float32 forward pass misclassifies it, so the float64 MILP can differ from
    it only at margins within rounding of zero. x: B images in [0, 1]; y: B labels in [0, K).
    Returns {"pgd", "exact", "crown", "ibp": B bool arrays (True = error), "unstable": B counts of ReLUs the MILP
    needed a binary for, "seconds": {verdict: wall seconds}}.
    """
    eps = validate.eps(eps)
    model, device = model.eval(), x.device
    out: dict[str, Any] = {"seconds": {}}
    t = time.perf_counter()
    out["pgd"] = pgd_wrong(model, x, y, eps, steps=steps, restarts=restarts, seed=seed, device=device).numpy()
    out["seconds"]["pgd"] = time.perf_counter() - t
    t = time.perf_counter()
    with torch.no_grad():
        logits = model(x)
    correct = (logits.argmax(1) == y.to(logits.device)).cpu().numpy()
    exact = exact_margins(model, x, y, eps, num_classes=int(logits.shape[1]), time_limit=time_limit)
    out["exact"], out["unstable"] = ~exact["robust"], exact["unstable"]
    out["seconds"]["exact"] = time.perf_counter() - t
    for method in ("crown", "ibp"):
        t = time.perf_counter()
        out[method] = ~(certified(model, x, y, eps, method, device=device).cpu().numpy() & correct)
        out["seconds"][method] = time.perf_counter() - t
    return out


def linear_classifier(w: torch.Tensor, b: float) -> nn.Module:
    """The base classifier f(x) = 1 if w . x + b > 0 else 0 on images shaped like w (logits -(w . x + b) and
    w . x + b), the one case where the smoothed classifier is known in closed form (``linear_smoothing``).
    w: a tensor with at least one non-zero entry (C x H x W for images); b: a finite number."""
    if not isinstance(w, torch.Tensor) or not bool(w.abs().sum() > 0):
        raise ValueError("w must be a tensor with a non-zero entry (the normal of the hyperplane)")
    if not isinstance(b, (int, float)) or not math.isfinite(b):
        raise ValueError(f"b={b!r} must be a finite number")
    layer = nn.Linear(w.numel(), 2)
    with torch.no_grad():
        layer.weight.copy_(torch.stack([-w.flatten(), w.flatten()]).float())
        layer.bias.copy_(torch.tensor([-float(b), float(b)]))
    return nn.Sequential(nn.Flatten(), layer).eval()


def linear_smoothing(w: torch.Tensor, b: float, x: torch.Tensor, sigma: float) -> dict[str, np.ndarray]:
    """For f(x) = [w . x + b > 0] (``linear_classifier``) under noise N(0, sigma^2 I), per image of x (B x shape
    of w): g's exact "label" (f's class at x: the noise is symmetric), its probability pA = Phi(|w . x + b| /
    (sigma ||w||)), and the distance |w . x + b| / ||w|| from x to the hyperplane, g's exact robustness radius (g
    is f itself). Cohen et al.'s radius at the exact pA, sigma Phi^-1(pA), equals that distance: the half-space
    is the worst case of the Neyman-Pearson argument, so the radius is tight. sigma must be > 0."""
    sigma = validate.sigma(sigma)
    margin = (x.flatten(1).double() @ w.flatten().double().to(x.device) + float(b)).cpu().numpy()
    distance = np.abs(margin) / float(w.double().norm())
    return {"label": (margin > 0).astype(int), "pA": norm.cdf(distance / sigma), "distance": distance}


def loss_along_directions(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, points: int = 21,
                          span: float = 2.0, seed: int = 0) -> dict[str, np.ndarray]:
    """The cross-entropy of ``model`` along two straight lines from each image: the L-inf gradient direction
    sign(grad_x CE(model(x), y)) and a random sign direction (seeded), the gradient-masking check of Athalye, Carlini
    and Wagner (2018): a masked loss is flat or jagged along the gradient, or rises faster along a random direction.

    The points are x + t d for t in linspace(0, span eps, points), not clipped to [0, 1] (the network's own function
    is plotted). Returns {"t": t / eps (points), "gradient", "random": the loss, B x points, "slope": B, the
    directional derivative grad . d_gradient = ||grad||_1 that autograd gives at t = 0, per unit of t}. x: B x C x H
    x W in [0, 1] that the model takes; y: B labels; eps > 0; points >= 2; span > 0; seed >= 0.
    """
    num_classes = validate.model_input(model, x)
    validate.labels(y, x.shape[0], num_classes=num_classes)
    eps = validate.positive(eps, "eps")
    points = validate.count(points, "points", minimum=2)
    span = validate.positive(span, "span")
    x = x.detach()
    t = torch.linspace(0.0, span * eps, points, device=x.device, dtype=x.dtype)
    loss = nn.functional.cross_entropy
    model = model.eval()
    with torch.enable_grad():
        xg = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss(model(xg), y, reduction="sum"), xg)
    gen = torch.Generator(device=x.device).manual_seed(validate.count(seed, "seed", minimum=0))
    directions = {"gradient": grad.sign(),
                  "random": torch.randint(0, 2, x.shape, generator=gen, device=x.device).to(x.dtype) * 2 - 1}
    out: dict[str, np.ndarray] = {"t": (t / eps).cpu().numpy()}
    with torch.no_grad():
        for key, d in directions.items():
            out[key] = torch.stack([loss(model(x + s * d), y, reduction="none") for s in t], 1).cpu().numpy()
    out["slope"] = (grad * directions["gradient"]).flatten(1).sum(1).cpu().numpy()
    return out


def empirical_radius(model: nn.Module, sigma: float, x: torch.Tensor, labels: torch.Tensor,
                     eps_grid: Sequence[float], noise_samples: int = 8, steps: int = 10, n_predict: int = 256,
                     alpha: float = 0.001, seed: int = 0) -> dict[str, Any]:
    """Per image, the smallest L2 size in ``eps_grid`` at which SmoothAdv (``attacks.smoothadv``, PGD on the soft
    smoothed classifier of the base network ``model`` at noise level sigma) finds a point where the smoothed
    classifier g no longer returns ``labels[i]`` (e.g. CERTIFY's class).

    g is judged by PREDICT (``Smooth.predict`` with n_predict samples at level alpha, its own noise stream): a change
    counts only when PREDICT returns another class, not when it abstains, so each counted change is wrong with
    probability at most alpha. Such a point lies within that eps of x, so it bounds g's true robustness radius from
    above; a valid CERTIFY radius can never exceed it. The grid is tried in increasing order, each size only on the
    images not yet changed. Returns {"radius": np.ndarray B (inf where no size of the grid changed g, nan where
    labels[i] is ABSTAIN), "prediction": np.ndarray B (PREDICT's class at the point found, ABSTAIN where none),
    "x_adv": B x C x H x W (the point found, else x)}. x: B x C x H x W in [0, 1] that the model takes; labels: B
    integers in [0, K) or ABSTAIN; eps_grid: sizes > 0; the rest as ``smoothadv`` and ``Smooth.predict``.
    """
    num_classes = validate.model_input(model, x)
    labels = torch.as_tensor(labels, device=x.device).long()
    if labels.shape != (x.shape[0],) or bool(((labels < ABSTAIN) | (labels >= num_classes)).any()):
        raise ValueError(f"labels must hold one class in [0, {num_classes}) or ABSTAIN per image")
    grid = sorted(validate.positive(e, "eps_grid entry") for e in eps_grid)
    if not grid:
        raise ValueError("eps_grid must hold at least one size")
    smooth = Smooth(model, num_classes, sigma, device=x.device)
    radius = np.full(x.shape[0], np.inf)
    radius[(labels == ABSTAIN).cpu().numpy()] = np.nan
    prediction = np.full(x.shape[0], ABSTAIN)
    x_adv = x.detach().clone()
    for eps in grid:
        todo = torch.as_tensor(np.isinf(radius), device=x.device).nonzero().flatten()
        if len(todo) == 0:
            break
        found = smoothadv(model, x[todo], labels[todo], eps, sigma, noise_samples, steps, seed=seed).x_adv
        pred = smooth.predict(found, n_predict, alpha, seed=seed)
        changed = (pred != ABSTAIN) & (pred != labels[todo])
        for i in changed.nonzero().flatten().tolist():
            k = int(todo[i])
            radius[k], prediction[k], x_adv[k] = eps, int(pred[i]), found[i]
    return {"radius": radius, "prediction": prediction, "x_adv": x_adv}


__all__ = ["BRACKETS", "DTYPES", "bound_tightness", "bounds_by_precision", "box_counterexamples",
           "certify_failure_probability", "committed_shadows", "counterexamples", "disjoint_balls", "empirical_radius",
           "energy_share", "exact_margins", "first_image_per_class", "halfspace_classifier", "halfspace_truth",
           "ibp_lower_in", "image_metrics", "in_precision", "lcb_exceeds_probability", "linear_classifier",
           "linear_smoothing", "loss_along_directions", "outside_box", "precision_rows", "radius_cap",
           "repeated_certify", "robust_brackets", "rounded_box", "rounding_sources", "round_weights", "thumbnails",
           "tiny_mlp", "vote_changes", "wrong_certificates"]
