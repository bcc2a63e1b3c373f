"""Would finalists of several depths deliver more? The agent's top-k finalists nearly always remove the same
number of residual blocks (its reward ranks one depth first), so the final stage compares one depth with the
baselines. This replays finished searches with, as extra finalists, the best-rewarded candidate of each number
of kept blocks that no finalist has: each is fine-tuned exactly as the search's finalists were (the run's config
and seed, `finalize_record`), then the final stage's guarded rule is run again on the held-out images over the
search's finalists plus these, and the network it would deliver is reported with its test accuracy.

    PYTHONPATH=. python bench/bench_depth_finalists.py runs/quality/fashion30/latency0.33-agreement-s{0,1,2}

Rows go to bench/depth_finalists/rows.jsonl as each fine-tune finishes (the networks next to the runs, under
<run>/depth_finalists/); a second run skips what is there and only reports.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from bench_paired import correct  # this folder

from entropy_search.config import load_config
from entropy_search.finalists import FinalistStore, finalize_record, finetune_key
from entropy_search.problem.selection import guarded_choice
from entropy_search.problem.setup import setup
from entropy_search.rl.rundir import FINALISTS_DIR

ROOT = Path(__file__).resolve().parent.parent


def same_network(a: dict, b: dict) -> bool:
    return (list(a["kept_channels"]) == list(b["kept_channels"])
            and sorted(a.get("dropped_blocks") or ()) == sorted(b.get("dropped_blocks") or ()))


def depth_candidates(run: Path, finalists: list[dict]) -> dict[int, dict]:
    """The best-rewarded candidate of each number of kept blocks, where no finalist is that network."""
    best: dict[int, dict] = {}
    for line in (run / "candidates.jsonl").read_text().splitlines():
        record = json.loads(line)
        depth = record["blocks_kept"]
        if depth not in best or record["reward"] > best[depth]["reward"]:
            best[depth] = record
    return {d: r for d, r in sorted(best.items()) if not any(same_network(r, f) for f in finalists)}


def replay(run: Path, rows_path: Path) -> dict:
    """Fine-tune the run's missing depths (rows appended as they finish), then the guarded rule over every finalist;
    returns {run, delivered (as recorded), replayed winner, its test accuracy, and the depths' figures}."""
    config = load_config(str(run / "config.yaml"))
    problem = setup(config)
    result = json.loads((run / "result.json").read_text())
    heldout = problem.splits.heldout
    networks, records = {}, {}
    searched = FinalistStore(run / FINALISTS_DIR)
    for path in sorted(searched.folder.glob("*.pt")):
        records[path.stem], networks[path.stem] = searched.load(path.stem, problem.space)
    added = FinalistStore(run / "depth_finalists")
    for depth, record in depth_candidates(run, list(records.values())).items():
        label = f"depth{depth}"
        if not added.path(label).is_file():
            t0 = time.perf_counter()
            final, network = finalize_record(problem, config, record, label=label, progress=False)
            added.save(label, finetune_key(config, record), final, network)
            row = {"run": run.name, "label": label, "blocks_kept": depth, "reward": record["reward"],
                   "macs_ratio": final["macs_ratio"], "heldout_after": final["heldout_accuracy_after_finetune"],
                   "test_after": final["test_accuracy_after_finetune"], "seconds": time.perf_counter() - t0}
            with open(rows_path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(f"  {run.name} {label}: held-out {row['heldout_after']:.4f}, test {row['test_after']:.4f}", flush=True)
        records[label], networks[label] = added.load(label, problem.space)
    significance = config.selection.significance
    recorded = list(result["selection"]["rungs"][-1]["heldout_accuracy"])  # the search's order: it breaks ties
    labels = [label for label in recorded if label in networks] + [lb for lb in networks if lb not in recorded]
    held = {label: correct(networks[label], heldout) for label in labels}
    winner, _ = guarded_choice(labels, held, reference="uniform", significance=significance)
    delivered = result["delivered"]["label"]
    searched = [label for label in labels if not label.startswith("depth")]
    again, _ = guarded_choice(searched, held, reference="uniform", significance=significance)
    if again != delivered:  # the replay must reproduce the search's own choice before it can say anything
        raise SystemExit(f"{run.name}: the replayed final stage picks {again}, the search delivered {delivered}")
    return {"run": run.name, "delivered": delivered, "delivered_test": records[delivered]["test_accuracy_after_finetune"],
            "winner": winner, "winner_test": records[winner]["test_accuracy_after_finetune"],
            "uniform_test": records["uniform"]["test_accuracy_after_finetune"],
            "depths": {label: (records[label]["heldout_accuracy_after_finetune"],
                               records[label]["test_accuracy_after_finetune"])
                       for label in labels if label.startswith("depth")}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="finished search folders with their finalists saved")
    parser.add_argument("--rows", type=Path, default=ROOT / "bench" / "depth_finalists" / "rows.jsonl")
    args = parser.parse_args(argv)
    args.rows.parent.mkdir(parents=True, exist_ok=True)
    outcomes = [replay(run, args.rows) for run in args.runs]
    print("\n| search | delivered (test %) | with a finalist per depth: delivered (test %) | uniform (test %) "
          "| depths added: held-out / test after fine-tune (%) |")
    print("|---|---|---|---|---|")
    for o in outcomes:
        depths = ", ".join(f"{label[5:]} blocks {100 * h:.2f} / {100 * t:.2f}" for label, (h, t) in o["depths"].items())
        print(f"| {o['run']} | {o['delivered']} {100 * o['delivered_test']:.2f} | {o['winner']} "
              f"{100 * o['winner_test']:.2f} | {100 * o['uniform_test']:.2f} | {depths} |")
    if len(outcomes) > 1:
        mean = {key: 100 * statistics.fmean(o[key] for o in outcomes) for key in ("delivered_test", "winner_test")}
        print(f"\nMean over {len(outcomes)} searches: delivered {mean['delivered_test']:.2f}%, with a finalist per depth "
              f"{mean['winner_test']:.2f}% ({mean['winner_test'] - mean['delivered_test']:+.2f} points)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
