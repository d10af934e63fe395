"""The helpers of lessons 03 and 07 (shadowlab.lab.lessons): what decides whether IBP or CROWN-IBP is tighter, the
linear classifier whose smoothed classifier is known in closed form, bounds in a chosen precision, counterexamples,
the half-space whose smoothed classifier is known exactly, the exact failure probability of CERTIFY, and the
committed shadows' metrics; the loss along the gradient and a random direction, and SmoothAdv's empirical
radius of a smoothed linear classifier.

Models are the tiny ones of conftest; the committed tables are read from data/results (a fraction of a second).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from shadowlab.certify.bounds import ibp_bounds, margin_spec
from shadowlab.certify.smoothing import ABSTAIN, Certificate, Smooth, lower_confidence_bound
from shadowlab.lab.lessons import (
    BRACKETS,
    bound_tightness,
    bounds_by_precision,
    box_counterexamples,
    certify_failure_probability,
    committed_shadows,
    counterexamples,
    empirical_radius,
    exact_margins,
    halfspace_classifier,
    halfspace_truth,
    ibp_lower_in,
    image_metrics,
    in_precision,
    lcb_exceeds_probability,
    linear_classifier,
    linear_smoothing,
    loss_along_directions,
    outside_box,
    precision_rows,
    repeated_certify,
    robust_brackets,
    round_weights,
    rounded_box,
    rounding_sources,
    thumbnails,
    tiny_mlp,
    vote_changes,
    wrong_certificates,
)
from tests.conftest import predicted, random_images, tiny_crown_cnn


def test_bounds_in_precision_follow_the_dtype_and_leave_the_model_alone():
    model = tiny_crown_cnn(0)
    x = random_images(6, seed=2)
    y = predicted(model, x)
    C = margin_spec(y, 10)
    before = [p.detach().clone() for p in model.parameters()]
    lb64 = ibp_lower_in(model, x, 2 / 255, C, "float64")
    lb32 = ibp_lower_in(model, x, 2 / 255, C, "float32")
    lb16 = ibp_lower_in(model, x, 2 / 255, C, "bfloat16")
    assert lb64.dtype == lb32.dtype == lb16.dtype == torch.float64 and lb64.shape == (6, 9)
    with torch.no_grad():
        assert torch.allclose(lb32, ibp_bounds(model, x, 2 / 255, C)[0].double())   # float32 is ibp_bounds itself
    assert (lb32 - lb64).abs().max() < 1e-4 < (lb16 - lb64).abs().max()             # bf16 rounds visibly
    assert all(p.dtype == torch.float32 and torch.equal(p, q) for p, q in zip(model.parameters(), before))
    with pytest.raises(ValueError, match="dtype='float8'"):
        ibp_lower_in(model, x, 2 / 255, C, "float8")


def test_precision_rows_count_against_float64():
    certified = lambda *v: torch.tensor(v)
    results = {"float64": {"lower": torch.tensor([[0.1, 0.2], [-0.1, 0.3], [0.5, 0.5]], dtype=torch.float64),
                           "certified": certified(True, False, True)},
               "bfloat16": {"lower": torch.tensor([[0.2, 0.2], [0.1, 0.4], [-0.5, 0.5]], dtype=torch.float64),
                            "certified": certified(True, True, False)}}
    (row,) = precision_rows(results)
    assert row == {"dtype": "bfloat16", "margins": 6, "unsound": 3, "max_excess": pytest.approx(0.2),
                   "certified": 2, "gained": 1, "lost": 1}
    model, x = tiny_crown_cnn(1), random_images(4, seed=3)
    res = bounds_by_precision(model, x, predicted(model, x), 1 / 255, dtypes=("float64", "float16"))
    assert set(res) == {"float64", "float16"} and res["float16"]["certified"].dtype == torch.bool
    with pytest.raises(ValueError, match="must hold 'float64'"):
        bounds_by_precision(model, x, predicted(model, x), 1 / 255, dtypes=("bfloat16",))


def test_round_weights_is_a_float64_copy_of_the_rounded_network():
    model = tiny_crown_cnn(2)
    rounded = round_weights(model, "bfloat16")
    for p, q in zip(model.parameters(), rounded.parameters()):
        assert q.dtype == torch.float64 and torch.equal(q, p.to(torch.bfloat16).double())
    assert next(model.parameters()).dtype == torch.float32
    assert next(in_precision(model, "float16").parameters()).dtype == torch.float16


def test_counterexamples_are_inside_the_ball_and_misclassified():
    model = tiny_crown_cnn(3)
    x = random_images(4, seed=4)
    y = predicted(model, x)
    eps = 32 / 255                                           # large: the search succeeds on some images
    found, x_adv = counterexamples(model, x, y, eps, steps=20, restarts=2)
    assert found.dtype == torch.bool and found.shape == (4,) and found.any()
    assert ((x_adv.double() - x.double()).abs().amax() <= eps) and (x_adv >= 0).all() and (x_adv <= 1).all()
    with torch.no_grad():
        assert (model(x_adv[found]).argmax(1) != y[found]).all()
    none, empty = counterexamples(model, x[:0], y[:0], eps)
    assert none.shape == (0,) and empty.shape == (0, 3, 32, 32)
    with pytest.raises(ValueError, match="shrink=1"):
        counterexamples(model, x, y, eps, shrink=1)


def test_vote_changes():
    a = [Certificate(0, 0.5, 0.9, [90, 10]), Certificate(1, 0.2, 0.7, [40, 60])]
    b = [Certificate(0, 0.6, 0.92, [92, 8]), Certificate(ABSTAIN, 0.0, 0.4, [40, 60])]
    assert vote_changes(a, b) == {"images": 2, "counts_differ": 1, "votes_moved": 2, "predictions_differ": 1,
                                  "radius_larger": 1, "max_radius_change": pytest.approx(0.2)}
    with pytest.raises(ValueError, match="the same images"):
        vote_changes(a, b[:1])


def test_the_half_space_is_known_exactly():
    model = halfspace_classifier(0.5)
    z = torch.tensor([0.1, 0.49, 0.51, 0.9]).view(-1, 1, 1, 1)
    with torch.no_grad():
        assert model(z).argmax(1).tolist() == [0, 0, 1, 1]
    truth = halfspace_truth(z, 0.5, 0.25)
    assert truth["label"].tolist() == [0, 0, 1, 1]
    assert truth["radius"] == pytest.approx([0.4, 0.01, 0.01, 0.4])
    assert truth["p"] == pytest.approx(norm.cdf(np.array([0.4, 0.01, 0.01, 0.4]) / 0.25))
    with pytest.raises(ValueError, match="threshold=1.5"):
        halfspace_classifier(1.5)
    # Cohen et al.'s radius is tight here: at large n the certified radius approaches |t - x| from below
    smooth = Smooth(model, 2, 0.25, device="cpu")
    cert = smooth.certify(torch.full((1, 1, 1, 1), 0.25), 32, 100_000, 0.001, batch_size=100_000, seed=0)[0]
    assert cert.prediction == 0 and 0.24 < cert.radius <= 0.25


def test_the_box_a_low_precision_bounds_is_centred_on_the_rounded_image():
    x = random_images(3, seed=5)
    lo, hi = rounded_box(x, 2 / 255, "bfloat16")
    centre = x.to(torch.bfloat16).double()
    assert lo.dtype == hi.dtype == torch.float64 and (lo <= hi).all() and (lo >= 0).all() and (hi <= 1).all()
    assert torch.equal(rounded_box(x, 0.0, "bfloat16")[0], centre)           # eps 0: the rounded image itself
    shift = (centre - x.double()).abs().max()
    assert 0 < shift <= 2 ** -9                                               # bf16 moves a pixel in [0, 1]
    assert torch.equal(rounded_box(x, 0.1, "float64")[0], (x.double() - 0.1).clamp(0, 1))
    assert outside_box(centre.float(), lo, hi).tolist() == [0, 0, 0]
    assert outside_box(torch.zeros_like(x) - 1, lo, hi).tolist() == [x[0].numel()] * 3


def test_box_counterexamples_stay_in_the_box_and_are_misclassified():
    model = tiny_crown_cnn(3)
    x = random_images(4, seed=4)
    y = predicted(model, x)
    lo, hi = rounded_box(x, 0.3, "bfloat16")
    found, x_adv = box_counterexamples(model, x, y, lo, hi, steps=10, restarts=2, seed=0)
    assert found.shape == (4,) and found.any()                   # a wide box: some image is flipped
    assert (outside_box(x_adv, lo, hi) == 0).all()
    with torch.no_grad():
        assert (model(x_adv).argmax(1).cpu()[found] != y[found]).all()
    again, _ = box_counterexamples(model, x, y, lo, hi, steps=10, restarts=2, seed=0)
    assert torch.equal(found, again)
    empty, _ = box_counterexamples(model, x[:0], y[:0], lo[:0], hi[:0])
    assert empty.numel() == 0
    with pytest.raises(ValueError, match="lo <= hi"):
        box_counterexamples(model, x, y, hi, lo)


def test_rounding_sources_separate_inputs_weights_and_arithmetic():
    model, x = tiny_crown_cnn(1), random_images(6, seed=3)
    y = predicted(model, x)
    rows = rounding_sources(model, x, y, 1 / 255, "bfloat16")
    assert [r["source"] for r in rows] == ["inputs rounded, float64 arithmetic", "weights rounded, float64 arithmetic",
                                           "inputs and weights rounded, float64 arithmetic", "everything in bfloat16"]
    full = bounds_by_precision(model, x, y, 1 / 255, dtypes=("float64", "bfloat16"))
    assert rows[-1]["certified"] == int(full["bfloat16"]["certified"].sum())
    assert rows[-1]["gained"] == rows[-1]["gained_in_dtype"]
    for r in rows:
        assert 0 <= r["gained_in_dtype"] <= r["gained"] <= r["certified"] <= len(x)


def test_exact_failure_probabilities_stay_below_alpha():
    n, alpha = 50, 0.05
    for p in (0.5, 0.6, 0.77, 0.9, 0.99):
        brute = sum(float(math.comb(n, k) * p ** k * (1 - p) ** (n - k)) for k in range(n + 1)
                    if lower_confidence_bound(k, n, alpha) > p)
        assert lcb_exceeds_probability(p, n, alpha) == pytest.approx(brute, abs=1e-12)
        assert lcb_exceeds_probability(p, n, alpha) <= alpha
    assert lcb_exceeds_probability(1.0, n, alpha) == 0.0
    with pytest.raises(ValueError, match="p=1.5"):
        lcb_exceeds_probability(1.5, n, alpha)
    for x in (0.05, 0.3, 0.45, 0.5, 0.55, 0.8):
        assert 0.0 <= certify_failure_probability(x, 0.5, 0.25, 32, 100, 0.01) <= 0.01
    # far from the boundary the selection almost never errs: the bound's overshoot is nearly all of it
    p = float(norm.cdf(0.25 / 0.25))
    assert certify_failure_probability(0.25, 0.5, 0.25, 32, 100, 0.01) == pytest.approx(
        lcb_exceeds_probability(p, 100, 0.01), rel=1e-5)


def test_repeated_certificates_are_independent_and_judged_against_the_truth():
    smooth = Smooth(halfspace_classifier(0.5), 2, 0.25, device="cpu")
    x = torch.tensor([0.2, 0.7]).view(-1, 1, 1, 1)
    pred, radius = repeated_certify(smooth, x, 16, 64, 0.01, runs=5, seed=0)
    assert pred.shape == radius.shape == (5, 2)
    assert len({tuple(r) for r in radius.round(6).tolist()}) > 1           # each run draws its own noise
    again = repeated_certify(smooth, x, 16, 64, 0.01, runs=5, seed=0)
    assert np.array_equal(again[0], pred) and np.array_equal(again[1], radius)
    truth = halfspace_truth(x, 0.5, 0.25)
    wrong = wrong_certificates(pred, radius, truth["label"], truth["radius"])
    assert wrong.shape == (5, 2)
    assert wrong_certificates(np.array([0, 1, ABSTAIN, 0]), np.array([0.2, 0.1, 0.0, 0.4]), np.array([0, 0, 0, 0]),
                              np.array([0.3, 0.3, 0.3, 0.3])).tolist() == [False, True, False, True]


def test_committed_shadows_and_image_metrics():
    from skimage.metrics import peak_signal_noise_ratio

    t1 = committed_shadows("table1")
    n = len(t1["rows"])
    assert t1["x"].shape == t1["x_shadow"].shape == (n, 3, 32, 32) and t1["y"].shape == (n,)
    assert [int(r["label"]) for r in t1["rows"]] == t1["y"].tolist()
    m = image_metrics(t1["x"][:20], t1["x_shadow"][:20])
    assert m["ssim"] == pytest.approx([float(r["ssim"]) for r in t1["rows"][:20]], abs=1e-6)   # as the CSV says
    assert m["l2"] == pytest.approx([float(r["l2"]) for r in t1["rows"][:20]], rel=1e-4)
    ref = [peak_signal_noise_ratio(a.numpy().astype(np.float64), b.numpy().astype(np.float64), data_range=1.0)
           for a, b in zip(t1["x"][:5], t1["x_shadow"][:5])]
    assert m["psnr"][:5] == pytest.approx(ref, rel=1e-9)
    same = image_metrics(t1["x"][:2], t1["x"][:2])
    assert np.isinf(same["psnr"]).all() and same["l2"].tolist() == [0.0, 0.0] and same["ssim"] == pytest.approx(1)
    with pytest.raises(ValueError, match="table='table3'"):
        committed_shadows("table3")


def test_bound_tightness_rows():
    model, x = tiny_crown_cnn(), random_images(6)
    y = predicted(model, x)
    rows = bound_tightness(model, x, y, [0.0, 1 / 255, 8 / 255])
    assert [r["eps"] for r in rows] == [0.0, 1 / 255, 8 / 255]
    # at eps 0 no neuron is unstable and both bounds are the margins themselves
    margins = (margin_spec(y, 10) @ model(x).detach().unsqueeze(2)).squeeze(2)
    assert rows[0]["unstable"] == 0
    assert rows[0]["ibp"] == pytest.approx(float(margins.mean()), abs=1e-4)
    assert rows[0]["crown_ibp"] == pytest.approx(float(margins.mean()), abs=1e-4)
    assert rows[0]["unstable"] <= rows[1]["unstable"] <= rows[2]["unstable"] and rows[2]["unstable"] > 0
    assert rows[2]["ibp"] < rows[1]["ibp"] < rows[0]["ibp"]            # bounds loosen as the ball grows
    assert all(0 <= r["crown_ibp_tighter"] <= 1 for r in rows)
    with pytest.raises(ValueError, match="nn.Sequential"):
        bound_tightness(torch.nn.ModuleList(list(model)), x, y, [0.0])


def test_linear_smoothing_is_exact_and_certify_stays_below_it():
    w = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(0))
    x = random_images(6, seed=1)[:, :, :4, :4].contiguous()
    b = -float((x.flatten(1) @ w.flatten()).median()) + 0.05
    truth = linear_smoothing(w, b, x, 0.5)
    f = linear_classifier(w, b)
    assert np.array_equal(truth["label"], predicted(f, x).numpy())
    # Cohen et al.'s radius at the exact pA is the distance to the hyperplane (the half-space is the worst case)
    np.testing.assert_allclose(0.5 * norm.ppf(truth["pA"]), truth["distance"], rtol=1e-9, atol=1e-12)
    certs = Smooth(f, 2, 0.5, device="cpu").certify(x, 100, 20_000, 0.001, seed=0)
    counts = np.array([c.counts for c in certs])
    observed = counts[np.arange(len(x)), truth["label"]] / 20_000
    np.testing.assert_allclose(observed, truth["pA"], atol=0.015)     # the votes estimate the closed form
    for cert, label, dist in zip(certs, truth["label"], truth["distance"]):
        assert cert.prediction in (label, ABSTAIN) and cert.radius <= dist
        if cert.prediction != ABSTAIN:
            assert cert.radius > dist - 0.1      # and n = 20,000 brings it close
    with pytest.raises(ValueError, match="w must be a tensor"):
        linear_classifier(torch.zeros(3), 0.0)
    with pytest.raises(ValueError, match="b="):
        linear_classifier(w, float("nan"))
    with pytest.raises(ValueError, match="sigma"):
        linear_smoothing(w, b, x, 0.0)


def test_exact_margins_lie_between_the_sound_bounds_and_a_real_input():
    from shadowlab.certify.bounds import lower_bounds

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 6),
                              torch.nn.ReLU(), torch.nn.Linear(6, 3)).double().eval()
    x = torch.rand(3, 3, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = predicted(net, x)
    eps = 0.1
    res = exact_margins(net, x, y, eps, num_classes=3)
    assert res["margin"].shape == (3, 2) and res["unstable"].sum() > 0       # some ReLU needs its binary
    C = margin_spec(y, 3).double()
    for method in ("ibp", "crown"):                                           # sound bounds never exceed the truth
        assert (lower_bounds(net, x, eps, C, method).detach().numpy() <= res["margin"] + 1e-7).all()
    with torch.no_grad():                                                     # the minimiser is a real input
        z = net(torch.from_numpy(res["argmin"]).view_as(x))
        reached = (z.gather(1, y[:, None]) - z).numpy()
    for i in range(3):
        assert res["margin"][i].min() == pytest.approx(np.delete(reached[i], int(y[i])).min(), abs=1e-6)
        assert (np.abs(res["argmin"][i] - x[i].flatten().numpy()) <= eps + 1e-9).all()
    assert (res["robust"] == (res["margin"].min(1) > 0)).all()
    samples = (x[None] + eps * (2 * torch.rand(500, *x.shape, dtype=torch.float64) - 1)).clamp(0, 1)
    with torch.no_grad():                                                     # no sample does better than the optimum
        zs = net(samples.flatten(0, 1)).view(500, 3, 3)
    sampled = (zs.gather(2, y.view(1, 3, 1).expand(500, 3, 1)) - zs).numpy()
    for i in range(3):
        assert np.delete(sampled[:, i], int(y[i]), axis=1).min() >= res["margin"][i].min() - 1e-7
    with pytest.raises(ValueError, match="Flatten, Linear and ReLU"):
        exact_margins(tiny_crown_cnn(0), random_images(1), torch.tensor([0]), eps)


def test_thumbnails_average_blocks_and_tiny_mlp_is_seeded():
    x = random_images(5, seed=6)
    t = thumbnails(x)
    assert t.shape == (5, 3, 8, 8) and 0 <= t.min() and t.max() <= 1
    assert t[0, 1, 2, 3] == pytest.approx(float(x[0, 1, 8:12, 12:16].mean()), abs=1e-6)
    assert thumbnails(x, 32).equal(x)
    with pytest.raises(ValueError, match="size=5"):
        thumbnails(x, 5)
    y = torch.arange(5) % 3
    a, b = tiny_mlp(t, y, hidden=4, epochs=2, seed=1), tiny_mlp(t, y, hidden=4, epochs=2, seed=1)
    assert not a.training and [m.__class__.__name__ for m in a] == ["Flatten", "Linear", "ReLU", "Linear"]
    assert a[1].weight.shape == (4, 192) and all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a[1].weight, tiny_mlp(t, y, hidden=4, epochs=2, seed=2)[1].weight)
    with pytest.raises(ValueError, match="hidden=0"):
        tiny_mlp(t, y, hidden=0)


def test_robust_brackets_are_ordered_image_by_image():
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 8), torch.nn.ReLU(),
                              torch.nn.Linear(8, 10)).eval()
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    y = predicted(net, x)
    y[0] = (y[0] + 1) % 10                                      # one misclassified image: an error for every verdict
    seen = []
    for eps in (1 / 255, 12 / 255):
        r = robust_brackets(net, x, y, eps, steps=10, restarts=1)
        assert set(BRACKETS) <= set(r) and set(r["seconds"]) == set(BRACKETS)
        assert all(r[k].shape == (6,) and r[k].dtype == bool and r[k][0] for k in BRACKETS)
        assert (r["pgd"] <= r["exact"]).all() and (r["exact"] <= r["crown"]).all() and (r["exact"] <= r["ibp"]).all()
        exact = exact_margins(net, x, y, eps)
        assert (r["exact"] == ~exact["robust"]).all() and (r["unstable"] == exact["unstable"]).all()
        seen.append(r)
    assert not seen[0]["exact"][1:].all() and seen[-1]["exact"].sum() > seen[0]["exact"].sum()   # eps matters
    assert (seen[-1]["unstable"] >= seen[0]["unstable"]).all()


# ----------------------------------------------------------------------------------------------- attack hygiene
def test_loss_along_directions_starts_at_x_and_rises_along_the_gradient_of_a_linear_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 10)).eval()
    x = torch.rand(5, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 3, 4])
    eps = 0.05
    out = loss_along_directions(model, x, y, eps, points=11, span=2.0, seed=0)
    assert np.allclose(out["t"], np.linspace(0, 2, 11))
    assert out["gradient"].shape == out["random"].shape == (5, 11)
    ce = torch.nn.functional.cross_entropy(model(x), y, reduction="none").detach().numpy()
    assert np.allclose(out["gradient"][:, 0], ce, atol=1e-6) and np.allclose(out["random"][:, 0], ce, atol=1e-6)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(torch.nn.functional.cross_entropy(model(xg), y, reduction="sum"), xg)
    assert np.allclose(out["slope"], grad.abs().flatten(1).sum(1).numpy(), rtol=1e-5)
    # cross-entropy of linear logits is convex along a line, and rises at t = 0 along the gradient: it never falls
    assert (np.diff(out["gradient"], axis=1) >= -1e-6).all()
    fd = (out["gradient"][:, 1] - out["gradient"][:, 0]) / (out["t"][1] * eps)
    assert np.allclose(fd, out["slope"], rtol=0.2), (fd, out["slope"])
    again = loss_along_directions(model, x, y, eps, points=11, span=2.0, seed=0)
    assert np.array_equal(again["random"], out["random"])
    with pytest.raises(ValueError, match="eps"):
        loss_along_directions(model, x, y, 0.0)


def test_empirical_radius_of_a_linear_classifier_brackets_its_exact_radius():
    """Smoothing a linear classifier leaves it unchanged (g = f), so g's radius is the distance to the hyperplane
    (0.25 here, one sigma): no size below it can change g, and SmoothAdv, whose gradient points along -w, changes it
    at the first size of the grid well past it."""
    w = torch.ones(3, 4, 4) / math.sqrt(48)
    x = torch.full((2, 3, 4, 4), 0.5)
    b = -float((w * x[0]).sum()) + 0.25                     # w . x + b = 0.25: class 1 at distance 0.25
    f = linear_classifier(w, b)
    assert np.allclose(linear_smoothing(w, b, x, 0.25)["distance"], 0.25)
    labels = torch.tensor([1, ABSTAIN])
    out = empirical_radius(f, 0.25, x, labels, [1.0, 0.125, 0.5], noise_samples=8, steps=10, n_predict=256,
                           alpha=0.001, seed=0)
    assert out["radius"][0] == 0.5 and np.isnan(out["radius"][1]), out["radius"]
    assert out["prediction"].tolist() == [0, ABSTAIN]
    assert int(f(out["x_adv"][:1]).argmax(1)) == 0 and torch.equal(out["x_adv"][1], x[1])
    assert float((out["x_adv"][0] - x[0]).norm()) <= 0.5 + 1e-5
    small = empirical_radius(f, 0.25, x[:1], labels[:1], [0.125, 0.2], seed=0)
    assert np.isinf(small["radius"][0]) and small["prediction"][0] == ABSTAIN
    with pytest.raises(ValueError, match="labels"):
        empirical_radius(f, 0.25, x, torch.tensor([1, 2]), [0.5])
    with pytest.raises(ValueError, match="eps_grid"):
        empirical_radius(f, 0.25, x, labels, [])
