"""`entropy-search train`: train a baseline network on a data set and save it as a checkpoint.

With no arguments it trains the digits CNN on scikit-learn's digits (offline, CPU, seconds). The training state
is saved after every epoch; `--resume` continues a killed training where it stopped.
"""

from __future__ import annotations

import argparse
import ast

from ..config import DataConfig, ModelConfig
from ..errors import ConfigError
from ..problem import train_baseline


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train",
        help="train a baseline network and save a checkpoint",
        description="Train a baseline network (the one to prune) and save a checkpoint with its config and "
        "test accuracy. Defaults: the digits CNN on scikit-learn's digits, offline.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default=ModelConfig.model_fields["name"].default,
                        help="registry name (see models.list_models()), tv:<torchvision name> or package.module:factory")
    parser.add_argument("--data", default=DataConfig.model_fields["name"].default,
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
    parser.add_argument("--heldout-fraction", type=float, default=DataConfig.model_fields["heldout_fraction"].default,
                        help="part of the training set held out for the search's accuracy reward")
    parser.add_argument("--image-size", type=int, default=None, help="input size for imagefolder data (default 224)")
    parser.add_argument("--width", type=int, default=None, help="base width, for models that take one (digits_cnn)")
    parser.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="extra keyword argument for the model factory (repeatable)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: 1 for tiny inputs such as 8x8 digits, else torch's choice)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted training of --out from its state file (<out>.state, written "
                        "after every epoch), to the weights an uninterrupted run of the same arguments ends with")
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
    train_options = {"lr": args.lr, "batch_size": args.batch_size, "weight_decay": args.weight_decay,
                     "momentum": args.momentum}
    path, metrics = train_baseline(
        args.out, model=args.model, data=args.data, epochs=args.epochs, data_root=args.data_root,
        heldout_fraction=args.heldout_fraction, seed=args.seed, model_kwargs=parse_model_args(args.model_arg, args.width),
        device=args.device, threads=args.threads, download=args.download, image_size=args.image_size,
        progress=not args.no_progress, train_options=train_options, resume=args.resume,
    )
    heldout = f", held-out {100 * metrics['heldout_acc']:.2f}%" if "heldout_acc" in metrics else ""
    print(f"test accuracy: {100 * metrics['test_acc']:.2f}%{heldout} ({metrics['train_seconds']:.1f} s) -> saved {path}")
    return 0
