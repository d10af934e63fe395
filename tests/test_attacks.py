"""FGSM and PGD (paper eq. 1): they raise the loss, stay in their ball and in [0, 1], and reject bad input. SmoothAdv
(PGD on the soft smoothed classifier) and the gradient-free random search: their contracts, and that random search
breaks a model whose gradient is zero everywhere, which PGD cannot."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shadowlab.attacks import AttackResult, SoftSmoothed, fgsm, pgd, project, random_search, smoothadv
from tests.conftest import tiny_conv


@pytest.fixture()
def batch() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model = tiny_conv()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 3, 32, 32, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)          # attack correctly classified points
    return model, x, y


def ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_raises_loss_and_respects_ball(batch, norm):
    model, x, y = batch
    eps = 8 / 255 if norm == "linf" else 0.5
    res = pgd(model, x, y, eps, norm=norm, steps=15)
    assert isinstance(res, AttackResult)
    assert res.x_adv.shape == x.shape
    assert (ce(model, res.x_adv, y) > ce(model, x, y)).all()
    assert res.loss_history.shape == (15,)
    assert res.loss_history[-1] > res.loss_history[0]
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    d = (res.x_adv - x).flatten(1)
    size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    assert (size <= eps + 1e-5).all()
    assert torch.allclose(size, res.linf if norm == "linf" else res.l2)
    assert torch.equal(res.success, model(res.x_adv).argmax(1) != y)


def test_pgd_l2_uses_the_whole_ball_and_box_clipping():
    # an image at the corner of the box: clipping must not let the L2 size exceed eps
    model = tiny_conv()
    x = torch.ones(2, 3, 32, 32)
    x[1] = 0.0
    y = torch.tensor([0, 1])
    res = pgd(model, x, y, 2.0, norm="l2", steps=5)
    assert (res.l2 <= 2.0 + 1e-5).all()
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1


def test_project_l2_shrinks_only_outside_the_ball():
    x = torch.full((2, 1, 2, 2), 0.5)
    inside = x + 0.1                    # L2 size 0.2
    outside = x.clone()
    outside[:, 0, 0, 0] += 0.4          # L2 size 0.4
    assert torch.allclose(project(inside, x, 0.3, "l2"), inside)
    shrunk = project(outside, x, 0.3, "l2")
    assert torch.allclose((shrunk - x).flatten(1).norm(dim=1), torch.full((2,), 0.3))


def test_targeted_pgd_moves_towards_the_target(batch):
    model, x, y = batch
    target = (y + 1) % 10
    res = pgd(model, x, target, 16 / 255, steps=20, targeted=True)
    assert (ce(model, res.x_adv, target) < ce(model, x, target)).all()
    assert res.loss_history[-1] < res.loss_history[0]
    assert torch.equal(res.success, model(res.x_adv).argmax(1) == target)


def test_fgsm_raises_loss_and_stays_in_box(batch):
    model, x, y = batch
    eps = 4 / 255
    res = fgsm(model, x, y, eps)
    x_adv = res.x_adv
    assert (ce(model, x_adv, y) > ce(model, x, y)).all()
    # the same result type as pgd's: success, loss and sizes measured at x_adv, the one step's loss at x
    with torch.no_grad():
        assert torch.equal(res.success, model(x_adv).argmax(1) != y)
    torch.testing.assert_close(res.loss, ce(model, x_adv, y))
    torch.testing.assert_close(res.loss_history, ce(model, x, y).mean().view(1))
    assert (res.linf <= eps + 1e-6).all() and res.norm == "linf" and not res.targeted
    d = (x_adv - x).abs()
    assert d.max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    # away from the box edges every pixel moves by exactly eps
    interior = (x > eps) & (x < 1 - eps)
    assert torch.allclose(d[interior], torch.full_like(d[interior], eps), atol=1e-6)
    x_t = fgsm(model, x, (y + 1) % 10, eps, targeted=True).x_adv
    assert (ce(model, x_t, (y + 1) % 10) < ce(model, x, (y + 1) % 10)).all()


def test_pgd_restarts_keep_the_best_per_image(batch):
    model, x, y = batch
    single = pgd(model, x, y, 2 / 255, steps=3, seed=0)
    res = pgd(model, x, y, 2 / 255, steps=3, restarts=3, seed=0)
    assert res.loss_history.shape == (3, 3)
    # the first restart draws the same start as a single run with the same seed ...
    assert torch.allclose(res.loss_history[0], single.loss_history)
    # ... and every image keeps a restart at least as good as that one (success first, then loss)
    better = (res.success & ~single.success) | ((res.success == single.success) & (res.loss >= single.loss - 1e-6))
    assert better.all()
    assert not torch.allclose(res.loss_history[1], res.loss_history[0])   # restarts start elsewhere
    assert (res.linf <= 2 / 255 + 1e-6).all()


def test_pgd_deterministic_callback_and_schedule(batch):
    model, x, y = batch
    calls = []
    a = pgd(model, x, y, 8 / 255, steps=7, seed=3, step_schedule="cosine", callback=lambda s, r: calls.append((s, r)))
    b = pgd(model, x, y, 8 / 255, steps=7, seed=3, step_schedule="cosine")
    c = pgd(model, x, y, 8 / 255, steps=7, seed=4, step_schedule="cosine")
    assert torch.equal(a.x_adv, b.x_adv)
    assert not torch.equal(a.x_adv, c.x_adv)
    assert [s for s, _ in calls] == list(range(7))
    assert set(calls[0][1]) >= {"loss", "step_size", "success_rate"}
    assert calls[-1][1]["step_size"] < calls[0][1]["step_size"]      # cosine decays
    d = a.to_dict()
    assert len(d["loss_history"]) == 7 and len(d["success"]) == len(x) and "x_adv" not in d
    # a callable schedule that zeroes the step leaves the random start where it was
    still = pgd(model, x, y, 8 / 255, steps=3, seed=3, step_schedule=lambda step: 0.0)
    from shadowlab.attacks import _random_start
    start = _random_start(x, 8 / 255, "linf", torch.Generator().manual_seed(3))
    assert torch.equal(still.x_adv, start)


def test_pgd_without_random_start_and_zero_eps(batch):
    model, x, y = batch
    res = pgd(model, x, y, 0.0, steps=2, restarts=0)
    assert torch.equal(res.x_adv, x)


@pytest.mark.parametrize("kwargs, name", [
    (dict(eps=-0.1), "eps"),
    (dict(eps=float("nan")), "eps"),
    (dict(norm="l1"), "norm"),
    (dict(steps=0), "steps"),
    (dict(restarts=-1), "restarts"),
    (dict(step_size=-1.0), "step_size"),
    (dict(step_schedule="warp"), "step_schedule"),
])
def test_pgd_rejects_bad_arguments(batch, kwargs, name):
    model, x, y = batch
    args = dict(eps=0.03)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        pgd(model, x, y, **args)


def test_attacks_reject_bad_images_and_labels(batch):
    model, x, y = batch
    bad = x.clone()
    bad[0, 0, 0, 0] = 1.5
    with pytest.raises(ValueError, match=r"x must have values in \[0, 1\]"):
        pgd(model, bad, y, 0.03)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN"):
        fgsm(model, bad, y, 0.03)
    with pytest.raises(ValueError, match="x must have shape"):
        pgd(model, x[0], y, 0.03)
    with pytest.raises(ValueError, match="y must be an integer tensor"):
        fgsm(model, x, y[:2], 0.03)
    with pytest.raises(ValueError, match="y must hold integer"):
        fgsm(model, x, y.float(), 0.03)
    with pytest.raises(ValueError, match="eps"):
        fgsm(model, x, y, -1.0)


def test_attack_restores_training_mode(batch):
    model, x, y = batch
    model.train()
    pgd(model, x, y, 0.01, steps=1)
    assert model.training


def test_fgsm_and_pgd_work_inside_no_grad():
    from shadowlab.attacks import fgsm, pgd
    from tests.conftest import predicted, random_images, tiny_conv

    model, x = tiny_conv(), random_images(2)
    y = predicted(model, x)
    outside = fgsm(model, x, y, 4 / 255).x_adv
    with torch.no_grad():
        inside = fgsm(model, x, y, 4 / 255).x_adv
        p = pgd(model, x, y, 4 / 255, steps=2)
    assert torch.equal(inside, outside) and p.x_adv.shape == x.shape


# ----------------------------------------------------------------------------------------------- SmoothAdv
def test_soft_smoothed_is_the_log_of_the_mean_noisy_softmax(batch):
    model, x, _ = batch
    soft = SoftSmoothed(model, 0.25, noise_samples=5, seed=3)
    out = soft(x)
    gen = torch.Generator().manual_seed(3)
    noise = torch.randn((x.shape[0], 5, *x.shape[1:]), generator=gen)
    with torch.no_grad():
        mine = torch.stack([F.softmax(model(x + 0.25 * noise[:, k]), 1) for k in range(5)]).mean(0).log()
    assert torch.allclose(out, mine, atol=1e-5)
    assert torch.allclose(out.logsumexp(1), torch.zeros(len(x)), atol=1e-5)
    xg = x.clone().requires_grad_(True)
    soft(xg)[:, 0].sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="noise_samples"):
        SoftSmoothed(model, 0.25, noise_samples=0)
    with pytest.raises(ValueError, match="sigma"):
        SoftSmoothed(model, 0.0)


def test_smoothadv_raises_the_smoothed_loss_inside_the_l2_ball(batch):
    model, x, y = batch
    res = smoothadv(model, x, y, eps=1.0, sigma=0.25, noise_samples=8, steps=10, seed=0)
    assert (res.l2 <= 1.0 + 1e-5).all() and res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    judge = SoftSmoothed(model, 0.25, noise_samples=256, seed=99)          # fresh noise, many samples
    with torch.no_grad():
        before = F.cross_entropy(judge(x), y, reduction="none")
        after = F.cross_entropy(judge(res.x_adv), y, reduction="none")
    assert after.mean() > before.mean() and (after > before).sum() >= len(x) - 1, (before, after)
    again = smoothadv(model, x, y, eps=1.0, sigma=0.25, noise_samples=8, steps=10, seed=0)
    assert torch.equal(res.x_adv, again.x_adv)                              # same seed, same noise, same result


# ----------------------------------------------------------------------------------------------- random search
class _Quantised(nn.Module):
    """round(4 x) / 4 pixel by pixel: a function with zero gradient almost everywhere (a masked gradient)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(4 * x) / 4


