"""The checkers of lesson 03's exercises (certified defenses).

Each takes the student's ``answer`` first and the evidence it needs, and returns a ``grading.Feedback``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from shadowlab.certify.bounds import METHODS, count_work, lower_bounds, margin_spec
from shadowlab.certify.smoothing import ABSTAIN, certified_accuracy
from shadowlab.certify.verify import error_table
from shadowlab.lab import grading
from shadowlab.lab.lessons import exact_margins, radius_cap


# ================================================================================================ lesson 03
def check_03_1(answer: Mapping[float, float] | None, sigmas: Sequence[float], n: int = 10_000,
               alpha: float = 0.001) -> grading.Feedback:
    """Largest CERTIFY radius per sigma at n samples, {sigma: cap} (lessons.radius_cap)."""
    if answer is None:
        return grading.pending("03.1", "the largest radius CERTIFY can state is reached when every one of the N votes "
                                       "goes to the top class: the lesson's radius-cap helper gives it for one sigma")

    if not isinstance(answer, Mapping):
        raise TypeError(f"answer={answer!r} must be a dict {{sigma: cap}}")
    expected = {float(s): round(radius_cap(float(s), n, alpha), 4) for s in sigmas}
    got = {grading.as_number("answer key (a sigma)", k): grading.as_number(f"answer[{k!r}]", v)
           for k, v in answer.items()}
    ok = set(got) == set(expected) and all(abs(got[s] - c) <= 1e-3 for s, c in expected.items())
    why = (f"at n = {n}: " + ", ".join(f"sigma {s:g}: {c:.3f}" for s, c in expected.items())
           + ". With few samples the cap, not the model, decides how far the curves reach.")
    return grading.verdict("03.1", ok, expected, why, answer)


def check_03_2(answer: Mapping[float, float] | None, accuracy: Mapping[float, Sequence[float]] | None,
               certificates: Mapping[float, Sequence[Any]], labels: Any, radii: Sequence[float] = (0.25, 0.75),
               n: int | None = None, alpha: float = 0.001) -> grading.Feedback:
    """{radius: sigma} with the best certified accuracy at each radius, from {sigma: certificates} on labels.

    Graded with the student's reading ``accuracy`` ({sigma: [certified accuracy at each radius of radii]}, in
    [0, 1]), checked against the certificates here: a typed choice of sigmas without it is refused."""
    if answer is None:
        return grading.pending("03.2", "read each sigma's certified-accuracy curve at r = 0.25 and at r = 0.75 and "
                                       "keep the readings in `accuracy`")

    if not isinstance(answer, Mapping):
        raise TypeError(f"answer={answer!r} must be a dict {{radius: sigma}}")
    acc = {float(s): certified_accuracy(c, labels, radii) for s, c in certificates.items()}
    grading.check_evidence("accuracy", accuracy, {s: a.tolist() for s, a in acc.items()},
                           "[certified accuracy at each radius]", "each sigma's certificates at these radii")
    expected, ok, lines = {}, True, []
    for k, r in enumerate(radii):
        best = max(a[k] for a in acc.values())
        tied = [s for s, a in acc.items() if a[k] == best]
        expected[float(r)] = tied[0] if len(tied) == 1 else tied
        given = dict(answer).get(r, dict(answer).get(float(r)))
        ok &= given is not None and grading.as_number(f"answer[{r!r}]", given) in tied
        lines.append(f"r = {r}: " + ", ".join(f"sigma {s:g} {100 * a[k]:.0f}%" for s, a in acc.items()))
    why = "; ".join(lines) + "."
    if n is not None:
        caps = ", ".join(f"sigma {s:g} {radius_cap(s, n, alpha):.2f}" for s in acc)
        why += f" Caps at n = {n}: {caps}: a sigma whose cap is below r certifies nothing there."
    return grading.verdict("03.2", ok, expected, why, answer)


def vote_pattern(counts: Sequence[int], split_share: float = 0.9) -> str:
    """"split" when the two top classes hold at least split_share of the votes, else "unsure" (spread out)."""
    c = sorted((int(v) for v in counts), reverse=True)
    return "split" if sum(c[:2]) >= split_share * max(1, sum(c)) else "unsure"


def check_03_3(answer: tuple[int, str] | None, top_two_share: float | None,
               certificates: Sequence[Any]) -> grading.Feedback:
    """(index, "split" | "unsure"): an image CERTIFY abstained on, and how its votes look (vote_pattern).

    Graded with the student's measurement ``top_two_share`` (the share of that image's votes held by its two
    largest classes, in [0, 1]), checked against its certificate's counts: a typed pattern without it is refused."""
    abstained = [i for i, c in enumerate(certificates) if c.prediction == ABSTAIN]
    if answer is None:
        return grading.pending("03.3", f"CERTIFY abstained on {len(abstained)} of these images; look at their vote "
                                       "counts and keep the share of the top two classes in `top_two_share`")
    index, pattern = grading.as_tuple("answer", answer, 2, "tuple (index, 'split' or 'unsure')")
    index = grading.as_count("index", index)
    grading.as_choice("pattern", pattern, ("split", "unsure"))
    if not 0 <= int(index) < len(certificates) or certificates[int(index)].prediction != ABSTAIN:
        return grading.verdict("03.3", False, abstained,
                               f"image {index} was not an abstention; these were: {abstained}.", answer)
    c = certificates[int(index)]
    share = sum(sorted(c.counts)[-2:]) / max(1, sum(c.counts))
    grading.check_evidence("top_two_share", top_two_share, share, "the top two classes' share of the votes, in [0, 1]",
                           f"image {index}'s vote counts", tol=1e-3)
    expected = vote_pattern(c.counts)
    why = (f"votes {c.counts}: the top two hold {100 * share:.0f}% (split means at least 90%). CERTIFY abstains "
           "when pA_lower < 1/2, whatever the reason.")
    return grading.verdict("03.3", pattern == expected, (int(index), expected), why, answer)


