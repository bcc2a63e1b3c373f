"""Training, fine-tuning and top-1 evaluation: SGD with a cosine schedule, seeded.

On CUDA the model runs channels-last under bf16 autocast; on the CPU it runs in plain fp32, so the
same seed gives the same weights. Models are left in eval mode. A training given a state file writes its
whole state there after every epoch and can resume from it (`train(state_file=..., resume=True)`).
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm.auto import tqdm

from .data import ArrayDataset
from .errors import ConfigError
from .utils import resolve_device, seed_everything, torch_save_atomically

EvalData = Dataset | tuple[torch.Tensor, torch.Tensor]

#: The format tag of a training state file.
STATE_FORMAT = "entropy-search-training-state"


def train(
    model: nn.Module,
    dataset: Dataset,
    *,
    epochs: int,
    lr: float = 0.05,
    batch_size: int = 128,
    weight_decay: float = 5e-4,
    momentum: float = 0.9,
    device: str | torch.device = "auto",
    seed: int = 0,
    progress: bool = True,
    desc: str = "train",
    num_workers: int | None = None,
    state_file: str | os.PathLike | None = None,
    resume: bool = False,
    run_key: Mapping | None = None,
) -> list[dict]:
    """Train `model` on `dataset` for `epochs` epochs; return one {epoch, loss, acc, lr, seconds} dict per epoch.

    `num_workers` defaults to 0 for in-memory data and to a few loader processes for image files.

    With `state_file`, the whole training state (weights, optimizer, schedule, the random generators of the
    shuffling, the augmentation and the loader's workers, the history) is written there atomically after every
    epoch; with `resume` too, a training that finds one there continues after its last epoch and ends with the
    weights an uninterrupted run of the same arguments ends with (on the CPU; on CUDA as far as its kernels are
    deterministic). `run_key` is what else the state must have been saved with (the model, the data); a state
    of another run is a ConfigError. Without a state there, `resume` starts from the first epoch.
    """
    if epochs < 0:
        raise ConfigError(f"epochs must be 0 or more, got {epochs}")
    _check_positive(lr=lr, batch_size=batch_size)
    if weight_decay < 0 or not 0 <= momentum < 1:
        raise ConfigError(f"need weight_decay >= 0 and momentum in [0, 1), got {weight_decay} and {momentum}")
    if len(dataset) == 0:
        raise ConfigError("cannot train on an empty data set")
    dev = select_device(device)
    seed_everything(seed)
    model.to(dev)
    if dev.type == "cuda":
        model.to(memory_format=torch.channels_last)
    if epochs == 0:
        model.eval()
        return []
    workers = _workers(dataset, num_workers)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        drop_last=len(dataset) % batch_size == 1,  # a batch of one breaks BatchNorm
        generator=generator,
        num_workers=workers,
        # a resumable training draws its workers' seeds afresh every epoch from `generator`, which its state holds
        persistent_workers=workers > 0 and state_file is None,
        pin_memory=dev.type == "cuda",
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * len(loader))
    loss_fn = nn.CrossEntropyLoss()
    history: list[dict] = []
    key = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "weight_decay": weight_decay, "momentum": momentum,
           "seed": seed, "images": len(dataset), **(run_key or {})}
    parts = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    if state_file is not None and resume and Path(state_file).exists():
        history = restore_training_state(state_file, key, parts, generator)
    bar = tqdm(range(len(history), epochs), desc=desc, unit="epoch", disable=not progress, dynamic_ncols=True,
               initial=len(history), total=epochs)
    for epoch in bar:
        t0 = time.perf_counter()
        model.train()
        total_loss = torch.zeros((), device=dev)
        correct = torch.zeros((), dtype=torch.long, device=dev)
        seen = 0
        current_lr = optimizer.param_groups[0]["lr"]
        for x, y in loader:
            x, y = _to(x, dev), y.to(dev, non_blocking=True)
            with _autocast(dev):
                logits = model(x)
                loss = loss_fn(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
        record = {
            "epoch": epoch + 1,
            "loss": total_loss.item() / seen,
            "acc": correct.item() / seen,
            "lr": current_lr,
            "seconds": time.perf_counter() - t0,
        }
        if not math.isfinite(record["loss"]):
            model.eval()
            raise ConfigError(f"training diverged at epoch {epoch + 1} (loss {record['loss']}); lower the learning rate")
        history.append(record)
        if state_file is not None:
            save_training_state(state_file, key, history, parts, generator)
        bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['acc']:.3f}")
    model.eval()
    return history


def save_training_state(path: str | os.PathLike, key: Mapping, history: list[dict], parts: Mapping,
                        generator: torch.Generator) -> None:
    """Everything a training needs to go on after `history`'s last epoch, written atomically to `path`: the
    weights, optimizer and schedule (`parts`), the loader's `generator` and the process's random generators."""
    numpy_state = np.random.get_state()
    state = {
        "format": STATE_FORMAT,
        "key": dict(key),
        "history": history,
        **{name: part.state_dict() for name, part in parts.items()},
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy_rng": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        "python_rng": random.getstate(),
    }
    try:
        torch_save_atomically(state, path)
    except OSError as exc:
        raise ConfigError(f"cannot write the training state {path}: {exc}") from None


def read_training_state(path: str | os.PathLike) -> dict:
    """A training state file (`save_training_state`); ConfigError when it is none or is unreadable."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated, foreign or unreadable: one message
        raise ConfigError(f"training state {path} is unreadable ({str(exc).splitlines()[0][:200]}); delete it to "
                          "start the training again") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ConfigError(f"{path} is not an entropy-search training state")
    return state


def restore_training_state(path: str | os.PathLike, key: Mapping, parts: Mapping, generator: torch.Generator) -> list[dict]:
    """Load the state at `path` into `parts` (weights, optimizer, schedule), the loader's `generator` and the
    process's random generators; returns the history of the epochs it holds. ConfigError when it was saved by a
    run with other arguments (`key`)."""
    state = read_training_state(path)
    differ = [f"{k}: {state['key'].get(k)!r} there, {v!r} here" for k, v in key.items() if state["key"].get(k) != v]
    if differ:
        raise ConfigError(f"training state {path} belongs to another training ({'; '.join(differ)}); give the same "
                          "arguments to resume it, or delete it to start again")
    for name, part in parts.items():
        part.load_state_dict(state[name])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    kind, keys, *rest = state["numpy_rng"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    return list(state["history"])


def fine_tune(model: nn.Module, dataset: Dataset, *, epochs: int, lr: float = 0.01, desc: str = "fine-tune", **kw) -> list[dict]:
    """`train` with a smaller learning rate, for a pruned model that starts from trained weights."""
    return train(model, dataset, epochs=epochs, lr=lr, desc=desc, **kw)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: EvalData, *, batch_size: int = 512, device: str | torch.device = "auto") -> float:
    """Top-1 accuracy in [0, 1] of `model` on a data set or an `(x, y)` pair of tensors."""
    return accuracy_and_loss(model, dataset, batch_size=batch_size, device=device)[0]


def accuracy_and_loss(model: nn.Module, dataset: EvalData, *, batch_size: int = 512,
                      device: str | torch.device = "auto") -> tuple[float, float]:
    """Top-1 accuracy in [0, 1] and mean cross-entropy (nats) of `model` on a data set or an `(x, y)` pair."""
    correct, loss = correct_and_loss(model, dataset, batch_size=batch_size, device=device)
    return int(correct.sum()) / len(correct), loss


def correct_and_loss(model: nn.Module, dataset: EvalData, *, batch_size: int = 512,
                     device: str | torch.device = "auto") -> tuple[torch.Tensor, float]:
    """Per-item correctness (bool, CPU) and mean cross-entropy (nats) in one pass: a short fine-tune's rung
    needs both (the accuracy it is ranked by, the images a paired test compares)."""
    correct, loss = _evaluation_pass(model, dataset, batch_size=batch_size, device=device)
    return correct, loss / len(correct)


def correct_predictions(model: nn.Module, dataset: EvalData, *, batch_size: int = 512,
                        device: str | torch.device = "auto") -> torch.Tensor:
    """Whether `model`'s top-1 prediction is right, per item of the data set (a bool tensor on the CPU): what a
    paired comparison of two networks on the same images needs."""
    return _evaluation_pass(model, dataset, batch_size=batch_size, device=device)[0]


def _evaluation_pass(model: nn.Module, dataset: EvalData, *, batch_size: int,
                     device: str | torch.device) -> tuple[torch.Tensor, float]:
    """The one evaluation loop: per-item correctness (bool, CPU) and the summed cross-entropy."""
    _check_positive(batch_size=batch_size)
    if isinstance(dataset, tuple):
        dataset = TensorDataset(*dataset)
    if len(dataset) == 0:
        raise ConfigError("cannot evaluate on an empty data set")
    dev = select_device(device)
    model.to(dev)
    if dev.type == "cuda":
        model.to(memory_format=torch.channels_last)
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=_workers(dataset, None), pin_memory=dev.type == "cuda")
    correct = []
    loss = torch.zeros((), dtype=torch.float64, device=dev)
    with torch.no_grad():
        for x, y in loader:
            x, y = _to(x, dev), y.to(dev, non_blocking=True)
            with _autocast(dev):
                logits = model(x)
            correct.append(logits.argmax(1) == y)
            loss += nn.functional.cross_entropy(logits.float(), y, reduction="sum")
    model.train(was_training)
    return torch.cat(correct).cpu(), loss.item()


