"""Validated configuration of one search (`entropy-search search CONFIG.yaml`).

A YAML file only overrides the defaults below; every section and key is optional. Unknown keys, wrong
types and out-of-range values raise `ConfigError` naming the key, e.g.
``search.flops_target: must be in (0, 1], got 1.5``.

The same object configures the Tune sweep (`entropy_search.sweep`), which varies keys by their dotted
names (``search.reward``, ``agent.lr``, ``seed``...) through `load_config(..., overrides=...)`.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ConfigError

# ---------------------------------------------------------------- constrained scalar types


def _unit_open_closed(v: float) -> float:
    if not 0.0 < v <= 1.0:
        raise ValueError("must be in (0, 1]")
    return v


def _unit_closed(v: float) -> float:
    if not 0.0 <= v <= 1.0:
        raise ValueError("must be in [0, 1]")
    return v


def _positive(v):
    if not v > 0:
        raise ValueError("must be > 0")
    return v


def _non_negative(v):
    if not v >= 0:
        raise ValueError("must be >= 0")
    return v


#: each validator's rule, as the configuration reference (docs/configuration.md) states it
VALIDATOR_RULES = {_unit_open_closed: "in (0, 1]", _unit_closed: "in [0, 1]", _positive: "> 0", _non_negative: ">= 0"}

UnitFraction = Annotated[float, AfterValidator(_unit_open_closed)]
Probability = Annotated[float, AfterValidator(_unit_closed)]
PositiveFloat = Annotated[float, AfterValidator(_positive)]
NonNegativeFloat = Annotated[float, AfterValidator(_non_negative)]
PositiveInt = Annotated[int, AfterValidator(_positive)]
NonNegativeInt = Annotated[int, AfterValidator(_non_negative)]


class Section(BaseModel):
    """A config section: unknown keys are errors, every field is documented and validated, defaults included."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)


# ---------------------------------------------------------------- sections


class ModelConfig(Section):
    """The network to prune and its trained baseline."""

    name: str = "digits_cnn"
    """Model registry name (`digits_cnn`, `resnet20`, `resnet56`, `vgg16_bn`, `mobilenet_v2`), `tv:<torchvision name>` or `package.module:factory`."""

    checkpoint: str | None = None
    """Baseline checkpoint written by `entropy-search train`. Default: `<output.dir>/baseline.pt`. With `weights`: where the imported weights are written as a checkpoint."""

    weights: Annotated[str, Field(min_length=1)] | None = None
    """A network trained elsewhere: its weights as saved with plain PyTorch (`torch.save(model.state_dict(), FILE)`; also `{"state_dict": ...}`, `{"model": ...}` and keys prefixed `module.` by DataParallel), for the architecture `name` with the data set's classes and channels. Read with `weights_only=True`, checked strictly against the architecture, measured (test accuracy, MACs, latency) and written as the checkpoint (`checkpoint`) before the search starts. Give the held-out split it never trained on with `data.heldout`, and its input normalisation with `data.mean` and `data.std`."""

    train_if_missing: bool = True
    """When the checkpoint file does not exist, train a baseline first (on the train split) and save it there; otherwise a missing checkpoint is an error."""

    train_epochs: PositiveInt = 30
    """Epochs of baseline training when the checkpoint has to be trained first."""


