"""The Shadow Attack (paper eq. 2): regularisers, configuration, and both attacks on tiny models built here."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from torch import nn

from shadowlab.perception import quantize, ssim
from shadowlab.regularisers import color_penalty, dissimilarity, total_variation
from shadowlab.shadow.attack import attack_crown_ibp, attack_smoothing
from shadowlab.shadow.config import ShadowConfig, ShadowResult
from shadowlab.shadow.inputs import resolve_targets
from shadowlab.shadow.judge import prefer

SIGMA = 0.25


# ----------------------------------------------------------------------------------------------- regularisers
def hand_delta() -> torch.Tensor:
    """R = [[1, 2], [3, 4]], G = 0, B = [[-1, 0], [0, 1]]; a second, all-zero perturbation in the batch."""
    d = torch.zeros(2, 3, 2, 2)
    d[0, 0] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    d[0, 2] = torch.tensor([[-1.0, 0.0], [0.0, 1.0]])
    return d


def test_total_variation_by_hand():
    # R: horizontal (2-1)^2 + (4-3)^2 = 2, vertical (3-1)^2 + (4-2)^2 = 8; G: 0;
    # B: horizontal (0+1)^2 + (1-0)^2 = 2, vertical (0+1)^2 + (1-0)^2 = 2  ->  14
    assert torch.equal(total_variation(hand_delta()), torch.tensor([14.0, 0.0]))


def test_color_penalty_by_hand():
    # mean |delta_c| = (10/4, 0, 2/4) -> 2.5^2 + 0 + 0.5^2 = 6.5
    assert torch.allclose(color_penalty(hand_delta()), torch.tensor([6.5, 0.0]))


def test_dissimilarity_by_hand():
    # per pixel (R-G)^2 + (G-B)^2 + (R-B)^2: (1,0,-1) -> 6, (2,0,0) -> 8, (3,0,0) -> 18, (4,0,1) -> 26
    expected = math.sqrt(6 ** 2 + 8 ** 2 + 18 ** 2 + 26 ** 2)
    assert torch.allclose(dissimilarity(hand_delta()), torch.tensor([expected, 0.0]))


def test_one_channel_perturbation_has_zero_dissimilarity():
    g = torch.Generator().manual_seed(0)
    grey = torch.randn(4, 1, 8, 8, generator=g)
    rgb = grey.expand(-1, 3, -1, -1)
    assert torch.equal(dissimilarity(rgb), torch.zeros(4))
    assert torch.allclose(color_penalty(rgb), 3 * grey.abs().mean((1, 2, 3)) ** 2)
    assert torch.allclose(total_variation(rgb), 3 * total_variation(grey))


def test_regularisers_reject_bad_shapes():
    with pytest.raises(ValueError, match="delta must have shape"):
        total_variation(torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match="delta must have 3 channels"):
        dissimilarity(torch.zeros(2, 1, 4, 4))


# ----------------------------------------------------------------------------------------------- config
def test_paper_configs():
    s = ShadowConfig.paper_smoothing()
    assert (s.lambda_c, s.lambda_tv, s.lambda_s, s.steps, s.lr, s.channels, s.noise_samples) == \
        (1.0, 0.3, 0.5, 300, 0.1, 1, 400)
    assert (s.init, s.init_scale, s.l2_penalty) == ("uniform", 0.5, 0.0)
    assert ShadowConfig() == s
    assert ShadowConfig.paper_smoothing(channels=3).channels == 3
    raw = ShadowConfig.paper_crown_ibp(rescale=False)
    assert (raw.lr, raw.lambda_tv, raw.l2_penalty, raw.lambda_c, raw.channels) == (200.5, 9e-6, 0.02, 0.0, 1)
    # the schedule: lr for the first half, lr / 3 until 5/6 of the steps, then lr / 9
    assert [raw.lr_at(i) for i in (0, 149, 150, 249, 250, 299)] == \
        pytest.approx([200.5, 200.5, 200.5 / 3, 200.5 / 3, 200.5 / 9, 200.5 / 9])
    scaled = ShadowConfig.paper_crown_ibp(input_std=0.2, batch=600)
    assert scaled.lr == pytest.approx(200.5 * 0.04 / 600)
    assert scaled.lambda_tv == pytest.approx(9e-6 * 600 / 0.04)
    assert scaled.l2_penalty == pytest.approx(0.02 * math.sqrt(600) / 0.2)
    assert json.loads(json.dumps(scaled.to_dict()))["step_schedule"][1] == [5 / 6, 1 / 9]


@pytest.mark.parametrize("kwargs, name", [
    (dict(lambda_c=-1.0), "lambda_c"),
    (dict(lambda_tv=-0.1), "lambda_tv"),
    (dict(lambda_s=float("nan")), "lambda_s"),
    (dict(l2_penalty=-1.0), "l2_penalty"),
    (dict(channels=2), "channels"),
    (dict(steps=0), "steps"),
    (dict(lr=0.0), "lr"),
    (dict(lr=-0.1), "lr"),
    (dict(noise_samples=0), "noise_samples"),
    (dict(init="gaussian"), "init"),
    (dict(init_scale=-0.5), "init_scale"),
    (dict(step_schedule=[(0.5, -1.0)]), "step_schedule"),
    (dict(step_schedule=[(0.8, 0.5), (0.5, 0.1)]), "step_schedule"),
    (dict(step_schedule=[0.5]), "step_schedule"),
    (dict(early_stop_margin=float("inf")), "early_stop_margin"),
    (dict(resample_noise="yes"), "resample_noise"),
])
def test_config_rejects_invalid_values(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ShadowConfig(**kwargs)


def test_config_warns_when_the_tv_step_would_diverge():
    with pytest.warns(RuntimeWarning, match="lambda_tv"):
        ShadowConfig(lambda_tv=1.0, lr=0.1, channels=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ShadowConfig(lambda_tv=1.0, lr=0.1, channels=3)      # 0.1 * 1.0 * 16 < 2
        ShadowConfig.paper_smoothing()


def test_resolve_targets():
    y = torch.tensor([0, 3, 9])
    t = resolve_targets("all", y, 10)
    assert t.shape == (3, 9)
    for row, label in zip(t, y):
        assert sorted(row.tolist()) == [c for c in range(10) if c != label]
    assert resolve_targets(torch.tensor([1, 2, 3]), y, 10).shape == (3, 1)
    with pytest.raises(ValueError, match="targets must differ from the true labels"):
        resolve_targets(torch.tensor([1, 3, 0]), y, 10)
    with pytest.raises(ValueError, match="targets entries must lie in"):
        resolve_targets(torch.tensor([1, 2, 10]), y, 10)
    with pytest.raises(ValueError, match="targets must have shape"):
        resolve_targets(torch.tensor([1, 2]), y, 10)
    with pytest.raises(ValueError, match="targets"):
        resolve_targets("some", y, 10)


# ----------------------------------------------------------------------------------------------- tiny models
def template_weights(scale: float, seed: int = 0) -> torch.Tensor:
    """Random class templates on a 4 x 4 grid of 8 x 8 blocks per channel, as a 10 x 3072 weight matrix."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(10, 3, 4, 4, generator=g) * scale / 64
    return w.repeat_interleave(8, 2).repeat_interleave(8, 3).reshape(10, -1)


