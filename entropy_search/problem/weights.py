"""A network trained elsewhere: its weights, saved with plain PyTorch, loaded into an architecture of the model
registry (a registry name, `tv:<torchvision name>` or `package.module:factory`), checked strictly, measured and
written as a checkpoint, so every later step (the search, its workers, `prune`, `measure`) reads a checkpoint.

Files are read with `torch.load(weights_only=True)`: a file that pickles Python objects (a whole model saved
with `torch.save(model)`) is refused, never run."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..data import DataSplits
from ..errors import CheckpointError, EntropySearchError
from ..latency import torch_latency
from ..models import create_model
from ..train import evaluate
from .checkpoint import FORMAT, load_tensors, save_checkpoint
from .macs import count_macs, count_params

#: Keys under which training scripts commonly keep the state_dict in a saved dict.
WRAPPING_KEYS = ("state_dict", "model_state_dict", "model", "net")
#: Prefixes that wrappers add to every key: DataParallel / DistributedDataParallel, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _is_state_dict(value) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(
        isinstance(k, str) and torch.is_tensor(v) for k, v in value.items())


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state_dict in a file saved with `torch.save`: the state_dict itself or wrapped (`WRAPPING_KEYS`), its
    keys without a wrapper's prefix (`WRAPPER_PREFIXES`). CheckpointError, in one line, for anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} not found" + (" (it is a directory)" if path.is_dir() else ""))
    payload = load_tensors(path, "weights file")
    if isinstance(payload, Mapping) and payload.get("format") == FORMAT:
        raise CheckpointError(f"{path} is an entropy-search checkpoint, not plain weights: give it as model.checkpoint")
    state = payload
    if isinstance(payload, Mapping) and not _is_state_dict(payload):
        state = next((payload[k] for k in WRAPPING_KEYS if _is_state_dict(payload.get(k))), None)
    if not _is_state_dict(state):
        found = (f"a dict with keys {', '.join(map(str, list(payload)[:5]))}" if isinstance(payload, Mapping)
                 else f"a {type(payload).__name__}")
        raise CheckpointError(f"weights file {path} holds no state_dict (parameter names to tensors), but {found}")
    for prefix in WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], *, path: str | os.PathLike, what: str) -> None:
    """Load `state` into `model` strictly: CheckpointError naming the first mismatched keys and shapes (`what` says
    which architecture) when it does not fit, or when a weight is not finite."""
    own = model.state_dict()
    shapes = [f"{k} {list(state[k].shape)} in the file, {list(v.shape)} in the model" for k, v in own.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if shapes or missing or unexpected:
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} shape(s) differ, first {'; '.join(shapes[:2])}")
        if missing:
            parts.append(f"{len(missing)} key(s) of the model missing, first {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"{len(unexpected)} key(s) the model lacks, first {', '.join(unexpected[:3])}")
        raise CheckpointError(f"weights file {path} does not fit {what}: {'; '.join(parts)}")
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"weights file {path}: {name} has non-finite values (NaN or inf)")
    model.load_state_dict(state, strict=True)


def user_network(weights: str | os.PathLike, *, model_name: str, model_kwargs: Mapping | None = None,
                 num_classes: int, in_channels: int) -> nn.Module:
    """Architecture `model_name` for `num_classes` classes and `in_channels` input channels with the weights in
    the file `weights`, in eval mode on the CPU."""
    state = read_weights(weights)
    try:
        model = create_model(model_name, num_classes=num_classes, in_channels=in_channels, **dict(model_kwargs or {}))
    except TypeError as exc:
        raise EntropySearchError(f"model {model_name!r} does not take {dict(model_kwargs or {})}: {exc}") from None
    load_weights(model, state, path=weights,
                 what=f"{model_name} with {num_classes} classes and {in_channels} input channel(s)")
    return model.eval()


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file (which weights a checkpoint was imported from)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def import_weights(weights: str | os.PathLike, out: str | os.PathLike, *, model: nn.Module, model_name: str,
                   model_kwargs: Mapping | None, splits: DataSplits, device: str = "auto") -> tuple[Path, dict]:
    """Write `model` (`user_network`'s, with the weights of the file `weights`) as a checkpoint at `out`, after
    measuring it on `splits`: test and held-out accuracy, MACs, parameters and CPU latency at batch 1. The checkpoint records the weights
    file and its digest and the preprocessing, not a held-out fraction and seed: the split it trained on is
    unknown (the search then says so, unless `data.heldout` gives it). Returns (path, metrics)."""
    example = torch.zeros(1, splits.in_channels, splits.image_size, splits.image_size)
    t0 = time.perf_counter()
    metrics = {"test_acc": evaluate(model, splits.test, device=device), "macs": count_macs(model, example),
               "params": count_params(model),
               "latency_ms_batch1": torch_latency(model.cpu().eval(), example, batch_sizes=[1])["ms"]["1"]}
    if len(splits.heldout):
        metrics["heldout_acc"] = evaluate(model, splits.heldout, device=device)
    metrics["measure_seconds"] = time.perf_counter() - t0
    config = {"model": model_name, "data": splits.name, "trained_by": "elsewhere", "weights": str(weights),
              "weights_sha256": file_digest(weights), "preprocessing": splits.preprocessing()}
    path = save_checkpoint(out, model.cpu(), model_name=model_name, model_kwargs=model_kwargs,
                           num_classes=splits.num_classes, in_channels=splits.in_channels,
                           image_size=splits.image_size, data=splits.name, config=config, metrics=metrics)
    return path, metrics
