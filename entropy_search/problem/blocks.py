"""Residual blocks a search may drop: depth as a choice next to the channel groups.

A block is a module whose output has its input's shape and is its input plus a branch, `x + f(x)`, possibly
through one elementwise activation (`relu(x + f(x))`, as ResNet's basic and bottleneck blocks end). Blocks are
found from the autograd graph of one forward of the example input, never from names: the add that ends the
module must take the module's own input, unchanged, as an operand (an identity shortcut). A block whose shortcut
projects or whose output changes shape (a stage's first block) is never offered, and asking for it names why.

Dropping a block means the block computes the identity: its module is replaced by `nn.Identity` in its parent, so
the dropped branch is not run at all (the sliced path's cost is the shallower network's) and the physically
pruned network does not hold it. The replacement is checked once: a block that its model still reaches another
way (a second reference the forward calls) is not offered.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import EntropySearchError

# Autograd nodes of elementwise activations a block may end with after its add (ReLU, ReLU6 = hardtanh, GELU,
# SiLU, hardswish, leaky ReLU, ELU)
_ELEMENTWISE_ENDS = ("ReluBackward", "HardtanhBackward", "GeluBackward", "SiluBackward", "HardswishBackward",
                     "LeakyReluBackward", "EluBackward")
_ADD_NODES = ("AddBackward",)


@dataclass(frozen=True)
class ResidualBlock:
    """A shape-preserving residual block of a network: one keep-or-drop choice of the search."""

    index: int
    name: str
    """The block's module name in the network."""
    shape: tuple[int, ...]
    """Its input's (and output's) shape for one sample."""
    macs: int = 0
    """MACs inside it at full width: its conv and linear layers', and its share of the work outside layers that
    the space counts as a constant (what dropping it saves before pruning)."""
    params: int = 0
    """Parameters inside it."""
    groups: tuple[int, ...] = ()
    """Channel groups that lie wholly inside it: their choices do not matter once it is dropped."""


def block_fields(space, dropped: frozenset[int]) -> dict:
    """A candidate record's depth in a `PruningSpace` `space`: the residual blocks it drops (by name, in forward
    order) and how many of the space's blocks it keeps."""
    return {"dropped_blocks": space.dropped_names(dropped), "blocks_kept": len(space.blocks) - len(dropped)}


@dataclass
class _Call:
    """What one module did in the traced forward."""

    calls: int = 0
    finished: int = 0
    """When its (last) call returned, counted over all modules: an inner module returns before its wrapper."""
    input: torch.Tensor | None = None
    input_node: object = None
    output_node: object = None
    output_shape: tuple[int, ...] | None = None