class DataConfig(Section):
    """The data set: unlabeled images for the entropy reward, a held-out split for accuracy, a test split for the result."""

    name: str = "digits"
    """Data set name understood by `entropy_search.data.load_data` (`digits` ships offline; `fashion_mnist`, `cifar10`, `cifar100`, `imagefolder`)."""

    root: str | None = None
    """Where the data set lives on disk (not needed for `digits`)."""

    heldout_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    """Part of the training set held out from baseline training (for the held-out accuracy of candidates) when the search trains its baseline; a given checkpoint keeps the fraction and seed it was trained with (unused with `heldout`)."""

    heldout: Annotated[str, Field(min_length=1)] | None = None
    """The held-out split, for a baseline trained elsewhere (a checkpoint that does not record the `heldout_fraction` and seed it was trained with, whose drawn held-out split may hold images it trained on): a JSON split file, a list of indices into the data set's training set that the baseline never trained on (or `{"heldout": [...]}`), which then leave the train split; or a folder of images with one subfolder per class (named as the data set's classes, or 0..K-1), read with the data set's evaluation transform, the train split then being the whole training set. None: drawn from the training set with the checkpoint's fraction and seed."""

    mean: list[float] | None = None
    """Per-channel mean of the inputs' normalisation, `(x - mean) / std` with x in [0, 1], as the network was trained with. None: the data set's own (ImageNet's for `imagefolder`); a checkpoint's recorded normalisation otherwise wins. Recorded with every checkpoint and result, used by every evaluation, fine-tune and export."""

    std: list[float] | None = None
    """Per-channel standard deviation of the inputs' normalisation (with `mean`)."""

    image_size: PositiveInt | None = None
    """`imagefolder`: the side of the square inputs (images resized and centre-cropped to it; the baseline's when it records one, else 224)."""

    channels: Literal[1, 3] | None = None
    """`imagefolder`: images read as 1 (greyscale) or 3 (RGB) channels (the baseline's when it records one, else 3)."""

    eval_batch: PositiveInt = 512
    """Fixed batch of held-out images (a split of the training set, never the test set) on which every candidate is measured: spatial entropy (labels unused) and held-out accuracy."""


class EntropyConfig(Section):
    """How the spatial entropy of a candidate's activations is estimated (docs/design.md, "Spatial entropy")."""

    method: Literal["cooccurrence", "histogram", "mass"] = "cooccurrence"
    """Estimator: grey-level co-occurrence matrix of each map (the paper's), plain histogram entropy, or entropy of the activation mass as a spatial distribution."""

    bins: Annotated[int, Field(ge=2, le=1024)] = 16
    """Quantisation levels G of a min-max normalised map."""

    layers: Literal["bn", "bn_relu", "last_stage"] | list[str] = "bn_relu"
    """Measured layers: every conv output after BN (`bn`) or after BN and ReLU (`bn_relu`), only the last stage (`last_stage`), or a list of module names."""

    sample: UnitFraction | None = None
    """Fraction of the maps of each layer measured (the same seeded maps for every candidate); 1.0 = all maps, exact. None: the device's default, 0.25 on the CPU (keeps the entropy's cost under one forward pass with a rank correlation of ~0.99 to the exact value) and exact on CUDA (the Triton kernel makes exact cheaper than sampling there); bench/RESULTS.md."""