def configure_threads(threads: int | None, *, device: str | torch.device = "auto", image_size: int = 224) -> int:
    """Set torch's CPU threads and return the number used. `None` picks one thread for tiny inputs on the
    CPU (<= 16 px: per-op overhead dominates, and extra OpenMP threads spin, which is 10x slower on a
    shared CPU) and torch's default otherwise."""
    if threads is None:
        if select_device(device).type == "cpu" and image_size <= 16:
            threads = 1
        else:
            return torch.get_num_threads()
    if threads < 1:
        raise ConfigError(f"threads must be positive, got {threads}")
    torch.set_num_threads(threads)
    return threads


def select_device(device: str | torch.device = "auto", key: str = "--device") -> torch.device:
    """`auto`, `cpu`, `cuda[:n]` or a torch.device; ConfigError for a bad name or CUDA that is not there, naming
    `key`, where the user set it (a CLI flag or a config key)."""
    try:
        dev = resolve_device(device) if isinstance(device, str) else device
    except RuntimeError as exc:
        raise ConfigError(f"{key}: unknown device {device!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}: {device!r} asked for, but CUDA is not available here; use cpu or auto")
    return dev


def _to(x: torch.Tensor, dev: torch.device) -> torch.Tensor:
    x = x.to(dev, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if dev.type == "cuda" and x.dim() == 4 else x


def _autocast(dev: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else nullcontext()


def _workers(dataset: Dataset, num_workers: int | None) -> int:
    """0 for plain in-memory tensors (workers cost more than they save), a few processes for files on
    disk or per-image augmentation."""
    if num_workers is not None:
        return num_workers
    base = dataset
    while hasattr(base, "dataset"):  # Subset chains
        base = base.dataset
    if isinstance(base, TensorDataset) or (isinstance(base, ArrayDataset) and not base.augment):
        return 0
    return min(8, max(0, (os.cpu_count() or 1) - 1))


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ConfigError(f"{name} must be positive, got {value}")