def check_03_4(answer: tuple[str, str] | None, runs: Mapping[str, tuple[float, int]] | None, model: nn.Module,
               x: torch.Tensor, y: torch.Tensor, eps: float) -> grading.Feedback:
    """(tightest, costliest) among "ibp", "crown-ibp", "crown": the method whose worst margin lower bound
    (``bounds.lower_bounds`` with ``margin_spec``, min over the margins) is largest on average over the images, and
    the method that propagates the most tensor elements (``bounds.count_work``: boxes plus CROWN coefficients).

    Read from the student's ``runs`` ({method: (mean worst-margin bound, elements propagated)}), validated against
    the same computation here (it is deterministic and cheap): a typed pair without the runs is refused.
    Both are deterministic: the cost is counted from the bound code, not timed, so machine load cannot change it.
    """
    if answer is None:
        return grading.pending("03.4", "bound the margins with each method on the same images at the same eps, count "
                                       "the work of each call, and keep both numbers per method in `runs`")

    tightest, costliest = grading.as_tuple("answer", answer, 2, "pair (tightest method, costliest method)")
    grading.as_choice("tightest", tightest, METHODS)
    grading.as_choice("costliest", costliest, METHODS)
    given = grading.as_evidence("runs", runs, METHODS, "(mean worst-margin bound, work.elements)")
    with torch.no_grad():
        num_classes = int(model.eval()(x[:1]).shape[1])
    C = margin_spec(y.to(x.device), num_classes).to(x.dtype)
    worst, work = {}, {}
    with torch.no_grad():
        for m in METHODS:
            with count_work() as w:
                worst[m] = float(lower_bounds(model, x, eps, C, m).min(1).values.mean())
            work[m] = w.elements
    for m in METHODS:
        bound, elements = grading.as_tuple(f"runs[{m!r}]", given[m], 2, "pair (mean worst-margin bound, work.elements)")
        bound = grading.as_number(f"runs[{m!r}] bound", bound)
        elements = grading.as_count(f"runs[{m!r}] elements", elements)
        if abs(bound - worst[m]) > 1e-4 * max(1.0, abs(worst[m])) or elements != work[m]:
            raise ValueError(f"runs[{m!r}] = ({bound:.4g}, {elements}) is not what lower_bounds(..., {m!r}) gives on "
                             "these images at this eps inside count_work(): compute it on the exercise's model, "
                             "images and eps")
    top = max(worst.values())
    tight = [m for m in METHODS if worst[m] == top]
    most = max(work.values())
    costly = [m for m in METHODS if work[m] == most]
    expected = (tight[0] if len(tight) == 1 else tight, costly[0] if len(costly) == 1 else costly)
    why = (", ".join(f"{m}: mean worst margin bound {worst[m]:+.3f}, {work[m]:,} elements propagated" for m in METHODS)
           + ". Full CROWN runs a backward pass for every neuron of every hidden layer to get its pre-activation "
           "bounds; CROWN-IBP takes those from one IBP pass and runs a single backward pass for the margins.")
    return grading.verdict("03.4", tightest in tight and costliest in costly, expected, why, answer)