class SearchSettings(Section):
    """The pruning problem: reward, FLOPs budget, action range and rounding."""

    reward: Literal["entropy", "agreement", "kl", "feature", "entropy_normalized", "accuracy", "accuracy_flops"] = "agreement"
    """The default, `agreement`, is the label-free reward the protocol of bench/bench_proxy.py chooses (bench/RESULTS.md). `entropy`: minus the spatial entropy of the kept channels (label-free, the paper's); `agreement`: the share of images on which the candidate's top-1 class is the unpruned network's (label-free); `kl`: minus the KL divergence from the unpruned network's softmax to the candidate's on the same images (label-free); `feature`: minus the relative error of the classifier's input features against the unpruned network's (label-free); `entropy_normalized`: minus the spatial entropy with each map's divided by the most its size allows (label-free; a study of the paper's reward without its structural bias); `accuracy`: held-out top-1 (AMC R_err); `accuracy_flops`: -error*log(FLOPs) (AMC R_FLOPs)."""

    entropy: EntropyConfig = Field(default_factory=EntropyConfig)
    """Settings of the spatial-entropy estimator (used for every candidate, whatever the reward)."""

    flops_target: UnitFraction = 0.5
    """Budget: every candidate has at most `flops_target` x the baseline's MACs (0.5 = 2x reduction). Met by construction (AMC action clipping)."""

    flops_floor: Probability = 0.97
    """Candidates also use the budget: their MACs are at least `flops_floor` x the target where the rounding allows (two-sided clipping), so rewards compare networks of the same cost (within 3% by default; a label-free reward could otherwise favour pruning past the target). 0 = AMC's one-sided clipping."""

    min_keep: UnitFraction = 0.1
    """Smallest keep ratio of a group; the action is mapped to a keep ratio in [min_keep, 1]."""

    budget: Literal["macs", "latency"] = "macs"
    """What the target limits. `macs`: the MAC count, exactly (`flops_target`). `latency`: the forward latency on this machine's search device, predicted by a per-group latency table measured once and cached (`latency_target` or `latency_target_ms`, `latency_batch`, `latency_cache`; threads: `resources.torch_threads`); `flops_floor` then applies to the latency target. docs/design.md, "Latency budget"."""

    latency_target: UnitFraction | None = None
    """`budget: latency`: every candidate's predicted latency is at most this ratio of the unpruned network's measured latency (0.5 = 2x faster). Give this or `latency_target_ms`."""

    latency_target_ms: PositiveFloat | None = None
    """`budget: latency`: the target as milliseconds per forward of `latency_batch` images (instead of `latency_target`)."""

    latency_batch: PositiveInt = 1
    """`budget: latency`: the batch size the latency table is measured at (and the budget holds for)."""

    latency_statistic: Literal["median", "min"] = "median"
    """`budget: latency`: which time of each network's repeated forwards the table holds: the median (a quiet machine), or the fastest (a machine shared with busy processes, where preemption inflates the median of a longer forward more than a shorter one's)."""

    latency_cache: str | None = None
    """`budget: latency`: folder of the cached latency tables (one JSON file per network architecture, device, batch, threads, rounding and min_keep). Default: `latency_tables/` next to the baseline checkpoint, so the searches of a sweep measure it once."""

    action_space: Literal["relative", "absolute"] = "relative"
    """How an action in [-1, 1] becomes a keep ratio: `absolute` maps it linearly to [min_keep, 1] (AMC's); `relative` scales the uniform keep ratio the remaining budget allows the undecided groups by 2**(action x action_spread), so that random actions stay around the uniform solution instead of starving the last groups."""

    action_spread: PositiveFloat = 1.0
    """`relative` action space: an action of +-1 multiplies the uniform keep ratio by 2**(+-action_spread)."""

    blocks: bool = True
    """Depth as a choice: each shape-preserving residual block of the network (an identity shortcut around a branch, found from its graph) is kept or dropped by the search, next to the channel counts; a dropped block computes the identity and is removed from the delivered network. A network without such blocks searches channels only. Under `budget: latency` the latency table also times the network without each block. docs/design.md, "Residual blocks"."""

    round_to: PositiveInt = 1
    """Kept channel counts are rounded to a multiple of this (8 suits GPUs, 1 tiny networks)."""

    top_k: PositiveInt = 3
    """Best candidates (by reward) kept, pruned for real, fine-tuned and tested at the end."""

    device: str = "auto"
    """Device of the candidate evaluations (`auto`: the GPU share an env runner was given, else the CPU; `cpu`; `cuda`)."""

    bn_calibration: NonNegativeInt = 256
    """Training images (a fixed, seeded batch of the train split, never the held-out or test split) on which each candidate's BN statistics are re-estimated before it is measured (adaptive BN, as EagleEye): with the baseline's statistics a pruned network's accuracy and activations before fine-tuning say little about it. Also applied to the finalists before their test accuracy before fine-tuning. 0 = keep the baseline's statistics."""

    eval_mode: Literal["auto", "sliced", "masked", "pruned"] = "auto"
    """How a candidate is evaluated without surgery: kept weights sliced into the original modules (the pruned network's cost plus a few launches per layer), masked outputs (full cost, no slicing), or a physical prune per candidate (slow; for checking). `auto`: sliced on CPUs (within a few % of the pruned forward), masked on GPUs (on an H200 slicing's ~300 small launches cost more than masking for ResNet-56: 20.6 vs 16.7 ms at batch 1,024); bench/RESULTS.md."""

    check_exact: bool = True
    """Before the search, one seeded random candidate under the budget is evaluated the way every candidate will be (sliced or masked) and also pruned for real; if the two compute different outputs (relative difference over 1e-4), the search stops with the channel groups that differ named, instead of ranking one function and delivering another (`result.json`'s `exactness`; docs/design.md, "The exactness guard"). Not needed with `eval_mode: pruned`."""

    cache: bool = True
    """Answer a candidate already evaluated (same kept channels) from a cache instead of evaluating it again."""

    simulate_eval_seconds: NonNegativeFloat = 0.0
    """Benchmarks only: replace the evaluation by a sleep of this many seconds and a synthetic reward."""

    @model_validator(mode="after")
    def _latency_target(self):
        given = [k for k in ("latency_target", "latency_target_ms") if getattr(self, k) is not None]
        if self.budget == "latency" and len(given) != 1:
            raise ValueError("budget: latency needs exactly one of latency_target (a ratio of the unpruned network's "
                             f"latency) and latency_target_ms, got {', '.join(given) or 'neither'}")
        if self.budget == "macs" and given:
            raise ValueError(f"{given[0]} is set but budget is macs (the default); set budget: latency")
        return self


