"""Model registry: CIFAR-style networks, a small CNN for the offline digits data, torchvision models
(`tv:<name>`) and user models (`package.module:factory`).

CIFAR ResNets use projection shortcuts (1x1 conv + BN, "option B") where the shape changes, so every
channel of the residual stream is a prunable, physically removable channel.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .errors import EntropySearchError


@dataclass(frozen=True)
class ModelSpec:
    """A registered model and the input it is built for by default."""

    factory: Callable[..., nn.Module]
    in_channels: int
    image_size: int
    num_classes: int
    description: str


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(name: str, *, in_channels: int = 3, image_size: int = 32, num_classes: int = 10, description: str = ""):
    """Decorator adding a factory `f(num_classes, in_channels, **kw) -> nn.Module` to the registry."""

    def wrap(factory):
        _REGISTRY[name] = ModelSpec(factory, in_channels, image_size, num_classes, description or (factory.__doc__ or "").strip())
        return factory

    return wrap


def list_models() -> list[str]:
    """Names in the registry (besides `tv:<name>` and `package.module:factory`)."""
    return sorted(_REGISTRY)


def model_spec(name: str) -> ModelSpec:
    """The registered spec of `name`; torchvision and user models get ImageNet-like defaults."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name.startswith("tv:") or ":" in name:
        return ModelSpec(lambda **kw: create_model(name, **kw), 3, 224, 1000, name)
    raise EntropySearchError(f"unknown model {name!r}; known: {', '.join(list_models())}, tv:<torchvision name>, package.module:factory")


def create_model(name: str, num_classes: int | None = None, in_channels: int | None = None, **kwargs) -> nn.Module:
    """Build a model by registry name, `tv:<torchvision name>` or `package.module:factory`."""
    if name in _REGISTRY:
        spec = _REGISTRY[name]
        return spec.factory(
            num_classes=num_classes or spec.num_classes, in_channels=in_channels or spec.in_channels, **kwargs
        )
    if name.startswith("tv:"):
        return _torchvision_model(name[3:], num_classes or 1000, in_channels or 3, **kwargs)
    if ":" in name:
        return _user_model(name, num_classes, in_channels, **kwargs)
    raise EntropySearchError(f"unknown model {name!r}; known: {', '.join(list_models())}, tv:<torchvision name>, package.module:factory")


def _torchvision_model(name: str, num_classes: int, in_channels: int, **kwargs) -> nn.Module:
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise EntropySearchError(f"unknown torchvision classification model {name!r} (see torchvision.models.list_models())")
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    if in_channels != 3:
        _replace_first_conv(model, in_channels)
    return model


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                setattr(parent, child_name, nn.Conv2d(
                    in_channels, child.out_channels, child.kernel_size, child.stride, child.padding,
                    child.dilation, 1, child.bias is not None,
                ))
                return


def _user_model(path: str, num_classes: int | None, in_channels: int | None, **kwargs) -> nn.Module:
    module_name, _, attr = path.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise EntropySearchError(f"cannot import model factory {path!r}: {exc}") from None
    params = inspect.signature(factory).parameters
    forwards = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())  # timm's factories: **kwargs
    if num_classes is not None and ("num_classes" in params or forwards):
        kwargs["num_classes"] = num_classes
    if in_channels is not None and "in_channels" in params:
        kwargs["in_channels"] = in_channels
    elif in_channels is not None and ("in_chans" in params or (forwards and module_name.split(".")[0] == "timm")):
        kwargs["in_chans"] = in_channels  # timm's name for it
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise EntropySearchError(f"model factory {path!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


# ---------------------------------------------------------------- small CNN for digits (8x8)


@register_model("digits_cnn", in_channels=1, image_size=8, description="4-conv CNN with a residual block, for 8x8 digits")
def digits_cnn(num_classes: int = 10, in_channels: int = 1, width: int = 32) -> nn.Module:
    """A small CNN with one residual block (so the offline default exercises coupled groups)."""
    return DigitsCNN(num_classes, in_channels, width)


class DigitsCNN(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, width: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(in_channels, width), nn.ReLU(inplace=True))
        self.block = BasicBlock(width, width)
        self.down = nn.Sequential(*conv_bn(width, 2 * width, stride=2), nn.ReLU(inplace=True))
        self.head = nn.Sequential(*conv_bn(2 * width, 2 * width), nn.ReLU(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.down(self.block(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


# ---------------------------------------------------------------- CIFAR ResNets


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv_bn(cin, cout, 3, stride)
        self.conv2, self.bn2 = conv_bn(cout, cout, 3, 1)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential(*conv_bn(cin, cout, 1, stride)) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int, in_channels: int, widths=(16, 32, 64)) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise EntropySearchError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1, self.bn1 = conv_bn(in_channels, widths[0])
        self.relu = nn.ReLU(inplace=True)
        layers, cin = [], widths[0]
        for stage, width in enumerate(widths):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(cin, width, 2 if stage > 0 and i == 0 else 1))
                cin = width
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


for _depth in (20, 32, 56, 110):
    register_model(f"resnet{_depth}", description=f"CIFAR ResNet-{_depth}, projection shortcuts")(
        lambda num_classes=10, in_channels=3, _d=_depth, **kw: CifarResNet(_d, num_classes, in_channels, **kw)
    )


# ---------------------------------------------------------------- VGG-16-BN for 32x32

_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


@register_model("vgg16_bn", description="VGG-16 with BN for 32x32 inputs, one linear classifier")
def vgg16_bn(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """VGG-16-BN as used on CIFAR (conv features, global pool, one linear layer)."""
    layers: list[nn.Module] = []
    cin = in_channels
    for v in _VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [*conv_bn(cin, v), nn.ReLU(inplace=True)]
            cin = v
    return nn.Sequential(nn.Sequential(*layers), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))


# ---------------------------------------------------------------- MobileNetV2 for 32x32


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [*conv_bn(cin, hidden, 1), nn.ReLU6(inplace=True)]
        layers += [*conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6(inplace=True), *conv_bn(hidden, cout, 1)]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


# (expansion, out channels, repeats, stride); strides of the first stages are 1 for 32x32 inputs
_MBV2_CIFAR = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


@register_model("mobilenet_v2", description="MobileNetV2 for 32x32 inputs (stride 1 stem)")
def mobilenet_v2(num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0) -> nn.Module:
    """MobileNetV2 with the CIFAR strides; depthwise convs are tied to their producers when pruned."""
    cin = int(32 * width_mult)
    layers: list[nn.Module] = [*conv_bn(in_channels, cin, 3, 1), nn.ReLU6(inplace=True)]
    for expand, c, n, s in _MBV2_CIFAR:
        cout = int(c * width_mult)
        for i in range(n):
            layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, expand))
            cin = cout
    last = int(1280 * max(1.0, width_mult))
    layers += [*conv_bn(cin, last, 1), nn.ReLU6(inplace=True)]
    return nn.Sequential(nn.Sequential(*layers), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(last, num_classes))
