"""Bound propagation: IBP (Gowal et al. 2018), CROWN (Zhang et al. 2018) and CROWN-IBP (Zhang et al. 2020).

The input set is the L-inf ball of radius eps around x intersected with the image box:
[x_L, x_U] = [clamp(x - eps, 0, 1), clamp(x + eps, 0, 1)]. A network is an ``nn.Sequential`` of supported layers
and every layer type has two rules, looked up by type in ``INTERVAL_RULES`` and ``BACKWARD_RULES``:

- interval rule ``(layer, lo, hi) -> (lo', hi')``: a box holding f(z) for every z in [lo, hi] (IBP);
- backward rule ``(layer, A, shape, lu) -> (A', b')``: for a linear function A . f(z) (one row of A per
  specification), A . f(z) >= A' . z + b' for every z in the box ``lu = (lo, hi)`` of the layer input (CROWN).
  Affine layers satisfy it with equality and ignore ``lu``; layers listed in ``NEEDS_INPUT_BOUNDS`` (ReLU) use it.

To add a layer type, write both rules and register them. Only lower bounds are propagated backwards: an upper
bound is minus the lower bound of the negated specification, ub(A . z) = -lb(-A . z).
Everything is differentiable in the parameters and in x (the CROWN-IBP loss and the Shadow Attack need both).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .models import Normalize, default_device

Interval = tuple[Tensor, Tensor]
METHODS = ("ibp", "crown-ibp", "crown")
INTERMEDIATE = ("crown", "ibp")
CROWN_CHUNK_ELEMENTS = 2 ** 24  # memory budget (tensor elements) of one chunk of full-CROWN intermediate bounds


class UnsupportedLayerError(TypeError, ValueError):
    """The model holds a layer type that has no bound-propagation rules."""


BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


class ChannelAffine(nn.Module):
    """z * scale + shift per channel (dim 1): a batch-norm layer with its statistics fixed."""

    def __init__(self, scale: Tensor, shift: Tensor) -> None:
        super().__init__()
        self.scale, self.shift = scale, shift

    @staticmethod
    def view(v: Tensor, dims: int) -> Tensor:
        """v (one value per channel) shaped to broadcast over a C x ... tensor of `dims` dimensions."""
        return v.reshape(-1, *([1] * (dims - 1)))

    def forward(self, z: Tensor) -> Tensor:
        return z * self.view(self.scale, z.dim() - 1) + self.view(self.shift, z.dim() - 1)


def fixed_statistics(layers: list[nn.Module], x: Tensor) -> list[nn.Module]:
    """The layers with every batch norm replaced by the ChannelAffine it computes on the batch x.

    In eval mode a batch norm is the affine map of its running statistics. In training mode it normalises with the
    statistics of the clean batch, as in the forward pass; the bounds then hold those statistics fixed, as in
    Shi et al. 2021 and auto_LiRPA. The statistics stay differentiable, like the forward pass's.
    """
    if not any(isinstance(layer, BATCH_NORMS) for layer in layers):
        return layers
    last = max((i for i, layer in enumerate(layers) if isinstance(layer, BATCH_NORMS) and layer.training), default=-1)
    out, z = [], x
    for i, layer in enumerate(layers):
        if isinstance(layer, BATCH_NORMS):
            if layer.training:
                dims = [0, *range(2, z.dim())]
                mean, var = z.mean(dims), z.var(dims, unbiased=False)
            else:
                mean, var = layer.running_mean, layer.running_var
            scale = torch.rsqrt(var + layer.eps)
            if layer.affine:
                scale = scale * layer.weight
            shift = -mean * scale + (layer.bias if layer.affine else 0)
            layer = ChannelAffine(scale, shift)
        if i < last:
            z = layer(z)
        out.append(layer)
    return out


# ------------------------------------------------------------------------------------------- interval rules
def _ibp_normalize(layer: Normalize, lo: Tensor, hi: Tensor) -> Interval:
    # (z - mean) / std is monotone per channel: map both ends, reorder in case std < 0.
    a, b = layer(lo), layer(hi)
    return torch.minimum(a, b), torch.maximum(a, b)


def _ibp_linear(layer: nn.Linear, lo: Tensor, hi: Tensor) -> Interval:
    # W z + b over a box with centre m = (hi + lo) / 2, radius r = (hi - lo) / 2: centre W m + b, radius |W| r.
    m, r = (hi + lo) / 2, (hi - lo) / 2
    c, d = layer(m), F.linear(r, layer.weight.abs())
    return c - d, c + d


def _ibp_conv2d(layer: nn.Conv2d, lo: Tensor, hi: Tensor) -> Interval:
    # as for Linear: centre conv(m) + b, radius conv(r) with |W| and no bias.
    m, r = (hi + lo) / 2, (hi - lo) / 2
    c = layer(m)
    d = F.conv2d(r, layer.weight.abs(), None, layer.stride, layer.padding, layer.dilation, layer.groups)
    return c - d, c + d


def _ibp_relu(layer: nn.ReLU, lo: Tensor, hi: Tensor) -> Interval:
    # ReLU is monotone: [relu(lo), relu(hi)].
    return F.relu(lo), F.relu(hi)


def _ibp_channel_affine(layer: ChannelAffine, lo: Tensor, hi: Tensor) -> Interval:
    # z * scale + shift per channel: centre m * scale + shift, radius r * |scale|.
    m, r = (hi + lo) / 2, (hi - lo) / 2
    c, d = layer(m), r * layer.view(layer.scale.abs(), r.dim() - 1)
    return c - d, c + d


def _ibp_flatten(layer: nn.Flatten, lo: Tensor, hi: Tensor) -> Interval:
    # a reshape keeps every coordinate's interval.
    return layer(lo), layer(hi)


# ------------------------------------------------------------------------------------------- backward rules
# A has shape B x S x (layer output shape): S linear functions per image; the rule returns A' with shape
# B x S x (layer input shape) and the bias b' with shape B x S.
def _back_normalize(layer: Normalize, A: Tensor, shape: tuple[int, ...], lu: Interval | None) -> tuple[Tensor, Tensor]:
    # A . (z - mean) / std = (A / std) . z - (A / std) . mean
    A_in = A / layer.std
    return A_in, -(A_in.flatten(3).sum(3) @ layer.mean.flatten())


def _back_channel_affine(layer: ChannelAffine, A: Tensor, shape: tuple[int, ...], lu: Interval | None
                         ) -> tuple[Tensor, Tensor]:
    # A . (z * scale + shift) = (A * scale) . z + A . shift
    return A * layer.view(layer.scale, len(shape)), (A * layer.view(layer.shift, len(shape))).flatten(2).sum(2)


def _back_linear(layer: nn.Linear, A: Tensor, shape: tuple[int, ...], lu: Interval | None) -> tuple[Tensor, Tensor]:
    # A . (W z + b) = (A W) . z + A b
    bias = A @ layer.bias if layer.bias is not None else A.new_zeros(A.shape[:2])
    return A @ layer.weight, bias


def _back_conv2d(layer: nn.Conv2d, A: Tensor, shape: tuple[int, ...], lu: Interval | None) -> tuple[Tensor, Tensor]:
    # A . (conv(z) + b) = conv_transpose(A) . z + sum_c b_c sum_hw A_chw  (conv_transpose is the adjoint of conv);
    # output_padding restores the rows/columns a strided convolution never reads, so A' has the input's shape.
    b, s = A.shape[:2]
    out_hw = A.shape[-2:]
    pad = tuple(shape[1 + i] - ((out_hw[i] - 1) * layer.stride[i] - 2 * layer.padding[i]
                                + layer.dilation[i] * (layer.kernel_size[i] - 1) + 1) for i in range(2))
    A_flat = A.reshape(b * s, *A.shape[2:]).contiguous(memory_format=torch.channels_last)  # faster on CPU (oneDNN)
    A_in = F.conv_transpose2d(A_flat, layer.weight, None, layer.stride, layer.padding, pad, layer.groups,
                              layer.dilation)
    bias = A.sum((3, 4)) @ layer.bias if layer.bias is not None else A.new_zeros(b, s)
    return A_in.reshape(b, s, *shape), bias


def relu_relaxation(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Linear bounds a_lo z <= relu(z) <= a_up z + b_up on [lo, hi] (CROWN, Zhang et al. 2018, adaptive lower slope).

    Stable neurons are exact (slopes 1 or 0). Unstable ones (lo < 0 < hi) get the chord a_up = hi / (hi - lo),
    b_up = -a_up lo above, and the lower line a_lo z with a_lo = 1 if hi >= -lo else 0.
    """
    active, dead = lo >= 0, hi <= 0
    unstable = ~(active | dead)
    width = torch.where(unstable, hi - lo, torch.ones_like(hi))  # no division by zero, even in the gradient
    a_up = torch.where(unstable, hi / width, active.to(hi.dtype))
    b_up = torch.where(unstable, -a_up * lo, torch.zeros_like(hi))
    a_lo = torch.where(unstable, (hi >= -lo).to(hi.dtype), active.to(hi.dtype))
    return a_lo, a_up, b_up


