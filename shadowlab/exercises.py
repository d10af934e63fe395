"""Self-checks for the lessons' exercises: one checker per exercise, answering right / wrong / why.

Every checker takes the student's ``answer`` first and the evidence it needs (the model and images, or the result
objects the lesson already computed). Where the exercise asks the student to run an experiment, the checker takes
that run (02.1, 02.3, 04.1, 04.2, 04.3, 05.x, 06.x) and validates it (present, non-empty, made at the settings the
exercise asks for, and where cheap its numbers against one recomputed point or forward pass) instead of rerunning it;
otherwise it recomputes the correct answer with the project's own code. It returns a
``Feedback``: ``correct`` (None while the answer is still ``None``), a message (the explanation when right, a hint
that keeps the key hidden when wrong: ``Feedback.reveal()`` shows it) and ``expected``. Answers of the wrong type
(a string where a bool is asked, a bool where a count is asked) raise TypeError naming the answer. A
lesson's exercise cell reads ``check_01_1(answer, model, x, y)``; its solutions notebook asserts the worked answer.
``CHECKERS`` maps exercise ids ("01.1", ...) to the checkers; ``check(id, answer, ...)`` dispatches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

PENDING = "no answer yet: set `answer` in the cell above and run it again"


@dataclass
class Feedback:
    """A checker's verdict: correct (None = not answered), a message, and the expected answer (None while pending).

    A wrong answer's message is a hint that never states the expected answer or the measurements that give it away;
    ``reveal()`` (or ``check(..., reveal=True)``) returns the full feedback: the expected answer and why.
    """

    exercise: str
    correct: bool | None
    message: str
    expected: Any = None
    explanation: str = ""

    def __bool__(self) -> bool:
        return bool(self.correct)

    def __str__(self) -> str:
        mark = {True: "RIGHT", False: "NOT YET RIGHT", None: "UNANSWERED"}[self.correct]
        return f"exercise {self.exercise}: {mark}. {self.message}"

    __repr__ = __str__

    def reveal(self) -> Feedback:
        """The same verdict with the expected answer and the measurements behind it in the message."""
        if self.correct is None or not self.explanation:
            return self
        head = "" if self.correct else f"expected {self.expected!r}. "
        return Feedback(self.exercise, self.correct, head + self.explanation, self.expected, self.explanation)


HIDDEN = ("compare your run with the exercise's question once more (its settings, every image, every model). "
          "To see the expected answer and the measurements behind it: `print(fb.reveal())` on this feedback, or "
          "`exercises.check(id, answer, ..., reveal=True)`.")


def _pending(exercise: str, hint: str) -> Feedback:
    return Feedback(exercise, None, f"{PENDING}. Hint: {hint}")


def _verdict(exercise: str, ok: bool, expected: Any, why: str, answer: Any) -> Feedback:
    """RIGHT with the explanation, or NOT YET RIGHT with a hint that keeps the expected answer hidden."""
    message = why if ok else f"you answered {answer!r}: not this. Hint: {HIDDEN}"
    return Feedback(exercise, bool(ok), message, expected, why)


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model.eval()(x).argmax(1) == y).float().mean())


def _number(name: str, value: Any) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}={value!r} must be a finite number, got {type(value).__name__}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name}={value!r} must be a finite number")
    return float(value)


def _bool(name: str, value: Any) -> bool:
    """A yes/no answer: True or False (NumPy and 0-d torch booleans too); anything else, the string "False"
    included, is refused with a clear error instead of being read by its truthiness."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype == torch.bool:
        return bool(value)
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}={value!r} must be True or False, got {type(value).__name__}")
    return bool(value)


def _bools(name: str, value: Any, length: int) -> list[bool]:
    """A list of ``length`` yes/no answers, one per image (each as ``_bool``)."""
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (Sequence, np.ndarray, torch.Tensor)):
        raise TypeError(f"{name}={value!r} must be a list of {length} booleans, one per image")
    items = list(value.tolist() if isinstance(value, (np.ndarray, torch.Tensor)) else value)
    if len(items) != length:
        raise ValueError(f"{name} must hold {length} booleans (one per image), got {len(items)}")
    return [_bool(f"{name}[{i}]", v) for i, v in enumerate(items)]


