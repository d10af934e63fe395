"""auto_LiRPA (Xu et al. 2020) as an optional bound backend, next to shadowlab's own ``bounds.py``.

A thin adapter: it builds an auto_LiRPA ``BoundedModule`` of the same model and returns margin bounds in the
result types of ``bounds.py`` (``(lower, upper or None)`` tensors of shape B x M, a bool tensor per image for
``certified``). The input set is the same: the L-inf ball of radius eps around x clipped to [0, 1].

Methods (``METHODS``): ``ibp``, ``crown-ibp`` and ``crown`` are the bounds shadowlab computes itself;
``alpha-crown`` is auto_LiRPA's "CROWN-Optimized" (Xu et al. 2021), which tunes the lower slope of every unstable
ReLU by gradient ascent on the bound, starting from CROWN's slopes and keeping the best bound seen, so its lower
bounds are never below CROWN's computed with the same intermediate bounds.

auto_LiRPA is optional: ``make lirpa`` installs it (upstream commit a050a3d, version 0.7.1; PyPI's 0.3 does not
import on torch 2.x). Without it every function here raises ``LirpaUnavailableError`` naming that command.

``EXACT_OPTS`` switch off auto_LiRPA's sparse intermediate bounds (where a neuron IBP already proves stable keeps
its IBP box instead of a CROWN box): with them auto_LiRPA's IBP, CROWN-IBP and CROWN bounds are shadowlab's to
rounding (``tests/test_lirpa.py``). With ``DEFAULT_OPTS`` (sparse intermediate bounds on) its full CROWN can differ
slightly from shadowlab's; both are sound.

Measured with auto_LiRPA 0.7.1 on torch 2.14.1 (CPU): out of the box alpha-CROWN's gradient with respect to its
slopes is exactly zero (its slopes start at 0 or 1, and torch's clamp now has gradient 0 at its bounds), so its
optimisation never moves; ``_alpha_crown`` starts the slopes just inside (0, 1) instead, and then alpha-CROWN
tightens CROWN (``tests/test_lirpa.py::test_alpha_crown_improves_on_crown_and_stays_sound``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from shadowlab import validate
from shadowlab.certify.bounds import check_inputs, check_spec, margin_rows

INSTALL_COMMAND = "make lirpa"
INSTALL_HINT = (f"auto_LiRPA is not installed; install it with `{INSTALL_COMMAND}` (from $AUTO_LIRPA_WHEEL when set, "
                "else pip install --no-deps \"auto_LiRPA @ git+https://github.com/Verified-Intelligence/auto_LiRPA"
                "@a050a3d\" graphviz appdirs pyyaml packaging)")
METHODS: dict[str, str] = {"ibp": "IBP", "crown-ibp": "CROWN-IBP", "crown": "CROWN", "alpha-crown": "CROWN-Optimized"}
# auto_LiRPA's default "patches" convolution mode fails with a shape error on some nets and inputs (measured: a 2-conv
# net on 8 x 8 images without batch norm, and crownibp-cnn-2layer-eps2 on Table 2 shadow images), so the adapter
# uses the dense "matrix" mode unless told otherwise
DEFAULT_OPTS: dict[str, Any] = {"conv_mode": "matrix"}
EXACT_OPTS: dict[str, Any] = {"sparse_intermediate_bounds": False, "sparse_conv_intermediate_bounds": False,
                              "conv_mode": "matrix"}
ALPHA_ITERATIONS = 20  # auto_LiRPA's default number of alpha-CROWN optimisation steps
SLOPE_MARGIN = 0.01    # alpha-CROWN's lower ReLU slopes start this far inside [0, 1] (see _alpha_crown)


class LirpaUnavailableError(ImportError):
    """auto_LiRPA is not installed (or fails to import); the message names the install command."""


def available() -> bool:
    """True when auto_LiRPA imports; never raises."""
    try:
        _import()
    except LirpaUnavailableError:
        return False
    return True


def _import() -> Any:
    cpp_log = logging.getLogger("torch.utils.cpp_extension")   # "No CUDA runtime is found" on CPU machines
    level = cpp_log.level
    try:
        # auto_LiRPA's import sets its own warning filter ("once"), so an "ignore" filter alone does not silence its
        # torch.jit deprecations: the catch_warnings block drops what is shown instead (and restores both on exit)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warnings.showwarning = lambda *args, **kwargs: None
            cpp_log.setLevel(logging.ERROR)
            import auto_LiRPA  # optional dependency (auto_LiRPA)
    except Exception as err:  # ImportError, or an incompatible version failing at import time
        raise LirpaUnavailableError(f"{INSTALL_HINT} ({type(err).__name__}: {err})") from None
    finally:
        cpp_log.setLevel(level)
    return auto_LiRPA


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"method={method!r} is unknown for backend auto_lirpa; accepted: {', '.join(METHODS)}")
    return METHODS[method]


def bounded_module(model: nn.Module, x: Tensor, bound_opts: dict[str, Any] | None = None,
                   alpha_iterations: int = ALPHA_ITERATIONS) -> Any:
    """An auto_LiRPA ``BoundedModule`` of ``model`` (in its current mode) traced on ``x`` (N x C x H x W).

    ``bound_opts`` are auto_LiRPA's options (default ``DEFAULT_OPTS``; ``EXACT_OPTS`` match shadowlab's bounds
    exactly); ``alpha_iterations`` >= 1 sets the number of
    alpha-CROWN steps. The module holds the model's weights as they are now: build a new one after training.
    """
    lirpa = _import()
    if isinstance(alpha_iterations, bool) or not isinstance(alpha_iterations, int) or alpha_iterations < 1:
        raise ValueError(f"alpha_iterations={alpha_iterations!r} must be an integer >= 1")
    opts = dict(DEFAULT_OPTS if bound_opts is None else bound_opts)
    opts["optimize_bound_args"] = {"iteration": alpha_iterations, **opts.get("optimize_bound_args", {})}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lirpa.BoundedModule(model, torch.zeros_like(x[:1]), bound_opts=opts, device=x.device, verbose=False)


def lirpa_bounds(model: nn.Module, x: Tensor, eps: float, C: Tensor | None = None, method: str = "crown",
                 upper: bool = True, bound_opts: dict[str, Any] | None = None,
                 alpha_iterations: int = ALPHA_ITERATIONS, module: Any = None) -> tuple[Tensor, Tensor | None]:
    """auto_LiRPA bounds on C z (or on the logits z without C) over the L-inf ball of radius eps around x in [0, 1].

    Same contract as ``bounds.crown_bounds``: x is B x C x H x W in [0, 1], C is B x M x K, returns (lower,
    upper) of shape B x M, upper None when ``upper=False``. ``method`` is a key of ``METHODS``; for "alpha-crown"
    gradients are enabled internally (the bounds come back detached). ``module`` reuses a ``bounded_module``.
    Example: ``lirpa_bounds(model, x, 2 / 255, margin_spec(y, 10), "alpha-crown", upper=False)[0]``.
    """
    name = _check_method(method)
    lirpa = _import()
    validate.images(x, "x", ndim=None)
    eps = validate.eps(eps)
    if C is not None:
        check_spec(C, x.shape[0])
        C = C.to(device=x.device, dtype=x.dtype)
    module = module if module is not None else bounded_module(model, x, bound_opts, alpha_iterations)
    # the same input set as bounds.py: the eps-ball clipped to the image box
    ptb = lirpa.PerturbationLpNorm(norm=float("inf"), eps=eps, x_L=(x - eps).clamp(0, 1), x_U=(x + eps).clamp(0, 1))
    bx = lirpa.BoundedTensor(x, ptb)
    grad = torch.enable_grad() if name == "CROWN-Optimized" else torch.no_grad()
    # auto_LiRPA prints its early-stop notes and warns about constant operands with a batch dimension (Normalize);
    # some of its tensors are made in the default dtype, which must be x's (float64 runs)
    with grad, warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _default_dtype(x.dtype):
        warnings.simplefilter("ignore")
        if name != "CROWN-Optimized":
            lb, ub = module.compute_bounds(x=(bx,), C=C, method=name, bound_upper=upper)
        else:
            lb, ub = _alpha_crown(module, bx, C, upper)
    return lb.detach(), (ub.detach() if upper else None)


def _alpha_crown(module: Any, bx: Any, C: Tensor | None, upper: bool) -> tuple[Tensor, Tensor | None]:
    """alpha-CROWN from slopes started just inside (0, 1), never looser than CROWN.

    Written here, not left to auto_LiRPA, because of a measured incompatibility: auto_LiRPA 0.7.1 starts every lower
    ReLU slope at exactly 0 or 1 (CROWN's choice) and clamps the slopes to [0, 1] in the bound, and on torch 2.14
    the gradient of clamp at its bounds is 0 (it was 1 in older versions), so the optimisation never moves and
    returns CROWN's bound. auto_LiRPA's own ``init_alpha`` sets the slopes up, they are moved SLOPE_MARGIN inside
    [0, 1], and the optimisation starts from there with ``init_alpha`` off. The elementwise max with CROWN's lower
    bound (min of the upper bounds) is returned: both are sound, so the result is too, and at least as tight.
    """
    module.init_alpha((bx,), share_alphas=module.bound_opts["optimize_bound_args"].get("use_shared_alpha", False),
                      method="backward", c=C)
    for node in module.get_enabled_opt_act():
        for slopes in getattr(node, "alpha", {}).values():
            slopes.data.clamp_(SLOPE_MARGIN, 1.0 - SLOPE_MARGIN)
    init = module.bound_opts["optimize_bound_args"].get("init_alpha", True)
    module.set_bound_opts({"optimize_bound_args": {"init_alpha": False}})
    try:
        lb, ub = module.compute_bounds(x=(bx,), C=C, method="CROWN-Optimized", bound_upper=upper)
    finally:
        module.set_bound_opts({"optimize_bound_args": {"init_alpha": init}})
    with torch.no_grad():
        crown_lb, crown_ub = module.compute_bounds(x=(bx,), C=C, method="CROWN", bound_upper=upper)
    return torch.maximum(lb.detach(), crown_lb), (torch.minimum(ub.detach(), crown_ub) if upper else None)


def certified(model: nn.Module, x: Tensor, labels: Tensor, eps: float, method: str = "crown-ibp",
              batch_size: int = 256, device: torch.device | str | None = None,
              bound_opts: dict[str, Any] | None = None, alpha_iterations: int = ALPHA_ITERATIONS) -> Tensor:
    """Bool per image (on the device): every margin z_label - z_j has an auto_LiRPA lower bound >= 0 at eps.

    Same contract as ``verify.certified`` (x N x C x H x W in [0, 1], labels N, model in eval mode), plus the
    method "alpha-crown"; the model may be any network auto_LiRPA traces (e.g. a ResNet), not only the
    nn.Sequential that shadowlab's bounds take. Example:
    ``certified(model, x, y, 8 / 255, "alpha-crown", batch_size=16)``.
    """
    _check_method(method)
    _import()
    eps, device = check_inputs(model, x, eps, batch_size, device)
    with torch.no_grad():   # any traced model (a ResNet too): its output size from a forward pass
        k = model(x[:1].to(device)).shape[1]
    validate.labels(labels, x.shape[0], "labels", k)
    module = bounded_module(model, x[:1].to(device), bound_opts, alpha_iterations)
    out = []
    for i in range(0, len(x), batch_size):
        xb, lab = x[i:i + batch_size].to(device), labels[i:i + batch_size].to(device)
        lb, _ = lirpa_bounds(model, xb, eps, margin_rows(lab, k).to(xb.dtype), method, upper=False, module=module)
        out.append((lb >= 0).all(1))
    return torch.cat(out)
