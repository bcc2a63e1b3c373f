"""The RL driver of a search (RLlib): algorithm config, the training loop, the run directory."""

from .algorithm import CANDIDATES_KEY, CandidateCallback, build_algorithm_config
from .driver import RLSearch, SearchState
from .rundir import prepare_output_dir, saved_config_difference

__all__ = ["CANDIDATES_KEY", "CandidateCallback", "RLSearch", "SearchState", "build_algorithm_config",
           "prepare_output_dir", "saved_config_difference"]
