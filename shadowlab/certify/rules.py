"""The bound rules of each layer type, for bound propagation (``bounds``): one ``LayerBounds`` class per layer
type, registered by type (as auto_LiRPA's operators/base.py: one contract, one class per operation).

Each rule class has two methods:

- ``interval(layer, lo, hi) -> (lo', hi')``: a box holding f(z) for every z in [lo, hi] (IBP, Gowal et al. 2018);
- ``backward(layer, A, shape, lu) -> (A', b')``: for a linear function A . f(z) (one row of A per
  specification), A . f(z) >= A' . z + b' for every z in the box ``lu = (lo, hi)`` of the layer input (CROWN,
  Zhang et al. 2018). Affine layers satisfy it with equality and ignore ``lu``; rules with ``needs_input_bounds``
  (ReLU) use it.

To add a layer type, write one ``LayerBounds`` subclass with both methods and decorate it with ``@register``.
``model_layers`` reads a model into the list of layers the rules cover, or names the layer they do not.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shadowlab.models import Normalize

Interval = tuple[Tensor, Tensor]


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


def affine_interval(layer: nn.Module, lo: Tensor, hi: Tensor, abs_linear: Callable[[Tensor], Tensor]) -> Interval:
    """The IBP box of an affine layer z -> W z + b over [lo, hi]: with centre m = (hi + lo) / 2 and radius
    r = (hi - lo) / 2, centre layer(m) = W m + b and radius |W| r, where ``abs_linear(r)`` computes |W| r (the
    layer's linear part with every weight replaced by its absolute value, no bias). Exact per coordinate."""
    m, r = (hi + lo) / 2, (hi - lo) / 2
    c, d = layer(m), abs_linear(r)
    return c - d, c + d


@register
class LinearBounds(LayerBounds):
    layer_type = nn.Linear

    @staticmethod
    def interval(layer: nn.Linear, lo: Tensor, hi: Tensor) -> Interval:
        # W z + b: |W| r is linear(r, |W|).
        return affine_interval(layer, lo, hi, lambda r: F.linear(r, layer.weight.abs()))

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
        # conv(z) + b: |W| r is conv(r) with |W| and no bias.
        return affine_interval(layer, lo, hi, lambda r: F.conv2d(r, layer.weight.abs(), None, layer.stride,
                                                                 layer.padding, layer.dilation, layer.groups))

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
        # z * scale + shift: |W| r is r * |scale|.
        return affine_interval(layer, lo, hi, lambda r: r * layer.view(layer.scale.abs(), r.dim() - 1))

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


def rule_of(layer: nn.Module) -> type[LayerBounds]:
    rule = rule_for(layer)
    assert rule is not None  # model_layers has refused unsupported layers
    return rule


def needs_input_bounds(layer: nn.Module) -> bool:
    rule = rule_for(layer)
    return rule is not None and rule.needs_input_bounds


def box_to_box(layer: nn.Module) -> bool:
    rule = rule_for(layer)
    return rule is not None and rule.box_to_box


def supported_layers() -> str:
    return ", ".join([*(cls.__name__ for cls in RULES if cls is not ChannelAffine),
                      *(cls.__name__ for cls in BATCH_NORMS)])


def model_layers(model: nn.Module) -> list[nn.Module]:
    """The layers of an nn.Sequential (nested ones flattened); raises UnsupportedLayerError naming a bad layer."""
    if not isinstance(model, nn.Sequential):
        raise UnsupportedLayerError(f"bound propagation needs an nn.Sequential of {supported_layers()}; "
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
                                        f"supported layers: {supported_layers()}")
        rule.check(layer, i)
        layers.append(layer)
    if not layers:
        raise UnsupportedLayerError("model has no layers")
    return layers