def _count(name: str, value: Any) -> int:
    """A count: an integer >= 0 (a bool is refused, a float only when it is whole, as 3.0)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}={value!r} must be a whole number >= 0, got {type(value).__name__}")
    if not math.isfinite(float(value)) or float(value) != int(value) or value < 0:
        raise ValueError(f"{name}={value!r} must be a whole number >= 0")
    return int(value)


def _tuple(name: str, value: Any, length: int, what: str) -> tuple[Any, ...]:
    """A tuple (or list) of ``length`` items; the error says it must be a ``what`` (e.g. "tuple (low, high)")."""
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (tuple, list)) or len(value) != length:
        raise TypeError(f"{name}={value!r} must be a {what}")
    return tuple(value)


def _mapping(name: str, value: Any, keys: Sequence[Any]) -> dict[Any, Any]:
    """A dict whose keys are exactly ``keys``."""
    if not isinstance(value, Mapping):
        raise TypeError(f"{name}={value!r} must be a dict with keys {list(keys)}")
    if set(value) != set(keys):
        raise ValueError(f"{name} must have exactly the keys {list(keys)}, got {list(value)}")
    return dict(value)


def _same_kind(value: Any, accepted: Any) -> bool:
    """A string matches only a string, a number only a number (never a bool: True == 1 in Python)."""
    if isinstance(accepted, str):
        return isinstance(value, str)
    if isinstance(value, (bool, np.bool_)):
        return isinstance(accepted, bool)
    return True


def _choice(name: str, value: Any, accepted: Sequence[Any]) -> Any:
    if not any(_same_kind(value, a) and value == a for a in accepted):
        raise ValueError(f"{name}={value!r} is not one of the accepted answers: {', '.join(map(repr, accepted))}")
    return value


# ================================================================================================ lesson 01
def check_01_1(answer: float | None, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
               eps_255: Sequence[float] = (0, 0.25, 0.5, 1, 2)) -> Feedback:
    """Smallest budget of the grid (units of 1/255) at which FGSM halves the clean accuracy."""
    if answer is None:
        return _pending("01.1", "the first eps of the grid whose FGSM accuracy is at most half the eps-0 accuracy")
    from .widgets import accuracy_vs_eps

    acc = accuracy_vs_eps(model, x, y, [e / 255 for e in eps_255], attack="fgsm", device=x.device)
    clean = _accuracy(model, x, y)
    halved = [e for e, a in zip(eps_255, acc) if a <= clean / 2]
    expected = halved[0] if halved else None
    table = ", ".join(f"{e}/255: {100 * a:.1f}%" for e, a in zip(eps_255, acc))
    why = f"FGSM accuracy {table}; half of the clean {100 * clean:.1f}% is {50 * clean:.1f}%."
    if expected is None:
        why += " It does not halve on this grid: extend it."
    return _verdict("01.1", answer is not None and expected is not None and math.isclose(
        _number("answer", answer), expected), expected, why, answer)


def check_01_2(answer: float | None, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> Feedback:
    """Fraction of images whose targeted-FGSM prediction is exactly the target (y + 1) % 10 (answer in [0, 1])."""
    if answer is None:
        return _pending("01.2", "fgsm(model, x, (y + 1) % 10, eps, targeted=True).x_adv, then (pred == target).mean()")
    from .attacks import fgsm

    target = (y + 1) % 10
    x_adv = fgsm(model, x, target, eps, targeted=True).x_adv
    with torch.no_grad():
        hit = float((model.eval()(x_adv).argmax(1) == target).float().mean())
    ok = abs(_number("answer", answer) - hit) <= 0.5 / len(x)
    why = (f"{100 * hit:.1f}% of the {len(x)} images land exactly on the target at eps = {255 * eps:.3g}/255: a "
           "targeted step must reach one of ten regions, so it succeeds less often than an untargeted one.")
    return _verdict("01.2", ok, round(hit, 4), why, answer)


def check_01_3(answer: bool | None, undefended: nn.Module, defended: nn.Module | str, x: torch.Tensor,
               y: torch.Tensor, eps: float) -> Feedback:
    """Is the noise-trained (defended) base classifier more accurate under FGSM at eps than the undefended one?
    ``defended`` is a model or a committed checkpoint name."""
    if answer is None:
        return _pending("01.3", "answer True or False after comparing accuracy_vs_eps of both models at eps")
    from .attacks import fgsm

    answer = _bool("answer", answer)
    if isinstance(defended, str):
        from . import checkpoints

        defended = checkpoints.load(defended, device=x.device)[0]

    acc = [_accuracy(m, fgsm(m, x, y, eps).x_adv, y) for m in (undefended, defended)]
    expected = acc[1] > acc[0]
    why = (f"FGSM accuracy at {255 * eps:.3g}/255: undefended {100 * acc[0]:.1f}%, defended {100 * acc[1]:.1f}%. "
           "Either way it is no certificate: a failed attack proves nothing (a stronger one may succeed), and the "
           "certificate of lesson 3 is about the smoothed classifier g, not the base model f.")
    return _verdict("01.3", answer == expected, expected, why, answer)


def raw_gradient_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """The un-signed variant of exercise 01.4: x + eps g / max|g| per image (same L-inf size as FGSM), clipped."""
    xg = x.detach().clone().requires_grad_(True)
    loss = nn.functional.cross_entropy(model.eval()(xg), y, reduction="sum")
    (g,) = torch.autograd.grad(loss, xg)
    scale = g.flatten(1).abs().amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return (x + eps * g / scale).clamp(0, 1).detach()


def check_01_4(answer: str | None, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> Feedback:
    """Which step lowers the accuracy more at the same L-inf size: "sign" (FGSM) or "raw" (eps g / max|g|)?"""
    if answer is None:
        return _pending("01.4", "answer 'sign' or 'raw': the one with the lower accuracy under attack")
    from .attacks import fgsm

    _choice("answer", answer, ("sign", "raw"))
    acc_sign = _accuracy(model, fgsm(model, x, y, eps).x_adv, y)
    acc_raw = _accuracy(model, raw_gradient_step(model, x, y, eps), y)
    expected = "sign" if acc_sign <= acc_raw else "raw"
    why = (f"accuracy: sign {100 * acc_sign:.1f}%, raw {100 * acc_raw:.1f}%. To first order the loss rises by "
           "eps ||g||_1 with the sign and by eps ||g||_2^2 / ||g||_inf with the raw gradient, never more: the sign "
           "uses the whole L-inf budget on every pixel.")
    ok = answer == expected or acc_sign == acc_raw
    return _verdict("01.4", ok, expected, why, answer)


def check_01_5(answer: float | None, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
               eps_255: Sequence[float] = (1, 2, 4, 8, 16, 32)) -> Feedback:
    """Smallest budget of the grid at which the mean SSIM of FGSM images falls below perception.MIN_SSIM."""
    if answer is None:
        return _pending("01.5", "perception.ssim(x, fgsm(model, x, y, eps).x_adv).mean() for each eps of the grid")
    from .attacks import fgsm
    from .perception import MIN_SSIM, ssim

    values = [float(ssim(x, fgsm(model, x, y, e / 255).x_adv).mean()) for e in eps_255]
    below = [e for e, s in zip(eps_255, values) if s < MIN_SSIM]
    expected = below[0] if below else None
    why = (", ".join(f"{e}/255: SSIM {s:.3f}" for e, s in zip(eps_255, values))
           + f". The project counts an image as visibly changed below SSIM {MIN_SSIM}; compare it with what you saw.")
    ok = expected is not None and math.isclose(_number("answer", answer), expected)
    return _verdict("01.5", ok, expected, why, answer)


# ================================================================================================ lesson 02
def check_02_1(answer: float | None, runs: Mapping[int, Sequence[float]], model: nn.Module, x: torch.Tensor,
               y: torch.Tensor, eps_255: Sequence[float], steps: tuple[int, int] = (10, 50), seed: int = 0) -> Feedback:
    """Largest change (percentage points) of PGD accuracy over the eps grid between steps[0] and steps[1] steps, read
    from the student's ``runs`` ({steps: accuracy_vs_eps(..., "pgd", steps=steps, seed=seed) over eps_255}).

    The runs are validated, not recomputed: both step counts present, one accuracy in [0, 1] per budget, and the
    decisive budget (the largest change) recomputed for both step counts must match them.
    """
    if answer is None:
        return _pending("02.1", "runs = {10: accuracy_vs_eps(..., 'pgd', steps=10, seed=SEED), 50: ... steps=50}; "
                                "then max |difference| in points")
    from .widgets import accuracy_vs_eps

    value = _number("answer", answer)
    given = _mapping("runs", runs, steps)
    acc = {}
    for s, run in given.items():
        if isinstance(run, (str, bytes, Mapping)) or not isinstance(run, (Sequence, np.ndarray)):
            raise TypeError(f"runs[{s}] must be the accuracies over eps_255 (accuracy_vs_eps's array)")
        acc[s] = np.asarray([_number(f"runs[{s}] item", v) for v in run])
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
    return _verdict("02.1", ok, round(change, 2), why, answer)


STEP_SIZES: dict[str, Callable[[float, int], dict[str, Any]]] = {
    "eps/10": lambda eps, steps: {"step_size": eps / 10},
    "default": lambda eps, steps: {},                     # 2.5 eps / steps: eps / 4 at 10 steps
    "eps/2": lambda eps, steps: {"step_size": eps / 2},
    "cosine": lambda eps, steps: {"step_schedule": "cosine"},
}


def check_02_2(answer: str | None, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 10,
               seed: int = 0, at_step: int = 2) -> Feedback:
    """Which step-size choice of STEP_SIZES has the highest loss after ``at_step`` steps?"""
    if answer is None:
        return _pending("02.2", f"one of {', '.join(STEP_SIZES)}: compare pgd(...).loss_history[{at_step}]")
    from .attacks import pgd

    _choice("answer", answer, tuple(STEP_SIZES))
    loss = {k: float(pgd(model, x, y, eps, steps=steps, seed=seed, **kw(eps, steps)).loss_history[at_step])
            for k, kw in STEP_SIZES.items()}
    best = max(loss.values())
    expected = max(loss, key=loss.get)
    why = (", ".join(f"{k}: {v:.3f}" for k, v in loss.items()) + f" (mean cross-entropy after {at_step} steps). "
           f"The default 2.5 eps / steps is eps/{steps / 2.5:g} at {steps} steps; larger steps rise faster at first, "
           "a cosine schedule starts at the default and shrinks.")
    return _verdict("02.2", loss[answer] == best, expected, why, answer)


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
               y: torch.Tensor, eps: float, steps: int = 10, restarts: int = 5) -> Feedback:
    """Accuracy drop (percentage points) from one start to ``restarts`` restarts of PGD at eps, read from the
    student's two runs (``pgd(...)`` with restarts=1 and with ``restarts``; validated by ``_attack_run``, one forward
    pass each, no attack recomputed)."""
    if answer is None:
        return _pending("02.3", "res_1 = pgd(model, x, y, 1 / 255, steps=STEPS, seed=SEED), res_5 the same with "
                                "restarts=5; then 100 * (accuracy of res_1 - accuracy of res_5)")
    value = _number("answer", answer)
    acc = [_attack_run("one_start", one_start, model, x, y, eps, steps, 1),
           _attack_run("restarted", restarted, model, x, y, eps, steps, restarts)]
    drop = 100 * (acc[0] - acc[1])
    why = (f"accuracy {100 * acc[0]:.1f}% with 1 start, {100 * acc[1]:.1f}% with {restarts}: each image keeps its "
           "best restart, so the accuracy can only fall.")
    return _verdict("02.3", abs(value - drop) <= 50 / len(x), round(drop, 2), why, answer)


def check_02_4(answer: tuple[float | None, float | None] | None, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
               eps_255: Sequence[float], rate: float = 0.5, steps: int = 10, seed: int = 0) -> Feedback:
    """(untargeted, targeted) smallest eps of the grid (x 1/255) with PGD success rate >= rate; None if never."""
    if answer is None:
        return _pending("02.4", "a pair (eps_untargeted, eps_targeted) in units of 1/255, targets (y + 1) % 10")
    from .attacks import pgd

    target = (y + 1) % 10
    found: list[float | None] = []
    rates: list[list[float]] = []
    for targeted, labels in ((False, y), (True, target)):
        with torch.no_grad():
            clean = model.eval()(x).argmax(1)
        at_zero = float(((clean == labels) if targeted else (clean != labels)).float().mean())
        r = [float(pgd(model, x, labels, e / 255, steps=steps, seed=seed, targeted=targeted).success.float().mean())
             if e > 0 else at_zero for e in eps_255]
        rates.append(r)
        found.append(next((e for e, v in zip(eps_255, r) if v >= rate), None))
    expected = tuple(found)
    why = (f"success rates: untargeted {np.round(100 * np.array(rates[0]), 1).tolist()}%, targeted "
           f"{np.round(100 * np.array(rates[1]), 1).tolist()}% over eps {list(eps_255)}/255.")
    given = [None if a is None else _number("answer item", a)
             for a in _tuple("answer", answer, 2, "tuple (eps_untargeted, eps_targeted), each None or a number")]
    ok = all((a is None and b is None) or (a is not None and b is not None and math.isclose(a, b))
             for a, b in zip(given, expected))
    return _verdict("02.4", ok, expected, why, answer)


def check_02_5(answer: float | None, model: nn.Module, x: torch.Tensor, y: torch.Tensor, linf_eps: float = 2 / 255,
               steps: int = 10, seed: int = 0, tolerance: float = 0.05) -> Feedback:
    """An L2 budget whose PGD accuracy is within ``tolerance`` of L-inf PGD at linf_eps, at most sqrt(d) linf_eps."""
    if answer is None:
        return _pending("02.5", "try L2 budgets between 0 and sqrt(d) * 2/255 and compare PGD accuracies")
    from .attacks import pgd

    eps2 = _number("answer", answer)
    if eps2 < 0:
        raise ValueError(f"answer={answer!r} must be an L2 budget >= 0")
    acc_inf = 1 - float(pgd(model, x, y, linf_eps, "linf", steps=steps, seed=seed).success.float().mean())
    acc_l2 = 1 - float(pgd(model, x, y, eps2, "l2", steps=steps, seed=seed).success.float().mean())
    bound = math.sqrt(x[0].numel()) * linf_eps
    ok = abs(acc_l2 - acc_inf) <= tolerance and eps2 <= bound
    why = (f"L-inf {255 * linf_eps:.3g}/255: {100 * acc_inf:.1f}%; L2 {eps2:g}: {100 * acc_l2:.1f}% (within "
           f"{100 * tolerance:.0f} points needed). The L-inf ball lies inside the L2 ball of radius sqrt(d) eps = "
           f"{bound:.3f}, so the matching L2 budget is at most that, and usually far smaller.")
    return _verdict("02.5", ok, f"|accuracy difference| <= {tolerance} and eps <= {bound:.3f}", why, answer)


# ================================================================================================ lesson 03
def check_03_1(answer: Mapping[float, float] | None, sigmas: Sequence[float], n: int = 10_000,
               alpha: float = 0.001) -> Feedback:
    """Largest CERTIFY radius per sigma at n samples, {sigma: cap} (lessons.radius_cap)."""
    if answer is None:
        return _pending("03.1", "{sigma: lessons.radius_cap(sigma, N, ALPHA)} for every sigma")
    from .lessons import radius_cap

    expected = {float(s): round(radius_cap(float(s), n, alpha), 4) for s in sigmas}
    got = {float(k): float(v) for k, v in dict(answer).items()}
    ok = set(got) == set(expected) and all(abs(got[s] - c) <= 1e-3 for s, c in expected.items())
    why = (f"at n = {n}: " + ", ".join(f"sigma {s:g}: {c:.3f}" for s, c in expected.items())
           + ". With few samples the cap, not the model, decides how far the curves reach.")
    return _verdict("03.1", ok, expected, why, answer)


def check_03_2(answer: Mapping[float, float] | None, certificates: Mapping[float, Sequence[Any]], labels: Any,
               radii: Sequence[float] = (0.25, 0.75), n: int | None = None, alpha: float = 0.001) -> Feedback:
    """{radius: sigma} with the best certified accuracy at each radius, from {sigma: certificates} on labels."""
    if answer is None:
        return _pending("03.2", "{0.25: sigma, 0.75: sigma}: read the certified-accuracy curves")
    from .lessons import radius_cap
    from .smoothing import certified_accuracy

    acc = {float(s): certified_accuracy(c, labels, radii) for s, c in certificates.items()}
    expected, ok, lines = {}, True, []
    for k, r in enumerate(radii):
        best = max(a[k] for a in acc.values())
        tied = [s for s, a in acc.items() if a[k] == best]
        expected[float(r)] = tied[0] if len(tied) == 1 else tied
        given = dict(answer).get(r, dict(answer).get(float(r)))
        ok &= given is not None and float(given) in tied
        lines.append(f"r = {r}: " + ", ".join(f"sigma {s:g} {100 * a[k]:.0f}%" for s, a in acc.items()))
    why = "; ".join(lines) + "."
    if n is not None:
        caps = ", ".join(f"sigma {s:g} {radius_cap(s, n, alpha):.2f}" for s in acc)
        why += f" Caps at n = {n}: {caps}: a sigma whose cap is below r certifies nothing there."
    return _verdict("03.2", ok, expected, why, answer)


def vote_pattern(counts: Sequence[int], split_share: float = 0.9) -> str:
    """"split" when the two top classes hold at least split_share of the votes, else "unsure" (spread out)."""
    c = sorted((int(v) for v in counts), reverse=True)
    return "split" if sum(c[:2]) >= split_share * max(1, sum(c)) else "unsure"


def check_03_3(answer: tuple[int, str] | None, certificates: Sequence[Any]) -> Feedback:
    """(index, "split" | "unsure"): an image CERTIFY abstained on, and how its votes look (vote_pattern)."""
    from .smoothing import ABSTAIN

    abstained = [i for i, c in enumerate(certificates) if c.prediction == ABSTAIN]
    if answer is None:
        return _pending("03.3", f"CERTIFY abstained on {len(abstained)} of these images; look at their .counts")
    index, pattern = _tuple("answer", answer, 2, "tuple (index, 'split' or 'unsure')")
    index = _count("index", index)
    _choice("pattern", pattern, ("split", "unsure"))
    if not 0 <= int(index) < len(certificates) or certificates[int(index)].prediction != ABSTAIN:
        return _verdict("03.3", False, abstained, f"image {index} was not an abstention; these were: {abstained}.",
                        answer)
    c = certificates[int(index)]
    expected = vote_pattern(c.counts)
    why = (f"votes {c.counts}: the top two hold {100 * sum(sorted(c.counts)[-2:]) / max(1, sum(c.counts)):.0f}% "
           "(split means at least 90%). CERTIFY abstains when pA_lower < 1/2, whatever the reason.")
    return _verdict("03.3", pattern == expected, (int(index), expected), why, answer)


def check_03_4(answer: tuple[str, str] | None, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
               eps: float) -> Feedback:
    """(tightest, costliest) among "ibp", "crown-ibp", "crown": the method whose worst margin lower bound
    (``bounds.lower_bounds`` with ``margin_spec``, min over the margins) is largest on average over the images, and
    the method that propagates the most tensor elements (``bounds.count_work``: boxes plus CROWN coefficients).

    Both are deterministic: the cost is counted from the bound code, not timed, so machine load cannot change it.
    """
    if answer is None:
        return _pending("03.4", "a pair like ('ibp', 'crown'): lower_bounds(...).min(1).values.mean() and "
                                "count_work().elements for each method")
    from .bounds import METHODS, count_work, lower_bounds, margin_spec

    tightest, costliest = _tuple("answer", answer, 2, "pair (tightest method, costliest method)")
    _choice("tightest", tightest, METHODS)
    _choice("costliest", costliest, METHODS)
    with torch.no_grad():
        num_classes = int(model.eval()(x[:1]).shape[1])
    C = margin_spec(y.to(x.device), num_classes).to(x.dtype)
    worst, work = {}, {}
    with torch.no_grad():
        for m in METHODS:
            with count_work() as w:
                worst[m] = float(lower_bounds(model, x, eps, C, m).min(1).values.mean())
            work[m] = w.elements
    top = max(worst.values())
    tight = [m for m in METHODS if worst[m] == top]
    most = max(work.values())
    costly = [m for m in METHODS if work[m] == most]
    expected = (tight[0] if len(tight) == 1 else tight, costly[0] if len(costly) == 1 else costly)
    why = (", ".join(f"{m}: mean worst margin bound {worst[m]:+.3f}, {work[m]:,} elements propagated" for m in METHODS)
           + ". Full CROWN runs a backward pass for every neuron of every hidden layer to get its pre-activation "
           "bounds; CROWN-IBP takes those from one IBP pass and runs a single backward pass for the margins.")
    return _verdict("03.4", tightest in tight and costliest in costly, expected, why, answer)


def check_03_5(answer: Mapping[str, str] | None, model_small_eps: nn.Module, eps_small: float,
               model_large_eps: nn.Module, eps_large: float, x: torch.Tensor, y: torch.Tensor) -> Feedback:
    """{"clean_error": "higher"|"lower", "verified_error": ...}: the large-eps model against the small-eps one,
    each at its own training eps."""
    if answer is None:
        return _pending("03.5", "{'clean_error': 'higher' or 'lower', 'verified_error': ...} for the eps-8 model")
    from .bounds import error_table

    given = _mapping("answer", answer, ("clean_error", "verified_error"))
    for key, value in given.items():
        _choice(f"answer[{key!r}]", value, ("higher", "lower"))
    a = error_table(model_small_eps, x, y, eps_small, device=x.device)
    b = error_table(model_large_eps, x, y, eps_large, device=x.device)
    expected = {k: "higher" if b[k] > a[k] else "lower" for k in ("clean_error", "verified_error")}
    why = (f"small eps: clean {100 * a['clean_error']:.1f}%, verified {100 * a['verified_error']:.1f}%; large eps: "
           f"clean {100 * b['clean_error']:.1f}%, verified {100 * b['verified_error']:.1f}%. A larger training eps "
           "trades clean accuracy for certificates over a bigger ball.")
    ok = all(given[k] == v for k, v in expected.items())
    return _verdict("03.5", ok, expected, why, answer)


def check_03_6(answer: int | None, smooth: Any, x: torch.Tensor, n: int, alpha: float, seed: int = 0) -> Feedback:
    """How many of the images does PREDICT (Smooth.predict with n samples, level alpha) abstain on?"""
    if answer is None:
        return _pending("03.6", "(smooth.predict(x, n, alpha, seed=SEED) == ABSTAIN).sum()")
    from .smoothing import ABSTAIN

    pred = smooth.predict(x, n, alpha, seed=seed)
    expected = int((pred == ABSTAIN).sum())
    why = (f"PREDICT abstains on {expected} of {len(x)} images at n = {n}, alpha = {alpha}: it abstains when the "
           "two-sided binomial test cannot tell the top two counts apart at level alpha; otherwise its answer is "
           "wrong with probability at most alpha.")
    return _verdict("03.6", _count("answer", answer) == expected, expected, why, answer)


# ================================================================================================ lesson 04
def _final(res: Any, term: str) -> float:
    return float(res.history[term][-1])


def check_04_1(answer: bool | None, res_default: Any, res_low: Any) -> Feedback:
    """Does lowering lambda_s (res_low, 3 channels) leave a larger final Dissim than the default run?"""
    if answer is None:
        return _pending("04.1", "True or False: compare res.history['dissim'][-1] of the two 3-channel runs")
    for name, r in (("res_default", res_default), ("res_low", res_low)):
        if r.config.channels != 3:
            raise ValueError(f"{name} must be a 3-channel attack (ShadowConfig channels=3)")
    if not res_low.config.lambda_s < res_default.config.lambda_s:
        raise ValueError("res_low must use a smaller lambda_s than res_default")
    a, b = _final(res_default, "dissim"), _final(res_low, "dissim")
    expected = b > a
    why = (f"final Dissim: lambda_s {res_default.config.lambda_s:g}: {a:.3f}, lambda_s {res_low.config.lambda_s:g}: "
           f"{b:.3f}. Dissim is the only term that keeps the channels alike; without it the colours drift.")
    return _verdict("04.1", _bool("answer", answer) == expected, expected, why, answer)


def check_04_2(answer: Mapping[str, Sequence[float]] | None, x: torch.Tensor, results: Mapping[float, Any]) -> Feedback:
    """{"spoofs": [lambda_tv, ...], "looks_like": [lambda_tv, ...]} over {lambda_tv: ShadowResult} on images x:
    which values certify the wrong label for every image, and which keep every SSIM >= perception.MIN_SSIM."""
    if answer is None:
        return _pending("04.2", "{'spoofs': [...], 'looks_like': [...]} from res.radius > 0 and perception.ssim")
    from .perception import MIN_SSIM, ssim

    given = _mapping("answer", answer, ("spoofs", "looks_like"))
    for key, value in given.items():
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise TypeError(f"answer[{key!r}]={value!r} must be a list of lambda_tv values")
        for v in value:
            _number(f"answer[{key!r}] item", v)
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
    return _verdict("04.2", got == expected, expected, why, answer)


def _run_settings(name: str, res: Any, **wanted: Any) -> None:
    """Refuse a run that is missing or was made at other settings than the exercise asks for (config fields)."""
    if res is None or not hasattr(res, "config"):
        raise ValueError(f"{name} must be the run the exercise asks for (a ShadowResult), got {res!r}: run it first")
    for key, value in wanted.items():
        got = getattr(res.config, key)
        if got != value:
            raise ValueError(f"{name} must be run with {key}={value!r}, as the exercise asks; it has {key}={got!r}")


def check_04_3(answer: float | None, sigma: float, n: int, alpha: float, res_small: Any = None, res_big: Any = None,
               steps: int = 100, noise_samples: int = 64) -> Feedback:
    """The largest radius CERTIFY can give at n samples for this sigma, after the student's run ``res_big`` at
    ``steps`` and ``noise_samples`` (validated); ``res_small`` (the lesson's run) is what its radii are compared with.
    """
    if answer is None:
        return _pending("04.3", "lessons.radius_cap(sigma, N_CERT, ALPHA), after the run at STEPS = 100, "
                                "NOISE_SAMPLES = 64")
    from .lessons import radius_cap

    value = _number("answer", answer)
    _run_settings("res_big", res_big, steps=steps, noise_samples=noise_samples)
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
    return _verdict("04.3", abs(value - cap) <= 1e-3, round(cap, 4), why, answer)


def check_04_4(answer: Sequence[bool] | None, x: torch.Tensor, res: Any) -> Feedback:
    """Per image: does ||x_shadow - x||_2 >= r_natural + r_spoofed hold (lessons.disjoint_balls)?"""
    if answer is None:
        return _pending("04.4", "a list of booleans, one per image: ||delta||_2 >= natural radius + spoofed radius")
    from .lessons import disjoint_balls

    ok_balls = disjoint_balls(x.cpu(), res.x_shadow.cpu(), res.natural_radius.cpu(), res.radius.cpu())
    expected = [bool(v) for v in ok_balls]
    dist = (res.x_shadow.cpu() - x.cpu()).flatten(1).norm(dim=1)
    why = ("; ".join(f"image {i}: ||delta||_2 {d:.2f} vs {a:.3f} + {b:.3f}" for i, (d, a, b) in enumerate(
        zip(dist.tolist(), res.natural_radius.tolist(), res.radius.tolist())))
           + ". Both certificates can hold only if the balls are disjoint; each holds with probability >= 1 - alpha.")
    return _verdict("04.4", _bools("answer", answer, len(expected)) == expected, expected, why, answer)


def check_04_5(answer: Sequence[bool] | None, res: Any, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Feedback:
    """Per image: is the wrong class the model ranks highest among the best-scored targets (largest
    candidate_score, ties included)?"""
    if answer is None:
        return _pending("04.5", "compare res.candidate_targets[i, res.candidate_score[i].argmax()] with "
                                "widgets.most_likely_wrong(model, x, y)")
    from .widgets import most_likely_wrong

    score, targets = res.candidate_score.cpu(), res.candidate_targets.cpu()
    second = most_likely_wrong(model, x, y).cpu()
    # every target that ties for the best score counts, so that a tie never decides the answer by class index
    best = [targets[i][score[i] == score[i].max()].tolist() for i in range(len(score))]
    expected = [int(s) in b for s, b in zip(second, best)]
    why = (f"best-scored targets (ties listed) {best}, the model's second-ranked classes {second.tolist()} (a "
           "candidate score of 0 means no target was certified: then every target ties).")
    return _verdict("04.5", _bools("answer", answer, len(expected)) == expected, expected, why, answer)


# ================================================================================================ lesson 05
def check_05_1(answer: float | None, lambda_tv: float = 3.0, channels: int = 1) -> Feedback:
    """A learning rate at which gradient descent on lambda_tv * TV is stable: lr * lambda_tv * 16 * 3 < 2 (1 channel).
    """
    if answer is None:
        return _pending("05.1", "solve lr * lambda_tv * 16 * (3 if channels == 1 else 1) < 2 for lr")
    lr = _number("answer", answer)
    limit = 2 / (lambda_tv * 16 * (3 if channels == 1 else 1))
    why = (f"stable for lr < {limit:.4f} at lambda_tv = {lambda_tv:g}, {channels} channel(s): the TV Hessian's largest "
           "eigenvalue is just below 16 per channel, tripled for a map repeated on R, G, B.")
    return _verdict("05.1", 0 < lr < limit, f"0 < lr < {limit:.4f}", why, answer)


def check_05_2(answer: Sequence[str] | None, res_zeros: Any, terms: Sequence[str] = ("classification", "color", "tv")
               ) -> Feedback:
    """Which loss terms start at exactly 0 with init="zeros" (from the run's history)?"""
    if answer is None:
        return _pending("05.2", "a list of term names whose history[term][0] is 0")
    if res_zeros.config.init != "zeros":
        raise ValueError("res_zeros must come from ShadowConfig(init='zeros')")
    if isinstance(answer, (str, bytes)) or not isinstance(answer, Sequence):
        raise TypeError(f"answer={answer!r} must be a list of term names from {list(terms)}")
    for term in answer:
        _choice("answer item", term, tuple(terms))
    expected = sorted(t for t in terms if float(res_zeros.history[t][0]) == 0.0)
    why = (", ".join(f"{t} starts at {float(res_zeros.history[t][0]):.4g}" for t in terms)
           + f"; spoofed certificates: {int(res_zeros.success.sum())} of {len(res_zeros.success)}. TV and C of a zero "
           "perturbation are 0; the classification loss is that of the natural image.")
    return _verdict("05.2", sorted(answer) == expected, expected, why, answer)


def check_05_3(answer: float | None, by_s: Sequence[Mapping[str, Any]]) -> Feedback:
    """The lambda_s of a sweep (records of widgets.sweep) with the smallest final Dissim."""
    if answer is None:
        return _pending("05.3", "the lambda_s whose run ends with the smallest history['dissim'][-1]")
    finals = {float(r["lambda_s"]): _final(r["result"], "dissim") for r in by_s}
    expected = min(finals, key=finals.get)
    why = (", ".join(f"lambda_s {k:g}: {v:.4f}" for k, v in finals.items())
           + ". As lambda_s grows the three channels are forced equal: the 3-channel perturbation becomes a grey map,"
           " i.e. the 1-channel attack.")
    return _verdict("05.3", math.isclose(_number("answer", answer), expected), expected, why, answer)


def check_05_4(answer: tuple[float, float] | None, grid: Sequence[Mapping[str, Any]]) -> Feedback:
    """(lambda_tv, lambda_c) of a sweep with the highest success rate, ties broken by the mean spoofed radius."""
    if answer is None:
        return _pending("05.4", "(lambda_tv, lambda_c) of the best cell: success first, then mean radius")
    score = {(float(r["lambda_tv"]), float(r["lambda_c"])): (r["result"].success_rate,
                                                             float(r["result"].radius.mean())) for r in grid}
    best = max(score.values())
    tied = [k for k, v in score.items() if v == best]
    why = (f"best cells {tied}: success {100 * best[0]:.0f}%, mean radius {best[1]:.3f}. Too little TV or C gives "
           "noisy, visible perturbations; too much keeps the attack from reaching its target.")
    ok = tuple(_number("answer item", a) for a in _tuple("answer", answer, 2, "tuple (lambda_tv, lambda_c)")) in tied
    return _verdict("05.4", ok, tied[0] if len(tied) == 1 else tied, why, answer)


def check_05_5(answer: bool | None, res: Any) -> Feedback:
    """With noise_samples=1: is the final target fraction on the training noise larger than the share of images whose
    wrong label is certified (``res.spoof_rate``, whatever the SSIM)?"""
    if answer is None:
        return _pending("05.5", "compare res.history['target_fraction'][-1] with res.spoof_rate")
    fit, certified = _final(res, "target_fraction"), float(getattr(res, "spoof_rate", res.success_rate))
    expected = fit > certified
    why = (f"{res.config.noise_samples} noise sample(s): {100 * fit:.0f}% of the training-noise predictions are the "
           f"target, {100 * certified:.0f}% of the images get a certificate. Fitting a few fixed noise draws is not "
           "the same as moving the smoothed classifier, which CERTIFY measures on fresh noise.")
    return _verdict("05.5", _bool("answer", answer) == expected, expected, why, answer)


# ================================================================================================ lesson 06
def images_for_half_width(half_width: float, alpha: float = 0.05, p: float = 0.5) -> int:
    """Smallest even n whose two-sided (1 - alpha) Clopper-Pearson interval at k = p n has half-width <= half_width."""
    from statsmodels.stats.proportion import proportion_confint

    n = 2
    while True:
        lo, hi = proportion_confint(round(p * n), n, alpha=alpha, method="beta")
        if (hi - lo) / 2 <= half_width:
            return n
        n += 2


def check_06_1(answer: tuple[float, float, int] | None, successes: int = 10, n: int = 20,
               half_width: float = 0.05) -> Feedback:
    """(low, high, n_needed): the 95% Clopper-Pearson interval of successes / n and the images for +- half_width."""
    if answer is None:
        return _pending("06.1", "proportion_confint(10, 20, alpha=0.05, method='beta'), then grow n")
    from statsmodels.stats.proportion import proportion_confint

    lo, hi = proportion_confint(successes, n, alpha=0.05, method="beta")
    need = images_for_half_width(half_width)
    a_lo, a_hi, a_n = _tuple("answer", answer, 3, "tuple (low, high, images needed)")
    a_lo, a_hi, a_n = _number("low", a_lo), _number("high", a_hi), _count("images needed", a_n)
    ok = abs(a_lo - lo) <= 5e-3 and abs(a_hi - hi) <= 5e-3 and abs(a_n - need) <= 0.05 * need
    why = (f"{successes}/{n}: [{lo:.3f}, {hi:.3f}]; +-{half_width} needs about {need} images (Clopper-Pearson, "
           "within 5% accepted: the normal approximation gives a little less).")
    return _verdict("06.1", ok, (round(lo, 3), round(hi, 3), need), why, answer)


def _mean_of(rows: Sequence[Mapping[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return float(np.mean(vals)) if vals else None


def check_06_2(answer: Mapping[str, int] | None, t1: Any) -> Feedback:
    """{"larger_radius": 1|3, "larger_l2": 1|3}: which attack spoofs larger mean radii, which moves further in L2."""
    if answer is None:
        return _pending("06.2", "{'larger_radius': 1 or 3, 'larger_l2': 1 or 3} from t1.rows (both channels run)")
    given = _mapping("answer", answer, ("larger_radius", "larger_l2"))
    for key, value in given.items():
        _choice(f"answer[{key!r}]", value, (1, 3))
    if not {1, 3} <= set(t1.settings["channels"]):
        raise ValueError("t1 must be run with channels (1, 3): T1_CHANNELS = [1, 3]")
    rows = {c: [row for row in t1.rows if row["channels"] == c] for c in (1, 3)}   # one row per (sigma, channels)
    r = {c: _mean_of(rows[c], "spoofed_mean_radius") or 0.0 for c in (1, 3)}
    d = {c: _mean_of(rows[c], "mean_l2") for c in (1, 3)}
    expected = {"larger_radius": 1 if r[1] >= r[3] else 3, "larger_l2": 1 if d[1] >= d[3] else 3}
    why = (f"mean spoofed radius over sigma: 1-channel {r[1]:.3f}, 3-channel {r[3]:.3f}; mean ||delta||_2: "
           f"1-channel {d[1]:.2f}, 3-channel {d[3]:.2f}.")
    return _verdict("06.2", given == expected, expected, why, answer)


def check_06_3(answer: str | None, t1_small_n: Any, t1_large_n: Any, channels: int = 1) -> Feedback:
    """"natural" or "spoofed": whose mean radius changes more (relative, averaged over sigma) from small to large n."""
    if answer is None:
        return _pending("06.3", "'natural' or 'spoofed': compare the two tables' mean radii")
    _choice("answer", answer, ("natural", "spoofed"))
    n_small, n_large = t1_small_n.settings["n"], t1_large_n.settings["n"]
    if not n_small < n_large:
        raise ValueError(f"t1_large_n must be run with more CERTIFY samples than t1_small_n, got n {n_small} and "
                         f"{n_large}: rerun Table 1 with a larger T1_N")
    change = {}
    small = [r for r in t1_small_n.rows if r["channels"] == channels]   # one row per (sigma, channels)
    large = [r for r in t1_large_n.rows if r["channels"] == channels]
    for name, key in (("natural", "natural_mean_radius"), ("spoofed", "spoofed_mean_radius")):
        rel = [abs(b[key] - a[key]) / a[key] for a, b in zip(small, large) if a.get(key) and b.get(key) is not None]
        change[name] = float(np.mean(rel)) if rel else 0.0
    expected = max(change, key=change.get)
    why = (f"mean relative change: natural {100 * change['natural']:.0f}%, spoofed {100 * change['spoofed']:.0f}% "
           f"(n {t1_small_n.settings['n']} -> {t1_large_n.settings['n']}). Radii at the cap grow with n; others move "
           "only by the tighter confidence bound.")
    return _verdict("06.3", answer == expected, expected, why, answer)


def check_06_4(answer: bool | None, t2: Any, steps: int = 100, models: Sequence[str] | None = None) -> Feedback:
    """Is the attack error below the verified error for every model of the student's Table 2 run ``t2``? The run
    must have ``steps`` attack steps and cover ``models`` (None: every committed crownibp-* checkpoint)."""
    if answer is None:
        return _pending("06.4", "run reproduce.table2 with T2_STEPS = 100 as t2_100, then True or False from its rows:"
                                " attack_error < verified_error for every model?")
    answer = _bool("answer", answer)
    if t2 is None or not hasattr(t2, "rows"):
        raise ValueError(f"t2={t2!r} must be a Table 2 run (reproduce.table2 with T2_STEPS = {steps}): run it first")
    if not t2.rows:
        raise ValueError("t2 has no rows: run Table 2 first")
    if t2.settings["config"]["steps"] != steps:
        raise ValueError(f"t2 must be run with T2_STEPS = {steps}, as the exercise asks; it has "
                         f"{t2.settings['config']['steps']} steps")
    if models is None:
        from . import checkpoints

        models = [m for m in checkpoints.available() if m.startswith("crownibp-")]
    missing = sorted(set(models) - {r["model"] for r in t2.rows})
    if missing:
        raise ValueError(f"t2 must cover every model the exercise asks about; missing {missing} (T2_MODELS = None)")
    expected = all(r["attack_error"] < r["verified_error"] for r in t2.rows)
    why = "; ".join(f"{r['model']}: attack {100 * r['attack_error']:.0f}% vs verified {100 * r['verified_error']:.0f}%"
                    for r in t2.rows) + f" ({t2.settings['config']['steps']} steps, {t2.settings['n_images']} images)."
    return _verdict("06.4", answer == expected, expected, why, answer)


def check_06_5(answer: bool | None, t1: Any, channels: int = 1) -> Feedback:
    """Are images with larger natural radii harder to spoof, i.e. is Spearman's rho(natural, spoofed radius) < 0?"""
    if answer is None:
        return _pending("06.5", "scipy.stats.spearmanr of natural_radius and spoofed_radius over t1.per_image")
    from scipy.stats import spearmanr

    rows = [r for r in t1.per_image if r["channels"] == channels]
    nat = [r["natural_radius"] if r["natural_prediction"] == r["label"] else 0.0 for r in rows]
    rho = float(spearmanr(nat, [r["spoofed_radius"] for r in rows]).statistic)
    if math.isnan(rho):
        return Feedback("06.5", None, "the radii are constant: no correlation to read; run more images")
    expected = rho < 0
    sign = "negative" if expected else "not negative"
    why = (f"Spearman rho = {rho:+.2f} over {len(rows)} (image, sigma) pairs: {sign}; "
           "with this few images it is a weak signal (see exercise 1).")
    return _verdict("06.5", _bool("answer", answer) == expected, expected, why, answer)


# ================================================================================================ lesson 07
def _gained_in(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, dtype: str) -> dict[str, Any]:
    """IBP certificates in float64 and in ``dtype`` (lessons.bounds_by_precision) and the images certified only in
    ``dtype`` (a bool mask)."""
    from .lessons import bounds_by_precision

    res = bounds_by_precision(model, x, y, eps, dtypes=("float64", dtype))
    return {"float64": res["float64"]["certified"], "gained": res[dtype]["certified"] & ~res["float64"]["certified"]}


def check_07_1(answer: int | None, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
               dtype: str = "bfloat16") -> Feedback:
    """How many images does the network with weights rounded to ``dtype``, bounded by IBP in float64
    (lessons.round_weights), certify that the original network, bounded in float64, does not?"""
    if answer is None:
        return _pending("07.1", "bounds_by_precision(round_weights(model), x, y, eps, dtypes=('float64',)) against "
                                "bounds_by_precision(model, ...) of the original; count certified only by the first")
    from .lessons import bounds_by_precision, round_weights

    count = _count("answer", answer)
    original = bounds_by_precision(model, x, y, eps, dtypes=("float64",))["float64"]["certified"]
    rounded = bounds_by_precision(round_weights(model, dtype), x, y, eps, dtypes=("float64",))["float64"]["certified"]
    gained = int((rounded & ~original).sum())
    lost = int((original & ~rounded).sum())
    why = (f"with its weights rounded to {dtype} the network certifies {gained} of {len(x)} images the original does "
           f"not (and loses {lost}), with every bound computed in float64. Part of a low-precision certificate's "
           "error is a different network, not arithmetic: a certificate holds for one set of weights only.")
    return _verdict("07.1", count == gained, gained, why, answer)


def check_07_2(answer: int | None, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
               dtype: str = "bfloat16", num_classes: int = 10) -> Feedback:
    """Of the images IBP certifies in ``dtype`` but not in float64, how many does the tightest sound bound in
    float64 (bounds.tightest_lower_bounds: the larger of CROWN-IBP and IBP) certify?"""
    if answer is None:
        return _pending("07.2", "the images certified in bf16 only, then bounds.tightest_lower_bounds(in_precision("
                                "model, 'float64'), x[gained].double(), eps, margin_spec(y[gained], 10).double())")
    from .bounds import margin_spec, tightest_lower_bounds
    from .lessons import in_precision

    count = _count("answer", answer)
    gained = _gained_in(model, x, y, eps, dtype)["gained"].to(x.device)
    n_gained = int(gained.sum())
    if n_gained == 0:
        confirmed = 0
    else:
        C = margin_spec(y[gained], num_classes).double()
        lower = tightest_lower_bounds(in_precision(model, "float64"), x[gained].double(), eps, C)
        confirmed = int((lower >= 0).all(1).sum())
    why = (f"{dtype} IBP certifies {n_gained} images that float64 IBP does not; the tightest sound bound in float64 "
           f"certifies {confirmed} of them. An unsound computation can still state something true: only a sound "
           "bound (confirms) or a counterexample (refutes) tells which.")
    return _verdict("07.2", count == confirmed, confirmed, why, answer)


def check_07_3(answer: float | None, n: int = 100_000, alpha: float = 0.001, test_set: int = 10_000) -> Feedback:
    """The largest CERTIFY radius, in units of sigma, with n samples when each certificate uses alpha / test_set
    (Bonferroni: all test_set certificates then hold together with probability >= 1 - alpha)."""
    if answer is None:
        return _pending("07.3", "lessons.radius_cap(1.0, n, alpha / test_set), the cap in units of sigma")
    from .lessons import radius_cap

    value = _number("answer", answer)
    cap, plain = radius_cap(1.0, n, alpha / test_set), radius_cap(1.0, n, alpha)
    why = (f"with all {n} votes for c_A: {cap:.3f} sigma at alpha / {test_set} = {alpha / test_set:.0e}, against "
           f"{plain:.3f} sigma at alpha = {alpha}. Holding every certificate of a test set at once costs radius, "
           "and only more samples buy it back.")
    return _verdict("07.3", abs(value - cap) <= 5e-3, round(cap, 3), why, answer)


def check_07_4(answer: int | None, smooth: Any, x_value: float, n_grid: Sequence[int], n0: int, alpha: float,
               repeats: int, seed: int = 0, threshold: float = 0.5) -> Feedback:
    """The smallest n of ``n_grid`` at which CERTIFY of the half-space (``smooth``, a Smooth around
    lessons.halfspace_classifier(threshold)) at pixel value x_value abstains in fewer than half of ``repeats``
    independent runs (lessons.repeated_certify with ``seed``)."""
    if answer is None:
        return _pending("07.4", "repeated_certify(smooth, torch.full((1, 1, 1, 1), x_value), n0, n, alpha, repeats, "
                                "seed) for each n of the grid; the first n whose abstention rate is below 1/2")
    from .lessons import repeated_certify

    if not isinstance(answer, (int, np.integer)) or isinstance(answer, (bool, np.bool_)):
        raise TypeError(f"answer={answer!r} must be one n of n_grid (an integer), got {type(answer).__name__}")
    _choice("answer", int(answer), tuple(int(v) for v in n_grid))
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
    return _verdict("07.4", expected is not None and int(answer) == expected, expected, why, answer)


def check_07_5(answer: int | None, psnr_db: float = 30.0, results_dir: Any = None) -> Feedback:
    """How many committed Table 1 rows have a certified wrong label (``spoofed``) and a shadow with PSNR >= psnr_db
    (the success rule with PSNR in place of SSIM >= perception.MIN_SSIM)?"""
    if answer is None:
        return _pending("07.5", "committed_shadows('table1'), image_metrics(x, x_shadow)['psnr'] >= psnr_db, and the "
                                "rows' 'spoofed' column")
    from .lessons import committed_shadows, image_metrics
    from .perception import MIN_SSIM

    count = _count("answer", answer)
    psnr_db = _number("psnr_db", psnr_db)
    t1 = committed_shadows("table1", results_dir)
    m = image_metrics(t1["x"], t1["x_shadow"])
    spoofed = np.array([r["spoofed"] == "True" for r in t1["rows"]])
    by_psnr = int((spoofed & (m["psnr"] >= psnr_db)).sum())
    by_ssim = int((spoofed & (m["ssim"] >= MIN_SSIM)).sum())
    why = (f"{by_psnr} of {len(spoofed)} rows pass the PSNR >= {psnr_db:g} dB rule, {by_ssim} the SSIM >= {MIN_SSIM} "
           "rule. PSNR is a function of the L2 size alone; SSIM also sees that a smooth, grey change keeps the "
           "image's structure. The success rate is a property of the metric as much as of the attack.")
    return _verdict("07.5", count == by_psnr, by_psnr, why, answer)


CHECKERS: dict[str, Callable[..., Feedback]] = {
    f"{name[6:8]}.{name[9:]}": fn for name, fn in sorted(globals().items()) if name.startswith("check_0")
}


def check(exercise: str, answer: Any, *args: Any, reveal: bool = False, **kwargs: Any) -> Feedback:
    """Run the checker of ``exercise`` ("01.1" ... "07.5") on ``answer`` and the evidence it takes; reveal=True
    returns the full feedback (``Feedback.reveal``: the expected answer and why) even for a wrong answer."""
    if exercise not in CHECKERS:
        raise ValueError(f"exercise={exercise!r} is unknown; accepted: {', '.join(CHECKERS)}")
    fb = CHECKERS[exercise](answer, *args, **kwargs)
    return fb.reveal() if reveal else fb


__all__ = ["CHECKERS", "HIDDEN", "Feedback", "STEP_SIZES", "check", "images_for_half_width", "raw_gradient_step",
           "vote_pattern", *(f"check_{k.replace('.', '_')}" for k in CHECKERS)]
