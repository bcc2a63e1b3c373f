"""entropy-search: channel pruning by RL with a spatial-entropy reward."""

__version__ = "0.1.0"
