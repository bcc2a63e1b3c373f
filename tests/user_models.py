"""An example user model, loaded as `user_models:dense_grouped_net` (tests/ is on the workers' PYTHONPATH, see
conftest.py): a concatenation (DenseNet-style, the block's input concatenated with two branches) and a grouped
convolution (ResNeXt-style, one of the branches), the two structures torchvision's DenseNets, GoogLeNet, ResNeXts and RegNets are
made of."""

from __future__ import annotations

import torch
from torch import nn


def _conv_bn_relu(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class DenseGroupedNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        self.stem = _conv_bn_relu(in_channels, width)
        self.branch = _conv_bn_relu(width, width // 2)
        self.grouped = _conv_bn_relu(width, width, groups=4)
        self.head = _conv_bn_relu(2 * width + width // 2, 2 * width, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.cat([x, self.branch(x), self.grouped(x)], dim=1)
        return self.fc(torch.flatten(self.pool(self.head(x)), 1))


def dense_grouped_net(num_classes: int = 10, in_channels: int = 1, width: int = 16) -> nn.Module:
    return DenseGroupedNet(num_classes, in_channels, width)


class NanWhenNarrow(nn.Module):
    """A network whose activations are NaN or inf when its middle group keeps 3 channels or fewer (the log of a
    non-positive number): a candidate the search must survive. It counts the channels with any nonzero
    activation, which masking and cutting agree on (a masked channel is all zeros), so the network stays exact."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.stem = _conv_bn_relu(in_channels, 8)
        self.middle = _conv_bn_relu(8, 8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.middle(self.stem(x))
        active = (x.flatten(2).abs().amax(dim=2) > 0).sum(dim=1).float()  # [N]: channels not all zero
        x = x * torch.log(active - 3).view(-1, 1, 1, 1)
        return self.fc(torch.flatten(self.pool(x), 1))


def nan_when_narrow(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    return NanWhenNarrow(num_classes, in_channels)


class ChannelMeanNet(nn.Module):
    """A network whose middle layer adds the mean over its channels to every channel: zeroing channels (masking)
    changes that mean, removing them (pruning) changes the divisor instead, so a masked evaluation and the pruned
    network compute different functions: what the exactness guard must catch."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        self.stem = _conv_bn_relu(in_channels, width)
        self.middle = _conv_bn_relu(width, width)
        self.head = _conv_bn_relu(width, 2 * width, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.middle(self.stem(x))
        x = x + x.mean(dim=1, keepdim=True)
        return self.fc(torch.flatten(self.pool(self.head(x)), 1))


def channel_mean_net(num_classes: int = 10, in_channels: int = 1, width: int = 16) -> nn.Module:
    return ChannelMeanNet(num_classes, in_channels, width)