def _back_relu(layer: nn.ReLU, A: Tensor, shape: tuple[int, ...], lu: Interval | None) -> tuple[Tensor, Tensor]:
    # a positive coefficient takes the lower line, a negative one the upper line:
    # A . relu(z) >= (A+ a_lo + A- a_up) . z + A- . b_up
    a_lo, a_up, b_up = relu_relaxation(*lu)
    A_in = A * torch.where(A >= 0, a_lo.unsqueeze(1), a_up.unsqueeze(1))
    return A_in, (A.clamp(max=0).flatten(2) @ b_up.flatten(1).unsqueeze(2)).squeeze(2)


def _back_flatten(layer: nn.Flatten, A: Tensor, shape: tuple[int, ...], lu: Interval | None) -> tuple[Tensor, Tensor]:
    # a reshape: the coefficients take the input's shape.
    return A.reshape(*A.shape[:2], *shape), A.new_zeros(A.shape[:2])


INTERVAL_RULES: dict[type, Callable[..., Interval]] = {
    Normalize: _ibp_normalize, nn.Conv2d: _ibp_conv2d, nn.Linear: _ibp_linear, nn.ReLU: _ibp_relu,
    nn.Flatten: _ibp_flatten, ChannelAffine: _ibp_channel_affine,
}
BACKWARD_RULES: dict[type, Callable[..., tuple[Tensor, Tensor]]] = {
    Normalize: _back_normalize, nn.Conv2d: _back_conv2d, nn.Linear: _back_linear, nn.ReLU: _back_relu,
    nn.Flatten: _back_flatten, ChannelAffine: _back_channel_affine,
}
NEEDS_INPUT_BOUNDS: tuple[type, ...] = (nn.ReLU,)  # backward rules that read the bounds of their input
# optional: elementwise affine maps (box -> box)
BOX_TO_BOX: tuple[type, ...] = (Normalize, nn.Flatten, ChannelAffine)


