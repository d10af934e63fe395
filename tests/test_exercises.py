"""Every exercise checker says UNANSWERED to None, RIGHT to the right answer and NOT YET RIGHT to a wrong one.

Models are tiny (a linear or one-hidden-layer network on random images); the right answer is either known in closed
form (radius caps, Clopper-Pearson intervals, the TV stability limit) or taken from one call's ``expected`` and fed
back, with a wrong answer that must be rejected.
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from shadowlab.certify.smoothing import ABSTAIN, Certificate, Smooth
from shadowlab.lab.exercises import lesson01, lesson02, lesson03, lesson04, lesson05, lesson06, lesson07
from shadowlab.lab.exercises.catalog import CHECKERS, check
from shadowlab.lab.grading import Feedback
from shadowlab.lab.lessons import disjoint_balls, energy_share, first_image_per_class, halfspace_classifier, radius_cap


@pytest.fixture(scope="module")
def data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    x = torch.rand(12, 3, 32, 32)
    with torch.no_grad():
        y = model(x).argmax(1)      # every image correct: accuracies start at 100%
    return model, x, y


def _deep_model() -> nn.Module:
    """Three hidden ReLU layers: CROWN's intermediate bounds differ from IBP's, so the three methods differ."""
    torch.manual_seed(3)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(),
                         nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 10)).eval()


def _other_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 32), nn.ReLU(), nn.Linear(32, 10)).eval()


def test_every_lesson_exercise_has_a_checker():
    assert list(CHECKERS) == [f"0{k}.{e}" for k in range(1, 8) for e in range(1, 6 + 2 * (k == 3))]
    for key, fn in CHECKERS.items():
        assert fn.__doc__, key
        fb = check(key, None, *([None] * 0)) if key in ("05.1", "06.1") else None
        if fb is not None:
            assert fb.correct is None and "no answer yet" in str(fb)
    with pytest.raises(ValueError, match="exercise='09.1' is unknown"):
        check("09.1", 1)


def test_feedback_prints_and_is_truthy_only_when_right():
    assert bool(Feedback("x", True, "ok")) and not Feedback("x", False, "no") and not Feedback("x", None, "")
    assert "RIGHT" in str(Feedback("01.1", True, "why")) and "NOT YET RIGHT" in repr(Feedback("01.1", False, ""))


def _right_and_wrong(fn, wrong, *args, **kwargs):
    assert fn(None, *args, **kwargs).correct is None
    fb = fn(wrong, *args, **kwargs)
    assert fb.correct is False, fb
    right = fn(fb.expected if not isinstance(fb.expected, list) else fb.expected, *args, **kwargs)
    assert right.correct is True, right
    return fb.expected


def test_lesson_01_checkers(data):
    model, x, y = data
    expected = _right_and_wrong(lesson01.check_01_1, 123.0, model, x, y, eps_255=(0, 1, 4, 16, 64))
    assert expected in (1, 4, 16, 64)
    _right_and_wrong(lesson01.check_01_2, 2.0, model, x, y, 8 / 255)
    from shadowlab.attacks import fgsm

    other = _other_model(1)
    measured = {"undefended": _accuracy(model, fgsm(model, x, y, 8 / 255).x_adv, y),
                "defended": _accuracy(other, fgsm(other, x, y, 8 / 255).x_adv, y)}
    fb = lesson01.check_01_3(True, measured, model, other, x, y, 8 / 255)
    assert lesson01.check_01_3(fb.expected, measured, model, other, x, y, 8 / 255).correct
    assert not lesson01.check_01_3(not fb.expected, measured, model, other, x, y, 8 / 255).correct
    # graded with the work: a typed guess without the accuracies, or accuracies of another attack, scores nothing
    with pytest.raises(ValueError, match="fgsm_accuracy is empty"):
        lesson01.check_01_3(fb.expected, {}, model, other, x, y, 8 / 255)
    with pytest.raises(ValueError, match=r"fgsm_accuracy\['undefended'\] = .* is not what FGSM at eps = 8/255"):
        lesson01.check_01_3(fb.expected, dict(measured, undefended=measured["undefended"] + 0.25), model, other, x,
                            y, 8 / 255)
    with pytest.raises(TypeError, match=r"fgsm_accuracy\['defended'\]='0.5' must be a finite number"):
        lesson01.check_01_3(fb.expected, dict(measured, defended="0.5"), model, other, x, y, 8 / 255)
    steps = {"sign": _accuracy(model, fgsm(model, x, y, 4 / 255).x_adv, y),
             "raw": _accuracy(model, lesson01.raw_gradient_step(model, x, y, 4 / 255), y)}
    fb = lesson01.check_01_4("sign", steps, model, x, y, 4 / 255)
    assert lesson01.check_01_4(fb.expected, steps, model, x, y, 4 / 255).correct
    with pytest.raises(ValueError, match="answer='both'"):
        lesson01.check_01_4("both", steps, model, x, y, 4 / 255)
    with pytest.raises(ValueError, match="step_accuracy is empty"):
        lesson01.check_01_4(fb.expected, None, model, x, y, 4 / 255)
    with pytest.raises(ValueError, match=r"step_accuracy must have exactly the keys \['sign', 'raw'\]"):
        lesson01.check_01_4(fb.expected, {"sign": steps["sign"]}, model, x, y, 4 / 255)
    _right_and_wrong(lesson01.check_01_5, 0.5, model, x, y, eps_255=(1, 8, 32, 128))


def _accuracy(model, x, y):
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def test_lesson_02_checkers(data):
    model, x, y = data
    from shadowlab.defenses.evaluate import accuracy_vs_eps

    grid = [0, 2, 8]
    runs = {s: accuracy_vs_eps(model, x, y, [e / 255 for e in grid], "pgd", steps=s, seed=0) for s in (2, 5)}
    _right_and_wrong(lesson02.check_02_1, 1000.0, runs, model, x, y, grid, steps=(2, 5))
    # the student's runs are read and validated: both step counts, one accuracy per budget, the decisive budget real
    with pytest.raises(ValueError, match="exactly the keys"):
        lesson02.check_02_1(0.0, {2: runs[2]}, model, x, y, grid, steps=(2, 5))
    with pytest.raises(ValueError, match=r"runs\[5\] must hold 3 accuracies"):
        lesson02.check_02_1(0.0, {2: runs[2], 5: runs[5][:2]}, model, x, y, grid, steps=(2, 5))
    with pytest.raises(TypeError, match=r"runs\[5\] must be the accuracies"):
        lesson02.check_02_1(0.0, {2: runs[2], 5: "0.5"}, model, x, y, grid, steps=(2, 5))
    made_up = {2: runs[2], 5: runs[5].copy()}
    made_up[5][1] = 0.0 if runs[5][1] > 0.5 else 1.0                   # not what PGD-5 gives at 2/255
    with pytest.raises(ValueError, match=r"runs\[5\] at 2/255 is .* must come from accuracy_vs_eps"):
        lesson02.check_02_1(100.0, made_up, model, x, y, grid, steps=(2, 5))
    from shadowlab.attacks import pgd

    losses = {k: pgd(model, x, y, 4 / 255, steps=5, seed=0, **kw(4 / 255, 5)).loss_history[2].item()
              for k, kw in lesson02.STEP_SIZES.items()}
    fb = lesson02.check_02_2("eps/10", losses, model, x, y, 4 / 255, steps=5)
    assert lesson02.check_02_2(fb.expected, losses, model, x, y, 4 / 255, steps=5).correct
    assert fb.correct is (fb.expected == "eps/10")
    with pytest.raises(ValueError, match="step_losses is empty"):
        lesson02.check_02_2(fb.expected, {}, model, x, y, 4 / 255, steps=5)
    with pytest.raises(ValueError, match=r"step_losses\['eps/10'\] = .* is not what pgd"):
        lesson02.check_02_2(fb.expected, dict(losses, **{"eps/10": losses["eps/10"] + 1}), model, x, y, 4 / 255,
                            steps=5)

    one, two = (pgd(model, x, y, 2 / 255, steps=3, seed=0, restarts=r) for r in (1, 2))
    _right_and_wrong(lesson02.check_02_3, -50.0, one, two, model, x, y, 2 / 255, steps=3, restarts=2)
    # the runs are the ones the exercise asks for: eps, steps, restarts, these images, untouched verdicts
    with pytest.raises(ValueError, match="one_start must be the pgd"):
        lesson02.check_02_3(0.0, None, two, model, x, y, 2 / 255, steps=3, restarts=2)
    with pytest.raises(ValueError, match=r"restarted must be .* differs in loss_history shape \(\(3,\)\)"):
        lesson02.check_02_3(0.0, one, one, model, x, y, 2 / 255, steps=3, restarts=2)
    with pytest.raises(ValueError, match=r"differs in eps"):
        lesson02.check_02_3(0.0, one, two, model, x, y, 4 / 255, steps=3, restarts=2)
    with pytest.raises(ValueError, match="differs in images"):
        lesson02.check_02_3(0.0, one, two, model, x[:6], y[:6], 2 / 255, steps=3, restarts=2)
    forged = pgd(model, x, y, 2 / 255, steps=3, seed=0, restarts=2)
    forged.success = ~forged.success
    with pytest.raises(ValueError, match="does not match the model's predictions"):
        lesson02.check_02_3(0.0, one, forged, model, x, y, 2 / 255, steps=3, restarts=2)
    grid = [0, 1, 4, 16, 64]
    rates = _success_rates(model, x, y, grid, steps=3)
    _right_and_wrong(lesson02.check_02_4, (1000, 1000), rates, model, x, y, grid, steps=3)
    expected = lesson02.check_02_4((1000, 1000), rates, model, x, y, grid, steps=3).expected
    with pytest.raises(ValueError, match="success_rates is empty"):
        lesson02.check_02_4(expected, {}, model, x, y, grid, steps=3)
    with pytest.raises(ValueError, match=r"success_rates\['targeted'\] must hold 5 number"):
        lesson02.check_02_4(expected, dict(rates, targeted=rates["targeted"][:2]), model, x, y, grid, steps=3)
    with pytest.raises(ValueError, match=r"success_rates\['untargeted'\] = .* is not what pgd"):
        lesson02.check_02_4(expected, {"untargeted": rates["targeted"], "targeted": rates["untargeted"]}, model, x,
                            y, grid, steps=3)
    fb = lesson02.check_02_5(50.0, model, x, y, steps=3)          # over the sqrt(d) eps bound: always wrong
    assert fb.correct is False and "sqrt(d)" in fb.reveal().message and "sqrt(d)" not in fb.message
    # a budget that matches: scan a few and at least one must be accepted (0 if the L-inf attack also fails)
    assert any(lesson02.check_02_5(e, model, x, y, steps=3, tolerance=0.2).correct
               for e in (0.0, 0.05, 0.1, 0.2, 0.4, 0.8))


def _success_rates(model, x, y, grid, steps):
    """Exercise 02.4's measurement as the worked solution makes it: success rates over the grid, both attacks."""
    from shadowlab.attacks import pgd

    out = {}
    for name, targeted, labels in (("untargeted", False, y), ("targeted", True, (y + 1) % 10)):
        clean = model(x).argmax(1)
        out[name] = [pgd(model, x, labels, e / 255, steps=steps, seed=0, targeted=targeted).success.float().mean()
                     .item() if e > 0 else float(((clean == labels) if targeted else (clean != labels)).float().mean())
                     for e in grid]
    return out


