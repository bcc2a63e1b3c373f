"""The finalists' fine-tunes (docs/design.md, "The final stage"): each finalist of a search (the agent's top-k, the
baselines' best) pruned for real, fine-tuned and tested by `problem.finalize`, either as Ray tasks on the Ray the
search used, as many at once as it has room for (`finetune.parallel`, `finetune.resources`), or one after another
in the driver; and `selection.method: halving` as Tune trials under Tune's ASHA scheduler (`halving_on_tune`).
Ray only schedules: a task builds the same problem from the resolved config (`worker_problem`) and runs the same
`finalize_record`, so both paths compute the same networks for the same seeds.

Each finished fine-tune is written to `<output.dir>/finalists/<label>.pt` as it finishes (its measurements and its
weights, keyed by the network and the fine-tune's settings), so a resumed search redoes none that finished. A task
whose worker dies is retried once by Ray; a finalist enters the result once, whatever its attempts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import ray
import ray.exceptions
import torch
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.util import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from torch import nn

from .config import SearchConfig
from .envs.pruning_env import env_config, get_problem
from .errors import EntropySearchError
from .problem import Problem, PruningSpace, finalize
from .problem.selection import (
    Finalist,
    check_halving,
    halving_result,
    halving_rung_count,
    short_finetune_rungs,
)
from .rl.rundir import FINALISTS_DIR
from .utils import resolve_device

#: A fine-tuned finalist: (its record: measurements next to the search's own, the pruned and fine-tuned network).
Finalized = tuple[dict, nn.Module]


def policy_of(space: PruningSpace, record: dict) -> dict:
    """{group name: keep ratio} of a candidate record."""
    return {g.name: round(float(k), 6) for g, k in zip(space.groups, record["keep"])}


def finalize_record(problem: Problem, config: SearchConfig, record: dict, *, label: str, progress: bool) -> Finalized:
    """`finalize` a candidate record of the search: the pruned, fine-tuned network's measurements next to
    the search's own (reward, entropy, held-out accuracy); BN re-estimated on the search's images."""
    measured, pruned = finalize(problem.space, problem.splits, record["keep"], finetune=config.finetune,
                                calibration=problem.evaluator.calibration, seed=config.seed, label=f"fine-tune {label}",
                                progress=progress, ranking=record.get("ranking"),
                                dropped=record.get("dropped_blocks") or ())
    out = {
        "label": label,
        "policy": policy_of(problem.space, record),
        "reward": record.get("reward"),
        "entropy": record.get("entropy"),
        "heldout_accuracy": record.get("accuracy"),
        **measured,
        "analytic_macs_match": measured["macs"] == record.get("macs"),
    }
    if record.get("ranking") is not None:  # a peer recipe's: which channels it keeps is its own
        out["ranking"] = record["ranking"]
    return out, pruned


def finetune_key(config: SearchConfig, record: dict) -> str:
    """What makes two fine-tunes the same: the network (kept channels, ranking, dropped blocks), the fine-tune's
    settings and the seed (a resumed search may change `finetune`: then nothing kept is reused)."""
    what = {"kept_channels": list(record["kept_channels"]), "ranking": record.get("ranking"),
            "dropped": sorted(record.get("dropped_blocks") or ()), "seed": config.seed,
            "finetune": config.finetune.model_dump(exclude={"parallel", "resources"})}
    return hashlib.sha1(json.dumps(what, sort_keys=True).encode()).hexdigest()


class FinalistStore:
    """The finished fine-tunes of a search, one file per finalist label, written atomically."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)

    def path(self, label: str) -> Path:
        return self.folder / f"{label}.pt"

    def load(self, label: str, space: PruningSpace, key: str | None = None) -> Finalized | None:
        """The kept fine-tune of `label` (when `key` is given, only if it is the same fine-tune): its record and
        its network, `space` pruned to the record's shapes and given the kept weights (which channels a ranking
        chose does not change the shapes, so none is needed: a process that has not computed the peers' rankings
        reads their finalists too)."""
        path = self.path(label)
        if not path.exists():
            return None
        kept = torch.load(path, map_location="cpu", weights_only=True)
        if key is not None and kept.get("key") != key:
            return None
        final = kept["final"]
        model = space.prune(final["keep"], dropped=final.get("dropped_blocks") or ())
        model.load_state_dict(kept["state_dict"])
        return final, model.cpu().eval()

    def save(self, label: str, key: str, final: dict, model: nn.Module) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path(label).with_suffix(".tmp")
        torch.save({"key": key, "final": final, "state_dict": model.state_dict()}, tmp)
        os.replace(tmp, self.path(label))


