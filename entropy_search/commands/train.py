"""`entropy-search train`: train a baseline network on a data set and save it as a checkpoint.

With no arguments it trains the digits CNN on scikit-learn's digits (offline, CPU, seconds).
"""

from __future__ import annotations

import argparse
import ast
import os
import time
from pathlib import Path

from ..errors import ConfigError


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train",
        help="train a baseline network and save a checkpoint",
        description="Train a baseline network (the one to prune) and save a checkpoint with its config and "
        "test accuracy. Defaults: the digits CNN on scikit-learn's digits, offline.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default="digits_cnn",
                        help="registry name (see models.list_models()), tv:<torchvision name> or package.module:factory")
    parser.add_argument("--data", default="digits",
                        help="digits, fashion_mnist, cifar10, cifar100 or imagefolder:<path>")
    parser.add_argument("--epochs", type=int, default=20, help="training epochs")
    parser.add_argument("--out", default="runs/baseline.pt", help="checkpoint file to write")
    parser.add_argument("--lr", type=float, default=0.05, help="initial SGD learning rate (cosine schedule)")
    parser.add_argument("--batch-size", type=int, default=128, help="training batch size")
    parser.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights, shuffling and the held-out split")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:<n>")
    parser.add_argument("--data-root", default=None,
                        help="where data sets live (default $ENTROPY_SEARCH_DATA or ~/.cache/entropy_search/data)")
    parser.add_argument("--download", action="store_true", help="download the data set if it is missing")
    parser.add_argument("--heldout-fraction", type=float, default=0.1,
                        help="part of the training set held out for the search's accuracy reward")
    parser.add_argument("--image-size", type=int, default=None, help="input size for imagefolder data (default 224)")
    parser.add_argument("--width", type=int, default=None, help="base width, for models that take one (digits_cnn)")
    parser.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="extra keyword argument for the model factory (repeatable)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: 1 for tiny inputs such as 8x8 digits, else torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
    return parser


def parse_model_args(items: list[str], width: int | None = None) -> dict:
    """`KEY=VALUE` strings to factory kwargs (VALUE read as a Python literal when it is one)."""
    kwargs: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.isidentifier():
            raise ConfigError(f"--model-arg expects KEY=VALUE, got {item!r}")
        try:
            kwargs[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            kwargs[key] = raw
    if width is not None:
        kwargs["width"] = width
    return kwargs


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import save_checkpoint
    from ..data import load_data
    from ..models import create_model, model_spec
    from ..train import configure_threads, evaluate, select_device, train
    from ..utils import seed_everything

    # bad names and paths fail before any data is loaded or any time is spent training
    model_spec(args.model)
    model_kwargs = parse_model_args(args.model_arg, args.width)
    device = str(select_device(args.device))
    out = Path(args.out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory; give a file name such as {out / 'baseline.pt'}")
    existing = next(p for p in [out.absolute().parent, *out.absolute().parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise ConfigError(f"cannot write --out {out}: {existing} is not a writable folder")
    splits = load_data(args.data, args.data_root, heldout_fraction=args.heldout_fraction, seed=args.seed,
                       download=args.download, image_size=args.image_size)
    threads = configure_threads(args.threads, device=args.device, image_size=splits.image_size)
    seed_everything(args.seed)
    try:
        model = create_model(args.model, num_classes=splits.num_classes, in_channels=splits.in_channels, **model_kwargs)
    except TypeError as exc:
        raise ConfigError(f"model {args.model!r} does not accept {model_kwargs}: {exc}") from None
    print(f"training {args.model} on {splits.name} ({len(splits.train)} train / {len(splits.heldout)} held-out / "
          f"{len(splits.test)} test images) for {args.epochs} epochs on {device}")
    start = time.perf_counter()
    history = train(model, splits.train, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                    weight_decay=args.weight_decay, momentum=args.momentum, device=args.device, seed=args.seed,
                    progress=not args.no_progress)
    seconds = time.perf_counter() - start
    test_acc = evaluate(model, splits.test, device=args.device)
    metrics = {"test_acc": test_acc, "train_seconds": seconds, "epochs": args.epochs}
    if len(splits.heldout):
        metrics["heldout_acc"] = evaluate(model, splits.heldout, device=args.device)
    if history:
        metrics.update(train_loss=history[-1]["loss"], train_acc=history[-1]["acc"])
    config = {k: v for k, v in vars(args).items() if k != "func"}
    config.update(device_used=device, threads_used=threads)
    path = save_checkpoint(
        out, model, model_name=args.model, model_kwargs=model_kwargs, num_classes=splits.num_classes,
        in_channels=splits.in_channels, image_size=splits.image_size, data=splits.name, config=config,
        metrics=metrics,
    )
    heldout = f", held-out {100 * metrics['heldout_acc']:.2f}%" if "heldout_acc" in metrics else ""
    print(f"test accuracy: {100 * test_acc:.2f}%{heldout} ({seconds:.1f} s) -> saved {path}")
    return 0