def _rule(table: dict[type, Callable], layer: nn.Module) -> Callable | None:
    for cls in type(layer).__mro__:
        if cls in table:
            return table[cls]
    return None


# ------------------------------------------------------------------------------------------- model & inputs
def _supported() -> str:
    return ", ".join([*(cls.__name__ for cls in INTERVAL_RULES if cls is not ChannelAffine),
                      *(cls.__name__ for cls in BATCH_NORMS)])


def model_layers(model: nn.Module) -> list[nn.Module]:
    """The layers of an nn.Sequential (nested ones flattened); raises UnsupportedLayerError naming a bad layer."""
    if not isinstance(model, nn.Sequential):
        raise UnsupportedLayerError(f"bound propagation needs an nn.Sequential of {_supported()}; "
                                    f"got model of type {type(model).__name__}")
    layers: list[nn.Module] = []
    for i, layer in enumerate(model):
        if isinstance(layer, nn.Sequential):
            layers += model_layers(layer)
            continue
        name = type(layer).__name__
        if isinstance(layer, BATCH_NORMS):  # replaced by a ChannelAffine in _prepare (fixed_statistics)
            if not layer.track_running_stats:
                raise UnsupportedLayerError(f"layer {i} ({name}) must track running statistics "
                                            "(track_running_stats=True)")
            layers.append(layer)
            continue
        if _rule(INTERVAL_RULES, layer) is None or _rule(BACKWARD_RULES, layer) is None:
            raise UnsupportedLayerError(f"layer {i} ({name}) is not supported by bound propagation; "
                                        f"supported layers: {_supported()}")
        if isinstance(layer, nn.Conv2d) and (layer.padding_mode != "zeros" or isinstance(layer.padding, str)):
            raise UnsupportedLayerError(f"layer {i} (Conv2d) must use numeric zero padding, got padding="
                                        f"{layer.padding!r}, padding_mode={layer.padding_mode!r}")
        if isinstance(layer, nn.Flatten) and (layer.start_dim != 1 or layer.end_dim != -1):
            raise UnsupportedLayerError(f"layer {i} (Flatten) must flatten dims 1..-1, got start_dim="
                                        f"{layer.start_dim}, end_dim={layer.end_dim}")
        layers.append(layer)
    if not layers:
        raise UnsupportedLayerError("model has no layers")
    return layers


