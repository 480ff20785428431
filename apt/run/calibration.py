"""The Hessians of a block's groups, ``H = Σ x xᵀ`` over the calibration tokens at each group's input,
from one pass of the block over the stored activations (summed over ranks under torchrun).

A Linear group's input is caught by a hook on its first layer. An experts module is caught before it
runs: each expert's gate/up Hessian sums the tokens routed to it, its down Hessian the activations those
tokens produce, both computed as the module computes them (``apt.models.experts``).

Experts starved of tokens. An expert that received fewer than ``min_tokens`` tokens (default: its input
width, the fewest that can give a full-rank Hessian; an expert no token reached has ``H = 0``, which
SparseGPT's dead-column rule would turn into an all-zero expert) is calibrated on its routed tokens
plus ``min_tokens − n`` tokens' worth of the Hessian of every token the experts module received, run
through that expert:

    H_e = H_routed + (min_tokens − n) / N · H_all

so it is pruned for the inputs experts see in general where its own are too few to say, and never
zeroed. The counts and the rule applied are in each expert layer's record.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

from apt.collective import Collective
from apt.models.activations import ActivationStore
from apt.models.discovery import Group
from apt.models.experts import all_rows, down_inputs, routed_rows
from apt.models.layered import _Stop, first_output, to_device


@dataclass
class Statistics:
    """What one pass collected for one group: ``hessian`` (float32 ``[in, in]``, ``None`` where no token
    reached it), ``tokens`` (rows summed), and for experts how the Hessian was made."""

    hessian: torch.Tensor | None = None
    tokens: int = 0
    rule: str | None = None
    extra: dict = field(default_factory=dict)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if self.hessian is None:
            self.hessian = torch.zeros(x.shape[1], x.shape[1], device=x.device)
        self.hessian.addmm_(x.T, x)
        self.tokens += x.shape[0]


def _bind(module, args, kwargs) -> list:
    """The experts forward's arguments in its signature's order (hidden states first)."""
    forward = getattr(type(module).forward, "__wrapped__", type(module).forward)
    bound = inspect.signature(forward).bind(module, *args, **kwargs)
    return list(bound.arguments.values())[1:]


def _experts_hook(groups: list[Group], stats: list[Statistics], indices: list[int], last: bool, all_stats):
    """A forward pre-hook on an experts module that adds each expert's rows to its groups' statistics."""
    by_key = {(groups[i].part, groups[i].expert): i for i in indices}
    layout = groups[indices[0]].targets[0].layout

    def hook(module, args, kwargs):
        arguments = _bind(module, args, kwargs)
        for e, rows in routed_rows(module, layout, arguments):
            if rows.shape[0]:
                stats[by_key[("gate_up_proj", e)]].add(rows)
                stats[by_key[("down_proj", e)]].add(down_inputs(module, layout, e, rows.float().to(rows.dtype)))
        if all_stats is not None:
            all_stats.add(all_rows(module, layout, arguments))
        if last:
            raise _Stop

    return hook


def input_hook(stat: Statistics, last: bool):
    """A forward hook adding a Linear's input to ``stat``; ``last``: the pass ends there (raises ``_Stop``)."""

    def hook(_module, inputs, _output):
        stat.add(inputs[0])
        if last:
            raise _Stop

    return hook


def collect(
    block: torch.nn.Module,
    index: int,
    store: ActivationStore,
    groups: list[Group],
    device: str,
    coll: Collective,
    stop_after_last: bool = True,
    expert_min_tokens: int | None = None,
) -> list[Statistics]:
    """One pass of ``block`` (block ``index``) over this rank's stored batches; the statistics of every
    group, summed over ranks, with the rule for starved experts applied (``expert_min_tokens``: see
    ``min_tokens``)."""
    stats = [Statistics() for _ in groups]
    experts_all: dict[int, Statistics] = {}
    handles = []
    order = _sources_in_order(groups)
    for position, (source, indices) in enumerate(order):
        last = stop_after_last and position == len(order) - 1
        if groups[indices[0]].expert is not None:
            experts_all[id(source)] = Statistics()
            hook = _experts_hook(groups, stats, indices, last, experts_all[id(source)])
            handles.append(source.register_forward_pre_hook(hook, with_kwargs=True))
        elif source is not None:
            handles.append(source.register_forward_hook(input_hook(stats[indices[0]], last)))
    try:
        _run(block, index, store, device)
    finally:
        for handle in handles:
            handle.remove()
    sum_over_ranks(stats, groups, coll)
    if experts_all:
        _feed_starved(block, index, store, groups, stats, device, coll, expert_min_tokens)
    return stats


def _sources_in_order(groups: list[Group]) -> list[tuple[torch.nn.Module | None, list[int]]]:
    """Each distinct input source (a Linear group's first layer, an experts module) with the indices of
    the groups it feeds, in the order the block computes them."""
    order: list[tuple[torch.nn.Module | None, list[int]]] = []
    for i, group in enumerate(groups):
        if order and group.expert is not None and order[-1][0] is group.source:
            order[-1][1].append(i)
        else:
            order.append((group.source, [i]))
    return order


def _run(block, index: int, store: ActivationStore, device: str) -> None:
    with torch.no_grad():
        for i in range(len(store)):
            try:
                block(store.hidden(i).to(device), **to_device(store.kwargs(i, index), device))
            except _Stop:
                pass


