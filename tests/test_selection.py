"""The final stage (the guarded choice after the full fine-tune, successive halving) and the relative action space."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from bench_scripts import load_bench

from entropy_search.data import eval_batch, load_data
from entropy_search.errors import ConfigError, EntropySearchError
from entropy_search.problem import (
    Budget,
    PruningSpace,
    build_model,
    guarded_choice,
    guarded_winner,
    halving_survivors,
    load_checkpoint,
    paired_p_value,
    random_counts,
    successive_halving,
    uniform_counts,
)
from entropy_search.train import accuracy_and_loss, evaluate


@pytest.fixture(scope="module")
def digits(tmp_path_factory, train_digits_checkpoint):
    ckpt = load_checkpoint(train_digits_checkpoint(tmp_path_factory.mktemp("sel") / "baseline.pt", 8))
    model = build_model(ckpt)
    splits = load_data("digits", seed=0)
    return PruningSpace(model, ckpt.example_input()), splits


def test_successive_halving_keeps_the_finalist_that_is_known_best(digits):
    space, splits = digits
    n = len(space.groups)
    finalists = [("starved", [0.1] * n, None, ()), ("whole", [1.0] * n, None, ()), ("half", [0.5] * n, None, ()),
                 ("thin", [0.2] * n, None, ["block"])]
    calibration, _ = eval_batch(splits, 128, split="train", seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = successive_halving(space, splits, finalists, calibration=calibration, rung_steps=3, eta=2, seed=0,
                                 device="cpu")
    finally:
        torch.set_num_threads(threads)
    assert out["winner"] == "whole"  # the unpruned network, the answer known in advance
    first, last = out["rungs"][0], out["rungs"][-1]
    assert set(first["heldout_accuracy"]) == {"starved", "whole", "half", "thin"}
    assert len(first["continue"]) == 2 and "starved" in first["eliminated"]
    assert last["continue"] == ["whole"] and last["steps"] == 3 * 2 ** (len(out["rungs"]) - 1)
    # one finalist: nothing to train
    assert successive_halving(space, splits, finalists[:1], calibration=None, rung_steps=3)["rungs"] == []


def test_halving_keeps_uniform_to_the_last_rung_where_the_guard_decides(digits):
    """About 3 s: uniform pruning (here a starved network) is never eliminated before the last rung, where a
    finalist replaces it only with a paired p-value below selection.significance."""
    space, splits = digits
    n = len(space.groups)
    finalists = [("uniform", [0.1] * n, None, ()), ("whole", [1.0] * n, None, ()), ("half", [0.5] * n, None, ()),
                 ("quarter", [0.25] * n, None, ()), ("fifth", [0.2] * n, None, ())]

    def halving(significance: float) -> dict:
        return successive_halving(space, splits, finalists, calibration=None, rung_steps=3, eta=2,
                                  reference="uniform", significance=significance, seed=0, device="cpu")

    out = halving(0.2)
    first, last = out["rungs"][0], out["rungs"][-1]
    assert len(out["rungs"]) == 3 and "uniform" in first["continue"]
    assert all("uniform" in rung["heldout_accuracy"] for rung in out["rungs"])  # measured at every rung
    assert first["heldout_accuracy"]["uniform"] < sorted(first["heldout_accuracy"].values())[-3]  # kept all the same
    assert out["winner"] == "whole" and last["p_value_vs_uniform"]["whole"] < 0.2 and last["significance"] == 0.2
    # a level no finalist's p-value is below: uniform pruning is delivered
    strict = halving(min(last["p_value_vs_uniform"].values()))
    assert strict["winner"] == "uniform" and strict["rungs"][-1]["continue"] == ["uniform"]


def test_halving_hands_the_last_rungs_best_and_uniform_to_the_full_fine_tune():
    """`selection.survivors`: the most accurate finalists of the last rung (ties to the earlier label) and uniform
    pruning, in the rung's order; uniform is not counted among them, and asking for more than there are gives all."""
    rung = {"steps": 90, "heldout_accuracy": {"uniform": 0.63, "top1": 0.55, "uniform_shallow": 0.76,
                                              "tp_magnitude": 0.71, "tp_taylor": 0.81}}
    assert halving_survivors(rung, 1, reference="uniform") == ["uniform", "tp_taylor"]
    assert halving_survivors(rung, 2, reference="uniform") == ["uniform", "uniform_shallow", "tp_taylor"]
    assert halving_survivors(rung, 9, reference="uniform") == list(rung["heldout_accuracy"])
    assert halving_survivors(rung, 2, reference=None) == ["uniform_shallow", "tp_taylor"]
    tie = {"heldout_accuracy": {"uniform": 0.5, "a": 0.7, "b": 0.7}}
    assert halving_survivors(tie, 1, reference="uniform") == ["uniform", "a"]


def test_relative_actions_of_zero_give_the_uniform_candidate(digits):
    space, _ = digits
    budget = Budget(space, 0.4, 0.1, 0.0, action_space="relative")
    counts: list[int] = []
    for _ in range(budget.n):
        counts.append(budget.step(counts, 0.0)[0])
    assert counts == uniform_counts(budget)[1]
    assert budget.macs(counts) <= budget.target_macs


def test_relative_actions_stay_on_budget_and_spend_it(digits):
    space, _ = digits
    budget = Budget(space, 0.3, 0.1, 0.97, action_space="relative")
    rng = np.random.default_rng(0)
    ratios = [budget.macs_ratio(random_counts(budget, rng)) for _ in range(50)]
    assert max(ratios) <= 0.3 + 1e-12
    assert min(ratios) >= 0.3 * 0.97 - 0.02  # the floor, within what rounding allows on 4 small groups
    with pytest.raises(ConfigError, match="action_space"):
        Budget(space, 0.3, 0.1, action_space="sideways")


