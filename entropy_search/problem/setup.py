"""One pruning problem from a search config: the baseline network, its data, channel groups, budget,
evaluator and cache, built in one place (docs/design.md, "The problem").

`setup(config)` is what the search's driver, every env runner, the sweep's budget check and the
benchmarks call; `train_baseline` is the one way a baseline network is trained and saved (the
`train` command, a search whose checkpoint is missing, the tests).
"""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import SearchConfig
from ..data import DataSplits, eval_batch, load_data, with_heldout
from ..errors import CheckpointError, ConfigError
from ..latency import device_name
from ..models import create_model, model_spec
from ..train import configure_threads, evaluate, read_training_state, select_device, train
from ..utils import resolve_device, seed_everything
from .budget import Budget, MacsForm, count_options
from .checkpoint import Checkpoint, build_model, load_checkpoint, save_checkpoint
from .evaluate import CandidateCache, CandidateEvaluator, SimulatedEvaluator
from .latency_table import LatencyMeter, LatencyTable, latency_table, table_key
from .space import PruningSpace
from .weights import file_digest, import_weights, user_network


@dataclass
class Network:
    """A trained network to prune and the input it expects."""

    model: nn.Module
    example_input: torch.Tensor
    checkpoint: Checkpoint | None = None


@dataclass
class Problem:
    """Everything a candidate evaluation needs, built once per process."""

    network: Network
    splits: DataSplits | None
    """None only for simulated evaluations (benchmarks)."""
    space: PruningSpace
    budget: Budget
    evaluator: CandidateEvaluator | SimulatedEvaluator
    cache: CandidateCache
    config: SearchConfig = field(repr=False)
    notes: list[str] = field(default_factory=list)
    """What the user should know about this problem (said once by the driver), e.g. a small held-out split."""
    exactness: dict | None = None
    """The exactness guard's check of this problem (`guard.check_exact`), when the driver ran it."""

    @property
    def model(self) -> nn.Module:
        return self.network.model

    def evaluate(self, counts, ranking: str | None = None, dropped: Collection[int | str] = ()) -> tuple[dict, bool]:
        """A candidate's record (measurements, reward, kept channels, keep ratios, dropped blocks) and whether it
        came from the cache; `ranking` names another ranking of the space's channels (a peer recipe's) that picks
        which to keep; `dropped` the residual blocks it drops."""
        return self.cache.evaluate(counts, ranking, dropped)


def load_network(config: SearchConfig) -> Network:
    """The baseline network of the config: its checkpoint, which must hold the configured model."""
    path = config.checkpoint_path()
    ckpt = load_checkpoint(path)
    if config.model.name and config.model.name != ckpt.model_name:
        raise ConfigError(f"model.name: {config.model.name!r}, but checkpoint {path} holds a {ckpt.model_name!r}")
    return Network(build_model(ckpt), ckpt.example_input(), ckpt)


def preprocessing_of(config: SearchConfig, ckpt: Checkpoint | None = None) -> dict[str, Any]:
    """`load_data`'s image_size, channels, mean and std for the config's data: what the config states, else what the
    checkpoint records (its image size and channels for ImageFolder data, its normalisation); a statement that
    contradicts the checkpoint's record is a ConfigError (the network was trained or imported with it)."""
    data = config.data
    recorded = dict(((ckpt.config or {}).get("preprocessing") or {}) if ckpt is not None else {})
    if ckpt is not None:
        recorded.setdefault("image_size", ckpt.image_size)
        recorded.setdefault("channels", ckpt.in_channels)
    for key in ("mean", "std", "image_size", "channels"):
        stated, kept = getattr(data, key), recorded.get(key)
        if stated is not None and kept is not None and kept != [] and _differs(stated, kept):
            raise ConfigError(f"data.{key}: {stated}, but checkpoint {ckpt.path} records {kept} (the network was "
                              f"trained or imported with it); leave data.{key} out or use another checkpoint")
    folder = data.name.startswith("imagefolder")
    out: dict[str, Any] = {"mean": data.mean or recorded.get("mean") or None,
                           "std": data.std or recorded.get("std") or None}
    if folder:  # only ImageFolder data is resized or converted
        out["image_size"] = data.image_size or recorded.get("image_size")
        out["channels"] = data.channels or recorded.get("channels")
    elif data.image_size is not None or data.channels is not None:
        raise ConfigError(f"data.image_size and data.channels apply to imagefolder data; {data.name} has its own")
    return out


def _differs(stated, kept) -> bool:
    if isinstance(stated, list | tuple):
        return len(stated) != len(kept) or any(abs(float(a) - float(b)) > 1e-6 for a, b in zip(stated, kept))
    return stated != kept


