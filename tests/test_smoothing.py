"""Randomized smoothing: the certificate must hold (try to break it) and the bookkeeping must be exact."""

import csv
import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import beta, binom, norm
from torch import nn

from shadowlab import checkpoints
from shadowlab.certify.smoothing import (
    ABSTAIN,
    Certificate,
    Smooth,
    certified_accuracy,
    default_batch_size,
    lower_confidence_bound,
    seeded_generator,
    summarize,
)
from shadowlab.cli.main import main
from shadowlab.models import build

SHAPE = (3, 4, 4)  # tiny images keep the closed-form tests fast


class Halfspace(nn.Module):
    """Base classifier with a closed-form smoothed classifier: class a iff w.x > b, else class c.

    Logits of the other classes are very negative, so only classes a and c are ever predicted. Under noise
    N(0, sigma^2 I): pA = P(f(x + e) = a) = Phi(d / sigma) with d = (w.x - b) / ||w|| the signed distance to
    the hyperplane, and the smoothed classifier (the same half-space) is robust at x exactly up to radius |d|.
    """

    def __init__(self, w: torch.Tensor, b: float, num_classes: int = 2, a: int = 0, c: int = 1) -> None:
        super().__init__()
        self.register_buffer("w", w.flatten().float())
        self.b, self.num_classes, self.a, self.c = b, num_classes, a, c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.flatten(1) @ self.w - self.b
        out = torch.full((x.shape[0], self.num_classes), -1e6)
        out[:, self.a], out[:, self.c] = s, -s
        return out


