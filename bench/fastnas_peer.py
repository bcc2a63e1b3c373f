"""NVIDIA Model Optimizer's FastNAS as a benchmark peer of the quality tables (bench_quality.py): the one maintained
library that searches the widths of a CNN's layers. An optional extra, never a dependency of the product:

    pip install -e '.[fastnas]'      # nvidia-modelopt 0.47.0, torchprofile 0.0.4, huggingface_hub

FastNAS (`mtp.prune(model, mode=[("fastnas", rules)], constraints={"flops": "N%"}, ...)`) measures how much the
score drops when each prunable layer keeps fewer channels (its "sensitivity map", one score per layer and
choice, saved in a checkpoint and reused), then bisects one threshold on that drop until the FLOPs constraint
holds. It is used as documented: scored by accuracy on 1,000 held-out images (never the test split), BN statistics
re-estimated on 50 batches of 8 training images before each score; channel steps of one channel (its default of 32 would
leave ResNet-20's 16-channel layers whole). It counts FLOPs its own way, so its percentage is steered (bisected)
until the network's cost as the search counts it (MACs, or the latency table's prediction under a latency
budget) is within 3% below the target, as Torch-Pruning's recipes are. It never removes a residual block.

The network it finds is fine-tuned, tested and timed exactly as the search's finalists are.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from entropy_search.latency import interleaved_latency
from entropy_search.problem import Problem
from entropy_search.problem.adaptive_bn import recalibrate_batchnorm
from entropy_search.problem.macs import count_macs, count_params
from entropy_search.train import evaluate, fine_tune

#: Held-out images each FastNAS score is measured on; the training batches its BN re-estimation uses before each
#: score (Model Optimizer re-estimates BN only once it holds 50 batches, its MODELOPT_QUEUE_MAXLEN) and their size.
SCORE_IMAGES = 1000
CALIBRATION_BATCHES = 50
CALIBRATION_BATCH_SIZE = 8


def available() -> str | None:
    """None when Model Optimizer can be imported, else why not (one line)."""
    try:
        import modelopt.torch.prune  # noqa: F401  (the optional extra, only to see that it is there)
    except Exception as exc:  # ImportError, or a missing dependency of it (it imports huggingface_hub undeclared)
        return f"nvidia-modelopt not importable ({type(exc).__name__}: {exc}); pip install -e '.[fastnas]'"
    return None


def _rules() -> dict:
    """FastNAS's default rules with one-channel steps instead of 32 (ResNet-20's layers have 16 to 64)."""
    conv = {"*": {"channels_ratio": tuple(0.05 * i for i in range(1, 21)), "kernel_size": (), "channel_divisor": 1}}
    norm = {"*": {"features_ratio": tuple(0.05 * i for i in range(1, 21)), "feature_divisor": 1}}
    return {"nn.Conv2d": conv, "nn.Linear": norm, "nn.BatchNorm2d": norm}


def fastnas_at(problem: Problem, flops_percent: float, checkpoint: Path) -> tuple[nn.Module, float]:
    """FastNAS's network at `flops_percent` % of the baseline's FLOPs (its count) and the seconds it took (the
    sensitivity map is computed once per checkpoint file and read after that)."""
    import modelopt.torch.opt as mto  # the optional extra
    import modelopt.torch.prune as mtp

    splits = problem.splits
    score_set = Subset(splits.heldout, range(min(SCORE_IMAGES, len(splits.heldout))))
    calibration = DataLoader(splits.train_eval or splits.train, batch_size=CALIBRATION_BATCH_SIZE, shuffle=False)

    def score(model: nn.Module) -> float:
        return evaluate(model, score_set, device="cpu")

    model = copy.deepcopy(problem.model).cpu().eval()
    t0 = time.perf_counter()
    pruned, _ = mtp.prune(model, mode=[("fastnas", _rules())], constraints={"flops": f"{flops_percent:.4f}%"},
                          dummy_input=problem.space.example_input.cpu(),
                          config={"data_loader": calibration, "collect_func": lambda batch: batch[0],
                                  "max_iter_data_loader": CALIBRATION_BATCHES, "score_func": score,
                                  "checkpoint": str(checkpoint), "verbose": False})
    network = mto.export(pruned) if hasattr(mto, "export") else pruned
    return network.eval(), time.perf_counter() - t0


#: How Model Optimizer says a FLOPs percentage is below the smallest network of its search space.
UNSATISFIABLE = "NOT all constraints can be satisfied"


def fastnas_peer(problem: Problem, checkpoint: Path, *, tolerance: float = 0.03, steps: int = 12) -> dict:
    """FastNAS brought to the problem's budget: its FLOPs percentage bisected until the network's cost (as the
    search counts it) is within `tolerance` below the target. A percentage below FastNAS's smallest network bounds
    the bisection from below. Returns {network, counts, cost_ratio, percent, within_tolerance, steps, seconds};
    network is None when no percentage it accepts met the budget (its smallest network costs more: under a latency
    budget, the residual-stream channels it keeps), with `unreachable` saying so."""
    budget, space = problem.budget, problem.space
    lo, hi = 0.0, 100.0  # lo: within the budget, or below what FastNAS accepts; hi: over the budget
    found, spent, done, smallest = None, 0.0, 0, None
    percent = 100.0 * budget.target / budget.base_cost
    while done < steps:
        done += 1
        try:
            network, seconds = fastnas_at(problem, percent, checkpoint)
        except ValueError as exc:
            if UNSATISFIABLE not in str(exc):
                raise
            lo = percent
            percent = (lo + hi) / 2
            continue
        spent += seconds
        counts = space.counts_of(network)
        cost = budget.cost(counts)
        if cost <= budget.target * (1 + 1e-9):
            lo = percent
            if found is None or cost > found[2]:
                found = (network, counts, cost, percent)
            if cost >= budget.target * (1 - tolerance / 3):
                break
        else:
            hi = percent
            smallest = cost if smallest is None else min(smallest, cost)
        percent = (lo + hi) / 2
    if found is None:
        if smallest is None:
            raise RuntimeError(f"FastNAS: no FLOPs percentage in {steps} steps made a network")
        return {"network": None, "counts": None, "cost_ratio": smallest / budget.base_cost, "percent": hi,
                "within_tolerance": False, "steps": done, "seconds": spent,
                "unreachable": f"its smallest network in {done} steps costs {smallest / budget.base_cost:.3f} of the "
                               f"unpruned network by the budget's measure, over its {budget.target / budget.base_cost:.3f}"}
    network, counts, cost, percent = found
    return {"network": network, "counts": counts, "cost_ratio": cost / budget.base_cost, "percent": percent,
            "within_tolerance": cost >= budget.target * (1 - tolerance), "steps": done, "seconds": spent}


def fastnas_row(problem: Problem, checkpoint: Path, *, seed: int) -> dict:
    """FastNAS's network at the problem's budget, finalised as the search's finalists are: BN re-estimated on the
    search's calibration images, tested, fine-tuned with the config's fine-tune and seed, tested again; its MACs
    counted and its batch-1 latency timed interleaved with the unpruned network (one thread)."""
    config, space, splits = problem.config, problem.space, problem.splits
    found = fastnas_peer(problem, checkpoint)
    network = found["network"]
    if network is None:  # a row that says why, so the table shows it and the runner does not try again
        return {"method": "fastnas", "label": "fastnas", "unreachable": found["unreachable"],
                "cost_ratio": found["cost_ratio"], "within_tolerance": False, "macs_ratio": None,
                "latency_ratio": None, "blocks_kept": None, "blocks": len(space.blocks) or None, "test_before": None,
                "test_after": None, "found_seconds": found["seconds"], "finetune_seconds": None,
                "finetune_epochs": config.finetune.epochs, "fastnas_steps": found["steps"]}
    example = space.example_input.cpu()
    macs, params = count_macs(network, example), count_params(network)
    if problem.evaluator.calibration is not None:
        recalibrate_batchnorm(network, problem.evaluator.calibration.cpu())
    heldout_before = evaluate(network, splits.heldout, device="cpu")
    before = evaluate(network, splits.test, device="cpu")
    t0 = time.perf_counter()
    fine_tune(network, splits.train, epochs=config.finetune.epochs, lr=config.finetune.lr,
              batch_size=config.finetune.batch_size, seed=seed, device="cpu", progress=False, desc="fine-tune fastnas")
    finetune_seconds = time.perf_counter() - t0
    after = evaluate(network, splits.test, device="cpu")
    heldout = evaluate(network, splits.heldout, device="cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        timed = interleaved_latency([problem.model.cpu().eval(), network.eval()], example, batch_sizes=[1])
    finally:
        torch.set_num_threads(threads)
    return {"method": "fastnas", "label": "fastnas", "macs_ratio": macs / space.base_macs,
            "params_ratio": params / space.base_params, "kept_channels": found["counts"],
            "analytic_macs_match": macs == space.macs_of_counts(found["counts"], ()),
            "latency_ratio": timed[1]["ms"]["1"] / timed[0]["ms"]["1"], "unpruned_latency_ms": timed[0]["ms"]["1"],
            "dropped_blocks": [], "blocks_kept": len(space.blocks), "blocks": len(space.blocks) or None,
            "heldout_in_search": heldout_before, "test_before": before, "test_after": after, "heldout_after": heldout,
            "finetune_epochs": config.finetune.epochs, "finetune_seconds": finetune_seconds,
            "found_seconds": found["seconds"], "within_tolerance": found["within_tolerance"],
            "fastnas_percent": found["percent"], "cost_ratio": found["cost_ratio"], "fastnas_steps": found["steps"]}