class AgentConfig(Section):
    """The RL agent (RLlib, new API stack). Defaults suit 20-100 step episodes with one terminal reward."""

    algorithm: Literal["ppo", "sac"] = "ppo"
    """PPO (default) or SAC."""

    gamma: Probability = 1.0
    """Discount factor; 1.0 because the only reward comes at the end of the episode."""

    lr: PositiveFloat = 1e-3
    """PPO learning rate (SAC uses actor_lr / critic_lr / alpha_lr). With 8 epochs x 2 minibatches (16 updates an iteration) the policy learns within a search: on ResNet-20 / Fashion-MNIST at 3x its candidates' mean reward rose from 0.30 to 0.43 (first to last quarter of 640 episodes, mean of 3 seeds) and its best beat random search's in every seed, where 1e-4 x 4 epochs barely moved (bench/RESULTS.md, "640 evaluations, lr 1e-3 and 8 epochs x 2 minibatches (the shipped agent)"). On a 4-group network it narrows to fewer distinct candidates (digits: 3e-4 x 8 epochs gave ~90 in 400 episodes); repeats cost no evaluation."""

    episodes_per_iteration: PositiveInt = 16
    """Candidates (episodes) sampled per training iteration; the train batch is this times the number of groups (env steps)."""

    num_minibatches: PositiveInt = 2
    """PPO: minibatches per epoch over the train batch (two: twice the updates per pass over a batch of a few hundred steps)."""

    num_epochs: PositiveInt = 8
    """PPO: passes (epochs) over each train batch."""

    clip_param: PositiveFloat = 0.2
    """PPO: clipping of the probability ratio."""

    gae_lambda: Probability = 0.95
    """PPO: GAE lambda."""

    entropy_coeff: NonNegativeFloat = 0.0
    """PPO: coefficient of the policy-entropy bonus (exploration)."""

    vf_loss_coeff: NonNegativeFloat = 1.0
    """PPO: weight of the value-function loss."""

    initial_std: PositiveFloat = 1.0
    """PPO: standard deviation of the policy's actions (in [-1, 1]) before any update, the same for every state. RLlib's own start is about 1, which puts about 40% of the first candidates' actions at a bound of the clipped range; random search draws uniformly in [-1, 1] (std 0.58)."""

    hidden_sizes: list[PositiveInt] = Field(default_factory=lambda: [64, 64])
    """Hidden layer sizes of the policy and value (or Q) networks."""

    activation: Literal["tanh", "relu"] = "tanh"
    """Activation of the hidden layers."""

    actor_lr: PositiveFloat = 3e-4
    """SAC: actor learning rate."""

    critic_lr: PositiveFloat = 3e-4
    """SAC: critic learning rate."""

    alpha_lr: PositiveFloat = 3e-4
    """SAC: entropy-temperature learning rate."""

    tau: UnitFraction = 0.005
    """SAC: soft target-network update coefficient."""

    initial_alpha: PositiveFloat = 0.2
    """SAC: initial entropy temperature."""

    replay_capacity: PositiveInt = 100_000
    """SAC: replay buffer capacity (env steps)."""

    learning_starts_episodes: NonNegativeInt = 8
    """SAC: episodes sampled before the first update."""

    train_batch_size: PositiveInt = 256
    """SAC: transitions per gradient update."""

    training_intensity: PositiveFloat | None = None
    """SAC: replayed over sampled transitions ratio (RLlib's training_intensity); default: RLlib's."""


