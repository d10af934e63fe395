"""Model zoo: every model takes pixels in [0, 1] and normalises inside its first layer."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
NUM_CLASSES = 10


class Normalize(nn.Module):
    """Per-channel affine map (x - mean) / std; bound propagation passes through it exactly."""

    def __init__(self, mean: tuple[float, ...] = CIFAR_MEAN, std: tuple[float, ...] = CIFAR_STD) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def cnn(width: int = 32, linear_size: int = 256, num_classes: int = NUM_CLASSES) -> nn.Sequential:
    """CPU-friendly VGG-style CNN with batch norm (0.84M parameters at width 32) for smoothing and the lessons."""
    w = width
    return nn.Sequential(
        Normalize(),
        *_conv_bn(3, w), nn.MaxPool2d(2),
        *_conv_bn(w, 2 * w), *_conv_bn(2 * w, 2 * w), nn.MaxPool2d(2),
        *_conv_bn(2 * w, 4 * w), *_conv_bn(4 * w, 4 * w), nn.MaxPool2d(2),
        *_conv_bn(4 * w, 8 * w), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * w * 2 * 2, linear_size), nn.ReLU(inplace=True),
        nn.Linear(linear_size, num_classes),
    )


class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016), as in Cohen et al.'s CIFAR ResNet-110."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet(depth: int, num_classes: int = NUM_CLASSES) -> nn.Sequential:
    """CIFAR ResNet of depth 6n + 2 (ResNet-20: n = 3, ResNet-110: n = 18)."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth={depth} must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110)")
    n = (depth - 2) // 6
    layers: list[nn.Module] = [Normalize(), nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
    cin = 16
    for stage, cout in enumerate((16, 32, 64)):
        for i in range(n):
            layers.append(BasicBlock(cin, cout, 2 if (stage > 0 and i == 0) else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes)]
    return nn.Sequential(*layers)


def _input_layer(normalize: bool) -> list[nn.Module]:
    # normalize=False feeds raw pixels in [0, 1] to the first convolution (an ablation of the optimiser's geometry:
    # the function class is the same, since the first layer can absorb the affine map)
    return [Normalize()] if normalize else []


def _relu_after(layer: nn.Conv2d | nn.Linear, batch_norm: bool) -> list[nn.Module]:
    # batch_norm=True puts a batch norm between each hidden layer and its ReLU, as in the CNN-7+BN of Shi et al.
    # 2021; in eval mode it is a fixed per-channel affine map, so the bounds pass through it exactly
    if not batch_norm:
        return [layer, nn.ReLU()]
    if isinstance(layer, nn.Conv2d):
        return [layer, nn.BatchNorm2d(layer.out_channels), nn.ReLU()]
    return [layer, nn.BatchNorm1d(layer.out_features), nn.ReLU()]


# CROWN-IBP CNN families (Zhang et al. 2020, model_defs.py): Conv2d, ReLU, Flatten, Linear (+ optional batch norm).
def cnn_2layer(width: int = 4, linear_size: int = 256, num_classes: int = NUM_CLASSES,
               normalize: bool = True, batch_norm: bool = False) -> nn.Sequential:
    """CROWN-IBP 'small' family: 2 conv (stride 2) + 2 linear."""
    return nn.Sequential(
        *_input_layer(normalize),
        *_relu_after(nn.Conv2d(3, 4 * width, 4, stride=2, padding=1), batch_norm),
        *_relu_after(nn.Conv2d(4 * width, 8 * width, 4, stride=2, padding=1), batch_norm),
        nn.Flatten(), *_relu_after(nn.Linear(8 * width * 8 * 8, linear_size), batch_norm),
        nn.Linear(linear_size, num_classes),
    )


def cnn_3layer(width: int = 4, linear_size: int = 256, num_classes: int = NUM_CLASSES,
               normalize: bool = True, batch_norm: bool = False) -> nn.Sequential:
    """CROWN-IBP 'small' family: 3 conv + 2 linear (model_cnn_3layer_fixed, kernel 3)."""
    return nn.Sequential(
        *_input_layer(normalize),
        *_relu_after(nn.Conv2d(3, 4 * width, 3, stride=1, padding=1), batch_norm),
        *_relu_after(nn.Conv2d(4 * width, 8 * width, 4, stride=2, padding=1), batch_norm),
        *_relu_after(nn.Conv2d(8 * width, 8 * width, 4, stride=2, padding=1), batch_norm),
        nn.Flatten(), *_relu_after(nn.Linear(8 * width * 8 * 8, linear_size), batch_norm),
        nn.Linear(linear_size, num_classes),
    )


def cnn_4layer(width: int = 1, linear_size: int = 512, num_classes: int = NUM_CLASSES,
               normalize: bool = True, batch_norm: bool = False) -> nn.Sequential:
    """CROWN-IBP 'large' family: 4 conv + 3 linear (model_cnn_4layer)."""
    return nn.Sequential(
        *_input_layer(normalize),
        *_relu_after(nn.Conv2d(3, 4 * width, 3, stride=1, padding=1), batch_norm),
        *_relu_after(nn.Conv2d(4 * width, 4 * width, 4, stride=2, padding=1), batch_norm),
        *_relu_after(nn.Conv2d(4 * width, 8 * width, 3, stride=1, padding=1), batch_norm),
        *_relu_after(nn.Conv2d(8 * width, 8 * width, 4, stride=2, padding=1), batch_norm),
        nn.Flatten(), *_relu_after(nn.Linear(8 * width * 8 * 8, linear_size), batch_norm),
        *_relu_after(nn.Linear(linear_size, linear_size), batch_norm),
        nn.Linear(linear_size, num_classes),
    )


def cnn_3layer_fixed(kernel_size: int = 3, width: int = 1, linear_size: int | None = None,
                     num_classes: int = NUM_CLASSES, normalize: bool = True) -> nn.Sequential:
    """CROWN-IBP's model_cnn_3layer_fixed (Zhang et al. 2020, model_defs.py), for imported checkpoints: Conv(4w, k,
    p1) - Conv(8w, k, p1) - Conv(8w, 4, stride 4) with ReLUs, Linear(linear_size, default 64w) - ReLU - Linear.
    kernel_size is 3 or 5 (32 x 32 inputs)."""
    if kernel_size not in (3, 5):
        raise ValueError(f"kernel_size={kernel_size!r} must be 3 or 5")
    h = 8 if kernel_size == 3 else 7
    linear_size = 64 * width if linear_size is None else linear_size
    return nn.Sequential(
        *_input_layer(normalize),
        nn.Conv2d(3, 4 * width, kernel_size, stride=1, padding=1), nn.ReLU(),
        nn.Conv2d(4 * width, 8 * width, kernel_size, stride=1, padding=1), nn.ReLU(),
        nn.Conv2d(8 * width, 8 * width, 4, stride=4, padding=0), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * width * h * h, linear_size), nn.ReLU(),
        nn.Linear(linear_size, num_classes),
    )


