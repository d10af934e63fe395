"""Bound propagation: try to break the bounds (soundness), check exactness, gradients, validation and the loss."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.optimize import Bounds, LinearConstraint, milp
from torch import nn

from shadowlab.certify import bounds as bd
from shadowlab.certify import rules as bound_rules
from shadowlab.certify.bounds import crown_bounds, crown_ibp_bounds, crown_ibp_training_loss, ibp_bounds, margin_spec
from shadowlab.certify.rules import rule_for
from shadowlab.certify.verify import certified, error_table, pgd_error, verified_error
from shadowlab.models import Normalize

TOL = 1e-5
METHODS = {
    "ibp": lambda m, x, eps, C: ibp_bounds(m, x, eps, C),
    "crown": lambda m, x, eps, C: crown_bounds(m, x, eps, C, intermediate="crown"),
    "crown-ibp": lambda m, x, eps, C: crown_bounds(m, x, eps, C, intermediate="ibp"),
}


# ------------------------------------------------------------------------------------------- helpers
def random_batch_norm(features: int, conv: bool) -> nn.Module:
    """A batch norm in eval mode with random statistics and a random (possibly negative) scale."""
    bn = nn.BatchNorm2d(features) if conv else nn.BatchNorm1d(features)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.2, 3)
        bn.weight.uniform_(-2, 2)
        bn.bias.uniform_(-1, 1)
    return bn.eval()


def random_net(seed: int, size: int, convs: list[tuple[int, int, int]], hidden: int, classes: int,
               dtype=torch.float64, batch_norm: bool = False) -> nn.Sequential:
    """Normalize, then Conv(out, kernel, stride) [+ BatchNorm] + ReLU blocks, Flatten, [Linear [+ BatchNorm] + ReLU],
    Linear."""
    g = torch.Generator().manual_seed(seed)
    mean = tuple((0.3 + 0.4 * torch.rand(3, generator=g)).tolist())
    std = tuple((0.15 + 0.2 * torch.rand(3, generator=g)).tolist())
    layers: list[nn.Module] = [Normalize(mean, std)]
    c, s = 3, size
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for out, k, stride in convs:
            layers += [nn.Conv2d(c, out, k, stride=stride, padding=1),
                       *([random_batch_norm(out, True)] if batch_norm else []), nn.ReLU()]
            c, s = out, (s + 2 - k) // stride + 1
        layers.append(nn.Flatten())
        width = c * s * s
        if hidden:
            layers += [nn.Linear(width, hidden), *([random_batch_norm(hidden, False)] if batch_norm else []),
                       nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers).to(dtype)


def random_images(seed: int, n: int, size: int, dtype=torch.float64) -> torch.Tensor:
    """Uniform pixels with about 10% saturated at 0 or 1, so the clamp to [0, 1] matters."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g, dtype=dtype)
    r = torch.rand(x.shape, generator=g, dtype=dtype)
    return torch.where(r < 0.05, torch.zeros_like(x), torch.where(r > 0.95, torch.ones_like(x), x))


def spec_fn(model: nn.Module, C: torch.Tensor | None, repeat: int = 1):
    """z -> C z (C repeated for `repeat` consecutive copies of each image), or the logits without C."""
    if C is None:
        return model
    Cr = C.repeat_interleave(repeat, 0)
    return lambda z: torch.einsum("bmk,bk->bm", Cr, model(z))


def attack_extremes(model, C, xl, xu, m, steps=30, seed=0):
    """PGD inside the box [xl, xu] minimising and maximising each of the m outputs: (min found, max found)."""
    b = xl.shape[0]
    lo, hi = xl.repeat_interleave(2 * m, 0), xu.repeat_interleave(2 * m, 0)
    g = torch.Generator().manual_seed(seed)
    z = lo + torch.rand(lo.shape, generator=g, dtype=lo.dtype) * (hi - lo)
    idx = (torch.arange(2 * m) % m).repeat(b)
    sign = torch.cat([torch.ones(m), -torch.ones(m)]).repeat(b).to(lo.dtype)  # +1 minimise, -1 maximise
    f = spec_fn(model, C, 2 * m)
    step = (hi - lo) / 6
    for t in range(steps):
        z = z.detach().requires_grad_(True)
        obj = (f(z).gather(1, idx[:, None]).squeeze(1) * sign).sum()
        (grad,) = torch.autograd.grad(obj, z)
        z = torch.min(torch.max(z.detach() - step * (0.85 ** t) * grad.sign(), lo), hi)
    with torch.no_grad():
        vals = f(z).gather(1, idx[:, None]).view(b, 2, m)
    return vals[:, 0], vals[:, 1]


def assert_sound(model, x, eps, C, lb, ub, n_random=2000, seed=0, tol=TOL, name="", steps=30):
    """Random points, random corners and PGD extremes of the ball within [0, 1] all lie in [lb - tol, ub + tol]."""
    xl, xu = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    g = torch.Generator().manual_seed(seed)
    b = x.shape[0]
    m = lb.shape[1]
    with torch.no_grad():
        for kind in ("random", "corner"):
            r = torch.rand((b, n_random, *x.shape[1:]), generator=g, dtype=x.dtype)
            if kind == "corner":
                r = (r > 0.5).to(x.dtype)
            pts = xl[:, None] + r * (xu - xl)[:, None]
            out = spec_fn(model, C, n_random)(pts.flatten(0, 1)).view(b, n_random, m)
            assert (out >= lb[:, None] - tol).all(), f"{name}: {kind} point below lower bound"
            assert (out <= ub[:, None] + tol).all(), f"{name}: {kind} point above upper bound"
    found_min, found_max = attack_extremes(model, C, xl, xu, m, steps=steps, seed=seed)
    assert (found_min >= lb - tol).all(), f"{name}: PGD point below lower bound by {(lb - found_min).max():.3g}"
    assert (found_max <= ub + tol).all(), f"{name}: PGD point above upper bound by {(found_max - ub).max():.3g}"
    assert (lb <= ub + tol).all()


