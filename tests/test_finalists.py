"""The finalists' fine-tunes (`entropy_search.finalists`): as Ray tasks in parallel they compute what the driver
computes one after another (same seeds, one thread each), each is kept on disk as it finishes and a resumed search
reads it back; a worker killed mid fine-tune is retried and the finalist enters the result once; successive halving
runs as Tune trials under ASHA and fine-tunes in full only the network it delivers.

On the digits CNN with a local Ray of 2 CPUs: about 60 s (the killed worker's search, marked slow, about 40 s).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
import torch_pruning as tp
from tiny_runs import tiny_search

from entropy_search.config import load_config
from entropy_search.errors import EntropySearchError
from entropy_search.finalists import (
    HALVING_DIR,
    FinalistStore,
    finetune_finalists,
    finetune_key,
    halving_on_tune,
)
from entropy_search.problem import setup, successive_halving, uniform_counts
from entropy_search.rl.rundir import FINALISTS_DIR

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, train_digits_checkpoint) -> Path:
    return train_digits_checkpoint(tmp_path_factory.mktemp("baseline") / "digits_cnn.pt", epochs=3)


def config_in(out: Path, checkpoint: Path, **overrides):
    return load_config(tiny_search(out, checkpoint, **{"finetune.epochs": 2, **overrides}))


def jobs_of(problem) -> dict[str, dict]:
    """Three finalists of the digits CNN at 2x: uniform pruning, a thinner first group, and uniform pruning's
    counts keeping other channels (a random ranking the driver computed: a worker cannot compute it again)."""
    space = problem.space
    _, counts = uniform_counts(problem.budget)
    thinner = [max(1, counts[0] // 2), *counts[1:]]
    torch.manual_seed(0)
    space.add_ranking("random", tp.importance.RandomImportance())
    jobs = {}
    for label, (kept, ranking) in {"uniform": (counts, None), "thin": (thinner, None),
                                   "other": (counts, "random")}.items():
        record, _ = problem.evaluate(kept, ranking)
        jobs[label] = record
    assert any(not torch.equal(a, b) for a, b in zip(space.kept_indices(jobs["other"]["keep"], "random"),
                                                     space.kept_indices(jobs["uniform"]["keep"])))
    with pytest.raises(EntropySearchError, match="does not fit"):  # another network's ranking
        space.set_ranking("short", space.ranking("random")[:-1])
    return jobs


def test_parallel_finetunes_equal_the_driver_s_and_are_kept(ray_local, checkpoint, tmp_path):
    serial_config = config_in(tmp_path / "serial", checkpoint, **{"finetune.parallel": False})
    problem = setup(serial_config)
    jobs = jobs_of(problem)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what each task runs with (finetune.resources.num_cpus: 1)
    try:
        serial, how = finetune_finalists(problem, serial_config, jobs, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert how == {"slots": 1, "kept": []}
    assert all(not final["finetuned_on"]["ray_task"] for final, _ in serial.values())

    parallel_config = config_in(tmp_path / "parallel", checkpoint)
    parallel, how = finetune_finalists(problem, parallel_config, jobs, progress=False)
    assert how == {"slots": 2, "kept": []}
    assert list(parallel) == list(jobs)
    for label, (final, model) in parallel.items():
        assert final["finetuned_on"]["ray_task"]
        expected, expected_model = serial[label]
        for key in ("test_accuracy_after_finetune", "heldout_accuracy_after_finetune", "macs", "kept_channels"):
            assert final[key] == expected[key], (label, key)
        assert final.get("ranking") == jobs[label].get("ranking")
        for name, tensor in expected_model.state_dict().items():
            assert torch.equal(model.state_dict()[name], tensor), (label, name)

    # each kept as it finished; read back, not redone (no task runs: the records are the same objects' values)
    store = FinalistStore(tmp_path / "parallel" / FINALISTS_DIR)
    assert sorted(p.name for p in store.folder.iterdir()) == sorted(f"{label}.pt" for label in jobs)
    again, how = finetune_finalists(problem, parallel_config, jobs, progress=False)
    assert how == {"slots": 1, "kept": list(jobs)}
    for label, (final, model) in again.items():
        assert final == parallel[label][0]
        assert all(torch.equal(t, parallel[label][1].state_dict()[n]) for n, t in model.state_dict().items())
    # another fine-tune (a resumed search with another learning rate) is not the kept one
    other = config_in(tmp_path / "parallel", checkpoint, **{"finetune.lr": 0.05})
    assert finetune_key(other, jobs["uniform"]) != finetune_key(parallel_config, jobs["uniform"])
    assert store.load("uniform", problem.space, finetune_key(other, jobs["uniform"])) is None


def _kill_first_finetune(found: dict, stop: threading.Event) -> None:
    """Kill (by PID) the first Ray worker of this process's Ray seen running a finalist's fine-tune."""
    me = psutil.Process()
    while not stop.is_set():
        for proc in me.children(recursive=True):
            try:
                if "ray::finetune_finalist" in " ".join(proc.cmdline()):
                    found["pid"] = proc.pid
                    proc.kill()
                    return
            except psutil.Error:
                continue
        time.sleep(0.05)


@pytest.mark.slow
def test_a_worker_killed_mid_finetune_is_retried_and_each_finalist_enters_once(ray_local, checkpoint, tmp_path):
    from entropy_search.search import run_search  # deferred: RLlib takes seconds to import

    config = config_in(tmp_path / "killed", checkpoint, **{"finetune.epochs": 6})
    found: dict = {}
    stop = threading.Event()
    killer = threading.Thread(target=_kill_first_finetune, args=(found, stop), daemon=True)
    killer.start()
    try:
        result = run_search(config, progress=False)
    finally:
        stop.set()
        killer.join(timeout=10)
    assert "pid" in found, "no fine-tune was seen running as a Ray task"
    assert result["cost"]["finetunes_at_once"] == 2
    finals = {name: res["final"] for name, res in result["baselines"].items() if res.get("final")}
    finals.update({t["label"]: t for t in result["top_k"]})
    assert result["selection"]["finalists"] and set(result["selection"]["finalists"]) <= set(finals)
    pids = [final["finetuned_on"]["pid"] for final in finals.values()]
    assert found["pid"] not in pids  # the killed attempt delivered nothing; its retry did
    assert all(final["finetuned_on"]["ray_task"] for final in finals.values())
    kept = sorted(p.stem for p in (tmp_path / "killed" / FINALISTS_DIR).glob("*.pt"))
    assert kept == sorted(finals)


def test_a_halving_search_fine_tunes_in_full_only_the_network_it_delivers(ray_local, checkpoint, tmp_path):
    """`selection.method: halving` with `survivors: 0` end to end (about 10 s): the finalists as Tune trials under ASHA, uniform
    pruning measured at every rung, and one full fine-tune, the delivered network's; the others keep the search's
    figures and no test accuracy."""
    from entropy_search.search import run_search  # deferred: RLlib takes seconds to import

    config = config_in(tmp_path / "halving", checkpoint, **{"selection.method": "halving", "selection.rung_steps": 2,
                                                          "selection.survivors": 0})
    result = run_search(config, progress=False)
    selection, delivered = result["selection"], result["delivered"]
    assert selection["method"] == "halving" and selection["scheduler"] == "tune-asha"
    assert len(selection["finalists"]) >= 3 and selection["winner"] == delivered["label"]
    assert set(selection["rungs"][0]["heldout_accuracy"]) == set(selection["finalists"])
    assert all("uniform" in rung["heldout_accuracy"] for rung in selection["rungs"])
    assert set(selection["rungs"][-1]["p_value_vs_uniform"]) == set(selection["rungs"][-1]["heldout_accuracy"]) - {
        "uniform"}
    assert 0 <= delivered["test_accuracy_after_finetune"] <= 1 and delivered["finetune_epochs"] == 2
    kept = sorted(p.stem for p in (tmp_path / "halving" / FINALISTS_DIR).glob("*.pt"))
    assert kept == [delivered["label"]]
    for record in result["top_k"]:
        assert ("test_accuracy_after_finetune" in record) == (record["label"] == delivered["label"]), record["label"]
        assert record.get("finetuned", True) == (record["label"] == delivered["label"])
    finals = [name for name, res in result["baselines"].items() if res.get("final")]
    assert finals == ([delivered["label"]] if delivered["label"] in result["baselines"] else [])
    assert result["cost"]["finetunes_at_once"] == 1 and result["cost"]["finetune_seconds"] < 5


def test_the_default_final_stage_judges_the_last_rungs_best_again_after_the_full_fine_tune(ray_local, checkpoint,
                                                                                          tmp_path):
    """The shipped final stage (`selection.method: halving`, `survivors: 2`) end to end (about 20 s): after the
    short rungs, the last rung's two most accurate finalists, uniform pruning and the agent's pick are fine-tuned in
    full (parallel Ray tasks) and the guarded rule picks among them on those fine-tunes, recorded as a last rung;
    they have test figures in the result, the others none."""
    from entropy_search.config import SelectionConfig
    from entropy_search.search import run_search  # deferred: RLlib takes seconds to import

    shipped = SelectionConfig()
    config = config_in(tmp_path / "survivors", checkpoint, **{"selection.method": shipped.method,
                                                             "selection.rung_steps": 2})
    assert config.selection.survivors == shipped.survivors == 2 and shipped.method == "halving"
    result = run_search(config, progress=False)
    selection, delivered = result["selection"], result["delivered"]
    *short, last, full = selection["rungs"]
    assert short and "epochs" not in last and full["epochs"] == 2 and full["steps"] > last["steps"]
    ranked = sorted((lb for lb in last["heldout_accuracy"] if lb != "uniform"),
                    key=lambda lb: -last["heldout_accuracy"][lb])
    assert sorted(last["continue"]) == sorted({"uniform", *ranked[:2]})
    judged = {"uniform", *ranked[:2]} | ({"top1"} & set(selection["finalists"]))  # top1: unless it is uniform
    assert sorted(full["heldout_accuracy"]) == sorted(judged) and set(full["p_value_vs_uniform"]) == judged - {"uniform"}
    assert full["significance"] == config.selection.significance
    assert "test_accuracy_after_finetune" in result["agent"]
    assert selection["winner"] == delivered["label"] == full["continue"][0] and delivered["finetune_epochs"] == 2
    kept = sorted(p.stem for p in (tmp_path / "survivors" / FINALISTS_DIR).glob("*.pt"))
    assert kept == sorted(full["heldout_accuracy"])
    tested = {r["label"] for r in result["top_k"] if "test_accuracy_after_finetune" in r} | {
        name for name, res in result["baselines"].items() if res.get("final")}
    assert tested == set(full["heldout_accuracy"]) & ({r["label"] for r in result["top_k"]} | set(result["baselines"]))
    assert result["cost"]["finetunes_at_once"] == 1  # none before the final stage


def test_halving_on_tune_asha_keeps_the_known_best_and_measures_what_the_driver_measures(ray_local, checkpoint,
                                                                                      tmp_path):
    """Four finalists, the unpruned network among them (the answer known in advance), as Tune trials under ASHA
    (2 at a time): the unpruned one wins; every rung Tune measured equals what the driver's loop measures for
    that finalist at that rung (same images, same seeds, one thread); the rungs say who went on. About 30 s."""
    config = config_in(tmp_path / "halving", checkpoint, **{"selection.method": "halving", "selection.rung_steps": 3,
                                                            "selection.eta": 2})
    problem = setup(config)
    n = len(problem.space.groups)
    torch.manual_seed(0)
    problem.space.add_ranking("random", tp.importance.RandomImportance())
    finalists = [("starved", [0.1] * n, None, ()), ("whole", [1.0] * n, None, ()),
                 ("half", [0.5] * n, "random", ()), ("thin", [0.2] * n, None, ())]
    out = halving_on_tune(problem, config, finalists, reference="starved")
    assert out["winner"] == "whole"
    assert all("starved" in rung["heldout_accuracy"] for rung in out["rungs"])  # the reference: to the last rung
    assert sorted(p.name for p in (tmp_path / "halving" / HALVING_DIR).iterdir() if p.is_dir()) == sorted(
        label for label, *_ in finalists)
    first, last = out["rungs"][0], out["rungs"][-1]
    assert list(first["heldout_accuracy"]) == ["starved", "whole", "half", "thin"]
    assert last["steps"] == 3 * 2 ** (len(out["rungs"]) - 1) and last["continue"] == ["whole"]
    for rung, after in zip(out["rungs"], out["rungs"][1:]):
        assert set(rung["continue"]) == set(after["heldout_accuracy"])
        assert set(rung["continue"]) | set(rung["eliminated"]) == set(rung["heldout_accuracy"])

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        driver = successive_halving(problem.space, problem.splits, finalists, calibration=problem.evaluator.calibration,
                                    rung_steps=3, eta=2, reference="starved",
                                    significance=config.selection.significance, seed=config.seed)
    finally:
        torch.set_num_threads(threads)
    assert driver["winner"] == "whole"
    ours, theirs = out["rungs"][-1]["p_value_vs_uniform"], driver["rungs"][-1]["p_value_vs_uniform"]
    assert "whole" in ours and all(ours[label] == theirs[label] for label in set(ours) & set(theirs))
    for ours, theirs in zip(out["rungs"], driver["rungs"]):
        assert ours["steps"] == theirs["steps"]
        for label in set(ours["heldout_accuracy"]) & set(theirs["heldout_accuracy"]):
            assert ours["heldout_accuracy"][label] == theirs["heldout_accuracy"][label], (ours["steps"], label)
            assert ours["heldout_loss"][label] == pytest.approx(theirs["heldout_loss"][label], rel=1e-6)