def test_lesson_03_closed_forms_and_checkers(data):
    assert radius_cap(1.0, 256, 0.001) == pytest.approx(1.933, abs=1e-3)
    assert radius_cap(0.25, 100_000, 0.001) == pytest.approx(0.25 * 3.811, abs=1e-3)
    assert radius_cap(1.0, 1, 0.001) == 0.0           # one vote can never certify at alpha 0.001
    with pytest.raises(ValueError, match="n=0"):
        radius_cap(1.0, 0, 0.001)
    caps = {0.25: radius_cap(0.25, 10_000, 0.001), 0.5: radius_cap(0.5, 10_000, 0.001)}
    assert lesson03.check_03_1(caps, [0.25, 0.5]).correct
    assert not lesson03.check_03_1({0.25: 1.65 * 0.25, 0.5: 1.65 * 0.5}, [0.25, 0.5]).correct

    cert = lambda p, r: Certificate(prediction=p, radius=r, pA_lower=0.9 if p >= 0 else 0.4, counts=[5, 5, 0])
    certs = {0.12: [cert(0, 0.2), cert(1, 0.2)], 0.5: [cert(0, 0.9), cert(ABSTAIN, 0.0)]}
    reading = {0.12: [0.0, 0.0], 0.5: [0.5, 0.5]}   # certified accuracy at r = 0.25 and 0.75
    assert lesson03.check_03_2({0.25: 0.5, 0.75: 0.5}, reading, certs, [0, 1], n=256).correct
    fb = lesson03.check_03_2({0.25: 0.12, 0.75: 0.5}, reading, certs, [0, 1], n=256)
    assert fb.correct is False and "Caps at n = 256" in fb.reveal().message
    with pytest.raises(ValueError, match="accuracy is empty"):                 # a typed guess without the reading
        lesson03.check_03_2({0.25: 0.5, 0.75: 0.5}, None, certs, [0, 1], n=256)
    with pytest.raises(ValueError, match=r"accuracy\[0.5\]"):                   # a made-up reading
        lesson03.check_03_2({0.25: 0.5, 0.75: 0.5}, {0.12: [0.0, 0.0], 0.5: [1.0, 1.0]}, certs, [0, 1], n=256)

    split = Certificate(ABSTAIN, 0.0, 0.4, [50, 45, 5])
    unsure = Certificate(ABSTAIN, 0.0, 0.3, [30, 25, 20, 25])
    records = [Certificate(1, 0.5, 0.9, [0, 100]), split, unsure]
    assert lesson03.check_03_3((1, "split"), 0.95, records).correct
    assert lesson03.check_03_3((2, "unsure"), torch.tensor(0.55), records).correct   # a 0-d tensor is a number
    assert not lesson03.check_03_3((1, "unsure"), 0.95, records).correct
    assert not lesson03.check_03_3((0, "split"), 1.0, records).correct
    with pytest.raises(ValueError, match="top_two_share is empty"):
        lesson03.check_03_3((1, "split"), None, records)
    with pytest.raises(ValueError, match="top_two_share = 0.5 is not what"):
        lesson03.check_03_3((1, "split"), 0.5, records)
    with pytest.raises(TypeError):
        lesson03.check_03_3((1, "split"), "0.95", records)

    model, x, y = data
    deep = _deep_model()
    runs = _bound_runs(deep, x[:4], y[:4], 1 / 255)
    fb = lesson03.check_03_4(("ibp", "ibp"), runs, deep, x[:4], y[:4], 1 / 255)
    assert fb.correct is False and fb.expected[1] == "crown"           # full CROWN propagates the most, always
    tightest, costliest = fb.expected
    assert isinstance(tightest, str), fb                               # a unique answer on this network
    assert lesson03.check_03_4((tightest, costliest), runs, deep, x[:4], y[:4], 1 / 255).correct
    assert lesson03.check_03_4([tightest, costliest], runs, deep, x[:4], y[:4], 1 / 255).correct
    for wrong in {"ibp", "crown-ibp", "crown"} - {tightest}:
        assert lesson03.check_03_4((wrong, "crown"), runs, deep, x[:4], y[:4], 1 / 255).correct is False
    assert lesson03.check_03_4((tightest, "crown-ibp"), runs, deep, x[:4], y[:4], 1 / 255).correct is False
    with pytest.raises(TypeError, match="must be a pair"):
        lesson03.check_03_4("crown", runs, deep, x[:4], y[:4], 1 / 255)
    with pytest.raises(ValueError, match="costliest='slowest'"):
        lesson03.check_03_4(("crown", "slowest"), runs, deep, x[:4], y[:4], 1 / 255)
    # a typed guess without the runs, or runs of other images, is refused: the checker grades the work
    with pytest.raises(ValueError, match="runs is empty"):
        lesson03.check_03_4((tightest, costliest), {}, deep, x[:4], y[:4], 1 / 255)
    with pytest.raises(ValueError, match=r"runs\['ibp'\] = .* is not what lower_bounds"):
        lesson03.check_03_4((tightest, costliest), _bound_runs(deep, x[4:8], y[4:8], 1 / 255), deep, x[:4], y[:4],
                            1 / 255)
    with pytest.raises(TypeError, match="must be a finite number"):
        lesson03.check_03_4((tightest, costliest), {m: (str(b), w) for m, (b, w) in runs.items()}, deep, x[:4],
                            y[:4], 1 / 255)
    from shadowlab.certify.verify import error_table

    args = (model, 1 / 255, _other_model(2), 8 / 255, x[:4], y[:4])
    tables = {"small": error_table(model, x[:4], y[:4], 1 / 255), "large": error_table(args[2], x[:4], y[:4], 8 / 255)}
    expected = lesson03.check_03_5({"clean_error": "lower", "verified_error": "lower"}, tables, *args).expected
    assert lesson03.check_03_5(expected, tables, *args).correct
    flipped = {k: {"higher": "lower", "lower": "higher"}[v] for k, v in expected.items()}
    assert lesson03.check_03_5(flipped, tables, *args).correct is False
    assert lesson03.check_03_5(dict(expected, clean_error=flipped["clean_error"]), tables, *args).correct is False
    with pytest.raises(ValueError, match="tables is empty"):
        lesson03.check_03_5(expected, {}, *args)
    with pytest.raises(ValueError, match="is not what error_table gives"):
        lesson03.check_03_5(expected, {"small": tables["large"], "large": tables["small"]}, *args)
    smooth = Smooth(model, 10, 0.5, device="cpu")
    _right_and_wrong(lesson03.check_03_6, 99, smooth, x[:4], 32, 0.001)
    with pytest.raises(TypeError, match="answer=True must be a whole number"):
        lesson03.check_03_6(True, smooth, x[:4], 32, 0.001)               # not read as the count 1
    with pytest.raises(ValueError, match="answer=1.5"):
        lesson03.check_03_6(1.5, smooth, x[:4], 32, 0.001)


