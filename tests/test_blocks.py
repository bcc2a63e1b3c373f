"""Residual blocks as keep-or-drop choices (entropy_search/problem/blocks.py): found from the graph on the registry's
and torchvision's models, exact with channels (masked == sliced == pruned, analytic == counted MACs and parameters),
blocks that change shape never offered and refused by name. About 25 s on 2 cores (the torchvision spaces at 64x64
take most of it); every torchvision model is checked with random block choices in the slow test_coverage.py."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import assert_exact, randomise_weights
from torch import nn

from entropy_search import PruningSpace, count_macs, create_model, list_models
from entropy_search.errors import EntropySearchError
from entropy_search.models import model_spec
from entropy_search.problem.blocks import find_blocks

# torchvision families with shape-preserving residual blocks, at 64x64 (exactness does not depend on the size)
TORCHVISION = ["tv:resnet18", "tv:resnet50", "tv:mobilenet_v2", "tv:mobilenet_v3_small", "tv:efficientnet_b0",
               "tv:regnet_y_400mf", "tv:mnasnet0_5", "tv:convnext_tiny"]
# Blocks each model offers: every shape-preserving residual block, none of a stage's first blocks
EXPECTED = {"resnet20": 7, "resnet56": 25, "digits_cnn": 1, "mobilenet_v2": 10, "vgg16_bn": 0, "tv:resnet18": 5,
            "tv:resnet50": 12, "tv:mobilenet_v2": 10, "tv:mobilenet_v3_small": 6, "tv:efficientnet_b0": 9,
            "tv:regnet_y_400mf": 12, "tv:mnasnet0_5": 10, "tv:convnext_tiny": 18}


def _example(name: str, batch: int = 1) -> torch.Tensor:
    spec = model_spec(name)
    size = 64 if name.startswith("tv:") else spec.image_size
    return torch.randn(batch, spec.in_channels, size, size)


@pytest.fixture(scope="module", params=[n for n in list_models() if n not in ("resnet110", "resnet32")] + TORCHVISION)
def case(request):
    """(name, space, example input) of a model with random BN statistics."""
    torch.manual_seed(0)
    randomise_weights(model := create_model(request.param).eval(), 0)
    return request.param, PruningSpace(model, x := _example(request.param)), x


@pytest.mark.parametrize("seed", [0, 1])
def test_random_blocks_and_channels_are_exact(case, seed):
    """At random channel and block choices: masked == sliced == pruned, MACs and params equal a counter's, the
    dropped blocks are gone from the pruned network."""
    name, space, x = case
    rng = random.Random(seed)
    keep = [rng.uniform(0.1, 1.0) for _ in space.groups]
    dropped = [b.index for b in space.blocks if rng.random() < 0.5] if seed else [b.name for b in space.blocks]
    assert_exact(space, _example(name, batch=3), keep, dropped)


def test_offered_blocks_keep_the_shape_and_each_shape_changing_block_is_refused(case):
    name, space, x = case
    assert len(space.blocks) == EXPECTED.get(name, len(space.blocks))
    shapes = {}
    modules = dict(space.model.named_modules())
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: shapes.__setitem__(n, (i[0].shape, o.shape)))
             for n, m in modules.items() if n]
    with torch.no_grad():
        space.model(x)
    for h in hooks:
        h.remove()
    offered = {b.name for b in space.blocks}
    for b in space.blocks:
        assert shapes[b.name][0] == shapes[b.name][1] and tuple(shapes[b.name][0][1:]) == b.shape
    changing = [n for n, (i, o) in shapes.items() if i != o and n not in offered]
    assert not offered & set(changing)
    for n in changing[:3]:
        with pytest.raises(EntropySearchError, match=f"cannot drop {n}: {n} maps"):
            space.check_dropped([n])


def test_a_dropped_block_frees_its_groups_and_its_macs():
    torch.manual_seed(0)
    model = create_model("resnet20").eval()
    space = PruningSpace(model, torch.randn(1, 3, 32, 32))
    assert [b.name for b in space.blocks] == ["layer1.0", "layer1.1", "layer1.2", "layer2.1", "layer2.2", "layer3.1",
                                              "layer3.2"]
    block = space.blocks[1]
    inner = [g.index for g in space.groups if g.name == "layer1.1.conv1"]
    assert block.groups == tuple(inner) and space.idle_groups(["layer1.1"]) == inner
    assert space.groups[inner[0]].block == block.index
    full = [g.channels for g in space.groups]
    fewer = list(full)
    fewer[inner[0]] = 1
    dropped = space.check_dropped(["layer1.1"])
    assert space.macs_of_counts(full, dropped) == space.macs_of_counts(fewer, dropped) == space.base_macs - block.macs
    assert space.params_of_counts(full, dropped) == space.base_params - block.params
    assert space.macs_of_counts(fewer) < space.base_macs, "the group counts while its block is kept"


def test_blocks_asked_for_by_name_are_refused_with_the_reason():
    space = PruningSpace(create_model("resnet20").eval(), torch.randn(1, 3, 32, 32))
    for name, reason in [("layer2.0", r"layer2.0 maps \(16, 32, 32\) to \(32, 16, 16\)"),
                         ("layer1", "layer1 is not a residual block"),
                         ("layer9", "the model has no module named 'layer9'")]:
        with pytest.raises(EntropySearchError, match=f"cannot drop {name}: {reason}"):
            space.check_dropped([name])
    for bad in (7, -1, True, 1.5):
        with pytest.raises(EntropySearchError, match="offers 7 blocks"):
            space.check_dropped([bad])
    plain = PruningSpace(create_model("resnet20").eval(), torch.randn(1, 3, 32, 32), blocks=False)
    assert plain.blocks == []
    with pytest.raises(EntropySearchError, match="does not offer blocks"):
        plain.check_dropped(["layer1.0"])


# ---------------------------------------------------------------- what is and is not a block


def _conv(c: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))


class Residual(nn.Module):
    """relu(x + f(x)) with an in-place add and an in-place ReLU, as torchvision's blocks end."""

    def __init__(self, c: int, body: nn.Module | None = None) -> None:
        super().__init__()
        self.body = body if body is not None else _conv(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.body(x)
        out += x
        return self.relu(out)


class Projected(nn.Module):
    """x' + f(x) where the shortcut is a 1x1 conv: same shape, but no identity shortcut."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.body, self.shortcut = _conv(c), nn.Conv2d(c, c, 1)

    def forward(self, x):
        return self.body(x) + self.shortcut(x)


class PooledAfter(nn.Module):
    """pool(x + f(x)): the add is not the block's end."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.body, self.pool = _conv(c), nn.AvgPool2d(3, 1, 1)

    def forward(self, x):
        return self.pool(x + self.body(x))


class Toy(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.plain = Residual(c)
        self.wrapped = nn.Sequential(Residual(c))
        self.shared = Residual(c)  # called twice
        self.projected = Projected(c)
        self.pooled = PooledAfter(c)
        self.outer = Residual(c, nn.Sequential(Residual(c), _conv(c)))  # a block inside a block
        self.hidden = Residual(c)
        object.__setattr__(self, "_direct", [self.hidden])  # called through a plain list: replacing it changes nothing
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        x = self.shared(self.shared(self.wrapped(self.plain(self.stem(x)))))
        x = self._direct[0](self.outer(self.pooled(self.projected(x))))
        return self.head(x.mean((2, 3)))


def test_blocks_are_found_from_the_graph_never_from_names():
    torch.manual_seed(0)
    model = Toy().eval()
    blocks, reasons = find_blocks(model, torch.randn(1, 3, 8, 8))
    assert [b.name for b in blocks] == ["plain", "wrapped.0", "outer", "outer.body.0"]
    assert reasons["wrapped"] == "wraps the residual block wrapped.0, which is offered instead"
    assert "shared" not in reasons and "shared" not in [b.name for b in blocks], "a module called twice is no block"
    assert reasons["projected"].startswith("is not a residual block")
    assert reasons["pooled"].startswith("is not a residual block")
    assert reasons["hidden"] == "is called by its model in a way that replacing the module does not remove"


def test_nested_blocks_are_exact_in_every_combination():
    torch.manual_seed(0)
    model = Toy().eval()
    randomise_weights(model, 1)
    x = torch.randn(1, 3, 8, 8)
    space = PruningSpace(model, x)
    keep = [0.5] * len(space.groups)
    for dropped in (["outer"], ["outer.body.0"], ["outer", "outer.body.0"], ["plain", "wrapped.0"]):
        assert_exact(space, torch.randn(2, 3, 8, 8), keep, dropped)
    assert space.macs(keep, ["outer", "outer.body.0"]) == space.macs(keep, ["outer"]) < space.macs(keep)


def test_untracked_macs_inside_a_dropped_block_are_taken_off():
    """Work outside conv and linear layers that pruning does not change is a constant of the space; the part of it
    inside a block goes when the block is dropped."""

    class Gram(nn.Module):  # a matrix product outside any layer, that pruning does not change
        def __init__(self, c: int) -> None:
            super().__init__()
            self.body = _conv(c)
            self.register_buffer("table", torch.randn(16, 16))

        def forward(self, x):
            return self.body(x) * torch.mm(self.table, self.table).mean() + x  # a scale: cut channels stay zero

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.gram = Gram(8)
            self.head = nn.Linear(8, 10)

        def forward(self, x):
            return self.head(self.gram(self.stem(x)).mean((2, 3)))

    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(1, 3, 8, 8)
    space = PruningSpace(model, x)
    assert [b.name for b in space.blocks] == ["gram"]
    whole = [1.0] * len(space.groups)
    assert space.blocks[0].macs == count_macs(model, x) - count_macs(space.prune(whole, dropped=["gram"]), x)
    assert space.blocks[0].macs == 64 * 8 * 8 * 9 + 16**3, "the conv's MACs and its matrix product's"
    for dropped in ([], ["gram"]):
        assert_exact(space, torch.randn(2, 3, 8, 8), [0.5] * len(space.groups), dropped)