class ResourcesConfig(Section):
    """Ray workers and their share of CPUs and GPUs."""

    num_env_runners: NonNegativeInt = 2
    """Ray workers, each holding the network, the evaluation batches and an environment; candidates are evaluated where they live. 0 = in the driver."""

    num_envs_per_env_runner: PositiveInt = 8
    """Environments per env runner, stepped together (one batched agent inference for all); they share the worker's network and cache, and evaluate their candidates one after another. More amortises RLlib's per-step overhead (about a millisecond) on long episodes."""

    num_cpus_per_env_runner: NonNegativeFloat = 1.0
    """CPUs reserved per env runner."""

    max_env_runner_restarts: NonNegativeInt = 3
    """An env runner whose process dies (a lost node, the OOM killer, a kill) is restarted by RLlib, up to this many times per runner, and the search goes on; its unfinished episodes are the only loss (result.json's cost.env_runner_restarts counts them). 0: a lost env runner ends the search (continue with --resume)."""

    num_gpus_per_env_runner: NonNegativeFloat = 0.0
    """GPUs per env runner; fractions share one GPU between workers (e.g. 0.25 = four workers per GPU)."""

    num_gpus_per_learner: NonNegativeFloat = 0.0
    """GPU of the learner (the agent's own networks are tiny: 0 is fine)."""

    driver_threads: PositiveInt | None = None
    """torch threads of the driver for the baselines, fine-tuning and tests after the search (None: torch's default; 1 on a machine shared with busy Ray workers)."""

    num_cpus: PositiveInt | None = None
    """CPUs of a local Ray instance started by the search (default: all). Ignored when Ray is already running or `address` is set."""

    address: str | None = None
    """Ray cluster to join (`auto`, `ray://...`); default: `RAY_ADDRESS` if set, else a local instance."""

    torch_threads: PositiveInt | None = 1
    """torch threads of each env runner and of the driver's learner during the search (1 avoids oversubscribing the cores); None leaves torch's default."""


class StopConfig(Section):
    """When the search stops: the first of the rules that are set."""

    iterations: PositiveInt | None = 40
    """Training iterations of the agent (x `agent.episodes_per_iteration` candidates: 640 by default, where the agent beat random search on ResNet-20 / Fashion-MNIST; with 160 it did not, bench/RESULTS.md)."""

    candidates: PositiveInt | None = None
    """Candidates (episodes) evaluated."""

    wall_seconds: PositiveFloat | None = None
    """Wall time of the search (checked after each iteration)."""

    patience: PositiveInt | None = 10
    """Stop once this many iterations in a row have not raised the best reward (more evaluations stopped paying); None: never for that reason. On ResNet-20 / Fashion-MNIST at 10x, 10 delivered the same network as 40 iterations in 3 of 3 seeds with either final stage, stopping after 16-34 iterations (bench/RESULTS.md)."""

    @model_validator(mode="after")
    def _one_rule(self):
        if self.iterations is None and self.candidates is None and self.wall_seconds is None and self.patience is None:
            raise ValueError("set at least one of iterations, candidates, wall_seconds, patience")
        return self