def _thumbnail_mlp(seed: int = 1) -> nn.Module:
    """An untrained 192 -> 8 -> 10 ReLU network on 3 x 8 x 8 thumbnails, small enough for the MILP (at seed 1 the
    first test image's radius lies between 4/255 and 8/255: a short bisection)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(192, 8), nn.ReLU(), nn.Linear(8, 10)).eval()


def _bisect(robust_at, lo=0.0, hi=8.0, tol=0.1):
    while hi - lo > tol:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if robust_at(mid) else (lo, mid)
    return (lo + hi) / 2


def test_lesson_03_exact_radius_checker():
    """03.7 grades (crown_radius, exact_radius) from the student's own MILP runs: a typed pair is refused."""
    from shadowlab.certify.bounds import lower_bounds, margin_spec
    from shadowlab.lab.lessons import exact_margins

    model = _thumbnail_mlp()
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x).argmax(1)
    x1, y1 = x[:1], y[:1]
    runs = {}

    def exactly(e):
        runs[e] = float(exact_margins(model, x1, y1, e / 255)["margin"].min())
        return runs[e] > 0

    def crown(e):
        with torch.no_grad():
            return bool((lower_bounds(model, x1, e / 255, margin_spec(y1, 10), "crown") >= 0).all())

    def check(ans, evidence, xx=x1, yy=y1):
        return lesson03.check_03_7(ans, evidence, model, xx, yy, tol_255=0.5)

    answer = (_bisect(crown, tol=0.5), _bisect(exactly, tol=0.5))   # a coarse tolerance: fewer MILPs
    assert 0 < answer[0] <= answer[1] + 0.5                     # CROWN is sound: never beyond the true radius
    assert check(None, runs).correct is None
    fb = check(answer, runs)
    assert fb.correct, fb.reveal()
    assert abs(fb.expected[1] - answer[1]) <= 0.5 and abs(fb.expected[0] - answer[0]) <= 0.5
    assert check([np.float64(answer[0]), torch.tensor(answer[1])], runs).correct
    assert check((answer[0] + 1.0, answer[1]), runs).correct is False
    # a typed guess without runs, margins that are not the MILP's, or runs that do not bracket the answer: refused
    with pytest.raises(ValueError, match="exact_runs is empty"):
        check(answer, {})
    with pytest.raises(ValueError, match="is not the smallest margin"):
        check(answer, {e: m + 0.01 for e, m in runs.items()})
    with pytest.raises(ValueError, match="last bracket"):
        check(answer, {max(runs): runs[max(runs)]})
    with pytest.raises(ValueError, match="last bracket"):
        check((answer[0], answer[1] + 5), runs)
    # wrong types are refused with a clear error
    with pytest.raises(TypeError, match="must be a pair"):
        check("1.0, 2.0", runs)
    with pytest.raises(TypeError, match="must be a finite number"):
        check((str(answer[0]), answer[1]), runs)
    with pytest.raises(TypeError, match="must be a finite number"):
        check((True, answer[1]), runs)
    with pytest.raises(TypeError, match="exact_runs must be a dict"):
        check(answer, list(runs.items()))
    with pytest.raises(TypeError, match="must be a finite number"):
        check(answer, {str(e): m for e, m in runs.items()})
    with pytest.raises(ValueError, match="one image"):
        check(answer, runs, x, y)
    with pytest.raises(ValueError, match="misclassifies"):
        check(answer, runs, x1, (y1 + 1) % 10)


