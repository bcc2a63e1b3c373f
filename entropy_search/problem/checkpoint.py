"""Checkpoints: a model's weights with everything needed to rebuild it (name, kwargs, input shape,
data set, config, metrics, keep ratios of a pruned model, environment), written atomically.

Files are read with `torch.load(weights_only=True)`, so a checkpoint holds only tensors and plain
Python values and loading one never runs code from it.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, EntropySearchError
from ..jsonio import plain
from ..models import create_model
from ..utils import environment_info, torch_save_atomically
from .space import PruningSpace

FORMAT = "entropy-search-checkpoint"
FORMAT_VERSION = 2
"""2: a pruned network may have dropped residual blocks (`dropped`); a file without any is written as version 1,
which readers before blocks read as before."""

PruneFn = Callable[[nn.Module, torch.Tensor, Sequence[float], Sequence[str]], nn.Module]


@dataclass
class Checkpoint:
    """A loaded checkpoint; `keep` holds one keep ratio per channel group when the model was pruned, `dropped` the
    names of the residual blocks it no longer has."""

    path: Path
    model_name: str
    model_kwargs: dict
    num_classes: int
    in_channels: int
    image_size: int
    data: str
    config: dict
    metrics: dict
    state_dict: dict[str, torch.Tensor]
    keep: list[float] | None = None
    dropped: list[str] = field(default_factory=list)
    environment: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def example_input(self, batch: int = 1) -> torch.Tensor:
        """A zero input of the shape the model was trained on."""
        return torch.zeros(batch, self.in_channels, self.image_size, self.image_size)


_REQUIRED = ("model_name", "model_kwargs", "num_classes", "in_channels", "image_size", "data", "config", "metrics",
             "state_dict")


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    model_name: str,
    model_kwargs: Mapping | None = None,
    num_classes: int,
    in_channels: int,
    image_size: int,
    data: str,
    config: Mapping | None = None,
    metrics: Mapping | None = None,
    keep: Sequence[float] | None = None,
    dropped: Sequence[str] = (),
) -> Path:
    """Write `model`'s weights and metadata to `path` atomically (temporary file, then rename)."""
    path = Path(path)
    if dropped and keep is None:
        raise CheckpointError(f"cannot write checkpoint {path}: dropped blocks need the keep ratios of the pruning")
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION if dropped else 1,
        "model_name": str(model_name),
        "model_kwargs": plain(dict(model_kwargs or {})),
        "num_classes": int(num_classes),
        "in_channels": int(in_channels),
        "image_size": int(image_size),
        "data": str(data),
        "config": plain(dict(config or {})),
        "metrics": plain(dict(metrics or {})),
        "keep": None if keep is None else [float(k) for k in keep],
        "dropped": [str(name) for name in dropped],
        "environment": plain(environment_info()),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
    }
    try:
        return torch_save_atomically(payload, path)
    except OSError as exc:
        raise CheckpointError(f"cannot write checkpoint {path}: {exc}") from None


