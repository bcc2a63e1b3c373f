"""The driver of a search (`entropy_search.rl.driver`), without Ray: what it knows of a search (counts, the
cache, the top-k), its stop rule, and what a resumed search reads back from its folder. The training loop
itself runs in tests/test_search.py."""

from __future__ import annotations

import pytest

from entropy_search.config import load_config
from entropy_search.errors import ConfigError
from entropy_search.jsonio import read_jsonl, write_json, write_jsonl

pytest.importorskip("ray")

from entropy_search.rl.driver import RLSearch, SearchState, stop_reason  # noqa: E402
from entropy_search.rl.rundir import (  # noqa: E402
    AGENT_DIR,
    CACHE_FILE,
    CANDIDATES_FILE,
    CHECKPOINT_DIR,
    STATE_FILE,
    WARM_CACHE_FILE,
)


def record(counts, reward, *, hit=False, seconds=0.5, **extra):
    return {"kept_channels": list(counts), "reward": reward, "cache_hit": hit, "eval_seconds": seconds,
            "worker": 123, "actions": [0.0] * len(counts), **extra}


def test_state_counts_candidates_evaluations_and_cache_hits():
    state = SearchState(top_k_size=2)
    assert state.add(record([1, 2], -3.0)) is True
    assert state.add(record([1, 2], -3.0, hit=True)) is False  # the same candidate from a cache
    assert state.add(record([2, 2], -1.0, seconds=0.25)) is True
    # evaluated on two workers at once: counted as an evaluation, kept once
    assert state.add(record([2, 2], -1.0)) is False
    assert (state.episodes, state.evaluations, state.cache_hits) == (4, 3, 1)
    assert state.eval_seconds == pytest.approx(1.25)
    assert set(state.cache) == {(1, 2), (2, 2)}
    assert "worker" not in state.cache[(1, 2)] and "cache_hit" not in state.cache[(1, 2)]  # the candidate only


def test_top_k_is_the_best_distinct_candidates_by_reward():
    state = SearchState(top_k_size=3)
    for i, reward in enumerate([-5.0, -1.0, -3.0, -2.0, -4.0]):
        state.add(record([i + 1], reward))
    assert [r["reward"] for r in state.top_k] == [-1.0, -2.0, -3.0]
    assert state.best["kept_channels"] == [2]
    state.update_top_k({"kept_channels": [9], "reward": None})  # no reward: not ranked
    state.update_top_k({"kept_channels": [8], "reward": 0.5})
    assert [r["reward"] for r in state.top_k] == [0.5, -1.0, -2.0]
    assert SearchState().best is None
    saved = state.to_json()
    assert saved["top_k"] == state.top_k and saved["episodes"] == 5 and "cache" not in saved


def test_stop_rule_is_the_first_one_met():
    config = load_config({"stop": {"iterations": 3, "candidates": 100, "wall_seconds": 60}})
    assert stop_reason(config, SearchState(iteration=2, episodes=50, wall_seconds=10)) is None
    assert stop_reason(config, SearchState(iteration=3, episodes=50)) == "3 iterations"
    assert stop_reason(config, SearchState(iteration=1, episodes=120)) == "120 candidates"
    assert stop_reason(config, SearchState(iteration=1, wall_seconds=61.2)) == "61 s"
    only_time = load_config({"stop": {"iterations": None, "wall_seconds": 5}})
    assert stop_reason(only_time, SearchState(iteration=10_000)) is None


def test_patience_stops_once_the_best_reward_stopped_rising():
    config = load_config({"stop": {"iterations": 100, "patience": 3}})

    def state(*best: float) -> SearchState:
        return SearchState(iteration=len(best), history=[{"best_reward": b} for b in best])

    assert stop_reason(config, state(-3.0, -2.0, -2.0, -2.0)) is None  # 3 iterations, not 3 without a rise
    assert stop_reason(config, state(-3.0, -2.0, -2.0, -2.0, -2.0)) == "no better reward in 3 iterations"
    assert stop_reason(config, state(-3.0, -2.0, -2.0, -2.0, -1.5)) is None  # a rise at the last one
    assert stop_reason(config, state(float("nan"), float("nan"), float("nan"), float("nan"))) == (
        "no better reward in 3 iterations")  # nothing evaluated in 3 iterations either
    with pytest.raises(ConfigError, match="patience"):
        load_config({"stop": {"iterations": None, "patience": 0}})
    assert load_config({"stop": {"iterations": None, "patience": 2}}).stop.patience == 2  # a stop rule on its own


