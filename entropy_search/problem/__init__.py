"""The pruning problem in plain PyTorch (docs/design.md): channel groups and residual blocks, the FLOPs budget and its
clipping, candidate evaluation with its cache, spatial entropy, rewards, adaptive BN, MACs, the
uniform and random baselines, Torch-Pruning's own recipes as baselines, one `setup` from a search config and
one `finalize`.

Nothing under this package imports Ray, RLlib, Gymnasium or MLflow: the environment, the RL driver,
the sweep, tracking and the command line are clients of it.
"""

from .adaptive_bn import recalibrate_batchnorm, recalibrated_batchnorm
from .baselines import (
    random_candidate,
    random_counts,
    random_search,
    shallow_blocks,
    uniform_baseline,
    uniform_counts,
)
from .blocks import ResidualBlock
from .budget import Budget, MacsForm
from .checkpoint import Checkpoint, build_model, load_checkpoint, load_model, save_checkpoint
from .entropy import EntropyProbe, network_entropy, spatial_entropy
from .evaluate import CandidateCache, CandidateEvaluator, SimulatedEvaluator, cache_entry, record_key
from .finalize import export, export_onnx, finalize
from .guard import check_exact
from .latency_table import LatencyMeter, LatencyTable
from .macs import count_macs, count_params
from .peers import PEER_RECIPES, offered, peer_baseline, peer_network
from .rewards import (
    LABEL_FREE_REWARDS,
    REWARDS,
    choose_default_reward,
    collapse_rate,
    compute_reward,
    proxy_agreement,
)
from .selection import (
    finalist_records,
    guarded_choice,
    guarded_winner,
    halving_survivors,
    paired_p_value,
    successive_halving,
)
from .setup import (
    Network,
    Problem,
    ensure_checkpoint,
    load_network,
    load_splits,
    setup,
    train_baseline,
    user_weights,
)
from .space import ChannelGroup, PruningSpace
from .weights import user_network

__all__ = [
    "LABEL_FREE_REWARDS",
    "PEER_RECIPES",
    "REWARDS",
    "Budget",
    "CandidateCache",
    "CandidateEvaluator",
    "ChannelGroup",
    "Checkpoint",
    "EntropyProbe",
    "MacsForm",
    "LatencyMeter",
    "LatencyTable",
    "Network",
    "Problem",
    "PruningSpace",
    "ResidualBlock",
    "SimulatedEvaluator",
    "build_model",
    "cache_entry",
    "check_exact",
    "choose_default_reward",
    "collapse_rate",
    "compute_reward",
    "count_macs",
    "count_params",
    "ensure_checkpoint",
    "export",
    "export_onnx",
    "finalist_records",
    "finalize",
    "load_checkpoint",
    "load_model",
    "load_network",
    "load_splits",
    "network_entropy",
    "offered",
    "peer_baseline",
    "peer_network",
    "proxy_agreement",
    "random_candidate",
    "random_counts",
    "random_search",
    "recalibrate_batchnorm",
    "record_key",
    "recalibrated_batchnorm",
    "save_checkpoint",
    "shallow_blocks",
    "setup",
    "spatial_entropy",
    "guarded_choice",
    "guarded_winner",
    "halving_survivors",
    "paired_p_value",
    "successive_halving",
    "train_baseline",
    "uniform_baseline",
    "uniform_counts",
    "user_network",
    "user_weights",
]