def dm_large(linear_size: int = 512, num_classes: int = NUM_CLASSES, normalize: bool = True) -> nn.Sequential:
    """DM-large of Gowal et al. 2018 as in CROWN-IBP (model_defs_gowal.IBP_large), for imported checkpoints:
    Conv 64 - 64 - 128 (stride 2) - 128 - 128 (kernel 3, padding 1, ReLUs), Linear(linear_size) - ReLU - Linear."""
    convs = [(3, 64, 1), (64, 64, 1), (64, 128, 2), (128, 128, 1), (128, 128, 1)]
    layers: list[nn.Module] = [*_input_layer(normalize)]
    for cin, cout, stride in convs:
        layers += [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(128 * 16 * 16, linear_size), nn.ReLU(),
                         nn.Linear(linear_size, num_classes))


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resnet50_imagenet(num_classes: int = 1000) -> nn.Sequential:
    """torchvision's ImageNet ResNet-50 behind a Normalize with the ImageNet constants (Cohen et al.'s layout,
    Sequential(NormalizeLayer, resnet50)); pixels in [0, 1], N x 3 x H x W (224 x 224 in Cohen et al.)."""
    from torchvision.models import resnet50  # start-up cost (torchvision takes seconds to import)

    return nn.Sequential(Normalize(IMAGENET_MEAN, IMAGENET_STD), resnet50(weights=None, num_classes=num_classes))


REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "cnn": cnn,
    "resnet20": lambda **kw: resnet(20, **kw),
    "resnet110": lambda **kw: resnet(110, **kw),
    "cnn-2layer": cnn_2layer,
    "cnn-3layer": cnn_3layer,
    "cnn-4layer": cnn_4layer,
    "cnn-3layer-fixed": cnn_3layer_fixed,
    "dm-large": dm_large,
    "resnet50-imagenet": resnet50_imagenet,
}


def build(name: str, **kwargs) -> nn.Module:
    """Build a registered architecture; unknown names or arguments raise a ValueError naming them."""
    if name not in REGISTRY:
        raise ValueError(f"model name={name!r} is unknown; accepted: {', '.join(sorted(REGISTRY))}")
    try:
        return REGISTRY[name](**kwargs)
    except TypeError as err:
        raise ValueError(f"bad arguments {kwargs} for model {name!r}: {err}") from None


def num_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def fold_batch_norm(model: nn.Module) -> nn.Module:
    """An inference copy of ``model`` in which every BatchNorm2d that directly follows a Conv2d inside an
    nn.Sequential is folded into that convolution (torch.nn.utils.fusion.fuse_conv_bn_eval: the running statistics
    and affine map become the convolution's weight and bias), so a forward pass skips the normalisation.

    Guarantee: the copy computes the same function as ``model`` in eval mode, up to float32 rounding (differences
    of the order of 1e-6 in the logits, as a change of batch size or memory format makes), in eval mode, with its
    parameters frozen (requires_grad False: gradients flow to the input only). ``model`` is not changed; a model
    without such pairs comes back as a frozen eval copy. On 2 CPU cores the 'cnn' architecture's forward pass and
    input gradient take about a fifth less time (``scripts/bench_inference.py``)."""
    def fold(module: nn.Module) -> nn.Module:
        if isinstance(module, nn.Sequential):
            layers, out, i = list(module), [], 0
            while i < len(layers):
                if (isinstance(layers[i], nn.Conv2d) and i + 1 < len(layers)
                        and isinstance(layers[i + 1], nn.BatchNorm2d) and layers[i + 1].track_running_stats):
                    out.append(fuse_conv_bn_eval(layers[i], layers[i + 1]))
                    i += 2
                else:
                    out.append(fold(layers[i]))
                    i += 1
            return nn.Sequential(*out)
        for name, child in module.named_children():
            setattr(module, name, fold(child))
        return module

    folded = fold(copy.deepcopy(model).eval()).eval()
    for p in folded.parameters():
        p.requires_grad_(False)
    return folded


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
