"""Fixtures shared by the test modules: a briefly trained digits checkpoint, a local Ray, a temporary MLflow store."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch


def _train_digits_checkpoint(path: Path, epochs: int, *, with_metrics: bool = True) -> Path:
    """A digits CNN trained for `epochs` on one thread (seconds), saved like `entropy-search train` does."""
    from entropy_search.checkpoint import save_checkpoint
    from entropy_search.data import load_data
    from entropy_search.models import create_model
    from entropy_search.train import evaluate, train

    splits = load_data("digits", seed=0)
    torch.manual_seed(0)
    model = create_model("digits_cnn", num_classes=10, in_channels=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny CNN: more threads only contend with other processes
    try:
        train(model, splits.train, epochs=epochs, progress=False, device="cpu")
    finally:
        torch.set_num_threads(threads)
    metrics = {"test_acc": evaluate(model, splits.test)} if with_metrics else None
    save_checkpoint(path, model, model_name="digits_cnn", num_classes=10, in_channels=1, image_size=8, data="digits",
                    config={"seed": 0, "heldout_fraction": 0.1}, metrics=metrics)
    return path


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