def exact_affine_range(model, x, eps):
    """Exact min and max of an affine model over the box: f(0) + J+ x_L + J- x_U (J its Jacobian)."""
    xl, xu = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    lows, highs = [], []
    for i in range(x.shape[0]):
        J = torch.autograd.functional.jacobian(lambda z: model(z[None])[0], x[i]).flatten(1)  # K x D
        f0 = model(torch.zeros_like(x[i:i + 1]))[0].detach()
        lows.append(f0 + J.clamp(min=0) @ xl[i].flatten() + J.clamp(max=0) @ xu[i].flatten())
        highs.append(f0 + J.clamp(min=0) @ xu[i].flatten() + J.clamp(max=0) @ xl[i].flatten())
    return torch.stack(lows), torch.stack(highs)


@st.composite
def architectures(draw):
    size = draw(st.sampled_from([8, 12]))
    n_conv = draw(st.integers(1, 2))
    convs = [(draw(st.integers(1, 3)), draw(st.sampled_from([3, 4])), draw(st.sampled_from([1, 2])))
             for _ in range(n_conv)]
    hidden = draw(st.sampled_from([0, 5, 8]))
    classes = draw(st.integers(2, 5))
    return dict(size=size, convs=convs, hidden=hidden, classes=classes, batch_norm=draw(st.booleans()))


# ------------------------------------------------------------------------------------------- soundness
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arch=architectures(), seed=st.integers(0, 2 ** 16), eps=st.floats(0.0, 0.4), use_spec=st.booleans())
def test_bounds_are_sound_on_random_networks(arch, seed, eps, use_spec):
    model = random_net(seed, **arch)
    x = random_images(seed + 1, 2, arch["size"])
    C = None
    if use_spec:
        y = torch.randint(0, arch["classes"], (2,), generator=torch.Generator().manual_seed(seed))
        C = margin_spec(y, arch["classes"]).double()
    for name, method in METHODS.items():
        lb, ub = method(model, x, eps, C)
        assert lb.shape == ub.shape == (2, arch["classes"] - 1 if use_spec else arch["classes"])
        assert_sound(model, x, eps, C, lb, ub, n_random=500, seed=seed, name=name)
    beta = (seed % 5) / 4
    lb, ub = crown_ibp_bounds(model, x, eps, C, beta)
    assert_sound(model, x, eps, C, lb, ub, n_random=200, seed=seed, name=f"crown_ibp_bounds beta={beta}")


def test_bounds_sound_in_float32_with_many_points():
    model = random_net(3, 12, [(4, 3, 1), (4, 4, 2)], 16, 10, dtype=torch.float32)
    x = random_images(4, 3, 12, dtype=torch.float32)
    C = margin_spec(torch.tensor([0, 4, 9]), 10)
    for name, method in METHODS.items():
        for spec in (None, C):
            lb, ub = method(model, x, 0.03, spec)
            assert_sound(model, x, 0.03, spec, lb, ub, n_random=3000, name=f"{name} float32", tol=1e-4)


def test_committed_crown_ibp_models_are_sound():
    from shadowlab import checkpoints
    from shadowlab.data import load_cifar10

    names = [n for n in checkpoints.available() if n.startswith("crownibp-")]
    if not names:
        pytest.skip("no committed crownibp-* checkpoints in data/models")
    x, y, _ = load_cifar10("test", n=2, source="subset")
    x = x.double()
    for name in names:
        model, meta = checkpoints.load(name)
        model = model.double()
        eps = float(meta["defense_parameter"]["eps"])
        C = margin_spec(y, 10).double()
        for method in ("ibp", "crown-ibp"):
            for spec in (None, C):
                lb, ub = METHODS[method](model, x, eps, spec)
                assert_sound(model, x, eps, spec, lb, ub, n_random=200, steps=20, name=f"{name} {method}")
        if name == names[0]:  # full CROWN costs seconds to minutes per image: one model, one image, margins only
            lb, ub = METHODS["crown"](model, x[:1], eps, C[:1])
            assert_sound(model, x[:1], eps, C[:1], lb, ub, n_random=200, steps=20, name=f"{name} crown")


# ------------------------------------------------------------------------------------------- independent reference
# A reference written from the definitions with NumPy and SciPy's HiGHS solver, sharing no code with
# shadowlab.certify.bounds: the network is unrolled into dense affine maps between its ReLUs (each block applied to the
# identity basis), pre-activation bounds come from a plain NumPy interval pass, and scipy.optimize.milp gives the
# exact minimum of a margin over the box, with each unstable ReLU as a big-M binary (Tjeng et al. 2019). With the
# binaries relaxed to [0, 1] the same program is the triangle LP relaxation (Ehlers 2017), which every CROWN-style
# bound lower-bounds when both use the same pre-activation bounds (Salman et al. 2019).
def dense_affine_maps(model: nn.Sequential, in_shape: tuple[int, ...]) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(W, b)] of the affine blocks between the ReLUs, in order (the last one produces the logits)."""
    maps, block, shape = [], [], in_shape
    for layer in [*model, None]:
        if layer is not None and not isinstance(layer, nn.ReLU):
            block.append(layer)
            continue
        d = math.prod(shape)
        basis = torch.cat([torch.zeros(1, d), torch.eye(d)]).double().view(d + 1, *shape)
        with torch.no_grad():
            out = nn.Sequential(*block)(basis)
        shape = tuple(out.shape[1:])
        out = out.flatten(1).numpy()
        maps.append(((out[1:] - out[0]).T, out[0]))
        block = []
    return maps


def interval_pass(maps, xl: np.ndarray, xu: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Pre-activation bounds of every ReLU layer by interval arithmetic: W+ l + W- u + b and W+ u + W- l + b."""
    out, lo, hi = [], xl, xu
    for W, b in maps[:-1]:
        Wp, Wn = W.clip(min=0), W.clip(max=0)
        pre = (Wp @ lo + Wn @ hi + b, Wp @ hi + Wn @ lo + b)
        out.append(pre)
        lo, hi = np.maximum(pre[0], 0), np.maximum(pre[1], 0)
    return out