def interrupted_search(out):
    """What a search killed after its checkpoint at iteration 2 leaves: the checkpointed cache and state, and
    candidates written after that checkpoint."""
    ckpt = out / CHECKPOINT_DIR
    checkpointed = [{"kept_channels": [4, 4], "reward": -2.0}, {"kept_channels": [3, 4], "reward": -1.0}]
    write_jsonl(ckpt / CACHE_FILE, checkpointed)
    write_json(ckpt / STATE_FILE, {"iteration": 2, "episodes": 6, "evaluations": 2, "cache_hits": 4,
                                   "eval_seconds": 1.5, "wall_seconds": 9.0, "history": [{"iteration": 1}, {"iteration": 2}]})
    write_jsonl(out / CANDIDATES_FILE, [
        {"id": 0, "kept_channels": [4, 4], "reward": -2.0, "iteration": 1},
        {"id": 1, "kept_channels": [3, 4], "reward": -1.0, "iteration": 2},
        {"id": 2, "kept_channels": [2, 4], "reward": -0.5, "iteration": 3, "worker": 9},  # after the checkpoint
    ])
    return checkpointed


def test_resume_reads_every_candidate_and_the_state_of_the_agent(tmp_path):
    interrupted_search(tmp_path)
    (tmp_path / CHECKPOINT_DIR / AGENT_DIR).mkdir()
    config = load_config({"output": {"dir": str(tmp_path)}, "search": {"top_k": 2}})
    search = RLSearch(config, 2, resume=True, progress=False)
    assert search._load_previous() is True  # an agent checkpoint exists
    state = search.state
    # exactly once: candidates.jsonl is cut back to the checkpoint (the agent replays iteration 3 and writes it
    # again); what was evaluated after the checkpoint stays in the cache, so the replay does not evaluate it twice
    assert [r["id"] for r in read_jsonl(tmp_path / CANDIDATES_FILE)] == [0, 1]
    assert set(state.cache) == {(4, 4), (3, 4), (2, 4)}
    assert "worker" not in state.cache[(2, 4)]
    assert [r["reward"] for r in state.top_k] == [-1.0, -2.0]  # counted when the replay records it
    assert (state.iteration, state.episodes, state.evaluations, state.cache_hits) == (2, 6, 2, 4)
    assert state.wall_seconds == 9.0 and len(state.history) == 2
    assert search._next_id == 3  # ids of new rows continue after the written ones
    # the env runners get every known candidate through the warm-cache file
    warm = search._warm_cache_file()
    assert warm == tmp_path / CHECKPOINT_DIR / WARM_CACHE_FILE
    assert {tuple(r["kept_channels"]) for r in read_jsonl(warm)} == set(state.cache)


def test_resume_without_an_agent_checkpoint_keeps_the_candidates_only(tmp_path):
    interrupted_search(tmp_path)
    config = load_config({"output": {"dir": str(tmp_path)}, "search": {"cache": False}})
    search = RLSearch(config, 2, resume=True, progress=False)
    assert search._load_previous() is False
    assert len(search.state.cache) == 3 and search.state.iteration == 0 and search.state.history == []
    assert search._warm_cache_file() is None  # the cache is off: nothing to hand over


def test_a_fresh_driver_has_nothing_to_hand_over(tmp_path):
    search = RLSearch(load_config({"output": {"dir": str(tmp_path)}}), 2, progress=False)
    warm = search._warm_cache_file()  # the env runners' warm cache: empty, appended to as the search goes
    search.stop()
    assert search.state.top_k_size == 3 and warm.read_text() == ""
    assert search.ckpt_dir == tmp_path / CHECKPOINT_DIR and search.candidates_path == tmp_path / CANDIDATES_FILE
