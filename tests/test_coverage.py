"""Coverage of torchvision's classification models (docs/design.md, "The pruning space"): every model is either
exact (masked == sliced == pruned outputs, analytic == counted MACs and parameters, the original untouched) or
refused with one line naming where, with random residual blocks dropped where it has them; docs/coverage.md states the figure this test measures."""

from __future__ import annotations

import pytest
import torch
import torchvision
from conftest import exact_or_refused, randomise_weights

from entropy_search import create_model

MODELS = torchvision.models.list_models(module=torchvision.models)
# Refused, and why (the test fails when one of them starts to work, so docs/coverage.md's figure stays true):
REFUSED = {
    **{name: "Torch-Pruning" for name in MODELS if name.startswith("swin")},  # shape inference of shifted windows
}
# Families with shape-preserving residual blocks (an identity shortcut around a branch); the others have none (VGG,
# DenseNet's and Inception's concatenations, ShuffleNet's shuffles, ViT's blocks of two residual adds)
WITH_BLOCKS = ("resnet", "resnext", "wide_resnet", "mobilenet_v2", "mobilenet_v3", "efficientnet", "regnet",
               "mnasnet", "convnext", "maxvit")
# The smallest inputs the architectures take (exactness does not depend on the size; 224 is slow on 2 cores)
SIZES = {"inception_v3": 96, "maxvit_t": 224}
# ViTs take one image size: a few patches (32 = 2x2 patches of 16, 28 = 2x2 of 14)
BUILD = {name: {"image_size": 28 if name.endswith("_14") else 32} for name in MODELS if name.startswith("vit_")}
ANALYSIS_SECONDS = 20


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_torchvision_model_is_exact_or_refused_with_a_reason(name, one_thread):
    torch.manual_seed(0)
    model = create_model(f"tv:{name}", num_classes=10, **BUILD.get(name, {})).eval()
    randomise_weights(model, 0)
    size = BUILD.get(name, {}).get("image_size") or SIZES.get(name, 64)
    space = exact_or_refused(model, name, size, REFUSED, max_seconds=ANALYSIS_SECONDS)
    if space is None:
        return
    assert bool(space.blocks) == any(name.startswith(family) for family in WITH_BLOCKS), "blocks found from the graph"