def load_splits(config: SearchConfig, ckpt: Checkpoint | None) -> DataSplits:
    """The data of the search, with the held-out split drawn by the checkpoint's own seed and fraction, so it
    is the part of the training set the baseline never trained on; or, with `data.heldout`, the held-out split
    that it gives (a split file's training images then leave the train split). Inputs are preprocessed as the
    checkpoint records (`preprocessing_of`); None: a network not yet written as a checkpoint (`model.weights`)."""
    trained = (ckpt.config or {}) if ckpt is not None else {}
    given = config.data.heldout
    splits = load_data(
        config.data.name, config.data.root,
        heldout_fraction=0.0 if given else float(trained.get("heldout_fraction", config.data.heldout_fraction)),
        seed=int(trained.get("seed", config.seed)), **preprocessing_of(config, ckpt),
    )
    if ckpt is not None and ckpt.data and splits.name != ckpt.data:
        raise ConfigError(f"data.name: {config.data.name!r}, but checkpoint {ckpt.path} was trained on {ckpt.data!r}")
    if given:
        try:
            splits = with_heldout(splits, given)
        except ConfigError as exc:
            raise ConfigError(f"data.heldout: {exc}") from None
    return splits


def records_its_split(ckpt: Checkpoint) -> bool:
    """Whether the checkpoint records the held-out fraction and seed it was trained with (`train_baseline`'s do),
    so that the held-out split drawn with them is data it never trained on."""
    return {"heldout_fraction", "seed"} <= set(ckpt.config or {})


def unrecorded_split_note(config: SearchConfig, ckpt: Checkpoint, splits: DataSplits) -> str | None:
    """What to tell the user when the held-out images may have been seen in training: the checkpoint does not
    record its split and no `data.heldout` is given."""
    if config.data.heldout or records_its_split(ckpt):
        return None
    return (f"checkpoint {ckpt.path} does not record the held-out fraction and seed it was trained with (it was not "
            f"trained by entropy-search), so the held-out split ({len(splits.heldout)} images drawn from the "
            f"training set of {splits.name}) may hold images it trained on: held-out accuracy and the final stage's "
            "choice may be optimistic; give images it never trained on as data.heldout (a JSON file of training-set "
            "indices, or a folder of images with one subfolder per class)")


def build_budget(space: PruningSpace, config: SearchConfig) -> Budget:
    """The search's budget on `space` (MACs, or latency predicted by the cached latency table); ConfigError when
    its target is out of reach."""
    s = config.search
    cost, ratio, key = None, s.flops_target, "search.flops_target"
    if s.budget == "latency":
        cost = build_latency_table(space, config)
        if s.latency_target is not None:
            ratio, key = s.latency_target, "search.latency_target"
        else:
            ratio, key = s.latency_target_ms / cost.base, "search.latency_target_ms"
    budget = Budget(space, ratio, s.min_keep, s.flops_floor, action_space=s.action_space,
                    action_spread=s.action_spread, cost=cost, target_key=key)
    budget.check()
    return budget


def build_latency_table(space: PruningSpace, config: SearchConfig) -> LatencyTable:
    """The latency table of a `budget: latency` search: read from `search.latency_cache` (default
    `latency_tables/` next to the baseline checkpoint), else measured on the search's device (threads:
    `resources.torch_threads`, 1 when None) and cached there."""
    s = config.search
    device = resolve_device(s.device)
    threads = config.resources.torch_threads or 1  # the same in the driver and every env runner (one table)
    cache = Path(s.latency_cache) if s.latency_cache else config.checkpoint_path().parent / "latency_tables"
    key = table_key(space, model=config.model.name, device=str(device), device_name=device_name(device),
                    batch=s.latency_batch, threads=threads, min_keep=s.min_keep, statistic=s.latency_statistic)
    meter = LatencyMeter(space, device=device, batch=s.latency_batch, threads=threads, statistic=s.latency_statistic)
    return latency_table(space, count_options(space, s.min_keep), MacsForm(space), key=key, cache_dir=cache,
                         meter=meter, target_ratio=s.latency_target, target_ms=s.latency_target_ms)


def make_evaluator(model: nn.Module, space: PruningSpace, splits: DataSplits, config: SearchConfig) -> CandidateEvaluator:
    """The evaluator of the config: a fixed batch of the held-out split (never the test split), whose labels
    serve the held-out accuracy only, and a fixed batch of training images for adaptive BN."""
    s = config.search
    x, y = eval_batch(splits, config.data.eval_batch, split="heldout", seed=config.seed)
    calibration = None
    if s.bn_calibration > 0:
        calibration, _ = eval_batch(splits, s.bn_calibration, split="train", seed=config.seed)
    model.to(resolve_device(s.device))
    return CandidateEvaluator(
        space, x, y,
        entropy_layers=s.entropy.layers, bins=s.entropy.bins, method=s.entropy.method, sample=s.entropy.sample,
        seed=config.seed, mode=s.eval_mode, calibration=calibration,
    )


