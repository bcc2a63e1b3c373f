"""MACs and parameters of a model, counted by PyTorch's own FLOP counter.

`torch.utils.flop_counter.FlopCounterMode` counts 2 FLOPs per multiply-accumulate of convolutions and
matrix products (BN, activations and pooling are not counted, as in the published figures), so
MACs = FLOPs / 2. Everything in this project reports MACs.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_macs(model: nn.Module, example_input: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass of `model` on `example_input` (the whole batch)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(example_input)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def count_params(model: nn.Module) -> int:
    """Number of parameters (BN running statistics, which are buffers, excluded)."""
    return sum(p.numel() for p in model.parameters())