def _bound_runs(model, x, y, eps):
    """Exercise 03.4's runs as the worked solution makes them: {method: (mean worst-margin bound, elements)}."""
    from shadowlab.certify.bounds import METHODS, count_work, lower_bounds, margin_spec

    out = {}
    for m in METHODS:
        with torch.no_grad(), count_work() as w:
            bound = float(lower_bounds(model, x, eps, margin_spec(y, 10), m).min(1).values.mean())
        out[m] = (bound, w.elements)
    return out


def _shadow(x, channels=3, lambda_s=0.5, dissim=(1.0, 0.5), init="uniform", success=(True, False), steps=20,
            noise_samples=1):
    b = x.shape[0]
    hist = {"dissim": torch.tensor(dissim), "classification": torch.tensor([2.0, 1.0]),
            "color": torch.tensor([0.0 if init == "zeros" else 0.1, 0.1]),
            "tv": torch.tensor([0.0 if init == "zeros" else 3.0, 1.0]), "target_fraction": torch.tensor([0.1, 0.9])}
    return SimpleNamespace(config=SimpleNamespace(channels=channels, lambda_s=lambda_s, init=init, steps=steps,
                                                  noise_samples=noise_samples),
                           history=hist, x_shadow=(x + 0.3).clamp(0, 1), target=torch.ones(b, dtype=torch.long),
                           prediction=torch.ones(b, dtype=torch.long), radius=torch.full((b,), 0.2),
                           natural_radius=torch.full((b,), 0.3), success=torch.tensor(success[:b]),
                           success_rate=float(torch.tensor(success[:b]).float().mean()))