def find_blocks(model: nn.Module, example_input: torch.Tensor) -> tuple[list[ResidualBlock], dict[str, str]]:
    """`model`'s shape-preserving residual blocks in forward order, and, for every other module called
    once on one tensor, why it is not one (for refusing a block asked for by name). A module and a wrapper around
    it that end in the same add are one block: the innermost is offered."""
    names = {m: n for n, m in model.named_modules()}
    calls: dict[nn.Module, _Call] = {}
    ticks = itertools.count(1)

    def before(module, inputs):
        record = calls.setdefault(module, _Call())
        record.calls += 1
        if len(inputs) == 1 and isinstance(inputs[0], torch.Tensor):
            x = inputs[0]
            record.input, record.input_node = x, _node_of(x)

    def after(module, _inputs, output):
        record = calls[module]
        record.finished = next(ticks)
        if isinstance(output, torch.Tensor):  # read now: an in-place op after the module would change it
            record.output_node, record.output_shape = output.grad_fn, tuple(output.shape)

    handles = [h for m in model.modules() if m is not model
               for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            model(example_input.detach().clone().requires_grad_(True))
        for h in handles:
            h.remove()
        blocks, reasons = _classify(calls, names)
        for module in _reached_anyway(model, blocks, names, example_input):
            reasons[names[module]] = "is called by its model in a way that replacing the module does not remove"
            blocks.remove(module)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return [ResidualBlock(b, names[m], tuple(calls[m].output_shape[1:])) for b, m in enumerate(blocks)], reasons


def _classify(calls: dict[nn.Module, _Call], names: dict) -> tuple[list[nn.Module], dict[str, str]]:
    """The blocks among the traced modules, and why each other module called once on one tensor is not one."""

    found: dict[object, nn.Module] = {}  # the block's add node -> its innermost module
    reasons: dict[str, str] = {}
    for module, record in sorted(calls.items(), key=lambda item: item[1].finished):  # inner modules first
        name = names[module]
        if record.calls != 1 or record.input is None or record.output_shape is None:
            continue
        shape_in = tuple(record.input.shape)
        if shape_in != record.output_shape:
            reasons[name] = f"maps {shape_in[1:]} to {record.output_shape[1:]}: it cannot become the identity"
            continue
        add = _residual_add(record)
        if add is None:
            reasons[name] = "is not a residual block: its output is not its own input plus a branch"
            continue
        if add in found:
            reasons[name] = f"wraps the residual block {names[found[add]]}, which is offered instead"
            continue
        found[add] = module
    order = list(calls)  # forward order: where each module's first call started
    return sorted(found.values(), key=order.index), reasons


def _node_of(x: torch.Tensor):
    """The autograd node that produced `x` (its gradient accumulator when `x` is a leaf)."""
    if x.grad_fn is not None:
        return x.grad_fn, x.output_nr
    return (x.view_as(x).grad_fn.next_functions[0] if x.requires_grad else None)


def _residual_add(record: _Call):
    """The add node ending the module when one of its operands is the module's own input, else None."""
    node = record.output_node
    if node is None or record.input_node is None:
        return None
    for _ in range(2):  # the add itself, or one elementwise activation after it
        kind = type(node).__name__
        if kind.startswith(_ADD_NODES):
            return node if record.input_node in node.next_functions else None
        if not kind.startswith(_ELEMENTWISE_ENDS) or len(node.next_functions) != 1:
            return None
        node = node.next_functions[0][0]
    return None


def _reached_anyway(model: nn.Module, blocks: list[nn.Module], names: dict, example_input: torch.Tensor) -> list[nn.Module]:
    """The blocks that still run with every block replaced by the identity (one forward per nesting level)."""
    reached: list[nn.Module] = []
    ran: list[nn.Module] = []
    for level in _nesting_levels(blocks, names):
        ran.clear()
        handles = [m.register_forward_pre_hook(lambda m, _i: ran.append(m)) for m in level]
        try:
            with removed(model, [names[m] for m in level]), torch.no_grad():
                model(example_input)
        finally:
            for h in handles:
                h.remove()
        reached += [m for m in level if m in ran]
    return reached


def _nesting_levels(blocks: list[nn.Module], names: dict) -> list[list[nn.Module]]:
    """Blocks grouped by how many other blocks contain them (0: outermost)."""
    levels: dict[int, list[nn.Module]] = {}
    for m in blocks:
        depth = sum(names[m].startswith(names[o] + ".") for o in blocks if o is not m)
        levels.setdefault(depth, []).append(m)
    return [levels[d] for d in sorted(levels)]


@contextmanager
def removed(model: nn.Module, names: Iterable[str]) -> Iterator[nn.Module]:
    """Within the block, each named module of `model` is replaced by the identity in its parent (restored after);
    a module inside another named one goes with it."""
    saved = []
    try:
        for name in outermost(names):
            saved.append(_swap(model, name, nn.Identity()))
        yield model
    finally:
        for parent, attr, original in reversed(saved):
            parent._modules[attr] = original


def remove_blocks(model: nn.Module, names: Iterable[str]) -> nn.Module:
    """Replace each named module of `model` by the identity, for good (the physically pruned network)."""
    for name in outermost(names):
        _swap(model, name, nn.Identity())
    return model


def outermost(names: Iterable[str]) -> list[str]:
    """The names no other of `names` contains (a module inside a removed one is removed with it)."""
    names = list(dict.fromkeys(names))
    return [n for n in names if not any(n.startswith(o + ".") for o in names)]


def _swap(model: nn.Module, name: str, new: nn.Module) -> tuple[nn.Module, str, nn.Module]:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if attr not in parent._modules:
        raise EntropySearchError(f"{name} is not a module of {type(model).__name__}")
    original = parent._modules[attr]
    parent._modules[attr] = new
    return parent, attr, original
