"""One RL pruning search (`entropy-search search CONFIG.yaml`), end to end (docs/design.md, "The search").

`run_search(config)`:

1. checks the output folder, sets up the problem (`entropy_search.problem.setup`: the baseline
   checkpoint, trained first when missing; the data; the channel groups; the budget, whose target must
   be reachable: a ConfigError before anything starts);
2. starts or joins Ray (`entropy_search.ray_runtime`) and runs the agent (`entropy_search.rl.RLSearch`)
   until the stop rule; every candidate is written to `candidates.jsonl` as it comes, and the agent,
   the cache and the top-k are checkpointed so that `resume=True` continues;
3. `finish_search`, with the env runners stopped: the baselines under the same budget and number of evaluations
   (uniform, random, Torch-Pruning's recipes), the top-k (and the baselines' best) finalised
   (`entropy_search.finalists`: pruned for real, fine-tuned and tested, as Ray tasks in parallel on the same Ray
   when they fit), the final stage's choice of the delivered network, its export, and `result.json` (whose
   unprefixed figures are the delivered network's; `agent` is the agent's own pick); Ray is stopped when this
   search started it.

`on_iteration(metrics)` is called after every training iteration with a flat dict of numbers (the
Tune sweep logs them to MLflow).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import ray
import ray.exceptions
import torch

from .config import SearchConfig, load_config
from .data import eval_batch
from .errors import EntropySearchError
from .finalists import finetune_finalists, halving_on_tune, parallel_slots, policy_of
from .jsonio import write_json
from .latency import onnx_latency, speedup, torch_latency
from .problem import (
    CandidateEvaluator,
    LatencyMeter,
    Problem,
    check_exact,
    count_macs,
    count_params,
    ensure_checkpoint,
    export,
    finalist_records,
    guarded_choice,
    halving_survivors,
    offered,
    peer_baseline,
    proxy_agreement,
    random_search,
    setup,
    shallow_blocks,
    successive_halving,
    uniform_baseline,
    user_weights,
)
from .ray_runtime import check_fits, env_runner_bundles, remember_ray_processes, start_ray, stop_ray
from .rl import RLSearch, SearchState, prepare_output_dir
from .rl.driver import stop_reason
from .rl.rundir import (
    CANDIDATES_FILE,
    CHECKPOINT_DIR,
    CONFIG_FILE,
    RESULT_FILE,
    check_free_space,
    is_no_space,
    no_space_error,
)
from .train import correct_predictions, select_device
from .train import evaluate as test_accuracy
from .utils import environment_info, seed_everything

#: Evaluation images the exactness guard compares the candidate's two computations on.
EXACTNESS_IMAGES = 16


def prepare(config: SearchConfig, *, progress: bool = True,
            imported: tuple[torch.nn.Module, Any] | None = None) -> Problem:
    """The problem on the driver, before Ray starts: the baseline checkpoint (imported from `model.weights`, or
    trained when missing; `imported`: `user_weights`' result), data, channel groups, a reachable budget and a local
    evaluator."""
    ensure_checkpoint(config, progress=progress, imported=imported)
    problem = setup(config)
    for note in problem.notes:
        print(f"note: {note}", flush=True)
    evaluator = problem.evaluator
    if config.search.check_exact and isinstance(evaluator, CandidateEvaluator) and evaluator.mode != "pruned":
        problem.exactness = check_exact(problem.space, problem.budget, evaluator.x[:EXACTNESS_IMAGES],
                                        mode=evaluator.mode, seed=config.seed)
    return problem


def select_delivered(problem: Problem, config: SearchConfig, state: SearchState, baselines: dict,
                     finalized: dict, *, progress: bool = True) -> dict:
    """The final stage over the finalists (`finalist_records`: the uniform candidate, the agent's top-k, random
    search's best and Torch-Pruning's recipes). `selection.method: full` judges each by its held-out
    correctness after its full fine-tune: uniform pruning is delivered unless another finalist beats it
    significantly on the same images (`guarded_choice`); `halving` by successive halving on short fine-tunes (on Tune's
    ASHA when two or more fit on the search's Ray outside a sweep's trial, else in the driver), then, with
    `selection.survivors`, the same guarded rule on the full fine-tunes of the last rung's best, uniform pruning and
    the agent's pick. Off: the agent's pick. Every finalist it needs, and the winner, end up in `finalized`
    ({label: (record, model)})."""
    uniform = (baselines.get("uniform") or {}).get("best") if config.selection.enabled else None
    others = [(name, baselines[name]["best"]) for name in ("uniform_shallow", *config.baselines.peers)
              if (baselines.get(name) or {}).get("best")]
    records = finalist_records(uniform, state.top_k, (baselines.get("random") or {}).get("best"), others)
    labels = list(records)

    def ensure_finalized(*wanted: str) -> None:
        # the finalists not fine-tuned yet (a baseline whose fine-tune was switched off; halving's winner)
        todo = {label: records[label] for label in wanted if label not in finalized}
        finalized.update(finetune_finalists(problem, config, todo, progress=progress)[0])

    def judged_in_full(wanted: list[str]) -> tuple[str, dict]:
        # the guarded rule on held-out correctness after each wanted finalist's full fine-tune
        ensure_finalized(*wanted)
        heldout = problem.splits.heldout  # empty: nothing can beat uniform, which is delivered
        correct = {label: correct_predictions(finalized[label][1], heldout, device=config.search.device)
                   if len(heldout) else torch.zeros(0, dtype=torch.bool) for label in wanted}
        winner, p_values = guarded_choice(wanted, correct, reference="uniform" if "uniform" in wanted else None,
                                          significance=sel.significance)
        scores = {label: finalized[label][0]["heldout_accuracy_after_finetune"] for label in wanted}
        return winner, {"epochs": config.finetune.epochs, "heldout_accuracy": scores, "p_value_vs_uniform": p_values,
                        "significance": sel.significance, "continue": [winner],
                        "eliminated": [lb for lb in wanted if lb != winner]}

    sel = config.selection
    t0 = time.perf_counter()
    if not sel.enabled or len(labels) <= 1:
        out = {"enabled": sel.enabled, "method": sel.method, "winner": labels[0], "rungs": []}
    elif sel.method == "halving":
        finalists = [(lb, records[lb]["keep"], records[lb].get("ranking"), records[lb].get("dropped_blocks") or ())
                     for lb in labels]
        reference = "uniform" if "uniform" in labels else None
        slots, strategy = parallel_slots(config) if config.finetune.parallel else (0, None)
        if slots >= 2 and strategy is None:  # not in a sweep's trial: Tune's trials do not nest in one
            out = {**halving_on_tune(problem, config, finalists, reference=reference), "scheduler": "tune-asha"}
        else:
            out = successive_halving(problem.space, problem.splits, finalists,
                                     calibration=problem.evaluator.calibration, rung_steps=sel.rung_steps,
                                     eta=sel.eta, reference=reference, significance=sel.significance,
                                     batch_size=sel.batch_size, lr=sel.lr, seed=config.seed)
            out["scheduler"] = "driver"
            problem.model.to("cpu")
        if sel.survivors and out["rungs"]:  # the last rung's best, and uniform, judged again after the full fine-tune
            last = out["rungs"][-1]
            survivors = halving_survivors(last, sel.survivors, reference=reference)
            last.update({"continue": survivors,
                         "eliminated": [lb for lb in last["heldout_accuracy"] if lb not in survivors]})
            # the agent's pick too, wherever halving left it: the search stays measurable (its test figures)
            out["winner"], rung = judged_in_full([lb for lb in labels if lb in survivors or lb == "top1"])
            steps = config.finetune.epochs * math.ceil(len(problem.splits.train) / config.finetune.batch_size)
            out["rungs"].append({"steps": last["steps"] + steps, **rung})  # MLflow's step after the short rungs
        out = {"enabled": True, "method": "halving", **out}
    else:
        winner, rung = judged_in_full(labels)
        out = {"enabled": True, "method": "full", "winner": winner, "rungs": [rung]}
    ensure_finalized(out["winner"])
    return {**out, "finalists": labels, "seconds": time.perf_counter() - t0}


def run_search(
    config: SearchConfig | dict | str | os.PathLike,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    on_iteration: Callable[[dict], None] | None = None,
) -> dict:
    """Run one search end to end and return the result dict (also written to `<output.dir>/result.json`)."""
    config = config if isinstance(config, SearchConfig) else load_config(config)
    t_start = time.perf_counter()
    select_device(config.search.device, key="search.device")  # a device that is not here: one line, before anything
    imported = user_weights(config)  # a network the user brings is checked before anything is written
    out = prepare_output_dir(config, resume=resume, overwrite=overwrite)
    seed_everything(config.seed)

    problem = prepare(config, progress=progress, imported=imported)  # config errors (unreachable target...) before Ray starts
    n_steps = len(problem.space.blocks) + len(problem.space.groups)  # one step per residual block and group
    check_free_space(config, n_steps)
    t_setup = time.perf_counter()
    started_ray = start_ray(config.resources.address, num_cpus=config.resources.num_cpus)
    try:  # one Ray for the agent's env runners and the finalists' fine-tunes, stopped at the end when started here
        config.save(out / CONFIG_FILE)
        state, setup_seconds = _run_agent(config, n_steps, resume=resume, progress=progress, on_iteration=on_iteration,
                                          t_setup=t_setup)
        return finish_search(config, problem, state, progress=progress, setup_seconds=setup_seconds, t_start=t_start)
    except OSError as exc:
        if is_no_space(exc):  # the last checkpoint stays valid: --resume continues once there is space
            raise no_space_error(config, n_steps) from exc
        raise
    finally:
        if started_ray:
            stop_ray()


def _run_agent(config: SearchConfig, n_steps: int, *, resume: bool, progress: bool,
               on_iteration: Callable[[dict], None] | None, t_setup: float) -> tuple[SearchState, float]:
    """The agent on the running Ray until the stop rule, its env runners stopped again; returns the search state
    and the set-up seconds (since `t_setup`)."""
    res = config.resources
    search = None
    try:
        check_fits(env_runner_bundles(config), f"{res.num_env_runners} env runners",
                   {"CPU": "lower resources.num_env_runners or num_cpus_per_env_runner",
                    "GPU": "lower resources.num_env_runners or num_gpus_per_env_runner"})
        search = RLSearch(config, n_steps, resume=resume, progress=progress, on_iteration=on_iteration)
        try:
            search.build()
            remember_ray_processes()  # with the env runners and Ray's agents, for a start after a SIGKILL
            setup_seconds = time.perf_counter() - t_setup
            return search.run(), setup_seconds
        except Exception as exc:
            raise _user_error(exc, search) from exc
    finally:
        if search is not None:
            search.stop()


def finish_search(
    config: SearchConfig,
    problem: Problem,
    state: SearchState,
    *,
    progress: bool = True,
    setup_seconds: float = 0.0,
    t_start: float | None = None,
) -> dict:
    """The end of a search, after the agent (on the Ray the search used, if any), in these steps:

    1. `measure_unpruned`, then `run_baselines`: uniform pruning, random search (the same number of evaluations)
       and Torch-Pruning's recipes under the same budget;
    2. `finalize_finalists`: the agent's top-k (and the baselines' best) pruned for real, fine-tuned and tested
       (Ray tasks in parallel when two or more fit; each kept as it finishes);
    3. `select_delivered`: the final stage, which picks the network the user gets;
    4. `export_delivered`: that network written as `best_pruned.pt` (and `best_pruned.onnx`);
    5. `search_result`: `result.json`, whose unprefixed figures are the delivered network's and `agent*` the
       agent's own pick (with the measured latency, when asked).

    Returns the result."""
    t_start = time.perf_counter() if t_start is None else t_start
    if config.resources.driver_threads:
        torch.set_num_threads(config.resources.driver_threads)
    if state.best is None:
        raise EntropySearchError("the search evaluated no candidate; raise stop.iterations or stop.candidates")
    base = measure_unpruned(problem)
    t0 = time.perf_counter()
    baselines = run_baselines(problem, config, state)
    t1 = time.perf_counter()
    top_k, finalized, finetunes = finalize_finalists(problem, config, state, baselines, progress=progress)
    t2 = time.perf_counter()
    selection = select_delivered(problem, config, state, baselines, finalized, progress=progress)
    winner = selection["winner"]
    place_delivered(top_k, baselines, finalized)
    files = export_delivered(problem, config, *finalized[winner])
    phases = {"setup_seconds": setup_seconds, "baselines_seconds": t1 - t0, "finetune_seconds": t2 - t1,
              "finetunes_at_once": finetunes["slots"], "finetunes_kept": finetunes["kept"]}
    result = search_result(config, problem, state, base=base, top_k=top_k, baselines=baselines, selection=selection,
                           delivered=finalized[winner][0], files=files, phases=phases, t_start=t_start)
    if problem.exactness is not None:
        result["exactness"] = problem.exactness
    if config.output.latency:
        result["latency"] = measure_latency(problem, finalized, winner, files, config)
    write_json(Path(config.output.dir) / RESULT_FILE, result)
    return result


def run_baselines(problem: Problem, config: SearchConfig, state: SearchState) -> dict[str, Any]:
    """Uniform pruning (and its shallower variant, `baselines.uniform_shallow`), random search (as many distinct
    candidates as the agent evaluated, unless `baselines.random_candidates` says otherwise) and Torch-Pruning's
    recipes (`baselines.peers`) under the
    search's budget, through the driver's cache. A recipe that cannot meet the budget, or whose network the space
    cannot reproduce exactly, is recorded with its `error` and left out of the final stage."""
    if not config.baselines.enabled:
        return {}

    def evaluate(counts, ranking: str | None = None, dropped=()) -> dict:
        return problem.evaluate(counts, ranking, dropped)[0]

    n_random = config.baselines.random_candidates or max(state.evaluations, 1)
    out = {"uniform": uniform_baseline(problem.budget, evaluate),
           "random": random_search(problem.budget, evaluate, n_random, seed=config.seed + 1)}
    shallow = shallow_blocks(problem.space.blocks)
    if config.baselines.uniform_shallow and shallow:
        out["uniform_shallow"] = uniform_baseline(problem.budget.given(shallow), evaluate)
    if problem.splits is None or not config.baselines.peers:  # simulated evaluations: no network to prune
        return out
    batch = eval_batch(problem.splits, config.data.eval_batch, split="train", seed=config.seed)
    for name in config.baselines.peers:
        t0 = time.perf_counter()
        try:
            if not offered(name):
                raise EntropySearchError(f"{name}: the installed Torch-Pruning does not offer it")
            out[name] = peer_baseline(problem.space, problem.budget, name, evaluate, batch)
        except EntropySearchError as exc:
            print(f"note: baseline {exc}", flush=True)
            out[name] = {"best": None, "evaluations": 0, "error": str(exc), "seconds": time.perf_counter() - t0}
    return out


def finalize_finalists(problem: Problem, config: SearchConfig, state: SearchState, baselines: dict, *,
                       progress: bool) -> tuple[list[dict], dict[str, tuple[dict, torch.nn.Module]], dict]:
    """The agent's top-k and, with `baselines.finetune`, each baseline's best, pruned for real, fine-tuned and
    tested (`finetune_finalists`: Ray tasks in parallel when they fit, each kept as it finishes); each baseline's
    record gets its `final`. Under `selection.method: halving` none is fine-tuned here: the final stage fine-tunes
    in full only the network it delivers (`place_delivered`). Returns (the top-k's records, {label: (record,
    pruned model)}, how they ran)."""
    jobs: dict[str, dict] = {}
    if not deferred_finetunes(config):
        jobs = {f"top{rank + 1}": record for rank, record in enumerate(state.top_k)}
        if config.baselines.enabled and config.baselines.finetune:
            jobs.update((name, res["best"]) for name, res in baselines.items() if res.get("best") is not None)
    finalized, how = finetune_finalists(problem, config, jobs, progress=progress)
    top_k = []
    for rank, record in enumerate(state.top_k):
        label = f"top{rank + 1}"
        final = finalized[label][0] if label in finalized else unfinalized(problem, record, label)
        final["rank"] = rank + 1
        top_k.append(final)
    for name, res in baselines.items():
        if name in finalized:
            res["final"] = finalized[name][0]
    return top_k, finalized, how


def deferred_finetunes(config: SearchConfig) -> bool:
    """Whether only the delivered network is fine-tuned in full (`selection.method: halving`, which judges the
    finalists on short fine-tunes) rather than every finalist."""
    return config.selection.enabled and config.selection.method == "halving"


def unfinalized(problem: Problem, record: dict, label: str) -> dict:
    """A finalist's figures when it is not fine-tuned in full: the search's own (its policy, cost, reward,
    entropy, held-out accuracy), without test figures."""
    keys = ("keep", "kept_channels", "dropped_blocks", "blocks_kept", "macs", "params", "macs_ratio", "params_ratio")
    return {"label": label, "policy": policy_of(problem.space, record), "reward": record.get("reward"),
            "entropy": record.get("entropy"), "heldout_accuracy": record.get("accuracy"),
            **{k: record[k] for k in keys if k in record}, "finetuned": False}


def place_delivered(top_k: list[dict], baselines: dict, finalized: dict) -> None:
    """Each network the final stage fine-tuned itself (halving's winner, or its survivors) where the result lists
    it: its top-k rank, its baseline's `final`."""
    for label, (final, _) in finalized.items():
        for rank, record in enumerate(top_k):
            if record.get("label") == label and record.get("finetuned") is False:
                top_k[rank] = {**final, "rank": rank + 1}
        if label in baselines and "final" not in baselines[label]:
            baselines[label]["final"] = final


def export_delivered(problem: Problem, config: SearchConfig, delivered: dict, model: torch.nn.Module) -> dict:
    """The delivered network as `best_pruned.pt` (an entropy-search checkpoint with its keep ratios and its
    measured test accuracy, MACs and parameters) and, with `output.export_onnx`, `best_pruned.onnx`; returns
    the search's files."""
    out = Path(config.output.dir)
    files = {"candidates": str(out / CANDIDATES_FILE), "config": str(out / CONFIG_FILE),
             "checkpoint": str(out / CHECKPOINT_DIR)}
    files.update(export(model, problem.space.example_input, out, "best_pruned", onnx=config.output.export_onnx,
                        base=problem.network.checkpoint, keep=delivered["keep"], round_to=config.search.round_to,
                        dropped=delivered.get("dropped_blocks") or (),
                        metrics={k: delivered[k] for k in ("test_accuracy_after_finetune", "macs", "params")},
                        preprocessing=problem.splits.preprocessing()))
    if files.get("onnx"):
        label_onnx(files["onnx"], problem.splits.preprocessing())
    return files


def label_onnx(path: str | Path, preprocessing: dict) -> None:
    """The inputs' preprocessing (`channels`, `image_size`, `mean`, `std`, JSON values) as an ONNX file's metadata,
    so whoever deploys it feeds what the network was trained on."""
    exported = onnx.load(str(path))
    onnx.helper.set_model_props(exported, {key: json.dumps(value) for key, value in preprocessing.items()})
    onnx.save(exported, str(path))


def measure_unpruned(problem: Problem) -> dict:
    """The unpruned network: analytic and counted MACs and parameters, test accuracy, and the search's own
    measurements of it (held-out accuracy and entropy on the evaluation batch)."""
    full = problem.evaluator.evaluate([1.0] * len(problem.space.groups))
    problem.model.to("cpu")  # counted with the (CPU) example input; training moves models back
    base = {
        "macs": int(problem.space.base_macs),
        "params": int(problem.space.base_params),
        "counted_macs": count_macs(problem.model, problem.space.example_input),
        "counted_params": count_params(problem.model),
        "test_accuracy": test_accuracy(problem.model, problem.splits.test),
        "preprocessing": problem.splits.preprocessing(),
        "heldout_accuracy": full.get("accuracy"),
        "entropy": full.get("entropy"),
    }
    problem.model.to("cpu")
    return base


def search_result(config: SearchConfig, problem: Problem, state: SearchState, *, base: dict, top_k: list[dict],
                  baselines: dict,
                  selection: dict, delivered: dict, files: dict, phases: dict, t_start: float) -> dict:
    """The content of `result.json`. `delivered` and `policy` are the network the user gets (`best_pruned.pt`);
    `agent` and `agent_policy` the agent's own pick (its top-1 by reward), reported next to the baselines so the
    search stays measurable."""
    agent = top_k[0] if top_k else None
    return {
        "config": config.to_dict(),
        "environment": environment_info(),
        "groups": [
            {"index": g.index, "name": g.name, "layer_type": g.layer_type, "channels": g.channels, "macs": g.macs}
            for g in problem.space.groups
        ],
        "base": base,
        "policy": delivered["policy"],
        "delivered": delivered,
        "agent_policy": agent["policy"] if agent else None,
        "agent": agent,
        "top_k": top_k,
        "baselines": baselines,
        "selection": selection,
        "comparison": _comparison(delivered, agent, baselines),
        # does the reward rank the candidates as held-out accuracy does? (every candidate the agent evaluated)
        "proxy": proxy_agreement(list(state.cache.values())),
        "cost": search_cost(config, state, phases, t_start),
        "history": state.history,
        "files": files,
    }


def search_cost(config: SearchConfig, state: SearchState, phases: dict, t_start: float) -> dict:
    """What the search cost: iterations, candidates and evaluations, throughput, and `phases`: seconds per phase
    after the agent and how the finalists' fine-tunes ran (at once, kept from an earlier run)."""
    search_seconds = max(state.wall_seconds, 1e-9)
    runners = max(config.resources.num_env_runners, 1)
    return {
        "iterations": state.iteration,
        "stopped_by": stop_reason(config, state),  # the stop rule that ended the agent's search
        "candidates": state.episodes,
        "evaluations": state.evaluations,
        "cache_hits": state.cache_hits,
        "search_seconds": state.wall_seconds,
        "candidates_per_second": state.episodes / search_seconds,
        "evaluations_per_second": state.evaluations / search_seconds,
        "eval_seconds": state.eval_seconds,
        # the env runners' time not spent evaluating candidates (sampling, agent, sync, collection)
        "rl_overhead": max(0.0, 1.0 - state.eval_seconds / (runners * search_seconds)),
        **phases,
        "total_seconds": time.perf_counter() - t_start,
        "num_env_runners": config.resources.num_env_runners,
        "env_runners_lost": state.env_runners_lost,
        "env_runner_restarts": state.env_runner_restarts,
    }


def measure_latency(problem: Problem, finalized: dict, winner: str, files: dict, config: SearchConfig) -> dict:
    """CPU latency of the unpruned network, uniform pruning and the delivered network (PyTorch eager), and of
    the delivered ONNX file (ONNX Runtime, checked against PyTorch); measured speed-ups next to MAC ratios."""
    batches = config.output.latency_batch_sizes
    example = problem.space.example_input.cpu()
    base = torch_latency(problem.model.cpu(), example, batch_sizes=batches)
    out = {"batch_sizes": batches, "unpruned": base, "networks": {}}
    for label in dict.fromkeys([winner, "uniform"]):
        if label not in finalized:
            continue
        record, model = finalized[label]
        measured = torch_latency(model.cpu(), example, batch_sizes=batches)
        out["networks"][label] = {"pytorch": measured, "speedup": speedup(base, measured),
                                  "macs_ratio": record["macs_ratio"]}
    if files.get("onnx"):
        onnx = onnx_latency(files["onnx"], example, batch_sizes=batches, reference=finalized[winner][1])
        out["networks"][winner]["onnxruntime"] = onnx
    if problem.budget.kind == "latency":
        out["budget"] = latency_budget_check(problem, finalized[winner])
    return out


def latency_budget_check(problem: Problem, delivered: tuple[dict, torch.nn.Module]) -> dict:
    """A latency budget against what the delivered network measures: the budget's target and the table's
    prediction next to the delivered and unpruned networks timed together (`LatencyMeter`, the table's batch,
    threads and device), so the measured ratio is free of the load's drift since the table was measured."""
    (record, _) = delivered
    dropped = record.get("dropped_blocks") or []
    budget = problem.budget.given(problem.space.check_dropped(dropped))
    table = budget.cost
    counts = list(record["kept_channels"])
    full = [g.channels for g in problem.space.groups]
    meter = LatencyMeter(problem.space, device=table.key["device"], batch=table.key["batch"],
                         threads=table.key["threads"], statistic=table.key["statistic"])
    measured_full, measured = meter([full, counts], [(), dropped])
    return {"target_ratio": budget.flops_target, "target_ms": budget.target, "table_unpruned_ms": table.base,
            "predicted_ms": table(counts), "measured_ms": measured, "measured_unpruned_ms": measured_full,
            "measured_ratio": measured / measured_full, "batch": table.key["batch"], "threads": table.key["threads"],
            "statistic": table.key["statistic"],
            "device": table.key["device"], "table": str(table.path)}


def _user_error(exc: Exception, search: RLSearch | None) -> Exception:
    """Ray failures (a worker killed for memory, an env error inside a worker) as one-line user errors that
    say how to continue; anything else unchanged."""
    if not isinstance(exc, ray.exceptions.RayError):
        return exc
    cause = getattr(exc, "cause", None)
    if isinstance(cause, EntropySearchError):
        return cause
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    reason = next((ln for ln in lines if "memory" in ln.lower()), lines[0] if lines else type(exc).__name__)
    done = search.state.iteration if search is not None else 0
    where = f" in {search.out}" if search is not None else ""
    return EntropySearchError(
        f"the search stopped after iteration {done}: an env runner failed ({reason[:300]}); the last checkpoint"
        f"{where} is kept: continue with --resume"
    )


def _comparison(delivered: dict, agent: dict | None, baselines: dict) -> dict:
    """The delivered network, the agent's own pick and the baselines in one place: reward, MACs ratio, held-out
    accuracy at search time and test accuracy after fine-tuning."""
    keys = ("reward", "macs_ratio", "heldout_accuracy", "test_accuracy_after_finetune")
    rows = {"delivered": {**{k: delivered.get(k) for k in keys}, "label": delivered.get("label")}}
    if agent:
        rows["agent"] = {k: agent.get(k) for k in keys}
    for name, res in baselines.items():
        rec, final = res.get("best") or {}, res.get("final") or {}
        rows[name] = {
            "reward": rec.get("reward"),
            "macs_ratio": rec.get("macs_ratio"),
            "heldout_accuracy": rec.get("accuracy"),
            "test_accuracy_after_finetune": final.get("test_accuracy_after_finetune"),
        }
    return rows