def _masked_linear() -> nn.Module:
    """Two classes: logit 1 = mean of the quantised pixels, logit 0 = 0.3; an image of 0.3 is class 0."""
    layer = nn.Linear(3 * 8 * 8, 2)
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[1] = 1 / (3 * 8 * 8)
        layer.bias.copy_(torch.tensor([0.3, 0.0]))
    return nn.Sequential(_Quantised(), nn.Flatten(), layer).eval()


def test_random_search_breaks_a_masked_gradient_that_pgd_cannot():
    model = _masked_linear()
    x = torch.full((4, 3, 8, 8), 0.3)
    y = torch.zeros(4, dtype=torch.long)
    assert (model(x).argmax(1) == 0).all()
    white = pgd(model, x, y, 0.3, steps=20, restarts=0)
    assert not white.success.any() and torch.equal(white.x_adv, x)         # zero gradient: PGD never moves
    black = random_search(model, x, y, 0.3, queries=200, seed=0)
    assert black.success.all(), black.loss_history[-5:]
    assert (black.linf <= 0.3 + 1e-6).all() and black.x_adv.min() >= 0 and black.x_adv.max() <= 1
    assert torch.equal(black.success, model(black.x_adv).argmax(1) != y)


def test_random_search_only_improves_and_stays_in_the_ball(batch):
    model, x, y = batch
    eps = 2 / 255

    def margin(z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            logits = model(z)
        return logits.scatter(1, y[:, None], -math.inf).amax(1) - logits.gather(1, y[:, None])[:, 0]

    short = random_search(model, x, y, eps, queries=20, seed=1)
    long = random_search(model, x, y, eps, queries=60, seed=1)              # the same first 20 rounds, then more
    assert (margin(long.x_adv) >= margin(short.x_adv) - 1e-6).all()
    assert (long.success >= short.success).all()
    assert long.loss_history.shape == (60,) and (long.loss_history.diff() >= -1e-6).all()
    assert (long.linf <= eps + 1e-6).all() and long.x_adv.min() >= 0 and long.x_adv.max() <= 1
    assert torch.equal(random_search(model, x, y, eps, queries=60, seed=1).x_adv, long.x_adv)
    with pytest.raises(ValueError, match="queries"):
        random_search(model, x, y, eps, queries=0)
    with pytest.raises(ValueError, match="window"):
        random_search(model, x, y, eps, window=0.0)