def check_03_5(answer: Mapping[str, str] | None, tables: Mapping[str, Mapping[str, float]] | None,
               model_small_eps: nn.Module, eps_small: float, model_large_eps: nn.Module, eps_large: float,
               x: torch.Tensor, y: torch.Tensor) -> grading.Feedback:
    """{"clean_error": "higher"|"lower", "verified_error": ...}: the large-eps model against the small-eps one,
    each at its own training eps.

    Read from the student's ``tables`` ({"small": error_table(small-eps model ...), "large": error_table(large-eps
    model ...)}), validated against ``verify.error_table`` here: a typed answer without the tables is refused."""
    if answer is None:
        return grading.pending("03.5", "measure both models' clean and verified errors on the same images, each at the "
                                       "eps it was trained for, and keep both tables in `tables`")

    given = grading.as_mapping("answer", answer, ("clean_error", "verified_error"))
    for key, value in given.items():
        grading.as_choice(f"answer[{key!r}]", value, ("higher", "lower"))
    runs = grading.as_evidence("tables", tables, ("small", "large"), "error_table(...)")
    a = error_table(model_small_eps, x, y, eps_small, device=x.device)
    b = error_table(model_large_eps, x, y, eps_large, device=x.device)
    for which, table in (("small", a), ("large", b)):
        if not isinstance(runs[which], Mapping):
            raise TypeError(f"tables[{which!r}] must be an error_table(...) dict, got {type(runs[which]).__name__}")
        for k in ("clean_error", "verified_error"):
            if k not in runs[which]:
                raise ValueError(f"tables[{which!r}] has no {k!r}: it must be error_table(...)'s dict")
            if abs(grading.as_number(f"tables[{which!r}][{k!r}]", runs[which][k]) - table[k]) > 1e-6:
                raise ValueError(f"tables[{which!r}][{k!r}] is not what error_table gives for the {which}-eps model at "
                                 "its training eps on these images: compute it on the exercise's models and images")
    expected = {k: "higher" if b[k] > a[k] else "lower" for k in ("clean_error", "verified_error")}
    why = (f"small eps: clean {100 * a['clean_error']:.1f}%, verified {100 * a['verified_error']:.1f}%; large eps: "
           f"clean {100 * b['clean_error']:.1f}%, verified {100 * b['verified_error']:.1f}%. A larger training eps "
           "trades clean accuracy for certificates over a bigger ball.")
    ok = all(given[k] == v for k, v in expected.items())
    return grading.verdict("03.5", ok, expected, why, answer)


def check_03_6(answer: int | None, smooth: Any, x: torch.Tensor, n: int, alpha: float,
               seed: int = 0) -> grading.Feedback:
    """How many of the images does PREDICT (Smooth.predict with n samples, level alpha) abstain on?"""
    if answer is None:
        return grading.pending("03.6", "PREDICT returns ABSTAIN for an image when its binomial test fails: run it on "
                                       "these images at the exercise's n, alpha and seed and count those")

    pred = smooth.predict(x, n, alpha, seed=seed)
    expected = int((pred == ABSTAIN).sum())
    why = (f"PREDICT abstains on {expected} of {len(x)} images at n = {n}, alpha = {alpha}: it abstains when the "
           "two-sided binomial test cannot tell the top two counts apart at level alpha; otherwise its answer is "
           "wrong with probability at most alpha.")
    return grading.verdict("03.6", grading.as_count("answer", answer) == expected, expected, why, answer)


def _robust_at(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps_255: float, method: str, k: int) -> bool:
    """Whether the single image x (label y, of k classes) is robust at eps_255 / 255: exactly (method "exact",
    ``exact_margins``) or certified by a bound (``bounds.lower_bounds``, method "crown")."""
    if method == "exact":
        return bool(exact_margins(model, x, y, eps_255 / 255, num_classes=k)["robust"][0])

    with torch.no_grad():
        return bool((lower_bounds(model, x, eps_255 / 255, margin_spec(y, k), method) >= 0).all())


def _radius(model: nn.Module, x: torch.Tensor, y: torch.Tensor, method: str, k: int, lo: float, hi: float,
            tol: float) -> float:
    """The largest eps (x 1/255) in [lo, hi] at which x is robust by ``method``, by bisection to tol (robust at lo,
    not at hi)."""
    while hi - lo > tol:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _robust_at(model, x, y, mid, method, k) else (lo, mid)
    return (lo + hi) / 2


