"""Training, evaluation and checkpoints on the offline digits data."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from entropy_search.checkpoint import FORMAT, build_model, load_checkpoint, save_checkpoint
from entropy_search.data import eval_batch, load_data
from entropy_search.errors import CheckpointError, ConfigError
from entropy_search.models import create_model
from entropy_search.train import evaluate, fine_tune, train


@pytest.fixture(autouse=True)
def one_thread():
    """Small models on a shared CPU run far faster on one thread (no OpenMP spinning)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


# ---------------------------------------------------------------- checkpoints


def _save(path, model, **over):
    fields = dict(model_name="digits_cnn", model_kwargs={"width": 16}, num_classes=10, in_channels=1, image_size=8,
                  data="digits", config={"epochs": 5, "root": path.parent, "lr": torch.tensor(0.05)},
                  metrics={"test_acc": 0.9})
    fields.update(over)
    return save_checkpoint(path, model, **fields)


def test_checkpoint_round_trip(tmp_path, trained, digits):
    model, _ = trained
    path = _save(tmp_path / "runs" / "baseline.pt", model)
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == ["baseline.pt"]  # no temp file left
    ckpt = load_checkpoint(path)
    assert ckpt.path == path and ckpt.model_name == "digits_cnn" and ckpt.model_kwargs == {"width": 16}
    assert (ckpt.num_classes, ckpt.in_channels, ckpt.image_size, ckpt.data) == (10, 1, 8, "digits")
    assert ckpt.config["epochs"] == 5 and ckpt.config["root"] == str(tmp_path / "runs")
    assert ckpt.config["lr"] == pytest.approx(0.05)
    assert ckpt.metrics == {"test_acc": 0.9} and ckpt.keep is None
    assert "torch" in ckpt.environment
    rebuilt = build_model(ckpt)
    assert not rebuilt.training
    x, _ = eval_batch(digits, 32)
    assert torch.allclose(rebuilt(x), model(x))


def test_failed_save_leaves_old_file_untouched(tmp_path, trained, monkeypatch):
    model, _ = trained
    path = _save(tmp_path / "ckpt.pt", model)
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(CheckpointError, match="No space left"):
        _save(path, model)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_missing_corrupt_and_foreign_checkpoints(tmp_path, trained):
    with pytest.raises(CheckpointError, match=r"checkpoint .*nothing\.pt not found"):
        load_checkpoint(tmp_path / "nothing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match=r"garbage\.pt is corrupt"):
        load_checkpoint(garbage)
    good = _save(tmp_path / "good.pt", trained[0])
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.pt is corrupt"):
        load_checkpoint(truncated)
    foreign = tmp_path / "state.pt"
    torch.save(trained[0].state_dict(), foreign)
    with pytest.raises(CheckpointError, match=r"state\.pt is not an entropy-search checkpoint"):
        load_checkpoint(foreign)
    incomplete = tmp_path / "incomplete.pt"
    torch.save({"format": FORMAT, "model_name": "digits_cnn"}, incomplete)
    with pytest.raises(CheckpointError, match="incomplete.*missing"):
        load_checkpoint(incomplete)


def test_weights_that_do_not_fit(tmp_path, trained):
    path = _save(tmp_path / "wrong.pt", trained[0], model_kwargs={"width": 8})
    with pytest.raises(CheckpointError, match=r"wrong\.pt.*do not fit model 'digits_cnn'"):
        build_model(load_checkpoint(path))
    path = _save(tmp_path / "unknown.pt", trained[0], model_name="no_such_net")
    with pytest.raises(CheckpointError, match=r"unknown\.pt.*no_such_net"):
        build_model(load_checkpoint(path))


def test_pruned_checkpoint_with_prune_fn(tmp_path, digits):
    small = create_model("digits_cnn", width=8)
    path = _save(tmp_path / "pruned.pt", small, keep=[0.5, 0.5, 0.5])
    calls = []

    def prune_fn(model, example_input, keep):
        calls.append((example_input.shape, keep))
        return create_model("digits_cnn", width=int(16 * keep[0]))

    rebuilt = build_model(load_checkpoint(path), prune_fn=prune_fn)
    assert calls == [((1, 1, 8, 8), [0.5, 0.5, 0.5])]
    x, _ = eval_batch(digits, 8)
    small.eval()
    assert torch.allclose(rebuilt(x), small(x))
    with pytest.raises(CheckpointError, match="do not fit"):
        build_model(load_checkpoint(path), prune_fn=lambda model, x, keep: model)


def test_pruned_checkpoint_with_the_default_pruning_space(tmp_path, trained, digits):
    space_mod = pytest.importorskip("entropy_search.space")
    model, _ = trained
    space = space_mod.PruningSpace(model, torch.zeros(1, 1, 8, 8))
    keep = [0.5] * len(space.groups)
    pruned = space.prune(keep)
    path = _save(tmp_path / "pruned.pt", pruned, keep=keep)
    rebuilt = build_model(load_checkpoint(path))
    x, _ = eval_batch(digits, 16)
    pruned.eval()
    assert torch.allclose(rebuilt(x), pruned(x), atol=1e-6)


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
    path = _save(tmp_path / "gpu.pt", model)
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


def test_baseline_trained_by_a_search_is_reproducible(tmp_path):
    """The same config trains the same baseline, whatever consumed the global RNG before (initial weights too)."""
    from entropy_search.config import load_config
    from entropy_search.search import ensure_checkpoint

    states = []
    for i in range(2):
        torch.rand(3 + i)
        cfg = load_config({"model": {"name": "digits_cnn", "train_if_missing": True, "train_epochs": 2,
                                     "checkpoint": str(tmp_path / f"b{i}.pt")}})
        states.append(load_checkpoint(ensure_checkpoint(cfg, progress=False)).state_dict)
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