def sum_over_ranks(stats: list[Statistics], groups: list[Group], coll: Collective) -> None:
    """Sum every group's statistics over ranks (a rank that saw no token of a group adds zeros)."""
    if coll.world == 1:
        return
    counts = coll.sum_(torch.tensor([float(s.tokens) for s in stats], dtype=torch.float64))
    for stat, group, count in zip(stats, groups, counts.tolist()):
        stat.tokens = int(count)
        if not count:
            stat.hessian = None
            continue
        width = group.targets[0].in_features
        if stat.hessian is None:
            stat.hessian = torch.zeros(width, width)
        coll.sum_(stat.hessian)


def min_tokens(group: Group, given: int | None = None) -> int:
    """The fewest routed tokens an expert's own Hessian is used alone with: ``given``, else its input width."""
    return group.targets[0].in_features if given is None else given


def _feed_starved(block, index, store, groups: list[Group], stats, device, coll, given: int | None) -> None:
    """Blend each starved expert's Hessian with that expert run on every token the experts module received
    (a second pass, only where some expert is starved); record counts and the rule for every expert."""
    need = {i: min_tokens(g, given) for i, g in enumerate(groups) if g.expert is not None}
    starved = [i for i in need if stats[i].tokens < need[i]]
    for i in need:
        stats[i].rule = "routed tokens" if i not in starved else None
        stats[i].extra = {"routed_tokens": stats[i].tokens, "min_tokens": need[i]}
    if not starved:
        return
    full = {i: Statistics() for i in starved}
    handles = []
    for source in {id(groups[i].source): groups[i].source for i in starved}.values():
        mine = [i for i in starved if groups[i].source is source]
        layout = groups[mine[0]].targets[0].layout

        def hook(module, args, kwargs, mine=mine, layout=layout):
            rows = all_rows(module, layout, _bind(module, args, kwargs))
            for i in mine:
                group = groups[i]
                x = rows if group.part == "gate_up_proj" else down_inputs(module, layout, group.expert, rows)
                full[i].add(x)
            raise _Stop

        handles.append(source.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        _run(block, index, store, device)
    finally:
        for handle in handles:
            handle.remove()
    blended = [full[i] for i in starved]
    sum_over_ranks(blended, [groups[i] for i in starved], coll)
    for i, everything in zip(starved, blended):
        stat = stats[i]
        weight = (need[i] - stat.tokens) / max(everything.tokens, 1)
        base = stat.hessian if stat.hessian is not None else torch.zeros_like(everything.hessian)
        stat.hessian = base + weight * everything.hessian
        stat.rule = (
            f"{stat.tokens} routed tokens (< {need[i]}) + {need[i] - stat.tokens} tokens' worth of all "
            f"{everything.tokens} the experts received"
        )
        stat.extra["all_tokens"] = everything.tokens


def collect_corrected(
    block: torch.nn.Module,
    index: int,
    store: ActivationStore,
    dense: ActivationStore,
    groups: list[Group],
    device: str,
    coll: Collective,
    expert_min_tokens: int | None = None,
) -> tuple[list[Statistics], list[torch.Tensor | None]]:
    """Like ``collect``, and also ``G = Σ x_d x_pᵀ`` between the dense model's input ``x_d`` to each Linear
    group (the block, still dense, on the dense model's activations ``dense``) and the pruned model's
    ``x_p``; ``dense`` is advanced to the block's dense output on the way. Experts get no ``G``: the
    dense and the pruned model route tokens differently, so their inputs do not pair up."""
    linear = [i for i, g in enumerate(groups) if g.expert is None and g.source is not None]
    stats = [Statistics() for _ in groups]
    crosses: list[torch.Tensor | None] = [None] * len(groups)
    captured: dict[int, torch.Tensor] = {}
    phase = {"dense": True}
    handles = []
    for position, i in enumerate(linear):
        is_last = position == len(linear) - 1

        def hook(_module, inputs, _output, i=i, last=is_last):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            if phase["dense"]:
                captured[i] = x
                return
            stats[i].add(x)
            if crosses[i] is None:
                crosses[i] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
            crosses[i].addmm_(captured[i].T, x)
            if last:
                raise _Stop

        handles.append(groups[i].source.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for b in range(len(store)):
                phase["dense"] = True
                out = first_output(block(dense.hidden(b).to(device), **to_device(dense.kwargs(b, index), device)))
                phase["dense"] = False
                try:
                    block(store.hidden(b).to(device), **to_device(store.kwargs(b, index), device))
                except _Stop:
                    pass
                dense.replace(b, out)
    finally:
        for handle in handles:
            handle.remove()
    if coll.world > 1:  # a rank without batches adds zeros
        sum_over_ranks([stats[i] for i in linear], [groups[i] for i in linear], coll)
        for i in linear:
            width = groups[i].targets[0].in_features
            crosses[i] = coll.sum_(crosses[i] if crosses[i] is not None else torch.zeros(width, width))
    if any(g.expert is not None for g in groups):
        experts = [i for i, g in enumerate(groups) if g.expert is not None]
        plain = collect(block, index, store, [groups[i] for i in experts], device, coll, True, expert_min_tokens)
        for i, stat in zip(experts, plain):
            stats[i] = stat
    return stats, crosses
