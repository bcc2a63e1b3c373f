"""Fixtures shared by the test modules: a briefly trained digits checkpoint, a local Ray, a temporary MLflow store."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

# tests/user_models.py is a user's model package: importable here and in the Ray workers this process starts
_TESTS = str(Path(__file__).resolve().parent)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_TESTS, os.environ.get("PYTHONPATH")) if p)


def _glibc_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _glibc_malloc_trim()


@pytest.fixture(autouse=True)
def return_freed_memory():
    """After each test, hand freed heap memory back to the OS. glibc keeps the freed tensors of large models (the
    coverage test builds ViT-H and RegNet-128GF) in its arenas: without this, pytest's process grew to 22 GB and
    Ray's memory monitor killed the env runners of later tests."""
    yield
    gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _train_digits_checkpoint(path: Path, epochs: int) -> Path:
    """A digits CNN trained for `epochs` on one thread (seconds) by `entropy_search.problem.train_baseline`,
    the one way a baseline is trained (test accuracy and held-out accuracy in its metrics)."""
    from entropy_search.problem import train_baseline

    threads = torch.get_num_threads()
    try:  # a tiny CNN: more threads only contend with other processes
        saved, _ = train_baseline(path, model="digits_cnn", data="digits", epochs=epochs, device="cpu", threads=1,
                                  progress=False)
    finally:
        torch.set_num_threads(threads)
    return saved


@pytest.fixture(scope="session")
def train_digits_checkpoint() -> Callable[..., Path]:
    return _train_digits_checkpoint


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance with 2 CPUs for the module (never a cluster that happens to run here)."""
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """A temporary MLflow tracking store for the module."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def no_default_store(store):
    """Whatever slips through to MLflow's default store lands in the temporary one, not ./mlflow.db."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = store
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


_SPACES: dict = {}


def space_of(name: str, round_to: int = 1):
    """An untrained registry model's pruning space, built once per test session (DepGraph takes a second on
    the bigger nets)."""
    from entropy_search.models import create_model
    from entropy_search.problem import PruningSpace

    key = (name, round_to)
    if key not in _SPACES:
        torch.manual_seed(0)
        shape = (1, 1, 8, 8) if name == "digits_cnn" else (1, 3, 32, 32)
        _SPACES[key] = PruningSpace(create_model(name).eval(), torch.zeros(shape), round_to=round_to)
    return _SPACES[key]


@pytest.fixture
def one_thread():
    """Small models on a shared CPU run far faster on one thread (no OpenMP spinning); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def randomise_weights(model: nn.Module, seed: int) -> None:
    """Non-trivial BN statistics (a mask placed before a BN shift would show) and no all-zero layer (torchvision
    initialises some classifier heads to zero, which would make every comparison trivially equal)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            for p in m.parameters(recurse=False):
                if p.ndim > 0 and not p.any():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def assert_exact(space, batch: torch.Tensor, keep, dropped=()) -> None:
    """The pruning space's promise on one candidate (channels kept, blocks dropped): masked == sliced == physically
    pruned outputs (1e-4 relative), the original model untouched, the classifier's output never pruned, analytic ==
    counted MACs and parameters of the pruned network and of the unpruned one, the dropped blocks gone from it."""
    from entropy_search import count_macs, count_params

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()

    model, x = space.model, space.example_input
    modules = list(model.named_modules())
    with torch.no_grad():
        before = model(batch)
        pruned = space.prune(keep, dropped=dropped).eval()
        expected = pruned(batch)
        with space.masked(keep, dropped=dropped):
            masked = model(batch)
        with space.sliced(keep, dropped=dropped):
            sliced = model(batch)
        after = model(batch)
    assert torch.equal(before, after), "the original model must be untouched"
    assert list(model.named_modules()) == modules, "the original model keeps its blocks"
    assert expected.shape == before.shape, "the classifier output is never pruned"
    assert rel(masked, expected) < 1e-4 and rel(sliced, expected) < 1e-4
    assert space.macs(keep, dropped) == count_macs(pruned, x) and space.base_macs == count_macs(model, x)
    assert space.params(keep, dropped) == count_params(pruned) and space.base_params == count_params(model)
    left = dict(pruned.named_modules())
    names = space.dropped_names(dropped)
    for name in names:  # a block inside a dropped block goes with it
        gone = name not in left if any(name.startswith(o + ".") for o in names) else isinstance(left[name], nn.Identity)
        assert gone, f"{name} is removed from the pruned network"


def exact_or_refused(model: nn.Module, name: str, size: int, refused: dict[str, str], *, max_seconds: float):
    """A coverage test's checks of one model: refused in one line (and expected to be, with `refused[name]` in
    the message), or accepted and exact at random keep ratios with random residual blocks dropped (`assert_exact`),
    fewer MACs than the baseline. Returns the space (None when refused)."""
    import random

    from entropy_search import PruningSpace
    from entropy_search.errors import EntropySearchError

    x = torch.randn(1, 3, size, size)
    try:
        space = PruningSpace(model, x, max_seconds=max_seconds)
    except EntropySearchError as exc:
        message = str(exc)
        assert "\n" not in message and len(message) < 600, "a refusal is one line"
        assert name in refused, f"{name} was refused: {message}"
        assert refused[name] in message, message
        return None
    assert name not in refused, f"{name} is handled now: update REFUSED and docs/coverage.md's figure"
    assert space.groups, "an accepted model has something to prune"
    rng = random.Random(1)
    keep = [rng.uniform(0.1, 1.0) for _ in space.groups]
    dropped = [b.index for b in space.blocks if rng.random() < 0.5]  # depth too, where the model has blocks
    assert_exact(space, torch.randn(2, 3, size, size), keep, dropped)
    assert space.macs(keep, dropped) < space.base_macs
    return space
