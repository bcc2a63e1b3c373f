"""`entropy-search prune`: apply a keep-ratio policy (or a uniform ratio) to a checkpoint, physically
remove the channels (and the residual blocks it drops), fine-tune, and report MACs, parameters and accuracy
before and after."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import FinetuneConfig, SearchSettings
from ..data import DataSplits, eval_batch, load_data
from ..errors import ConfigError, EntropySearchError
from ..problem import (
    Budget,
    Checkpoint,
    PruningSpace,
    build_model,
    count_params,
    finalize,
    load_checkpoint,
    save_checkpoint,
    uniform_counts,
    user_network,
)
from ..summary import delivered_network, delivered_policy
from ..train import evaluate
from ..utils import resolve_device, seed_everything

# defaults shared with the search config (the schema is the one place for them)
_SEARCH = SearchSettings.model_fields
_FINETUNE = FinetuneConfig.model_fields


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "prune",
        help="prune a checkpoint with a policy or a uniform ratio, fine-tune, report",
        description="Prune a checkpoint physically (Torch-Pruning removes the channels), fine-tune it and "
        "report MACs/params and test accuracy before and after. Give exactly one of --flops-target "
        "(uniform ratio meeting the target; the default, 0.5), --keep (one ratio for every group) or "
        "--policy (a JSON file: a list of keep ratios, a search's result.json or its policy.json: the delivered "
        "network's policy, with the residual blocks it drops). --drop removes residual blocks too.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("checkpoint", help="a checkpoint written by `entropy-search train` (or a search), or with "
                        "--model, a network's weights saved with plain PyTorch (torch.save(model.state_dict(), FILE))")
    parser.add_argument("--model", default=None,
                        help="the architecture of plain weights given as CHECKPOINT: a registry name, tv:<torchvision "
                             "name> or package.module:factory (needs --data; its classes and channels are the data's)")
    parser.add_argument("--mean", type=float, nargs="+", default=None,
                        help="per-channel mean of the inputs' normalisation the network was trained with (default: "
                             "the data set's own, ImageNet's for imagefolder; a checkpoint's recorded one)")
    parser.add_argument("--std", type=float, nargs="+", default=None, help="per-channel std, with --mean")
    parser.add_argument("--image-size", type=int, default=None,
                        help="imagefolder data: the side of the square inputs (default: the checkpoint's, else 224)")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--flops-target", type=float, default=None,
                     help="fraction of the baseline's MACs to keep, met by one ratio for all groups (default 0.5)")
    how.add_argument("--keep", type=float, default=None, help="keep ratio in (0, 1] for every channel group")
    how.add_argument("--policy", default=None, help="JSON file with one keep ratio per channel group")
    parser.add_argument("--drop", nargs="+", default=[], metavar="BLOCK",
                        help="residual blocks to remove (module names, e.g. layer1.2; a policy file's own come first)")
    parser.add_argument("--min-keep", type=float, default=_SEARCH["min_keep"].default,
                        help="smallest keep ratio for --flops-target")
    parser.add_argument("--round-to", type=int, default=_SEARCH["round_to"].default,
                        help="round kept channel counts to this multiple")
    parser.add_argument("--bn-calibration", type=int, default=_SEARCH["bn_calibration"].default,
                        help="training images the pruned network's BN statistics are re-estimated on before "
                             "testing and fine-tuning (adaptive BN; 0: keep the baseline's)")
    parser.add_argument("--epochs", type=int, default=_FINETUNE["epochs"].default, help="fine-tuning epochs (0: none)")
    parser.add_argument("--lr", type=float, default=_FINETUNE["lr"].default, help="fine-tuning learning rate")
    parser.add_argument("--data", default=None, help="data set (default: the checkpoint's)")
    parser.add_argument("--data-root", default=None, help="where data sets live")
    parser.add_argument("--out", default=None, help="pruned checkpoint to write (default: <checkpoint>_pruned.pt)")
    parser.add_argument("--seed", type=int, default=0, help="seed for fine-tuning")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:<n>")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)
    return parser


def read_policy(path: str | Path, group_names: list[str] | None = None) -> tuple[list[float], list[str]]:
    """Keep ratios and dropped residual blocks from a JSON list, {"keep": [...], "dropped_blocks": [...]}, a search's
    result.json or policy.json (the delivered network's policy, {group name: ratio}, and its dropped blocks) or
    such a mapping itself (then `group_names` gives the order)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise EntropySearchError(f"policy file {path} not found") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise EntropySearchError(f"policy file {path} is not valid JSON: {exc}") from None
    dropped: list[str] = []
    if isinstance(data, dict):
        dropped = list(data.get("dropped_blocks") or [])
        if data.keys() & {"policy", "delivered", "delivered_policy", "best", "best_policy"}:  # a search's result
            ranking = delivered_network(data).get("ranking")
            if ranking:
                print(f"note: the delivered network kept the channels {ranking} ranks first; this keeps as many, "
                      "ranked by L1 magnitude (the delivered network itself is the search's best_pruned.pt)")
            dropped = dropped or list(delivered_network(data).get("dropped_blocks") or [])
            data = delivered_policy(data)
        data = data.get("keep", data) if isinstance(data, dict) else data
    if isinstance(data, dict) and group_names is not None:
        missing = [name for name in group_names if name not in data]
        unknown = [name for name in data if name not in group_names]
        if missing or unknown:
            raise EntropySearchError(
                f"policy file {path} does not fit this network's channel groups"
                + (f"; missing: {', '.join(missing)}" if missing else "")
                + (f"; unknown: {', '.join(unknown)}" if unknown else "")
            )
        data = [data[name] for name in group_names]
    if not isinstance(data, list):
        raise EntropySearchError(f"policy file {path} holds no list of keep ratios")
    if not all(isinstance(name, str) for name in dropped):
        raise EntropySearchError(f"policy file {path}: dropped_blocks must be module names, got {dropped!r}")
    return data, dropped


def _user_checkpoint(args: argparse.Namespace) -> tuple[Checkpoint, DataSplits]:
    """CHECKPOINT read as plain weights of --model on --data (checked strictly), as an in-memory checkpoint."""
    if not args.data:
        raise ConfigError("--model reads CHECKPOINT as plain weights: give the data set they were trained for with --data")
    splits = load_data(args.data, args.data_root, heldout_fraction=0.0, mean=args.mean, std=args.std,
                       image_size=args.image_size)
    model = user_network(args.checkpoint, model_name=args.model, num_classes=splits.num_classes,
                         in_channels=splits.in_channels)
    ckpt = Checkpoint(path=Path(args.checkpoint), model_name=args.model, model_kwargs={}, num_classes=splits.num_classes,
                      in_channels=splits.in_channels, image_size=splits.image_size, data=splits.name,
                      config={"trained_by": "elsewhere", "weights": str(args.checkpoint),
                              "preprocessing": splits.preprocessing()},
                      metrics={}, state_dict=model.state_dict())
    return ckpt, splits


def run(args: argparse.Namespace) -> int:
    if args.epochs < 0:
        raise ConfigError(f"--epochs must be >= 0, got {args.epochs}")
    if args.bn_calibration < 0:
        raise ConfigError(f"--bn-calibration must be >= 0, got {args.bn_calibration}")
    if args.model:
        ckpt, splits = _user_checkpoint(args)
    else:
        ckpt = load_checkpoint(args.checkpoint)
        if ckpt.keep is not None:
            raise EntropySearchError(f"checkpoint {ckpt.path} is already pruned; prune its baseline instead")
        recorded = (ckpt.config or {}).get("preprocessing") or {}
        folder = (args.data or ckpt.data).startswith("imagefolder")
        splits = load_data(args.data or ckpt.data, args.data_root, mean=args.mean or recorded.get("mean") or None,
                           std=args.std or recorded.get("std") or None,
                           image_size=(args.image_size or ckpt.image_size) if folder else None,
                           channels=ckpt.in_channels if folder else None)
    if (splits.in_channels, splits.num_classes) != (ckpt.in_channels, ckpt.num_classes):
        raise EntropySearchError(
            f"data set {splits.name} ({splits.in_channels} channels, {splits.num_classes} classes) does not fit "
            f"checkpoint {ckpt.path} ({ckpt.in_channels} channels, {ckpt.num_classes} classes)"
        )
    device = str(resolve_device(args.device))
    model = build_model(ckpt)
    example = ckpt.example_input()
    space = PruningSpace(model, example, round_to=args.round_to)

    dropped = list(args.drop)
    if args.policy is not None:
        keep, dropped_there = read_policy(args.policy, [g.name for g in space.groups])
        keep, how = space.check_keep(keep), f"policy {args.policy}"
        dropped = list(dict.fromkeys(dropped_there + dropped))
    blocks = space.check_dropped(dropped)
    if args.keep is not None:
        keep, how = space.check_keep([args.keep] * len(space.groups)), f"uniform keep {args.keep:g}"
    elif args.policy is None:
        target = _SEARCH["flops_target"].default if args.flops_target is None else args.flops_target
        if not 0 < target <= 1:
            raise ConfigError(f"--flops-target must be in (0, 1], got {target}")
        budget = Budget(space, target, args.min_keep, target_key="--flops-target",
                        min_keep_key="--min-keep").given(blocks)
        budget.check()
        ratio, counts = uniform_counts(budget)
        keep, how = space.counts_to_keep(counts), f"uniform keep {ratio:.3f} for MACs <= {target:g} x baseline"

    seed_everything(args.seed)
    calibration = None
    if args.bn_calibration:
        calibration = eval_batch(splits, args.bn_calibration, split="train", seed=args.seed)[0]
    measured, pruned = finalize(space, splits, keep, finetune=FinetuneConfig(epochs=args.epochs, lr=args.lr),
                                calibration=calibration, seed=args.seed, device=device, progress=not args.no_progress,
                                dropped=blocks)
    acc_base = evaluate(model, splits.test, device=device)
    rows = {"MACs": (space.base_macs, measured["macs"]), "params": (count_params(model), measured["params"])}
    acc_pruned, acc_tuned = measured["test_accuracy_before_finetune"], measured["test_accuracy_after_finetune"]

    out = Path(args.out) if args.out else ckpt.path.with_name(ckpt.path.stem + "_pruned.pt")
    metrics = {
        "macs": rows["MACs"][1], "params": rows["params"][1], "baseline_macs": rows["MACs"][0],
        "baseline_params": rows["params"][0], "test_accuracy_baseline": acc_base,
        "test_accuracy_pruned": acc_pruned, "test_accuracy_finetuned": acc_tuned,
    }
    config = {**ckpt.config, "round_to": args.round_to, "preprocessing": splits.preprocessing(),
              "prune": {"how": how, "epochs": args.epochs, "lr": args.lr, "bn_calibration": args.bn_calibration}}
    save_checkpoint(out, pruned, model_name=ckpt.model_name, model_kwargs=ckpt.model_kwargs,
                    num_classes=ckpt.num_classes, in_channels=ckpt.in_channels, image_size=ckpt.image_size,
                    data=ckpt.data, config=config, metrics=metrics, keep=keep, dropped=measured["dropped_blocks"])

    print(f"\n{ckpt.model_name} on {splits.name}: {how}, {len(space.groups)} channel groups, "
          f"kept channels {space.kept_channels(keep)}")
    if blocks:
        print(f"residual blocks removed: {', '.join(measured['dropped_blocks'])} "
              f"({measured['blocks_kept']} of {len(space.blocks)} kept)")
    print(f"{'':24}{'baseline':>14}{'pruned':>14}{'ratio':>9}")
    for label, (before, after) in rows.items():
        print(f"{label:24}{before:>14,}{after:>14,}{after / before:>9.3f}")
    print(f"{'test top-1':24}{acc_base:>14.4f}{acc_pruned:>14.4f}   (before fine-tuning)")
    print(f"{'test top-1 fine-tuned':24}{'':>14}{acc_tuned:>14.4f}   ({args.epochs} epochs)")
    print(f"pruned checkpoint: {out}")
    return 0
