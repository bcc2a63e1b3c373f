"""Spatial entropy: closed forms, agreement with a slow per-map reference, the network probe."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch
from bench_scripts import load_bench
from torch import nn

import entropy_search.problem.entropy as ent
from entropy_search.errors import EntropySearchError
from entropy_search.models import create_model
from entropy_search.problem.entropy import EntropyProbe, measured_layers, network_entropy, spatial_entropy

ROOT = Path(__file__).resolve().parents[1]
exact_entropy = functools.partial(network_entropy, sample=1.0)


# ---------------------------------------------------------------- slow reference (one map at a time)


def _levels(a: torch.Tensor, bins: int) -> list[list[int]]:
    lo, hi = float(a.min()), float(a.max())
    if hi == lo:
        return [[0] * a.shape[1] for _ in range(a.shape[0])]
    return [[min(int((float(v) - lo) / (hi - lo) * bins), bins - 1) for v in row] for row in a]


def _plugin(counts: dict, n: int) -> float:
    return -sum(c / n * math.log(c / n) for c in counts.values()) if n else 0.0


def reference(a: torch.Tensor, bins: int, method: str) -> float:
    """DESIGN.md's definition, written out for one map [H, W] with Python loops."""
    h, w = a.shape
    if method == "mass":
        vals = [max(float(v), 0.0) for v in a.flatten()]
        s = sum(vals)
        return -sum(v / s * math.log(v / s) for v in vals if v > 0) if s > 0 else 0.0
    q = _levels(a, bins)
    counts: dict = {}
    if method == "histogram":
        for row in q:
            for v in row:
                counts[v] = counts.get(v, 0) + 1
        return _plugin(counts, h * w)
    for i in range(h):
        for j in range(w):
            if j + 1 < w:
                counts[(q[i][j], q[i][j + 1])] = counts.get((q[i][j], q[i][j + 1]), 0) + 1
            if i + 1 < h:
                counts[(q[i][j], q[i + 1][j])] = counts.get((q[i][j], q[i + 1][j]), 0) + 1
    return _plugin(counts, h * (w - 1) + (h - 1) * w)


def _batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, 7, generator=g, dtype=torch.float64)
    x[0, 1] = 2.0  # constant map
    x[1, 2] = torch.randint(0, 3, (5, 7), generator=g).double()  # few distinct values, ties at the max
    x[2, 3] = x[2, 3].clamp(min=0)  # many zeros
    return x


# ---------------------------------------------------------------- closed forms

METHODS = ("cooccurrence", "histogram", "mass")


def test_constant_map_gives_zero():
    x = torch.full((2, 3, 6, 5), 1.7)
    assert spatial_entropy(x).abs().max() == 0
    assert spatial_entropy(x, method="histogram").abs().max() == 0
    assert spatial_entropy(torch.zeros(1, 2, 4, 4), method="mass").abs().max() == 0


@pytest.mark.parametrize("bins", [4, 16])
def test_iid_uniform_tends_to_2_log_g(bins):
    x = torch.randint(0, bins, (1, 2, 256, 256), generator=torch.Generator().manual_seed(1)).float()
    torch.testing.assert_close(spatial_entropy(x, bins), torch.full((1, 2), 2 * math.log(bins)), atol=5e-3, rtol=0)
    hist = spatial_entropy(x, bins, "histogram")
    torch.testing.assert_close(hist, torch.full((1, 2), math.log(bins)), atol=2e-3, rtol=0)


def test_checkerboard_gives_log_2():
    """Even sides: (0, 1) and (1, 0) pairs are equally frequent in both directions."""
    board = ((torch.arange(8).view(8, 1) + torch.arange(12)) % 2).float().view(1, 1, 8, 12) * 3 - 1
    assert spatial_entropy(board).item() == pytest.approx(math.log(2), abs=1e-6)
    assert spatial_entropy(board, method="histogram").item() == pytest.approx(math.log(2), abs=1e-6)


def test_mass_of_uniform_map_is_log_hw():
    assert spatial_entropy(torch.full((1, 1, 6, 5), 0.3), method="mass").item() == pytest.approx(math.log(30), abs=1e-5)
    one_hot = torch.zeros(1, 1, 4, 4)
    one_hot[0, 0, 1, 2] = 5.0
    assert spatial_entropy(one_hot, method="mass").item() == 0


def test_affine_invariance():
    x = torch.randint(0, 16, (2, 3, 12, 10), generator=torch.Generator().manual_seed(2)).float()
    for method in ("cooccurrence", "histogram"):
        torch.testing.assert_close(spatial_entropy(2.5 * x + 3.0, method=method), spatial_entropy(x, method=method))
    torch.testing.assert_close(spatial_entropy(7.0 * x, method="mass"), spatial_entropy(x, method="mass"))