def _check_eps(eps: float) -> float:
    try:
        value = float(eps)
    except (TypeError, ValueError):
        raise ValueError(f"eps={eps!r} must be a finite number >= 0") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"eps={eps} must be a finite number >= 0")
    return value


def _check_x(x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[0] < 1:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a tensor of shape N x C x H x W (N >= 1) with values in [0, 1], got {shape}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a float tensor with values in [0, 1], got dtype {x.dtype}")
    if (~((x >= 0) & (x <= 1))).any():  # one host sync; NaN fails both comparisons
        if torch.isnan(x).any():
            raise ValueError("x contains NaN; images must have values in [0, 1]")
        raise ValueError(f"x must have values in [0, 1], got range [{float(x.min()):.4g}, {float(x.max()):.4g}]")


def _check_beta(beta: float) -> float:
    try:
        value = float(beta)
    except (TypeError, ValueError):
        raise ValueError(f"beta={beta!r} must be a number in [0, 1]") from None
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"beta={beta} must be a number in [0, 1]")
    return value


def _check_labels(y: Tensor, n: int | None, num_classes: int, name: str = "y") -> None:
    if not isinstance(y, Tensor) or y.dim() != 1 or (n is not None and y.shape[0] != n):
        shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"{name} must be an integer tensor of shape ({'N' if n is None else n},), got {shape}")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer class indices, got dtype {y.dtype}")
    if y.numel() and bool(((y < 0) | (y >= num_classes)).any()):
        raise ValueError(f"{name} entries must lie in [0, {num_classes - 1}], got range "
                         f"[{int(y.min())}, {int(y.max())}]")


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


def _prepare(model: nn.Module, x: Tensor, eps: float, C: Tensor | None = None, check: bool = True) -> _Problem:
    layers = model_layers(model)
    if check:
        _check_x(x)
    eps = _check_eps(eps)
    shapes = _shapes(layers, x)
    layers = fixed_statistics(layers, x)
    k = math.prod(shapes[-1])
    if C is not None:
        if not isinstance(C, Tensor) or C.dim() != 3 or C.shape[0] != x.shape[0] or C.shape[2] != k:
            shape = tuple(C.shape) if isinstance(C, Tensor) else type(C).__name__
            raise ValueError(f"C must have shape {x.shape[0]} x M x {k} (images x specifications x model "
                             f"outputs), got {shape}")
        C = C.to(device=x.device, dtype=x.dtype)
    return _Problem(layers, shapes, (x - eps).clamp(0, 1), (x + eps).clamp(0, 1), C)


