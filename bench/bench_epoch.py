"""What one training epoch of a registry network costs on this machine's CPU, before committing hours to a baseline:
SGD steps on random batches of the data set's shape (10 timed after 3), at one thread and at all of them, and the
epoch they imply for the training split.

    PYTHONPATH=. python bench/bench_epoch.py --model mobilenet_v2 --images 54000 --shape 1 28 28   # Fashion-MNIST
"""

from __future__ import annotations

import argparse
import time

import torch

from entropy_search.models import create_model


def seconds_per_step(model_name: str, shape: list[int], classes: int, batch: int, threads: int) -> float:
    """The mean of 10 SGD steps (forward, backward, update) after 3 warm-up steps, on `threads` threads."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=classes, in_channels=shape[0]).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    images, labels = torch.randn(batch, *shape), torch.randint(0, classes, (batch,))
    for step in range(13):
        if step == 3:
            start = time.perf_counter()
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
    return (time.perf_counter() - start) / 10


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mobilenet_v2", help="a registry name")
    parser.add_argument("--shape", nargs=3, type=int, default=[1, 28, 28], metavar=("C", "H", "W"))
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--images", type=int, default=54000, help="training images an epoch")
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args(argv)
    for threads in sorted({1, torch.get_num_threads()}):
        step = seconds_per_step(args.model, args.shape, args.classes, args.batch, threads)
        print(f"{args.model}, {threads} thread(s): {step:.2f} s a step of {args.batch}; an epoch of {args.images} "
              f"images {step * args.images / args.batch / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