def block_model(scale: float = 10.0) -> nn.Module:
    """Linear classifier of 8 x 8 block means: its smoothed version is steady (noise averages out) and every
    class is reachable by a smooth grey perturbation, so the attack must succeed on it in a few steps."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(3072, 10))
    with torch.no_grad():
        model[1].weight.copy_(template_weights(scale))
        model[1].bias.zero_()
    return model.eval()


def images(n: int = 3, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g) * 0.5 + 0.25


def labels(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1)


FAST = dict(n0=32, n_select=64, n=256, progress=False, device="cpu")


def small_cfg(**kw) -> ShadowConfig:
    base = dict(steps=30, noise_samples=16)
    base.update(kw)
    return ShadowConfig(**base)


# ----------------------------------------------------------------------------------------------- smoothing
def test_smoothing_attack_reaches_target_and_smoothed_prediction_follows():
    from shadowlab.certify.smoothing import Smooth

    model, x = block_model(), images()
    y = labels(model, x)
    target = (y + 3) % 10
    calls = []
    res = attack_smoothing(model, SIGMA, x, y, small_cfg(steps=40), targets=target, certify_natural=True,
                           callback=lambda step, rec: calls.append((step, rec)), **FAST)
    assert isinstance(res, ShadowResult)
    assert torch.equal(res.target, target)
    assert res.spoofed.all() and (res.radius > 0).all()
    # success is the one definition: certified wrong label AND imperceptible
    assert torch.equal(res.success, res.spoofed & (res.ssim >= res.config.min_ssim))
    assert torch.allclose(res.ssim, ssim(x, res.x_shadow))
    assert torch.equal(res.x_shadow, quantize(res.x_shadow))                  # 8-bit images
    smooth = Smooth(model, 10, SIGMA, device="cpu")
    assert torch.equal(smooth.predict(res.x_shadow, 200, 0.001, seed=11), target)
    assert torch.equal(smooth.predict(x, 200, 0.001, seed=11), y)
    # the optimisation did what it says: target fraction up, classification loss down
    assert res.history["target_fraction"][-1] > 0.9 > res.history["target_fraction"][0]
    assert res.history["classification"][-1] < 0.5 * res.history["classification"][0]
    # shadow images lie in [0, 1] and outside the natural certified ball (else the certificate of x is violated)
    assert res.x_shadow.min() >= 0 and res.x_shadow.max() <= 1
    assert torch.equal(res.natural_prediction, y)
    assert (res.l2 >= res.natural_radius).all()
    assert torch.allclose(res.l2, (res.x_shadow - x).flatten(1).norm(dim=1))
    # one history entry and one callback per step
    for key in ("classification", "color", "tv", "dissim", "l2", "total", "target_fraction"):
        assert res.history[key].shape == (40,)
        assert res.history["per_candidate"][key].shape == (40, 3, 1)
    assert [s for s, _ in calls] == list(range(40))
    assert isinstance(calls[0][1]["total"], float) and "delta" in calls[0][1] and "delta" not in calls[1][1]
    assert calls[10][1]["delta"].shape == (3, 1, 3, 32, 32)
    assert torch.equal(res.history["dissim"], torch.zeros(40))          # 1-channel attack
    expected_total = (res.history["per_candidate"]["classification"] + 0.3 * res.history["per_candidate"]["tv"]
                      + 1.0 * res.history["per_candidate"]["color"])
    assert torch.allclose(res.history["per_candidate"]["total"], expected_total)


def test_smoothing_all_targets_and_selection_rule():
    model, x = block_model(), images(2)
    y = labels(model, x)
    res = attack_smoothing(model, SIGMA, x, y, small_cfg(steps=20), targets="all", **FAST)
    assert res.candidate_targets.shape == (2, 9)
    assert not (res.candidate_targets == y[:, None]).any()
    assert res.history["per_candidate"]["total"].shape == (20, 2, 9)
    assert res.candidate_success.any(1).all()
    for i in range(2):
        ok = res.candidate_success[i]
        good = ok & (res.candidate_ssim[i] >= res.config.min_ssim)   # imperceptible successes come first
        pool = good if good.any() else ok
        best = res.candidate_targets[i][pool][res.candidate_score[i][pool].argmax()]
        assert res.target[i] == best                              # largest selection radius among them
    assert (res.candidate_score[~res.candidate_success] == 0).all()
    d = res.to_dict()
    text = json.dumps(d)
    assert "x_shadow" not in d and "per_candidate" not in d["history"]
    assert len(json.loads(text)["history"]["total"]) == 20
    assert len(json.dumps(res.to_dict(include_images=True, include_per_candidate=True))) > len(text)


def test_smoothing_chunked_forward_matches_one_batch():
    model, x = block_model(), images(2)
    y = labels(model, x)
    t = torch.stack([(y + 1) % 10, (y + 2) % 10], 1)
    a = attack_smoothing(model, SIGMA, x, y, small_cfg(steps=8), targets=t, batch_size=7, n=None, **{
        k: v for k, v in FAST.items() if k != "n"})
    b = attack_smoothing(model, SIGMA, x, y, small_cfg(steps=8), targets=t, batch_size=10_000, n=None, **{
        k: v for k, v in FAST.items() if k != "n"})
    # 8-bit shadows: a float difference of the chunked sums may flip one rounding, never more than one level
    diff = (a.x_shadow - b.x_shadow).abs()
    assert diff.max() <= 1 / 255 + 1e-6 and (diff > 1e-6).float().mean() < 1e-3
    assert torch.allclose(a.history["per_candidate"]["total"], b.history["per_candidate"]["total"], rtol=1e-4)


def test_smoothing_same_seed_same_result():
    model, x = block_model(), images(2)
    y = labels(model, x)
    runs = [attack_smoothing(model, SIGMA, x, y, small_cfg(steps=10, seed=s), targets=(y + 1) % 10, **FAST)
            for s in (0, 0, 1)]
    assert torch.equal(runs[0].x_shadow, runs[1].x_shadow)
    assert torch.equal(runs[0].history["total"], runs[1].history["total"])
    assert torch.equal(runs[0].radius, runs[1].radius)
    assert not torch.equal(runs[0].x_shadow, runs[2].x_shadow)


def test_smoothing_early_stop_freezes_candidates():
    model, x = block_model(), images(2)
    y = labels(model, x)
    calls = []
    cfg = small_cfg(steps=200, early_stop_margin=0.75, min_ssim=0.01, settle_window=1000)   # votes decide
    res = attack_smoothing(model, SIGMA, x, y, cfg, targets=torch.stack([(y + 1) % 10, (y + 4) % 10], 1),
                           callback=lambda s, r: calls.append(r["active"]), **FAST)
    assert res.steps_run < 200
    assert res.history["total"].shape == (res.steps_run,)
    assert len(calls) == res.steps_run and calls[-1] == 0
    frac = res.history["per_candidate"]["target_fraction"].reshape(res.steps_run, -1)
    tv = res.history["per_candidate"]["tv"].reshape(res.steps_run, -1)
    for c in range(frac.shape[1]):
        first = int((frac[:, c] >= 0.75).nonzero()[0])
        assert torch.equal(tv[first:, c], tv[first, c].expand(res.steps_run - first))   # delta frozen


def test_smoothing_early_stop_per_image_stops_every_target_of_the_image():
    model, x = block_model(), images(2)
    y = labels(model, x)
    targets = torch.stack([(y + 1) % 10, (y + 4) % 10], 1)
    cfg = small_cfg(steps=200, early_stop_margin=0.75, early_stop_scope="image", min_ssim=0.01, settle_window=1000)
    res = attack_smoothing(model, SIGMA, x, y, cfg, targets=targets, **FAST)
    frac = res.history["per_candidate"]["target_fraction"]          # steps x images x targets
    tv = res.history["per_candidate"]["tv"]
    for i in range(2):
        first = int((frac[:, i] >= 0.75).any(1).nonzero()[0])        # first step any target of image i got there
        for j in range(2):                                           # from then on every target of i is frozen
            assert torch.equal(tv[first:, i, j], tv[first, i, j].expand(res.steps_run - first))
    per_candidate = attack_smoothing(model, SIGMA, x, y, small_cfg(steps=200, early_stop_margin=0.75, min_ssim=0.01,
                                                                   settle_window=1000),
                                     targets=targets, **FAST)
    assert res.steps_run <= per_candidate.steps_run
    with pytest.raises(ValueError, match="early_stop_scope"):
        small_cfg(early_stop_scope="batch")


def test_smoothing_resample_noise_draws_new_copies_every_step_and_still_succeeds():
    model, x = block_model(), images(2)
    y = labels(model, x)
    still = dict(steps=4, lr=1e-12, lambda_c=0.0, lambda_tv=0.0, lambda_s=0.0)   # delta does not move
    fixed = attack_smoothing(model, SIGMA, x, y, small_cfg(**still), targets=(y + 1) % 10, **FAST)
    fresh = [attack_smoothing(model, SIGMA, x, y, small_cfg(resample_noise=True, **still), targets=(y + 1) % 10,
                              **FAST) for _ in range(2)]
    cls_fixed = fixed.history["per_candidate"]["classification"]    # steps x images x targets
    cls_fresh = fresh[0].history["per_candidate"]["classification"]
    assert torch.allclose(cls_fixed, cls_fixed[:1].expand_as(cls_fixed))   # the same noise every step
    assert (cls_fresh[1:] - cls_fresh[:1]).abs().amax() > 1e-4             # new noise every step
    assert torch.equal(cls_fresh, fresh[1].history["per_candidate"]["classification"])   # seeded
    res = attack_smoothing(model, SIGMA, x, y, small_cfg(resample_noise=True), targets=(y + 1) % 10, **FAST)
    assert bool(res.spoofed.all())


def test_smoothing_keeps_the_lowest_loss_targets_after_prune_step():
    model, x = block_model(), images(2)
    y = labels(model, x)
    targets = torch.stack([(y + k) % 10 for k in (1, 3, 5)], 1)
    calls = []
    res = attack_smoothing(model, SIGMA, x, y, small_cfg(steps=8, keep_targets=1, prune_step=3), targets=targets,
                           callback=lambda s, r: calls.append(r["active"]), **FAST)
    assert calls == [6, 6] + [2] * 6 and res.steps_run == 8
    cls = res.history["per_candidate"]["classification"]             # steps x images x targets
    tv = res.history["per_candidate"]["tv"]
    kept = cls[2].argmin(1)                                          # the loss seen at the prune step
    for i in range(2):
        for j in range(3):
            moving = not torch.equal(tv[3:, i, j], tv[3, i, j].expand(5))
            assert moving == (j == int(kept[i]))                     # only the kept target keeps moving
    with pytest.raises(ValueError, match="keep_targets"):
        small_cfg(keep_targets=0)
    with pytest.raises(ValueError, match="prune_step"):
        small_cfg(prune_step=0)


def test_smoothing_three_channel_regularisers_respond_to_their_weights():
    model, x = block_model(), images(1)
    y = labels(model, x)
    kw = dict(targets=(y + 1) % 10, n=None, **{k: v for k, v in FAST.items() if k != "n"})
    lo = attack_smoothing(model, SIGMA, x, y, small_cfg(channels=3, lambda_s=0.0), **kw)
    hi = attack_smoothing(model, SIGMA, x, y, small_cfg(channels=3, lambda_s=5.0), **kw)
    assert lo.history["dissim"][0] > 0
    assert hi.history["dissim"][-1] < lo.history["dissim"][-1]
    smooth_lo = attack_smoothing(model, SIGMA, x, y, small_cfg(lambda_tv=0.0), **kw)
    smooth_hi = attack_smoothing(model, SIGMA, x, y, small_cfg(lambda_tv=0.3), **kw)
    assert smooth_hi.history["tv"][-1] < smooth_lo.history["tv"][-1]
    zero = attack_smoothing(model, SIGMA, x, y, small_cfg(init="zeros", steps=1), **kw)
    assert zero.history["tv"][0] == 0 and zero.history["color"][0] == 0


def test_smoothing_rejects_bad_input():
    model, x = block_model(), images(2)
    y = labels(model, x)
    cfg = small_cfg(steps=1)
    bad = x.clone()
    bad[0, 0, 0, 0] = -0.1
    with pytest.raises(ValueError, match=r"x must have values in \[0, 1\]"):
        attack_smoothing(model, SIGMA, bad, y, cfg, **FAST)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN"):
        attack_smoothing(model, SIGMA, bad, y, cfg, **FAST)
    with pytest.raises(ValueError, match="x must have shape"):
        attack_smoothing(model, SIGMA, x[0], y, cfg, **FAST)
    with pytest.raises(ValueError, match="x must have 3 channels"):
        attack_smoothing(model, SIGMA, x[:, :1], y, cfg, **FAST)
    with pytest.raises(ValueError, match="y must be an integer tensor"):
        attack_smoothing(model, SIGMA, x, y[:1], cfg, **FAST)
    with pytest.raises(ValueError, match="targets must differ from the true labels"):
        attack_smoothing(model, SIGMA, x, y, cfg, targets=y.clone(), **FAST)
    with pytest.raises(ValueError, match="sigma"):
        attack_smoothing(model, 0.0, x, y, cfg, **FAST)
    with pytest.raises(ValueError, match="n_select"):
        attack_smoothing(model, SIGMA, x, y, cfg, **{**FAST, "n_select": 0})
    with pytest.raises(ValueError, match="alpha"):
        attack_smoothing(model, SIGMA, x, y, cfg, alpha=1.5, **FAST)
    with pytest.raises(ValueError, match="early_stop_margin"):
        attack_smoothing(model, SIGMA, x, y, small_cfg(early_stop_margin=2.0), **FAST)
    with pytest.raises(ValueError, match="batch_size"):
        attack_smoothing(model, SIGMA, x, y, cfg, batch_size=0, **FAST)
    with pytest.raises(ValueError, match="cfg must be a ShadowConfig"):
        attack_smoothing(model, SIGMA, x, y, {"steps": 3}, **FAST)


# ----------------------------------------------------------------------------------------------- CROWN-IBP
def relu_model() -> nn.Module:
    """Block-template features -> ReLU -> linear: a CROWN-IBP-compatible net (Flatten, Linear, ReLU)."""
    w = template_weights(10.0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3072, 20), nn.ReLU(), nn.Linear(20, 10))
    with torch.no_grad():
        model[1].weight.copy_(torch.cat([w, -w]))        # ReLU(a) - ReLU(-a) = a: the block model again
        model[1].bias.zero_()
        model[3].weight.copy_(torch.cat([torch.eye(10), -torch.eye(10)], 1))
        model[3].bias.zero_()
    return model.eval()


def test_crown_ibp_attack_certifies_a_wrong_label():
    from shadowlab.certify.bounds import crown_bounds, ibp_bounds, margin_spec
    from shadowlab.certify.verify import certified

    model, x = relu_model(), images(2)
    y = labels(model, x)
    eps = 2 / 255
    cfg = ShadowConfig.paper_crown_ibp(steps=30)
    calls = []
    res = attack_crown_ibp(model, eps, x, y, cfg, progress=False, device="cpu",
                           callback=lambda s, r: calls.append(r["min_margin"]))
    assert res.method == "crown-ibp" and res.candidate_targets.shape == (2, 9)
    assert res.success.all()
    assert (res.target != y).all()
    assert torch.equal(res.success, res.margin >= 0)
    # the reported margin is the sound one: max of the CROWN-IBP and IBP lower bounds, min over j != target
    spec = margin_spec(y, 10, target=res.target)
    lb = torch.maximum(crown_bounds(model, res.x_shadow, eps, C=spec, intermediate="ibp")[0],
                       ibp_bounds(model, res.x_shadow, eps, C=spec)[0])
    assert torch.allclose(res.margin, lb.amin(1), atol=1e-5)
    assert certified(model, res.x_shadow, res.target, eps, method="crown-ibp", device="cpu").all()
    assert torch.equal(res.prediction, res.target)
    assert res.margin.tolist() == res.candidate_score.amax(1).tolist()
    assert res.history["classification"].shape == (30,) and len(calls) == 30
    assert res.history["classification"][-1] < res.history["classification"][0]
    assert res.history["min_margin"][-1] > res.history["min_margin"][0]
    h = res.history
    assert all(h[k].shape == (30,) and torch.isfinite(h[k]).all() for k in ("color", "tv", "l2", "total"))
    # the colour term is recorded (the uniform start has colour) but lambda_c = 0 leaves it out of the objective
    assert cfg.lambda_c == 0 and (h["color"] > 0).all()
    assert torch.allclose(h["total"], h["classification"] + cfg.lambda_tv * h["tv"] + cfg.l2_penalty * h["l2"],
                          rtol=1e-4, atol=1e-6)
    record = json.loads(json.dumps(res.to_dict()))
    assert record["method"] == "crown-ibp" and record["target"] == res.target.tolist()
    assert record["success"] == res.success.tolist() and record["margin"] == pytest.approx(res.margin.tolist())
    assert record["history"]["total"] == pytest.approx(h["total"].tolist())


def test_crown_ibp_same_seed_same_result_and_validation():
    model, x = relu_model(), images(1)
    y = labels(model, x)
    cfg = ShadowConfig.paper_crown_ibp(steps=3)
    kw = dict(targets=(y + 1) % 10, progress=False, device="cpu")
    a = attack_crown_ibp(model, 2 / 255, x, y, cfg, **kw)
    b = attack_crown_ibp(model, 2 / 255, x, y, cfg, **kw)
    assert torch.equal(a.x_shadow, b.x_shadow) and torch.equal(a.margin, b.margin)
    with pytest.raises(ValueError, match="eps"):
        attack_crown_ibp(model, -1.0, x, y, cfg, **kw)
    with pytest.raises(ValueError, match="bound"):
        attack_crown_ibp(model, 0.01, x, y, cfg, bound="lp", **kw)
    with pytest.raises(ValueError, match="targets must differ"):
        attack_crown_ibp(model, 0.01, x, y, cfg, targets=y, progress=False, device="cpu")


def test_optimise_returns_each_candidates_best_iterate_not_its_last():
    """The loop keeps, per candidate, the iterate with the best (reached and imperceptible, statistic) rank: here
    the statistic peaks at step 2 for one candidate and step 4 for the other, then falls back below the target."""
    from shadowlab.shadow.inputs import Candidates
    from shadowlab.shadow.optimise import optimise

    curve = torch.tensor([[-1.0, 0.5, 2.0, 1.0, -1.0, -2.0], [-3.0, -2.0, 0.1, 0.2, 0.3, -0.5]])   # candidates x steps
    calls = []

    def class_step(d, act):
        k = len(calls)
        calls.append(k)
        return torch.ones_like(d), torch.zeros(2), curve[:, k]

    x_c = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    cfg = ShadowConfig(steps=6, lr=1e-3, lambda_c=0, lambda_tv=0, lambda_s=0, init="zeros")
    delta0 = torch.zeros(2, 1, 16, 16)
    cands = Candidates(x_c, torch.zeros(2, dtype=torch.long), torch.ones(2, 1, dtype=torch.long), torch.arange(2),
                       torch.arange(2))
    last, best, history, steps = optimise(cfg, cands, delta0, class_step, "stat", 0.0, None, 0, False, "t")
    assert steps == 6 and torch.allclose(last, torch.full_like(last, -6e-3))
    # the statistic of step k is that of delta0 - k lr (before the step): best at step 2, and at step 4
    assert torch.allclose(best[0], torch.full_like(best[0], -2e-3))
    assert torch.allclose(best[1], torch.full_like(best[1], -4e-3))
    with pytest.raises(ValueError, match="keep_best"):
        ShadowConfig(keep_best=1)


# ----------------------------------------------------------------------------------------------- committed model
@pytest.mark.slow
def test_committed_smoothing_model_moves_towards_target():
    from shadowlab import checkpoints
    from shadowlab.data import load_cifar10

    if "smooth-sigma0.25" not in checkpoints.available():
        pytest.skip("committed model smooth-sigma0.25 is missing (data/models); train it to run this test")
    model, _ = checkpoints.load("smooth-sigma0.25", device="cpu")
    x, y, _ = load_cifar10("test", n=2, source="subset")
    res = attack_smoothing(model, SIGMA, x, y, small_cfg(steps=10, noise_samples=8), targets=(y + 1) % 10,
                           n=None, n0=16, n_select=32, progress=False, device="cpu")
    assert res.history["classification"][-1] < res.history["classification"][0]
    assert res.history["target_fraction"][-1] >= res.history["target_fraction"][0]


# ----------------------------------------------------------------------------------------------- imperceptibility
def test_early_stop_waits_for_imperceptibility():
    model, x = block_model(), images(2)
    y = labels(model, x)
    targets = (y + 1) % 10
    voted_only = attack_smoothing(model, SIGMA, x, y, small_cfg(steps=60, early_stop_margin=0.5, min_ssim=0.01,
                                                                settle_window=1000), targets=targets, **FAST)
    assert voted_only.steps_run < 60                       # the votes alone would stop early ...
    strict = attack_smoothing(model, SIGMA, x, y, small_cfg(steps=60, early_stop_margin=0.5, min_ssim=0.9999,
                                                            settle_window=1000), targets=targets, **FAST)
    assert strict.steps_run == 60                          # ... but not before the image is imperceptible
    assert not strict.success.any() and strict.spoofed.all()   # spoofed, yet visible: never a success
    sim = strict.history["per_candidate"]["ssim"]
    assert (sim < 0.9999).all() and sim[-1].mean() > sim[0].mean()   # SSIM rises from the noisy initialisation


def test_early_stop_on_settled_objective():
    model, x = block_model(), images(1)
    y = labels(model, x)
    res = attack_smoothing(model, SIGMA, x, y, small_cfg(steps=300, early_stop_margin=1.0, min_ssim=0.9999,
                                                         settle_window=5, settle_tol=0.05), targets=(y + 1) % 10,
                           **FAST)
    total = res.history["total"]
    assert 5 < res.steps_run < 300
    assert total[-6] - total[-1] <= 0.05 * abs(total[-6]) + 1e-6   # it stopped because the objective settled


def test_crown_ibp_early_stop_never_counts_a_visible_image():
    from tests.conftest import tiny_crown_cnn

    model = tiny_crown_cnn()
    x = images(3)
    y = labels(model, x)
    cfg = ShadowConfig.paper_crown_ibp(steps=15, early_stop_margin=0.0)
    res = attack_crown_ibp(model, 2 / 255, x, y, cfg, progress=False, device="cpu")
    assert torch.equal(res.success, res.spoofed & (res.ssim >= cfg.min_ssim))
    assert torch.equal(res.spoofed, res.margin >= 0)
    assert res.ssim.shape == res.tv.shape == (3,) and (res.tv >= 0).all()


def test_prefer_orders_certified_and_imperceptible_first():
    score = torch.tensor([[5.0, 1.0, 2.0, 9.0]])
    certified = torch.tensor([[True, True, False, False]])
    imperceptible = torch.tensor([[False, True, True, False]])
    assert prefer(score, certified, imperceptible).tolist() == [1]          # certified and imperceptible
    assert prefer(score, certified, torch.zeros_like(certified)).tolist() == [0]
    assert prefer(score, torch.zeros_like(certified), imperceptible).tolist() == [2]
    assert prefer(score, torch.zeros_like(certified), torch.zeros_like(certified)).tolist() == [3]


def test_an_image_gets_the_same_shadow_in_any_batch():
    model, x = block_model(), images(3)
    y = labels(model, x)
    t = (y + 2) % 10
    kw = dict(FAST, n=None)
    whole = attack_smoothing(model, SIGMA, x, y, small_cfg(steps=6), targets=t, image_ids=[0, 1, 2], **kw)
    alone = attack_smoothing(model, SIGMA, x[2:], y[2:], small_cfg(steps=6), targets=t[2:], image_ids=[2], **kw)
    assert (whole.x_shadow[2] - alone.x_shadow[0]).abs().max() <= 1 / 255 + 1e-6
    with pytest.raises(ValueError, match="image_ids"):
        attack_smoothing(model, SIGMA, x, y, small_cfg(steps=1), targets=t, image_ids=[0, 1], **kw)


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.01, float("nan"), True, "0.9"])
def test_bad_min_ssim_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="min_ssim"):
        ShadowConfig(min_ssim=bad)


@pytest.mark.slow
def test_committed_table2_attack_keeps_its_successes_at_the_paper_step_count():
    """At 300 steps without early stop the Table 2 attack succeeds at least as often as at 40 steps with early stop
    on the same images, and its successes' shadows are not the natural image (the last iterate alone lost them)."""
    from shadowlab import checkpoints
    from shadowlab.data import load_cifar10
    from shadowlab.experiments.settings import Table2Settings

    if "crownibp-cnn-2layer-eps2" not in checkpoints.available():
        pytest.skip("committed model crownibp-cnn-2layer-eps2 is missing (data/models)")
    model, meta = checkpoints.load("crownibp-cnn-2layer-eps2", device="cpu")
    eps = float(meta["defense_parameter"]["eps"])
    x, y, _ = load_cifar10("test", n=6, source="subset")
    short_cfg = Table2Settings(steps=40, early_stop_margin=0.0).shadow_config()
    long_cfg = Table2Settings(steps=300, early_stop_margin=None).shadow_config()
    short = attack_crown_ibp(model, eps, x, y, short_cfg, progress=False, device="cpu")
    long = attack_crown_ibp(model, eps, x, y, long_cfg, progress=False, device="cpu")
    assert int(short.success.sum()) >= 1
    assert int(long.success.sum()) >= int(short.success.sum())
    assert (long.l2[long.success] > 0.1).all()


