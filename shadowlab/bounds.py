"""Bound propagation: IBP (Gowal et al. 2018), CROWN (Zhang et al. 2018) and CROWN-IBP (Zhang et al. 2020).

The input set is the L-inf ball of radius eps around x intersected with the image box:
[x_L, x_U] = [clamp(x - eps, 0, 1), clamp(x + eps, 0, 1)]. A network is an ``nn.Sequential`` of supported layers
and every layer type has one rule class (``LayerBounds``, registered in ``RULES`` by layer type) with two methods:

- ``interval(layer, lo, hi) -> (lo', hi')``: a box holding f(z) for every z in [lo, hi] (IBP);
- ``backward(layer, A, shape, lu) -> (A', b')``: for a linear function A . f(z) (one row of A per
  specification), A . f(z) >= A' . z + b' for every z in the box ``lu = (lo, hi)`` of the layer input (CROWN).
  Affine layers satisfy it with equality and ignore ``lu``; rules with ``needs_input_bounds`` (ReLU) use it.

To add a layer type, write one ``LayerBounds`` subclass with both methods and decorate it with ``@register``.
Only lower bounds are propagated backwards: an upper bound is minus the lower bound of the negated
specification, ub(A . z) = -lb(-A . z).
Everything is differentiable in the parameters and in x (the CROWN-IBP loss and the Shadow Attack need both).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from . import validate
from .models import Normalize, default_device

Interval = tuple[Tensor, Tensor]
METHODS = ("ibp", "crown-ibp", "crown")
BACKENDS = ("shadowlab", "auto_lirpa")  # auto_lirpa: optional, shadowlab/lirpa.py
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


# ------------------------------------------------------------------------------------------- layer rules
class LayerBounds:
    """The two bound rules of one layer type: the contract every rule class implements (as auto_LiRPA's Bound*).

    - ``interval(layer, lo, hi) -> (lo', hi')``: a box holding layer(z) for every z in [lo, hi] (IBP);
    - ``backward(layer, A, shape, lu) -> (A', b')``: with A of shape B x S x (layer output shape), S linear
      functions per image, A . layer(z) >= A' . z + b' for every z in the box ``lu = (lo, hi)`` of the layer input,
      A' of shape B x S x (layer input shape ``shape``), b' of shape B x S (CROWN). Affine layers meet it with
      equality and ignore ``lu`` (it is None for them).

    ``needs_input_bounds``: backward reads ``lu`` (ReLU). ``box_to_box``: an elementwise affine map, so that IBP is
    exact through it. ``check(layer, index)`` refuses configurations the rules do not cover.
    Subclass, set ``layer_type`` and decorate with ``@register``; nothing else needs to change.
    """

    layer_type: type[nn.Module] = nn.Module
    needs_input_bounds: bool = False
    box_to_box: bool = False

    @staticmethod
    def interval(layer: nn.Module, lo: Tensor, hi: Tensor) -> Interval:
        raise NotImplementedError

    @staticmethod
    def backward(layer: nn.Module, A: Tensor, shape: tuple[int, ...], lu: Interval | None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    @staticmethod
    def check(layer: nn.Module, index: int) -> None:
        """Raise UnsupportedLayerError when this layer's settings are outside what the rules cover."""


RULES: dict[type[nn.Module], type[LayerBounds]] = {}


def register(rule: type[LayerBounds]) -> type[LayerBounds]:
    """Class decorator: use ``rule`` for ``rule.layer_type`` and its subclasses."""
    RULES[rule.layer_type] = rule
    return rule


@register
class NormalizeBounds(LayerBounds):
    layer_type = Normalize
    box_to_box = True

    @staticmethod
    def interval(layer: Normalize, lo: Tensor, hi: Tensor) -> Interval:
        # (z - mean) / std is monotone per channel: map both ends, reorder in case std < 0.
        a, b = layer(lo), layer(hi)
        return torch.minimum(a, b), torch.maximum(a, b)

    @staticmethod
    def backward(layer: Normalize, A: Tensor, shape: tuple[int, ...], lu: Interval | None) -> tuple[Tensor, Tensor]:
        # A . (z - mean) / std = (A / std) . z - (A / std) . mean
        A_in = A / layer.std
        return A_in, -(A_in.flatten(3).sum(3) @ layer.mean.flatten())


@register
class LinearBounds(LayerBounds):
    layer_type = nn.Linear

    @staticmethod
    def interval(layer: nn.Linear, lo: Tensor, hi: Tensor) -> Interval:
        # W z + b over a box with centre m = (hi + lo) / 2, radius r = (hi - lo) / 2: centre W m + b, radius |W| r.
        m, r = (hi + lo) / 2, (hi - lo) / 2
        c, d = layer(m), F.linear(r, layer.weight.abs())
        return c - d, c + d

    @staticmethod
    def backward(layer: nn.Linear, A: Tensor, shape: tuple[int, ...], lu: Interval | None) -> tuple[Tensor, Tensor]:
        # A . (W z + b) = (A W) . z + A b
        bias = A @ layer.bias if layer.bias is not None else A.new_zeros(A.shape[:2])
        return A @ layer.weight, bias


@register
class Conv2dBounds(LayerBounds):
    layer_type = nn.Conv2d

    @staticmethod
    def interval(layer: nn.Conv2d, lo: Tensor, hi: Tensor) -> Interval:
        # as for Linear: centre conv(m) + b, radius conv(r) with |W| and no bias.
        m, r = (hi + lo) / 2, (hi - lo) / 2
        c = layer(m)
        d = F.conv2d(r, layer.weight.abs(), None, layer.stride, layer.padding, layer.dilation, layer.groups)
        return c - d, c + d

    @staticmethod
    def backward(layer: nn.Conv2d, A: Tensor, shape: tuple[int, ...], lu: Interval | None) -> tuple[Tensor, Tensor]:
        # A . (conv(z) + b) = conv_transpose(A) . z + sum_c b_c sum_hw A_chw  (conv_transpose is the adjoint of
        # conv); output_padding restores the rows/columns a strided convolution never reads, so A' has the input's
        # shape.
        b, s = A.shape[:2]
        out_hw = A.shape[-2:]
        pad = tuple(shape[1 + i] - ((out_hw[i] - 1) * layer.stride[i] - 2 * layer.padding[i]
                                    + layer.dilation[i] * (layer.kernel_size[i] - 1) + 1) for i in range(2))
        A_flat = A.reshape(b * s, *A.shape[2:]).contiguous(memory_format=torch.channels_last)  # faster on CPU
        A_in = F.conv_transpose2d(A_flat, layer.weight, None, layer.stride, layer.padding, pad, layer.groups,
                                  layer.dilation)
        bias = A.sum((3, 4)) @ layer.bias if layer.bias is not None else A.new_zeros(b, s)
        return A_in.reshape(b, s, *shape), bias

    @staticmethod
    def check(layer: nn.Conv2d, index: int) -> None:
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise UnsupportedLayerError(f"layer {index} (Conv2d) must use numeric zero padding, got padding="
                                        f"{layer.padding!r}, padding_mode={layer.padding_mode!r}")


def relu_relaxation(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Linear bounds a_lo z <= relu(z) <= a_up z + b_up on [lo, hi] (CROWN, Zhang et al. 2018, adaptive lower slope).

    Stable neurons are exact (slopes 1 or 0). Unstable ones (lo < 0 < hi) get the chord a_up = hi / (hi - lo),
    b_up = -a_up lo above, and the lower line a_lo z with a_lo = 1 if hi >= -lo else 0. All three have the shape
    of lo.
    """
    active, dead = lo >= 0, hi <= 0
    unstable = ~(active | dead)
    width = torch.where(unstable, hi - lo, torch.ones_like(hi))  # no division by zero, even in the gradient
    a_up = torch.where(unstable, hi / width, active.to(hi.dtype))
    b_up = torch.where(unstable, -a_up * lo, torch.zeros_like(hi))
    a_lo = torch.where(unstable, (hi >= -lo).to(hi.dtype), active.to(hi.dtype))
    return a_lo, a_up, b_up


@register
class ReLUBounds(LayerBounds):
    layer_type = nn.ReLU
    needs_input_bounds = True

    @staticmethod
    def interval(layer: nn.ReLU, lo: Tensor, hi: Tensor) -> Interval:
        # ReLU is monotone: [relu(lo), relu(hi)].
        return F.relu(lo), F.relu(hi)

    @staticmethod
    def backward(layer: nn.ReLU, A: Tensor, shape: tuple[int, ...], lu: Interval | None) -> tuple[Tensor, Tensor]:
        # a positive coefficient takes the lower line, a negative one the upper line:
        # A . relu(z) >= (A+ a_lo + A- a_up) . z + A- . b_up
        assert lu is not None   # needs_input_bounds: the propagation always passes the input box
        a_lo, a_up, b_up = relu_relaxation(*lu)
        A_in = A * torch.where(A >= 0, a_lo.unsqueeze(1), a_up.unsqueeze(1))
        return A_in, (A.clamp(max=0).flatten(2) @ b_up.flatten(1).unsqueeze(2)).squeeze(2)


@register
class FlattenBounds(LayerBounds):
    layer_type = nn.Flatten
    box_to_box = True

    @staticmethod
    def interval(layer: nn.Flatten, lo: Tensor, hi: Tensor) -> Interval:
        # a reshape keeps every coordinate's interval.
        return layer(lo), layer(hi)

    @staticmethod
    def backward(layer: nn.Flatten, A: Tensor, shape: tuple[int, ...], lu: Interval | None) -> tuple[Tensor, Tensor]:
        # a reshape: the coefficients take the input's shape.
        return A.reshape(*A.shape[:2], *shape), A.new_zeros(A.shape[:2])

    @staticmethod
    def check(layer: nn.Flatten, index: int) -> None:
        if layer.start_dim != 1 or layer.end_dim != -1:
            raise UnsupportedLayerError(f"layer {index} (Flatten) must flatten dims 1..-1, got start_dim="
                                        f"{layer.start_dim}, end_dim={layer.end_dim}")


@register
class ChannelAffineBounds(LayerBounds):
    """A batch norm with its statistics fixed (see fixed_statistics): z * scale + shift per channel."""

    layer_type = ChannelAffine
    box_to_box = True

    @staticmethod
    def interval(layer: ChannelAffine, lo: Tensor, hi: Tensor) -> Interval:
        # centre m * scale + shift, radius r * |scale|.
        m, r = (hi + lo) / 2, (hi - lo) / 2
        c, d = layer(m), r * layer.view(layer.scale.abs(), r.dim() - 1)
        return c - d, c + d

    @staticmethod
    def backward(layer: ChannelAffine, A: Tensor, shape: tuple[int, ...], lu: Interval | None
                 ) -> tuple[Tensor, Tensor]:
        # A . (z * scale + shift) = (A * scale) . z + A . shift
        return A * layer.view(layer.scale, len(shape)), (A * layer.view(layer.shift, len(shape))).flatten(2).sum(2)


def rule_for(layer: nn.Module) -> type[LayerBounds] | None:
    """The rule class registered for the layer's type or its nearest base class, None when there is none."""
    for cls in type(layer).__mro__:
        if cls in RULES:
            return RULES[cls]
    return None


def _rule(layer: nn.Module) -> type[LayerBounds]:
    rule = rule_for(layer)
    assert rule is not None  # model_layers has refused unsupported layers
    return rule


def _needs_input_bounds(layer: nn.Module) -> bool:
    rule = rule_for(layer)
    return rule is not None and rule.needs_input_bounds


def _box_to_box(layer: nn.Module) -> bool:
    rule = rule_for(layer)
    return rule is not None and rule.box_to_box


# read-only views by layer type, as the rules were looked up before they became classes
INTERVAL_RULES: dict[type, Callable[..., Interval]] = {t: r.interval for t, r in RULES.items()}
BACKWARD_RULES: dict[type, Callable[..., tuple[Tensor, Tensor]]] = {t: r.backward for t, r in RULES.items()}


# ------------------------------------------------------------------------------------------- model & inputs
def _supported() -> str:
    return ", ".join([*(cls.__name__ for cls in RULES if cls is not ChannelAffine),
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
        rule = rule_for(layer)
        if rule is None:
            raise UnsupportedLayerError(f"layer {i} ({name}) is not supported by bound propagation; "
                                        f"supported layers: {_supported()}")
        rule.check(layer, i)
        layers.append(layer)
    if not layers:
        raise UnsupportedLayerError("model has no layers")
    return layers


# argument checks: shadowlab.validate (bound propagation also accepts N x D vectors, hence ndim=None)
def _check_eps(eps: float) -> float:
    return validate.eps(eps)


def _check_x(x: Tensor) -> None:
    validate.images(x, "x", ndim=None)


def _check_beta(beta: float) -> float:
    return validate.probability(beta, "beta")


def _check_labels(y: Tensor, n: int | None, num_classes: int, name: str = "y") -> None:
    validate.labels(y, n, name, num_classes)


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
    if check:
        _check_x(x)
    eps = _check_eps(eps)
    return _prepare_box(model, x, (x - eps).clamp(0, 1), (x + eps).clamp(0, 1), C)


def _prepare_box(model: nn.Module, x: Tensor, lo: Tensor, hi: Tensor, C: Tensor | None) -> _Problem:
    """The problem of bounding the model over the box [lo, hi] around x (x: the batch the shapes and a training-mode
    batch norm's statistics are read from)."""
    layers = model_layers(model)
    shapes = _shapes(layers, x)
    layers = fixed_statistics(layers, x)
    k = math.prod(shapes[-1])
    if C is not None:
        if not isinstance(C, Tensor) or C.dim() != 3 or C.shape[0] != x.shape[0] or C.shape[2] != k:
            shape = tuple(C.shape) if isinstance(C, Tensor) else type(C).__name__
            raise ValueError(f"C must have shape {x.shape[0]} x M x {k} (images x specifications x model "
                             f"outputs), got {shape}")
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
        boxes.append(_rule(layer).interval(layer, *boxes[-1]))
        for work in _COUNTERS:
            work.interval_elements += 2 * boxes[-1][0].numel()
    return boxes


def _ibp_spec(p: _Problem, boxes: list[Interval], upper: bool = True) -> tuple[Tensor, Tensor | None]:
    """IBP bounds on C z (or on z without C); C is folded into the last layer when it is affine (elision)."""
    if p.C is None:
        return boxes[-1][0], (boxes[-1][1] if upper else None)
    last, n = p.layers[-1], len(p.layers)
    spec = p.C.reshape(*p.C.shape[:2], *p.shapes[n])
    if _needs_input_bounds(last):  # nothing to fold into: bound C z over the output box
        A, bias, (lo, hi) = spec, p.C.new_zeros(p.C.shape[:2]), boxes[n]
    else:
        A, bias = _rule(last).backward(last, spec, p.shapes[n - 1], None)
        lo, hi = boxes[n - 1]
    return _concretize(A, bias, lo, hi), (-_concretize(-A, -bias, lo, hi) if upper else None)


def _backward(p: _Problem, upto: int, bounds: list[Interval | None], A: Tensor) -> Tensor:
    """CROWN: lower bound of A . (output of layers[:upto]) over the input box, by the backward rules."""
    bias = A.new_zeros(A.shape[:2])
    for work in _COUNTERS:
        work.backward_passes += 1
    for i in reversed(range(upto)):
        A, b = _rule(p.layers[i]).backward(p.layers[i], A, p.shapes[i], bounds[i])
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
    if any(_needs_input_bounds(layer) for layer in layers):
        return False
    return sum(not _box_to_box(layer) for layer in layers) <= 1


def _crown(p: _Problem, intermediate: str, upper: bool, boxes: list[Interval] | None = None
           ) -> tuple[Tensor, Tensor | None]:
    """CROWN bounds on C z; pre-activation bounds by CROWN itself or taken from IBP (= CROWN-IBP)."""
    n = len(p.layers)
    bounds: list[Interval | None] = [None] * n
    if intermediate == "ibp":
        boxes = boxes if boxes is not None else _ibp_forward(p, upto=n - 1)
        bounds = [boxes[i] if _needs_input_bounds(layer) else None for i, layer in enumerate(p.layers)]
    else:
        for i, layer in enumerate(p.layers):
            if _needs_input_bounds(layer):
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
    num_classes = validate.count(num_classes, "num_classes", minimum=2)
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

    With upper=False only the lower bound is computed (half the work) and None is returned in its place. The bounds
    are differentiable in x and the parameters. With intermediate="crown" the pre-activation bounds are computed in
    chunks of about ``CROWN_CHUNK_ELEMENTS`` coefficients, each checkpointed under autograd (recomputed in the
    backward pass), so memory stays at one chunk whatever the grad mode.
    """
    validate.choice(intermediate, "intermediate", INTERMEDIATE)
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
    first = next((i for i, layer in enumerate(layers) if not _box_to_box(layer)), len(layers))
    lo0, hi0 = boxes[first]
    tightness_0 = ((hi0 - lo0) / 2).mean()
    tight, relu, count = lo0.new_zeros(()), lo0.new_zeros(()), 0
    for i, layer in enumerate(layers):
        if not _needs_input_bounds(layer):
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
    regularizer = validate.number(regularizer, "regularizer", low=0.0)
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


def box_lower_bounds(model: nn.Module, lo: Tensor, hi: Tensor, C: Tensor, method: str = "ibp",
                     check: bool = True) -> Tensor:
    """Lower bounds on C z for every input in the box [lo, hi] (B x M), by one method of ``METHODS``.

    Unlike ``lower_bounds`` the box is taken as given, not clipped to the image range [0, 1]: e.g. the box
    x +- eps / std in a normalised input space, as the CROWN-IBP authors' code bounds it (``shadow_faithful``).
    lo <= hi, both B x (input shape); C: B x M x K. Sound over that box; differentiable in lo, hi and the parameters.
    check=False skips the argument checks (a host synchronisation each), for callers in a loop that built the box.
    """
    validate.choice(method, "method", METHODS)
    if check:
        if not isinstance(lo, Tensor) or not isinstance(hi, Tensor) or lo.shape != hi.shape:
            raise ValueError("lo and hi must be tensors of the same shape (the corners of the box)")
        if bool((lo > hi).any()):
            raise ValueError("lo must be <= hi everywhere (an empty box has no bounds)")
    return _lower_margins(_prepare_box(model, (lo + hi) / 2, lo, hi, C), method)


def _lower_margins(p: _Problem, method: str) -> Tensor:
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
    return _lower_margins(_prepare(model, x, eps, C), method)


def _check_common(model: nn.Module, x: Tensor, labels: Tensor, eps: float, method: str, batch_size: int,
                  device: torch.device | str | None, name: str = "y", methods: tuple[str, ...] = METHODS
                  ) -> tuple[float, torch.device, int]:
    validate.choice(method, "method", methods)
    eps, device = check_inputs(model, x, eps, batch_size, device)
    k = math.prod(_shapes(model_layers(model), x[:1].to(device))[-1])
    _check_labels(labels, x.shape[0], k, name)
    return eps, device, k


def check_inputs(model: nn.Module, x: Tensor, eps: float, batch_size: int, device: torch.device | str | None
                 ) -> tuple[float, torch.device]:
    """The checks every verifier makes before bounding (shadowlab's and the auto_LiRPA adapter's): x N x C x H x W
    in [0, 1], eps a finite number >= 0, batch_size an integer >= 1, no batch norm in training mode (an image's
    output would depend on its batch). Moves the model to ``device`` (default CUDA when available) and returns
    (eps as a float, the device). ValueError names the argument."""
    validate.count(batch_size, "batch_size")
    _check_x(x)
    eps = _check_eps(eps)
    if any(isinstance(m, BATCH_NORMS) and m.training for m in model.modules()):
        raise ValueError("model has batch-norm layers in training mode, where an image's output depends on the "
                         "rest of the batch: call model.eval() before certifying")
    device = torch.device(device) if device is not None else default_device()
    model.to(device)
    return eps, device


def _backend(backend: str):
    """The auto_LiRPA adapter for backend="auto_lirpa" (optional, see shadowlab/lirpa.py), None for shadowlab's own."""
    validate.choice(backend, "backend", BACKENDS)
    if backend == "shadowlab":
        return None
    from . import lirpa
    return lirpa


def certified(model: nn.Module, x: Tensor, labels: Tensor, eps: float, method: str = "crown-ibp",
              batch_size: int = 256, device: torch.device | str | None = None, backend: str = "shadowlab") -> Tensor:
    """Bool per image: every margin z_label - z_j (j != label) has a lower bound >= 0 on the eps-ball (certificate).

    backend="auto_lirpa" computes the same bounds with auto_LiRPA (``lirpa.certified``; also method "alpha-crown").
    """
    if _backend(backend) is not None:
        return _backend(backend).certified(model, x, labels, eps, method, batch_size, device)
    eps, device, k = _check_common(model, x, labels, eps, method, batch_size, device, "labels")
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            xb, lab = x[i:i + batch_size].to(device), labels[i:i + batch_size].to(device)
            p = _prepare(model, xb, eps, _margin_spec(lab, k).to(xb.dtype), check=False)
            out.append((_lower_margins(p, method) >= 0).all(1))
    return torch.cat(out)


def verified_error(model: nn.Module, x: Tensor, y: Tensor, eps: float, method: str = "crown-ibp",
                   batch_size: int = 256, device: torch.device | str | None = None, backend: str = "shadowlab"
                   ) -> float:
    """Fraction of images not certified at eps (some margin lower bound < 0) or misclassified (Zhang et al. 2020).

    backend="auto_lirpa" certifies with auto_LiRPA (``lirpa.certified``), which adds method "alpha-crown".
    """
    lirpa = _backend(backend)
    methods = tuple(lirpa.METHODS) if lirpa is not None else METHODS
    eps, device, _ = _check_common(model, x, y, eps, method, batch_size, device, methods=methods)
    ok = certified(model, x, y, eps, method, batch_size, device, backend)
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + batch_size].to(device)).argmax(1) for i in range(0, len(x), batch_size)])
    return float((~ok | (pred != y.to(device))).float().mean())


