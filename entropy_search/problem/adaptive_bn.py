"""Adaptive batch normalisation (EagleEye, Li et al. 2020): re-estimate a pruned network's BN statistics.

Removing channels changes the distribution that every later BN layer sees, so the baseline's running
statistics no longer fit and a candidate's activations (and accuracy) before fine-tuning say little
about it. A few forward passes in training mode over a fixed batch of training images, with no
gradient, give each candidate the statistics of its own structure; that is what the search measures.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def recalibrate_batchnorm(model: nn.Module, images: torch.Tensor, *, chunk_size: int = 256) -> nn.Module:
    """Replace the running statistics of every BN layer of `model` by the exact mean and variance of its
    inputs over `images` (a cumulative average over chunks, not a momentum average); in place, eval mode."""
    layers = batchnorm_layers(model)
    momenta = [m.momentum for m in layers]
    was_training = model.training
    try:
        for m in layers:
            m.running_mean = torch.zeros_like(m.running_mean)
            m.running_var = torch.ones_like(m.running_var)
            m.num_batches_tracked = torch.zeros_like(m.num_batches_tracked)
            m.momentum = None  # cumulative average: every chunk counts the same
        model.eval()
        for m in layers:  # only BN in training mode: dropout and the like stay as they are at inference
            m.train()
        device = next(model.parameters()).device
        with torch.no_grad():
            for i in range(0, len(images), chunk_size):
                model(images[i : i + chunk_size].to(device))
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        model.train(was_training)
    return model.eval()


@contextmanager
def recalibrated_batchnorm(model: nn.Module, images: torch.Tensor | None, *, chunk_size: int = 256) -> Iterator[nn.Module]:
    """Within the block `model` runs with BN statistics re-estimated on `images` (nothing when None);
    afterwards every BN layer has the very tensors it had before."""
    if images is None or len(images) == 0:
        yield model
        return
    layers = batchnorm_layers(model)
    saved = [(m, m.running_mean, m.running_var, m.num_batches_tracked) for m in layers]
    try:
        yield recalibrate_batchnorm(model, images, chunk_size=chunk_size)
    finally:
        for m, mean, var, count in saved:
            m.running_mean, m.running_var, m.num_batches_tracked = mean, var, count