def test_maps_without_pairs_and_broken_maps():
    assert spatial_entropy(torch.randn(2, 3, 1, 1)).abs().max() == 0
    x = torch.randn(1, 3, 4, 4)
    x[0, 1, 2, 2] = float("nan")
    x[0, 2, 0, 0] = float("inf")
    for method in METHODS:
        out = spatial_entropy(x, method=method)
        assert out[0, 0].isfinite() and out[0, 1:].isnan().all(), method


# ---------------------------------------------------------------- agreement with the slow reference


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bins", [2, 5, 16])
def test_batch_equals_slow_reference(method, bins):
    x = _batch()
    got = spatial_entropy(x, bins, method)
    assert got.shape == (3, 4) and got.dtype == torch.float64
    want = torch.tensor([[reference(x[b, c], bins, method) for c in range(4)] for b in range(3)], dtype=torch.float64)
    torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)
    one_by_one = torch.stack([torch.stack([spatial_entropy(x[b : b + 1, c : c + 1], bins, method)[0, 0] for c in range(4)]) for b in range(3)])
    assert torch.equal(got, one_by_one)


@pytest.mark.parametrize("method", ["cooccurrence", "histogram"])
def test_small_maps_equal_slow_reference(method):
    """2x2 and 3x3 maps are counted by comparing codes (no bins); 1x2 and 2x1 maps have pairs in one direction."""
    g = torch.Generator().manual_seed(7)
    for shape in ((2, 2), (3, 3), (1, 2), (2, 1), (1, 5)):
        x = torch.randn(2, 3, *shape, generator=g, dtype=torch.float64)
        x[1, 1] = x[1, 1].round()  # ties
        want = torch.tensor([[reference(x[b, c], 4, method) for c in range(3)] for b in range(2)], dtype=torch.float64)
        torch.testing.assert_close(spatial_entropy(x, 4, method), want, atol=1e-9, rtol=0)


@pytest.mark.parametrize("pairwise", [True, False])
def test_counting_strategies_agree(monkeypatch, pairwise):
    x = _batch()
    want = {m: spatial_entropy(x, 5, m) for m in ("cooccurrence", "histogram")}
    monkeypatch.setattr(ent, "_pairwise", lambda n, k: pairwise)
    for m, value in want.items():
        torch.testing.assert_close(spatial_entropy(x, 5, m), value, atol=1e-12, rtol=0)
        total = ent._entropy_sum(x.reshape(12, 35), 5, 7, 5, m, False)
        torch.testing.assert_close(total, value.sum(), atol=1e-9, rtol=0)


def test_float32_and_chunked_equal_one_pass(monkeypatch):
    x = torch.randn(4, 8, 9, 11, generator=torch.Generator().manual_seed(3))
    whole = {m: spatial_entropy(x, method=m) for m in METHODS}
    assert whole["cooccurrence"].dtype == torch.float32
    monkeypatch.setattr(ent, "_CHUNK_KEYS", 500)  # several chunks of a few maps each
    for m in METHODS:
        assert torch.equal(spatial_entropy(x, method=m), whole[m])


def test_relu_option_equals_clamped_input():
    x = torch.randn(2, 5, 8, 8, generator=torch.Generator().manual_seed(4))
    x[0, 0] = -1.0  # all negative: all zero after ReLU
    for m in METHODS:
        torch.testing.assert_close(spatial_entropy(x, method=m, relu=True), spatial_entropy(x.clamp(min=0), method=m))


def test_empty_batch():
    assert spatial_entropy(torch.randn(0, 3, 4, 4)).shape == (0, 3)


@pytest.mark.parametrize(
    "act, kw, match",
    [
        (torch.randn(3, 4, 4), {}, "4-D"),
        ([[1.0]], {}, "torch.Tensor"),
        (torch.randn(1, 1, 4, 4), {"bins": 1}, "bins"),
        (torch.randn(1, 1, 4, 4), {"bins": True}, "bins"),
        (torch.randn(1, 1, 4, 4), {"bins": 16.0}, "bins"),
        (torch.randn(1, 1, 4, 4), {"method": "glcm"}, "unknown entropy method"),
    ],
)
def test_bad_input(act, kw, match):
    with pytest.raises(EntropySearchError, match=match):
        spatial_entropy(act, **kw)


# ---------------------------------------------------------------- the network's entropy


