"""entropy-search: channel pruning by RL with a spatial-entropy reward.

The public API is small; the pruning problem lives in `entropy_search.problem` (plain PyTorch), the
environment, RL driver, sweep, tracking and command line around it (docs/design.md, "Layout").
"""

from .data import list_datasets, register_dataset
from .models import create_model, list_models, register_model
from .problem import ChannelGroup, PruningSpace, count_macs, count_params, load_model, spatial_entropy
from .version import __version__

__all__ = [
    "ChannelGroup",
    "PruningSpace",
    "__version__",
    "count_macs",
    "count_params",
    "create_model",
    "list_datasets",
    "list_models",
    "load_model",
    "register_dataset",
    "register_model",
    "spatial_entropy",
]
