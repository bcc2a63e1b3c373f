"""Finalising a candidate: physical pruning, adaptive BN, test accuracy before and after fine-tuning, export
(docs/design.md, "The final stage"). The one path used by the search's finalists and by `entropy-search prune`."""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Sequence
from pathlib import Path

import torch
from torch import nn

from ..config import FinetuneConfig
from ..data import DataSplits
from ..train import evaluate, fine_tune
from .adaptive_bn import recalibrate_batchnorm
from .blocks import block_fields
from .checkpoint import Checkpoint, save_checkpoint
from .macs import count_macs, count_params
from .space import PruningSpace

log = logging.getLogger(__name__)


def finalize(
    space: PruningSpace,
    splits: DataSplits,
    keep: Sequence[float],
    *,
    finetune: FinetuneConfig,
    calibration: torch.Tensor | None,
    seed: int,
    device: str = "auto",
    label: str = "fine-tune",
    progress: bool = True,
    ranking: str | None = None,
    dropped: Collection[int | str] = (),
) -> tuple[dict, nn.Module]:
    """Prune `keep` for real, check its MACs against the analytic count, re-estimate BN statistics on
    `calibration` (the images the search used; None: keep the baseline's), test, fine-tune, test again, and
    measure the held-out split too (what the final stage may judge by; the test split is only reported).
    `ranking`: another ranking of the space's channels picks which to keep (a peer recipe's); `dropped`: the
    residual blocks removed.

    Returns (measurements, the pruned and fine-tuned model)."""
    keep = space.check_keep(keep)
    counts = space.kept_channels(keep)
    blocks = space.check_dropped(dropped)
    pruned = space.prune(keep, ranking, blocks).to(space.example_input.device)  # counted where the example input is
    macs = count_macs(pruned, space.example_input)
    params = count_params(pruned)
    analytic = space.macs_of_counts(counts, blocks)
    if calibration is not None:
        recalibrate_batchnorm(pruned, calibration)
    before = evaluate(pruned, splits.test, device=device)
    t0 = time.perf_counter()
    history: list[dict] = []
    if finetune.epochs > 0:
        history = fine_tune(pruned, splits.train, epochs=finetune.epochs, lr=finetune.lr,
                            batch_size=finetune.batch_size, seed=seed, device=device, progress=progress, desc=label)
    after = evaluate(pruned, splits.test, device=device) if finetune.epochs > 0 else before
    heldout = evaluate(pruned, splits.heldout, device=device) if len(splits.heldout) else None
    measured = {
        "keep": keep,
        "kept_channels": counts,
        **block_fields(space, blocks),
        "macs": macs,
        "params": params,
        "macs_ratio": macs / space.base_macs,
        "params_ratio": params / space.base_params,
        "analytic_macs": analytic,
        "analytic_macs_match": macs == analytic,
        "test_accuracy_before_finetune": before,
        "test_accuracy_after_finetune": after,
        "heldout_accuracy_after_finetune": heldout,
        "finetune_epochs": finetune.epochs,
        "finetune_seconds": time.perf_counter() - t0,
        "finetune_history": history,
    }
    return measured, pruned.cpu().eval()


def export(model: nn.Module, example_input: torch.Tensor, out_dir: str | Path, name: str, *, onnx: bool,
           base: Checkpoint, keep: Sequence[float], round_to: int, metrics: dict | None = None,
           dropped: Sequence[str] = (), preprocessing: dict | None = None) -> dict[str, str]:
    """Write `<name>.pt`, an entropy-search checkpoint of the pruned network (the base model's name, the keep
    ratios and the names of the dropped blocks, so `load_model` rebuilds it; opens with `torch.load`'s default `weights_only=True`), and, when asked,
    `<name>.onnx`; returns {format: path}. `preprocessing` (the inputs' channels, size, mean and std) is recorded
    in the checkpoint. A failed ONNX export is logged and recorded as `onnx_error`: the
    PyTorch file is the result."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    path = out_dir / f"{name}.pt"
    save_checkpoint(path, model, model_name=base.model_name, model_kwargs=base.model_kwargs,
                    num_classes=base.num_classes, in_channels=base.in_channels, image_size=base.image_size,
                    data=base.data, config={**base.config, "round_to": round_to,
                                            **({"preprocessing": preprocessing} if preprocessing else {})},
                    metrics=metrics, keep=keep, dropped=dropped)
    files["pytorch"] = str(path)
    if onnx:
        try:
            files["onnx"] = str(export_onnx(model, example_input, out_dir / f"{name}.onnx"))
        except Exception as exc:  # noqa: BLE001 - export is a convenience; the PyTorch file is the result
            log.warning("ONNX export failed: %s", exc)
            files["onnx_error"] = str(exc)
    return files


def export_onnx(model: nn.Module, example_input: torch.Tensor, path: str | Path) -> Path:
    """The network as an ONNX file with a dynamic batch dimension (input `input`, output `logits`)."""
    torch.onnx.export(model.eval(), example_input, str(path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    return Path(path)
