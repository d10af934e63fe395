"""The checkers of lesson 06's exercises (reproducing Tables 1 and 2).

Each takes the student's ``answer`` first and the evidence it needs, and returns a ``grading.Feedback``."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.stats import spearmanr
from statsmodels.stats.proportion import proportion_confint

from shadowlab import checkpoints
from shadowlab.lab import grading


# ================================================================================================ lesson 06
def images_for_half_width(half_width: float, alpha: float = 0.05, p: float = 0.5) -> int:
    """Smallest even n whose two-sided (1 - alpha) Clopper-Pearson interval at k = p n has half-width <= half_width."""
    n = 2
    while True:
        lo, hi = proportion_confint(round(p * n), n, alpha=alpha, method="beta")
        if (hi - lo) / 2 <= half_width:
            return n
        n += 2


def check_06_1(answer: tuple[float, float, int] | None, successes: int = 10, n: int = 20,
               half_width: float = 0.05) -> grading.Feedback:
    """(low, high, n_needed): the 95% Clopper-Pearson interval of successes / n and the images for +- half_width."""
    if answer is None:
        return grading.pending("06.1", "a Clopper-Pearson interval for 10 successes in 20; then grow the number of "
                                       "images until it is narrow enough")

    lo, hi = proportion_confint(successes, n, alpha=0.05, method="beta")
    need = images_for_half_width(half_width)
    a_lo, a_hi, a_n = grading.as_tuple("answer", answer, 3, "tuple (low, high, images needed)")
    a_lo, a_hi = grading.as_number("low", a_lo), grading.as_number("high", a_hi)
    a_n = grading.as_count("images needed", a_n)
    ok = abs(a_lo - lo) <= 5e-3 and abs(a_hi - hi) <= 5e-3 and abs(a_n - need) <= 0.05 * need
    why = (f"{successes}/{n}: [{lo:.3f}, {hi:.3f}]; +-{half_width} needs about {need} images (Clopper-Pearson, "
           "within 5% accepted: the normal approximation gives a little less).")
    return grading.verdict("06.1", ok, (round(lo, 3), round(hi, 3), need), why, answer)


def _mean_of(rows: Sequence[Mapping[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return float(np.mean(vals)) if vals else None


def _table(name: str, table: Any, what: str) -> Any:
    """A Table 1 or 2 run (``reproduce.table1`` / ``table2``: ``rows`` and ``settings``), refused when missing."""
    if table is None or not hasattr(table, "rows") or not hasattr(table, "settings"):
        raise ValueError(f"{name}={table!r} must be {what}: run it first")
    return table


def check_06_2(answer: Mapping[str, int] | None, channel_means: Mapping[int, Sequence[float]] | None, t1: Any
               ) -> grading.Feedback:
    """{"larger_radius": 1|3, "larger_l2": 1|3}: which attack spoofs larger mean radii, which moves further in L2.

    Graded with the student's reading ``channel_means`` ({1: (mean spoofed radius, mean ||delta||_2), 3: (...)},
    each averaged over the sigmas of Table 1 with a value, 0 where none), checked against ``t1``'s rows: a typed
    answer without it is refused."""
    if answer is None:
        return grading.pending("06.2", "average each attack's spoofed radius and ||delta||_2 over sigma from the run "
                                       "with both channel modes (keep them in `channel_means`); then {'larger_radius': "
                                       "1 or 3, 'larger_l2': 1 or 3}")
    given = grading.as_mapping("answer", answer, ("larger_radius", "larger_l2"))
    for key, value in given.items():
        grading.as_choice(f"answer[{key!r}]", value, (1, 3))
    _table("t1", t1, "a Table 1 run (reproduce.table1 with channels (1, 3))")
    if not {1, 3} <= set(t1.settings["channels"]):
        raise ValueError("t1 must be run with channels (1, 3): T1_CHANNELS = [1, 3]")
    rows = {c: [row for row in t1.rows if row["channels"] == c] for c in (1, 3)}   # one row per (sigma, channels)
    r = {c: _mean_of(rows[c], "spoofed_mean_radius") or 0.0 for c in (1, 3)}
    d = {c: _mean_of(rows[c], "mean_l2") or 0.0 for c in (1, 3)}
    grading.check_evidence("channel_means", channel_means, {c: (r[c], d[c]) for c in (1, 3)},
                           "(mean spoofed radius, mean ||delta||_2)", "the mean over t1's rows of that channel mode "
                           "(spoofed_mean_radius, mean_l2; sigmas without a value left out)", tol=1e-4)
    expected = {"larger_radius": 1 if r[1] >= r[3] else 3, "larger_l2": 1 if d[1] >= d[3] else 3}
    why = (f"mean spoofed radius over sigma: 1-channel {r[1]:.3f}, 3-channel {r[3]:.3f}; mean ||delta||_2: "
           f"1-channel {d[1]:.2f}, 3-channel {d[3]:.2f}.")
    return grading.verdict("06.2", given == expected, expected, why, answer)


def check_06_3(answer: str | None, t1_small_n: Any, t1_large_n: Any, channels: int = 1) -> grading.Feedback:
    """"natural" or "spoofed": whose mean radius changes more (relative, averaged over sigma) from small to large n."""
    if answer is None:
        return grading.pending("06.3", "'natural' or 'spoofed': compare the two tables' mean radii")
    grading.as_choice("answer", answer, ("natural", "spoofed"))
    _table("t1_small_n", t1_small_n, "the lesson's Table 1 run")
    _table("t1_large_n", t1_large_n, "a Table 1 run with more CERTIFY samples (reproduce.table1(..., n=10_000))")
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
    return grading.verdict("06.3", answer == expected, expected, why, answer)


def check_06_4(answer: bool | None, t2: Any, steps: int = 100, models: Sequence[str] | None = None) -> grading.Feedback:
    """Is the attack error below the verified error for every model of the student's Table 2 run ``t2``? The run
    must have ``steps`` attack steps and cover ``models`` (None: every committed crownibp-* checkpoint)."""
    if answer is None:
        return grading.pending("06.4", "run Table 2 at the exercise's steps for every model, then compare its two "
                                       "error columns")
    answer = grading.as_bool("answer", answer)
    if t2 is None or not hasattr(t2, "rows"):
        raise ValueError(f"t2={t2!r} must be a Table 2 run (reproduce.table2 with T2_STEPS = {steps}): run it first")
    if not t2.rows:
        raise ValueError("t2 has no rows: run Table 2 first")
    if t2.settings["config"]["steps"] != steps:
        raise ValueError(f"t2 must be run with T2_STEPS = {steps}, as the exercise asks; it has "
                         f"{t2.settings['config']['steps']} steps")
    if models is None:
        models = [m for m in checkpoints.available() if m.startswith("crownibp-")]
    missing = sorted(set(models) - {r["model"] for r in t2.rows})
    if missing:
        raise ValueError(f"t2 must cover every model the exercise asks about; missing {missing} (T2_MODELS = None)")
    expected = all(r["attack_error"] < r["verified_error"] for r in t2.rows)
    why = "; ".join(f"{r['model']}: attack {100 * r['attack_error']:.0f}% vs verified {100 * r['verified_error']:.0f}%"
                    for r in t2.rows) + f" ({t2.settings['config']['steps']} steps, {t2.settings['n_images']} images)."
    return grading.verdict("06.4", answer == expected, expected, why, answer)


def check_06_5(answer: bool | None, rho: float | None, t1: Any, channels: int = 1) -> grading.Feedback:
    """Are images with larger natural radii harder to spoof, i.e. is Spearman's rho(natural, spoofed radius) < 0
    (a misclassified image's natural radius counted as 0)?

    Graded with the student's ``rho`` (Spearman's rho over ``t1.per_image`` at ``channels``), checked against the
    same correlation here: a typed True/False without it is refused."""
    if answer is None:
        return grading.pending("06.5", "a rank correlation of natural and spoofed radii over Table 1's images (keep it "
                                       "in `rho`); answer True or False")

    answer = grading.as_bool("answer", answer)
    _table("t1", t1, "a Table 1 run (reproduce.table1)")
    rows = [r for r in t1.per_image if r["channels"] == channels]
    nat = [r["natural_radius"] if r["natural_prediction"] == r["label"] else 0.0 for r in rows]
    measured = float(spearmanr(nat, [r["spoofed_radius"] for r in rows]).statistic)
    if math.isnan(measured):
        return grading.Feedback("06.5", None, "the radii are constant: no correlation to read; run more images")
    grading.check_evidence("rho", rho, measured, "Spearman's rho",
                           f"Spearman's rho of the natural radius (0 where misclassified) and the spoofed radius over "
                           f"t1.per_image at {channels} channel(s)", tol=1e-6)
    expected = measured < 0
    sign = "negative" if expected else "not negative"
    why = (f"Spearman rho = {measured:+.2f} over {len(rows)} (image, sigma) pairs: {sign}; "
           "with this few images it is a weak signal (see exercise 1).")
    return grading.verdict("06.5", answer == expected, expected, why, answer)
