"""The comparison of the pruned Table 1 search with the exhaustive one (shadowlab.experiments.pruning)."""

import json

import pytest

from shadowlab.experiments import pruning
from shadowlab.experiments.settings import Table1Settings


def test_the_two_searches_differ_only_in_the_search():
    """The pruned search keeps every setting the certificate sees (CERTIFY, noise copies, step limit, modes) and
    changes only which targets it optimises and when a candidate stops."""
    p = pruning.procedures("paper")
    ex, pr = p["exhaustive"], p["pruned"]
    assert ex == Table1Settings.paper(controls=False, source="subset")
    assert ex.keep_targets is None and ex.early_stop_margin is None
    assert pr.keep_targets == 1 and pr.early_stop_margin is not None and pr.early_stop_scope == "candidate"
    cfg = pr.shadow_config(3)
    assert (cfg.keep_targets, cfg.prune_step, cfg.early_stop_margin, cfg.settle_window, cfg.settle_tol) == (
        pr.keep_targets, pr.prune_step, pr.early_stop_margin, pr.settle_window, pr.settle_tol)
    assert (cfg.steps, cfg.noise_samples, cfg.channels) == (300, 400, 3)
    search = {"keep_targets", "prune_step", "early_stop_margin", "early_stop_scope", "settle_window", "settle_tol"}
    assert {k: v for k, v in ex.to_dict().items() if k not in search} == \
        {k: v for k, v in pr.to_dict().items() if k not in search}
    assert pruning.procedures("cpu", keep_targets=2)["pruned"].keep_targets == 2
    with pytest.raises(ValueError, match="size"):
        pruning.procedures("huge")


def test_held_out_images_are_past_the_reported_ones():
    assert pruning.held_out(0, 3) == [900, 901, 902] and pruning.held_out(2, 3) == [906, 907, 908]


def test_agreement_counts_what_the_pruned_search_loses():
    row = lambda ex, pr, re_, rp: {"success_exhaustive": ex, "success_pruned": pr, "radius_exhaustive": re_,
                                   "radius_pruned": rp}
    a = pruning.agreement([row(True, True, 0.5, 0.4), row(True, False, 0.6, 0.0), row(False, True, 0.0, 0.3),
                           row(False, False, 0.0, 0.0), row(True, True, 0.3, 0.2)])
    assert (a["pairs"], a["agree"], a["lost"], a["gained"]) == (5, 3, 1, 1)
    assert a["mean_radius_exhaustive"] == pytest.approx(0.4) and a["radius_ratio"] == pytest.approx(0.75)
    assert pruning.agreement([])["radius_ratio"] is None


@pytest.mark.slow
def test_quick_comparison_runs_resumes_and_summarises(tmp_path):
    """Both searches on one held-out image at the quick budget: one record each, a summary row per mode, and a
    second run resumes (computes nothing, records unchanged)."""
    pruning.run(tmp_path, [0.25], per_sigma=1, size="quick", progress=False)
    files = {name: tmp_path / f"{name}-sigma0.25.jsonl" for name in pruning.PROCEDURES}
    before = {k: f.read_text() for k, f in files.items()}
    assert all(len(t.splitlines()) == 2 for t in before.values())     # header and one record
    text = pruning.summary(tmp_path, [0.25])
    out = json.loads((tmp_path / "summary.json").read_text())
    assert len(out["rows"]) == 2 and out["agreement"]["pairs"] == 2 and "pairs: the verdicts agree on" in text
    assert {r["image"] for r in out["rows"]} == {900}
    pr = json.loads(before["pruned"].splitlines()[1])
    assert all(pr[f"ch{ch}"]["steps_run"] <= 6 for ch in (1, 3))
    pruning.run(tmp_path, [0.25], per_sigma=1, size="quick", progress=False)
    assert {k: f.read_text() for k, f in files.items()} == before