def relu_program(maps, xl: np.ndarray, xu: np.ndarray, pre, c: np.ndarray, exact: bool):
    """min c . logits over the box: the exact MILP (exact=True) or its triangle LP relaxation. Returns the result
    and its objective value including the constant term."""
    sizes = [len(xl)] + [3 * len(lo) for lo, _ in pre]  # x, then (zhat, z, a) per ReLU layer
    offs = np.cumsum([0] + sizes)
    nv = offs[-1]
    lb_v, ub_v, integ = np.zeros(nv), np.zeros(nv), np.zeros(nv)
    lb_v[:len(xl)], ub_v[:len(xl)] = xl, xu
    rows, rlo, rhi = [], [], []

    def row(entries, lo, hi):
        r = np.zeros(nv)
        for idx, coef in entries:
            r[idx] += coef
        rows.append(r), rlo.append(lo), rhi.append(hi)

    prev = np.arange(len(xl))
    for k, (lo, hi) in enumerate(pre):
        n = len(lo)
        zh, z, a = (offs[k + 1] + np.arange(n) + j * n for j in range(3))
        W, b = maps[k]
        lb_v[zh], ub_v[zh] = lo, hi
        lb_v[z], ub_v[z] = 0.0, np.maximum(hi, 0)
        ub_v[a] = 1.0
        for i in range(n):
            row([(zh[i], 1.0), *zip(prev, -W[i])], b[i], b[i])           # zhat = W z_prev + b
            if hi[i] <= 0:                                                   # dead: z = 0 (from its bounds)
                continue
            if lo[i] >= 0:                                                   # active: z = zhat
                row([(z[i], 1.0), (zh[i], -1.0)], 0.0, 0.0)
                continue
            integ[a[i]] = 1.0 if exact else 0.0
            row([(z[i], 1.0), (zh[i], -1.0)], 0.0, np.inf)                   # z >= zhat
            row([(z[i], 1.0), (a[i], -hi[i])], -np.inf, 0.0)                 # z <= u a
            row([(z[i], 1.0), (zh[i], -1.0), (a[i], -lo[i])], -np.inf, -lo[i])  # z <= zhat - l (1 - a)
        prev = z
    W, b = maps[-1]
    cost = np.zeros(nv)
    cost[prev] = c @ W
    res = milp(cost, integrality=integ, bounds=Bounds(lb_v, ub_v),
               constraints=LinearConstraint(np.array(rows), rlo, rhi), options={"mip_rel_gap": 1e-9})
    assert res.status == 0, res.message
    return res, res.fun + c @ b


def prefix_bounds(model: nn.Sequential, x: torch.Tensor, eps: float, method: str):
    """shadowlab's bounds on the input of every ReLU of the model (flattened), one image per list entry."""
    relus = [i for i, layer in enumerate(model) if isinstance(layer, nn.ReLU)]
    per_layer = [[t.detach().flatten(1).numpy() for t in METHODS[method](model[:i], x, eps, None)] for i in relus]
    return [[(lo[j], hi[j]) for lo, hi in per_layer] for j in range(len(x))]


@pytest.mark.parametrize("seed", range(5))
def test_bounds_against_an_independent_milp_and_lp(seed):
    convs = [(2, 3, 1), (2, 4, 2)] if seed % 2 else [(3, 4, 2)]
    model = random_net(seed, 4, convs, 5, 3, batch_norm=seed >= 3)
    x = random_images(seed + 1, 2, 4)
    eps = 0.04 + 0.02 * seed
    y = torch.tensor([seed % 3, (seed + 1) % 3])
    C = margin_spec(y, 3).double()
    maps = dense_affine_maps(model, tuple(x.shape[1:]))
    lbs = {name: method(model, x, eps, C)[0].detach().numpy() for name, method in METHODS.items()}
    ibp_pre, crown_pre = prefix_bounds(model, x, eps, "ibp"), prefix_bounds(model, x, eps, "crown")
    xl, xu = (x - eps).clamp(0, 1).flatten(1).numpy(), (x + eps).clamp(0, 1).flatten(1).numpy()
    unstable, gaps = 0, []
    for i in range(len(x)):
        pre = interval_pass(maps, xl[i], xu[i])
        for (lo, hi), (slo, shi) in zip(pre, ibp_pre[i]):  # IBP's boxes equal the NumPy interval pass
            np.testing.assert_allclose(slo, lo, atol=1e-9)
            np.testing.assert_allclose(shi, hi, atol=1e-9)
            unstable += int(((lo < 0) & (hi > 0)).sum())
        for j in range(C.shape[1]):
            c = C[i, j].numpy()
            res, exact = relu_program(maps, xl[i], xu[i], pre, c, exact=True)
            x_star = res.x[:len(xl[i])]
            assert (x_star >= xl[i] - 1e-9).all() and (x_star <= xu[i] + 1e-9).all()
            # the minimiser is a real point of the box with that margin
            margin = float(model(torch.from_numpy(x_star).view(1, *x.shape[1:]))[0].detach() @ C[i, j])
            assert margin == pytest.approx(exact, abs=1e-6)
            for name, lb in lbs.items():
                assert lb[i, j] <= exact + 1e-6, f"{name} lower bound {lb[i, j]} above the exact minimum {exact}"
            _, lp_ibp = relu_program(maps, xl[i], xu[i], ibp_pre[i], c, exact=False)
            _, lp_crown = relu_program(maps, xl[i], xu[i], crown_pre[i], c, exact=False)
            assert lp_ibp <= exact + 1e-6 and lp_crown <= exact + 1e-6
            assert lbs["ibp"][i, j] <= lp_ibp + 1e-6 and lbs["crown-ibp"][i, j] <= lp_ibp + 1e-6
            assert lbs["crown"][i, j] <= lp_crown + 1e-6
            gaps.append(exact - lbs["crown"][i, j])
    assert unstable > 0  # the ReLUs are not all stable, so the programs above are not trivially linear
    assert max(gaps) > 1e-4  # and the relaxations are not exact everywhere


