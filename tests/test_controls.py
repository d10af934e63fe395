"""The tables' controls: natural image, the attack's initialisation alone, smooth noise of the shadow's L2 size."""

import pytest
import torch

from shadowlab.certify.smoothing import Smooth
from shadowlab.experiments.controls import controls, smooth_noise, white_noise
from shadowlab.perception import quantize, ssim
from shadowlab.shadow.attack import attack_crown_ibp, attack_smoothing
from shadowlab.shadow.config import ShadowConfig
from shadowlab.shadow.objectives import BoundObjective, SmoothingObjective
from tests.conftest import predicted, tiny_conv, tiny_crown_cnn


def _images(n=3):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(4)) * 0.6 + 0.2


def test_smooth_noise_has_the_requested_size_and_is_grey_and_smooth():
    x = torch.full((2, 3, 32, 32), 0.5)
    l2 = torch.tensor([1.0, 3.0])
    xn = smooth_noise(x, l2, seed=0)
    d = xn - x
    assert torch.equal(xn, quantize(xn))
    assert d.flatten(1).norm(dim=1).tolist() == pytest.approx([1.0, 3.0], abs=0.05)
    assert torch.allclose(d[:, 0], d[:, 1]) and torch.allclose(d[:, 1], d[:, 2])   # the same map on R, G, B
    white = torch.randn(1, 32, 32)
    white = white / white.norm() * 3.0
    tv = lambda v: ((v[..., 1:] - v[..., :-1]) ** 2).sum() + ((v[..., 1:, :] - v[..., :-1, :]) ** 2).sum()
    assert tv(d[1, 0]) < 0.2 * tv(white)                                         # far smoother than white noise
    assert torch.equal(smooth_noise(x, l2, seed=0), xn) and not torch.equal(smooth_noise(x, l2, seed=1), xn)
    with pytest.raises(ValueError, match="l2 must have shape"):
        smooth_noise(x, torch.ones(3))


def test_smoothing_controls_are_judged_on_the_same_images():
    model, x = tiny_conv(), _images()
    y = predicted(model, x)
    cfg = ShadowConfig(steps=3, noise_samples=4)
    res = attack_smoothing(model, 0.25, x, y, cfg, n0=16, n_select=32, n=64, progress=False, device="cpu")
    smooth = Smooth(model, 10, 0.25, device="cpu")
    natural = smooth.certify(x, 16, 64, 0.001)
    ctrl = controls(SmoothingObjective(smooth, 16, 32, 64, 0.001), x, y, res, torch.arange(3), natural)
    assert set(ctrl) == {"natural", "init", "smooth_noise"}
    for name, c in ctrl.items():
        assert c["success"].shape == (3,)
        assert torch.equal(c["success"], c["spoofed"] & (c["ssim"] >= cfg.min_ssim)), name
    assert torch.allclose(ctrl["natural"]["ssim"], torch.ones(3))
    pred = torch.tensor([c.prediction for c in natural])
    assert torch.equal(ctrl["natural"]["spoofed"], (pred != y) & (pred >= 0))   # a wrong label already certified
    assert ctrl["smooth_noise"]["l2"].tolist() == pytest.approx(res.l2.tolist(), rel=0.1, abs=0.05)
    assert (ctrl["init"]["ssim"] < ctrl["natural"]["ssim"]).all()


def test_smoothing_controls_skip_only_images_that_cannot_spoof():
    """The controls draw CERTIFY's n samples only where a wrong label can be certified: their verdicts equal
    those of certifying every image (Smooth.certify on all of them), here on images both ways."""
    model, x = tiny_conv(), _images(6)
    y = predicted(model, x)
    y[::2] = (y[::2] + 1) % 10                   # half the labels wrong: their smooth-noise control can spoof
    cfg = ShadowConfig(steps=2, noise_samples=4)
    res = attack_smoothing(model, 0.05, x, y, cfg, n0=16, n_select=32, n=64, progress=False, device="cpu")
    smooth = Smooth(model, 10, 0.05, device="cpu")
    natural = smooth.certify(x, 16, 64, 0.001)
    ctrl = controls(SmoothingObjective(smooth, 16, 32, 64, 0.001), x, y, res, torch.arange(6), natural)
    x_noise = smooth_noise(x, res.l2, cfg.seed, torch.arange(6))
    full = smooth.certify(x_noise, 16, 64, 0.001, seed=cfg.seed + 3)
    pred = torch.tensor([c.prediction for c in full])
    wrong = (pred != y) & (pred >= 0)
    assert wrong.any() and not wrong.all()
    assert torch.equal(ctrl["smooth_noise"]["spoofed"], wrong)
    rad = torch.tensor([c.radius for c in full])
    assert torch.equal(ctrl["smooth_noise"]["radius"], torch.where(wrong, rad, torch.zeros_like(rad)))


def test_crown_ibp_controls_natural_matches_the_bounds():
    from shadowlab.certify.bounds import certified_margins, margin_spec

    model, x = tiny_crown_cnn(), _images()
    y = predicted(model, x)
    eps = 2 / 255
    res = attack_crown_ibp(model, eps, x, y, ShadowConfig.paper_crown_ibp(steps=2), progress=False, device="cpu")
    ctrl = controls(BoundObjective(model, eps), x, y, res)
    tg = res.candidate_targets
    rep = x.repeat_interleave(tg.shape[1], dim=0)
    spec = margin_spec(y.repeat_interleave(tg.shape[1]), 10, target=tg.reshape(-1))
    best = certified_margins(model, rep, eps, spec).amin(1).view(3, -1).amax(1)
    assert torch.equal(ctrl["natural"]["spoofed"], best >= 0)
    assert torch.allclose(ctrl["natural"]["margin"], best)
    for c in ctrl.values():
        assert torch.equal(c["success"], c["spoofed"] & (c["ssim"] >= 0.9))


def test_white_noise_has_the_asked_size_and_8_bit_pixels():
    x = torch.full((3, 3, 32, 32), 0.5)
    l2 = torch.tensor([0.5, 1.0, 2.0])
    noisy = white_noise(x, l2, seed=0)
    assert torch.equal(noisy, quantize(noisy))
    assert (noisy - x).flatten(1).norm(dim=1) == pytest.approx(l2.tolist(), rel=0.05)
    assert torch.equal(noisy, white_noise(x, l2, seed=0)) and not torch.equal(noisy, white_noise(x, l2, seed=1))
    assert torch.equal(noisy, white_noise(x, l2, generator=torch.Generator().manual_seed(0)))   # the same draw
    assert (ssim(x, noisy)[1:] < ssim(x, noisy)[:-1]).all()                 # more noise, lower SSIM
    with pytest.raises(ValueError, match="one size per image"):
        white_noise(x, l2[:2])