def test_certify_as_targets_reads_each_certificate_for_its_target():
    from shadowlab.certify.smoothing import Smooth
    from shadowlab.shadow.judge import certify_as_targets

    model, x = block_model(), images(2)
    smooth = Smooth(model, 10, SIGMA, device="cpu")
    targets = torch.tensor([3, 7])
    certs, pred, rad, votes = certify_as_targets(smooth, x, targets, 16, 64, 0.001, 1000, 0)
    assert pred.tolist() == [c.prediction for c in certs] and rad.tolist() == pytest.approx([c.radius for c in certs])
    assert votes.tolist() == pytest.approx([c.counts[t] / 64 for c, t in zip(certs, targets.tolist())])
    again = smooth.certify(x, 16, 64, 0.001, seed=0)                 # the same CERTIFY, same seed
    assert [c.counts for c in again] == [c.counts for c in certs]


def test_only_keep_best_without_faithful_judges_the_best_iterate():
    assert ShadowConfig().judges_best_iterate
    assert not ShadowConfig(keep_best=False).judges_best_iterate
    assert not ShadowConfig(faithful=True).judges_best_iterate                     # the authors judge the last one
    assert not ShadowConfig.paper_crown_ibp(faithful=True).judges_best_iterate


@pytest.mark.parametrize("field", ["steps", "lr", "noise_samples", "seed", "channels", "faithful_batch",
                                   "early_stop_margin", "lambda_tv"])