# ------------------------------------------------------------------------------------------- exactness
def affine_net(seed: int, single: bool = False) -> nn.Sequential:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if single:
            return nn.Sequential(Normalize(), nn.Flatten(), nn.Linear(3 * 8 * 8, 4)).double()
        return nn.Sequential(Normalize(), nn.Conv2d(3, 3, 3, stride=2, padding=1), nn.Conv2d(3, 2, 3, padding=1),
                             nn.Flatten(), nn.Linear(2 * 4 * 4, 6), nn.Linear(6, 4)).double()


@pytest.mark.parametrize("eps", [0.02, 0.3])
def test_crown_is_exact_on_affine_networks(eps):
    model = affine_net(0)
    x = random_images(1, 3, 8)
    lo, hi = exact_affine_range(model, x, eps)
    for method in ("crown", "crown-ibp"):
        lb, ub = METHODS[method](model, x, eps, None)
        torch.testing.assert_close(lb, lo, atol=1e-9, rtol=0)
        torch.testing.assert_close(ub, hi, atol=1e-9, rtol=0)
    # IBP is exact only when a single non-elementwise layer mixes the box; with two it is strictly looser
    lb, ub = ibp_bounds(model, x, eps)
    assert (lb <= lo + 1e-9).all() and (ub >= hi - 1e-9).all()
    assert (lo - lb).max() > 1e-3


def test_ibp_is_exact_with_one_affine_layer_and_with_the_spec_folded_in():
    model = affine_net(1, single=True)
    x = random_images(2, 3, 8)
    lo, hi = exact_affine_range(model, x, 0.1)
    lb, ub = ibp_bounds(model, x, 0.1)
    torch.testing.assert_close(lb, lo, atol=1e-9, rtol=0)
    torch.testing.assert_close(ub, hi, atol=1e-9, rtol=0)
    # C folded into the last Linear (elision): C W is again one affine layer, so the margins are exact too
    C = margin_spec(torch.tensor([0, 1, 3]), 4).double()
    spec_model = lambda z: torch.einsum("mk,bk->bm", C[0], model(z))
    lo_c, hi_c = exact_affine_range(spec_model, x[:1], 0.1)
    lb, ub = ibp_bounds(model, x[:1], 0.1, C[:1])
    torch.testing.assert_close(lb, lo_c, atol=1e-9, rtol=0)
    torch.testing.assert_close(ub, hi_c, atol=1e-9, rtol=0)


def test_eps_zero_gives_the_output():
    model = random_net(5, 8, [(3, 4, 2)], 8, 5)
    x = random_images(6, 4, 8)
    C = margin_spec(torch.tensor([0, 1, 2, 4]), 5).double()
    out = model(x).detach()
    for name, method in METHODS.items():
        lb, ub = method(model, x, 0.0, None)
        torch.testing.assert_close(lb, out, atol=1e-10, rtol=0, msg=name)
        torch.testing.assert_close(ub, out, atol=1e-10, rtol=0, msg=name)
        lb, ub = method(model, x, 0.0, C)
        torch.testing.assert_close(lb, torch.einsum("bmk,bk->bm", C, out), atol=1e-10, rtol=0, msg=name)


# ------------------------------------------------------------------------------------------- tightness
def scalar_net(w1, b1, w2) -> nn.Sequential:
    """1-pixel input: Flatten, Linear(1, h), ReLU, Linear(h, 1) with the given weights."""
    h = len(w1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(1, h), nn.ReLU(), nn.Linear(h, 1, bias=False)).double()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor(w1, dtype=torch.float64).view(h, 1))
        model[1].bias.copy_(torch.tensor(b1, dtype=torch.float64))
        model[3].weight.copy_(torch.tensor(w2, dtype=torch.float64).view(1, h))
    return model


def test_neither_crown_nor_ibp_is_always_tighter():
    """One hidden ReLU layer already shows both orders, so no ordering is asserted in general."""
    x = torch.full((1, 1, 1, 1), 0.5, dtype=torch.float64)
    # z = 3x - 1 in [-1, 2] on x in [0, 1]: CROWN's lower line relu(z) >= z (u >= -l) gives -1, IBP gives 0
    model = scalar_net([3.0], [-1.0], [1.0])
    ibp_lb = ibp_bounds(model, x, 0.5)[0]
    crown_lb = crown_bounds(model, x, 0.5)[0]
    assert torch.allclose(ibp_lb, torch.zeros(1, 1, dtype=torch.float64))
    assert torch.allclose(crown_lb, -torch.ones(1, 1, dtype=torch.float64))
    # two always-active neurons that cancel: output 0; CROWN sees the cancellation, IBP gives [-1, 1]
    model = scalar_net([1.0, 1.0], [1.0, 1.0], [1.0, -1.0])
    lb, ub = crown_bounds(model, x, 0.5)
    assert torch.allclose(lb, torch.zeros_like(lb)) and torch.allclose(ub, torch.zeros_like(ub))
    lb, ub = ibp_bounds(model, x, 0.5)
    assert torch.allclose(lb, -torch.ones_like(lb)) and torch.allclose(ub, torch.ones_like(ub))


@settings(max_examples=25, deadline=None)
@given(size=st.integers(5, 11), k=st.integers(1, 4), stride=st.integers(1, 3), padding=st.integers(0, 2),
       dilation=st.integers(1, 2), groups=st.sampled_from([1, 2]), seed=st.integers(0, 1000))
