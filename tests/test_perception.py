"""SSIM (Wang et al. 2004 convention), the perturbation's TV, 8-bit images and the one definition of success."""

import math

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from shadowlab.perception import MIN_SSIM, check_min_ssim, imperceptible, quantize, shadow_success, ssim, tv_per_pixel
from shadowlab.regularisers import total_variation
from shadowlab.shadow.config import ShadowConfig
from shadowlab.shadow.inputs import initial_delta


def _images(n=3, seed=0):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_ssim_is_one_for_identical_images():
    x = _images()
    assert torch.allclose(ssim(x, x), torch.ones(3), atol=1e-6)


def test_ssim_by_hand_on_a_constant_shift_of_a_flat_image():
    # x = 0.5 everywhere, x' = 0.6: sigma terms vanish, SSIM = (2 mu mu' + C1) / (mu^2 + mu'^2 + C1)
    x, xp = torch.full((1, 3, 32, 32), 0.5), torch.full((1, 3, 32, 32), 0.6)
    c1 = 0.01 ** 2
    expected = (2 * 0.5 * 0.6 + c1) / (0.5 ** 2 + 0.6 ** 2 + c1)
    assert ssim(x, xp).item() == pytest.approx(expected, abs=1e-4)   # float32 windowed variances


def test_ssim_equals_scikit_image_on_noisy_images():
    x = _images(2)
    xp = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    ours = ssim(x, xp)
    ref = [structural_similarity(x[i].numpy(), xp[i].numpy(), gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False, data_range=1.0, channel_axis=0) for i in range(2)]
    assert ours.tolist() == pytest.approx(ref, abs=1e-5)
    assert (ours < 1).all()


def test_the_authors_uniform_initialisation_is_visible():
    """The noise the old early stop returned: U(-0.5, 0.5) on a natural-looking image reads far below 0.5."""
    from shadowlab.data import load_cifar10

    x, _, _ = load_cifar10("test", n=4, source="subset")
    cfg = ShadowConfig.paper_smoothing()
    d = initial_delta(cfg, 4, 1, (32, 32), torch.arange(4), torch.device("cpu"))
    assert (ssim(x, quantize(x + d.expand(-1, 3, -1, -1))) < 0.5).all()


def test_tv_per_pixel_is_the_papers_tv_over_the_number_of_values():
    x = _images(2)
    xp = quantize(x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2)))
    assert torch.allclose(tv_per_pixel(x, xp), total_variation(xp - x) / (3 * 32 * 32))
    assert torch.allclose(tv_per_pixel(x, (x + 0.1).clamp(max=1.0) * 0 + x), torch.zeros(2))


def test_quantize_gives_8_bit_values():
    q = quantize(torch.tensor([-0.2, 0.0, 0.5, 0.1234, 1.3]))
    assert torch.allclose(q * 255, torch.round(q * 255)) and q.min() == 0 and q.max() == 1


def test_success_needs_certificate_and_imperceptibility():
    spoofed = torch.tensor([True, True, False, False])
    sim = torch.tensor([0.95, 0.5, 0.99, 0.1])
    assert shadow_success(spoofed, sim).tolist() == [True, False, False, False]
    assert shadow_success(spoofed, sim, min_ssim=0.4).tolist() == [True, True, False, False]
    assert imperceptible(torch.tensor([MIN_SSIM, MIN_SSIM - 1e-6])).tolist() == [True, False]
    with pytest.raises(ValueError, match="same shape"):
        shadow_success(spoofed, sim[:2])


@pytest.mark.parametrize("bad", [0, 0.0, -1, 1.0001, math.nan, math.inf, True, None, "0.9", np.nan])
def test_bad_min_ssim_names_the_parameter_and_range(bad):
    with pytest.raises(ValueError, match=r"min_ssim=.* must be a number in \(0, 1\]"):
        check_min_ssim(bad)
    assert check_min_ssim(1) == 1.0


def test_ssim_rejects_bad_inputs():
    with pytest.raises(ValueError, match="same shape"):
        ssim(_images(2), _images(3))
    with pytest.raises(ValueError, match="at least 11"):
        ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="x must be"):
        ssim(torch.rand(3, 32, 32), torch.rand(3, 32, 32))
