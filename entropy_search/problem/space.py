"""The pruning space of a network: its channel groups, and three exact ways to apply a candidate.

Groups come from Torch-Pruning's dependency graph (DepGraph): every conv/BN/linear slice that shares a
channel is pruned together (the residual stream of a ResNet stage, a depthwise conv and its
producer). One group is one step of the RL agent. A candidate is one keep ratio per group; inside a
group the channels kept are the most important ones (L1 norm of the group's weights by default),
ranked once per network.

A candidate can be applied three ways, all computing the same function:

* `masked(keep)`: zero the pruned channels at the output of the last layer that produces them
  (after BN), on the original model object. Costs about one forward of the full network.
* `sliced(keep)`: run the original modules with the kept rows/columns of their weights swapped in,
  so the forward costs what the pruned network costs, without copying or rebuilding anything. This
  is the search's evaluation path.
* `prune(keep)`: a deep copy, physically pruned by Torch-Pruning; for the final candidates.

MACs and parameters of a candidate are analytic: each conv/linear layer's MACs are its output
positions times the number of weights it keeps, recorded once from a forward of the example input.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import os
import signal
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch_pruning as tp
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..errors import EntropySearchError
from .blocks import ResidualBlock, find_blocks, outermost, remove_blocks, removed
from .macs import count_macs

Importance = Callable[[tp.dependency.Group], torch.Tensor]
log = logging.getLogger(__name__)


class _UnsupportedGroup(EntropySearchError):
    """A channel group that cannot be pruned exactly: it stays whole (named in `PruningSpace.fixed_groups`)."""

#: The largest relative difference of two outputs (max |a - b| / max |b|) taken as the same function: float rounding
#: of a different summation order stays near 1e-6; the wrong answers seen were 0.05 and 0.89.
EXACT_TOLERANCE = 1e-4


def output_difference(got: torch.Tensor, expected: torch.Tensor) -> float:
    """max |got - expected| / max |expected| over the finite outputs; inf when the shapes differ or the outputs are
    not finite in the same places (a network that overflows does so on both paths alike)."""
    got, expected = got.float(), expected.float()
    if got.shape != expected.shape or not torch.equal(torch.isfinite(got), torch.isfinite(expected)):
        return float("inf")
    finite = torch.isfinite(expected)
    if not finite.any():
        return 0.0
    scale = expected[finite].abs().max().clamp_min(1e-12)
    return float((got - expected)[finite].abs().max() / scale)


_LAYER_OPS = ("convolution", "addmm", "mm")  # what conv and linear layers run (FlopCounterMode's op names)
_SLICEABLE = (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.LayerNorm)


@dataclass(frozen=True)
class ChannelGroup:
    """Channels pruned together, described by the first layer (in forward order) that produces them."""

    index: int
    name: str
    """Name of the module that roots the group in the dependency graph."""
    channels: int
    layer_type: str
    """'conv', 'depthwise' (the group holds a depthwise conv), 'grouped' (a grouped conv) or 'linear'."""
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    feature_size: int
    """Height of the representative layer's output feature map (1 for linear layers)."""
    macs: int
    """MACs of the layers whose output channels are in this group, at full width."""
    members: tuple[str, ...]
    """Modules whose output channels belong to the group."""
    channels_per_unit: int = 1
    """Channels pruned together as one unit of `channels`: the group count of a grouped convolution in the group
    (its groups keep the same positions, as Torch-Pruning prunes them), 1 otherwise."""
    block: int | None = None
    """The innermost residual block (`PruningSpace.blocks`) that holds the whole group, if any: while it is dropped,
    the group's choice does not matter."""