def test_conv_backward_rule_is_the_adjoint(size, k, stride, padding, dilation, groups, seed):
    """<A, conv(z)> = <A', z> + b' for every shape, stride and padding (output_padding restores the lost rows)."""
    if size + 2 * padding < dilation * (k - 1) + 1:
        return
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        conv = nn.Conv2d(2, 4, k, stride=stride, padding=padding, dilation=dilation, groups=groups).double()
        z = torch.randn(3, 2, size, size, dtype=torch.float64)
        out = conv(z)
        A = torch.randn(3, 5, *out.shape[1:], dtype=torch.float64)
    A_in, bias = rule_for(conv).backward(conv, A, tuple(z.shape[1:]), None)
    assert A_in.shape == (3, 5, *z.shape[1:])
    torch.testing.assert_close(torch.einsum("bs...,b...->bs", A, out),
                               torch.einsum("bs...,b...->bs", A_in, z) + bias)
    lo, hi = rule_for(conv).interval(conv, z - 0.1, z + 0.1)
    assert (lo <= out + 1e-12).all() and (out <= hi + 1e-12).all()


def test_relu_relaxation_lines_bracket_relu():
    lo = torch.tensor([-2.0, -1.0, 0.5, -3.0, -1.0])
    hi = torch.tensor([1.0, 3.0, 2.0, -0.5, 1.0])
    a_lo, a_up, b_up = bound_rules.relu_relaxation(lo, hi)
    assert a_lo.tolist() == [0.0, 1.0, 1.0, 0.0, 1.0]  # adaptive: 1 iff u >= -l; stable neurons exact
    z = lo[None] + torch.rand(1000, 5) * (hi - lo)[None]
    assert (a_lo * z <= F.relu(z) + 1e-6).all()
    assert (F.relu(z) <= a_up * z + b_up + 1e-6).all()


# ------------------------------------------------------------------------------------------- gradients
def test_gradients_exist_for_x_and_parameters():
    model = random_net(7, 8, [(3, 3, 1), (2, 4, 2)], 6, 4, dtype=torch.float32)
    x = random_images(8, 3, 8, dtype=torch.float32)
    C = margin_spec(torch.tensor([0, 1, 3]), 4)
    calls = {**METHODS, "mix": lambda m, x, eps, C: crown_ibp_bounds(m, x, eps, C, 0.5)}
    for name, method in calls.items():
        model.zero_grad()
        xg = x.clone().requires_grad_(True)
        lb, _ = method(model, xg, 0.05, C)
        lb.sum().backward()
        assert xg.grad is not None and torch.isfinite(xg.grad).all(), name
        assert xg.grad.abs().sum() > 0, name
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name
        assert sum(g.abs().sum() for g in grads) > 0, name


def _pre_activation_bounds(model, x, eps, method):
    """Bounds at every ReLU input, from the same method applied to the prefix of the network."""
    out = []
    for i, layer in enumerate(model):
        if isinstance(layer, nn.ReLU):
            out.append(METHODS[method](model[:i], x, eps, None))
    return out


@pytest.mark.parametrize("method", ["crown", "crown-ibp", "ibp"])
def test_lower_bound_gradient_matches_finite_differences(method):
    model = random_net(11, 8, [(2, 3, 2)], 5, 3)
    for seed in range(20):  # pick a point whose pre-activation bounds stay away from the ReLU kinks
        x = 0.3 + 0.4 * random_images(seed, 1, 8)
        kinks = [torch.stack([lo.abs(), hi.abs(), (hi + lo).abs()]).min()
                 for lo, hi in _pre_activation_bounds(model, x, 0.03, method)]
        if min(kinks) > 1e-4:
            break
    else:
        pytest.fail("no test point away from the ReLU kinks")
    f = lambda z: METHODS[method](model, z, 0.03, None)[0]
    assert torch.autograd.gradcheck(f, (x.clone().requires_grad_(True),), eps=1e-7, atol=1e-6)


# ------------------------------------------------------------------------------------------- CROWN-IBP mix & loss
def test_crown_ibp_bounds_mix_and_loss_formula():
    model = random_net(12, 8, [(3, 4, 2)], 6, 4)
    x = random_images(13, 5, 8)
    y = torch.tensor([0, 1, 2, 3, 0])
    C = margin_spec(y, 4).double()
    ibp_lb, _ = ibp_bounds(model, x, 0.05, C)
    cibp_lb, _ = crown_bounds(model, x, 0.05, C, intermediate="ibp")
    assert not torch.allclose(ibp_lb, cibp_lb)
    for beta in (0.0, 0.3, 1.0):
        lb, ub = crown_ibp_bounds(model, x, 0.05, C, beta)
        torch.testing.assert_close(lb, beta * cibp_lb + (1 - beta) * ibp_lb)
        loss = crown_ibp_training_loss(model, x, y, 0.05, beta)
        expected = F.cross_entropy(torch.cat([torch.zeros(5, 1, dtype=lb.dtype), -lb], 1), torch.zeros(5).long())
        torch.testing.assert_close(loss, expected)
    lb, ub = crown_ibp_bounds(model, x, 0.05, C, 0.5, upper=False)
    assert ub is None


def test_crown_ibp_training_loss_decreases_under_adam():
    model = random_net(14, 8, [(4, 3, 2)], 16, 3, dtype=torch.float32)
    x = random_images(15, 24, 8, dtype=torch.float32)
    y = torch.arange(24) % 3
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    losses = []
    for step in range(40):
        loss = crown_ibp_training_loss(model, x, y, 0.02, beta=1.0 - step / 40)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.7 * losses[0]