def test_lesson_04_checkers(data):
    model, x, y = data
    xs = x[:2]
    low, default = _shadow(xs, lambda_s=1e-3, dissim=(1.0, 0.9)), _shadow(xs, lambda_s=0.5, dissim=(1.0, 0.1))
    assert lesson04.check_04_1(True, default, low).correct and not lesson04.check_04_1(False, default, low).correct
    with pytest.raises(ValueError, match="3-channel"):
        lesson04.check_04_1(True, _shadow(xs, channels=1), low)
    smooth_res, noisy = _shadow(xs), _shadow(xs)
    smooth_res.x_shadow = (xs * 0.98).clamp(0, 1)                       # imperceptible
    noisy.prediction = torch.tensor([1, 5])                              # one image not certified as its target
    _right_and_wrong(lesson04.check_04_2, {"spoofs": [], "looks_like": []}, xs, {0.001: smooth_res, 10.0: noisy})
    small, big = _shadow(xs, channels=1), _shadow(xs, channels=1, steps=100, noise_samples=64)
    cap = radius_cap(0.25, 256, 0.001)
    assert lesson04.check_04_3(cap, 0.25, 256, 0.001, small, big).correct
    assert not lesson04.check_04_3(1.65 * 0.25, 0.25, 256, 0.001, small, big).correct
    assert not lesson04.check_04_3(0.2, 0.25, 256, 0.001, small, big).correct      # the run's radius is not the cap
    # the run the exercise asks for: present, 100 steps, 64 noise samples; the lesson's run is the shorter one
    with pytest.raises(ValueError, match="res_big must be the run the exercise asks for"):
        lesson04.check_04_3(cap, 0.25, 256, 0.001, small, None)
    with pytest.raises(ValueError, match="res_big must be run with steps=100"):
        lesson04.check_04_3(cap, 0.25, 256, 0.001, small, small)
    with pytest.raises(ValueError, match="noise_samples=64"):
        lesson04.check_04_3(cap, 0.25, 256, 0.001, small, _shadow(xs, steps=100, noise_samples=8))
    with pytest.raises(ValueError, match="res_small must be the lesson's shorter run"):
        lesson04.check_04_3(cap, 0.25, 256, 0.001, big, big)
    res = _shadow(xs)
    far = disjoint_balls(xs, res.x_shadow, res.natural_radius, res.radius)
    assert far.tolist() == [True, True]                                  # ||0.3 shift|| is far above 0.5
    dist = (res.x_shadow - xs).flatten(1).norm(dim=1)
    assert lesson04.check_04_4(far.tolist(), dist.tolist(), xs, res).correct
    assert lesson04.check_04_4(far.tolist(), dist, xs, res).correct                  # a tensor of distances too
    assert not lesson04.check_04_4([False, False], dist.tolist(), xs, res).correct
    with pytest.raises(ValueError, match="distances is empty"):
        lesson04.check_04_4(far.tolist(), [], xs, res)
    with pytest.raises(ValueError, match=r"distances = .* is not what the L2 norm"):
        lesson04.check_04_4(far.tolist(), [1.0, 1.0], xs, res)
    with pytest.raises(ValueError, match="distances must hold 2 number"):
        lesson04.check_04_4(far.tolist(), [float(dist[0])], xs, res)
    res.x_shadow = xs.clone()
    assert not disjoint_balls(xs, res.x_shadow, res.natural_radius, res.radius).any()
    res.candidate_targets = torch.tensor([[1, 2], [3, 4]])
    res.candidate_score = torch.tensor([[0.1, 0.5], [0.7, 0.2]])
    from shadowlab.lab.notebook import most_likely_wrong

    candidates = {"best": [[2], [3]], "second": most_likely_wrong(model, xs, y[:2]).tolist()}
    _right_and_wrong(lesson04.check_04_5, [True, True], candidates, res, model, xs, y[:2])
    expected = lesson04.check_04_5([True, True], candidates, res, model, xs, y[:2]).expected
    with pytest.raises(ValueError, match="candidates is empty"):
        lesson04.check_04_5(expected, {}, res, model, xs, y[:2])
    with pytest.raises(ValueError, match=r"candidates\['best'\] is not what res.candidate_score gives"):
        lesson04.check_04_5(expected, dict(candidates, best=[[1], [3]]), res, model, xs, y[:2])
    with pytest.raises(ValueError, match=r"candidates\['second'\] is not the wrong class"):
        lesson04.check_04_5(expected, dict(candidates, second=[(c + 1) % 10 for c in candidates["second"]]), res,
                            model, xs, y[:2])
    with pytest.raises(TypeError, match=r"candidates\['second'\]\[0\]='cat' must be a whole number"):
        lesson04.check_04_5(expected, dict(candidates, second=["cat", 1]), res, model, xs, y[:2])
    with pytest.raises(ValueError, match="res_low must be the run the exercise asks for"):
        lesson04.check_04_1(True, default, None)


def test_lesson_05_checkers():
    x = torch.rand(2, 3, 32, 32)
    assert lesson05.check_05_1(0.01).correct
    assert not lesson05.check_05_1(0.1).correct and not lesson05.check_05_1(-1.0).correct
    zeros = _shadow(x, init="zeros")
    assert lesson05.check_05_2(["color", "tv"], zeros).correct and not lesson05.check_05_2(["tv"], zeros).correct
    with pytest.raises(ValueError, match="init='zeros'"):
        lesson05.check_05_2(["tv"], _shadow(x))
    with pytest.raises(ValueError, match="res_zeros must be the run the exercise asks for"):
        lesson05.check_05_2(["tv"], None)
    by_s = [{"lambda_s": 0.01, "result": _shadow(x, dissim=(1, 0.8))}, {"lambda_s": 10.0, "result": _shadow(
        x, dissim=(1, 0.01))}]
    finals = {0.01: 0.8, 10.0: 0.01}
    assert lesson05.check_05_3(10.0, finals, by_s).correct and not lesson05.check_05_3(0.01, finals, by_s).correct
    with pytest.raises(ValueError, match="dissim_by_s is empty"):
        lesson05.check_05_3(10.0, {}, by_s)
    with pytest.raises(ValueError, match=r"dissim_by_s\[0.01\] = 1.0 is not what the last Dissim"):
        lesson05.check_05_3(10.0, {0.01: 1.0, 10.0: 0.01}, by_s)                  # the first step, not the last
    a, b = _shadow(x, success=(True, True)), _shadow(x, success=(False, False))
    a.radius, b.radius = torch.tensor([0.2, 0.3]), torch.zeros(2)
    grid = [{"lambda_tv": 0.1, "lambda_c": 1.0, "result": a}, {"lambda_tv": 0.3, "lambda_c": 10.0, "result": b}]
    cells = {(0.1, 1.0): (1.0, 0.25), (0.3, 10.0): (0.0, 0.0)}
    assert lesson05.check_05_4((0.1, 1.0), cells, grid).correct
    assert not lesson05.check_05_4((0.3, 10.0), cells, grid).correct
    with pytest.raises(ValueError, match="cell_scores is empty"):
        lesson05.check_05_4((0.1, 1.0), None, grid)
    with pytest.raises(ValueError, match=r"cell_scores\[\(0.1, 1.0\)\] = \[0.0, 0.0\] is not what"):
        lesson05.check_05_4((0.3, 10.0), {(0.1, 1.0): (0.0, 0.0), (0.3, 10.0): (1.0, 0.25)}, grid)
    with pytest.raises(TypeError, match=r"cell_scores\[\(0.1, 1.0\)\]\[0\]='1' must be a finite number"):
        lesson05.check_05_4((0.1, 1.0), cells | {(0.1, 1.0): ("1", 0.25)}, grid)
    res = _shadow(x, success=(False, False))                   # fits the noise (90%) but certifies nothing
    assert lesson05.check_05_5(True, res).correct and not lesson05.check_05_5(False, res).correct
    with pytest.raises(ValueError, match="res_one must be run with noise_samples=1"):
        lesson05.check_05_5(True, _shadow(x, noise_samples=8))