def test_config_refuses_booleans_where_numbers_are_wanted(field):
    with pytest.raises(ValueError, match=field):
        ShadowConfig(**{field: True})
    with pytest.raises(ValueError, match="optimiser"):
        ShadowConfig(optimiser="sgd")
    with pytest.raises(ValueError, match="loss_bound"):
        ShadowConfig(loss_bound="lp")


def test_attacks_refuse_a_boolean_sigma_and_images_the_model_cannot_take():
    model, x = relu_model(), images(2)
    y = labels(model, x)
    with pytest.raises(ValueError, match="sigma"):
        attack_smoothing(model, True, x, y, small_cfg(), **FAST)
    with pytest.raises(ValueError, match="eps"):
        attack_crown_ibp(model, True, x, y, ShadowConfig.paper_crown_ibp(steps=1), progress=False, device="cpu")
    with pytest.raises(ValueError, match="x"):   # 28 x 28 on a 32 x 32 model: a clear error, not a torch one
        attack_smoothing(model, 0.25, images(2)[:, :, :28, :28], y, small_cfg(), **FAST)


def test_best_by_ssim_keeps_the_most_natural_looking_certified_iterate():
    """better_iterate with by_ssim: of two certified imperceptible images the larger SSIM wins, whatever the score."""
    from shadowlab.shadow.judge import better_iterate

    x = images(2)
    near, far = (x + 0.01).clamp(0, 1), (x + 0.03).clamp(0, 1)

    def judge(both):   # both certified; the farther image has the larger margin
        return torch.ones(4, dtype=torch.bool), torch.tensor([1.0, 1.0, 5.0, 5.0])

    assert torch.equal(better_iterate(x, near, far, 0.5, judge), far)
    assert torch.equal(better_iterate(x, near, far, 0.5, judge, by_ssim=True), near)
    assert ShadowConfig.tuned_crown_ibp(best_by="ssim").best_by == "ssim" and ShadowConfig().best_by == "statistic"
    with pytest.raises(ValueError, match="best_by"):
        ShadowConfig(best_by="margin")