def pgd_error(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int = 20, step_size: float | None = None,
              restarts: int = 1, seed: int = 0, batch_size: int = 256,
              device: torch.device | str | None = None) -> float:
    """Error under an untargeted L-inf PGD attack (Madry et al. 2018) on the eps-ball within [0, 1]: the mean of
    ``pgd_wrong``."""
    return float(pgd_wrong(model, x, y, eps, steps, step_size, restarts, seed, batch_size, device).float().mean())


def pgd_wrong(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int = 20, step_size: float | None = None,
              restarts: int = 1, seed: int = 0, batch_size: int = 256,
              device: torch.device | str | None = None) -> Tensor:
    """Bool per image (on the CPU): misclassified, or misclassified after an untargeted L-inf PGD attack on the
    eps-ball within [0, 1]. Batch i (of batch_size images) is attacked with seed + i x batch_size."""
    from .attacks import pgd

    eps, device, _ = _check_common(model, x, y, eps, "ibp", batch_size, device)
    wrong = []
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        res = pgd(model, xb, yb, eps, norm="linf", steps=steps, step_size=step_size, restarts=restarts,
                  seed=seed + i)
        with torch.no_grad():
            clean_wrong = model(xb).argmax(1) != yb
        wrong.append((res.success | clean_wrong).cpu())
    return torch.cat(wrong)


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


def margin_lower_bounds(model: nn.Module, x: torch.Tensor, label: torch.Tensor | int, eps: float,
                        num_classes: int = 10) -> torch.Tensor:
    """Certified lower bounds of z_label - z_j (j != label) on the eps-ball, B x (K-1): max of CROWN-IBP and IBP."""
    dev = next(model.parameters()).device
    x = x.to(dev)
    labels = torch.as_tensor(label, device=dev).reshape(-1).expand(x.shape[0]).long()
    return tightest_lower_bounds(model, x, eps, margin_spec(labels, num_classes)).cpu()


def tightest_lower_bounds(model: nn.Module, x: Tensor, eps: float, C: Tensor) -> Tensor:
    """Lower bounds on C z over the eps-ball (B x M): the elementwise larger of CROWN-IBP's and IBP's, the tightest
    sound bound the certifiably trained models are judged by (both hold, so their max does). No gradient."""
    with torch.no_grad():
        return torch.maximum(crown_bounds(model, x, eps, C=C, intermediate="ibp", upper=False)[0],
                             ibp_bounds(model, x, eps, C=C)[0])
