"""The checkers of lesson 04's exercises (the Shadow Attack).

Each takes the student's ``answer`` first and the evidence it needs, and returns a ``grading.Feedback``."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from shadowlab.lab import grading
from shadowlab.lab.lessons import disjoint_balls, radius_cap
from shadowlab.lab.notebook import most_likely_wrong
from shadowlab.perception import MIN_SSIM, ssim


def _bools(name: str, value: Any, length: int) -> list[bool]:
    """A list of ``length`` yes/no answers, one per image (each as ``as_bool``)."""
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (Sequence, np.ndarray, torch.Tensor)):
        raise TypeError(f"{name}={value!r} must be a list of {length} booleans, one per image")
    items = list(value.tolist() if isinstance(value, (np.ndarray, torch.Tensor)) else value)
    if len(items) != length:
        raise ValueError(f"{name} must hold {length} booleans (one per image), got {len(items)}")
    return [grading.as_bool(f"{name}[{i}]", v) for i, v in enumerate(items)]


def check_04_1(answer: bool | None, res_default: Any, res_low: Any) -> grading.Feedback:
    """Does lowering lambda_s (res_low, 3 channels) leave a larger final Dissim than the default run?"""
    if answer is None:
        return grading.pending("04.1", "True or False: compare how far the two 3-channel runs leave the channels apart "
                                       "at the end")
    for name, r in (("res_default", res_default), ("res_low", res_low)):
        if grading.require_run(name, r).config.channels != 3:
            raise ValueError(f"{name} must be a 3-channel attack (ShadowConfig channels=3)")
    if not res_low.config.lambda_s < res_default.config.lambda_s:
        raise ValueError("res_low must use a smaller lambda_s than res_default")
    a, b = grading.final_term(res_default, "dissim"), grading.final_term(res_low, "dissim")
    expected = b > a
    why = (f"final Dissim: lambda_s {res_default.config.lambda_s:g}: {a:.3f}, lambda_s {res_low.config.lambda_s:g}: "
           f"{b:.3f}. Dissim is the only term that keeps the channels alike; without it the colours drift.")
    return grading.verdict("04.1", grading.as_bool("answer", answer) == expected, expected, why, answer)


def check_04_2(answer: Mapping[str, Sequence[float]] | None, x: torch.Tensor,
               results: Mapping[float, Any]) -> grading.Feedback:
    """{"spoofs": [lambda_tv, ...], "looks_like": [lambda_tv, ...]} over {lambda_tv: ShadowResult} on images x:
    which values certify the wrong label for every image, and which keep every SSIM >= perception.MIN_SSIM."""
    if answer is None:
        return grading.pending("04.2", "for each lambda_tv: is the wrong label certified for every image, and does "
                                       "every shadow still look like its image (SSIM)?")

    given = grading.as_mapping("answer", answer, ("spoofs", "looks_like"))
    for key, value in given.items():
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise TypeError(f"answer[{key!r}]={value!r} must be a list of lambda_tv values")
        for v in value:
            grading.as_number(f"answer[{key!r}] item", v)
    if not isinstance(results, Mapping) or len(results) < 2:
        raise ValueError("results must map at least two lambda_tv values to their ShadowResult: run the sweep first")
    spoofs, looks, lines = [], [], []
    for lam, r in results.items():
        s = ssim(x.to(r.x_shadow.device), r.x_shadow)
        certified = bool((r.prediction == r.target).all())
        if certified:
            spoofs.append(float(lam))
        if bool((s >= MIN_SSIM).all()):
            looks.append(float(lam))
        lines.append(f"lambda_tv {lam:g}: wrong label certified {certified}, SSIM {s.min().item():.3f}")
    expected = {"spoofs": sorted(spoofs), "looks_like": sorted(looks)}
    got = {k: sorted(float(v) for v in given[k]) for k in expected}
    why = "; ".join(lines) + f" (looks like the original: SSIM >= {MIN_SSIM} for every image)."
    return grading.verdict("04.2", got == expected, expected, why, answer)


def check_04_3(answer: float | None, sigma: float, n: int, alpha: float, res_small: Any = None, res_big: Any = None,
               steps: int = 100, noise_samples: int = 64) -> grading.Feedback:
    """The largest radius CERTIFY can give at n samples for this sigma, after the student's run ``res_big`` at
    ``steps`` and ``noise_samples`` (validated); ``res_small`` (the lesson's run) is what its radii are compared with.
    """
    if answer is None:
        return grading.pending("04.3", "run the longer attack first; then ask what the largest radius is that CERTIFY "
                                       "can state with this many samples, whatever the image")

    value = grading.as_number("answer", answer)
    grading.require_run("res_big", res_big, steps=steps, noise_samples=noise_samples)
    if res_small is not None and res_small.config.steps >= steps:
        raise ValueError(f"res_small must be the lesson's shorter run (fewer than {steps} steps)")
    cap = radius_cap(sigma, n, alpha)
    big = torch.as_tensor(res_big.radius).float()
    why = (f"sigma {sigma:g}, n = {n}, alpha = {alpha}: cap {cap:.4f}. At {steps} steps and {noise_samples} noise "
           f"samples the largest spoofed radius is {float(big.max()):.4f}")
    if res_small is not None:
        small = torch.as_tensor(res_small.radius).float()
        why += (f" (mean {float(big.mean()):.4f}) against {float(small.max()):.4f} (mean {float(small.mean()):.4f}) "
                f"at {res_small.config.steps} steps")
    why += (": at the cap, so more steps cannot show a larger one without more samples." if
            math.isclose(float(big.max()), cap, rel_tol=1e-6) else ": below the cap.")
    return grading.verdict("04.3", abs(value - cap) <= 1e-3, round(cap, 4), why, answer)


def check_04_4(answer: Sequence[bool] | None, distances: Sequence[float] | None, x: torch.Tensor, res: Any
                ) -> grading.Feedback:
    """Per image: does ||x_shadow - x||_2 >= r_natural + r_spoofed hold (lessons.disjoint_balls)?

    Graded with the student's measurement ``distances`` (||x_shadow - x||_2 per image), checked against the run's
    images here: a typed list of booleans without it is refused."""
    if answer is None:
        return grading.pending("04.4", "one boolean per image: measure how far each shadow moved (keep the distances "
                                       "in `distances`); can the natural certificate's ball and the spoofed one's "
                                       "both hold?")

    ok_balls = disjoint_balls(x.cpu(), res.x_shadow.cpu(), res.natural_radius.cpu(), res.radius.cpu())
    expected = [bool(v) for v in ok_balls]
    given = _bools("answer", answer, len(expected))
    dist = (res.x_shadow.cpu() - x.cpu()).flatten(1).norm(dim=1)
    grading.check_evidence("distances", distances, dist.tolist(), "||x_shadow - x||_2, one per image",
                           "the L2 norm of each image's shadow perturbation (res.x_shadow - x)", tol=1e-4)
    why = ("; ".join(f"image {i}: ||delta||_2 {d:.2f} vs {a:.3f} + {b:.3f}" for i, (d, a, b) in enumerate(
        zip(dist.tolist(), res.natural_radius.tolist(), res.radius.tolist())))
           + ". Both certificates can hold only if the balls are disjoint; each holds with probability >= 1 - alpha.")
    return grading.verdict("04.4", given == expected, expected, why, answer)


def _classes(name: str, value: Any) -> list[int]:
    """A list of class indices (a list, tuple, array or tensor of whole numbers)."""
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (Sequence, np.ndarray, torch.Tensor)):
        raise TypeError(f"{name}={value!r} must be a list of class indices")
    items = value.tolist() if isinstance(value, (np.ndarray, torch.Tensor)) else list(value)
    return [grading.as_count(f"{name}[{i}]", v) for i, v in enumerate(items)]


def check_04_5(answer: Sequence[bool] | None, candidates: Mapping[str, Sequence[Any]] | None, res: Any,
               model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> grading.Feedback:
    """Per image: is the wrong class the model ranks highest among the best-scored targets (largest
    candidate_score, ties included)?

    Graded with what the student read off: ``candidates`` ({"best": [the targets tied for the best score, per
    image], "second": [the wrong class the model ranks highest, per image]}), checked against the run and the model
    here: a typed list of booleans without it is refused."""
    if answer is None:
        return grading.pending("04.5", "per image: which target(s) scored best among the candidates, and which wrong "
                                       "class does the model rank highest on the natural image? Keep both in "
                                       "`candidates`")

    score, targets = res.candidate_score.cpu(), res.candidate_targets.cpu()
    second = most_likely_wrong(model, x, y).cpu()
    # every target that ties for the best score counts, so that a tie never decides the answer by class index
    best = [targets[i][score[i] == score[i].max()].tolist() for i in range(len(score))]
    expected = [int(s) in b for s, b in zip(second, best)]
    given = _bools("answer", answer, len(expected))
    found = grading.as_evidence("candidates", candidates, ("best", "second"), "one entry per image")
    if not isinstance(found["best"], (Sequence, np.ndarray, torch.Tensor)) or isinstance(found["best"], (str, bytes)) \
            or len(found["best"]) != len(best):
        raise TypeError(f"candidates['best'] must be a list of {len(best)} lists of targets, one per image")
    got_best = [sorted(_classes(f"candidates['best'][{i}]", b)) for i, b in enumerate(found["best"])]
    if got_best != [sorted(b) for b in best]:
        raise ValueError("candidates['best'] is not what res.candidate_score gives: per image, every candidate target "
                         "whose score equals the image's best score")
    if _classes("candidates['second']", found["second"]) != second.tolist():
        raise ValueError("candidates['second'] is not the wrong class the model ranks highest on each natural image")
    why = (f"best-scored targets (ties listed) {best}, the model's second-ranked classes {second.tolist()} (a "
           "candidate score of 0 means no target was certified: then every target ties).")
    return grading.verdict("04.5", given == expected, expected, why, answer)