def test_lesson_06_checkers():
    fb = lesson06.check_06_1((0.2, 0.8, 100))
    assert fb.correct is False and fb.expected[:2] == (pytest.approx(0.272, abs=1e-3), pytest.approx(0.728, abs=1e-3))
    assert 380 <= fb.expected[2] <= 420
    assert lesson06.check_06_1((0.272, 0.728, 385)).correct              # the normal approximation's n is accepted
    rows = [{"channels": 1, "spoofed_mean_radius": 0.3, "mean_l2": 5.0, "natural_mean_radius": 0.4,
             "attack_error": 0.3, "verified_error": 0.6, "model": "m"},
            {"channels": 3, "spoofed_mean_radius": 0.2, "mean_l2": 6.0, "natural_mean_radius": 0.4,
             "attack_error": 0.3, "verified_error": 0.6, "model": "m"}]
    t1 = SimpleNamespace(rows=rows, settings={"channels": [1, 3], "n": 256})
    means = {1: (0.3, 5.0), 3: (0.2, 6.0)}
    assert lesson06.check_06_2({"larger_radius": 1, "larger_l2": 3}, means, t1).correct
    assert not lesson06.check_06_2({"larger_radius": 3, "larger_l2": 3}, means, t1).correct
    with pytest.raises(ValueError, match="channel_means is empty"):
        lesson06.check_06_2({"larger_radius": 1, "larger_l2": 3}, {}, t1)
    with pytest.raises(ValueError, match=r"channel_means\[3\] = \[0.3, 5.0\] is not what the mean"):
        lesson06.check_06_2({"larger_radius": 1, "larger_l2": 3}, {1: means[1], 3: means[1]}, t1)
    with pytest.raises(ValueError, match="t1=None must be a Table 1 run"):
        lesson06.check_06_2({"larger_radius": 1, "larger_l2": 3}, means, None)
    t1_big = SimpleNamespace(rows=[dict(rows[0], natural_mean_radius=0.8)], settings={"channels": [1], "n": 10_000})
    assert [r["channels"] for r in t1_big.rows] == [1]
    assert lesson06.check_06_3("natural", t1, t1_big).correct and not lesson06.check_06_3("spoofed", t1, t1_big).correct
    with pytest.raises(ValueError, match="t1_large_n=None must be a Table 1 run with more CERTIFY samples"):
        lesson06.check_06_3("natural", t1, None)
    t2 = SimpleNamespace(rows=rows, settings={"config": {"steps": 100}, "n_images": 6})
    assert lesson06.check_06_4(True, t2, models=["m"]).correct
    assert not lesson06.check_06_4(False, t2, models=["m"]).correct
    rows_over = [dict(rows[0], model="a"), dict(rows[0], model="b", attack_error=0.7)]
    t2_over = SimpleNamespace(rows=rows_over, settings={"config": {"steps": 100}, "n_images": 6})
    assert lesson06.check_06_4(False, t2_over, models=["a", "b"]).correct              # one model is enough for False
    # the run the exercise asks for: 100 steps (not the lesson's 30), every model
    with pytest.raises(ValueError, match="T2_STEPS = 100, as the exercise asks; it has 30 steps"):
        lesson06.check_06_4(True, SimpleNamespace(rows=rows, settings={"config": {"steps": 30}, "n_images": 6}),
                      models=["m"])
    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        lesson06.check_06_4(True, t2, models=["m", "b"])
    with pytest.raises(ValueError, match="crownibp-cnn-2layer-eps8"):       # default: every committed crownibp-*
        lesson06.check_06_4(True, SimpleNamespace(rows=[dict(rows[0], model="crownibp-cnn-2layer-eps2")],
                                            settings={"config": {"steps": 100}, "n_images": 6}))
    with pytest.raises(ValueError, match="must be a Table 2 run"):
        lesson06.check_06_4(True, None)
    per = [{"channels": 1, "natural_radius": r, "natural_prediction": 0, "label": 0, "spoofed_radius": 1 - r}
           for r in (0.1, 0.2, 0.3)]
    t1.per_image = per
    assert lesson06.check_06_5(True, -1.0, t1).correct and not lesson06.check_06_5(False, -1.0, t1).correct
    assert lesson06.check_06_5(True, np.float64(-1.0), t1).correct                # SciPy's statistic as it comes
    with pytest.raises(ValueError, match="rho is empty"):
        lesson06.check_06_5(True, None, t1)
    with pytest.raises(ValueError, match=r"rho = 1.0 is not what Spearman's rho"):
        lesson06.check_06_5(True, 1.0, t1)
    with pytest.raises(TypeError, match="rho='-1' must be a finite number"):
        lesson06.check_06_5(True, "-1", t1)