def test_equal_finalists_go_to_the_first_in_the_order_of_preference(digits):
    space, splits = digits
    keep = [0.6] * len(space.groups)
    for first, second in (("uniform", "top1"), ("top1", "uniform")):
        out = successive_halving(space, splits, [(first, keep, None, ()), (second, keep, None, ())], calibration=None, rung_steps=2,
                                 seed=0, device="cpu")
        rung = out["rungs"][0]
        assert rung["heldout_accuracy"][first] == rung["heldout_accuracy"][second]
        assert rung["heldout_loss"][first] == pytest.approx(rung["heldout_loss"][second])  # recorded, not ranked
        assert out["winner"] == first


def test_accuracy_and_loss_agree_with_the_accuracy_of_evaluate(digits):
    space, splits = digits
    accuracy, loss = accuracy_and_loss(space.model, splits.heldout, device="cpu")
    assert accuracy == pytest.approx(evaluate(space.model, splits.heldout, device="cpu"))
    assert 0 < loss < 2.3  # a trained network beats the uniform guess, log(10)


def _correct(bits: str) -> torch.Tensor:
    return torch.tensor([b == "1" for b in bits])


def test_paired_p_value_is_the_exact_one_sided_mcnemar_test():
    # the challenger wins 3 of the 3 images they disagree on: p = (1/2)^3
    assert paired_p_value(_correct("1110"), _correct("0000")) == pytest.approx(1 / 8)
    # wins 5, loses 1 (agreements do not count): P(X >= 5 | Bin(6, 1/2)) = (6 + 1) / 64
    assert paired_p_value(_correct("11111" + "0" + "11"), _correct("00000" + "1" + "11")) == pytest.approx(7 / 64)
    assert paired_p_value(_correct("0011"), _correct("0011")) == 1.0  # no disagreement: no evidence
    with pytest.raises(EntropySearchError, match="same images"):
        paired_p_value(_correct("01"), _correct("011"))


def test_guarded_choice_keeps_uniform_unless_another_finalist_beats_it_significantly():
    uniform = _correct("1" * 90 + "0" * 10)
    two_more = _correct("1" * 92 + "0" * 8)  # 2 images better: p = 1/4, not significant
    eight_more = _correct("1" * 98 + "0" * 2)  # 8 better: p = 1/256
    winner, p = guarded_choice(["uniform", "top1"], {"uniform": uniform, "top1": two_more}, reference="uniform",
                               significance=0.05)
    assert winner == "uniform" and p["top1"] == pytest.approx(1 / 4)
    # the most accurate of those that beat uniform significantly
    correct = {"uniform": uniform, "top1": two_more, "top2": eight_more, "random": _correct("1" * 97 + "0" * 3)}
    winner, _ = guarded_choice(list(correct), correct, reference="uniform", significance=0.05)
    assert winner == "top2"
    # significance 1.0 is "the most accurate wins"; a less accurate finalist never replaces uniform
    assert guarded_choice(["uniform", "top1"], {"uniform": uniform, "top1": two_more}, reference="uniform",
                          significance=1.0)[0] == "top1"
    worse = _correct("1" * 80 + "0" * 20)
    assert guarded_choice(["uniform", "top1"], {"uniform": uniform, "top1": worse}, reference="uniform",
                          significance=1.0)[0] == "uniform"
    # without uniform among the finalists: the most accurate, the earlier of equals
    assert guarded_choice(["top1", "top2"], {"top1": two_more, "top2": two_more}, reference=None,
                          significance=0.05) == ("top1", {})


def test_guarded_winner_on_recorded_figures_repeats_the_choice_at_every_level():
    uniform = _correct("1" * 90 + "0" * 10)
    correct = {"uniform": uniform, "top1": _correct("1" * 92 + "0" * 8), "top2": _correct("1" * 95 + "0" * 5),
               "random": _correct("1" * 80 + "0" * 20)}
    accuracy = {lb: float(c.float().mean()) for lb, c in correct.items()}
    for significance, expected in [(0.01, "uniform"), (0.05, "top2"), (0.3, "top2"), (1.0, "top2")]:
        winner, p_values = guarded_choice(list(correct), correct, reference="uniform", significance=significance)
        assert winner == expected
        assert guarded_winner(accuracy, p_values, reference="uniform", significance=significance) == expected
    # p(top2) = 1/32 and p(top1) = 1/4: a level between them leaves only top2; if top2 is dropped, 0.3 takes top1
    del accuracy["top2"]
    assert guarded_winner(accuracy, p_values, reference="uniform", significance=0.2) == "uniform"
    assert guarded_winner(accuracy, p_values, reference="uniform", significance=0.3) == "top1"
    with pytest.raises(EntropySearchError, match="at least one finalist"):
        guarded_winner({}, {}, reference="uniform", significance=0.05)


def test_bench_quality_reconstructs_the_delivery_at_another_level_from_a_result_file():
    """bench_quality's report (bench/RESULTS.md, "the final stage's significance level") replays the guarded
    rule on a result.json's recorded rung; a run without recorded p-values has no answer."""
    bench = load_bench("bench_quality")
    rung = {"heldout_accuracy": {"uniform": 0.920, "top1": 0.923, "random": 0.925},
            "p_value_vs_uniform": {"top1": 0.15, "random": 0.30}}
    result = {"selection": {"winner": "uniform", "rungs": [rung]}}
    assert bench.delivered_at(result, 0.05) == "uniform"
    assert bench.delivered_at(result, 0.2) == "top1"
    assert bench.delivered_at(result, 1.0) == "random"
    del rung["p_value_vs_uniform"]
    assert bench.delivered_at(result, 0.2) is None