@dataclass
class _SlicedTensor:
    """A parameter or buffer whose dims are indexed by groups: (dim, group index, channel -> indices map)."""

    module: nn.Module
    name: str
    is_param: bool
    shape: tuple[int, ...]
    dims: list[tuple[int, int, torch.Tensor]] = field(default_factory=list)
    """(dim, group, unit -> indices map); several groups share a dim after a concatenation."""
    fixed: dict[int, torch.Tensor] = field(default_factory=dict)
    """Per sliced dim, the indices no group covers (always kept, e.g. a concatenated input the space does not prune)."""

    def add(self, dim: int, g: int, imap: torch.Tensor) -> None:
        if not any(d == dim and gi == g for d, gi, _ in self.dims):
            self.dims.append((dim, g, imap))

    def seal(self, layer: str) -> None:
        """Record the uncovered indices of every sliced dim (after all groups were added)."""
        for dim in {d for d, _, _ in self.dims}:
            covered = torch.cat([imap.reshape(-1) for d, _, imap in self.dims if d == dim])
            if covered.unique().numel() != covered.numel() or int(covered.max()) >= self.shape[dim]:
                raise EntropySearchError(f"layer {layer}: channel groups overlap in dim {dim} of its {self.name}")
            keep = torch.ones(self.shape[dim], dtype=torch.bool)
            keep[covered] = False
            self.fixed[dim] = keep.nonzero().view(-1)

    def kept_size(self, dim: int, counts: Sequence[int]) -> int:
        return sum(counts[g] * imap.shape[1] for d, g, imap in self.dims if d == dim) + self.fixed[dim].numel()

    def cuts(self, indices: Sequence[torch.Tensor]) -> list[tuple[int, torch.Tensor]]:
        """(dim, kept indices) of every dim this candidate shrinks."""
        return [(dim, index) for dim in self.fixed if (index := self.kept_index(dim, indices)) is not None]

    def kept_index(self, dim: int, indices: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """Kept indices of `dim`, ascending (the pruned layer's order), for the kept units `indices` of every
        group; None when it keeps them all."""
        parts = [(imap, indices[g]) for d, g, imap in self.dims if d == dim]
        if all(kept.numel() == imap.shape[0] for imap, kept in parts):
            return None
        return torch.cat([imap[kept].reshape(-1) for imap, kept in parts] + [self.fixed[dim]]).sort().values


@dataclass
class _ComputeLayer:
    """A conv or linear layer: its MACs are `positions` times the weights it keeps."""

    weight: _SlicedTensor
    positions: int


def l1_importance() -> Importance:
    """L1 norm of each channel's weights, summed over the group (Torch-Pruning's GroupMagnitudeImportance)."""
    return tp.importance.GroupMagnitudeImportance(p=1, group_reduction="mean", normalizer=None)


def l2_importance() -> Importance:
    return tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean", normalizer=None)


IMPORTANCES: dict[str, Callable[[], Importance]] = {"l1": l1_importance, "l2": l2_importance}


class PruningSpace:
    """Channel groups of `model` found once from its dependency graph; candidates applied without surgery."""

    def __init__(
        self,
        model: nn.Module,
        example_input: torch.Tensor,
        *,
        round_to: int = 1,
        importance: str | Importance = "l1",
        ignored_layers: Sequence[nn.Module] | None = None,
        blocks: bool = True,
        max_seconds: float = 600.0,
    ) -> None:
        """`blocks` offers the network's shape-preserving residual blocks as keep-or-drop choices (`blocks.py`);
        `max_seconds` bounds Torch-Pruning's dependency analysis (a clear error instead of a wait without end)."""
        if round_to < 1:
            raise EntropySearchError(f"round_to must be >= 1, got {round_to}")
        self.model = model
        self.example_input = example_input
        self.round_to = int(round_to)
        self._names = {m: n for n, m in model.named_modules()}
        was_training = model.training
        model.eval()
        try:
            order, outputs = self._trace(example_input)
            self.classifier = order[-1] if order else None
            self.classifier_name = self._names[self.classifier] if self.classifier is not None else None
            ignored = list(ignored_layers) if ignored_layers is not None else [self.classifier]
            self._ignored_names = [self._names[m] for m in ignored if m is not None]
            graph, raw = self._dependency_groups(ignored, max_seconds)
            self._graph = graph
            self._shuffles = _channel_mixing_reshapes(graph)
            found_blocks = find_blocks(model, example_input) if blocks else ([], {})
            self._build(graph, raw, order, outputs, importance)
            self._index_blocks(*found_blocks)
            inexact = self._inexact_groups()
            if inexact:  # built again without them: the group indices, MACs and blocks are those of what is left
                self._build(graph, raw, order, outputs, importance, whole=inexact)
                self._index_blocks(*found_blocks)
        finally:
            model.train(was_training)
        self._fixed_macs = 0
        self.base_macs = self.macs([1.0] * len(self.groups))
        self.base_params = self.params([1.0] * len(self.groups))
        self._check_macs_are_tracked()

    # ------------------------------------------------------------------ construction

    def _dependency_groups(self, ignored: list[nn.Module], max_seconds: float):
        """Torch-Pruning's dependency graph and its channel groups; what it cannot analyse is refused with the
        layer named (its own exceptions say nothing a user can act on), and the analysis is bounded in time."""
        deadline = time.monotonic() + max_seconds
        graph, raw = None, []
        try:
            with torch.enable_grad(), warnings.catch_warnings(), _bounded(max_seconds) as bound:
                warnings.filterwarnings("ignore", message="Unwrapped parameters detected")  # handled in _build
                graph = tp.DependencyGraph().build_dependency(self.model, example_inputs=self.example_input, verbose=False)
                for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=[nn.Conv2d, nn.Linear]):
                    raw.append(group)
                    if time.monotonic() > deadline:
                        raise EntropySearchError(
                            f"Torch-Pruning's dependency analysis took longer than {max_seconds:g} s ({len(raw)} channel "
                            f"groups so far, the last rooted at {self._names.get(group.items[0].dep.target.module, '?')}); "
                            "the model is too large or too entangled for a pruning space")
        except _AnalysisTimeout as exc:
            failure = (f"Torch-Pruning's dependency analysis {bound['reason']} (stopped{self._where(exc)}); the model "
                       "is too large or too entangled for a pruning space")
        except EntropySearchError:
            raise
        except Exception as exc:  # noqa: BLE001 - anything inside the analysis becomes one clear refusal
            failure = f"Torch-Pruning cannot follow the channels of this model{self._where(exc)}: {type(exc).__name__}: {exc}"
        else:
            return graph, raw
        # raised outside the handler: the failure's frames hold Torch-Pruning's graph (gigabytes for the models
        # that hit a bound), which a chained exception would keep alive
        raise EntropySearchError(failure)

    def _where(self, exc: BaseException) -> str:
        """' near layer X' for the graph node the analysis failed on (from the traceback), else ''."""
        tb, node = exc.__traceback__, None
        while tb is not None:
            candidate = tb.tb_frame.f_locals.get("node")
            if candidate is not None and hasattr(candidate, "inputs") and hasattr(candidate, "module"):
                node = candidate
            tb = tb.tb_next
        return self._near(node) if node is not None else ""

    def _near(self, node) -> str:
        """' near layer X' for the nearest named layer upstream of a graph node (' (Op after it)' when the node is
        an operation), else ''."""
        seen, queue = set(), [node]
        while queue:
            current = queue.pop(0)
            if id(current) in seen:
                continue
            seen.add(id(current))
            if isinstance(current.module, nn.Module) and current.module in self._names:
                kind = "" if current is node else f" ({type(node.module).__name__.strip('_')} after it)"
                return f" near layer {self._names[current.module]}{kind}"
            queue.extend(current.inputs)
        return ""

    def _check_macs_are_tracked(self) -> None:
        """Analytic MACs count conv and linear layers. Work elsewhere (an attention's matrix products) is added as a
        constant when pruning does not change it (measured on the smallest candidate); otherwise the model is
        refused, naming the layers, rather than track a budget that is not the network's."""
        counted = self._count(None, "PyTorch's FLOP counter cannot count the MACs of this model")
        smallest = [1 / g.channels for g in self.groups]
        counted_smallest = self._count(smallest, "the model does not run with its channels pruned")
        extra = counted - self.base_macs
        if extra == 0:
            return
        extra_smallest = counted_smallest - self.macs(smallest)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            self.model.eval()
            self.model(self.example_input)
        if extra_smallest == extra:
            self._fixed_macs = extra
            self.base_macs = counted
            root = type(self.model).__name__
            flops = counter.get_flop_counts()
            # a block's counted MACs beyond its layers' (`b.macs` so far: its layers only, at full width)
            self._block_extra_macs = [sum(flops.get(f"{root}.{b.name}", {}).values()) // 2 - b.macs for b in self.blocks]
            self.blocks = [replace(b, macs=b.macs + extra_b) for b, extra_b in zip(self.blocks, self._block_extra_macs)]
            return
        untracked: dict[str, list[str]] = {}
        for name, ops in counter.get_flop_counts().items():
            other = sorted(str(op).split(".")[-1] for op in ops if str(op).split(".")[-1] not in _LAYER_OPS)
            if name != "Global" and other:
                untracked[name.partition(".")[2] or "the model itself"] = other
        innermost = [n for n in untracked if not any(o.startswith(n + ".") for o in untracked)]
        what = ", ".join(f"{n} ({', '.join(untracked[n])})" for n in innermost[:3]) or "operations outside any layer"
        raise EntropySearchError(f"{extra / 1e6:.2f}M of the model's {counted / 1e6:.2f}M MACs are outside conv and "
                                 f"linear layers, in {what}, and change with pruning: a budget on them cannot be "
                                 "tracked; this architecture is not supported")

    def _count(self, keep: Sequence[float] | None, failure: str) -> int:
        """MACs counted on the model, sliced to `keep` when given (every group at its smallest width: a forward that
        keeps channel counts in attributes fails there, as the pruned network would: a split at fixed sizes, heads
        reshaped to a fixed width, a scale viewed to a fixed shape, a weight standardised with its stored channel
        count). An exception, there or in PyTorch's FLOP counter, is a refusal naming the layer that raised it."""
        try:
            with self.sliced(keep) if keep is not None else nullcontext():
                return count_macs(self.model, self.example_input)
        except Exception as exc:  # noqa: BLE001 - the model's own error, made one line with the layer named
            message = f"{failure}{self._error_line(exc, 300)}"
        raise EntropySearchError(message)

    def _error_line(self, exc: BaseException, limit: int) -> str:
        """' in layer X: TypeName: first line of the message' (cut to `limit` characters): the model's own error,
        made one line with the layer that raised it named."""
        lines = str(exc).strip().splitlines()
        return f"{self._raised_in(exc)}: {type(exc).__name__}: {lines[0][:limit] if lines else ''}"

    def _raised_in(self, exc: BaseException) -> str:
        """' in layer X' for the innermost module of the model whose code raised `exc` (from the traceback), else ''."""
        tb, name = exc.__traceback__, ""
        while tb is not None:
            module = tb.tb_frame.f_locals.get("self")
            if isinstance(module, nn.Module) and self._names.get(module):
                name = self._names[module]
            tb = tb.tb_next
        return f" in layer {name}" if name else ""

    def _trace(self, x: torch.Tensor) -> tuple[list[nn.Module], dict[nn.Module, list[torch.Size]]]:
        """Forward order of conv/linear layers and the output shapes of every leaf module."""
        order: list[nn.Module] = []
        outputs: dict[nn.Module, list[torch.Size]] = {}

        def hook(module, _inputs, output):
            if isinstance(output, torch.Tensor):
                outputs.setdefault(module, []).append(output.shape)
                if isinstance(module, (nn.Conv2d, nn.Linear)):
                    order.append(module)

        handles = [m.register_forward_hook(hook) for m in self.model.modules() if not list(m.children())]
        try:
            with torch.no_grad():
                self.model(x)
        except Exception as exc:  # the model's own message says what does not fit
            raise EntropySearchError(f"example input of shape {tuple(x.shape)} does not fit the model: {exc}") from None
        finally:
            for h in handles:
                h.remove()
        self._exec_index = {m: i for i, m in enumerate(dict.fromkeys(outputs))}
        return order, outputs

    def _build(self, graph, raw_groups, order, outputs, importance, whole: dict[int, str] | None = None) -> None:
        """The space's groups, sliced tensors, mask points and layers from Torch-Pruning's groups; `whole` maps the
        index of a Torch-Pruning group that stays whole to why (found by `_inexact_groups`)."""
        whole = whole or {}
        imp = IMPORTANCES[importance]() if isinstance(importance, str) and importance in IMPORTANCES else importance
        if isinstance(imp, str) or not callable(imp):
            raise EntropySearchError(f"unknown importance {importance!r}; known: {', '.join(IMPORTANCES)}")
        tensors: dict[tuple[int, str], _SlicedTensor] = {}

        def sliced(module: nn.Module, name: str) -> _SlicedTensor | None:
            t = module._parameters.get(name) if name in module._parameters else module._buffers.get(name)
            if t is None or t.ndim == 0:
                return None
            key = (id(module), name)
            if key not in tensors:
                tensors[key] = _SlicedTensor(module, name, name in module._parameters, tuple(t.shape))
            return tensors[key]

        owners = {p: (m, n) for m in self.model.modules() for n, p in m.named_parameters(recurse=False)
                  if not isinstance(m, _SLICEABLE)}
        dims = {p: dim for p, dim in graph.unwrapped_parameters}
        owners = {p: owner for p, owner in owners.items() if p in dims}
        found = []
        self.fixed_groups: list[str] = []
        for r, group in enumerate(raw_groups):
            try:
                if r in whole:
                    raise _UnsupportedGroup(whole[r])
                analysed = self._analyse_group(graph, group, owners, dims, outputs)
                found.append((*analysed, r, self._score(imp, analysed[1], analysed[2], analysed[4].numel())))
            except _UnsupportedGroup as exc:
                self.fixed_groups.append(f"{self._names.get(group.items[0].dep.target.module, '?')}: {exc}")
        if self.fixed_groups:
            log.warning("%d channel group(s) stay whole (not prunable exactly): %s", len(self.fixed_groups),
                        "; ".join(self.fixed_groups[:3]) + (" ..." if len(self.fixed_groups) > 3 else ""))
        if not found and self.fixed_groups:
            raise EntropySearchError(f"no channel group of this model can be pruned exactly: {self.fixed_groups[0]}")

        found.sort(key=lambda f: f[0])
        self.groups: list[ChannelGroup] = []
        self._order: list[torch.Tensor] = []
        self._rankings: dict[str, list[torch.Tensor]] = {}
        self._tp_groups: list = []  # Torch-Pruning's own group of each channel group, for other importances
        self._units: list[torch.Tensor] = []
        self._roots: list[tuple[str, bool]] = []
        self._group_modules: list[list[nn.Module]] = []
        mask_points: dict[nn.Module, list[tuple[int, torch.Tensor]]] = {}
        self._depthwise: list[nn.Module] = []
        self._raw_index: list[int] = []  # the Torch-Pruning group each channel group is
        layer_norms: list[nn.LayerNorm] = []
        for g, (_, full, root, root_fn, units, producers, consumers, params, r, scores) in enumerate(found):
            self._raw_index.append(r)
            for module, imap in producers:
                for name in ("weight", "bias", "running_mean", "running_var"):
                    t = sliced(module, name)
                    if t is not None:
                        t.add(0, g, imap)
                if isinstance(module, nn.Conv2d) and _is_depthwise(module) and module not in self._depthwise:
                    self._depthwise.append(module)
                if isinstance(module, nn.LayerNorm) and module not in layer_norms:
                    layer_norms.append(module)
            for owner, attr, dim, imap in params:
                sliced(owner, attr).add(dim, g, imap)
            self._group_modules.append([m for m, _ in producers] + [m for m, _ in consumers] + [o for o, _, _, _ in params])
            for module, imap in consumers:
                if isinstance(module, (nn.Conv2d, nn.Linear)):
                    sliced(module, "weight").add(1, g, imap)
            self._order.append(self._rank(scores, units))
            self._tp_groups.append(full)
            self._units.append(units)
            self._roots.append((self._names[root], graph.is_out_channel_pruning_fn(root_fn)))
            imaps = dict(producers)
            for module in self._mask_points(graph, [m for m, _ in producers]):
                mask_points.setdefault(module, []).append((g, imaps[module]))
            self.groups.append(self._describe(g, root, units, producers, outputs))

        self._tensors = list(tensors.values())
        for t in self._tensors:
            t.seal(self._names[t.module])
        self._layer_norms = [(module, tensors[(id(module), "weight")]) for module in layer_norms]
        self._masks = [(module, _channel_dim(module), _out_channels(module), parts) for module, parts in mask_points.items()]
        by_module = {(id(t.module), t.name): t for t in self._tensors}
        self._layers: list[_ComputeLayer] = []
        for module in dict.fromkeys(order):
            weight = by_module.get((id(module), "weight")) or _SlicedTensor(module, "weight", True, tuple(module.weight.shape))
            positions = sum(math.prod(s) // s[1 if isinstance(module, nn.Conv2d) else -1] for s in outputs[module])
            self._layers.append(_ComputeLayer(weight, positions))
        counted = {(id(t.module), t.name) for t in self._tensors if t.is_param}
        self._fixed_params = sum(
            p.numel() for m in self.model.modules() for n, p in m.named_parameters(recurse=False)
            if (id(m), n) not in counted
        )
        self.groups = [replace(group, macs=self._group_macs(group.index)) for group in self.groups]

    def _score(self, imp: Importance, full, root: nn.Module, channels: int) -> torch.Tensor:
        """The importance of each of a group's channels; a group it cannot score stays whole."""
        try:
            scores = imp(full)
        except (IndexError, RuntimeError) as exc:  # Torch-Pruning's indices do not fit a layer (a depthwise
            # conv with a channel multiplier): the group is named, not an exception from inside it
            raise _UnsupportedGroup(f"the importance cannot score it: {type(exc).__name__}: {exc}") from None
        if scores is None or scores.numel() != channels:
            raise _UnsupportedGroup(f"the importance gave no score for its {channels} channels")
        return scores

    def _inexact_groups(self) -> dict[int, str]:
        """The groups that cannot be cut exactly, by the Torch-Pruning group index, each with why: cut to an odd
        count near 60% (with others), the model does not run (its forward keeps a channel count in an attribute:
        a split at fixed sizes, heads reshaped to a fixed width, a scale viewed to a fixed shape), or masking the cut
        channels does not compute what slicing them out does (an operation after the mask mixes channels or turns
        the zeros into something else). Found by halving: one masked and one sliced forward of the example input when every
        group is exact, about 2 log2(groups) more per group that is not; a failure that only a combination of
        groups shows is left to the refusal of `_check_macs_are_tracked` or to the exactness guard."""
        # an odd count near 60%: not one unit, where a layer norm over a single channel makes everything after it
        # constant (and so equal on both paths), and not a multiple of a head count that a reshape would accept
        probe = [(count - 1 + count % 2) / g.channels if (count := int(0.6 * g.channels)) > 1 else 1 / g.channels
                 for g in self.groups]

        def failure(members: Sequence[int]) -> str | None:
            chosen = set(members)
            keep = [probe[g] if g in chosen else 1.0 for g in range(len(self.groups))]
            try:
                with torch.no_grad():
                    with self.sliced(keep) as model:
                        sliced = model(self.example_input)
                    with self.masked(keep) as model:
                        masked = model(self.example_input)
            except Exception as exc:  # noqa: BLE001 - the model's own error, made one line with the layer named
                return f"the model does not run with it pruned{self._error_line(exc, 200)}"
            if not (isinstance(sliced, torch.Tensor) and isinstance(masked, torch.Tensor)):
                return None  # not a tensor output: left to the coverage of what returns one
            difference = output_difference(masked, sliced)
            if difference > EXACT_TOLERANCE / 10:  # a margin: at other counts the same leak can be a little larger
                return (f"masking its pruned channels is not cutting them (relative difference {difference:.2g}): "
                        "an operation after the mask mixes channels or makes the zeros nonzero")
            return None

        inexact: dict[int, str] = {}

        def search(members: list[int]) -> None:
            reason = failure(members)
            if reason is None:
                return
            if len(members) == 1:
                inexact[self._raw_index[members[0]]] = reason
                return
            half = len(members) // 2
            search(members[:half])
            search(members[half:])

        search(list(range(len(self.groups))))
        return inexact

    def _index_blocks(self, blocks: list[ResidualBlock], reasons: dict[str, str]) -> None:
        """Which blocks hold each layer, tensor and group, and what each block holds (MACs, parameters, groups)."""
        modules = dict(self.model.named_modules())
        inside: dict[int, frozenset[int]] = {}
        for b in blocks:
            for m in modules[b.name].modules():
                inside[id(m)] = inside.get(id(m), frozenset()) | {b.index}

        def within(module: nn.Module) -> frozenset[int]:
            return inside.get(id(module), frozenset())

        self._block_reasons = reasons
        self._layer_blocks = [within(layer.weight.module) for layer in self._layers]
        self._tensor_blocks = [within(t.module) for t in self._tensors]
        self._group_blocks = [frozenset.intersection(*(within(m) for m in members)) if members else frozenset()
                              for members in self._group_modules]
        counted = {(id(t.module), t.name) for t in self._tensors if t.is_param}
        self._block_fixed_params = [
            sum(p.numel() for m in modules[b.name].modules() for n, p in m.named_parameters(recurse=False)
                if (id(m), n) not in counted) for b in blocks]
        self._block_extra_macs = [0] * len(blocks)  # MACs outside layers, set by `_check_macs_are_tracked`
        self.blocks = [replace(
            b,
            macs=sum(layer.positions * math.prod(layer.weight.shape)
                     for layer, held in zip(self._layers, self._layer_blocks) if b.index in held),
            params=self._block_fixed_params[b.index] + sum(
                math.prod(t.shape) for t, held in zip(self._tensors, self._tensor_blocks) if t.is_param and b.index in held),
            groups=tuple(g for g, held in enumerate(self._group_blocks) if b.index in held),
        ) for b in blocks]
        self.groups = [replace(group, block=max(held, key=lambda b: len(blocks[b].name)) if held else None)
                       for group, held in zip(self.groups, self._group_blocks)]

    def _analyse_group(self, graph, group, owners, dims, outputs) -> tuple:
        """One Torch-Pruning group as (first execution index, full group, root, root handler, units, producers,
        consumers, parameters); `_UnsupportedGroup` when it holds a layer that cannot be pruned exactly."""
        if self._shuffles:  # the graph has no index mappings (`_update_index_mapping`): only plain chains are exact
            mapped = [dep.target for dep, _ in group.items if dep.target.type in _MAPPED_OPS]
            if mapped:
                shuffle = next((node for node in mapped if node in self._shuffles), self._shuffles[0])
                raise _UnsupportedGroup(
                    f"its channels pass a {type(mapped[0].module).__name__.strip('_')} in a model with a reshape "
                    f"that splits or merges channels (a channel shuffle, attention heads){self._near(shuffle)}, "
                    "which Torch-Pruning cannot map")
        root_dep = group.items[0].dep
        root, root_fn = root_dep.target.module, root_dep.handler
        channels = self._channels_of(graph, root, root_fn)
        full = graph.get_pruning_group(root, root_fn, idxs=list(range(channels)))
        members = []  # (module, is_producer, indices into the module's dim, one row per root channel)
        params = []  # (owner module, attribute, dim, indices): parameters outside layers (layer scales)
        for item in full.items:
            dep, module = item.dep, item.dep.target.module
            if isinstance(module, nn.Parameter) and module in owners:
                dim = dims[module] % module.ndim
                name = ".".join(filter(None, (self._names[owners[module][0]], owners[module][1])))
                params.append((*owners[module], dim, _channel_map(item, channels, module.shape[dim], name)))
                continue
            if not isinstance(module, nn.Module) or module not in self._names:
                continue  # an operation of the graph (add, relu, reshape, concat), nothing to slice
            if isinstance(module, nn.LayerNorm):
                self._check_layer_norm(module, outputs)
            if not isinstance(module, _SLICEABLE):
                if any(True for _ in module.parameters(recurse=False)):
                    raise _UnsupportedGroup(
                        f"layer {self._names[module]} ({type(module).__name__}) shares pruned channels "
                        "but is not supported (conv, linear, batch and layer norms are)"
                    )
                continue
            is_out = graph.is_out_channel_pruning_fn(dep.handler)
            members.append((module, is_out, _channel_map(item, channels, _dim_size(module, is_out), self._names[module])))
        units = self._units_of(channels, members)
        producers, consumers = [], []
        for module, is_producer, imap in members:
            per_unit = imap[units].reshape(units.shape[0], -1)  # unit -> the module's indices
            if is_producer:
                producers.append((module, per_unit))
            elif isinstance(module, nn.Conv2d) and module.groups > 1:
                if not _is_depthwise(module):  # a grouped conv's weight holds in_channels / groups inputs
                    width = module.in_channels // module.groups
                    relative = (imap[units] % width).view(units.shape[0], units.shape[1], -1)
                    if not torch.equal(relative, relative[:, :1, :].expand_as(relative)):
                        raise _UnsupportedGroup(f"grouped conv {self._names[module]}: its groups would keep "
                                                "different positions")
                    consumers.append((module, relative[:, 0, :]))
            else:
                consumers.append((module, per_unit))
        first = min((m for m, _ in producers), key=lambda m: self._exec_index.get(m, 1 << 30), default=None)
        params = [(owner, attr, dim, imap[units].reshape(units.shape[0], -1)) for owner, attr, dim, imap in params]
        return self._exec_index.get(first, 1 << 30), full, root, root_fn, units, producers, consumers, params

    def _check_layer_norm(self, module: nn.LayerNorm, outputs) -> None:
        """A layer norm over one channel dim, with weights (what Torch-Pruning prunes exactly)."""
        name = self._names[module]
        if len(module.normalized_shape) != 1 or not module.elementwise_affine:
            raise _UnsupportedGroup(f"layer {name} (LayerNorm over {tuple(module.normalized_shape)}"
                                     f"{'' if module.elementwise_affine else ', no weights'}) is not supported: "
                                     "only a layer norm with weights over the channel dim is")
        channels = module.normalized_shape[0]
        if type(module).forward is not nn.LayerNorm.forward:  # a channels-first variant (torchvision's LayerNorm2d)
            shape = outputs[module][0]
            if len(shape) < 2 or shape[1] != channels:
                raise _UnsupportedGroup(f"layer {name} ({type(module).__name__}): cannot tell which dim holds its "
                                         f"{channels} channels (output {tuple(shape)})")

    def _units_of(self, channels: int, members) -> torch.Tensor:
        """Root channels per unit of the group, [units, channels_per_unit]: one channel per unit, except where a
        grouped convolution takes part: its groups must keep the same positions (Torch-Pruning's rule), so a
        unit is one position in every group of that conv."""
        grouped = [(m, p, imap) for m, p, imap in members
                   if isinstance(m, nn.Conv2d) and m.groups > 1 and not _is_depthwise(m)]
        if not grouped:
            return torch.arange(channels).view(channels, 1)
        module, is_producer, imap = grouped[0]
        n_groups = module.groups
        for other, _, _ in grouped[1:]:
            if other.groups != n_groups:
                raise _UnsupportedGroup(
                    f"grouped convs {self._names[module]} ({n_groups} groups) and {self._names[other]} "
                    f"({other.groups} groups) share channels: not supported")
        size = module.out_channels if is_producer else module.in_channels
        if imap.shape[1] != 1 or channels != size:
            raise _UnsupportedGroup(f"grouped conv {self._names[module]} shares channels with a concatenation or "
                                     "a reshape: not supported")
        width = size // n_groups
        index = imap[:, 0]
        order = torch.argsort((index % width) * n_groups + index // width, stable=True)
        return order.view(width, n_groups)

    @staticmethod
    def _channels_of(graph, module: nn.Module, fn) -> int:
        pruner = graph.get_pruner_of_module(module)
        if graph.is_out_channel_pruning_fn(fn):
            return pruner.get_out_channels(module)
        return pruner.get_in_channels(module)

    def _mask_points(self, graph, producers: list[nn.Module]) -> list[nn.Module]:
        """Where pruned channels are zeroed: BN outputs, and conv/linear outputs not normalised by a BN."""
        members = set(producers)
        points = []
        for module in producers:
            if isinstance(module, nn.LayerNorm):
                continue  # recomputed over the kept channels in `masked`, which zeroes the others
            if not isinstance(module, nn.modules.batchnorm._BatchNorm):
                nexts = graph.module2node[module].outputs
                if len(nexts) == 1 and isinstance(nexts[0].module, nn.modules.batchnorm._BatchNorm) and nexts[0].module in members:
                    continue
            points.append(module)
        return points

    def _describe(self, g: int, root, units: torch.Tensor, producers, outputs) -> ChannelGroup:
        computing = [m for m, _ in producers if isinstance(m, (nn.Conv2d, nn.Linear))]
        rep = min(computing, key=lambda m: self._exec_index.get(m, 1 << 30)) if computing else root
        channels, per_unit = units.shape
        if isinstance(rep, nn.Conv2d):
            shape = outputs[rep][0]
            convs = [m for m in computing if isinstance(m, nn.Conv2d)]
            kind = ("depthwise" if any(_is_depthwise(m) for m in convs) else
                    "grouped" if any(m.groups > 1 for m in convs) else "conv")
            cin, cout, kernel, stride, size = rep.in_channels, rep.out_channels, rep.kernel_size[0], rep.stride[0], shape[-2]
        else:
            kind, kernel, stride, size = "linear", 1, 1, 1
            cin, cout = getattr(rep, "in_features", channels), getattr(rep, "out_features", channels)
        members = tuple(self._names[m] for m, _ in producers)
        return ChannelGroup(g, self._names[root], channels, kind, cin, cout, kernel, stride, size, 0, members, per_unit)

    def _group_macs(self, g: int) -> int:
        return sum(layer.positions * math.prod(layer.weight.shape) for layer in self._layers
                   if any(d == 0 and gi == g for d, gi, _ in layer.weight.dims))

    # ------------------------------------------------------------------ candidates

    def check_keep(self, keep: Sequence[float]) -> list[float]:
        """Validate a candidate: one finite ratio in (0, 1] per group."""
        try:
            values = [float(k) for k in keep]
        except (TypeError, ValueError):
            raise EntropySearchError(f"keep ratios must be numbers, got {keep!r}") from None
        if len(values) != len(self.groups):
            raise EntropySearchError(f"expected {len(self.groups)} keep ratios (one per channel group), got {len(values)}")
        for i, k in enumerate(values):
            if not (0.0 < k <= 1.0) or math.isnan(k):
                raise EntropySearchError(f"keep ratio of group {i} must be in (0, 1], got {k}")
        return values

    def kept_channels(self, keep: Sequence[float]) -> list[int]:
        """Channels kept per group: keep x channels rounded to the nearest multiple of `round_to`, at least one."""
        return [self.round_count(k, g.channels) for k, g in zip(self.check_keep(keep), self.groups)]

    def round_count(self, keep: float, channels: int) -> int:
        """Channels a group of `channels` keeps at ratio `keep`: the one rounding rule of the space."""
        return int(self.round_counts(keep, np.int64(channels)))

    def round_counts(self, keep: float | np.ndarray, channels: np.ndarray) -> np.ndarray:
        """`round_count` for arrays (one ratio for many groups, or one per group): keep x channels rounded to
        the nearest multiple of `round_to`, at least one multiple (or the whole group when smaller), at most all."""
        m = self.round_to
        kept = np.floor(np.asarray(keep, dtype=np.float64) * channels / m + 0.5).astype(np.int64) * m
        return np.minimum(np.maximum(kept, np.maximum(np.minimum(m, channels), 1)), channels)

    def counts_to_keep(self, counts: Sequence[int]) -> list[float]:
        """Keep ratios that round to exactly these channel counts."""
        return [c / g.channels for c, g in zip(counts, self.groups)]

    @staticmethod
    def _rank(scores: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        """A group's units from the most to the least important (a unit scores its channels' mean; ties keep
        the lower index first)."""
        return torch.argsort(scores.detach().float().cpu()[units].mean(1), descending=True, stable=True)

    def add_ranking(self, name: str, importance: Importance) -> None:
        """Rank every group's channels by another Torch-Pruning importance, under `name`: a candidate given
        `ranking=name` keeps the channels this importance ranks first instead of the space's own. An importance
        that reads gradients (Taylor) reads those the model's parameters hold now."""
        order = []
        for g, full in enumerate(self._tp_groups):
            scores = importance(full)
            if scores is None or scores.numel() != self._units[g].numel():
                raise EntropySearchError(f"importance {name} gave no score for the channels of group {self.groups[g].name}")
            order.append(self._rank(scores, self._units[g]))
        self._rankings[name] = order

    def ranking(self, name: str) -> list[torch.Tensor]:
        """The channel order of ranking `name` (`add_ranking`), per group, most important unit first: what
        `set_ranking` gives another space of the same network (a Ray worker's)."""
        return [order.clone() for order in self._ordering(name)]

    def set_ranking(self, name: str, order: Sequence[torch.Tensor]) -> None:
        """Install a ranking another space of the same network computed (`ranking`), under `name`."""
        if len(order) != len(self.groups) or any(o.numel() != u.shape[0] for o, u in zip(order, self._units)):
            raise EntropySearchError(f"ranking {name} does not fit this space's {len(self.groups)} channel groups")
        self._rankings[name] = [o.clone() for o in order]

    @property
    def ignored_layers(self) -> list[str]:
        """Names of the layers the space leaves whole (the classifier, unless told otherwise)."""
        return list(self._ignored_names)

    def counts_of(self, model: nn.Module) -> list[int]:
        """Channels (units) each group keeps in `model`, a network of this architecture pruned elsewhere (by
        Torch-Pruning's own pruners): the channels of each group's root layer."""
        modules = dict(model.named_modules())
        counts = []
        for g, (name, is_out) in enumerate(self._roots):
            layer = modules[name]
            if isinstance(layer, nn.Linear):
                channels = layer.out_features if is_out else layer.in_features
            else:
                channels = layer.out_channels if is_out else layer.in_channels
            counts.append(channels // self.groups[g].channels_per_unit)
        return counts

    def _ordering(self, ranking: str | None) -> list[torch.Tensor]:
        if ranking is None:
            return self._order
        if ranking not in self._rankings:
            raise EntropySearchError(f"unknown ranking {ranking!r}; this space has: {', '.join(self._rankings) or 'none'}")
        return self._rankings[ranking]

    def kept_indices(self, keep: Sequence[float], ranking: str | None = None) -> list[torch.Tensor]:
        """Indices of the channels kept in each group (the most important ones by the space's importance, or by
        the ranking `add_ranking` named), ascending."""
        order = self._ordering(ranking)
        return [order[g][:k].sort().values for g, k in enumerate(self.kept_channels(keep))]

    def macs(self, keep: Sequence[float], dropped: Collection[int | str] = ()) -> int:
        """MACs of the candidate on `example_input`, equal to a counter's on the pruned model."""
        return self.macs_of_counts(self.kept_channels(keep), self.check_dropped(dropped))

    def macs_of_counts(self, counts: Sequence[int], dropped: frozenset[int] = frozenset()) -> int:
        """MACs from channel counts per group and the indices of the dropped blocks (no rounding, no validation:
        the inner loop of budget clipping)."""
        if not dropped:
            return self._fixed_macs + sum(layer.positions * self._kept_numel(layer.weight, counts) for layer in self._layers)
        return (self._fixed_macs - sum(self._block_extra_macs[b] for b in self.outermost_blocks(dropped))
                + sum(layer.positions * self._kept_numel(layer.weight, counts)
                      for layer, held in zip(self._layers, self._layer_blocks) if not held & dropped))

    def params(self, keep: Sequence[float], dropped: Collection[int | str] = ()) -> int:
        """Parameters of the pruned model, equal to `count_params(space.prune(keep, dropped=dropped))`."""
        return self.params_of_counts(self.kept_channels(keep), self.check_dropped(dropped))

    def params_of_counts(self, counts: Sequence[int], dropped: frozenset[int] = frozenset()) -> int:
        """Parameters from channel counts per group and the indices of the dropped blocks (no rounding, no
        validation)."""
        return (self._fixed_params - sum(self._block_fixed_params[b] for b in self.outermost_blocks(dropped))
                + sum(self._kept_numel(t, counts) for t, held in zip(self._tensors, self._tensor_blocks)
                      if t.is_param and not held & dropped))

    # ------------------------------------------------------------------ blocks

    def check_dropped(self, dropped: Collection[int | str]) -> frozenset[int]:
        """Validate the blocks a candidate drops, given by index into `blocks` or by module name: a module that is
        not an offered block is refused, saying why."""
        by_name = {b.name: b.index for b in self.blocks}
        out = set()
        for item in dropped:
            if isinstance(item, str):
                if item not in by_name:
                    raise EntropySearchError(f"cannot drop {item}: {self._not_a_block(item)}")
                out.add(by_name[item])
            elif isinstance(item, (int, np.integer)) and not isinstance(item, bool) and 0 <= item < len(self.blocks):
                out.add(int(item))
            else:
                raise EntropySearchError(f"a dropped block is a block name or an index below {len(self.blocks)} "
                                         f"(this space offers {len(self.blocks)} blocks), got {item!r}")
        return frozenset(out)

    def _not_a_block(self, name: str) -> str:
        if name in self._block_reasons:
            return f"{name} {self._block_reasons[name]}"
        if name not in self._names.values():
            return f"the model has no module named {name!r}"
        if not self.blocks and not self._block_reasons:
            return "this space does not offer blocks"
        return f"{name} is not a block this space offers (it does not run once on one tensor)"

    def dropped_names(self, dropped: Collection[int | str]) -> list[str]:
        """Module names of the dropped blocks, in forward order."""
        return [self.blocks[b].name for b in sorted(self.check_dropped(dropped))]

    def idle_groups(self, dropped: Collection[int | str]) -> list[int]:
        """Channel groups that lie wholly inside a dropped block: their choices do not change the network."""
        dropped = self.check_dropped(dropped)
        return [g for g, held in enumerate(self._group_blocks) if held & dropped]

    def outermost_blocks(self, dropped: frozenset[int]) -> list[int]:
        """The dropped blocks no other dropped block contains (what a nested drop removes is counted once)."""
        index = {self.blocks[b].name: b for b in dropped}
        return [index[name] for name in outermost(index)]

    @staticmethod
    def _kept_numel(t: _SlicedTensor, counts: Sequence[int]) -> int:
        shape = list(t.shape)
        for dim in t.fixed:
            shape[dim] = t.kept_size(dim, counts)
        return math.prod(shape)

    # ------------------------------------------------------------------ applying a candidate

    def check_input(self, x: torch.Tensor) -> None:
        """An input batch must have the example input's channels and size."""
        expected = tuple(self.example_input.shape[1:])
        if x.ndim != self.example_input.ndim or tuple(x.shape[1:]) != expected:
            raise EntropySearchError(f"input of shape {tuple(x.shape)} does not match the model's input [N, {', '.join(map(str, expected))}]")

    @contextmanager
    def masked(self, keep: Sequence[float], ranking: str | None = None,
               dropped: Collection[int | str] = ()) -> Iterator[nn.Module]:
        """Within the block, `self.model` computes what `self.prune(keep, ranking, dropped)` computes (pruned
        channels zeroed, dropped blocks replaced by the identity)."""
        indices = self.kept_indices(keep, ranking)
        names = self.dropped_names(dropped)
        handles = []
        hooked, masks = [], []
        for module, dim, channels, parts in self._masks:  # built on the CPU, moved in one transfer (see `sliced`)
            dropped = [imap[_complement(indices[g], imap.shape[0])].reshape(-1) for g, imap in parts
                       if indices[g].numel() != imap.shape[0]]
            if dropped:
                mask = torch.ones(channels)
                mask[torch.cat(dropped)] = 0
                hooked.append((module, dim))
                masks.append(mask)
        norms = [(module, kept) for module, weight in self._layer_norms
                 if (kept := weight.kept_index(0, indices)) is not None]
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        for (module, dim), mask in zip(hooked, _to_devices(masks, [device] * len(masks))):
            handles.append(module.register_forward_hook(_mask_hook(mask, dim)))
        for (module, _), kept in zip(norms, _to_devices([k for _, k in norms], [device] * len(norms))):
            handles.append(module.register_forward_hook(_layer_norm_hook(kept, _channel_dim(module))))
        try:
            with removed(self.model, names):
                yield self.model
        finally:
            for h in handles:
                h.remove()

    @contextmanager
    def sliced(self, keep: Sequence[float], ranking: str | None = None,
               dropped: Collection[int | str] = ()) -> Iterator[nn.Module]:
        """Within the block, `self.model` runs with only the kept channels' weights and without the dropped blocks:
        the pruned network's function at the pruned network's cost, with no copy and no graph rebuild. Inference
        only."""
        indices = self.kept_indices(keep, ranking)
        names = self.dropped_names(dropped)
        saved = []
        # Every index this candidate needs, built on the CPU and moved in one transfer per device: one
        # small synchronous copy per layer would make the host wait for the GPU before every slice.
        wanted = [(t, dim, index) for t in self._tensors for dim, index in t.cuts(indices)]
        devices = [_stored(t).device for t, _, _ in wanted]
        moved = _to_devices([index for _, _, index in wanted], devices)
        by_tensor: dict[int, list[tuple[int, torch.Tensor]]] = {}
        for (t, dim, _), index in zip(wanted, moved):
            by_tensor.setdefault(id(t), []).append((dim, index))
        try:
            with torch.no_grad():
                for t in self._tensors:
                    cuts = by_tensor.get(id(t))
                    if not cuts:
                        continue
                    store = t.module._parameters if t.is_param else t.module._buffers
                    original = value = store[t.name]
                    for dim, index in cuts:
                        value = value.index_select(dim, index)
                    saved.append((store, t.name, original))
                    store[t.name] = value
                for module in self._depthwise:
                    saved.append((module.__dict__, "groups", module.groups))
                    module.groups = int(module.weight.shape[0])
                for module, _ in self._layer_norms:
                    saved.append((module.__dict__, "normalized_shape", module.normalized_shape))
                    module.normalized_shape = (int(module.weight.shape[0]),)
            with removed(self.model, names):
                yield self.model
        finally:
            for store, name, original in reversed(saved):
                store[name] = original

    def prune(self, keep: Sequence[float], ranking: str | None = None, dropped: Collection[int | str] = ()) -> nn.Module:
        """A physically pruned deep copy (Torch-Pruning removes the channels, on the whole network; the dropped
        blocks are then removed, replaced by the identity); the original is untouched."""
        indices = self.kept_indices(keep, ranking)
        names = self.dropped_names(dropped)
        model = copy.deepcopy(self.model)
        modules = dict(model.named_modules())
        was_training = model.training
        model.eval()
        device = next(itertools.chain(model.parameters(), model.buffers()), self.example_input).device
        with torch.enable_grad():  # traced where the network lives (an evaluator may have moved it to a GPU)
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=self.example_input.to(device),
                                                          verbose=False)
        for g, kept in enumerate(indices):
            channels = self.groups[g].channels
            if kept.numel() == channels:
                continue
            drop = sorted(self._units[g][_complement(kept, channels)].reshape(-1).tolist())
            name, is_out = self._roots[g]
            root = modules[name]
            pruner = graph.get_pruner_of_module(root)
            fn = pruner.prune_out_channels if is_out else pruner.prune_in_channels
            graph.get_pruning_group(root, fn, idxs=drop).prune()
        self._copy_kept_values(indices, modules)
        remove_blocks(model, names)
        model.train(was_training)
        return model

    def _copy_kept_values(self, indices: list[torch.Tensor], pruned: dict[str, nn.Module]) -> None:
        """Torch-Pruning does the surgery (shapes, channel counts, groups); the values come from this space's own
        indices, so the pruned network computes what `sliced` computes. (Torch-Pruning 1.6.1 keeps a layer norm's
        channels in set order, not sorted: ConvNeXt's pruned layer norms had their biases permuted.)"""
        with torch.no_grad():
            for t in self._tensors:
                value = _stored(t)
                for dim, index in t.cuts(indices):
                    value = value.index_select(dim, index.to(value.device))
                name = self._names[t.module]
                target = getattr(pruned[name], t.name)
                if tuple(target.shape) != tuple(value.shape):
                    raise EntropySearchError(f"Torch-Pruning pruned {name}.{t.name} to {tuple(target.shape)}, "
                                             f"this space expects {tuple(value.shape)}")
                target.copy_(value)

    def classifier_input_indices(self, keep: Sequence[float], ranking: str | None = None) -> torch.Tensor | None:
        """Which input features of the classifier (the last conv/linear layer) a candidate keeps, ascending, as
        indices into the unpruned network's features; None when it keeps them all. The sliced and pruned
        networks feed the classifier exactly these features, in this order."""
        if self.classifier is None:
            return None
        weight = next((t for t in self._tensors if t.module is self.classifier and t.name == "weight"), None)
        if weight is None:
            return None
        return weight.kept_index(1, self.kept_indices(keep, ranking)) if 1 in weight.fixed else None

    def kept_by_module(self, keep: Sequence[float], ranking: str | None = None) -> dict[str, torch.Tensor]:
        """Kept channel indices of every module that produces a group's channels (for measuring only kept maps)."""
        indices = self.kept_indices(keep, ranking)
        out = {}
        for t in self._tensors:
            if t.name in ("weight", "running_mean") and 0 in t.fixed and self._names[t.module] not in out:
                index = t.kept_index(0, indices)
                out[self._names[t.module]] = torch.arange(t.shape[0]) if index is None else index
        return out

    def describe(self) -> str:
        lines = [f"{len(self.groups)} channel groups, {self.base_macs / 1e6:.2f}M MACs, {self.base_params / 1e6:.3f}M params"]
        for g in self.groups:
            width = f"{g.channels:5d} ch" if g.channels_per_unit == 1 else f"{g.channels:5d} x {g.channels_per_unit} ch"
            lines.append(f"  [{g.index:2d}] {g.name:<28} {g.layer_type:<9} {width}  {100 * g.macs / self.base_macs:5.1f}% MACs")
        lines += [f"  stays whole: {reason}" for reason in self.fixed_groups]
        if self.blocks:
            lines.append(f"{len(self.blocks)} residual blocks that may be dropped:")
            lines += [f"  [{b.index:2d}] {b.name:<28} {'x'.join(map(str, b.shape)):<12} {100 * b.macs / self.base_macs:5.1f}% MACs"
                      f"  groups {', '.join(map(str, b.groups)) or '-'}" for b in self.blocks]
        return "\n".join(lines)


def _to_devices(tensors: list[torch.Tensor], devices: list[torch.device]) -> list[torch.Tensor]:
    """`tensors` (on the CPU) moved to `devices`, with one pinned, non-blocking copy per accelerator."""
    out: list[torch.Tensor | None] = [t if d.type == "cpu" else None for t, d in zip(tensors, devices)]
    for device in dict.fromkeys(d for d in devices if d.type != "cpu"):
        picks = [i for i, d in enumerate(devices) if d == device]
        flat = torch.cat([tensors[i].reshape(-1) for i in picks])
        flat = flat.pin_memory() if torch.cuda.is_available() else flat
        moved = flat.to(device, non_blocking=True).split([tensors[i].numel() for i in picks])
        for i, part in zip(picks, moved):
            out[i] = part.view(tensors[i].shape)
    return out


class _AnalysisTimeout(BaseException):
    """Raised by the alarm of `_bounded` inside Torch-Pruning's analysis (BaseException: no library handler
    swallows it)."""


def _resident_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


@contextmanager
def _bounded(seconds: float, memory_share: float = 0.5) -> Iterator[dict]:
    """Interrupt the block with `_AnalysisTimeout` after `seconds`, or once the process has grown by more than
    `memory_share` of the memory available when it started (Torch-Pruning's shape inference grows without bound
    on some attention models). Checked by SIGALRM every half second, so only in the main thread, where signals
    are delivered; elsewhere the block runs unbounded (the group loop still checks its deadline). Yields a dict
    whose "reason" says which bound stopped it."""
    state: dict = {"reason": None}
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield state
        return
    start, base, available = time.monotonic(), _resident_bytes(), _available_bytes()
    limit = base + memory_share * available if base is not None and available is not None else None
    outer, _ = signal.getitimer(signal.ITIMER_REAL)  # someone else's alarm (pytest-timeout) still goes off
    outer_deadline = start + outer if outer > 0 else None

    def check(signum, frame):
        if outer_deadline is not None and time.monotonic() >= outer_deadline and callable(previous):
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            previous(signum, frame)
            return
        if time.monotonic() - start > seconds:
            state["reason"] = f"took longer than {seconds:g} s"
            raise _AnalysisTimeout()
        resident = _resident_bytes() if limit is not None else None
        if resident is not None and resident > limit:
            state["reason"] = f"grew past {(resident - base) / 2**30:.1f} GB"
            raise _AnalysisTimeout()

    previous = signal.signal(signal.SIGALRM, check)
    signal.setitimer(signal.ITIMER_REAL, 0.5, 0.5)
    try:
        yield state
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_deadline is not None:
            signal.setitimer(signal.ITIMER_REAL, max(1e-3, outer_deadline - time.monotonic()))


# Operations whose index mappings Torch-Pruning derives from its channel-count inference
_MAPPED_OPS = (tp.ops.OPTYPE.CONCAT, tp.ops.OPTYPE.SPLIT, tp.ops.OPTYPE.RESHAPE, tp.ops.OPTYPE.SLICE,
               tp.ops.OPTYPE.UNBIND, tp.ops.OPTYPE.EXPAND)


def _channel_mixing_reshapes(graph: tp.DependencyGraph) -> list:
    """Reshape nodes between tensors of four or more dims that change the dim holding the channels of the nearest
    layer upstream (`_channel_dim`: 1 after a conv or batch norm, the last after a linear layer): they split or
    merge channels, as a channel shuffle's view/transpose/view does ([N, C, H, W] -> [N, 2, C/2, H, W] and back).
    Sizes come from the autograd node (input sizes saved, output size in its metadata); a reshape whose sizes it
    does not expose is left to Torch-Pruning."""
    found = []
    for node in graph.module2node.values():
        if node.type != tp.ops.OPTYPE.RESHAPE:
            continue
        try:
            before = tuple(node.grad_fn._saved_self_sym_sizes)
            after = tuple(node.grad_fn._input_metadata[0].shape)
        except (AttributeError, IndexError, TypeError):
            continue
        if len(before) >= 4 and len(after) >= 4:
            layer = _layer_upstream(graph, node)
            dim = _channel_dim(layer) if layer is not None else 1
            if before[dim] != after[dim]:
                found.append(node)
    return found


def _layer_upstream(graph: tp.DependencyGraph, node) -> nn.Module | None:
    """The nearest conv, linear or norm layer upstream of a graph node (breadth first), None when there is none."""
    seen, queue = set(), list(node.inputs)
    while queue:
        current = queue.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current.module, _SLICEABLE):
            return current.module
        queue.extend(current.inputs)
    return None


_tp_update_index_mapping = tp.dependency.index_mapping.update_index_mapping
_mapped_shapes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # graph -> parameter shapes last mapped


def _update_index_mapping(graph: tp.DependencyGraph) -> None:
    """Torch-Pruning's index-mapping update (at the end of every graph build and before every group it forms), left
    out in a graph with a channel-mixing reshape: its channel-count inference follows channels through such a
    reshape as if it kept them, which gives wrong offsets to the concatenations and splits around it (ShuffleNet
    v2: a ZeroDivisionError, an IndexError or silently wrong channels; MaxViT's attention heads: an inference that
    does not finish). Left out, every concat, split and reshape keeps Torch-Pruning's identity mapping, and
    `PruningSpace` keeps every group that meets one of them whole.

    The mappings depend on the graph and its channel counts only, so the update runs again only once a parameter
    changed shape (a pruning): Torch-Pruning redoes it before every group, recursively through every concat
    (24 of DenseNet-169's 25 s of analysis at 64x64)."""
    shapes = tuple(tuple(p.shape) for p in graph.model.parameters())
    if _mapped_shapes.get(graph) == shapes:
        return
    if not _channel_mixing_reshapes(graph):
        _tp_update_index_mapping(graph)
    _mapped_shapes[graph] = shapes


# Installed once, for every graph (Torch-Pruning calls the module's function by name, from `build_dependency` and
# `get_pruning_group`); a graph without a channel-mixing reshape gets Torch-Pruning's own update, unchanged.
tp.dependency.index_mapping.update_index_mapping = _update_index_mapping


def _channel_map(item, channels: int, size: int, name: str) -> torch.Tensor:
    """[channels, k]: row r holds the indices (of a member's dim of `size`) that the group's channel r maps to.
    Torch-Pruning lists a member's indices in the order its mappings produce them, with the group channel of each
    (`root_idxs`): a concatenation that takes the same channels twice lists one block after the other (DLA's roots,
    where row r must be [r, r + C], not [2r, 2r + 1]). An index list that is not k consecutive indices per channel,
    in channel order, or one that points past the dim (a mapping Torch-Pruning got wrong), keeps the group whole."""
    idx = torch.as_tensor([int(i) for i in item.idxs], dtype=torch.long)
    if idx.numel() == 0 or idx.numel() % channels:
        raise _UnsupportedGroup(f"cannot map channels of {name} to its group")
    if int(idx.min()) < 0 or int(idx.max()) >= size:
        raise _UnsupportedGroup(f"Torch-Pruning maps the group to index {int(idx.max())} of {name}, which has {size} "
                                "channels")
    roots = getattr(item, "root_idxs", None)
    per = idx.numel() // channels
    if roots is None or any(r != j // per for j, r in enumerate(roots)):
        raise _UnsupportedGroup(f"Torch-Pruning lists the channels of {name} out of the group's order (a "
                                "concatenation or repeat that takes them more than once)")
    return idx.view(channels, per)


def _dim_size(module: nn.Module, is_out: bool) -> int:
    """Size of the dim of a sliceable layer that a group prunes (its output channels, or its inputs)."""
    if isinstance(module, nn.Linear):
        return module.out_features if is_out else module.in_features
    if isinstance(module, nn.Conv2d):
        return module.out_channels if is_out else module.in_channels
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[0]
    return module.num_features  # a batch norm


def _is_depthwise(module: nn.Conv2d) -> bool:
    return module.groups > 1 and module.groups == module.in_channels == module.out_channels


def _complement(kept: torch.Tensor, n: int) -> torch.Tensor:
    """Indices in range(n) not in `kept`."""
    mask = torch.ones(n, dtype=torch.bool)
    mask[kept] = False
    return mask.nonzero().view(-1)


def _channel_dim(module: nn.Module) -> int:
    """Where a layer's output keeps its channels: last for linear layers and layer norms (channels-last blocks),
    1 otherwise (and for a channels-first layer norm such as torchvision's LayerNorm2d)."""
    if isinstance(module, nn.Linear):
        return -1
    if isinstance(module, nn.LayerNorm):
        return -1 if type(module).forward is nn.LayerNorm.forward else 1
    return 1


def _layer_norm_hook(kept: torch.Tensor, dim: int):
    """Replace a layer norm's output by the norm over the kept channels only (what the pruned layer computes),
    zero elsewhere: masking its input alone would still count the pruned channels in its mean and variance."""

    def hook(module: nn.LayerNorm, inputs, output: torch.Tensor) -> torch.Tensor:
        x = inputs[0].movedim(dim, -1)
        y = nn.functional.layer_norm(x.index_select(-1, kept), (kept.numel(),), module.weight[kept],
                                     module.bias[kept] if module.bias is not None else None, module.eps)
        out = torch.zeros_like(x).index_copy(-1, kept, y.to(x.dtype))
        return out.movedim(-1, dim)

    return hook


def _out_channels(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.num_features
    return module.out_channels


def _stored(t: _SlicedTensor) -> torch.Tensor:
    return (t.module._parameters if t.is_param else t.module._buffers)[t.name]


def _mask_hook(base: torch.Tensor, dim: int):
    """Multiply a layer's output by a 0/1 channel mask (`base`, one entry per channel of `dim`, on the model's
    device)."""
    cache: dict[tuple, torch.Tensor] = {}
    channels = base.numel()

    def hook(_module, _inputs, output: torch.Tensor) -> torch.Tensor:
        key = (output.device, output.dtype, output.ndim)
        mask = cache.get(key)
        if mask is None:
            mask = base.to(device=output.device, dtype=output.dtype)
            shape = [1] * output.ndim
            shape[dim] = channels
            mask = mask.view(shape)
            cache[key] = mask
        if output.requires_grad:
            return output * mask
        return output.mul_(mask)

    return hook
