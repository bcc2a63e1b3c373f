"""Cost of evaluating one candidate, per evaluation path, as ratios measured in one run.

For each model at keep 0.5 in every group:
  (a) forward of the unpruned model            (b) masked forward (hooks zero pruned channels)
  (c) deep copy + physical prune + forward     (d) forward of the already-pruned model (the floor)
  (e) sliced forward (the search's path: kept weights swapped into the original modules)
and the full candidate evaluation (sliced forward + spatial entropy of every BN output + accuracy).

    python bench/bench_candidates.py            # CPU batch 256, CUDA batch 1024 when present
    python bench/bench_candidates.py --quick    # smoke mode for tests
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from entropy_search import PruningSpace, create_model
from entropy_search.problem import CandidateEvaluator


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of `fn` over `repeats` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_model(name: str, batch: int, repeats: int, device: torch.device) -> dict[str, float]:
    torch.manual_seed(0)
    model = create_model(name).to(device).eval()
    space = PruningSpace(model, torch.randn(1, 3, 32, 32, device=device))
    keep = [0.5] * len(space.groups)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    pruned = space.prune(keep).eval()

    def masked():
        with space.masked(keep):
            model(x)

    def sliced():
        with space.sliced(keep):
            model(x)

    def prune_and_forward():
        space.prune(keep).eval()(x)

    evaluator = CandidateEvaluator(space, x, y)
    with torch.no_grad():
        t = {
            "a_full": timed(lambda: model(x), repeats, device),
            "b_masked": timed(masked, repeats, device),
            "c_prune_forward": timed(prune_and_forward, max(1, repeats // 2), device),
            "d_pruned_floor": timed(lambda: pruned(x), repeats, device),
            "e_sliced": timed(sliced, repeats, device),
        }
    t["candidate_eval"] = timed(lambda: evaluator.evaluate(keep), repeats, device)
    return t


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet56", "vgg16_bn"])
    parser.add_argument("--batch", type=int, default=None, help="default: 256 on CPU, 1024 on CUDA")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny run (smoke test)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    batch = args.batch or (1024 if device.type == "cuda" else 256)
    if args.quick:
        args.models, batch, args.repeats = ["resnet20"], 8, 1
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# candidate evaluation, keep 0.5 in every group, batch {batch}, {where}, torch {torch.__version__}")
    for name in args.models:
        t = bench_model(name, batch, args.repeats, device)
        ms = {k: 1000 * v for k, v in t.items()}
        floor = t["d_pruned_floor"]
        print(f"\n{name}: " + "  ".join(f"{k}={v:.1f}ms" for k, v in ms.items()))
        print(f"  masked / full          (b)/(a) = {t['b_masked'] / t['a_full']:.2f}   target <= 1.3")
        print(f"  prune+forward / floor  (c)/(d) = {t['c_prune_forward'] / floor:.2f}")
        print(f"  masked / floor         (b)/(d) = {t['b_masked'] / floor:.2f}")
        print(f"  sliced / floor         (e)/(d) = {t['e_sliced'] / floor:.2f}   target <= 1.5")
        print(f"  sliced / min(b, c)             = {t['e_sliced'] / min(t['b_masked'], t['c_prune_forward']):.2f}   target <= 1.0")
        print(f"  full candidate eval / (e)      = {t['candidate_eval'] / t['e_sliced']:.2f}  (entropy of all BN outputs + accuracy)")


if __name__ == "__main__":
    main()
