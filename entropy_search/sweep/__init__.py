"""Sweeps of RL pruning searches with Ray Tune, tracked in MLflow: schema, runner and trainable."""

from .runner import describe, report, run_sweep
from .schema import ITERATION_METRICS, SweepConfig, load_sweep_config, trial_bundles, trial_config

__all__ = ["ITERATION_METRICS", "SweepConfig", "describe", "load_sweep_config", "report", "run_sweep", "trial_bundles",
           "trial_config"]