# ------------------------------------------------------------------------------------------- specs & errors
def _regulariser_boxes(relu_inputs):
    """Boxes for Flatten, Linear, ReLU, (Linear, ReLU,) ... : an input box of radius 0.1, then the given ReLU inputs."""
    layers, boxes = [nn.Flatten()], [(torch.zeros(1, 4), torch.full((1, 4), 0.2))] * 2
    for lo, hi in relu_inputs:
        layers += [nn.Linear(4, 4), nn.ReLU()]
        boxes += [(torch.tensor([lo]), torch.tensor([hi])), (torch.zeros(1, 4), torch.ones(1, 4))]
    return layers + [nn.Linear(4, 2)], boxes


def test_warmup_regularizer_by_hand():
    """Shi et al. 2021's L_tightness + L_relu (tol 0.5) on boxes small enough to check on paper."""
    # radii 0.2, 0.2, 0.2, 0.4: the input's 0.1 over their mean 0.25 is 0.4 < 0.5, so L_tightness = 0.1 / 0.5;
    # centres 0.3, 0.5 (active) and -0.3, -0.5 (inactive) are balanced in mean and spread: L_relu = 0
    grown = ([0.1, 0.3, -0.5, -0.9], [0.5, 0.7, -0.1, -0.1])
    # radii 0.2, 0.2, 0.05, 0.05: ratio 0.8, L_tightness = 0; means of the centres 0.8 / 4 and -0.2 / 4, ratio 1/4,
    # so (0.5 - 0.25) / 0.5 = 0.5; spreads about the mean centre 0.15: 0.0225 + 0.1225 against 2 x 0.0625, fine
    unbalanced = ([0.1, 0.3, -0.15, -0.15], [0.5, 0.7, -0.05, -0.05])
    for relu_inputs, expected in [([grown], 0.2), ([unbalanced], 0.5), ([grown, unbalanced], 0.35)]:
        layers, boxes = _regulariser_boxes(relu_inputs)
        assert float(bd.warmup_regularizer(layers, boxes)) == pytest.approx(expected, abs=1e-6)
    # without a stably inactive (or a stably active) neuron the balance ratios are undefined and skipped, not NaN,
    # and no NaN reaches the gradient
    for lo, hi in [([0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]), ([-0.5, -0.6, -0.7, -0.8], [-0.1, -0.2, -0.3, -0.4])]:
        layers, boxes = _regulariser_boxes([(lo, hi)])
        boxes[2] = tuple(t.requires_grad_(True) for t in boxes[2])
        reg = bd.warmup_regularizer(layers, boxes)
        assert float(reg.detach()) == pytest.approx(0.0, abs=1e-6)
        reg.backward()
        assert all(torch.isfinite(t.grad).all() for t in boxes[2])
    # a net without a ReLU (only Flatten here) has nothing to regularise
    box = (torch.zeros(1, 4), torch.full((1, 4), 0.2))
    assert float(bd.warmup_regularizer([nn.Flatten()], [box, box])) == 0.0


def test_training_loss_adds_the_weighted_regularizer():
    model = random_net(11, 8, [(3, 3, 1), (2, 4, 2)], 6, 4, dtype=torch.float32)
    x, y = random_images(12, 5, 8, dtype=torch.float32), torch.tensor([0, 1, 2, 3, 0])
    p = bd.prepare(model, x, 0.05)
    reg = bd.warmup_regularizer(p.layers, bd._ibp_forward(p))
    assert float(reg.detach()) > 0
    plain = crown_ibp_training_loss(model, x, y, 0.05, 0.5)
    with_reg = crown_ibp_training_loss(model, x, y, 0.05, 0.5, regularizer=0.3)
    assert float(with_reg.detach()) == pytest.approx(float(plain.detach()) + 0.3 * float(reg.detach()), rel=1e-5)
    with_reg.backward()
    assert all(torch.isfinite(q.grad).all() for q in model.parameters())
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="regularizer"):
            crown_ibp_training_loss(model, x, y, 0.05, 0.5, regularizer=bad)


def test_margin_spec_rows():
    y = torch.tensor([0, 2, 3])
    C = margin_spec(y, 4)
    assert C.shape == (3, 3, 4)
    z = torch.randn(3, 4)
    margins = torch.einsum("bmk,bk->bm", C, z)
    for b in range(3):
        others = [j for j in range(4) if j != y[b]]
        torch.testing.assert_close(margins[b], z[b, y[b]] - z[b, others])
    t = torch.tensor([1, 1, 0])
    Ct = margin_spec(y, 4, target=t)
    torch.testing.assert_close(torch.einsum("bmk,bk->bm", Ct, z)[2], z[2, 0] - z[2, 1:])


def test_verified_error_pgd_error_and_table():
    model = random_net(16, 32, [(2, 4, 2)], 0, 10, dtype=torch.float32)
    g = torch.Generator().manual_seed(17)
    x = torch.rand(12, 3, 32, 32, generator=g)
    with torch.no_grad():
        pred = model(x).argmax(1)
    y = torch.where(torch.arange(12) < 8, pred, (pred + 1) % 10)  # 8 correct, 4 wrong
    clean = 4 / 12
    for method in ("ibp", "crown-ibp", "crown"):
        assert verified_error(model, x, y, 0.0, method=method, device="cpu") == pytest.approx(clean)
        v = verified_error(model, x, y, 0.01, method=method, batch_size=5, device="cpu")
        assert clean <= v <= 1.0
        ok = certified(model, x, y, 0.01, method=method, device="cpu")
        assert v == pytest.approx(float((~ok | (pred != y)).float().mean()))
    p = pgd_error(model, x, y, 0.01, steps=10)
    assert clean <= p <= verified_error(model, x, y, 0.01, method="crown", device="cpu")
    table = error_table(model, x, y, 0.01, device="cpu", batch_size=7)
    assert set(table) == {"clean_error", "ibp_verified_error", "crown_ibp_verified_error", "pgd_error",
                          "verified_error"}
    assert table["clean_error"] == pytest.approx(clean)
    # tightest sound verdict: an image counts as verified when either method certifies it
    ok = certified(model, x, y, 0.01, "ibp", device="cpu") | certified(model, x, y, 0.01, "crown-ibp", device="cpu")
    assert table["verified_error"] == pytest.approx(float((~ok | (pred != y)).float().mean()))
    assert table["verified_error"] <= min(table["ibp_verified_error"], table["crown_ibp_verified_error"])
    assert table["pgd_error"] <= table["verified_error"]