def halfspace_at(distance: float, num_classes: int = 2, a: int = 0, c: int = 1, seed: int = 0):
    """(model, image) with the image at signed distance ``distance`` from the model's hyperplane."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(math.prod(SHAPE), generator=g)
    x = torch.rand(SHAPE, generator=g) * 0.5 + 0.25
    b = float(w @ x.flatten()) - distance * float(w.norm())
    return Halfspace(w, b, num_classes, a, c), x


# ---- Clopper-Pearson -------------------------------------------------------------------------------------------

def test_lower_bound_is_the_beta_quantile():
    n = 1000
    n_a = np.array([0, 1, 7, 500, 999, 1000])
    for alpha in (0.001, 0.05):
        low = lower_confidence_bound(n_a, n, alpha)
        expected = np.where(n_a == 0, 0.0, beta.ppf(alpha, np.maximum(n_a, 1), n - n_a + 1))
        np.testing.assert_allclose(low, expected, rtol=1e-10, atol=1e-12)
    assert lower_confidence_bound(0, 10, 0.01) == 0.0
    assert isinstance(lower_confidence_bound(5, 10, 0.01), float)
    # one-sided at level alpha: with all n successes the bound is alpha^(1/n)
    assert lower_confidence_bound(100, 100, 0.01) == pytest.approx(0.01 ** (1 / 100))


@pytest.mark.parametrize("p", [0.5, 0.73, 0.95, 0.999])
def test_lower_bound_exceeds_true_p_at_most_alpha_of_the_time(p):
    rng = np.random.default_rng(1234)
    draws, n, alpha = 20_000, 500, 0.05
    n_a = rng.binomial(n, p, size=draws)
    exceed = int((lower_confidence_bound(n_a, n, alpha) > p).sum())
    assert exceed <= binom.ppf(0.999, draws, alpha)
    # and the bound is not vacuous: it is close to p for n large
    assert lower_confidence_bound(round(p * 100_000), 100_000, 0.001) > p - 0.01


# ---- closed-form base classifier -------------------------------------------------------------------------------

@pytest.mark.parametrize("sigma,distance", [(0.25, 0.3), (0.5, 0.2)])
def test_certified_radius_approaches_exact_radius(sigma, distance):
    model, x = halfspace_at(distance)
    smooth = Smooth(model, 2, sigma, device="cpu")
    p_a = norm.cdf(distance / sigma)
    gaps = []
    for n in (1_000, 10_000, 100_000):
        cert = smooth.certify(x, n0=100, n=n, alpha=0.001, seed=3)[0]
        assert cert.prediction == 0
        assert cert.radius <= distance  # exact radius of the smoothed classifier (fails with prob <= alpha)
        # radius the bound gives at n_a = n pA minus 4 standard deviations: a generous floor
        worst_n_a = max(0, math.floor(n * p_a - 4 * math.sqrt(n * p_a * (1 - p_a))))
        floor = sigma * norm.ppf(max(0.5, lower_confidence_bound(worst_n_a, n, 0.001)))
        assert cert.radius >= floor
        gaps.append(distance - cert.radius)
    assert gaps[2] > 0  # n = 100,000 still leaves the confidence margin of the bound
    assert gaps[2] < gaps[0] / 3  # the margin shrinks like 1 / sqrt(n): a factor 10 from n = 1e3 to 1e5


def test_certificate_violations_match_alpha():
    """Over many seeds, radius > exact radius happens about as often as Clopper-Pearson allows, never more."""
    sigma, distance, n0, n, alpha, trials = 0.25, 0.2, 20, 300, 0.05, 1500
    model, x = halfspace_at(distance)
    smooth = Smooth(model, 2, sigma, device="cpu")
    certs = [smooth.certify(x, n0=n0, n=n, alpha=alpha, seed=s)[0] for s in range(trials)]
    wrong_class = sum(c.prediction not in (0, ABSTAIN) for c in certs)
    too_large = sum(c.prediction == 0 and c.radius > distance for c in certs)
    violations = wrong_class + too_large
    # exact probability that pA_lower > pA, from the binomial law of n_a (<= alpha by construction)
    p_a = norm.cdf(distance / sigma)
    k = np.arange(n + 1)
    p_violate = float(binom.pmf(k, n, p_a)[lower_confidence_bound(k, n, alpha) > p_a].sum())
    assert p_violate <= alpha
    assert violations <= binom.ppf(0.999, trials, alpha)
    lo, hi = binom.ppf(0.0005, trials, p_violate), binom.ppf(0.9995, trials, p_violate)
    assert lo <= too_large <= hi  # the noise really is N(0, sigma^2): the bound is as tight as it should be


def test_ten_classes_with_two_active_and_far_side():
    model, x = halfspace_at(-0.4, num_classes=10, a=3, c=7)  # on the class-7 side
    smooth = Smooth(model, 10, 0.25, device="cpu")
    cert = smooth.certify(x, n0=100, n=20_000, alpha=0.001, seed=0)[0]
    assert cert.prediction == 7
    assert 0.3 < cert.radius <= 0.4
    assert sum(cert.counts) == 20_000
    assert [i for i, v in enumerate(cert.counts) if v] in ([3, 7], [7])
    assert cert.pA_lower == pytest.approx(lower_confidence_bound(cert.counts[7], 20_000, 0.001))


# ---- PREDICT ---------------------------------------------------------------------------------------------------

def test_predict_abstains_on_coin_flip_and_answers_easy_ones():
    coin, x = halfspace_at(0.0)
    smooth = Smooth(coin, 2, 0.5, device="cpu")
    assert smooth.predict(x, n=2000, alpha=0.001, seed=0).tolist() == [ABSTAIN]
    cert = smooth.certify(x, n0=100, n=2000, alpha=0.001, seed=0)[0]
    assert cert.prediction == ABSTAIN and cert.radius == 0.0
    easy0, x0 = halfspace_at(1.0)
    easy1, x1 = halfspace_at(-1.0)
    assert Smooth(easy0, 2, 0.25, device="cpu").predict(x0, n=100, alpha=0.001).tolist() == [0]
    assert Smooth(easy1, 2, 0.25, device="cpu").predict(x1[None], n=100, alpha=0.001).tolist() == [1]


def test_predict_abstain_rate_on_coin_flip_is_about_one_minus_alpha():
    coin, x = halfspace_at(0.0)
    smooth = Smooth(coin, 2, 0.5, device="cpu")
    answers = torch.cat([smooth.predict(x, n=100, alpha=0.1, seed=s) for s in range(300)])
    # a two-sided binomial test at level alpha answers (wrongly, the classes tie) at most alpha of the time
    assert int((answers != ABSTAIN).sum()) <= binom.ppf(0.999, 300, 0.1)
    assert int((answers != ABSTAIN).sum()) >= 1


# ---- batching and seeding --------------------------------------------------------------------------------------

def test_batch_equals_one_by_one_and_seed_is_reproducible():
    model, x = halfspace_at(0.15)
    xs = torch.stack([x, x * 0.9, (x * 1.2).clamp(0, 1), 1 - x])
    smooth = Smooth(model, 2, 0.25, device="cpu")
    batch = smooth.certify(xs, n0=50, n=500, alpha=0.01, seed=5)
    single = [smooth.certify(xs[i], n0=50, n=500, alpha=0.01, seed=5)[0] for i in range(len(xs))]
    assert batch == single
    assert smooth.certify(xs, n0=50, n=500, alpha=0.01, seed=5) == batch
    other = smooth.certify(xs, n0=50, n=500, alpha=0.01, seed=6)
    assert [c.counts for c in other] != [c.counts for c in batch]


def test_certify_where_skips_only_what_cannot_matter_and_equals_certify_elsewhere():
    model, x = halfspace_at(0.05)
    xs = torch.stack([x, 1 - x, x * 0.9, (1 - x) * 0.95, x.roll(1, 1)])
    smooth = Smooth(model, 2, 0.25, device="cpu")
    full = smooth.certify(xs, n0=50, n=500, alpha=0.01, seed=3)
    guess = smooth.sample_counts(xs, 50, generator=seeded_generator(3, "certify", torch.device("cpu"))).argmax(1)
    assert 0 < int((guess == 1).sum()) < len(xs)   # the test needs images on both sides
    some = smooth.certify_where(xs, 50, 500, 0.01, lambda c_a: c_a == 1, seed=3)
    assert [c is None for c in some] == (guess != 1).tolist()
    assert [c for c in some if c is not None] == [c for c, g in zip(full, guess.tolist()) if g == 1]
    assert smooth.certify_where(xs, 50, 500, 0.01, None, seed=3) == full
    assert smooth.certify_where(xs, 50, 500, 0.01, lambda c_a: c_a < 0, seed=3) == [None] * len(xs)
    with pytest.raises(ValueError, match="needed must return one bool per image"):
        smooth.certify_where(xs, 50, 500, 0.01, lambda c_a: c_a[:2] == 1, seed=3)


def test_default_chunk_is_the_devices_and_changes_no_count():
    """CERTIFY's forward chunk defaults to the device's (256 on a CPU, where it runs fastest); on the committed
    convolutional model the counts at that chunk are those of 1000 and 100 (convolution kernels may pick other
    algorithms per batch size: the argmax must not move)."""
    assert default_batch_size(torch.device("cpu")) == 256 and default_batch_size(torch.device("cuda")) == 1000
    model, _ = checkpoints.load("smooth-sigma0.25", device="cpu")
    smooth = Smooth(model, 10, 0.25, device="cpu")
    assert smooth.batch_size == 256 and Smooth(model, 10, 0.25, device="cpu", batch_size=64).batch_size == 64
    with pytest.raises(ValueError, match="batch_size"):
        Smooth(model, 10, 0.25, device="cpu", batch_size=0)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    counts = [smooth.sample_counts(x, 1500, batch_size=bs, generator=torch.Generator().manual_seed(2))
              for bs in (None, 1000, 100)]
    assert torch.equal(counts[0], counts[1]) and torch.equal(counts[0], counts[2])


def test_counts_do_not_depend_on_batch_size():
    model, x = halfspace_at(0.1)
    xs = torch.stack([x, x * 0.8, x * 0.6])
    smooth = Smooth(model, 2, 0.3, device="cpu")
    counts = [smooth.sample_counts(xs, 203, batch_size=bs, generator=torch.Generator().manual_seed(9))
              for bs in (1, 16, 50, 203, 4096)]
    for c in counts[1:]:
        assert torch.equal(c, counts[0])
    assert counts[0].sum(1).tolist() == [203] * 3
    assert counts[0].dtype == torch.long
    # successive calls on one generator draw fresh noise (CERTIFY's n0 and n samples are independent)
    g = torch.Generator().manual_seed(9)
    assert not torch.equal(smooth.sample_counts(xs, 203, generator=g), smooth.sample_counts(xs, 203, generator=g))


def test_conv_base_model_channels_last_path():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5))
    x = torch.rand(2, 3, 8, 8)
    smooth = Smooth(model, 5, 0.1, device="cpu")
    counts = smooth.sample_counts(x, 64, batch_size=32, generator=torch.Generator().manual_seed(0))
    # the same counts computed by hand with the same noise stream
    noise = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        preds = model((x[:, None] + 0.1 * noise[None]).reshape(-1, 3, 8, 8)).argmax(1).view(2, 64)
    expected = torch.stack([torch.bincount(p, minlength=5) for p in preds])
    assert torch.equal(counts, expected)


# ---- aggregation -----------------------------------------------------------------------------------------------

def hand_records():
    return [Certificate(0, 0.6, 0.99, [99, 1]), Certificate(1, 0.3, 0.9, [1, 99]),
            Certificate(ABSTAIN, 0.0, 0.4, [50, 50]), Certificate(1, 1.2, 0.999, [0, 100]),
            Certificate(0, 0.0, 0.5, [60, 40])]


def test_certified_accuracy_on_hand_made_records():
    labels = [0, 0, 1, 1, 0]  # correct: images 0 (r 0.6), 3 (r 1.2), 4 (r 0.0)
    acc = certified_accuracy(hand_records(), labels, [0, 0.3, 0.6, 0.61, 1.2, 2.0])
    np.testing.assert_allclose(acc, [3 / 5, 2 / 5, 2 / 5, 1 / 5, 1 / 5, 0.0])
    assert certified_accuracy(hand_records(), torch.tensor(labels), np.array([0.0])).tolist() == [0.6]


def test_summarize_on_hand_made_records():
    s = summarize(hand_records(), [0, 0, 1, 1, 0])
    assert s["certified_accuracy"] == {"0": 0.6, "0.25": 0.4, "0.5": 0.4, "0.75": 0.2, "1": 0.2}
    assert s["mean_radius_correct"] == pytest.approx((0.6 + 1.2 + 0.0) / 3)
    assert s["mean_radius_zero_if_wrong"] == pytest.approx((0.6 + 1.2) / 5)
    assert s["abstain_rate"] == pytest.approx(0.2)
    assert s["accuracy"] == pytest.approx(0.6)
    assert s["n_images"] == 5
    assert summarize(hand_records(), [2] * 5)["mean_radius_correct"] is None
    assert json.loads(json.dumps(s)) == s
    assert hand_records()[0].to_dict() == {"prediction": 0, "radius": 0.6, "pA_lower": 0.99, "counts": [99, 1]}


def test_plot_certified_accuracy():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from shadowlab.certify.smoothing import certified_accuracy_curve
    from shadowlab.plots import plot_certified_accuracy

    labels = [0, 0, 1, 1, 0]
    ax = Figure().subplots()
    out = plot_certified_accuracy({"natural": certified_accuracy_curve(hand_records(), labels, 2.0),
                                   "shifted": certified_accuracy_curve(hand_records(), [1] * 5, 2.0)}, ax=ax)
    assert out is ax and len(ax.get_lines()) == 2
    line = ax.get_lines()[0]
    xs, ys = line.get_data()
    assert line.get_drawstyle() == "steps-pre"  # value ys[i] on (xs[i-1], xs[i]]
    # the drawn step curve agrees with certified_accuracy at every radius of a grid (jump points included)
    grid = np.concatenate([np.linspace(0.0, 2.0, 41), [0.3, 0.6, 1.2]])
    drawn = ys[np.searchsorted(xs, grid, side="left")]
    np.testing.assert_allclose(drawn, certified_accuracy(hand_records(), labels, grid))
    assert xs[0] == 0 and xs[-1] == 2.0
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["natural", "shifted"]
    with pytest.raises(ValueError, match="curves"):
        plot_certified_accuracy({}, ax=ax)


# ---- bad input -------------------------------------------------------------------------------------------------

def test_bad_inputs_raise_value_errors_naming_the_parameter():
    model, x = halfspace_at(0.3)
    for sigma in (0, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="sigma"):
            Smooth(model, 2, sigma)
    for k in (1, 0, 2.5):
        with pytest.raises(ValueError, match="num_classes"):
            Smooth(model, k, 0.25)
    smooth = Smooth(model, 2, 0.25, device="cpu")
    cases = [
        (dict(n0=0), "n0"), (dict(n=0), "n"), (dict(n=-5), "n"), (dict(alpha=0), "alpha"),
        (dict(alpha=1), "alpha"), (dict(alpha=1.5), "alpha"), (dict(batch_size=0), "batch_size"),
        (dict(seed=-1), "seed"),
    ]
    for kw, name in cases:
        with pytest.raises(ValueError, match=name):
            smooth.certify(x, **{"n0": 10, "n": 10, "alpha": 0.01, **kw})
    for bad in (x.flatten(), x[None, None], x + 1, x - 1, x * float("nan"), (x * 255).to(torch.uint8),
                torch.empty(0, 3, 4, 4)):
        with pytest.raises(ValueError, match="x "):
            smooth.certify(bad, n0=10, n=10, alpha=0.01)
        with pytest.raises(ValueError, match="x "):
            smooth.predict(bad, n=10, alpha=0.01)
    with pytest.raises(ValueError, match="alpha"):
        smooth.predict(x, n=10, alpha=0.0)
    with pytest.raises(ValueError, match="num"):
        smooth.sample_counts(x, 0)
    with pytest.raises(ValueError, match="num_classes"):  # the model has 2 outputs
        Smooth(model, 3, 0.25, device="cpu").certify(x, n0=10, n=10, alpha=0.01)
    with pytest.raises(ValueError, match="n_a"):
        lower_confidence_bound(11, 10, 0.01)
    with pytest.raises(ValueError, match="alpha"):
        lower_confidence_bound(5, 10, 0.0)
    with pytest.raises(ValueError, match="labels"):
        certified_accuracy(hand_records(), [0, 1], [0.0])


# ---- CLI -------------------------------------------------------------------------------------------------------

def test_cli_certify_smoothing_smoke(tmp_path, models_tmp, capsys):
    torch.manual_seed(0)
    model = build("cnn", width=2, linear_size=8)
    checkpoints.save(model, "tiny-smooth", arch="cnn", arch_kwargs={"width": 2, "linear_size": 8},
                     defense="gaussian", defense_parameter={"sigma": 0.25})
    out = tmp_path / "out"
    code = main(["certify", "smoothing", "--model", "tiny-smooth", "--n", "64", "--n0", "16", "--alpha", "0.01",
                 "--n-images", "2", "--skip", "3", "--batch-size", "32", "--source", "subset", "--device", "cpu",
                 "--out-dir", str(out)])
    assert code == 0
    with open(out / "certify.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["idx", "label", "predict", "radius", "pA_lower", "correct", "seconds"]
    assert [int(r["idx"]) for r in rows] == [0, 3]
    for r in rows:
        assert float(r["radius"]) >= 0 and 0 <= float(r["pA_lower"]) <= 1
        assert int(r["correct"]) == int(int(r["predict"]) == int(r["label"]))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sigma"] == 0.25 and summary["n"] == 64 and summary["n_images"] == 2
    assert set(summary["certified_accuracy"]) == {"0", "0.25", "0.5", "0.75", "1"}
    assert summary["seconds_per_image"] > 0
    assert "certify smoothing" in summary["command"]
    assert "cert. acc. r=0.25" in (out / "summary.md").read_text()
    assert "cert. acc." in capsys.readouterr().out
    # a missing sigma is an error naming the option
    checkpoints.save(model, "tiny-plain", arch="cnn", arch_kwargs={"width": 2, "linear_size": 8})
    assert main(["certify", "smoothing", "--model", "tiny-plain", "--n-images", "1", "--source", "subset",
                 "--out-dir", str(out)]) == 2
    assert "--sigma" in capsys.readouterr().err
    # every 20th image of the class-interleaved subset would be all airplanes: refused
    assert main(["certify", "smoothing", "--model", "tiny-smooth", "--skip", "20", "--source", "subset",
                 "--out-dir", str(out)]) == 2
    assert "--skip=20" in capsys.readouterr().err
