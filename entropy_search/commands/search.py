"""`entropy-search search CONFIG.yaml`: one RL pruning search (no Tune), end to end.

Trains (or loads) the baseline, runs the agent over Ray env runners until the stop rule, runs the
uniform and random baselines under the same budget, prunes/fine-tunes/tests the best candidates and
writes `<output.dir>/result.json` (and `candidates.jsonl`, `config.yaml`, `checkpoints/`).
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import yaml

from ..config import load_config, schema_reference
from ..errors import ConfigError
from ..problem import LABEL_FREE_REWARDS
from ..summary import delivered_network, delivered_policy

#: What `--smoke` overrides: a tiny run (seconds of search) that exercises every stage.
SMOKE_OVERRIDES = {
    "model.train_epochs": 3,
    "data.eval_batch": 128,
    "agent.episodes_per_iteration": 4,
    "agent.num_epochs": 2,
    "agent.learning_starts_episodes": 2,
    "agent.train_batch_size": 16,
    "stop.iterations": 2,
    "stop.candidates": None,
    "stop.wall_seconds": None,
    "search.top_k": 1,
    "baselines.random_candidates": 4,
    "finetune.epochs": 1,
    "output.checkpoint_every": 1,
    "output.export_onnx": False,
}


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "search",
        help="run one RL pruning search from a YAML config",
        description="Search per-group keep ratios with an RL agent (PPO or SAC, RLlib) over Ray workers, under a "
        "FLOPs budget, rewarded by spatial entropy or accuracy; then compare with uniform and random pruning, "
        "fine-tune the best candidates and write <output.dir>/result.json.",
    )
    parser.add_argument("config", nargs="?", help="YAML config (see examples/digits_search.yaml; every key is optional)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted search from its last checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="start over in an output dir that holds a previous search")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny run (2 iterations, 1 fine-tune epoch) into <output.dir>/smoke, for tests")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set search.flops_target=0.3 (repeatable)")
    parser.add_argument("--output", default=None, help="output dir (overrides output.dir)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--print-schema", action="store_true", help="print every config key with its default and exit")
    parser.set_defaults(func=run)
    return parser


def parse_overrides(items: list[str]) -> dict:
    """`KEY=VALUE` strings to {dotted key: value}; VALUE is read as YAML (numbers, lists, null...)."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError:
            try:
                out[key.strip()] = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                out[key.strip()] = raw
    return out


def smoke_config(config):
    """The tiny variant of a config (`--smoke`)."""
    overrides = dict(SMOKE_OVERRIDES)
    smoke_dir = Path(config.output.dir) / "smoke"
    overrides["output.dir"] = str(smoke_dir)
    if not config.checkpoint_path().exists():
        # never train the tiny smoke baseline into the real checkpoint's place
        overrides["model.checkpoint"] = str(smoke_dir / "baseline.pt")
    else:
        overrides["model.checkpoint"] = str(config.checkpoint_path())
    overrides["resources.num_env_runners"] = min(config.resources.num_env_runners, 2)
    return load_config(config.to_dict(), overrides)


def run(args: argparse.Namespace) -> int:
    if args.print_schema:
        print(schema_reference())
        return 0
    if not args.config:
        raise ConfigError("give the search's YAML config, e.g. `entropy-search search examples/digits_search.yaml`")
    overrides = parse_overrides(args.overrides)
    if args.output:
        overrides["output.dir"] = args.output
    config = load_config(args.config, overrides)
    overwrite = args.overwrite
    if args.smoke:
        config = smoke_config(config)
        overwrite = overwrite or not args.resume

    from ..search import run_search  # deferred: Ray and RLlib take seconds to import

    result = run_search(config, resume=args.resume, overwrite=overwrite, progress=not args.no_progress)
    print(summary(result))
    return 0