def test_a_candidate_stopped_once_every_noise_copy_is_on_target_keeps_the_unstopped_best_iterate():
    """With early_stop_margin 1.0 and no settle rule, a candidate freezes once its statistic is 1 (all of its
    training noise on the target) and imperceptible. Its best iterate can no longer change then (a later iterate
    replaces it only with a strictly larger statistic), so the stopped run's best deltas are the full run's."""
    from shadowlab.shadow.inputs import Candidates
    from shadowlab.shadow.optimise import optimise

    b, t = 2, 3
    x_c = torch.full((b * t, 3, 16, 16), 0.5)
    reach = torch.tensor([3, 5, 100, 8, 2, 100])        # the step at which each candidate's statistic becomes 1

    def class_step(delta, act):
        step = class_step.calls
        class_step.calls += 1
        stat = torch.where(step >= reach, torch.ones(b * t), torch.linspace(0.1, 0.6, b * t))
        grad = torch.ones_like(delta) * 1e-3              # a small, steady pull: SSIM stays high
        return grad, (1 - stat)[act], stat[act]

    delta0 = torch.zeros(b * t, 1, 16, 16)
    runs = {}
    for name, kw in {"full": {}, "stopped": {"early_stop_margin": 1.0, "settle_window": None}}.items():
        class_step.calls = 0
        cfg = ShadowConfig(steps=20, noise_samples=1, channels=1, min_ssim=0.5, lambda_tv=0, lambda_c=0, **kw)
        cands = Candidates(x_c[::t], torch.zeros(b, dtype=torch.long), torch.ones(b, t, dtype=torch.long),
                           torch.arange(b).repeat_interleave(t), torch.arange(b))
        runs[name] = optimise(cfg, cands, delta0, class_step, "target_fraction", 0.5, None, 0, False, "")
    (_, best_full, _, steps_full), (last_stop, best_stop, _, steps_stop) = runs["full"], runs["stopped"]
    assert torch.equal(best_stop, best_full)
    frozen = reach < 20
    assert torch.equal(last_stop[frozen], best_stop[frozen])   # a frozen candidate's last iterate is its best
    assert steps_full == 20 and steps_stop == 20               # two candidates never reach 1: the loop runs on
    with pytest.raises(ValueError, match="settle_window"):
        ShadowConfig(settle_window=0)