def test_lesson_07_checkers():
    from tests.conftest import predicted, random_images, tiny_crown_cnn

    model = tiny_crown_cnn(0)
    x = random_images(8, seed=1)
    y = predicted(model, x)
    for fn in (lesson07.check_07_1, lesson07.check_07_2):
        expected = _right_and_wrong(fn, 999, model, x, y, 4 / 255)
        assert isinstance(expected, int) and 0 <= expected <= len(x)
        assert fn(expected + 1, model, x, y, 4 / 255).correct is False
        with pytest.raises(TypeError, match="must be a whole number"):
            fn("3", model, x, y, 4 / 255)
        with pytest.raises(TypeError, match="must be a whole number"):
            fn(True, model, x, y, 4 / 255)                       # not read as the count 1
        with pytest.raises(ValueError, match="answer=1.5"):
            fn(1.5, model, x, y, 4 / 255)

    cap = radius_cap(1.0, 100_000, 0.001 / 10_000)
    assert 3.5 < cap < radius_cap(1.0, 100_000, 0.001)              # Bonferroni costs radius
    assert lesson07.check_07_3(cap).correct and lesson07.check_07_3(round(cap, 3)).correct
    for wrong in (radius_cap(1.0, 100_000, 0.001), 0.25 * cap):
        fb = lesson07.check_07_3(wrong)
        assert fb.correct is False and f"{cap:.3f}" not in str(fb) and f"{cap:.3f}" in str(fb.reveal())
    with pytest.raises(TypeError, match="must be a finite number"):
        lesson07.check_07_3("3.59")

    half = Smooth(halfspace_classifier(0.5), 2, 0.25, device="cpu")
    args = (half, 0.45, [100, 1000, 10_000], 32, 0.001, 10)
    fb = lesson07.check_07_4(None, *args)
    assert fb.correct is None
    fb = lesson07.check_07_4(100, *args)                  # at n = 100 p_A = 0.58 cannot clear 1/2 at alpha 0.001
    assert fb.correct is False and fb.expected in (1000, 10_000)
    assert lesson07.check_07_4(fb.expected, *args).correct
    with pytest.raises(ValueError, match="answer=500"):
        lesson07.check_07_4(500, *args)                   # not an n of the grid
    assert lesson07.check_07_4(torch.tensor(fb.expected), *args).correct     # a 0-d tensor is a number
    with pytest.raises(TypeError, match="must be a whole number"):
        lesson07.check_07_4(True, *args)
    with pytest.raises(TypeError, match="must be a whole number"):
        lesson07.check_07_4("1000", *args)

    fb = lesson07.check_07_5(10_000, psnr_db=30.0)        # more rows than the committed table holds
    assert fb.correct is False
    assert lesson07.check_07_5(fb.expected, psnr_db=30.0).correct
    assert lesson07.check_07_5(fb.expected + 1, psnr_db=30.0).correct is False
    loose = lesson07.check_07_5(0, psnr_db=0.0).expected   # every spoofed row passes a 0 dB rule
    assert loose > fb.expected
    with pytest.raises(ValueError, match="answer=-1"):
        lesson07.check_07_5(-1)
    with pytest.raises(TypeError, match="psnr_db="):
        lesson07.check_07_5(3, psnr_db="30")


def test_lesson_helpers():
    flat = torch.ones(1, 3, 32, 32)
    assert energy_share(flat, 0.05).item() == pytest.approx(0.05, abs=1e-3)
    spike = torch.zeros(1, 3, 32, 32)
    spike[0, 0, 0, 0] = 1
    assert energy_share(spike, 0.05).item() == 1.0 and energy_share(torch.zeros(1, 4), 0.5).item() == 0.0
    with pytest.raises(ValueError, match="fraction=0"):
        energy_share(flat, 0)
    x, y, index = first_image_per_class()
    assert y.tolist() == list(range(10)) and len(set(index.tolist())) == 10


@pytest.mark.parametrize("wrong", ["False", "no", "True", 1, 0, 1.0, [True]])
def test_yes_no_checkers_refuse_what_is_not_a_bool(wrong):
    """A string "False" is truthy and 1 == True: a yes/no checker must refuse both instead of grading them."""
    rows = [{"attack_error": 0.3, "verified_error": 0.6, "model": "m"}]
    t2 = SimpleNamespace(rows=rows, settings={"config": {"steps": 100}, "n_images": 6})
    with pytest.raises(TypeError, match="must be True or False"):
        lesson06.check_06_4(wrong, t2, models=["m"])
    x = torch.rand(2, 3, 32, 32)
    res = _shadow(x, success=(False, False))
    with pytest.raises(TypeError, match="must be True or False"):
        lesson05.check_05_5(wrong, res)


def test_per_image_checkers_refuse_strings_and_wrong_lengths(data):
    model, x, y = data
    xs = x[:2]
    res = _shadow(xs)
    dist = (res.x_shadow - xs).flatten(1).norm(dim=1).tolist()
    with pytest.raises(TypeError, match=r"answer\[1\]='no' must be True or False"):
        lesson04.check_04_4([True, "no"], dist, xs, res)
    with pytest.raises(ValueError, match="must hold 2 booleans"):
        lesson04.check_04_4([True], dist, xs, res)
    with pytest.raises(TypeError, match="list of 2 booleans"):
        lesson04.check_04_4("yes", dist, xs, res)
    assert lesson04.check_04_4(torch.tensor([True, True]), dist, xs, res).correct  # a bool tensor is a list of booleans


