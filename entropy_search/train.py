"""Training, fine-tuning and top-1 evaluation: SGD with a cosine schedule, seeded.

On CUDA the model runs channels-last under bf16 autocast; on the CPU it runs in plain fp32, so the
same seed gives the same weights. Models are left in eval mode.
"""

from __future__ import annotations

import math
import os
from contextlib import nullcontext

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm.auto import tqdm

from .data import ArrayDataset
from .errors import ConfigError
from .utils import resolve_device, seed_everything

EvalData = Dataset | tuple[torch.Tensor, torch.Tensor]


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
) -> list[dict]:
    """Train `model` on `dataset` for `epochs` epochs; return one {epoch, loss, acc, lr} dict per epoch.

    `num_workers` defaults to 0 for in-memory data and to a few loader processes for image files.
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
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        drop_last=len(dataset) % batch_size == 1,  # a batch of one breaks BatchNorm
        generator=torch.Generator().manual_seed(seed),
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=dev.type == "cuda",
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * len(loader))
    loss_fn = nn.CrossEntropyLoss()
    history: list[dict] = []
    bar = tqdm(range(epochs), desc=desc, unit="epoch", disable=not progress, dynamic_ncols=True)
    for epoch in bar:
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
        }
        if not math.isfinite(record["loss"]):
            model.eval()
            raise ConfigError(f"training diverged at epoch {epoch + 1} (loss {record['loss']}); lower the learning rate")
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['acc']:.3f}")
    model.eval()
    return history


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
    correct, loss = _evaluation_pass(model, dataset, batch_size=batch_size, device=device)
    return int(correct.sum()) / len(correct), loss / len(correct)


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


def select_device(device: str | torch.device = "auto") -> torch.device:
    """`auto`, `cpu`, `cuda[:n]` or a torch.device; ConfigError for a bad name or CUDA that is not there."""
    try:
        dev = resolve_device(device) if isinstance(device, str) else device
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {device!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but CUDA is not available here; use --device cpu")
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
