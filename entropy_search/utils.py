"""Seeding, device choice and run metadata: the one place these are decided."""

from __future__ import annotations

import os
import platform
import random
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from .version import __version__


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (CPU and CUDA); return a torch generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    return torch.Generator().manual_seed(seed)


def torch_save_atomically(obj, path: str | os.PathLike) -> Path:
    """`torch.save` to a temporary file next to `path`, synced, then renamed over it: a reader (or a process
    killed meanwhile) finds the old file or the new one, never half of one. Raises OSError."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` picks CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def git_commit(path: str | os.PathLike | None = None) -> str:
    """The commit of the source tree this package runs from, or 'unknown'."""
    where = Path(path) if path else Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment_info() -> dict[str, str]:
    """Versions and hardware, logged with every result."""
    info = {
        "entropy_search_version": __version__,
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": str(os.cpu_count()),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    return info