def test_checkers_check_their_evidence_and_answer_types(data):
    model, x, y = data
    xs = x[:2]
    with pytest.raises(ValueError, match="at least two lambda_tv"):
        lesson04.check_04_2({"spoofs": [], "looks_like": []}, xs, {})
    with pytest.raises(ValueError, match="exactly the keys"):
        lesson04.check_04_2({"spoofs": []}, xs, {0.1: _shadow(xs), 1.0: _shadow(xs)})
    rows = [{"channels": 1, "spoofed_mean_radius": 0.3, "natural_mean_radius": 0.4}]
    t1 = SimpleNamespace(rows=rows, settings={"channels": [1], "n": 256})
    with pytest.raises(ValueError, match="more CERTIFY samples"):
        lesson06.check_06_3("natural", t1, t1)                                  # the same table twice
    with pytest.raises(ValueError, match="not one of the accepted"):
        lesson06.check_06_3(True, t1, t1)
    t2 = SimpleNamespace(rows=[], settings={"config": {"steps": 100}, "n_images": 0})
    with pytest.raises(ValueError, match="no rows"):
        lesson06.check_06_4(True, t2, models=["m"])
    with pytest.raises(TypeError, match="must be a tuple"):
        lesson06.check_06_1(0.5)
    with pytest.raises(TypeError, match="images needed=True"):
        lesson06.check_06_1((0.272, 0.728, True))
    with pytest.raises(ValueError, match=r"answer\['larger_radius'\]=True"):
        lesson06.check_06_2({"larger_radius": True, "larger_l2": 3}, {1: (0, 0), 3: (0, 0)},
                            SimpleNamespace(rows=[], settings={"channels": [1, 3]}))
    with pytest.raises(TypeError, match="must be a finite number"):
        lesson04.check_04_3("0.9", 0.25, 256, 0.001, None, _shadow(xs, steps=100, noise_samples=64))
    with pytest.raises(ValueError, match=r"answer\['clean_error'\]='more'"):
        lesson03.check_03_5({"clean_error": "more", "verified_error": "lower"}, {}, model, 1 / 255, model, 8 / 255,
                            xs, y[:2])
    with pytest.raises(ValueError, match="answer item='colour'"):
        lesson05.check_05_2(["colour"], _shadow(xs, init="zeros"))


def test_a_wrong_answer_gets_a_hint_not_the_key():
    """check_06_1((0, 0, 0)) once answered 'expected (0.272, 0.728, 402)': the key now needs reveal."""
    fb = lesson06.check_06_1((0.0, 0.0, 0))
    assert fb.correct is False and "0.272" not in str(fb) and "402" not in str(fb) and "reveal" in str(fb)
    shown = fb.reveal()
    assert shown.correct is False and "0.272" in str(shown) and "expected" in str(shown)
    assert "0.272" in str(check("06.1", (0.0, 0.0, 0), reveal=True))
    right = lesson06.check_06_1((0.272, 0.728, 402))
    assert right.correct and "0.272" in str(right)                       # a right answer shows the explanation
    assert check("05.1", None, reveal=True).correct is None           # nothing to reveal while unanswered


def test_numbers_in_their_natural_forms_and_no_strings(data):
    """03.6's own method gives a 0-d tensor: it is a count; a string where a number is asked is refused (03.1)."""
    from shadowlab.lab.grading import as_count, as_number

    assert as_count("n", torch.tensor(3)) == 3 and as_count("n", np.int64(3)) == 3 and as_count("n", np.array(2)) == 2
    assert as_number("v", torch.tensor(0.5)) == 0.5 and as_number("v", np.float32(0.5)) == 0.5
    for wrong in ("3", torch.tensor(True), np.bool_(True), torch.tensor([1, 2])):
        with pytest.raises(TypeError):
            as_count("n", wrong)
    model, x, y = data
    smooth = Smooth(model, 10, 0.5, device="cpu")
    expected = lesson03.check_03_6(99, smooth, x[:4], 32, 0.001).expected
    pred = smooth.predict(x[:4], 32, 0.001, seed=0)
    assert lesson03.check_03_6((pred == ABSTAIN).sum(), smooth, x[:4], 32, 0.001).correct            # a 0-d tensor
    assert lesson03.check_03_6(np.int64(expected), smooth, x[:4], 32, 0.001).correct
    caps = {0.25: radius_cap(0.25, 10_000, 0.001), 0.5: radius_cap(0.5, 10_000, 0.001)}
    with pytest.raises(TypeError, match="must be a finite number"):
        lesson03.check_03_1({s: str(c) for s, c in caps.items()}, [0.25, 0.5])
    with pytest.raises(TypeError, match="must be a finite number"):
        lesson03.check_03_1({str(s): c for s, c in caps.items()}, [0.25, 0.5])
    assert lesson03.check_03_1({s: torch.tensor(c) for s, c in caps.items()}, [0.25, 0.5]).correct
    cert = Certificate(prediction=0, radius=0.2, pA_lower=0.9, counts=[5, 5, 0])
    with pytest.raises(TypeError, match="must be a finite number"):
        lesson03.check_03_2({0.25: "0.12", 0.75: 0.12}, {0.12: [0.0, 0.0]}, {0.12: [cert]}, [0])


def test_hints_point_to_the_method_not_the_code():
    """No pending hint spells out the call that computes the answer (04.5's named a function lesson 04 never
    imports)."""
    for key, fn in CHECKERS.items():
        src = inspect.getsource(fn)
        hint = src.split("return grading.pending(", 1)[1].split(")\n", 1)[0]
        assert "(model" not in hint and "==" not in hint and ".sum()" not in hint and "widgets." not in hint, key


def test_student_mode_carries_no_key(monkeypatch):
    from shadowlab.lab import grading

    monkeypatch.setattr(grading, "_student", None)
    try:
        grading.student_mode(True)
        fb = lesson06.check_06_1((0.0, 0.0, 0))
        assert fb.correct is False and fb.expected is None and fb.explanation == ""
        assert "0.272" not in str(fb) and "reveal" not in str(fb)
        with pytest.raises(grading.KeyUnavailable, match="no expected answers"):
            fb.reveal()
        with pytest.raises(grading.KeyUnavailable):
            check("06.1", (0.0, 0.0, 0), reveal=True)
        right = lesson06.check_06_1((0.272, 0.728, 402))
        assert right.correct is True and right.expected is None and "0.272" in str(right)   # the why, once right
    finally:
        grading.student_mode(False)
    assert lesson06.check_06_1((0.0, 0.0, 0)).expected is not None
    monkeypatch.setenv("SHADOWLAB_STUDENT", "1")
    assert grading.student_mode() and lesson06.check_06_1((0.0, 0.0, 0)).expected is None