def _said(exc: BaseException) -> str:
    """The line of an exception's message that says what is wrong (torch's unpickler says it after its advice)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return next((line for line in lines if "error:" in line.lower()), lines[0] if lines else type(exc).__name__)[:200]


def load_tensors(path: Path, what: str):
    """`torch.load(path, weights_only=True)` on the CPU; a CheckpointError in one line that says what the file is
    when it is not tensors and plain values (`what`: "checkpoint" or "weights file")."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "unsupported global" in str(exc).lower():  # a pickled object: loading it could run code
            raise CheckpointError(
                f"{what} {path} holds pickled Python objects, not only tensors; entropy-search loads weights only "
                "(torch.load with weights_only=True, which never runs code from a file). If you trust the file, "
                "convert it once: load it in your own Python with torch.load's safeguard off, save "
                "torch.save(model.state_dict(), 'weights.pth'), and give weights.pth as model.weights"
            ) from None
        raise CheckpointError(f"{what} {path} is corrupt, truncated or not a PyTorch file ({_said(exc)})") from None
    except Exception as exc:  # a truncated zip, not a torch file at all
        raise CheckpointError(f"{what} {path} is corrupt, truncated or not a PyTorch file ({_said(exc)})") from None


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint written by `save_checkpoint`; CheckpointError if missing, corrupt or foreign."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found" + (" (it is a directory)" if path.is_dir() else ""))
    payload = load_tensors(path, "checkpoint")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not an entropy-search checkpoint (no model name or config in it); if it holds a network's "
            "weights saved with plain PyTorch, give it as model.weights with its architecture as model.name "
            "(`entropy-search prune FILE --model NAME`)"
        )
    missing = [key for key in _REQUIRED if key not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {payload['format_version']}, newer than this entropy-search "
            f"reads ({FORMAT_VERSION}); upgrade entropy-search"
        )
    for name, tensor in payload["state_dict"].items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(f"checkpoint {path}: {name} has {bad} non-finite value(s) (NaN or inf); the "
                                  "network cannot be measured or pruned: retrain it or restore a good checkpoint")
    return Checkpoint(
        path=path,
        model_name=payload["model_name"],
        model_kwargs=dict(payload["model_kwargs"]),
        num_classes=int(payload["num_classes"]),
        in_channels=int(payload["in_channels"]),
        image_size=int(payload["image_size"]),
        data=payload["data"],
        config=dict(payload["config"]),
        metrics=dict(payload["metrics"]),
        state_dict=payload["state_dict"],
        keep=payload.get("keep"),
        dropped=list(payload.get("dropped") or []),
        environment=dict(payload.get("environment") or {}),
        format_version=int(payload.get("format_version", FORMAT_VERSION)),
    )


def build_model(ckpt: Checkpoint, prune_fn: PruneFn | None = None) -> nn.Module:
    """Recreate the checkpoint's model (pruned with `prune_fn` when `ckpt.keep` is set), load its
    weights, and return it in eval mode on the CPU.

    `prune_fn(model, example_input, keep, dropped)` defaults to `PruningSpace(model, example_input,
    round_to=ckpt.config.get('round_to', 1)).prune(keep, dropped=dropped)`.
    """
    try:
        model = create_model(ckpt.model_name, num_classes=ckpt.num_classes, in_channels=ckpt.in_channels,
                             **ckpt.model_kwargs)
    except EntropySearchError as exc:
        raise CheckpointError(f"checkpoint {ckpt.path}: cannot build its model: {exc}") from None
    except TypeError as exc:
        raise CheckpointError(
            f"checkpoint {ckpt.path}: model {ckpt.model_name!r} does not take {ckpt.model_kwargs}: {exc}"
        ) from None
    if ckpt.keep is not None:
        prune = prune_fn or _default_prune_fn(ckpt)
        try:
            model = prune(model, ckpt.example_input(), list(ckpt.keep), list(ckpt.dropped))
        except EntropySearchError as exc:
            raise CheckpointError(f"checkpoint {ckpt.path}: cannot prune its model to keep={ckpt.keep}"
                                  f"{' without ' + ', '.join(ckpt.dropped) if ckpt.dropped else ''}: {exc}") from None
    try:
        model.load_state_dict(ckpt.state_dict, strict=True)
    except (RuntimeError, KeyError, ValueError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = "; ".join(lines[1:3] or lines[:1])[:300]
        raise CheckpointError(
            f"checkpoint {ckpt.path}: its weights do not fit model {ckpt.model_name!r}"
            f"{' pruned to keep=' + str(ckpt.keep) if ckpt.keep is not None else ''}"
            f"{' without ' + ', '.join(ckpt.dropped) if ckpt.dropped else ''} ({detail})"
        ) from None
    return model.eval()


def load_model(path: str | os.PathLike) -> nn.Module:
    """The network in an entropy-search checkpoint (a baseline, or a pruned network such as a search's
    `best_pruned.pt`), rebuilt and ready to run (eval mode, CPU). The file is opened with `weights_only=True`:
    the architecture is data (model name, keep ratios), never pickled code."""
    return build_model(load_checkpoint(path))


def _default_prune_fn(ckpt: Checkpoint) -> PruneFn:
    """`PruningSpace(...).prune(keep)` with the rounding the checkpoint was pruned with."""
    round_to = int(ckpt.config.get("round_to", 1))

    def prune(model: nn.Module, example_input: torch.Tensor, keep: Sequence[float], dropped: Sequence[str]) -> nn.Module:
        return PruningSpace(model, example_input, round_to=round_to, blocks=bool(dropped)).prune(keep, dropped=dropped)

    return prune