# ------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("layer", [nn.Tanh(), nn.AvgPool2d(2), nn.MaxPool2d(2)])
def test_unsupported_layer_is_named(layer):
    model = nn.Sequential(Normalize(), layer, nn.Flatten(), nn.Linear(1, 3))
    with pytest.raises((TypeError, ValueError), match=type(layer).__name__) as info:
        ibp_bounds(model, torch.rand(1, 3, 8, 8), 0.1)
    assert "Conv2d" in str(info.value) and "ReLU" in str(info.value)  # lists the supported layers
    with pytest.raises((TypeError, ValueError), match=type(layer).__name__):
        crown_bounds(model, torch.rand(1, 3, 8, 8), 0.1)


def test_batch_norm_without_running_statistics_is_rejected():
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.BatchNorm2d(2, track_running_stats=False), nn.ReLU())
    with pytest.raises(TypeError, match="layer 1 \\(BatchNorm2d\\) must track running statistics"):
        ibp_bounds(model, torch.rand(1, 3, 8, 8), 0.1)


def test_certifying_a_batch_norm_model_in_training_mode_is_rejected():
    model = random_net(5, 8, [(2, 3, 1)], 4, 3, dtype=torch.float32, batch_norm=True).train()
    x, y = random_images(6, 4, 8, dtype=torch.float32), torch.tensor([0, 1, 2, 0])
    for fn in (certified, verified_error, error_table):
        with pytest.raises(ValueError, match="model.eval\\(\\)"):
            fn(model, x, y, 0.01)
    assert certified(model.eval(), x, y, 0.0).shape == (4,)  # eval mode is accepted


def test_training_mode_bounds_hold_the_clean_batch_statistics_fixed():
    """In training mode a batch norm normalises with the clean batch's statistics, and the bounds use the same ones
    (Shi et al. 2021): they equal the bounds of the eval-mode copy whose running statistics are those."""
    model = random_net(9, 8, [(3, 3, 1), (2, 4, 2)], 6, 4, batch_norm=True).train()
    norms = [m for m in model if isinstance(m, bound_rules.BATCH_NORMS)]
    x = random_images(10, 6, 8)
    inputs = {}
    hooks = [bn.register_forward_hook(lambda m, inp, out: inputs.__setitem__(m, inp[0].detach())) for bn in norms]
    out = model(x).detach()  # the training-mode forward pass
    for h in hooks:
        h.remove()
    running = [(bn.running_mean.clone(), bn.running_var.clone()) for bn in norms]
    frozen = copy.deepcopy(model).eval()
    for bn, twin in zip(norms, [m for m in frozen if isinstance(m, bound_rules.BATCH_NORMS)]):
        z = inputs[bn]
        dims = [0, *range(2, z.dim())]
        twin.running_mean.copy_(z.mean(dims))
        twin.running_var.copy_(z.var(dims, unbiased=False))
    C = margin_spec(torch.tensor([0, 1, 2, 3, 0, 1]), 4).double()
    for name, method in METHODS.items():
        lb, ub = method(model, x, 0.0, None)
        torch.testing.assert_close(lb, out, atol=1e-10, rtol=0, msg=name)
        torch.testing.assert_close(ub, out, atol=1e-10, rtol=0, msg=name)
        lb, ub = method(model, x, 0.05, C)
        lb_f, ub_f = method(frozen, x, 0.05, C)
        torch.testing.assert_close(lb, lb_f, atol=1e-9, rtol=1e-9, msg=name)
        torch.testing.assert_close(ub, ub_f, atol=1e-9, rtol=1e-9, msg=name)
        assert_sound(frozen, x, 0.05, C, lb, ub, n_random=200, name=f"{name} training mode")
    for bn, (mean, var) in zip(norms, running):  # bounds do not touch the running statistics
        assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
    loss = crown_ibp_training_loss(model, x, torch.tensor([0, 1, 2, 3, 0, 1]), 0.05, 0.5)
    loss.backward()
    assert all(bn.weight.grad is not None and bn.weight.grad.abs().sum() > 0 for bn in norms)


def test_non_sequential_model_is_rejected():
    class Net(nn.Module):
        def forward(self, x):
            return x.flatten(1)

    with pytest.raises(TypeError, match="Sequential"):
        crown_bounds(Net(), torch.rand(1, 3, 8, 8), 0.1)