def finetune_gpus(config: SearchConfig) -> float:
    """GPUs of one fine-tune task: `finetune.resources.num_gpus`, else one when the search runs on a GPU here."""
    gpus = config.finetune.resources.num_gpus
    if gpus is None:
        gpus = 1.0 if resolve_device(config.search.device).type == "cuda" else 0.0
    return gpus


def parallel_slots(config: SearchConfig) -> tuple[int, PlacementGroupSchedulingStrategy | None]:
    """How many fine-tunes the running Ray can hold at once, and where to schedule them: inside a sweep's trial,
    the trial's placement group (its bundles after its own, freed when the env runners stopped); elsewhere the
    cluster. (0, None) without Ray."""
    if not ray.is_initialized():
        return 0, None
    need = {"CPU": config.finetune.resources.num_cpus, "GPU": finetune_gpus(config)}

    def fits(have: dict) -> int:
        return int(min(have.get(res, 0.0) // amount for res, amount in need.items() if amount > 0))

    group = get_current_placement_group()
    if group is not None:
        return sum(fits(bundle) for bundle in group.bundle_specs[1:]), PlacementGroupSchedulingStrategy(group)
    return fits(ray.cluster_resources()), None


def task_threads(config: SearchConfig) -> int:
    """Torch threads of a fine-tune task: its CPUs, rounded down, at least one."""
    return max(1, int(config.finetune.resources.num_cpus))


def shipped_rankings(space: PruningSpace, names: Iterable[str | None]) -> dict[str, list[torch.Tensor]]:
    """The driver's channel rankings of `names` (a peer recipe's: a worker cannot compute it again), by name."""
    return {name: space.ranking(name) for name in dict.fromkeys(names) if name is not None}


def worker_problem(env_cfg: dict, threads: int, rankings: dict[str, list[torch.Tensor]]) -> Problem:
    """The problem in a Ray worker: built from the resolved config (once per worker process), with the driver's
    `rankings` installed (`shipped_rankings`) and torch at `threads`."""
    problem = get_problem(env_cfg)
    for name, order in rankings.items():
        problem.space.set_ranking(name, order)
    torch.set_num_threads(threads)
    return problem


@ray.remote(max_retries=1)  # a worker lost mid fine-tune (a node, the OOM killer, a kill): tried once more
def finetune_finalist(env_cfg: dict, record: dict, label: str, threads: int,
                      rankings: dict[str, list[torch.Tensor]]) -> Finalized:
    """One finalist's fine-tune in a Ray worker (`worker_problem`), then `finalize_record`; the record says where
    it ran (`finetuned_on`)."""
    problem = worker_problem(env_cfg, threads, rankings)
    final, model = finalize_record(problem, problem.config, record, label=label, progress=False)
    final["finetuned_on"] = {"ray_task": True, **where_this_runs()}
    return final, model


def where_this_runs() -> dict:
    """This process's Ray node (IP and id; None outside Ray: a search without Ray) and PID, as a finalist's
    record says where it was fine-tuned."""
    if not ray.is_initialized():
        return {"node_ip": None, "node_id": None, "pid": os.getpid()}
    return {"node_ip": ray.util.get_node_ip_address(), "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid()}


def finetune_finalists(problem: Problem, config: SearchConfig, jobs: dict[str, dict], *,
                       progress: bool = True) -> tuple[dict[str, Finalized], dict]:
    """Fine-tune every finalist of `jobs` ({label: candidate record}): those already kept on disk are read back,
    the others run as Ray tasks when two or more fit at once (`finetune.parallel`), else in the driver. Returns
    ({label: (record, network)} in the order of `jobs`, how: `slots` (fine-tunes at once; 1: in the driver) and
    `kept` (the labels read back from disk))."""
    store = FinalistStore(Path(config.output.dir) / FINALISTS_DIR)
    keys = {label: finetune_key(config, record) for label, record in jobs.items()}
    done: dict[str, Finalized] = {}
    for label in jobs:
        if (kept := store.load(label, problem.space, keys[label])) is not None:
            done[label] = kept
    todo = [label for label in jobs if label not in done]
    slots, strategy = parallel_slots(config) if config.finetune.parallel and config.finetune.epochs > 0 else (0, None)
    info = {"slots": slots if slots >= 2 and len(todo) >= 2 else 1, "kept": [lb for lb in jobs if lb in done]}
    if progress and strategy is None and 0 < slots < 2 <= len(todo):
        res = config.finetune.resources
        print(f"note: the finalists are fine-tuned one after another in the driver: Ray has room for one fine-tune of "
              f"{res.num_cpus:g} CPUs and {finetune_gpus(config):g} GPUs at a time (finetune.resources)", flush=True)
    if info["slots"] == 1:
        for label in todo:
            final, model = finalize_record(problem, config, jobs[label], label=label, progress=progress)
            final["finetuned_on"] = {"ray_task": False, **where_this_runs()}
            done[label] = final, model
            store.save(label, keys[label], final, model)
    else:
        _run_tasks(problem, config, jobs, todo, keys, store, done, strategy, progress=progress)
    return {label: done[label] for label in jobs}, info


def _run_tasks(problem: Problem, config: SearchConfig, jobs: dict[str, dict], todo: list[str], keys: dict[str, str],
               store: FinalistStore, done: dict[str, Finalized], strategy: PlacementGroupSchedulingStrategy | None, *,
               progress: bool) -> None:
    """The fine-tunes of `todo` as Ray tasks, into `done`; each is saved (and announced) as it finishes."""
    res = config.finetune.resources
    options = {"num_cpus": res.num_cpus, "num_gpus": finetune_gpus(config)}
    if strategy is not None:
        options["scheduling_strategy"] = strategy
    env_cfg = env_config(config)
    t0 = time.perf_counter()
    pending = {}
    for label in todo:
        rankings = shipped_rankings(problem.space, [jobs[label].get("ranking")])
        ref = finetune_finalist.options(**options).remote(env_cfg, jobs[label], label, task_threads(config), rankings)
        pending[ref] = label
    if progress:
        print(f"fine-tuning {len(todo)} finalists as Ray tasks ({res.num_cpus:g} CPUs, {options['num_gpus']:g} GPUs "
              "each)", flush=True)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        label = pending.pop(ready[0])
        try:
            final, model = ray.get(ready[0])
        except ray.exceptions.RayError as exc:
            for ref in pending:
                ray.cancel(ref)
            cause = getattr(exc, "cause", None) or exc  # a task's own exception, else Ray's (a worker lost twice)
            reason = next((ln.strip() for ln in str(cause).splitlines() if ln.strip()), type(cause).__name__)
            raise EntropySearchError(
                f"the fine-tune of finalist {label} failed ({type(cause).__name__}: {reason[:300]}); the finished ones "
                f"are kept in {store.folder}: continue with --resume") from exc
        done[label] = final, model
        store.save(label, keys[label], final, model)
        if progress:
            print(f"fine-tuned {label}: test accuracy {final['test_accuracy_after_finetune']:.4f} "
                  f"({len(todo) - len(pending)}/{len(todo)}, {time.perf_counter() - t0:.0f} s)", flush=True)


#: The folder of `halving_on_tune`'s Tune experiment in the search's output folder (redone by a resumed search).
HALVING_DIR = "halving"


def halving_trial(params: dict, *, env_cfg: dict, finalists: dict[str, Finalist],
                  rankings: dict[str, list[torch.Tensor]], threads: int, workdir: str) -> None:
    """One finalist of successive halving as a Tune trial (`worker_problem`): its short fine-tune's rungs
    (`short_finetune_rungs`) reported one by one (steps, held-out accuracy and loss; at the last rung also which
    held-out images it got right, for the guarded rule) until Tune's ASHA stops it or it reaches the last. Tune
    starts a trial in its own folder; it works in the driver's `workdir` (where it exists: on the driver's machine),
    since the config's relative paths (data, checkpoint) are the driver's."""
    if os.path.isdir(workdir):
        os.chdir(workdir)
    problem = worker_problem(env_cfg, threads, rankings)
    config, sel = problem.config, problem.config.selection
    finalist = finalists[params["label"]]
    n_rungs = halving_rung_count(len(finalists), sel.eta)
    rungs = short_finetune_rungs(problem.space, problem.splits, finalist, calibration=problem.evaluator.calibration,
                                 rung_steps=sel.rung_steps, eta=sel.eta, rungs=n_rungs,
                                 batch_size=sel.batch_size, lr=sel.lr, seed=config.seed)
    for rung, (steps, accuracy, loss, correct) in enumerate(rungs):
        report = {"steps": steps, "heldout_accuracy": accuracy, "heldout_loss": loss}
        if rung == n_rungs - 1:
            report["heldout_correct"] = np.packbits(correct.numpy()).tobytes().hex()
        tune.report(report)


class _GuardedASHA(ASHAScheduler):
    """Tune's ASHA, except that it never stops the reference finalist (uniform pruning) before the last rung:
    its results still count in every rung's cut-off, and at the last rung the guarded rule compares the
    survivors with it on the same images."""

    def __init__(self, *, reference: str | None, max_t: int, **kwargs) -> None:
        super().__init__(max_t=max_t, **kwargs)
        self.reference, self.last_steps = reference, max_t  # the last rung's steps

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        if trial.config.get("label") == self.reference and result.get("steps", 0) < self.last_steps:
            return self.CONTINUE
        return action


def halving_on_tune(problem: Problem, config: SearchConfig, finalists: list[Finalist], *,
                    reference: str | None) -> dict:
    """`selection.method: halving` on Ray Tune: each finalist a trial (`halving_trial`, `finetune.resources`), Tune's
    ASHA scheduler stopping the worse 1 - 1/eta at each rung of `rung_steps * eta**r` steps, judged by held-out
    accuracy (never the test split), `reference` kept to the last rung. Returns `halving_result` of what the trials
    reported, with `seconds`. ASHA promotes asynchronously (a finalist that reaches a rung early can go on before
    the others are measured there), but what each finalist measures at a rung does not depend on the others: the
    same images and seeds as the driver's loop (`successive_halving`)."""
    sel = config.selection
    check_halving(problem.splits, finalists, rung_steps=sel.rung_steps, eta=sel.eta)
    labels = [label for label, *_ in finalists]
    if len(labels) == 1:
        return {"winner": labels[0], "rungs": [], "seconds": 0.0}
    t0 = time.perf_counter()
    rankings = shipped_rankings(problem.space, [ranking for _, _, ranking, _ in finalists])
    trainable = tune.with_resources(
        tune.with_parameters(halving_trial, env_cfg=env_config(config), finalists={f[0]: f for f in finalists},
                             rankings=rankings, threads=task_threads(config), workdir=os.getcwd()),
        {"cpu": config.finetune.resources.num_cpus, "gpu": finetune_gpus(config)})
    last = sel.rung_steps * sel.eta ** (halving_rung_count(len(labels), sel.eta) - 1)
    scheduler = _GuardedASHA(reference=reference, time_attr="steps", metric="heldout_accuracy", mode="max",
                             max_t=last, grace_period=sel.rung_steps, reduction_factor=sel.eta)
    storage = Path(config.output.dir).resolve()
    shutil.rmtree(storage / HALVING_DIR, ignore_errors=True)
    tuner = tune.Tuner(
        trainable, param_space={"label": tune.grid_search(labels)},
        # reuse_actors: a trial's process (its problem built once: data, baseline, space) serves the next trials
        tune_config=tune.TuneConfig(scheduler=scheduler, reuse_actors=True,
                                    trial_name_creator=lambda t: t.config["label"],
                                    trial_dirname_creator=lambda t: t.config["label"]),
        run_config=tune.RunConfig(name=HALVING_DIR, storage_path=str(storage), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=1)))
    results = tuner.fit()
    if results.errors:
        first = str(results.errors[0]).strip().splitlines()
        raise EntropySearchError(f"successive halving on Tune failed ({first[-1][:300] if first else 'a trial failed'}); "
                                 "continue with --resume")
    histories: dict[str, list[tuple[int, float, float]]] = {label: [] for label in labels}
    last_correct: dict[str, torch.Tensor] = {}
    n_heldout = len(problem.splits.heldout)
    for result in results:
        label = result.config["label"]
        frame = result.metrics_dataframe
        histories[label] = [(int(row.steps), float(row.heldout_accuracy), float(row.heldout_loss))
                            for row in frame.itertuples()]
        packed = result.metrics.get("heldout_correct")
        if isinstance(packed, str):
            bits = np.unpackbits(np.frombuffer(bytes.fromhex(packed), dtype=np.uint8))[:n_heldout]
            last_correct[label] = torch.from_numpy(bits.astype(bool))
    return {**halving_result(histories, last_correct, reference=reference, significance=sel.significance),
            "seconds": time.perf_counter() - t0}