def summary(result: dict) -> str:
    """A few lines for the terminal: the delivered network next to the agent's own pick and the baselines, why it
    was delivered, and the cost."""
    cfg, base, delivered, cost = result["config"], result["base"], delivered_network(result), result["cost"]
    target = cfg["search"]["flops_target"]

    def pct(x):
        return "-" if x is None else f"{100 * x:.2f}%"

    s = cfg["search"]
    if s.get("budget") == "latency":
        goal = (f"{s['latency_target']:g} of the unpruned latency" if s.get("latency_target") is not None
                else f"{s['latency_target_ms']:g} ms")
        target_text = f"latency target {goal} (predicted, batch {s['latency_batch']})"
    else:
        target_text = f"FLOPs target {target:g} ({1 / target:.2f}x)"
    lines = [
        f"search: {cfg['model']['name']} on {cfg['data']['name']}, reward {cfg['search']['reward']}, "
        f"agent {cfg['agent']['algorithm']}, {target_text}",
        f"baseline: {base['macs'] / 1e6:.3f}M MACs, {base['params'] / 1e6:.4f}M params, test {pct(base['test_accuracy'])}",
        f"{'':10} {'reward':>10} {'MACs':>7} {'held-out':>9} {'test FT':>8}",
    ]
    for name, row in result.get("comparison", {}).items():
        reward = "-" if row.get("reward") is None else f"{row['reward']:.4f}"
        macs = "-" if row.get("macs_ratio") is None else f"{row['macs_ratio']:.3f}"
        lines.append(f"{name:10} {reward:>10} {macs:>7} {pct(row.get('heldout_accuracy')):>9} "
                     f"{pct(row.get('test_accuracy_after_finetune')):>8}")
    if delivered:
        policy = ", ".join(f"{k}={v:.2f}" for k, v in (delivered_policy(result) or {}).items())
        lines.append(f"delivered ({delivered.get('label')}, best_pruned.pt): MACs {delivered['macs_ratio']:.3f}, "
                     f"test {pct(delivered['test_accuracy_before_finetune'])} before fine-tune, "
                     f"{pct(delivered['test_accuracy_after_finetune'])} after")
        lines.append(f"delivered policy: {policy}")
        if delivered.get("dropped_blocks"):
            lines.append(f"delivered without the residual blocks {', '.join(delivered['dropped_blocks'])} "
                         f"({delivered.get('blocks_kept')} kept)")
    lines.extend(proxy_lines(result.get("proxy") or {}, cfg["search"]["reward"]))
    lines.extend(selection_lines(result.get("selection")))
    lines.extend(latency_lines(result.get("latency")))
    lines.append(
        f"cost: {cost['candidates']} candidates ({cost['evaluations']} evaluated, {cost['cache_hits']} cached) in "
        f"{cost['search_seconds']:.1f} s = {cost['candidates_per_second']:.2f} candidates/s "
        f"with {cost['num_env_runners']} env runners"
        + (f" ({cost['env_runners_lost']} lost (their process died), {cost.get('env_runner_restarts', 0)} restarted)"
           if cost.get("env_runners_lost") else "")
        + (f"; stopped after {cost['stopped_by']}" if cost.get("stopped_by") else "")
    )
    lines.append(f"result: {Path(cfg['output']['dir']) / 'result.json'}")
    return "\n".join(lines)


def selection_lines(selection: dict | None) -> list[str]:
    """Why the delivered network is the one delivered: what the final stage saw on the held-out split (never
    the test split, whose figures above are only reported) and its rule."""
    if not selection or selection.get("winner") is None:
        return []
    winner = selection["winner"]
    if not selection.get("enabled"):
        return [f"final stage: off, the agent's best ({winner}) is delivered"]
    rungs = selection.get("rungs") or []
    if not rungs:
        return [f"final stage: one distinct finalist ({winner}), delivered"]
    if selection.get("method") == "full":
        rung = rungs[0]
        return [f"final stage: held-out accuracy after the full fine-tune {_rung_scores(rung)}{_guard(rung)}: "
                f"{winner} delivered"]
    where = " (Tune trials under ASHA)" if selection.get("scheduler") == "tune-asha" else ""
    in_full = [rung for rung in rungs if "epochs" in rung]  # `selection.survivors`: judged again in full
    ends = (f"{len(in_full[0]['heldout_accuracy'])} finalists fine-tuned in full" if in_full
            else "the only network fine-tuned in full")
    lines = [f"final stage: successive halving on short fine-tunes{where}{_guard(rungs[-1])}; {winner} delivered, "
             + ends]
    for rung in rungs:
        what = f"full fine-tune ({rung['epochs']} epochs)" if "epochs" in rung else f"{rung['steps']} steps"
        lines.append(f"  {what}: held-out {_rung_scores(rung)}; eliminated {', '.join(rung['eliminated']) or '-'}")
    return lines