def test_bad_inputs_name_the_parameter():
    model = random_net(18, 8, [(2, 3, 1)], 0, 4, dtype=torch.float32)
    x = torch.rand(2, 3, 8, 8)
    y = torch.tensor([0, 3])
    C = margin_spec(y, 4)
    cases = [
        (lambda: ibp_bounds(model, x, -0.1), "eps"),
        (lambda: crown_bounds(model, x, float("nan")), "eps"),
        (lambda: ibp_bounds(model, x * 2, 0.1), "x"),
        (lambda: ibp_bounds(model, x - 0.5, 0.1), "x"),
        (lambda: crown_bounds(model, torch.where(x > 0.5, float("nan"), x), 0.1), "x contains NaN"),
        (lambda: ibp_bounds(model, torch.rand(2, 3, 12, 12), 0.1), "x"),
        (lambda: ibp_bounds(model, torch.rand(3, 8, 8), 0.1), "x"),
        (lambda: ibp_bounds(model, x, 0.1, C[:1]), "C"),
        (lambda: crown_bounds(model, x, 0.1, torch.ones(2, 3, 5)), "C"),
        (lambda: crown_bounds(model, x, 0.1, intermediate="deeppoly"), "intermediate"),
        (lambda: crown_ibp_bounds(model, x, 0.1, C, 1.5), "beta"),
        (lambda: crown_ibp_bounds(model, x, 0.1, C, -0.1), "beta"),
        (lambda: crown_ibp_training_loss(model, x, y, 0.1, float("nan")), "beta"),
        (lambda: crown_ibp_training_loss(model, x, torch.tensor([0, 4]), 0.1, 0.5), "y"),
        (lambda: crown_ibp_training_loss(model, x, torch.tensor([0]), 0.1, 0.5), "y"),
        (lambda: margin_spec(torch.tensor([0, 5]), 4), "y"),
        (lambda: margin_spec(torch.tensor([0.0, 1.0]), 4), "y"),
        (lambda: margin_spec(y, 1), "num_classes"),
        (lambda: margin_spec(y, 4, target=torch.tensor([4, 0])), "target"),
        (lambda: margin_spec(y, 4, target=torch.tensor([1])), "target"),
        (lambda: verified_error(model, x, y, 0.1, method="zono", device="cpu"), "method"),
        (lambda: verified_error(model, x, y, 0.1, batch_size=0, device="cpu"), "batch_size"),
        (lambda: verified_error(model, x, torch.tensor([0, 9]), 0.1, device="cpu"), "y"),
        (lambda: certified(model, x, torch.tensor([1]), 0.1, device="cpu"), "labels"),
    ]
    for i, (call, name) in enumerate(cases):
        with pytest.raises(ValueError, match=name):
            call()
            pytest.fail(f"case {i} ({name}) did not raise")


def test_certified_margins_are_the_larger_of_crown_ibp_and_ibp():
    from shadowlab.certify.bounds import certified_margins, crown_bounds, ibp_bounds, margin_spec
    from shadowlab.models import build

    torch.manual_seed(0)
    model = build("cnn-2layer", width=1, linear_size=16).eval()
    x, y = torch.rand(3, 3, 32, 32), torch.tensor([1, 4, 7])
    C = margin_spec(y, 10)
    both = torch.stack([ibp_bounds(model, x, 0.01, C=C)[0],
                        crown_bounds(model, x, 0.01, C=C, intermediate="ibp", upper=False)[0]])
    assert torch.equal(certified_margins(model, x, 0.01, C), both.max(0).values)
    torch.testing.assert_close(certified_margins(model, x, 0.01, C, batch_size=2), both.max(0).values)   # batches
    with pytest.raises(ValueError, match="C must have shape 3 x M x K"):
        certified_margins(model, x, 0.01, C[:2])


# ------------------------------------------------------------------------------------------- work and memory
def _saved_elements(fn) -> int:
    """Elements of every tensor autograd saves for the backward pass while fn runs (what the graph keeps alive)."""
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved)


def test_full_crown_keeps_no_intermediate_graph_and_stays_differentiable():
    """Full CROWN's pre-activation bounds are computed without autograd: with parameters that require grad (any
    loaded checkpoint) the graph holds no more than CROWN-IBP's single pass, instead of every identity chunk."""
    model = random_net(11, 8, [(4, 3, 1), (4, 3, 2)], 16, 5)
    x = random_images(12, 2, 8)
    C = margin_spec(torch.tensor([0, 3]), 5).double()
    crown = _saved_elements(lambda: crown_bounds(model, x, 0.02, C, upper=False))
    crown_ibp = _saved_elements(lambda: crown_bounds(model, x, 0.02, C, intermediate="ibp", upper=False))
    with bd.count_work() as work:
        crown_bounds(model, x, 0.02, C, upper=False)
    assert work.coefficients > 5 * crown                    # far more was propagated than the graph keeps
    assert crown <= 2 * crown_ibp
    lb = crown_bounds(model, x, 0.02, C, upper=False)[0]
    with torch.no_grad():
        lb_no_grad = crown_bounds(model, x, 0.02, C, upper=False)[0]
    assert torch.equal(lb.detach(), lb_no_grad)
    lb.sum().backward()                                      # still differentiable in the parameters
    assert model[-1].weight.grad is not None and model[-1].weight.grad.abs().sum() > 0


def test_count_work_counts_each_method_deterministically():
    model = random_net(13, 8, [(4, 3, 1)], 12, 4)
    x = random_images(14, 3, 8)
    C = margin_spec(torch.tensor([0, 1, 2]), 4).double()
    counts = {}
    for method in bd.METHODS:
        with bd.count_work() as work:
            bd.lower_bounds(model, x, 0.01, C, method)
        with bd.count_work() as again:
            bd.lower_bounds(model, x, 0.01, C, method)
        assert again == work
        counts[method] = work
    assert counts["ibp"].backward_passes == 0 and counts["ibp"].coefficients == 0
    assert counts["ibp"].interval_elements > 0
    assert counts["crown-ibp"].backward_passes == 1
    # full CROWN: one backward pass per chunk of every hidden layer whose box IBP cannot give exactly (the second
    # ReLU here), plus the final pass
    assert counts["crown"].backward_passes >= 2 and counts["crown"].coefficients > counts["crown-ibp"].coefficients
    with bd.count_work() as outer, bd.count_work() as inner:
        bd.lower_bounds(model, x, 0.01, C, "crown-ibp")
    assert outer == inner == counts["crown-ibp"]
    assert not bd._COUNTERS                                  # the counters are removed on exit
    for method in bd.METHODS:                                # lower_bounds is the bound each method gives
        ref = METHODS[method](model, x, 0.01, C)[0]
        assert torch.allclose(bd.lower_bounds(model, x, 0.01, C, method), ref)
    with pytest.raises(ValueError, match="method='alpha'"):
        bd.lower_bounds(model, x, 0.01, C, "alpha")
