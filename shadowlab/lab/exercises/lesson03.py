"""The checkers of lesson 03's exercises (certified defenses).

Each takes the student's ``answer`` first and the evidence it needs, and returns a ``grading.Feedback``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from shadowlab.lab.grading import (
    Feedback,
    as_choice,
    as_count,
    as_evidence,
    as_mapping,
    as_number,
    as_tuple,
    pending,
    verdict,
)


# ================================================================================================ lesson 03
def check_03_1(answer: Mapping[float, float] | None, sigmas: Sequence[float], n: int = 10_000,
               alpha: float = 0.001) -> Feedback:
    """Largest CERTIFY radius per sigma at n samples, {sigma: cap} (lessons.radius_cap)."""
    if answer is None:
        return pending("03.1", "the largest radius CERTIFY can state is reached when every one of the N votes goes "
                               "to the top class: the lesson's radius-cap helper gives it for one sigma")
    from shadowlab.lab.lessons import radius_cap

    if not isinstance(answer, Mapping):
        raise TypeError(f"answer={answer!r} must be a dict {{sigma: cap}}")
    expected = {float(s): round(radius_cap(float(s), n, alpha), 4) for s in sigmas}
    got = {as_number("answer key (a sigma)", k): as_number(f"answer[{k!r}]", v) for k, v in answer.items()}
    ok = set(got) == set(expected) and all(abs(got[s] - c) <= 1e-3 for s, c in expected.items())
    why = (f"at n = {n}: " + ", ".join(f"sigma {s:g}: {c:.3f}" for s, c in expected.items())
           + ". With few samples the cap, not the model, decides how far the curves reach.")
    return verdict("03.1", ok, expected, why, answer)


def check_03_2(answer: Mapping[float, float] | None, certificates: Mapping[float, Sequence[Any]], labels: Any,
               radii: Sequence[float] = (0.25, 0.75), n: int | None = None, alpha: float = 0.001) -> Feedback:
    """{radius: sigma} with the best certified accuracy at each radius, from {sigma: certificates} on labels."""
    if answer is None:
        return pending("03.2", "read each sigma's certified-accuracy curve at r = 0.25 and at r = 0.75")
    from shadowlab.certify.smoothing import certified_accuracy
    from shadowlab.lab.lessons import radius_cap

    if not isinstance(answer, Mapping):
        raise TypeError(f"answer={answer!r} must be a dict {{radius: sigma}}")
    acc = {float(s): certified_accuracy(c, labels, radii) for s, c in certificates.items()}
    expected, ok, lines = {}, True, []
    for k, r in enumerate(radii):
        best = max(a[k] for a in acc.values())
        tied = [s for s, a in acc.items() if a[k] == best]
        expected[float(r)] = tied[0] if len(tied) == 1 else tied
        given = dict(answer).get(r, dict(answer).get(float(r)))
        ok &= given is not None and as_number(f"answer[{r!r}]", given) in tied
        lines.append(f"r = {r}: " + ", ".join(f"sigma {s:g} {100 * a[k]:.0f}%" for s, a in acc.items()))
    why = "; ".join(lines) + "."
    if n is not None:
        caps = ", ".join(f"sigma {s:g} {radius_cap(s, n, alpha):.2f}" for s in acc)
        why += f" Caps at n = {n}: {caps}: a sigma whose cap is below r certifies nothing there."
    return verdict("03.2", ok, expected, why, answer)


def vote_pattern(counts: Sequence[int], split_share: float = 0.9) -> str:
    """"split" when the two top classes hold at least split_share of the votes, else "unsure" (spread out)."""
    c = sorted((int(v) for v in counts), reverse=True)
    return "split" if sum(c[:2]) >= split_share * max(1, sum(c)) else "unsure"


def check_03_3(answer: tuple[int, str] | None, certificates: Sequence[Any]) -> Feedback:
    """(index, "split" | "unsure"): an image CERTIFY abstained on, and how its votes look (vote_pattern)."""
    from shadowlab.certify.smoothing import ABSTAIN

    abstained = [i for i, c in enumerate(certificates) if c.prediction == ABSTAIN]
    if answer is None:
        return pending("03.3", f"CERTIFY abstained on {len(abstained)} of these images; look at their vote counts")
    index, pattern = as_tuple("answer", answer, 2, "tuple (index, 'split' or 'unsure')")
    index = as_count("index", index)
    as_choice("pattern", pattern, ("split", "unsure"))
    if not 0 <= int(index) < len(certificates) or certificates[int(index)].prediction != ABSTAIN:
        return verdict("03.3", False, abstained, f"image {index} was not an abstention; these were: {abstained}.",
                        answer)
    c = certificates[int(index)]
    expected = vote_pattern(c.counts)
    why = (f"votes {c.counts}: the top two hold {100 * sum(sorted(c.counts)[-2:]) / max(1, sum(c.counts)):.0f}% "
           "(split means at least 90%). CERTIFY abstains when pA_lower < 1/2, whatever the reason.")
    return verdict("03.3", pattern == expected, (int(index), expected), why, answer)


def check_03_4(answer: tuple[str, str] | None, runs: Mapping[str, tuple[float, int]] | None, model: nn.Module,
               x: torch.Tensor, y: torch.Tensor, eps: float) -> Feedback:
    """(tightest, costliest) among "ibp", "crown-ibp", "crown": the method whose worst margin lower bound
    (``bounds.lower_bounds`` with ``margin_spec``, min over the margins) is largest on average over the images, and
    the method that propagates the most tensor elements (``bounds.count_work``: boxes plus CROWN coefficients).

    Read from the student's ``runs`` ({method: (mean worst-margin bound, elements propagated)}), validated against
    the same computation here (it is deterministic and cheap): a typed pair without the runs is refused.
    Both are deterministic: the cost is counted from the bound code, not timed, so machine load cannot change it.
    """
    if answer is None:
        return pending("03.4", "bound the margins with each method on the same images at the same eps, count the "
                               "work of each call, and keep both numbers per method in `runs`")
    from shadowlab.certify.bounds import METHODS, count_work, lower_bounds, margin_spec

    tightest, costliest = as_tuple("answer", answer, 2, "pair (tightest method, costliest method)")
    as_choice("tightest", tightest, METHODS)
    as_choice("costliest", costliest, METHODS)
    given = as_evidence("runs", runs, METHODS, "(mean worst-margin bound, work.elements)")
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
        bound, elements = as_tuple(f"runs[{m!r}]", given[m], 2, "pair (mean worst-margin bound, work.elements)")
        bound, elements = as_number(f"runs[{m!r}] bound", bound), as_count(f"runs[{m!r}] elements", elements)
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
    return verdict("03.4", tightest in tight and costliest in costly, expected, why, answer)


def check_03_5(answer: Mapping[str, str] | None, tables: Mapping[str, Mapping[str, float]] | None,
               model_small_eps: nn.Module, eps_small: float, model_large_eps: nn.Module, eps_large: float,
               x: torch.Tensor, y: torch.Tensor) -> Feedback:
    """{"clean_error": "higher"|"lower", "verified_error": ...}: the large-eps model against the small-eps one,
    each at its own training eps.

    Read from the student's ``tables`` ({"small": error_table(small-eps model ...), "large": error_table(large-eps
    model ...)}), validated against ``verify.error_table`` here: a typed answer without the tables is refused."""
    if answer is None:
        return pending("03.5", "measure both models' clean and verified errors on the same images, each at the eps "
                               "it was trained for, and keep both tables in `tables`")
    from shadowlab.certify.verify import error_table

    given = as_mapping("answer", answer, ("clean_error", "verified_error"))
    for key, value in given.items():
        as_choice(f"answer[{key!r}]", value, ("higher", "lower"))
    runs = as_evidence("tables", tables, ("small", "large"), "error_table(...)")
    a = error_table(model_small_eps, x, y, eps_small, device=x.device)
    b = error_table(model_large_eps, x, y, eps_large, device=x.device)
    for which, table in (("small", a), ("large", b)):
        if not isinstance(runs[which], Mapping):
            raise TypeError(f"tables[{which!r}] must be an error_table(...) dict, got {type(runs[which]).__name__}")
        for k in ("clean_error", "verified_error"):
            if k not in runs[which]:
                raise ValueError(f"tables[{which!r}] has no {k!r}: it must be error_table(...)'s dict")
            if abs(as_number(f"tables[{which!r}][{k!r}]", runs[which][k]) - table[k]) > 1e-6:
                raise ValueError(f"tables[{which!r}][{k!r}] is not what error_table gives for the {which}-eps model at "
                                 "its training eps on these images: compute it on the exercise's models and images")
    expected = {k: "higher" if b[k] > a[k] else "lower" for k in ("clean_error", "verified_error")}
    why = (f"small eps: clean {100 * a['clean_error']:.1f}%, verified {100 * a['verified_error']:.1f}%; large eps: "
           f"clean {100 * b['clean_error']:.1f}%, verified {100 * b['verified_error']:.1f}%. A larger training eps "
           "trades clean accuracy for certificates over a bigger ball.")
    ok = all(given[k] == v for k, v in expected.items())
    return verdict("03.5", ok, expected, why, answer)


def check_03_6(answer: int | None, smooth: Any, x: torch.Tensor, n: int, alpha: float, seed: int = 0) -> Feedback:
    """How many of the images does PREDICT (Smooth.predict with n samples, level alpha) abstain on?"""
    if answer is None:
        return pending("03.6", "PREDICT returns ABSTAIN for an image when its binomial test fails: run it on these "
                               "images at the exercise's n, alpha and seed and count those")
    from shadowlab.certify.smoothing import ABSTAIN

    pred = smooth.predict(x, n, alpha, seed=seed)
    expected = int((pred == ABSTAIN).sum())
    why = (f"PREDICT abstains on {expected} of {len(x)} images at n = {n}, alpha = {alpha}: it abstains when the "
           "two-sided binomial test cannot tell the top two counts apart at level alpha; otherwise its answer is "
           "wrong with probability at most alpha.")
    return verdict("03.6", as_count("answer", answer) == expected, expected, why, answer)
