"""Bound propagation: IBP (Gowal et al. 2018), CROWN (Zhang et al. 2018) and CROWN-IBP (Zhang et al. 2020).

The input set is the L-inf ball of radius eps around x intersected with the image box:
[x_L, x_U] = [clamp(x - eps, 0, 1), clamp(x + eps, 0, 1)]. A network is an ``nn.Sequential`` of supported layers,
each with one rule class of ``certify.rules`` (its interval and backward rules); this module composes them: IBP
forwards the boxes, CROWN goes backwards from a specification C (rows of linear functions of the logits), and
CROWN-IBP does CROWN's last pass on IBP's intermediate boxes. ``crown_ibp_training_loss`` is Zhang et al.'s
training objective; ``certified_margins`` the tightest sound bound the certifiably trained models are judged by.
Per-image verdicts (certified, verified error, PGD error) are ``verify``'s. Only lower bounds are propagated
backwards: an upper bound is minus the lower bound of the negated specification, ub(A . z) = -lb(-A . z).
Everything is differentiable in the parameters and in x (the CROWN-IBP loss and the Shadow Attack need both).

Why this module is long: IBP, CROWN, CROWN-IBP, the CROWN-IBP training loss and the box bounds of the authors'
procedure share one private problem type (``_Problem``) and its forward and backward passes; split apart, those
private passes would become a public API nobody else should call. The layer rules and the verdicts, which need
none of it, live in ``certify.rules`` and ``verify``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from shadowlab import validate
from shadowlab.certify.rules import (
    BATCH_NORMS,
    Interval,
    box_to_box,
    fixed_statistics,
    model_layers,
    needs_input_bounds,
    rule_of,
)
from shadowlab.models import Normalize, default_device

METHODS = ("ibp", "crown-ibp", "crown")
INTERMEDIATE = ("crown", "ibp")
CROWN_CHUNK_ELEMENTS = 2 ** 24  # memory budget (tensor elements) of one chunk of full-CROWN intermediate bounds


@dataclass
class Work:
    """What bound propagation did, counted from the propagation itself (see ``count_work``): deterministic, unlike
    seconds, whatever the machine's load, thread count or device.

    - ``interval_elements``: elements of the boxes the interval rules produced (2 per neuron and image, IBP);
    - ``backward_passes``: CROWN backward passes (one per chunk of linear functions bounded);
    - ``coefficients``: elements of the coefficient tensors A that the backward rules produced (CROWN).
    """

    interval_elements: int = 0
    backward_passes: int = 0
    coefficients: int = 0

    @property
    def elements(self) -> int:
        """All tensor elements propagated: interval_elements + coefficients."""
        return self.interval_elements + self.coefficients


_COUNTERS: list[Work] = []


@contextmanager
def count_work() -> Iterator[Work]:
    """Count the work of every bound computation inside the ``with`` block (nested blocks each count all of it).

    >>> with count_work() as work:
    ...     crown_bounds(model, x, eps)
    >>> work.backward_passes, work.coefficients
    """
    work = Work()
    _COUNTERS.append(work)
    try:
        yield work
    finally:
        _COUNTERS.remove(work)


# read-only views by layer type, as the rules were looked up before they became classes


# ------------------------------------------------------------------------------------------- model & inputs


# argument checks: shadowlab.validate (bound propagation also accepts N x D vectors, hence ndim=None)
def _check_x(x: Tensor) -> None:
    validate.images(x, "x", ndim=None)   # bound propagation also accepts N x D vectors, hence ndim=None


def check_spec(C: Any, n: int, k: int | None = None, finite: bool = True) -> None:
    """A specification: a real tensor of shape n x M x k (images x linear functions x model outputs; any k when
    None), without NaN or infinity (``finite``: one host synchronisation). ValueError naming C and what it needs."""
    if not isinstance(C, Tensor) or C.dim() != 3 or C.shape[0] != n or (k is not None and C.shape[2] != k):
        shape = tuple(C.shape) if isinstance(C, Tensor) else type(C).__name__
        raise ValueError(f"C must have shape {n} x M x {k if k is not None else 'K'} (images x specifications x "
                         f"model outputs), got {shape}")
    if finite:
        validate.finite(C, "C")


@dataclass
class _Problem:
    """A validated model and input box: layers, input shape of every layer (+ output shape), box, spec."""

    layers: list[nn.Module]
    shapes: list[tuple[int, ...]]
    xl: Tensor
    xu: Tensor
    C: Tensor | None

    @property
    def num_outputs(self) -> int:
        return math.prod(self.shapes[-1])


def _shapes(layers: list[nn.Module], x: Tensor) -> list[tuple[int, ...]]:
    z = x[:1].detach().clone()
    shapes = []
    with torch.no_grad():
        for i, layer in enumerate(layers):
            shapes.append(tuple(z.shape[1:]))
            if isinstance(layer, Normalize) and (z.dim() != 4 or z.shape[1] != layer.mean.shape[1]):
                raise ValueError(f"x of shape {tuple(x.shape)} does not fit layer {i} (Normalize): it needs "
                                 f"N x {layer.mean.shape[1]} x H x W")
            if isinstance(layer, BATCH_NORMS):  # keeps the shape; not run, so training mode keeps its statistics
                if z.dim() < 2 or z.shape[1] != layer.num_features:
                    raise ValueError(f"x of shape {tuple(x.shape)} does not fit layer {i} ({type(layer).__name__}): "
                                     f"it needs {layer.num_features} channels, got shape {tuple(z.shape)}")
                continue
            try:
                z = layer(z)
            except RuntimeError as err:
                raise ValueError(f"x of shape {tuple(x.shape)} does not fit layer {i} ({type(layer).__name__}): "
                                 f"{err}") from None
    shapes.append(tuple(z.shape[1:]))
    return shapes


def prepare(model: nn.Module, x: Tensor, eps: float, C: Tensor | None = None, check: bool = True) -> _Problem:
    if check:
        _check_x(x)
    eps = validate.eps(eps)
    return _prepare_box(model, x, (x - eps).clamp(0, 1), (x + eps).clamp(0, 1), C, check=check)


def _prepare_box(model: nn.Module, x: Tensor, lo: Tensor, hi: Tensor, C: Tensor | None,
                 check: bool = True) -> _Problem:
    """The problem of bounding the model over the box [lo, hi] around x (x: the batch the shapes and a training-mode
    batch norm's statistics are read from). check=False skips C's finiteness check (a host synchronisation)."""
    layers = model_layers(model)
    shapes = _shapes(layers, x)
    layers = fixed_statistics(layers, x)
    k = math.prod(shapes[-1])
    if C is not None:
        check_spec(C, x.shape[0], k, finite=check)
        C = C.to(device=x.device, dtype=x.dtype)
    return _Problem(layers, shapes, lo, hi, C)


# ------------------------------------------------------------------------------------------- propagation
def _concretize(A: Tensor, bias: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """Exact minimum of A . z + bias over the box [lo, hi]: sum A+ lo + A- hi + bias."""
    A = A.flatten(2)
    return (A.clamp(min=0) @ lo.flatten(1).unsqueeze(2) + A.clamp(max=0) @ hi.flatten(1).unsqueeze(2)).squeeze(2) + bias


def _ibp_forward(p: _Problem, upto: int | None = None) -> list[Interval]:
    """Boxes of the input of every layer (and the output) by the interval rules."""
    boxes = [(p.xl, p.xu)]
    for layer in p.layers[:upto]:
        boxes.append(rule_of(layer).interval(layer, *boxes[-1]))
        for work in _COUNTERS:
            work.interval_elements += 2 * boxes[-1][0].numel()
    return boxes


def _ibp_spec(p: _Problem, boxes: list[Interval], upper: bool = True) -> tuple[Tensor, Tensor | None]:
    """IBP bounds on C z (or on z without C); C is folded into the last layer when it is affine (elision)."""
    if p.C is None:
        return boxes[-1][0], (boxes[-1][1] if upper else None)
    last, n = p.layers[-1], len(p.layers)
    spec = p.C.reshape(*p.C.shape[:2], *p.shapes[n])
    if needs_input_bounds(last):  # nothing to fold into: bound C z over the output box
        A, bias, (lo, hi) = spec, p.C.new_zeros(p.C.shape[:2]), boxes[n]
    else:
        A, bias = rule_of(last).backward(last, spec, p.shapes[n - 1], None)
        lo, hi = boxes[n - 1]
    return _concretize(A, bias, lo, hi), (-_concretize(-A, -bias, lo, hi) if upper else None)


def _backward(p: _Problem, upto: int, bounds: list[Interval | None], A: Tensor) -> Tensor:
    """CROWN: lower bound of A . (output of layers[:upto]) over the input box, by the backward rules."""
    bias = A.new_zeros(A.shape[:2])
    for work in _COUNTERS:
        work.backward_passes += 1
    for i in reversed(range(upto)):
        A, b = rule_of(p.layers[i]).backward(p.layers[i], A, p.shapes[i], bounds[i])
        bias = bias + b
        for work in _COUNTERS:
            work.coefficients += A.numel()
    return _concretize(A, bias, p.xl, p.xu)


def _crown_box(p: _Problem, upto: int, bounds: list[Interval | None]) -> Interval:
    """Bounds of every neuron of the output of layers[:upto] by CROWN (identity specification, in chunks)."""
    batch, shape = p.xl.shape[0], p.shapes[upto]
    n = math.prod(shape)
    widest = max(math.prod(s) for s in p.shapes[:upto + 1])
    step = max(1, CROWN_CHUNK_ELEMENTS // (2 * batch * widest))
    lows, ups = [], []

    def chunk(s0: int, k: int) -> Tensor:
        rows = torch.zeros(k, n, dtype=p.xl.dtype, device=p.xl.device)
        rows[torch.arange(k), s0 + torch.arange(k)] = 1  # rows s0 .. s0 + k of the identity
        A = torch.cat([rows, -rows]).reshape(1, 2 * k, *shape).expand(batch, -1, *shape)
        return _backward(p, upto, bounds, A)

    for s0 in range(0, n, step):
        k = min(step, n - s0)
        # Under autograd every chunk's coefficient tensors would stay in the graph until the call returns (18.6 GB
        # for one cnn-4layer image in float64, where one chunk needs megabytes): each chunk is checkpointed instead,
        # i.e. recomputed in the backward pass, so memory stays at one chunk and the gradient is unchanged.
        lb = checkpoint(chunk, s0, k, use_reentrant=False) if torch.is_grad_enabled() else chunk(s0, k)
        lows.append(lb[:, :k])
        ups.append(-lb[:, k:])
    return torch.cat(lows, 1).reshape(batch, *shape), torch.cat(ups, 1).reshape(batch, *shape)


def _affine_of_box(layers: list[nn.Module]) -> bool:
    """True when the layers are box-to-box maps and at most one other affine layer: then the IBP bounds are exact
    for every neuron and equal CROWN's, so the costly CROWN pass with an identity specification can be skipped."""
    if any(needs_input_bounds(layer) for layer in layers):
        return False
    return sum(not box_to_box(layer) for layer in layers) <= 1


def _crown(p: _Problem, intermediate: str, upper: bool, boxes: list[Interval] | None = None
           ) -> tuple[Tensor, Tensor | None]:
    """CROWN bounds on C z; pre-activation bounds by CROWN itself or taken from IBP (= CROWN-IBP)."""
    n = len(p.layers)
    bounds: list[Interval | None] = [None] * n
    if intermediate == "ibp":
        boxes = boxes if boxes is not None else _ibp_forward(p, upto=n - 1)
        bounds = [boxes[i] if needs_input_bounds(layer) else None for i, layer in enumerate(p.layers)]
    else:
        for i, layer in enumerate(p.layers):
            if needs_input_bounds(layer):
                bounds[i] = _ibp_forward(p, i)[-1] if _affine_of_box(p.layers[:i]) else _crown_box(p, i, bounds)
    batch = p.xl.shape[0]
    if p.C is not None:
        spec = p.C
    else:
        spec = torch.eye(p.num_outputs, dtype=p.xl.dtype, device=p.xl.device).expand(batch, -1, -1)
    m = spec.shape[1]
    A = torch.cat([spec, -spec], 1) if upper else spec
    lb = _backward(p, n, bounds, A.reshape(batch, A.shape[1], *p.shapes[n]))
    return (lb[:, :m], -lb[:, m:]) if upper else (lb, None)


# ------------------------------------------------------------------------------------------- public API
def margin_rows(label: Tensor, num_classes: int) -> Tensor:
    eye = torch.eye(num_classes, device=label.device)
    j = torch.arange(num_classes - 1, device=label.device).expand(len(label), -1)
    j = j + (j >= label[:, None]).long()  # every class but the label, in increasing order
    return eye[label][:, None, :] - eye[j]  # rows e_label - e_j


def margin_spec(y: Tensor, num_classes: int, target: Tensor | None = None) -> Tensor:
    """The margin specification of each image: C z is the vector of margins z_y - z_j, j != y.

    Args:
        y: B labels in [0, num_classes) (any device).
        num_classes: K, the model's number of outputs (>= 2).
        target: optional B labels t; then the rows are e_t - e_j, j != t: the margins of a target (Shadow Attack).

    Returns:
        C of shape B x (K-1) x K on y's device, the j's in increasing order. ValueError names a bad argument.
    """
    num_classes = validate.count(num_classes, "num_classes", minimum=2)
    validate.labels(y, None, "y", num_classes)
    if target is None:
        return margin_rows(y, num_classes)
    validate.labels(target, y.shape[0], "target", num_classes)
    return margin_rows(target.to(y.device), num_classes)


def ibp_bounds(model: nn.Module, x: Tensor, eps: float, C: Tensor | None = None) -> Interval:
    """Interval bound propagation (Gowal et al. 2018) over the eps-ball around x clipped to [0, 1].

    Args:
        model: an nn.Sequential of layers with rules in ``certify.rules`` (Linear, Conv2d, ReLU, Flatten, Normalize,
            batch norm); batch norm in training mode uses the statistics of the batch x, held fixed.
        x: B x C x H x W images (or B x D vectors) in [0, 1].
        eps: the L-inf radius, a finite number >= 0.
        C: optional B x M x K specification (``margin_spec``); the last linear layer is merged with it, which is
            tighter than bounding z and multiplying.

    Returns:
        (lower, upper) of shape B x M (B x K without C): for every input in the ball, lower <= C z <= upper.
        Differentiable in x and the parameters.
    """
    p = prepare(model, x, eps, C)
    lb, ub = _ibp_spec(p, _ibp_forward(p))
    assert ub is not None  # upper=True (the default) always returns the upper bound
    return lb, ub


def crown_bounds(model: nn.Module, x: Tensor, eps: float, C: Tensor | None = None, intermediate: str = "crown",
                 upper: bool = True) -> tuple[Tensor, Tensor | None]:
    """CROWN (Zhang et al. 2018) bounds on C z over the eps-ball around x clipped to [0, 1].

    Args:
        model, x, eps, C: as in ``ibp_bounds``.
        intermediate: where the pre-activation boxes of the ReLUs come from: "crown" (a backward pass per layer,
            full CROWN) or "ibp" (IBP's boxes: CROWN-IBP, Zhang et al. 2020).
        upper: also compute the upper bound.

    Returns:
        (lower, upper) of shape B x M (B x K without C), upper None when upper=False; sound for every input in the
        ball.

    With upper=False only the lower bound is computed (half the work) and None is returned in its place. The bounds
    are differentiable in x and the parameters. With intermediate="crown" the pre-activation bounds are computed in
    chunks of about ``CROWN_CHUNK_ELEMENTS`` coefficients, each checkpointed under autograd (recomputed in the
    backward pass), so memory stays at one chunk whatever the grad mode.
    """
    validate.choice(intermediate, "intermediate", INTERMEDIATE)
    return _crown(prepare(model, x, eps, C), intermediate, upper)


def _crown_ibp(p: _Problem, beta: float, upper: bool, boxes: list[Interval] | None = None
               ) -> tuple[Tensor, Tensor | None]:
    boxes = boxes if boxes is not None else _ibp_forward(p)
    lb, ub = _ibp_spec(p, boxes, upper)
    if beta == 0:
        return lb, ub
    c_lb, c_ub = _crown(p, "ibp", upper, boxes)
    lb = beta * c_lb + (1 - beta) * lb
    return lb, (beta * c_ub + (1 - beta) * ub if upper else None)


def crown_ibp_bounds(model: nn.Module, x: Tensor, eps: float, C: Tensor | None, beta: float,
                     upper: bool = True) -> tuple[Tensor, Tensor | None]:
    """CROWN-IBP training bounds (Zhang et al. 2020, eq. 11): beta * CROWN-IBP + (1 - beta) * IBP, on C z.

    Args:
        model, x, eps, C: as in ``ibp_bounds`` (C may be None: bounds on the logits).
        beta: the mix in [0, 1]; 0 is plain IBP (no backward pass), 1 plain CROWN-IBP.
        upper: also compute the upper bound.

    Returns:
        (lower, upper or None), B x M: a convex combination of two sound bounds, so sound too.
    """
    beta = validate.probability(beta, "beta")
    return _crown_ibp(prepare(model, x, eps, C), beta, upper)


def warmup_regularizer(layers: list[nn.Module], boxes: list[Interval], tol: float = 0.5) -> Tensor:
    """L_tightness + L_relu, the warm-up regularisers of Shi et al. 2021, from the IBP boxes of every ReLU input.

    L_tightness penalises boxes that grow from layer to layer: the mean radius of the input box (after the leading
    elementwise layers, i.e. in normalised pixels) over the mean radius of a ReLU's pre-activation box, below tol.
    L_relu penalises imbalanced ReLUs: the ratios of the mean (and the spread) of the box centres of the stably active
    neurons to those of the stably inactive ones, symmetrised to (0, 1], below tol. Both are averaged over the ReLUs.
    """
    # a net of elementwise layers only has no ReLU: its input box is the last box and both terms are 0
    first = next((i for i, layer in enumerate(layers) if not box_to_box(layer)), len(layers))
    lo0, hi0 = boxes[first]
    tightness_0 = ((hi0 - lo0) / 2).mean()
    tight, relu, count = lo0.new_zeros(()), lo0.new_zeros(()), 0
    for i, layer in enumerate(layers):
        if not needs_input_bounds(layer):
            continue
        lo, hi = boxes[i]
        centre, radius = (hi + lo) / 2, (hi - lo) / 2
        tight = tight + F.relu(tol - tightness_0 / radius.mean().clamp(min=1e-12)) / tol
        active, inactive = (lo > 0).to(lo.dtype), (hi < 0).to(lo.dtype)
        # without a stably active or a stably inactive neuron the ratios are undefined and the term is skipped; the
        # test stays on the device (no host sync), with safe denominators so that no NaN reaches the gradient
        both = (active.sum() > 0) & (inactive.sum() > 0)
        spread = (centre - centre.mean()) ** 2
        mean_ratio = (centre * active).mean() / torch.where(both, -(centre * inactive).mean(), 1.0).clamp(min=1e-12)
        var_ratio = (spread * active).sum() / torch.where(both, (spread * inactive).sum(), 1.0).clamp(min=1e-12)
        term = lo0.new_zeros(())
        for ratio in (mean_ratio, var_ratio):
            term = term + F.relu(tol - torch.minimum(ratio, 1 / ratio.clamp(min=1e-12))) / tol
        relu = relu + torch.where(both, term, 0.0)
        count += 1
    return (tight + relu) / max(count, 1)


def crown_ibp_training_loss(model: nn.Module, x: Tensor, y: Tensor, eps: float, beta: float,
                            regularizer: float = 0.0) -> Tensor:
    """Robust cross-entropy of Zhang et al. 2020: CE([0, -lb(z_y - z_j) for j != y], class 0), lb from CROWN-IBP;
    plus `regularizer` times the warm-up regulariser of Shi et al. 2021 (`warmup_regularizer`) when it is > 0."""
    beta = validate.probability(beta, "beta")
    regularizer = validate.number(regularizer, "regularizer", low=0.0)
    p = prepare(model, x, eps)
    validate.labels(y, x.shape[0], "y", p.num_outputs)
    p.C = margin_rows(y.to(x.device), p.num_outputs).to(x.dtype)
    boxes = _ibp_forward(p)
    lb, _ = _crown_ibp(p, beta, upper=False, boxes=boxes)
    logits = torch.cat([lb.new_zeros(lb.shape[0], 1), -lb], 1)  # the true class is logit 0
    loss = F.cross_entropy(logits, torch.zeros(lb.shape[0], dtype=torch.long, device=lb.device))
    if regularizer > 0:
        loss = loss + regularizer * warmup_regularizer(p.layers, boxes)
    return loss


def box_lower_bounds(model: nn.Module, lo: Tensor, hi: Tensor, C: Tensor, method: str = "ibp",
                     check: bool = True) -> Tensor:
    """Lower bounds on C z for every input in the box [lo, hi] (B x M), by one method of ``METHODS``.

    Unlike ``lower_bounds`` the box is taken as given, not clipped to the image range [0, 1]: e.g. the box
    x +- eps / std in a normalised input space, as the CROWN-IBP authors' code bounds it (``shadow.faithful``).
    lo <= hi, both B x (input shape); C: B x M x K. Sound over that box; differentiable in lo, hi and the parameters.
    check=False skips the argument checks (a host synchronisation each), for callers in a loop that built the box.
    """
    validate.choice(method, "method", METHODS)
    if check:
        if not isinstance(lo, Tensor) or not isinstance(hi, Tensor) or lo.shape != hi.shape:
            raise ValueError("lo and hi must be tensors of the same shape (the corners of the box)")
        if lo.dim() < 2 or lo.shape[0] < 1 or not lo.is_floating_point() or not hi.is_floating_point():
            raise ValueError(f"lo and hi must be float tensors of shape N x ... (a box per image), got shape "
                             f"{tuple(lo.shape)}, dtypes {lo.dtype} and {hi.dtype}")
        validate.finite(lo, "lo")
        validate.finite(hi, "hi")
        if bool((lo > hi).any()):
            raise ValueError("lo must be <= hi everywhere (an empty box has no bounds)")
    return lower_margins(_prepare_box(model, (lo + hi) / 2, lo, hi, C, check=check), method)


def lower_margins(p: _Problem, method: str) -> Tensor:
    if method == "ibp":
        return _ibp_spec(p, _ibp_forward(p), upper=False)[0]
    return _crown(p, "ibp" if method == "crown-ibp" else "crown", upper=False)[0]


def lower_bounds(model: nn.Module, x: Tensor, eps: float, C: Tensor, method: str = "crown-ibp") -> Tensor:
    """Lower bounds on C z over the eps-ball (B x M) by one method of ``METHODS``: "ibp" (Gowal et al. 2018),
    "crown-ibp" (CROWN with IBP pre-activation bounds, Zhang et al. 2020) or "crown" (Zhang et al. 2018).

    C: B x M x K specifications (``margin_spec`` for margins). Sound: every value is at most the minimum of its
    linear function over the ball. Differentiable as ``ibp_bounds`` and ``crown_bounds``.
    """
    validate.choice(method, "method", METHODS)
    return lower_margins(prepare(model, x, eps, C), method)


def check_inputs(model: nn.Module, x: Tensor, eps: float, batch_size: int, device: torch.device | str | None
                 ) -> tuple[float, torch.device]:
    """The checks every verifier makes before bounding (shadowlab's and the auto_LiRPA adapter's): x N x C x H x W
    in [0, 1], eps a finite number >= 0, batch_size an integer >= 1, no batch norm in training mode (an image's
    output would depend on its batch). Moves the model to ``device`` (default CUDA when available) and returns
    (eps as a float, the device). ValueError names the argument."""
    validate.count(batch_size, "batch_size")
    _check_x(x)
    eps = validate.eps(eps)
    if any(isinstance(m, BATCH_NORMS) and m.training for m in model.modules()):
        raise ValueError("model has batch-norm layers in training mode, where an image's output depends on the "
                         "rest of the batch: call model.eval() before certifying")
    device = torch.device(device) if device is not None else default_device()
    model.to(device)
    return eps, device


def certified_margins(model: nn.Module, x: Tensor, eps: float, C: Tensor, batch_size: int = 512) -> Tensor:
    """Certified lower bounds of the linear functions C z of the logits over the eps-ball around each image.

    Args:
        model: an nn.Sequential of supported layers (``certify.rules``), in eval mode.
        x: N x C x H x W images in [0, 1].
        eps: the L-inf radius (>= 0).
        C: N x M x K specification, e.g. ``margin_spec(y, K)`` (rows e_y - e_j: the margins of the label) or
            ``margin_spec(y, K, target=t)`` (the margins of a target t).
        batch_size: images bounded together.

    Returns:
        N x M lower bounds on the device of x: the elementwise larger of CROWN-IBP's and IBP's, the tightest sound
        bound the certifiably trained models are judged by (both hold, so their max does). Every entry >= 0 means
        the image is certified for that specification. No gradient.
    """
    validate.count(batch_size, "batch_size")
    check_spec(C, x.shape[0])
    out = []
    with torch.no_grad():
        for s in range(0, x.shape[0], batch_size):
            p = prepare(model, x[s:s + batch_size], eps, C[s:s + batch_size])
            boxes = _ibp_forward(p)   # one IBP pass serves both bounds (CROWN-IBP's intermediates and IBP's own)
            out.append(torch.maximum(_crown(p, "ibp", False, boxes)[0], _ibp_spec(p, boxes, upper=False)[0]))
    return torch.cat(out)


def check_verify_inputs(model: nn.Module, x: Tensor, labels: Tensor, eps: float, method: str, batch_size: int,
                        device: torch.device | str | None, name: str = "y", methods: tuple[str, ...] = METHODS
                        ) -> tuple[float, torch.device, int]:
    """``check_inputs``, then the method (one of ``methods``) and the labels (N of them, in [0, K)); returns (eps,
    device, K) with K the model's number of outputs. Moves the model to the device."""
    validate.choice(method, "method", methods)
    eps, device = check_inputs(model, x, eps, batch_size, device)
    k = math.prod(_shapes(model_layers(model), x[:1].to(device))[-1])
    validate.labels(labels, x.shape[0], name, k)
    return eps, device, k