def _rung_scores(rung: dict) -> str:
    """A final-stage rung's held-out accuracies, with the p-values against uniform pruning where it has them."""
    p_values = rung.get("p_value_vs_uniform") or {}
    return ", ".join(f"{label} {100 * acc:.2f}%" + (f" (p {p_values[label]:.2f})" if label in p_values else "")
                     for label, acc in rung["heldout_accuracy"].items())


def _guard(rung: dict) -> str:
    """The guarded rule as a rung records it (results written before the paired test have none)."""
    if rung.get("significance") is None:
        return ""
    return (f"; another finalist replaces uniform only when more accurate at p < {rung['significance']:g} "
            "(selection.significance)")


def latency_lines(latency: dict | None) -> list[str]:
    """Measured CPU latency of the unpruned and pruned networks, with the speed-up next to the MAC ratio."""
    if not latency:
        return []
    base = latency["unpruned"]
    batches = [str(b) for b in latency["batch_sizes"]]
    times = " / ".join(f"{base['ms'][b]:.2f}" for b in batches)
    lines = [f"latency ({base['device']}, {base['threads']} threads, batch {' / '.join(batches)}, ms): "
             f"unpruned {times}"]
    for label, row in latency["networks"].items():
        times = " / ".join(f"{row['pytorch']['ms'][b]:.2f}" for b in batches)
        gains = " / ".join(f"{row['speedup'][b]:.2f}x" for b in batches)
        line = f"  {label}: {times} (speed-up {gains}, MACs ratio {row['macs_ratio']:.3f})"
        onnx = row.get("onnxruntime")
        if onnx:
            onnx_times = " / ".join(f"{onnx['ms'][b]:.2f}" for b in batches)
            line += f"; ONNX Runtime {onnx_times} (outputs within {onnx['max_rel_diff_vs_pytorch']:.1e} of PyTorch's)"
        lines.append(line)
    check = latency.get("budget")
    if check:
        lines.append(f"latency budget (batch {check['batch']}, {check['threads']} threads): target "
                     f"{check['target_ratio']:.3f} of the unpruned latency; delivered: predicted "
                     f"{check['predicted_ms'] / check['table_unpruned_ms']:.3f}, measured {check['measured_ratio']:.3f} "
                     f"({check['measured_ms']:.3f} of {check['measured_unpruned_ms']:.3f} ms)")
    return lines


# Below this rank correlation a label-free reward says little about accuracy on the user's network
# (bench/RESULTS.md, "the protocol applied with `agreement` among the rewards": agreement +0.99 to +1.00 and kl
# +0.81 to +0.99 on the development cases; the paper's entropy about 0 on Fashion-MNIST).
WEAK_PROXY = 0.3


def proxy_lines(proxy: dict, reward: str) -> list[str]:
    """How well the search's own reward (and the paper's entropy reward) ranked this search's candidates as
    held-out accuracy did, and a warning when a label-free reward's agreement is weak."""
    lines = []
    own = proxy.get("reward_vs_accuracy")
    if own is not None and reward not in ("accuracy", "accuracy_flops"):
        lines.append(f"proxy: the {reward} reward vs held-out accuracy, Spearman {own:+.2f} over "
                     f"{proxy['candidates']} candidates (1 = same ranking)")
    rho = proxy.get("entropy_reward_vs_accuracy")
    if rho is not None and reward != "entropy":
        lines.append(f"the paper's entropy reward vs held-out accuracy: Spearman {rho:+.2f}")
    if own is not None and reward in LABEL_FREE_REWARDS and own < WEAK_PROXY:
        lines.append(f"warning: on this network the {reward} reward barely ranks candidates by accuracy; "
                     "compare with `search.reward: accuracy` before trusting its pick")
    return lines
