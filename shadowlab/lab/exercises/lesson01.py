"""The checkers of lesson 01's exercises (adversarial examples).

Each takes the student's ``answer`` first and the evidence it needs, and returns a ``grading.Feedback``."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from shadowlab import checkpoints
from shadowlab.attacks import fgsm
from shadowlab.defenses.evaluate import accuracy_vs_eps
from shadowlab.lab import grading
from shadowlab.perception import MIN_SSIM, ssim


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model.eval()(x).argmax(1) == y).float().mean())


# ================================================================================================ lesson 01
def check_01_1(answer: float | None, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
               eps_255: Sequence[float] = (0, 0.25, 0.5, 1, 2)) -> grading.Feedback:
    """Smallest budget of the grid (units of 1/255) at which FGSM halves the clean accuracy."""
    if answer is None:
        return grading.pending("01.1", "the first eps of the grid whose FGSM accuracy is at most half the eps-0 "
                                       "accuracy")

    acc = accuracy_vs_eps(model, x, y, [e / 255 for e in eps_255], attack="fgsm", device=x.device)
    clean = _accuracy(model, x, y)
    halved = [e for e, a in zip(eps_255, acc) if a <= clean / 2]
    expected = halved[0] if halved else None
    table = ", ".join(f"{e}/255: {100 * a:.1f}%" for e, a in zip(eps_255, acc))
    why = f"FGSM accuracy {table}; half of the clean {100 * clean:.1f}% is {50 * clean:.1f}%."
    if expected is None:
        why += " It does not halve on this grid: extend it."
    return grading.verdict("01.1", answer is not None and expected is not None and math.isclose(
        grading.as_number("answer", answer), expected), expected, why, answer)


def check_01_2(answer: float | None, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
               eps: float) -> grading.Feedback:
    """Fraction of images whose targeted-FGSM prediction is exactly the target (y + 1) % 10 (answer in [0, 1])."""
    if answer is None:
        return grading.pending("01.2", "a targeted FGSM step towards the class after each label; then the share of "
                                       "images the model puts exactly on that target")

    target = (y + 1) % 10
    x_adv = fgsm(model, x, target, eps, targeted=True).x_adv
    with torch.no_grad():
        hit = float((model.eval()(x_adv).argmax(1) == target).float().mean())
    ok = abs(grading.as_number("answer", answer) - hit) <= 0.5 / len(x)
    why = (f"{100 * hit:.1f}% of the {len(x)} images land exactly on the target at eps = {255 * eps:.3g}/255: a "
           "targeted step must reach one of ten regions, so it succeeds less often than an untargeted one.")
    return grading.verdict("01.2", ok, round(hit, 4), why, answer)


def check_01_3(answer: bool | None, fgsm_accuracy: Mapping[str, float] | None, undefended: nn.Module,
               defended: nn.Module | str, x: torch.Tensor, y: torch.Tensor, eps: float) -> grading.Feedback:
    """Is the noise-trained (defended) base classifier more accurate under FGSM at eps than the undefended one?
    ``defended`` is a model or a committed checkpoint name.

    Graded with the student's measurement ``fgsm_accuracy`` ({"undefended": accuracy, "defended": accuracy}, in
    [0, 1]), checked against the same FGSM attack here (to within half an image): a typed True/False without it is
    refused."""
    if answer is None:
        return grading.pending("01.3", "attack both models with the same FGSM budget, keep both accuracies in "
                                       "`fgsm_accuracy` and compare them; answer True or False")

    answer = grading.as_bool("answer", answer)
    if isinstance(defended, str):
        defended = checkpoints.load(defended, device=x.device)[0]

    acc = [_accuracy(m, fgsm(m, x, y, eps).x_adv, y) for m in (undefended, defended)]
    grading.check_evidence("fgsm_accuracy", fgsm_accuracy, {"undefended": acc[0], "defended": acc[1]}, "accuracy in "
                                                                                                       "[0, 1]",
                           f"FGSM at eps = {255 * eps:.3g}/255 on each model", tol=0.5 / len(x))
    expected = acc[1] > acc[0]
    why = (f"FGSM accuracy at {255 * eps:.3g}/255: undefended {100 * acc[0]:.1f}%, defended {100 * acc[1]:.1f}%. "
           "Either way it is no certificate: a failed attack proves nothing (a stronger one may succeed), and the "
           "certificate of lesson 3 is about the smoothed classifier g, not the base model f.")
    return grading.verdict("01.3", answer == expected, expected, why, answer)


def raw_gradient_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """The un-signed variant of exercise 01.4: x + eps g / max|g| per image (same L-inf size as FGSM), clipped."""
    xg = x.detach().clone().requires_grad_(True)
    loss = nn.functional.cross_entropy(model.eval()(xg), y, reduction="sum")
    (g,) = torch.autograd.grad(loss, xg)
    scale = g.flatten(1).abs().amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return (x + eps * g / scale).clamp(0, 1).detach()


def check_01_4(answer: str | None, step_accuracy: Mapping[str, float] | None, model: nn.Module, x: torch.Tensor,
               y: torch.Tensor, eps: float) -> grading.Feedback:
    """Which step lowers the accuracy more at the same L-inf size: "sign" (FGSM) or "raw" (eps g / max|g|)?

    Graded with the student's measurement ``step_accuracy`` ({"sign": accuracy, "raw": accuracy}, in [0, 1]),
    checked against both steps here (to within half an image): a typed choice without it is refused."""
    if answer is None:
        return grading.pending("01.4", "measure the accuracy under each step at the same L-inf size, keep both in "
                                       "`step_accuracy`; answer 'sign' or 'raw': the one with the lower accuracy")

    grading.as_choice("answer", answer, ("sign", "raw"))
    acc_sign = _accuracy(model, fgsm(model, x, y, eps).x_adv, y)
    acc_raw = _accuracy(model, raw_gradient_step(model, x, y, eps), y)
    grading.check_evidence("step_accuracy", step_accuracy, {"sign": acc_sign, "raw": acc_raw}, "accuracy in [0, 1]",
                           f"each step at eps = {255 * eps:.3g}/255 (the raw one: eps g / max|g| per image)",
                           tol=0.5 / len(x))
    expected = "sign" if acc_sign <= acc_raw else "raw"
    why = (f"accuracy: sign {100 * acc_sign:.1f}%, raw {100 * acc_raw:.1f}%. To first order the loss rises by "
           "eps ||g||_1 with the sign and by eps ||g||_2^2 / ||g||_inf with the raw gradient, never more: the sign "
           "uses the whole L-inf budget on every pixel.")
    ok = answer == expected or acc_sign == acc_raw
    return grading.verdict("01.4", ok, expected, why, answer)


def check_01_5(answer: float | None, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
               eps_255: Sequence[float] = (1, 2, 4, 8, 16, 32)) -> grading.Feedback:
    """Smallest budget of the grid at which the mean SSIM of FGSM images falls below perception.MIN_SSIM."""
    if answer is None:
        return grading.pending("01.5", "measure how alike the FGSM images stay (SSIM, lesson's perception module) as "
                                       "the budget grows, against the project's threshold")

    values = [float(ssim(x, fgsm(model, x, y, e / 255).x_adv).mean()) for e in eps_255]
    below = [e for e, s in zip(eps_255, values) if s < MIN_SSIM]
    expected = below[0] if below else None
    why = (", ".join(f"{e}/255: SSIM {s:.3f}" for e, s in zip(eps_255, values))
           + f". The project counts an image as visibly changed below SSIM {MIN_SSIM}; compare it with what you saw.")
    ok = expected is not None and math.isclose(grading.as_number("answer", answer), expected)
    return grading.verdict("01.5", ok, expected, why, answer)
