"""Latency as a budget (`search.budget: latency`; `entropy_search.problem.latency_table`): the per-group latency
table is measured once and read back from its cache, its prediction is consistent (exact at the reference,
`along` equal to a call), AMC's clipping meets the predicted budget, and bad settings are one-line config errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from entropy_search import PruningSpace, create_model
from entropy_search.cli import main
from entropy_search.config import load_config
from entropy_search.errors import ConfigError
from entropy_search.problem import Budget
from entropy_search.problem.baselines import uniform_counts
from entropy_search.problem.budget import count_options
from entropy_search.problem.latency_table import LatencyTable, ladder_ratios, sample_counts
from entropy_search.problem.setup import build_budget, build_latency_table


@pytest.fixture(scope="module")
def digits_space():
    torch.manual_seed(0)
    return PruningSpace(create_model("digits_cnn").eval(), torch.zeros(1, 1, 8, 8))


def latency_config(cache, **search):
    return load_config({"model": {"name": "digits_cnn", "checkpoint": str(cache / "baseline.pt")},
                        "search": {"budget": "latency", "latency_cache": str(cache), **search}})


def test_latency_table_is_measured_once_and_read_from_its_cache(digits_space, tmp_path, one_thread):
    config = latency_config(tmp_path, latency_target=0.95, latency_batch=4)
    first = build_budget(digits_space, config)
    table = first.cost
    assert isinstance(table, LatencyTable) and first.kind == "latency" and table.measured > 0
    assert table.path.parent == tmp_path and table.path.is_file()
    assert first.target == pytest.approx(0.95 * table.base) and table.base > 0
    saved = json.loads(table.path.read_text())
    assert saved["key"]["batch"] == 4 and saved["key"]["threads"] == 1 and saved["key"]["device"] == "cpu"
    assert len(saved["uniform"]) == len(ladder_ratios(0.1))  # the ladder of uniform networks, 1.0 down to min_keep
    assert set(saved["tables"][f"{table.reference_keep:.4f}"]["blocks"]) == {"block"}  # the reference without it

    again = build_budget(digits_space, config)  # a second search (or an env runner): nothing measured
    assert again.cost.measured == 0 and again.cost.path == table.path
    rng = np.random.default_rng(0)
    for _ in range(5):
        counts = [int(rng.integers(1, g.channels + 1)) for g in digits_space.groups]
        assert again.cost(counts) == pytest.approx(table(counts))
    # another target near the same reference reuses the ladder; another batch is another table (the tables alone:
    # whether a target in ms is reachable depends on the machine's load when each table was timed)
    ladder_ms = saved["uniform"][f"{table.reference_keep:.4f}"]
    assert build_latency_table(digits_space, latency_config(tmp_path, latency_target_ms=ladder_ms, latency_batch=4)).measured == 0
    other = build_latency_table(digits_space, latency_config(tmp_path, latency_target=0.95, latency_batch=2))
    assert other.measured > 0 and other.path != table.path and len(list(tmp_path.glob("*.json"))) == 2


def test_clipping_meets_the_predicted_latency_budget(digits_space, tmp_path, one_thread):
    table = build_budget(digits_space, latency_config(tmp_path, latency_target=0.95, latency_batch=16)).cost
    # a target halfway between the smallest network's predicted latency and the unpruned one's (timings are noisy)
    smallest = table([int(opts[0]) for opts in count_options(digits_space, 0.1)]) / table.base
    budget = Budget(digits_space, (smallest + 1) / 2, 0.1, 0.97, action_space="absolute", cost=table)
    budget.check()
    assert table(table.ref_counts) == pytest.approx(table.ref_ms)  # exact at the reference
    assert (table.slopes >= 0).all()  # each group's latency does not fall as it keeps more channels
    for g in range(budget.n):
        trial = list(table.ref_counts)
        values = budget.options[g]
        along = table.along(g, trial, values)
        for v, predicted in zip(values, along):
            trial[g] = int(v)
            assert predicted == pytest.approx(table(trial))
    rng = np.random.default_rng(0)
    sequences = [np.ones(budget.n), -np.ones(budget.n)] + [rng.uniform(-1, 1, budget.n) for _ in range(40)]
    for actions in sequences:
        counts: list[int] = []
        for a in actions:
            counts.append(budget.step(counts, float(a))[0])
        assert table(counts) <= budget.target * (1 + 1e-9) and budget.within(counts)
    # 'keep everything' actions: each group keeps the largest count that leaves the target reachable
    counts = []
    for _ in range(budget.n):
        counts.append(budget.step(counts, 1.0)[0])
    for g in range(budget.n):
        opts = budget.options[g].tolist()
        i = opts.index(counts[g])
        if i + 1 < len(opts):
            assert table(counts[:g] + [opts[i + 1]] + budget.min_counts[g + 1:]) > budget.target
    _, uniform = uniform_counts(budget)
    assert budget.within(uniform)


def test_a_latency_budget_covers_dropped_blocks(digits_space, tmp_path, one_thread):
    """The table times the reference without each residual block: the prediction of a shallower candidate is exact
    there, `along` equals a call (constant for a group inside the dropped block), and clipping meets the target."""
    budget = build_budget(digits_space, latency_config(tmp_path, latency_target=0.9, latency_batch=16))
    table = budget.cost
    shallow = budget.given(["block"])
    inside = digits_space.idle_groups(["block"])
    assert shallow.kind == "latency" and shallow.target == budget.target and inside == [1]
    saving = table.block_ms["block"]
    assert shallow.cost(table.ref_counts) == pytest.approx(table.ref_ms + saving)
    assert saving < 0, "the network without a block is faster"
    for g in range(budget.n):
        trial = list(table.ref_counts)
        for v, predicted in zip(budget.options[g], shallow.cost.along(g, trial, budget.options[g])):
            trial[g] = int(v)
            assert predicted == pytest.approx(shallow.cost(trial))
    assert np.ptp(shallow.cost.along(1, table.ref_counts, budget.options[1])) == 0
    rng = np.random.default_rng(1)
    for _ in range(20):
        counts: list[int] = []
        for a in rng.uniform(-1, 1, budget.n):
            counts.append(shallow.step(counts, float(a))[0])
        assert shallow.within(counts) and counts[1] == digits_space.groups[1].channels


def test_sample_counts_cover_the_options_and_the_reference():
    options = np.arange(1, 33)
    picks = sample_counts(options, 13, points=5)
    assert picks[0] == 1 and picks[-1] == 32 and 13 in picks and picks == sorted(set(picks))
    assert ladder_ratios(0.1)[0] == 1.0 and ladder_ratios(0.1)[-1] == 0.1 and ladder_ratios(0.12)[-1] == 0.12


@pytest.mark.parametrize("search, message", [
    ({"budget": "latency"}, "search: budget: latency needs exactly one of latency_target"),
    ({"budget": "latency", "latency_target": 1.5}, "search.latency_target: must be in (0, 1], got 1.5"),
    ({"budget": "latency", "latency_target": 0.5, "latency_target_ms": 2.0}, "needs exactly one of"),
    ({"latency_target": 0.5}, "search: latency_target is set but budget is macs (the default); set budget: latency"),
    ({"budget": "time"}, "search.budget: Input should be 'macs' or 'latency'"),
    ({"budget": "latency", "latency_target": 0.5, "latency_statistic": "mean"}, "search.latency_statistic"),
])
def test_bad_latency_budget_settings_are_one_line_config_errors(search, message):
    with pytest.raises(ConfigError, match=None) as err:
        load_config({"search": search})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_cli_refuses_a_bad_latency_budget_in_one_line(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("search:\n  budget: latency\n  latency_target: 0\n")
    assert main(["search", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "entropy-search search: error: search.latency_target: must be in (0, 1], got 0"


def test_unreachable_latency_target_names_the_key(digits_space, tmp_path, one_thread):
    with pytest.raises(ConfigError, match=r"search.latency_target_ms: 0.0001 ms cannot be met: with every channel "
                                          r"group at min_keep=0.1 the predicted latency is still"):
        build_budget(digits_space, latency_config(tmp_path, latency_target_ms=1e-4, latency_batch=4))