def check_03_7(answer: tuple[float, float] | None, exact_runs: Mapping[float, float] | None, model: nn.Module,
               x: torch.Tensor, y: torch.Tensor, tol_255: float = 0.1) -> grading.Feedback:
    """(crown_radius, exact_radius) in units of 1/255 for one image x that the tiny network classifies correctly: the
    largest L-inf eps at which CROWN certifies it, and the largest at which it is truly robust (``exact_margins``:
    every margin minimum > 0), each within tol_255.

    Read with the student's ``exact_runs`` ({eps_255: the smallest exact margin at eps_255 / 255}), each entry
    recomputed here; they must hold the bisection's last bracket (a robust eps at or below the exact radius given and
    a non-robust one at most 2 tol_255 above it), so a typed pair without the runs is refused. The true margin
    minimum only falls as eps grows (the balls nest), so the exact radius is one number; the checker finds it, and
    CROWN's, by its own bisection.
    """
    if answer is None:
        return grading.pending("03.7", "bisect on eps: at each eps ask the exact verifier whether every margin minimum "
                                       "stays positive (and, separately, whether CROWN's lower bounds do), halving the "
                                       "bracket until it is narrower than the tolerance")
    crown_r, exact_r = grading.as_tuple("answer", answer, 2, "pair (crown_radius, exact_radius) in units of 1/255")
    crown_r, exact_r = grading.as_number("crown_radius", crown_r), grading.as_number("exact_radius", exact_r)
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[0] != 1:
        raise ValueError("x must be one image, 1 x C x H x W (e.g. xs[:1])")
    with torch.no_grad():
        logits = model.eval()(x)
    k = int(logits.shape[1])
    if int(logits.argmax(1)[0]) != int(y[0]):
        raise ValueError("the model misclassifies this image: its radius is 0 by every method; take an image it "
                         "classifies correctly")
    if exact_runs is None or (isinstance(exact_runs, Mapping) and not exact_runs):
        raise ValueError("exact_runs is empty: run the bisection first and keep every exact run in exact_runs "
                         "({eps_255: smallest exact margin})")
    if not isinstance(exact_runs, Mapping):
        raise TypeError(f"exact_runs must be a dict {{eps_255: smallest exact margin}}, got "
                        f"{type(exact_runs).__name__}")
    if len(exact_runs) > 40:
        raise ValueError(f"exact_runs holds {len(exact_runs)} runs: keep those of one bisection (at most 40)")

    runs = {}
    for key, value in exact_runs.items():
        eps_255 = grading.as_number("exact_runs key (an eps x 1/255)", key)
        given = grading.as_number(f"exact_runs[{key!r}]", value)
        if not 0 <= eps_255 <= 255:
            raise ValueError(f"exact_runs key {key!r} must be an eps in units of 1/255, in [0, 255]")
        true = float(exact_margins(model, x, y, eps_255 / 255, num_classes=k)["margin"].min())
        if abs(given - true) > 1e-4 * max(1.0, abs(true)):
            raise ValueError(f"exact_runs[{key!r}] = {given:.6g} is not the smallest margin exact_margins gives for "
                             "this image at that eps: compute it on the exercise's model and image")
        runs[eps_255] = true
    robust = [e for e, m in runs.items() if m > 0 and e <= exact_r]
    broken = [e for e, m in runs.items() if m <= 0 and e >= exact_r]
    if not robust or not broken or min(broken) - max(robust) > 2 * tol_255 + 1e-9:
        raise ValueError(f"exact_runs must hold your bisection's last bracket: a robust eps at or below your exact "
                         f"radius {exact_r:g} and a non-robust one at most {2 * tol_255:g} above the robust one")
    true_exact = _radius(model, x, y, "exact", k, max(robust), min(broken), tol_255 / 10)
    hi = 1.0
    while _robust_at(model, x, y, hi, "crown", k) and hi < 255:
        hi *= 2
    true_crown = _radius(model, x, y, "crown", k, 0.0, min(hi, 255.0), tol_255 / 10)
    expected = (round(true_crown, 2), round(true_exact, 2))
    ok = abs(crown_r - true_crown) <= tol_255 and abs(exact_r - true_exact) <= tol_255
    share = 100 * (1 - true_crown / max(true_exact, 1e-12))
    why = (f"CROWN certifies this image up to {true_crown:.2f}/255 and it is truly robust up to {true_exact:.2f}/255: "
           f"CROWN gives away {share:.0f}% of the true radius. Between the two radii the image is robust, but only a "
           "complete verifier (the MILP) can say so; a sound, incomplete bound cannot.")
    return grading.verdict("03.7", ok, expected, why, answer)
