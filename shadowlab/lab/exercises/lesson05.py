"""The checkers of lesson 05's exercises (ablations).

Each takes the student's ``answer`` first and the evidence it needs, and returns a ``grading.Feedback``."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from shadowlab.lab import grading


# ================================================================================================ lesson 05
def check_05_1(answer: float | None, lambda_tv: float = 3.0, channels: int = 1) -> grading.Feedback:
    """A learning rate at which gradient descent on lambda_tv * TV is stable: lr * lambda_tv * 16 * 3 < 2 (1 channel).
    """
    if answer is None:
        return grading.pending("05.1", "gradient descent on a quadratic is stable while lr times the largest Hessian "
                                       "eigenvalue is below 2; bound TV's eigenvalue")
    lr = grading.as_number("answer", answer)
    limit = 2 / (lambda_tv * 16 * (3 if channels == 1 else 1))
    why = (f"stable for lr < {limit:.4f} at lambda_tv = {lambda_tv:g}, {channels} channel(s): the TV Hessian's largest "
           "eigenvalue is just below 16 per channel, tripled for a map repeated on R, G, B.")
    return grading.verdict("05.1", 0 < lr < limit, f"0 < lr < {limit:.4f}", why, answer)


def check_05_2(answer: Sequence[str] | None, res_zeros: Any, terms: Sequence[str] = ("classification", "color", "tv")
               ) -> grading.Feedback:
    """Which loss terms start at exactly 0 with init="zeros" (from the run's history)?"""
    if answer is None:
        return grading.pending("05.2", "a list of term names: which terms are zero for a zero perturbation?")
    if grading.require_run("res_zeros", res_zeros).config.init != "zeros":
        raise ValueError("res_zeros must come from ShadowConfig(init='zeros')")
    if isinstance(answer, (str, bytes)) or not isinstance(answer, Sequence):
        raise TypeError(f"answer={answer!r} must be a list of term names from {list(terms)}")
    for term in answer:
        grading.as_choice("answer item", term, tuple(terms))
    expected = sorted(t for t in terms if float(res_zeros.history[t][0]) == 0.0)
    why = (", ".join(f"{t} starts at {float(res_zeros.history[t][0]):.4g}" for t in terms)
           + f"; spoofed certificates: {int(res_zeros.success.sum())} of {len(res_zeros.success)}. TV and C of a zero "
           "perturbation are 0; the classification loss is that of the natural image.")
    return grading.verdict("05.2", sorted(answer) == expected, expected, why, answer)


def check_05_3(answer: float | None, dissim_by_s: Mapping[float, float] | None, by_s: Sequence[Mapping[str, Any]]
               ) -> grading.Feedback:
    """The lambda_s of a sweep (records of widgets.sweep) with the smallest final Dissim.

    Graded with the student's reading ``dissim_by_s`` ({lambda_s: final Dissim of its run}, every lambda_s of the
    sweep), checked against the sweep's runs: a typed lambda_s without it is refused."""
    if answer is None:
        return grading.pending("05.3", "read each run's Dissim at the last step (keep them in `dissim_by_s`); answer "
                                       "the lambda_s whose run ends with the channels closest together")
    value = grading.as_number("answer", answer)
    finals = {float(r["lambda_s"]): grading.final_term(r["result"], "dissim") for r in by_s}
    grading.check_evidence("dissim_by_s", dissim_by_s, finals, "Dissim at the last step",
                           "the last Dissim of that lambda_s's run in the sweep (its history)", tol=1e-4)
    expected = min(finals, key=finals.get)
    why = (", ".join(f"lambda_s {k:g}: {v:.4f}" for k, v in finals.items())
           + ". As lambda_s grows the three channels are forced equal: the 3-channel perturbation becomes a grey map,"
           " i.e. the 1-channel attack.")
    return grading.verdict("05.3", math.isclose(value, expected), expected, why, answer)


def check_05_4(answer: tuple[float, float] | None, cell_scores: Mapping[tuple[float, float], Any] | None,
               grid: Sequence[Mapping[str, Any]]) -> grading.Feedback:
    """(lambda_tv, lambda_c) of a sweep with the highest success rate, ties broken by the mean spoofed radius.

    Graded with the student's reading ``cell_scores`` ({(lambda_tv, lambda_c): (success rate, mean spoofed radius)},
    every cell of the sweep), checked against the sweep's runs: a typed pair without it is refused."""
    if answer is None:
        return grading.pending("05.4", "read every cell's success rate and mean radius (keep them in `cell_scores`); "
                                       "answer (lambda_tv, lambda_c) of the best cell: success first, then mean radius")
    pair = tuple(grading.as_number("answer item", a) for a in grading.as_tuple("answer", answer, 2, "tuple "
                                                                                                    "(lambda_tv, "
                                                                                                    "lambda_c)"))
    score = {(float(r["lambda_tv"]), float(r["lambda_c"])): (r["result"].success_rate,
                                                             float(r["result"].radius.mean())) for r in grid}
    grading.check_evidence("cell_scores", cell_scores, score, "(success rate, mean spoofed radius)",
                           "that cell's run in the sweep (its success_rate and mean radius)", tol=1e-4)
    best = max(score.values())
    tied = [k for k, v in score.items() if v == best]
    why = (f"best cells {tied}: success {100 * best[0]:.0f}%, mean radius {best[1]:.3f}. Too little TV or C gives "
           "noisy, visible perturbations; too much keeps the attack from reaching its target.")
    return grading.verdict("05.4", pair in tied, tied[0] if len(tied) == 1 else tied, why, answer)


def check_05_5(answer: bool | None, res: Any) -> grading.Feedback:
    """With noise_samples=1: is the final target fraction on the training noise larger than the share of images whose
    wrong label is certified (``res.spoof_rate``, whatever the SSIM)?"""
    if answer is None:
        return grading.pending("05.5", "compare how well the run fits its training noise at the end with how many "
                                       "images CERTIFY spoofs")
    answer = grading.as_bool("answer", answer)
    grading.require_run("res_one", res, noise_samples=1)
    fit, certified = grading.final_term(res, "target_fraction"), float(getattr(res, "spoof_rate", res.success_rate))
    expected = fit > certified
    why = (f"{res.config.noise_samples} noise sample(s): {100 * fit:.0f}% of the training-noise predictions are the "
           f"target, {100 * certified:.0f}% of the images get a certificate. Fitting a few fixed noise draws is not "
           "the same as moving the smoothed classifier, which CERTIFY measures on fresh noise.")
    return grading.verdict("05.5", answer == expected, expected, why, answer)
