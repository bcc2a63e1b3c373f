"""Training, fine-tuning, evaluation, threads and devices (`entropy_search.train`) on the offline digits data."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from entropy_search import train as training
from entropy_search.data import ArrayDataset, eval_batch, load_data
from entropy_search.errors import ConfigError
from entropy_search.models import create_model
from entropy_search.problem.checkpoint import build_model, load_checkpoint, save_checkpoint
from entropy_search.train import evaluate, fine_tune, save_training_state, train


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one thread (conftest.one_thread)."""


@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


@pytest.fixture(scope="module")
def trained(digits):
    torch.manual_seed(0)
    model = create_model("digits_cnn", width=16)
    history = train(model, digits.train, epochs=5, progress=False, device="cpu")
    return model, history


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- training


def test_training_reaches_decent_accuracy(trained, digits):
    model, history = trained
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5]
    assert set(history[0]) >= {"epoch", "loss", "acc", "lr"}
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[0]["lr"] == pytest.approx(0.05) and history[-1]["lr"] < 0.05  # cosine schedule
    assert not model.training
    acc = evaluate(model, digits.test, device="cpu")
    assert 0.8 < acc <= 1.0
    assert not model.training


def test_training_is_reproducible_with_a_seed(digits):
    def run(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(123)
        model = create_model("digits_cnn", width=8)
        train(model, digits.train, epochs=1, seed=seed, progress=False, device="cpu")
        return _state(model)

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_fine_tune_uses_smaller_lr(digits, trained):
    model = create_model("digits_cnn", width=16)
    model.load_state_dict(trained[0].state_dict())
    history = fine_tune(model, digits.train, epochs=1, progress=False, device="cpu")
    assert history[0]["lr"] == pytest.approx(0.01)
    assert evaluate(model, digits.test, device="cpu") > 0.8


def test_evaluate_accepts_tensors(trained, digits):
    model, _ = trained
    x, y = eval_batch(digits, 64, split="test")
    acc = evaluate(model, (x, y), device="cpu")
    assert acc == pytest.approx((model(x).argmax(1) == y).float().mean().item())


def test_progress_bar(digits, capsys):
    model = create_model("digits_cnn", width=4)
    train(model, digits.heldout, epochs=1, progress=True, desc="pretrain", device="cpu")
    assert "pretrain" in capsys.readouterr().err
    train(model, digits.heldout, epochs=1, progress=False, device="cpu")
    assert capsys.readouterr().err == ""


def test_bad_training_arguments(digits):
    model = create_model("digits_cnn", width=4)
    with pytest.raises(ConfigError, match="epochs"):
        train(model, digits.train, epochs=-1, progress=False)
    with pytest.raises(ConfigError, match="lr"):
        train(model, digits.train, epochs=1, lr=0, progress=False)
    with pytest.raises(ConfigError, match="empty"):
        train(model, torch.utils.data.TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0)), epochs=1)
    with pytest.raises(ConfigError, match="empty"):
        evaluate(model, (torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)))
    assert train(model, digits.train, epochs=0, progress=False) == []
    assert not model.training


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_bf16_channels_last(tmp_path, digits):
    torch.manual_seed(0)
    model = create_model("digits_cnn", width=16)
    history = train(model, digits.train, epochs=5, progress=False, device="cuda")
    assert next(model.parameters()).is_cuda and not model.training
    assert history[-1]["loss"] < history[0]["loss"]
    acc = evaluate(model, digits.test, device="cuda")
    assert acc > 0.8
    path = save_checkpoint(tmp_path / "gpu.pt", model, model_name="digits_cnn", model_kwargs={"width": 16},
                           num_classes=10, in_channels=1, image_size=8, data="digits", config={}, metrics={})
    rebuilt = build_model(load_checkpoint(path))  # loads on the CPU
    assert not next(rebuilt.parameters()).is_cuda
    assert evaluate(rebuilt, digits.test, device="cpu") == pytest.approx(acc, abs=0.03)  # bf16 vs fp32


def test_threads_and_devices():
    from entropy_search.train import configure_threads, select_device

    assert configure_threads(None, device="cpu", image_size=8) == 1 == torch.get_num_threads()
    torch.set_num_threads(2)
    assert configure_threads(None, device="cpu", image_size=32) == 2  # torch's choice, untouched
    assert configure_threads(3, device="cpu") == 3 == torch.get_num_threads()
    with pytest.raises(ConfigError, match="threads"):
        configure_threads(0)
    assert select_device("cpu").type == "cpu"
    with pytest.raises(ConfigError, match="unknown device 'gpu0'"):
        select_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            select_device("cuda")


@pytest.mark.parametrize("workers", [0, 1])
def test_training_resumed_from_its_state_ends_with_the_same_weights(tmp_path, monkeypatch, workers):
    """Augmentation drawn in the main process (0 workers) or in a loader worker (CIFAR's path): a training that
    resumes from the state of its second epoch ends with the weights of the run that went on. The CLI's real
    kill is tests/test_cli_train.py. About 3 s."""
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (96, 3, 8, 8), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (96,), generator=generator)
    data = ArrayDataset(images, labels, [0.5] * 3, [0.25] * 3, augment=True, pad=2)
    state = tmp_path / "state"
    kept = []

    def keep_second(path, key, history, parts, gen):
        save_training_state(path, key, history, parts, gen)
        if len(history) == 2:
            kept.append(state.read_bytes())

    def run(resume: bool) -> tuple[nn.Module, list[dict]]:
        torch.manual_seed(0)
        model = create_model("digits_cnn", width=8, in_channels=3)
        history = train(model, data, epochs=4, batch_size=32, progress=False, device="cpu", num_workers=workers,
                        state_file=state, resume=resume, run_key={"data": "random"})
        return model, history

    monkeypatch.setattr(training, "save_training_state", keep_second)
    whole, whole_history = run(resume=False)
    monkeypatch.undo()
    state.write_bytes(kept[0])
    resumed, history = run(resume=True)
    assert [r["loss"] for r in history] == [r["loss"] for r in whole_history]
    assert all(torch.equal(a, b) for a, b in zip(_state(whole).values(), _state(resumed).values(), strict=True))
    with pytest.raises(ConfigError, match="belongs to another training.*data: 'random' there, 'other' here"):
        train(create_model("digits_cnn", width=8, in_channels=3), data, epochs=4, batch_size=32, progress=False,
              device="cpu", num_workers=workers, state_file=state, resume=True, run_key={"data": "other"})
