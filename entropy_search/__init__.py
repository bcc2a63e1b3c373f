"""entropy-search: channel pruning by RL with a spatial-entropy reward.

The public API is small; everything else lives in private-by-convention modules.
"""

from .entropy import spatial_entropy
from .flops import count_macs, count_params
from .models import create_model, list_models, register_model
from .space import ChannelGroup, PruningSpace

__version__ = "0.1.0"

__all__ = [
    "ChannelGroup",
    "PruningSpace",
    "count_macs",
    "count_params",
    "create_model",
    "list_models",
    "register_model",
    "spatial_entropy",
]