def _bn_outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    outs: dict[str, torch.Tensor] = {}
    handles = [
        m.register_forward_hook(lambda mod, i, o, n=n: outs.__setitem__(n, o.clone()))
        for n, m in model.named_modules()
        if isinstance(m, nn.BatchNorm2d)
    ]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return outs


def _mean(maps: list[torch.Tensor]) -> float:
    flat = torch.cat([m.flatten() for m in maps])
    return float(flat.double().mean())


@pytest.fixture(scope="module")
def digits():
    torch.manual_seed(0)
    model = create_model("digits_cnn").eval()
    for m in model.modules():  # non-trivial BN statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model, torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(5))


def test_network_entropy_is_mean_over_bn_maps(digits):
    model, x = digits
    outs = _bn_outputs(model, x)
    assert measured_layers(model, "bn") == list(outs)
    for method in METHODS:
        want = _mean([spatial_entropy(o, method=method) for o in outs.values()])
        assert exact_entropy(model, x, method=method) == pytest.approx(want, rel=1e-6)
    want_relu = _mean([spatial_entropy(o.clamp(min=0)) for o in outs.values()])
    assert exact_entropy(model, x, layers="bn_relu") == pytest.approx(want_relu, rel=1e-6)
    last = [o for o in outs.values() if o.shape[-1] == 4]  # the 4x4 stage
    assert len(last) == 2
    assert exact_entropy(model, x, layers="last_stage") == pytest.approx(_mean([spatial_entropy(o) for o in last]), rel=1e-6)
    names = ["stem.1", "head.1"]
    want = _mean([spatial_entropy(outs[n], bins=8) for n in names])
    assert exact_entropy(model, x, layers=names, bins=8) == pytest.approx(want, rel=1e-6)


def test_kept_channels_only_count(digits):
    model, x = digits
    outs = _bn_outputs(model, x)
    kept = {"stem.1": torch.tensor([0, 3, 5]), "down.1": [1, 2, 40, 63], "head.1": torch.tensor([], dtype=torch.long)}
    parts = [spatial_entropy(o[:, torch.as_tensor(kept[n], dtype=torch.long)] if n in kept else o) for n, o in outs.items()]
    assert exact_entropy(model, x, kept=kept) == pytest.approx(_mean(parts), rel=1e-6)
    mask = torch.zeros(32, dtype=torch.bool)
    mask[[0, 3, 5]] = True
    assert exact_entropy(model, x, kept={"stem.1": mask}) == exact_entropy(model, x, kept={"stem.1": [5, 0, 3]})


def test_physically_smaller_model_counts_all_channels():
    model = create_model("digits_cnn", width=8).eval()
    x = torch.randn(3, 1, 8, 8)
    outs = _bn_outputs(model, x)
    assert exact_entropy(model, x) == pytest.approx(_mean([spatial_entropy(o) for o in outs.values()]), rel=1e-6)


def test_probe_during_an_existing_forward(digits):
    model, x = digits
    with torch.no_grad():
        plain = model(x)
    probe = EntropyProbe(model, sample=1.0)
    with probe, torch.no_grad():
        y1 = model(x[:3])
        model(x[3:])
    assert torch.equal(y1, plain[:3])  # the probe does not change what the model computes
    assert not any(m._forward_hooks for m in model.modules())  # detached
    assert probe.count == 6 * sum(o.shape[1] for o in _bn_outputs(model, x).values())
    assert probe.value() == pytest.approx(exact_entropy(model, x), rel=1e-6)
    assert set(probe.per_layer()) == set(measured_layers(model))
    with pytest.raises(EntropySearchError, match="no activation map"):
        probe.reset().value()
    with probe:  # works with gradients on, too
        model(x.requires_grad_(True)).sum().backward()
    assert probe.value() == pytest.approx(exact_entropy(model, x.detach()), rel=1e-6)


def test_sampled_estimator(digits):
    model, x = digits
    exact = exact_entropy(model, x)
    assert network_entropy(model, x) == network_entropy(model, x, sample=ent.DEFAULT_SAMPLE) != exact
    probe = EntropyProbe(model, sample=0.25, seed=3)
    with probe, torch.no_grad():
        model(x)
    total = sum(6 * o.shape[1] for o in _bn_outputs(model, x).values())
    assert probe.count == sum(math.ceil(0.25 * 6 * o.shape[1]) for o in _bn_outputs(model, x).values()) < total
    assert probe.value() == network_entropy(model, x, sample=0.25, seed=3)  # fixed seed: the same maps
    assert probe.value() == pytest.approx(exact, abs=0.2)
    kept = {"stem.1": list(range(0, 32, 2))}
    assert network_entropy(model, x, sample=0.5, kept=kept) == pytest.approx(exact_entropy(model, x, kept=kept), abs=0.2)


