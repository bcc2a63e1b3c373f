"""MACs and parameters (`entropy_search.problem.macs`) on layers whose counts are known by hand."""

from __future__ import annotations

import torch
from torch import nn

from entropy_search.problem import count_macs, count_params


def test_macs_of_convolutions_and_linear_layers_by_hand():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert count_macs(conv, torch.zeros(1, 3, 10, 10)) == 8 * 3 * 9 * 10 * 10  # outputs x weights per output
    assert count_macs(conv, torch.zeros(2, 3, 10, 10)) == 2 * 8 * 3 * 9 * 10 * 10  # the whole batch
    strided = nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4, bias=False)  # depthwise, 5 x 5 outputs
    assert count_macs(strided, torch.zeros(1, 4, 10, 10)) == 4 * 9 * 5 * 5
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(2, 5))
    assert count_macs(net, torch.zeros(1, 1, 6, 6)) == 2 * 9 * 4 * 4 + 2 * 5  # BN, ReLU and pooling are not counted


def test_params_exclude_buffers_and_counting_keeps_the_mode():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 3))
    assert count_params(net) == (2 * 9 + 2) + (2 + 2) + (8 * 3 + 3)  # running mean/var are buffers
    net.train()
    before = net[1].running_mean.clone()
    count_macs(net, torch.randn(4, 1, 4, 4))
    assert net.training and torch.equal(net[1].running_mean, before)  # measured in eval mode, mode restored
    net.eval()
    count_macs(net, torch.randn(1, 1, 4, 4))
    assert not net.training
