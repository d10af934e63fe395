"""The checkers of lesson 02's exercises (PGD).

Each takes the student's ``answer`` first and the evidence it needs, and returns a ``grading.Feedback``."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from shadowlab.attacks import pgd
from shadowlab.defenses.evaluate import accuracy_vs_eps
from shadowlab.lab import grading


# ================================================================================================ lesson 02
def check_02_1(answer: float | None, runs: Mapping[int, Sequence[float]], model: nn.Module, x: torch.Tensor,
               y: torch.Tensor, eps_255: Sequence[float], steps: tuple[int, int] = (10, 50),
               seed: int = 0) -> grading.Feedback:
    """Largest change (percentage points) of PGD accuracy over the eps grid between steps[0] and steps[1] steps, read
    from the student's ``runs`` ({steps: accuracy_vs_eps(..., "pgd", steps=steps, seed=seed) over eps_255}).

    The runs are validated, not recomputed: both step counts present, one accuracy in [0, 1] per budget, and the
    decisive budget (the largest change) recomputed for both step counts must match them.
    """
    if answer is None:
        return grading.pending("02.1", "measure PGD accuracy over the budget grid at both step counts (keep both in "
                                       "`runs`), then the largest change between them")

    value = grading.as_number("answer", answer)
    given = grading.as_mapping("runs", runs, steps)
    acc = {}
    for s, run in given.items():
        if isinstance(run, (str, bytes, Mapping)) or not isinstance(run, (Sequence, np.ndarray)):
            raise TypeError(f"runs[{s}] must be the accuracies over eps_255 (accuracy_vs_eps's array)")
        acc[s] = np.asarray([grading.as_number(f"runs[{s}] item", v) for v in run])
        if len(acc[s]) != len(eps_255) or not ((acc[s] >= 0) & (acc[s] <= 1)).all():
            raise ValueError(f"runs[{s}] must hold {len(eps_255)} accuracies in [0, 1], one per budget of "
                             f"{list(eps_255)}, got {acc[s].tolist()}")
    a, b = acc[steps[0]], acc[steps[1]]
    k = int(np.abs(b - a).argmax())
    if eps_255[k] != 0:      # the decisive budget: the run must be the one the exercise asks for
        for s in steps:
            again = float(accuracy_vs_eps(model, x, y, [eps_255[k] / 255], "pgd", device=x.device, steps=s,
                                          seed=seed)[0])
            if abs(again - acc[s][k]) > 1e-6:
                raise ValueError(f"runs[{s}] at {eps_255[k]}/255 is {100 * acc[s][k]:.1f}%, but PGD-{s} with seed "
                                 f"{seed} on these images gives {100 * again:.1f}%: runs[{s}] must come from "
                                 f"accuracy_vs_eps(model, x, y, eps, 'pgd', steps={s}, seed={seed})")
    change = float(100 * np.abs(b - a).max())
    why = (f"PGD-{steps[0]} {np.round(100 * a, 1).tolist()}% against PGD-{steps[1]} {np.round(100 * b, 1).tolist()}%."
           " An attack has converged when more steps (and restarts) no longer lower the accuracy.")
    ok = abs(value - change) <= 50 / len(x)
    return grading.verdict("02.1", ok, round(change, 2), why, answer)


STEP_SIZES: dict[str, Callable[[float, int], dict[str, Any]]] = {
    "eps/10": lambda eps, steps: {"step_size": eps / 10},
    "default": lambda eps, steps: {},                     # 2.5 eps / steps: eps / 4 at 10 steps
    "eps/2": lambda eps, steps: {"step_size": eps / 2},
    "cosine": lambda eps, steps: {"step_schedule": "cosine"},
}


def check_02_2(answer: str | None, step_losses: Mapping[str, float] | None, model: nn.Module, x: torch.Tensor,
               y: torch.Tensor, eps: float, steps: int = 10, seed: int = 0, at_step: int = 2) -> grading.Feedback:
    """Which step-size choice of STEP_SIZES has the highest loss after ``at_step`` steps?

    Graded with the student's measurement ``step_losses`` ({choice: mean loss after ``at_step`` steps}, one per key
    of STEP_SIZES), checked against the same PGD runs here: a typed choice without it is refused."""
    if answer is None:
        return grading.pending("02.2", f"one of {', '.join(STEP_SIZES)}: run PGD with each, keep its loss after "
                                       f"{at_step} steps in `step_losses` and compare them")

    grading.as_choice("answer", answer, tuple(STEP_SIZES))
    loss = {k: float(pgd(model, x, y, eps, steps=steps, seed=seed, **kw(eps, steps)).loss_history[at_step])
            for k, kw in STEP_SIZES.items()}
    grading.check_evidence("step_losses", step_losses, loss, f"mean loss after {at_step} steps",
                           f"pgd(..., steps={steps}, seed={seed}) with that step size (its loss_history[{at_step}])",
                           tol=1e-4)
    best = max(loss.values())
    expected = max(loss, key=loss.get)
    why = (", ".join(f"{k}: {v:.3f}" for k, v in loss.items()) + f" (mean cross-entropy after {at_step} steps). "
           f"The default 2.5 eps / steps is eps/{steps / 2.5:g} at {steps} steps; larger steps rise faster at first, "
           "a cosine schedule starts at the default and shrinks.")
    return grading.verdict("02.2", loss[answer] == best, expected, why, answer)


def _attack_run(name: str, res: Any, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int,
                restarts: int) -> float:
    """Validate a student's untargeted L-inf PGD run on (x, y) (its eps, steps, restarts, one verdict per image, and
    its verdicts against one forward pass of its own images); returns its accuracy."""
    if res is None or not hasattr(res, "loss_history"):
        raise ValueError(f"{name} must be the pgd(...) run the exercise asks for (an AttackResult), got {res!r}")
    shape = (steps,) if restarts == 1 else (restarts, steps)
    got = {"eps": res.eps, "norm": res.norm, "targeted": res.targeted, "loss_history shape": tuple(
        res.loss_history.shape), "images": len(res.success)}
    want = {"eps": eps, "norm": "linf", "targeted": False, "loss_history shape": shape, "images": len(x)}
    wrong = [k for k in want if (not math.isclose(got[k], want[k]) if k == "eps" else got[k] != want[k])]
    if wrong:
        raise ValueError(f"{name} must be pgd(model, x, y, {eps:.4g}, steps={steps}, restarts={restarts}) on these "
                         f"{len(x)} images; it differs in {', '.join(f'{k} ({got[k]!r})' for k in wrong)}")
    with torch.no_grad():
        fooled = model.eval()(res.x_adv.to(x.device)).argmax(1) != y
    if not torch.equal(fooled.cpu(), res.success.cpu().bool()):
        raise ValueError(f"{name}.success does not match the model's predictions on {name}.x_adv: use the run itself")
    return 1 - float(res.success.float().mean())


def check_02_3(answer: float | None, one_start: Any, restarted: Any, model: nn.Module, x: torch.Tensor,
               y: torch.Tensor, eps: float, steps: int = 10, restarts: int = 5) -> grading.Feedback:
    """Accuracy drop (percentage points) from one start to ``restarts`` restarts of PGD at eps, read from the
    student's two runs (``pgd(...)`` with restarts=1 and with ``restarts``; validated by ``_attack_run``, one forward
    pass each, no attack recomputed)."""
    if answer is None:
        return grading.pending("02.3", "run PGD once with one start and once with several restarts (keep both runs), "
                                       "then compare the accuracies they leave")
    value = grading.as_number("answer", answer)
    acc = [_attack_run("one_start", one_start, model, x, y, eps, steps, 1),
           _attack_run("restarted", restarted, model, x, y, eps, steps, restarts)]
    drop = 100 * (acc[0] - acc[1])
    why = (f"accuracy {100 * acc[0]:.1f}% with 1 start, {100 * acc[1]:.1f}% with {restarts}: each image keeps its "
           "best restart, so the accuracy can only fall.")
    return grading.verdict("02.3", abs(value - drop) <= 50 / len(x), round(drop, 2), why, answer)


def check_02_4(answer: tuple[float | None, float | None] | None, success_rates: Mapping[str, Sequence[float]] | None,
               model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps_255: Sequence[float], rate: float = 0.5,
               steps: int = 10, seed: int = 0) -> grading.Feedback:
    """(untargeted, targeted) smallest eps of the grid (x 1/255) with PGD success rate >= rate; None if never.

    Graded with the student's measurement ``success_rates`` ({"untargeted": [rate per budget of eps_255],
    "targeted": [...]}, in [0, 1]; at eps 0 the clean share: misclassified, or already on the target), checked
    against the same PGD runs here (to within half an image): a typed pair without it is refused."""
    if answer is None:
        return grading.pending("02.4", "measure both attacks' success rates over the budget grid (keep them in "
                                       "`success_rates`), targets (y + 1) % 10; then a pair (eps_untargeted, "
                                       "eps_targeted) in units of 1/255")

    given = [None if a is None else grading.as_number("answer item", a)
             for a in grading.as_tuple("answer", answer, 2, "tuple (eps_untargeted, eps_targeted), each None or a "
                                                            "number")]
    target = (y + 1) % 10
    found: list[float | None] = []
    rates: dict[str, list[float]] = {}
    for targeted, labels in ((False, y), (True, target)):
        with torch.no_grad():
            clean = model.eval()(x).argmax(1)
        at_zero = float(((clean == labels) if targeted else (clean != labels)).float().mean())
        r = [float(pgd(model, x, labels, e / 255, steps=steps, seed=seed, targeted=targeted).success.float().mean())
             if e > 0 else at_zero for e in eps_255]
        rates["targeted" if targeted else "untargeted"] = r
        found.append(next((e for e, v in zip(eps_255, r) if v >= rate), None))
    grading.check_evidence("success_rates", success_rates, rates, f"success rates over {list(eps_255)}",
                           f"pgd(..., steps={steps}, seed={seed}) at each budget (targeted towards (y + 1) % 10 for "
                           "'targeted')", tol=0.5 / len(x))
    expected = tuple(found)
    why = (f"success rates: untargeted {np.round(100 * np.array(rates['untargeted']), 1).tolist()}%, targeted "
           f"{np.round(100 * np.array(rates['targeted']), 1).tolist()}% over eps {list(eps_255)}/255.")
    ok = all((a is None and b is None) or (a is not None and b is not None and math.isclose(a, b))
             for a, b in zip(given, expected))
    return grading.verdict("02.4", ok, expected, why, answer)


def check_02_5(answer: float | None, model: nn.Module, x: torch.Tensor, y: torch.Tensor, linf_eps: float = 2 / 255,
               steps: int = 10, seed: int = 0, tolerance: float = 0.05) -> grading.Feedback:
    """An L2 budget whose PGD accuracy is within ``tolerance`` of L-inf PGD at linf_eps, at most sqrt(d) linf_eps."""
    if answer is None:
        return grading.pending("02.5", "try L2 budgets between 0 and sqrt(d) * 2/255 and compare PGD accuracies")

    eps2 = grading.as_number("answer", answer)
    if eps2 < 0:
        raise ValueError(f"answer={answer!r} must be an L2 budget >= 0")
    acc_inf = 1 - float(pgd(model, x, y, linf_eps, "linf", steps=steps, seed=seed).success.float().mean())
    acc_l2 = 1 - float(pgd(model, x, y, eps2, "l2", steps=steps, seed=seed).success.float().mean())
    bound = math.sqrt(x[0].numel()) * linf_eps
    ok = abs(acc_l2 - acc_inf) <= tolerance and eps2 <= bound
    why = (f"L-inf {255 * linf_eps:.3g}/255: {100 * acc_inf:.1f}%; L2 {eps2:g}: {100 * acc_l2:.1f}% (within "
           f"{100 * tolerance:.0f} points needed). The L-inf ball lies inside the L2 ball of radius sqrt(d) eps = "
           f"{bound:.3f}, so the matching L2 budget is at most that, and usually far smaller.")
    return grading.verdict("02.5", ok, f"|accuracy difference| <= {tolerance} and eps <= {bound:.3f}", why, answer)