# ------------------------------------------------------------------------------------------- propagation
def _concretize(A: Tensor, bias: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """Exact minimum of A . z + bias over the box [lo, hi]: sum A+ lo + A- hi + bias."""
    A = A.flatten(2)
    return (A.clamp(min=0) @ lo.flatten(1).unsqueeze(2) + A.clamp(max=0) @ hi.flatten(1).unsqueeze(2)).squeeze(2) + bias


def _ibp_forward(p: _Problem, upto: int | None = None) -> list[Interval]:
    """Boxes of the input of every layer (and the output) by the interval rules."""
    boxes = [(p.xl, p.xu)]
    for layer in p.layers[:upto]:
        boxes.append(_rule(INTERVAL_RULES, layer)(layer, *boxes[-1]))
    return boxes


def _ibp_spec(p: _Problem, boxes: list[Interval], upper: bool = True) -> tuple[Tensor, Tensor | None]:
    """IBP bounds on C z (or on z without C); C is folded into the last layer when it is affine (elision)."""
    if p.C is None:
        return boxes[-1][0], (boxes[-1][1] if upper else None)
    last, n = p.layers[-1], len(p.layers)
    spec = p.C.reshape(*p.C.shape[:2], *p.shapes[n])
    if isinstance(last, NEEDS_INPUT_BOUNDS):  # nothing to fold into: bound C z over the output box
        A, bias, (lo, hi) = spec, p.C.new_zeros(p.C.shape[:2]), boxes[n]
    else:
        A, bias = _rule(BACKWARD_RULES, last)(last, spec, p.shapes[n - 1], None)
        lo, hi = boxes[n - 1]
    return _concretize(A, bias, lo, hi), (-_concretize(-A, -bias, lo, hi) if upper else None)


def _backward(p: _Problem, upto: int, bounds: list[Interval | None], A: Tensor) -> Tensor:
    """CROWN: lower bound of A . (output of layers[:upto]) over the input box, by the backward rules."""
    bias = A.new_zeros(A.shape[:2])
    for i in reversed(range(upto)):
        A, b = _rule(BACKWARD_RULES, p.layers[i])(p.layers[i], A, p.shapes[i], bounds[i])
        bias = bias + b
    return _concretize(A, bias, p.xl, p.xu)


def _crown_box(p: _Problem, upto: int, bounds: list[Interval | None]) -> Interval:
    """Bounds of every neuron of the output of layers[:upto] by CROWN (identity specification, in chunks)."""
    batch, shape = p.xl.shape[0], p.shapes[upto]
    n = math.prod(shape)
    widest = max(math.prod(s) for s in p.shapes[:upto + 1])
    step = max(1, CROWN_CHUNK_ELEMENTS // (2 * batch * widest))
    lows, ups = [], []
    for s0 in range(0, n, step):
        k = min(step, n - s0)
        rows = torch.zeros(k, n, dtype=p.xl.dtype, device=p.xl.device)
        rows[torch.arange(k), s0 + torch.arange(k)] = 1  # rows s0 .. s0 + k of the identity
        A = torch.cat([rows, -rows]).reshape(1, 2 * k, *shape).expand(batch, -1, *shape)
        lb = _backward(p, upto, bounds, A)
        lows.append(lb[:, :k])
        ups.append(-lb[:, k:])
    return torch.cat(lows, 1).reshape(batch, *shape), torch.cat(ups, 1).reshape(batch, *shape)


def _affine_of_box(layers: list[nn.Module]) -> bool:
    """True when the layers are box-to-box maps and at most one other affine layer: then the IBP bounds are exact
    for every neuron and equal CROWN's, so the costly CROWN pass with an identity specification can be skipped."""
    if any(isinstance(layer, NEEDS_INPUT_BOUNDS) for layer in layers):
        return False
    return sum(not isinstance(layer, BOX_TO_BOX) for layer in layers) <= 1


def _crown(p: _Problem, intermediate: str, upper: bool, boxes: list[Interval] | None = None
           ) -> tuple[Tensor, Tensor | None]:
    """CROWN bounds on C z; pre-activation bounds by CROWN itself or taken from IBP (= CROWN-IBP)."""
    n = len(p.layers)
    bounds: list[Interval | None] = [None] * n
    if intermediate == "ibp":
        boxes = boxes if boxes is not None else _ibp_forward(p, upto=n - 1)
        bounds = [boxes[i] if isinstance(layer, NEEDS_INPUT_BOUNDS) else None for i, layer in enumerate(p.layers)]
    else:
        for i, layer in enumerate(p.layers):
            if isinstance(layer, NEEDS_INPUT_BOUNDS):
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
def _margin_spec(label: Tensor, num_classes: int) -> Tensor:
    eye = torch.eye(num_classes, device=label.device)
    j = torch.arange(num_classes - 1, device=label.device).expand(len(label), -1)
    j = j + (j >= label[:, None]).long()  # every class but the label, in increasing order
    return eye[label][:, None, :] - eye[j]  # rows e_label - e_j


def margin_spec(y: Tensor, num_classes: int, target: Tensor | None = None) -> Tensor:
    """Specification C (B x (K-1) x K) with rows e_y - e_j, j != y (or e_t - e_j, j != t with a target t)."""
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise ValueError(f"num_classes={num_classes!r} must be an integer >= 2")
    _check_labels(y, None, num_classes, "y")
    if target is None:
        return _margin_spec(y, num_classes)
    _check_labels(target, y.shape[0], num_classes, "target")
    return _margin_spec(target.to(y.device), num_classes)


def ibp_bounds(model: nn.Module, x: Tensor, eps: float, C: Tensor | None = None) -> Interval:
    """Interval bound propagation (Gowal et al. 2018): bounds on C z (final layer merged with C) or on the logits z."""
    p = _prepare(model, x, eps, C)
    lb, ub = _ibp_spec(p, _ibp_forward(p))
    assert ub is not None  # upper=True (the default) always returns the upper bound
    return lb, ub


def crown_bounds(model: nn.Module, x: Tensor, eps: float, C: Tensor | None = None, intermediate: str = "crown",
                 upper: bool = True) -> tuple[Tensor, Tensor | None]:
    """CROWN (Zhang et al. 2018) bounds on C z; intermediate="ibp" takes pre-activation bounds from IBP (CROWN-IBP).

    With upper=False only the lower bound is computed (half the work) and None is returned in its place.
    """
    if intermediate not in INTERMEDIATE:
        raise ValueError(f"intermediate={intermediate!r} is unknown; accepted: {', '.join(INTERMEDIATE)}")
    return _crown(_prepare(model, x, eps, C), intermediate, upper)


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
    """CROWN-IBP training bounds (Zhang et al. 2020, eq. 11): beta * CROWN-IBP + (1 - beta) * IBP, on C z."""
    beta = _check_beta(beta)
    return _crown_ibp(_prepare(model, x, eps, C), beta, upper)


def warmup_regularizer(layers: list[nn.Module], boxes: list[Interval], tol: float = 0.5) -> Tensor:
    """L_tightness + L_relu, the warm-up regularisers of Shi et al. 2021, from the IBP boxes of every ReLU input.

    L_tightness penalises boxes that grow from layer to layer: the mean radius of the input box (after the leading
    elementwise layers, i.e. in normalised pixels) over the mean radius of a ReLU's pre-activation box, below tol.
    L_relu penalises imbalanced ReLUs: the ratios of the mean (and the spread) of the box centres of the stably active
    neurons to those of the stably inactive ones, symmetrised to (0, 1], below tol. Both are averaged over the ReLUs.
    """
    # a net of elementwise layers only has no ReLU: its input box is the last box and both terms are 0
    first = next((i for i, layer in enumerate(layers) if not isinstance(layer, BOX_TO_BOX)), len(layers))
    lo0, hi0 = boxes[first]
    tightness_0 = ((hi0 - lo0) / 2).mean()
    tight, relu, count = lo0.new_zeros(()), lo0.new_zeros(()), 0
    for i, layer in enumerate(layers):
        if not isinstance(layer, NEEDS_INPUT_BOUNDS):
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
    beta = _check_beta(beta)
    if not regularizer >= 0 or not math.isfinite(regularizer):
        raise ValueError(f"regularizer={regularizer} must be a finite number >= 0")
    p = _prepare(model, x, eps)
    _check_labels(y, x.shape[0], p.num_outputs)
    p.C = _margin_spec(y.to(x.device), p.num_outputs).to(x.dtype)
    boxes = _ibp_forward(p)
    lb, _ = _crown_ibp(p, beta, upper=False, boxes=boxes)
    logits = torch.cat([lb.new_zeros(lb.shape[0], 1), -lb], 1)  # the true class is logit 0
    loss = F.cross_entropy(logits, torch.zeros(lb.shape[0], dtype=torch.long, device=lb.device))
    if regularizer > 0:
        loss = loss + regularizer * warmup_regularizer(p.layers, boxes)
    return loss


def _lower_margins(p: _Problem, method: str) -> Tensor:
    if method == "ibp":
        return _ibp_spec(p, _ibp_forward(p), upper=False)[0]
    return _crown(p, "ibp" if method == "crown-ibp" else "crown", upper=False)[0]


def _check_common(model: nn.Module, x: Tensor, labels: Tensor, eps: float, method: str, batch_size: int,
                  device: torch.device | str | None, name: str = "y") -> tuple[float, torch.device, int]:
    if method not in METHODS:
        raise ValueError(f"method={method!r} is unknown; accepted: {', '.join(METHODS)}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1")
    _check_x(x)
    eps = _check_eps(eps)
    if any(isinstance(m, BATCH_NORMS) and m.training for m in model.modules()):
        raise ValueError("model has batch-norm layers in training mode, where an image's output depends on the "
                         "rest of the batch: call model.eval() before certifying")
    device = torch.device(device) if device is not None else default_device()
    model.to(device)
    k = math.prod(_shapes(model_layers(model), x[:1].to(device))[-1])
    _check_labels(labels, x.shape[0], k, name)
    return eps, device, k


def certified(model: nn.Module, x: Tensor, labels: Tensor, eps: float, method: str = "crown-ibp",
              batch_size: int = 256, device: torch.device | str | None = None) -> Tensor:
    """Bool per image: every margin z_label - z_j (j != label) has a lower bound >= 0 on the eps-ball (certificate)."""
    eps, device, k = _check_common(model, x, labels, eps, method, batch_size, device, "labels")
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            xb, lab = x[i:i + batch_size].to(device), labels[i:i + batch_size].to(device)
            p = _prepare(model, xb, eps, _margin_spec(lab, k).to(xb.dtype), check=False)
            out.append((_lower_margins(p, method) >= 0).all(1))
    return torch.cat(out)


def verified_error(model: nn.Module, x: Tensor, y: Tensor, eps: float, method: str = "crown-ibp",
                   batch_size: int = 256, device: torch.device | str | None = None) -> float:
    """Fraction of images not certified at eps (some margin lower bound < 0) or misclassified (Zhang et al. 2020)."""
    eps, device, _ = _check_common(model, x, y, eps, method, batch_size, device)
    ok = certified(model, x, y, eps, method, batch_size, device)
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + batch_size].to(device)).argmax(1) for i in range(0, len(x), batch_size)])
    return float((~ok | (pred != y.to(device))).float().mean())


