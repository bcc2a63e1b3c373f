"""Exactness of the pruning space on every model: masked == sliced == pruned, analytic == counted MACs."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import assert_exact
from torch import nn

from entropy_search import PruningSpace, count_macs, count_params, create_model, list_models
from entropy_search.errors import EntropySearchError
from entropy_search.models import model_spec

TORCHVISION = ["tv:resnet18", "tv:resnet50", "tv:mobilenet_v2", "tv:vgg11_bn"]
# torchvision models are checked at 64x64 (exactness does not depend on the size; 224 is slow on 2 cores)
TV_SIZE = 64


def _example(name: str, batch: int = 1) -> torch.Tensor:
    spec = model_spec(name)
    size = TV_SIZE if name.startswith("tv:") else spec.image_size
    return torch.randn(batch, spec.in_channels, size, size)


def _randomise_bn(model: nn.Module, seed: int) -> None:
    """Non-trivial BN statistics, so a mask placed before a BN shift would show."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.fixture(scope="module", params=list_models() + TORCHVISION)
def case(request):
    name = request.param
    torch.manual_seed(0)
    model = create_model(name).eval()
    _randomise_bn(model, 0)
    x = _example(name)
    return name, model, PruningSpace(model, x), x


@pytest.mark.parametrize("seed", [0, 1])
def test_masked_sliced_pruned_agree_and_macs_match_the_counter(case, seed):
    """On every model: masked == sliced == physically pruned outputs, analytic == counted MACs/params."""
    name, model, space, x = case
    rng = random.Random(seed)
    keep = [rng.uniform(0.1, 1.0) for _ in space.groups]
    assert_exact(space, _example(name, batch=3), keep)


def test_pruned_model_is_physically_smaller(case):
    name, model, space, x = case
    keep = [0.5] * len(space.groups)
    pruned = space.prune(keep)
    assert count_params(pruned) < count_params(model)
    assert count_macs(pruned, x) < 0.6 * count_macs(model, x)
    first = next(m for m in pruned.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == x.shape[1], "the input is never pruned"


@pytest.mark.parametrize(
    "name, size, published",
    [("resnet20", 32, 40.8e6), ("resnet56", 32, 125.75e6), ("vgg16_bn", 32, 313.7e6),
     ("tv:resnet18", 224, 1.82e9), ("tv:resnet50", 224, 4.09e9), ("tv:mobilenet_v2", 224, 300e6)],
)
def test_count_macs_matches_published_figures(name, size, published):
    model = create_model(name)
    macs = count_macs(model, torch.randn(1, 3, size, size))
    assert abs(macs - published) / published < 0.01


def test_group_structure():
    resnet56 = PruningSpace(create_model("resnet56").eval(), torch.randn(1, 3, 32, 32))
    assert len(resnet56.groups) == 30
    stages = [g for g in resnet56.groups if len([m for m in g.members if m.endswith("bn2")]) > 1]
    assert len(stages) == 3, "each stage's residual stream is one coupled group"
    mobilenet = PruningSpace(create_model("mobilenet_v2").eval(), torch.randn(1, 3, 32, 32))
    assert any(g.layer_type == "depthwise" for g in mobilenet.groups), "depthwise convs are tied to their producer"
    assert all("fc" not in g.members for g in resnet56.groups)
    assert [g.index for g in resnet56.groups] == list(range(30))
    assert sum(g.macs for g in resnet56.groups) <= resnet56.base_macs


@pytest.mark.parametrize("seed", [0, 1])
def test_channel_shuffle_keeps_the_shuffled_channels_whole(seed):
    """ShuffleNet v2: the channels its shuffle interleaves stay whole (named in `fixed_groups`), the stem, the head
    and every block's inner width are pruned, exactly."""
    name = "tv:shufflenet_v2_x0_5"
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).eval()
    _randomise_bn(model, 0)
    space = PruningSpace(model, _example(name))
    assert space.fixed_groups and all("splits or merges channels" in reason and "near layer" in reason for reason in space.fixed_groups)
    inner = [g for g in space.groups if ".branch2." in g.name]
    assert len(inner) == 16, "one group per block (4 + 8 + 4 blocks)"
    shuffled = ("branch1.2", "branch1.3", "branch2.5", "branch2.6")  # the branches' outputs, concatenated and shuffled
    assert not any(m.endswith(shuffled) for g in space.groups for m in g.members)
    assert {g.name for g in space.groups} >= {"conv1.0", "conv5.0"}
    rng = random.Random(seed)
    assert_exact(space, _example(name, batch=3), [rng.uniform(0.1, 1.0) for _ in space.groups])


def test_kept_channels_rounding():
    model = create_model("resnet20").eval()
    space = PruningSpace(model, torch.randn(1, 3, 32, 32), round_to=8)
    counts = space.kept_channels([0.5] * len(space.groups))
    assert all(c % 8 == 0 and c >= 8 for c in counts)
    assert space.kept_channels([1e-6] * len(space.groups)) == [8] * len(space.groups)
    exact = PruningSpace(model, torch.randn(1, 3, 32, 32))
    assert exact.kept_channels([1.0] * 12) == [g.channels for g in exact.groups]
    assert exact.kept_channels(exact.counts_to_keep([3] * 12)) == [3] * 12
    assert exact.macs([0.5] * 12) == exact.macs_of_counts(exact.kept_channels([0.5] * 12))


