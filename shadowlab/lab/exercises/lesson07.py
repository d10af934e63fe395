"""The checkers of lesson 07's exercises (how certificates mislead).

Each takes the student's ``answer`` first and the evidence it needs, and returns a ``grading.Feedback``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from shadowlab.certify.bounds import certified_margins, margin_spec
from shadowlab.lab import grading
from shadowlab.lab.lessons import (
    bounds_by_precision,
    committed_shadows,
    image_metrics,
    in_precision,
    radius_cap,
    repeated_certify,
    round_weights,
)
from shadowlab.perception import MIN_SSIM


# ================================================================================================ lesson 07
def _gained_in(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, dtype: str) -> dict[str, Any]:
    """IBP certificates in float64 and in ``dtype`` (lessons.bounds_by_precision) and the images certified only in
    ``dtype`` (a bool mask)."""
    res = bounds_by_precision(model, x, y, eps, dtypes=("float64", dtype))
    return {"float64": res["float64"]["certified"], "gained": res[dtype]["certified"] & ~res["float64"]["certified"]}


def check_07_1(answer: int | None, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
               dtype: str = "bfloat16") -> grading.Feedback:
    """How many images does the network with weights rounded to ``dtype``, bounded by IBP in float64
    (lessons.round_weights), certify that the original network, bounded in float64, does not?"""
    if answer is None:
        return grading.pending("07.1", "bound the network with rounded weights and the original one in the same high "
                                       "precision; count what only the rounded one certifies")

    count = grading.as_count("answer", answer)
    original = bounds_by_precision(model, x, y, eps, dtypes=("float64",))["float64"]["certified"]
    rounded = bounds_by_precision(round_weights(model, dtype), x, y, eps, dtypes=("float64",))["float64"]["certified"]
    gained = int((rounded & ~original).sum())
    lost = int((original & ~rounded).sum())
    why = (f"with its weights rounded to {dtype} the network certifies {gained} of {len(x)} images the original does "
           f"not (and loses {lost}), with every bound computed in float64. Part of a low-precision certificate's "
           "error is a different network, not arithmetic: a certificate holds for one set of weights only.")
    return grading.verdict("07.1", count == gained, gained, why, answer)


def check_07_2(answer: int | None, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
               dtype: str = "bfloat16", num_classes: int = 10) -> grading.Feedback:
    """Of the images IBP certifies in ``dtype`` but not in float64, how many does the tightest sound bound in
    float64 (bounds.certified_margins: the larger of CROWN-IBP and IBP) certify?"""
    if answer is None:
        return grading.pending("07.2", "take the images certified only in low precision and bound them again with the "
                                       "tightest sound method in float64")

    count = grading.as_count("answer", answer)
    gained = _gained_in(model, x, y, eps, dtype)["gained"].to(x.device)
    n_gained = int(gained.sum())
    if n_gained == 0:
        confirmed = 0
    else:
        C = margin_spec(y[gained], num_classes).double()
        lower = certified_margins(in_precision(model, "float64"), x[gained].double(), eps, C)
        confirmed = int((lower >= 0).all(1).sum())
    why = (f"{dtype} IBP certifies {n_gained} images that float64 IBP does not; the tightest sound bound in float64 "
           f"certifies {confirmed} of them. An unsound computation can still state something true: only a sound "
           "bound (confirms) or a counterexample (refutes) tells which.")
    return grading.verdict("07.2", count == confirmed, confirmed, why, answer)


def check_07_3(answer: float | None, n: int = 100_000, alpha: float = 0.001,
               test_set: int = 10_000) -> grading.Feedback:
    """The largest CERTIFY radius, in units of sigma, with n samples when each certificate uses alpha / test_set
    (Bonferroni: all test_set certificates then hold together with probability >= 1 - alpha)."""
    if answer is None:
        return grading.pending("07.3", "split alpha over every certificate of the test set (Bonferroni), then the "
                                       "radius cap in units of sigma")

    value = grading.as_number("answer", answer)
    cap, plain = radius_cap(1.0, n, alpha / test_set), radius_cap(1.0, n, alpha)
    why = (f"with all {n} votes for c_A: {cap:.3f} sigma at alpha / {test_set} = {alpha / test_set:.0e}, against "
           f"{plain:.3f} sigma at alpha = {alpha}. Holding every certificate of a test set at once costs radius, "
           "and only more samples buy it back.")
    return grading.verdict("07.3", abs(value - cap) <= 5e-3, round(cap, 3), why, answer)


def check_07_4(answer: int | None, smooth: Any, x_value: float, n_grid: Sequence[int], n0: int, alpha: float,
               repeats: int, seed: int = 0, threshold: float = 0.5) -> grading.Feedback:
    """The smallest n of ``n_grid`` at which CERTIFY of the half-space (``smooth``, a Smooth around
    lessons.halfspace_classifier(threshold)) at pixel value x_value abstains in fewer than half of ``repeats``
    independent runs (lessons.repeated_certify with ``seed``)."""
    if answer is None:
        return grading.pending("07.4", "certify the same input many times at each n of the grid; the first n at which "
                                       "it abstains in fewer than half the runs")

    answer = grading.as_count("answer", answer)
    grading.as_choice("answer", answer, tuple(int(v) for v in n_grid))
    x = torch.full((1, 1, 1, 1), float(x_value), device=smooth.device)
    rates = {}
    for n in n_grid:
        pred, _ = repeated_certify(smooth, x, n0, int(n), alpha, repeats, seed)
        rates[int(n)] = float((pred == -1).mean())
    below = [n for n, r in rates.items() if r < 0.5]
    expected = below[0] if below else None
    why = (", ".join(f"n = {n}: abstains {100 * r:.0f}%" for n, r in rates.items())
           + f" (x = {x_value}, n0 = {n0}). More n tightens the bound on p_A; the abstentions that remain come from "
           "the n0 samples picking the wrong class, which n cannot fix.")
    if expected is None:
        why += " The rate never falls below 1/2 on this grid: extend it."
    return grading.verdict("07.4", expected is not None and int(answer) == expected, expected, why, answer)


def check_07_5(answer: int | None, psnr_db: float = 30.0, results_dir: Any = None) -> grading.Feedback:
    """How many committed Table 1 rows have a certified wrong label (``spoofed``) and a shadow with PSNR >= psnr_db
    (the success rule with PSNR in place of SSIM >= perception.MIN_SSIM)?"""
    if answer is None:
        return grading.pending("07.5", "the committed Table 1 shadows: which rows are spoofed and pass the PSNR rule "
                                       "in place of SSIM?")

    count = grading.as_count("answer", answer)
    psnr_db = grading.as_number("psnr_db", psnr_db)
    t1 = committed_shadows("table1", results_dir)
    m = image_metrics(t1["x"], t1["x_shadow"])
    spoofed = np.array([r["spoofed"] == "True" for r in t1["rows"]])
    by_psnr = int((spoofed & (m["psnr"] >= psnr_db)).sum())
    by_ssim = int((spoofed & (m["ssim"] >= MIN_SSIM)).sum())
    why = (f"{by_psnr} of {len(spoofed)} rows pass the PSNR >= {psnr_db:g} dB rule, {by_ssim} the SSIM >= {MIN_SSIM} "
           "rule. PSNR is a function of the L2 size alone; SSIM also sees that a smooth, grey change keeps the "
           "image's structure. The success rate is a property of the metric as much as of the attack.")
    return grading.verdict("07.5", count == by_psnr, by_psnr, why, answer)