class BaselinesConfig(Section):
    """What the agent must beat, under the same FLOPs budget."""

    enabled: bool = True
    """Run the uniform and random-search baselines after the search."""

    random_candidates: PositiveInt | None = None
    """Distinct candidates of the random search; default: as many as the agent evaluated."""

    finetune: bool = True
    """Fine-tune and test the baselines' best candidates like the agent's (for a fair comparison)."""

    uniform_shallow: bool = True
    """With `search.blocks` and a network whose residual blocks make two or more stages of two or more blocks: also uniform pruning of the network without the last block of each such stage but the last (`shallow_blocks`; on ResNet-20 bench/bench_depth.py's 1-1-0), a finalist like uniform pruning (`uniform_shallow`)."""

    peers: list[Literal["tp_magnitude", "tp_taylor", "tp_isomorphic"]] = ["tp_magnitude", "tp_taylor", "tp_isomorphic"]
    """Torch-Pruning's own recipes run as baselines next to uniform pruning and random search (what a user who runs no search would do; `entropy_search.problem.peers`): `tp_magnitude`, global pruning by L1 magnitude (GroupMagnitudeImportance(p=1)); `tp_taylor`, global pruning by first-order Taylor importance (GroupTaylorImportance, one backward pass on a fixed, seeded batch of `data.eval_batch` training images); `tp_isomorphic`, isomorphic pruning by L1 magnitude. Each is brought to the budget by bisecting Torch-Pruning's pruning ratio until the network's cost is within 3% below the target, fine-tuned like every finalist and judged by the final stage. [] runs none."""


class FinetuneResources(Section):
    """What one fine-tune of a finalist holds while it runs as a Ray task."""

    num_cpus: PositiveFloat = 1.0
    """CPUs of each fine-tune; its torch threads are this, rounded down (at least 1)."""

    num_gpus: NonNegativeFloat | None = None
    """GPUs of each fine-tune; None: 1 when the search's device is a GPU on the driver, else 0 (set 1 on a cluster whose GPUs are on its worker nodes only: one finalist per GPU)."""


class FinetuneConfig(Section):
    """Fine-tuning of the finalists (the agent's top-k and the baselines' best) once physically pruned."""

    epochs: NonNegativeInt = 5
    """Epochs of fine-tuning on the train split (0 = none)."""

    lr: PositiveFloat = 0.01
    """Learning rate of the fine-tuning (SGD, cosine schedule)."""

    batch_size: PositiveInt = 128
    """Batch size of the fine-tuning."""

    parallel: bool = True
    """Fine-tune the finalists as Ray tasks on the Ray the search used, as many at once as it has room for (each with `resources`; in a sweep's trial, within the trial's env-runner bundles) when two or more fit, else one after another in the driver. Either way each finished fine-tune is kept in `<output.dir>/finalists/`, so --resume does not redo it; a fine-tune whose worker dies is retried once."""

    resources: FinetuneResources = Field(default_factory=FinetuneResources)
    """CPUs and GPUs of each parallel fine-tune."""


class SelectionConfig(Section):
    """The final stage: which finalist is delivered (docs/design.md, "The final stage")."""

    enabled: bool = True
    """Choose the delivered network among the uniform candidate, the agent's top-k and the best random-search candidate (same budget), by held-out accuracy (never the test split); uniform pruning unless another finalist beats it significantly (`significance`). Off: the agent's best is delivered."""

    method: Literal["full", "halving"] = "halving"
    """`halving`: successive halving on short fine-tunes (rung_steps, eta; Tune trials under ASHA when two fit at once), uniform pruning kept to the last rung; then the last rung's `survivors` best, uniform pruning and the agent's pick are fine-tuned in full and the guarded rule (`significance`) decides on those, so only they have test figures; `full`: every finalist (the agent's top-k, uniform pruning and its shallower variant, random search's best, Torch-Pruning's recipes) fine-tuned in full, then judged the same way: the whole comparison in result.json, at about twice the time. On ResNet-20 / Fashion-MNIST at 10x, 3 seeds, halving with 2 survivors delivered what `full` delivered at every seed (91.42% on average) in 3.8x uniform pruning's time on average instead of 6.9x (bench/RESULTS.md)."""

    significance: Annotated[float, Field(gt=0.0, le=1.0)] = 0.2
    """Another finalist replaces uniform pruning only if it is more accurate on the held-out split after fine-tuning (`halving`: after the last rung's short fine-tune) and the one-sided exact McNemar test on the same images gives p below this (1.0: the most accurate finalist wins). A small held-out split cannot tell networks a few images apart, and then the user gets the known-safe network. 0.2 was chosen on recorded searches by a rule fixed before its validation runs (bench/RESULTS.md, "the final stage's significance level"): it never left uniform on digits' 144 held-out images, and on Fashion-MNIST's 6,000 it took leads of 0.2-0.5 points that 0.05 refused."""

    survivors: NonNegativeInt = 2
    """`halving`: this many of the last rung's most accurate finalists, with uniform pruning and the agent's pick (so the search stays measurable), are then fine-tuned in full and the guarded rule decides on those full fine-tunes (as `full` does, on fewer networks); 0: the guarded rule decides at the last rung's short fine-tune and only the delivered network is fine-tuned in full (2.2x uniform pruning's time on ResNet-20 / Fashion-MNIST at 10x, but 0.26 points below `full` on average over 3 seeds, 0.77 at one: what recovers fastest in 90 steps is not what ends best)."""

    rung_steps: PositiveInt = 30
    """`halving`: SGD steps of every finalist in the first rung; each later rung trains the survivors eta times longer (cumulative)."""

    eta: Annotated[int, Field(ge=2)] = 3
    """`halving`: 1/eta of the finalists continue at each rung (3: nine finalists take two rungs, 30 and 90 steps; with 2, four rungs cost twice the steps on ResNet-20 / Fashion-MNIST, bench/RESULTS.md)."""

    batch_size: PositiveInt = 128
    """`halving`: batch size of the short fine-tunes."""

    lr: PositiveFloat = 0.01
    """`halving`: learning rate of the short fine-tunes (SGD, cosine schedule per rung)."""