def test_round_count_is_the_one_rounding_rule():
    """`round_count`: keep x channels to the nearest multiple of round_to (halves up), at least one multiple
    (or every channel of a group smaller than that), never more than the group has."""
    model = create_model("resnet20").eval()
    by8 = PruningSpace(model, torch.randn(1, 3, 32, 32), round_to=8)
    assert [by8.round_count(k, 64) for k in (1.0, 0.5, 0.3, 0.32, 0.01)] == [64, 32, 16, 24, 8]
    assert [by8.round_count(k, 6) for k in (1.0, 0.5, 0.01)] == [6, 6, 6]  # fewer channels than round_to
    by1 = PruningSpace(model, torch.randn(1, 3, 32, 32))
    assert [by1.round_count(k, 10) for k in (0.25, 0.24, 0.01, 1.0)] == [3, 2, 1, 10]
    keep = [random.Random(5).uniform(0.05, 1.0) for _ in by8.groups]
    assert by8.kept_channels(keep) == [by8.round_count(k, g.channels) for k, g in zip(keep, by8.groups)]


def test_most_important_channels_are_kept():
    model = create_model("digits_cnn").eval()
    space = PruningSpace(model, torch.randn(1, 1, 8, 8))
    g = next(g for g in space.groups if g.members == ("head.0", "head.1"))
    conv = model.head[0]
    with torch.no_grad():
        conv.weight.mul_(0.01)
        conv.weight[[3, 7]] *= 1e4
    space = PruningSpace(model, torch.randn(1, 1, 8, 8))
    keep = [1.0] * len(space.groups)
    keep[g.index] = 2 / g.channels
    assert space.kept_indices(keep)[g.index].tolist() == [3, 7]


@pytest.mark.parametrize(
    "keep, message",
    [([0.5] * 3, "expected 4 keep ratios"), ([0.5, 0.5, 0.0, 0.5], "must be in (0, 1]"),
     ([0.5, 1.5, 0.5, 0.5], "must be in (0, 1]"), ([0.5, float("nan"), 0.5, 0.5], "must be in (0, 1]")],
)
def test_bad_keep_ratios_are_clear_errors(keep, message):
    space = PruningSpace(create_model("digits_cnn").eval(), torch.randn(1, 1, 8, 8))
    with pytest.raises(EntropySearchError, match=message.replace("(", r"\(").replace(")", r"\)")):
        space.macs(keep)


def test_wrong_input_shape_is_a_clear_error():
    with pytest.raises(EntropySearchError, match="does not fit the model"):
        PruningSpace(create_model("digits_cnn").eval(), torch.randn(1, 3, 8, 8))
    space = PruningSpace(create_model("digits_cnn").eval(), torch.randn(1, 1, 8, 8))
    with pytest.raises(EntropySearchError, match="does not match"):
        space.check_input(torch.randn(2, 1, 28, 28))


def test_unknown_model_is_a_clear_error():
    with pytest.raises(EntropySearchError, match="unknown model"):
        create_model("resnet57")
    with pytest.raises(EntropySearchError, match="torchvision"):
        create_model("tv:not_a_model")
    with pytest.raises(EntropySearchError, match="cannot import"):
        create_model("no_such_package.module:factory")


def test_user_model_by_import_path():
    model = create_model("entropy_search.models:digits_cnn", num_classes=3, width=8)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_masked_sliced_pruned_agree_on_cuda(case):
    """The same exactness on the GPU (fp32, TF32 off), where the search evaluates its candidates."""
    name, model, space, x = case
    keep = [random.Random(7).uniform(0.1, 1.0) for _ in space.groups]
    batch = _example(name, batch=8).cuda()
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        pruned = space.prune(keep).eval().cuda()
        model.cuda()
        with torch.no_grad():
            expected = pruned(batch)
            with space.masked(keep):
                masked = model(batch)
            with space.sliced(keep):
                sliced = model(batch)
    finally:
        model.cpu()
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    assert _rel(masked, expected) < 1e-4
    assert _rel(sliced, expected) < 1e-4
    assert space.macs(keep) == count_macs(pruned, x.cuda())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_prune_where_the_network_lives_on_the_gpu(case):
    """An evaluator moves the network to the GPU while the space's example input stays on the CPU: pruning
    there gives, on the GPU, the network that pruning on the CPU gives."""
    name, model, space, x = case
    keep = [random.Random(11).uniform(0.1, 1.0) for _ in space.groups]
    on_cpu = space.prune(keep).eval()
    model.cuda()
    try:
        on_gpu = space.prune(keep).eval()
    finally:
        model.cpu()
    assert next(on_gpu.parameters()).is_cuda
    for (key, a), (_, b) in zip(on_cpu.state_dict().items(), on_gpu.state_dict().items()):
        assert torch.equal(a, b.cpu()), key