def test_last_stage_of_cifar_networks():
    x = torch.randn(1, 3, 32, 32)
    for name, n_last in (("resnet20", 7), ("vgg16_bn", 3)):
        model = create_model(name).eval()
        probe = EntropyProbe(model, "last_stage")
        with probe, torch.no_grad():
            model(x)
            first = probe.value()
            probe.reset()
            model(x)
        assert len(probe.per_layer()) == n_last
        assert probe.value() == pytest.approx(first, rel=1e-9)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"layers": "convs"}, "unknown layer choice"),
        ({"layers": ["stem.1", "nope"]}, "'nope'"),
        ({"layers": []}, "empty"),
        ({"kept": {"nope": [0]}}, "not a module"),
        ({"kept": {"stem.1": [[0, 1]]}}, "1-D"),
        ({"kept": {"stem.1": [-1]}}, "1-D"),
        ({"kept": {"stem.1": [0, 32]}}, "out of range"),
        ({"layers": ["fc"]}, "4-D"),
        ({"sample": 0.0}, "sample"),
        ({"sample": 1.5}, "sample"),
        ({"method": "glcm"}, "unknown entropy method"),
    ],
)
def test_network_bad_input(digits, kw, match):
    model, x = digits
    with pytest.raises(EntropySearchError, match=match):
        network_entropy(model, x, **kw)
    assert not any(m._forward_hooks for m in model.modules())


def test_model_without_batchnorm():
    with pytest.raises(EntropySearchError, match="no BatchNorm2d"):
        network_entropy(nn.Sequential(nn.Conv2d(1, 2, 3)), torch.randn(1, 1, 5, 5))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_cpu(digits, monkeypatch):
    """The Triton kernel and the PyTorch path on CUDA both agree with the CPU."""
    g = torch.Generator().manual_seed(6)
    for shape in ((4, 16, 32, 32), (3, 5, 8, 8), (2, 6, 2, 2), (2, 3, 1, 5), (1, 2, 80, 80)):
        x = torch.randn(*shape, generator=g)
        x[0, 0] = 1.0
        x[0, 1, 0, 0] = float("nan")
        for m in METHODS:
            for relu in (False, True):
                want = spatial_entropy(x, method=m, relu=relu)
                got = spatial_entropy(x.cuda(), method=m, relu=relu).cpu()
                torch.testing.assert_close(got, want, atol=2e-5, rtol=0, equal_nan=True)
        half = spatial_entropy(x.cuda().half()).cpu()
        torch.testing.assert_close(half, spatial_entropy(x.half().float()), atol=2e-5, rtol=0, equal_nan=True)
    assert ent._triton_state.get("kernel") is not None, "the Triton kernel fell back to PyTorch"
    model, xb = digits
    kept = {"stem.1": [0, 3, 5]}
    # TF32 convolutions (cuDNN's default) move activations by ~1e-3, enough to move a few maps' levels
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    cpu = network_entropy(model, xb, kept=kept, sample=0.5)
    try:
        gpu = network_entropy(model.cuda(), xb.cuda(), kept=kept, sample=0.5)
        monkeypatch.setattr(ent, "_TRITON_DEVICES", ())
        gpu_torch = network_entropy(model, xb.cuda(), kept=kept, sample=0.5)
        x = torch.randn(2, 3, 9, 9, generator=g)
        torch.testing.assert_close(spatial_entropy(x.cuda()).cpu(), spatial_entropy(x), atol=2e-5, rtol=0)
    finally:
        model.cpu()
    assert gpu == pytest.approx(gpu_torch, abs=1e-5), "the kernel and the PyTorch path on the same activations"
    assert gpu == pytest.approx(cpu, abs=2e-5)


def test_default_sample_is_per_device():
    """Unset, the sampled fraction is the device's default: sampled on the CPU, exact on CUDA."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)).eval()
    probe = EntropyProbe(model)
    assert probe.sample_on("cpu") == ent.DEFAULT_SAMPLE < 1
    assert probe.sample_on("cuda") == ent.CUDA_DEFAULT_SAMPLE == 1.0
    assert EntropyProbe(model, sample=0.5).sample_on("cuda") == 0.5
    x = torch.randn(8, 1, 9, 9)
    assert network_entropy(model, x) == network_entropy(model, x, sample=ent.DEFAULT_SAMPLE)
    with pytest.raises(EntropySearchError, match="sample"):
        EntropyProbe(model, sample=0)


def test_bench_quick_runs(capsys):
    bench = load_bench("bench_entropy")
    bench.main(["--quick", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "ratio" in out and "fast exact" in out and "fast default" in out and "spearman" in out