class OutputConfig(Section):
    """Where results and checkpoints go."""

    dir: str = "runs/search"
    """Output folder: result.json, candidates.jsonl, config.yaml, checkpoints/ and the pruned models."""

    checkpoint_every: PositiveInt = 5
    """Checkpoint the agent, the candidate cache and the top-k every this many iterations (and at the end)."""

    export_onnx: bool = True
    """Also export the best pruned model to ONNX."""

    latency: bool = True
    """Measure the CPU latency (median of repeated forwards after a warm-up) of the unpruned, uniform and delivered networks with PyTorch, and of the delivered ONNX file with ONNX Runtime (checked against PyTorch's outputs): result.json's `latency`, next to the MAC ratios."""

    latency_batch_sizes: list[PositiveInt] = Field(default_factory=lambda: [1, 32], min_length=1)
    """Batch sizes the latency is measured at."""


class SearchConfig(Section):
    """One RL pruning search."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    """The network to prune and its baseline checkpoint."""

    data: DataConfig = Field(default_factory=DataConfig)
    """The data set and evaluation batches."""

    search: SearchSettings = Field(default_factory=SearchSettings)
    """Reward, FLOPs budget, action range, rounding, top-k."""

    agent: AgentConfig = Field(default_factory=AgentConfig)
    """The RL agent and its hyper-parameters."""

    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    """Ray workers, CPUs and GPUs."""

    stop: StopConfig = Field(default_factory=StopConfig)
    """Stop rule of the search."""

    baselines: BaselinesConfig = Field(default_factory=BaselinesConfig)
    """Uniform and random-search baselines under the same budget and number of candidate evaluations."""

    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    """Fine-tuning of the best candidates."""

    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    """The final stage choosing the delivered network among the finalists."""

    output: OutputConfig = Field(default_factory=OutputConfig)
    """Output folder and checkpointing."""

    seed: NonNegativeInt = 0
    """Seed of the agent, the evaluation batch, the random baseline and fine-tuning (the held-out split follows the checkpoint's own seed, so it stays out of the baseline's training data)."""

    # ------------------------------------------------------------ helpers

    def checkpoint_path(self) -> Path:
        """The baseline checkpoint: `model.checkpoint`, or `<output.dir>/baseline.pt`."""
        return Path(self.model.checkpoint) if self.model.checkpoint else Path(self.output.dir) / "baseline.pt"

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON/YAML-serialisable dict (the resolved config saved with every result)."""
        return self.model_dump(mode="json")

    def save(self, path: str | os.PathLike) -> None:
        """Write the resolved config as YAML (or JSON when the path ends with .json)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".json":
            path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        else:
            path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


# ---------------------------------------------------------------- loading


_PATH_KEYS = (("model", "checkpoint"), ("data", "root"), ("data", "heldout"), ("output", "dir"),
              ("search", "latency_cache"))


def _deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _nest(overrides: dict[str, Any]) -> dict[str, Any]:
    """`{"search.flops_target": 0.3}` -> `{"search": {"flops_target": 0.3}}` (nested dicts pass through)."""
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        parts = str(key).split(".")
        node = nested
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{key}: cannot set a sub-key of a non-section value")
            node = child
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            node[parts[-1]] = _deep_merge(node[parts[-1]], value)
        else:
            node[parts[-1]] = value
    return nested


def format_validation_error(err: dict, root: type[BaseModel]) -> str:
    """One pydantic error as `dotted.key: message, got value` (unknown keys list the known ones)."""
    loc = ".".join(str(p) for p in err["loc"]) or "<config>"
    kind = err["type"]
    if kind == "extra_forbidden":
        known = _known_keys(root, err["loc"][:-1])
        hint = f" (known keys: {', '.join(known)})" if known else ""
        return f"{loc}: unknown key{hint}"
    msg = err["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    if kind == "missing":
        return f"{loc}: required"
    value = err.get("input")
    if isinstance(value, dict):
        return f"{loc}: {msg}"
    return f"{loc}: {msg}, got {value!r}"


def _known_keys(root: type[BaseModel], loc: tuple) -> list[str]:
    model: Any = root
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
    fields = getattr(model, "model_fields", None)
    return sorted(fields) if fields else []


class _DuplicateKey(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps the last one,
    so a second `model:` section would silently replace the first)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise _DuplicateKey(f"key {key!r} is given twice (lines {seen[key]} and {line}); keep one")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml_mapping(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """The mapping at the top of a YAML file (empty file: {}); ConfigError naming `what` and the file when it is
    missing, not YAML, not a mapping, or gives a key twice in one mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except _DuplicateKey as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def config_from_dict(data: dict[str, Any] | None) -> SearchConfig:
    """Validate a (nested) dict into a SearchConfig, raising ConfigError naming the key on any problem."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"<config>: expected a mapping of sections, got {type(data).__name__}")
    try:
        return SearchConfig.model_validate(data)
    except ValidationError as exc:
        errors = [format_validation_error(e, SearchConfig) for e in exc.errors()]
        raise ConfigError("; ".join(errors)) from None


def load_config(
    path_or_dict: str | os.PathLike | dict[str, Any] | SearchConfig | None = None,
    overrides: dict[str, Any] | None = None,
    *,
    resolve_paths: bool = True,
) -> SearchConfig:
    """Load a search config from a YAML file (or a dict), apply `overrides` and validate.

    `overrides` maps dotted keys (``"search.flops_target"``) or nested dicts to values; they win over
    the file. Relative paths (model.checkpoint, data.root, data.heldout, output.dir) are made absolute
    against the current directory when `resolve_paths`, so Ray workers and Tune trials (other working
    directories) find the same files.
    """
    if isinstance(path_or_dict, SearchConfig):
        data = path_or_dict.to_dict()
    elif isinstance(path_or_dict, dict):
        data = copy.deepcopy(path_or_dict)
    elif path_or_dict is None:
        data = {}
    else:
        data = read_yaml_mapping(path_or_dict, "config file")
    if overrides:
        data = _deep_merge(data, _nest(overrides))
    config = config_from_dict(data)
    if resolve_paths:
        for section, key in _PATH_KEYS:
            sub = getattr(config, section)
            value = getattr(sub, key)
            if value:
                setattr(sub, key, str(Path(value).expanduser().resolve()))
    return config


def schema_reference() -> str:
    """The YAML schema with defaults and descriptions (for docs and `--help`)."""
    lines: list[str] = []

    def walk(model: type[BaseModel], indent: int) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            pad = "  " * indent
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                lines.append(f"{pad}{name}:  # {field.description or ''}")
                walk(ann, indent + 1)
            else:
                default = field.get_default(call_default_factory=True)
                lines.append(f"{pad}{name}: {json.dumps(default)}  # {field.description or ''}")

    walk(SearchConfig, 0)
    return "\n".join(lines)