def setup(config: SearchConfig) -> Problem:
    """Load the checkpoint and data, group the channels, check the budget and fix the evaluation batches.

    With `search.simulate_eval_seconds` > 0 (benchmarks) no data is loaded, and without a checkpoint file
    the registry's untrained network is used: only the groups and the MAC arithmetic matter then.
    """
    simulate = config.search.simulate_eval_seconds > 0
    if simulate and not config.checkpoint_path().exists():
        spec = model_spec(config.model.name)
        model = create_model(config.model.name).eval()
        network = Network(model, torch.zeros(1, spec.in_channels, spec.image_size, spec.image_size))
        splits = None
    else:
        network = load_network(config)
        splits = load_splits(config, network.checkpoint)
    space = PruningSpace(network.model, network.example_input, round_to=config.search.round_to,
                         blocks=config.search.blocks)
    budget = build_budget(space, config)
    if simulate:
        evaluator: CandidateEvaluator | SimulatedEvaluator = SimulatedEvaluator(space, config.search.simulate_eval_seconds)
    else:
        evaluator = make_evaluator(network.model, space, splits, config)
    cache = CandidateCache(space, evaluator, config.search.reward, enabled=config.search.cache)
    notes = []
    if splits is not None and (note := unrecorded_split_note(config, network.checkpoint, splits)):
        notes.append(note)
    if budget.kind == "latency":
        table = budget.cost
        how = f"measured {table.measured} networks" if table.measured else "read"
        notes.append(f"{table.describe()}: {how}, {table.path}; target {budget.target:.3f} ms")
    if splits is not None and len(splits.heldout) < config.data.eval_batch:
        n = len(splits.heldout)
        notes.append(f"data.eval_batch is {config.data.eval_batch}, but the held-out split of {splits.name} has {n} "
                     f"images: every candidate is measured on those {n} (held-out accuracy moves in steps of "
                     f"{100 / max(n, 1):.2f} points)")
    return Problem(network, splits, space, budget, evaluator, cache, config, notes)