def pgd_error(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int = 20, step_size: float | None = None,
              restarts: int = 1, seed: int = 0, batch_size: int = 256,
              device: torch.device | str | None = None) -> float:
    """Error under an untargeted L-inf PGD attack (Madry et al. 2018) on the eps-ball within [0, 1]."""
    from .attacks import pgd

    eps, device, _ = _check_common(model, x, y, eps, "ibp", batch_size, device)
    wrong = []
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        res = pgd(model, xb, yb, eps, norm="linf", steps=steps, step_size=step_size, restarts=restarts,
                  seed=seed + i)
        with torch.no_grad():
            clean_wrong = model(xb).argmax(1) != yb
        wrong.append(res.success | clean_wrong)
    return float(torch.cat(wrong).float().mean())


def error_table(model: nn.Module, x: Tensor, y: Tensor, eps: float, device: torch.device | str | None = None,
                batch_size: int = 256) -> dict[str, float]:
    """Clean, PGD and verified errors (IBP, CROWN-IBP and the tighter of the two), as in Zhang et al. 2020 tables."""
    eps, device, _ = _check_common(model, x, y, eps, "ibp", batch_size, device)
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + batch_size].to(device)).argmax(1) for i in range(0, len(x), batch_size)])
    correct = pred == y.to(device)
    ok_ibp = certified(model, x, y, eps, "ibp", batch_size, device) & correct
    ok_crown = certified(model, x, y, eps, "crown-ibp", batch_size, device) & correct
    return {
        "clean_error": float((~correct).float().mean()),
        "ibp_verified_error": float((~ok_ibp).float().mean()),
        "crown_ibp_verified_error": float((~ok_crown).float().mean()),
        # tightest sound verdict per image: certified by either method (both bounds are sound)
        "verified_error": float((~(ok_ibp | ok_crown)).float().mean()),
        "pgd_error": pgd_error(model, x, y, eps, batch_size=batch_size, device=device),
    }
