"""The label-free rewards that compare a candidate with the unpruned network, the protocol's choice of the
default reward, and the collapse measure (issue: a search that wins)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from entropy_search import PruningSpace, create_model
from entropy_search.config import SearchSettings
from entropy_search.errors import EntropySearchError
from entropy_search.problem import CandidateEvaluator, choose_default_reward, collapse_rate, compute_reward
from entropy_search.problem.evaluate import reference_comparison

ROOT = Path(__file__).resolve().parent.parent


def test_reference_comparison_matches_a_hand_computed_case():
    ref = torch.log_softmax(torch.tensor([[2.0, 0.0], [0.0, 0.0]]), dim=1)
    logits = torch.tensor([[0.0, 0.0], [0.0, 3.0]])
    features0 = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    features = torch.tensor([[3.0, 0.0], [0.0, 0.0]])
    out = reference_comparison(ref, features0, logits, features)
    p0 = [math.exp(2) / (math.exp(2) + 1), 1 / (math.exp(2) + 1)]
    kl_first = p0[0] * math.log(p0[0] / 0.5) + p0[1] * math.log(p0[1] / 0.5)
    q = [1 / (1 + math.exp(3)), math.exp(3) / (1 + math.exp(3))]
    kl_second = 0.5 * math.log(0.5 / q[0]) + 0.5 * math.log(0.5 / q[1])
    assert out["kl"] == pytest.approx((kl_first + kl_second) / 2, rel=1e-5)
    # top-1: image 0 -> class 0 vs the candidate's tie (argmax 0); image 1 -> tie (0) vs class 1
    assert out["agreement"] == pytest.approx(0.5)
    assert out["feature_error"] == pytest.approx(4.0 / 5.0)


def test_rewards_of_the_comparisons():
    # the agreement of the hand-computed case above is 0.5: the reward is that share itself
    assert compute_reward("agreement", {"agreement": 0.5, "accuracy": 0.9}) == 0.5
    with pytest.raises(EntropySearchError, match="agreement"):
        compute_reward("agreement", {"agreement": 1.5})
    assert compute_reward("kl", {"kl": 0.25}) == -0.25
    assert compute_reward("feature", {"feature_error": 0.5}) == -0.5
    assert compute_reward("entropy_normalized", {"entropy_normalized": 0.7}) == -0.7
    with pytest.raises(EntropySearchError, match="kl"):
        compute_reward("kl", {"kl": -0.1})
    with pytest.raises(EntropySearchError, match="feature_error"):
        compute_reward("feature", {"feature_error": None})


@pytest.mark.parametrize("name, shape", [("digits_cnn", (1, 8, 8)), ("resnet20", (3, 32, 32)),
                                         ("mobilenet_v2", (3, 32, 32))])
def test_evaluator_compares_with_the_unpruned_network_on_every_path(name, shape):
    torch.manual_seed(0)
    model = create_model(name, in_channels=shape[0]).eval()
    space = PruningSpace(model, torch.zeros(1, *shape))
    x = torch.randn(12, *shape)
    full = CandidateEvaluator(space, x).evaluate([1.0] * len(space.groups))
    assert full["kl"] == pytest.approx(0.0, abs=1e-6)
    assert full["feature_error"] == pytest.approx(0.0, abs=1e-6)
    assert full["agreement"] == 1.0
    keep = [0.5] * len(space.groups)
    measured = {mode: CandidateEvaluator(space, x, mode=mode).evaluate(keep) for mode in ("sliced", "masked", "pruned")}
    for key in ("kl", "feature_error", "agreement"):
        values = [measured[mode][key] for mode in measured]
        assert values[0] is not None and values[0] >= 0
        assert values == pytest.approx([values[0]] * 3, rel=1e-4, abs=1e-6), key
    assert measured["sliced"]["feature_error"] > 0


def test_protocol_chooses_the_default_reward():
    cases = {
        "digits@0.5": {"entropy": -0.1, "kl": 0.96, "feature": 0.73, "entropy_normalized": 0.2},
        "digits@0.3": {"entropy": 0.2, "kl": 0.98, "feature": 0.75, "entropy_normalized": 0.3},
        "fashion@0.33": {"entropy": 0.1, "kl": 0.82, "feature": 0.51, "entropy_normalized": None},
    }
    assert choose_default_reward(cases) == "kl"  # feature fails on one case, entropy on all
    cases["fashion@0.33"]["kl"] = 0.59
    assert choose_default_reward(cases) is None  # no reward reaches 0.6 everywhere
    qualifying_entropy = {c: {"entropy": 0.61, "kl": 0.99} for c in ("a", "b")}
    assert choose_default_reward(qualifying_entropy) == "entropy"  # the paper's wins when it qualifies
    assert choose_default_reward({}) is None


def test_the_default_reward_is_the_protocols_choice_on_the_measured_development_cases():
    """`bench/bench_proxy.py --choose` on the three development cases (their candidates' measurements,
    bench/proxy_cases/) names the schema's default reward."""
    cases = sorted(str(p) for p in (ROOT / "bench" / "proxy_cases").glob("*.json"))
    assert len(cases) == 3
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_proxy.py"), "--choose", *cases],
                          capture_output=True, text=True, check=True)
    last = done.stdout.strip().splitlines()[-1]
    assert last == f"default reward by the protocol (Spearman >= 0.6 on every case): {SearchSettings().reward}"


def test_collapse_rate():
    assert collapse_rate([0.05, 0.19, 0.2, 0.9, None], num_classes=10) == pytest.approx(2 / 4)
    assert collapse_rate([None], num_classes=10) is None
    assert collapse_rate(list(np.linspace(0.5, 1.0, 5)), num_classes=4) == 0.0  # 2x chance = 0.5