def train_baseline(
    out: str | os.PathLike,
    *,
    model: str,
    data: str,
    epochs: int,
    data_root: str | None = None,
    heldout_fraction: float = 0.1,
    seed: int = 0,
    model_kwargs: dict[str, Any] | None = None,
    device: str = "auto",
    threads: int | None = None,
    download: bool = False,
    image_size: int | None = None,
    progress: bool = True,
    train_options: dict[str, Any] | None = None,
    extra_config: dict[str, Any] | None = None,
    resume: bool = False,
) -> tuple[Path, dict]:
    """Train `model` on the train split of `data` (a `heldout_fraction` of it held out, chosen by `seed`) and
    save it as a checkpoint at `out`; returns (path, metrics). The initial weights are seeded too, so the
    same arguments give the same baseline. `train_options` go to `train` (lr, batch_size, ...).

    The training state is written after every epoch to `training_state_path(out)`, which is removed once the
    checkpoint is saved; `resume` continues an interrupted training from it, to the weights an uninterrupted
    run ends with (same device and threads). Without `resume`, an interrupted training found there is a
    ConfigError rather than lost."""
    model_spec(model)  # a bad name fails before any data is loaded
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"checkpoint path {out} is a directory; give a file name such as {out / 'baseline.pt'}")
    existing = next(p for p in [out.absolute().parent, *out.absolute().parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise ConfigError(f"cannot write checkpoint {out}: {existing} is not a writable folder")
    state = training_state_path(out)
    if state.exists() and not resume:
        done = len(read_training_state(state)["history"])
        raise ConfigError(f"{state} holds an interrupted training of {out} ({done} epochs done): continue it with "
                          "--resume, or delete that file to start again")
    model_kwargs = dict(model_kwargs or {})
    dev = str(select_device(device))
    splits = load_data(data, data_root, heldout_fraction=heldout_fraction, seed=seed, download=download,
                       image_size=image_size)
    threads_used = configure_threads(threads, device=device, image_size=splits.image_size)
    seed_everything(seed)
    try:
        net = create_model(model, num_classes=splits.num_classes, in_channels=splits.in_channels, **model_kwargs)
    except TypeError as exc:
        raise ConfigError(f"model {model!r} does not accept {model_kwargs}: {exc}") from None
    print(f"training {model} on {splits.name} ({len(splits.train)} train / {len(splits.heldout)} held-out / "
          f"{len(splits.test)} test images) for {epochs} epochs on {dev}", flush=True)
    if state.exists():
        print(f"resuming from {state}", flush=True)
    run_key = {"model": model, "model_kwargs": model_kwargs, "data": splits.name, "heldout_fraction": heldout_fraction}
    history = train(net, splits.train, epochs=epochs, device=device, seed=seed, progress=progress,
                    desc=f"baseline {model}", state_file=state, resume=resume, run_key=run_key,
                    **(train_options or {}))
    metrics: dict[str, Any] = {"test_acc": evaluate(net, splits.test, device=device),
                               "train_seconds": sum(r["seconds"] for r in history), "epochs": epochs}
    if len(splits.heldout):
        metrics["heldout_acc"] = evaluate(net, splits.heldout, device=device)
    if history:
        metrics.update(train_loss=history[-1]["loss"], train_acc=history[-1]["acc"])
    config = {"model": model, "data": data, "epochs": epochs, "seed": seed, "heldout_fraction": heldout_fraction,
              "device_used": dev, "threads_used": threads_used, "preprocessing": splits.preprocessing(),
              **(train_options or {}), **(extra_config or {})}
    path = save_checkpoint(out, net, model_name=model, model_kwargs=model_kwargs, num_classes=splits.num_classes,
                           in_channels=splits.in_channels, image_size=splits.image_size, data=splits.name,
                           config=config, metrics=metrics)
    state.unlink(missing_ok=True)  # the checkpoint holds the finished training
    return path, metrics


def training_state_path(checkpoint: str | os.PathLike) -> Path:
    """Where `train_baseline` keeps the state of the training of `checkpoint` until it is saved."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + ".state")


def user_weights(config: SearchConfig) -> tuple[nn.Module, DataSplits] | None:
    """`model.weights` read and checked against the architecture on the config's data, before anything is written
    (the network and its data); None without `model.weights`, or when the checkpoint was imported from the same
    file already (a resumed search)."""
    weights = config.model.weights
    if not weights:
        return None
    path = config.checkpoint_path()
    if path.exists() and (load_checkpoint(path).config or {}).get("weights_sha256") == file_digest(weights):
        return None
    splits = load_splits(config, None)
    model = user_network(weights, model_name=config.model.name, num_classes=splits.num_classes,
                         in_channels=splits.in_channels)
    return model, splits


def ensure_checkpoint(config: SearchConfig, *, progress: bool = True,
                      imported: tuple[nn.Module, DataSplits] | None = None) -> Path:
    """The config's baseline checkpoint: with `model.weights`, those weights written as one (`import_weights`;
    `imported`: `user_weights`' result when already read), measured and printed first; else trained
    (`train_baseline`) when missing and allowed."""
    path = config.checkpoint_path()
    if config.model.weights:
        if path.exists() and not (load_checkpoint(path).config or {}).get("weights_sha256"):
            raise ConfigError(f"model.weights: {path} holds a checkpoint not imported from weights; set "
                              "model.checkpoint to another file to write the imported one")
        imported = imported or user_weights(config)
        if imported is None:  # imported from the same file before
            return path
        model, splits = imported
        _, metrics = import_weights(config.model.weights, path, model=model, model_name=config.model.name,
                                    model_kwargs={}, splits=splits, device=config.search.device)
        held = f", held-out {100 * metrics['heldout_acc']:.2f}%" if "heldout_acc" in metrics else ""
        print(f"your network ({config.model.name}, {config.model.weights}): test accuracy "
              f"{100 * metrics['test_acc']:.2f}%{held} on {splits.name} ({len(splits.test)} test images, inputs "
              f"{splits.in_channels}x{splits.image_size}x{splits.image_size} normalised with mean "
              f"{[round(m, 4) for m in splits.mean]}, std {[round(v, 4) for v in splits.std]}); "
              f"{metrics['macs'] / 1e6:.2f}M MACs, {metrics['params'] / 1e6:.3f}M params, "
              f"{metrics['latency_ms_batch1']:.2f} ms per image on the CPU; written as {path}", flush=True)
        return path
    if path.exists():
        return path
    if not config.model.train_if_missing:
        raise CheckpointError(
            f"model.checkpoint: {path} does not exist; train one with `entropy-search train` or set "
            "model.train_if_missing: true"
        )
    print(f"no checkpoint at {path}: training a baseline {config.model.name} on {config.data.name} "
          f"for {config.model.train_epochs} epochs", flush=True)
    train_baseline(path, model=config.model.name, data=config.data.name, data_root=config.data.root,
                   epochs=config.model.train_epochs, heldout_fraction=config.data.heldout_fraction, seed=config.seed,
                   threads=torch.get_num_threads(), progress=progress, extra_config={"trained_by": "search"},
                   resume=True)  # a search killed while training its baseline continues it
    return path
