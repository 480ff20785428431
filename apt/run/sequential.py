"""Sequential calibration: prune a model block by block (SparseGPT §3), one block in memory at a time.

Block 0's full call (hidden states plus keyword arguments: position embeddings, attention masks) is
captured for every calibration batch; each block then sees the outputs of the already pruned blocks
before it. For each block: its tensors are read, the Hessian ``H = Σ x xᵀ`` at the input of every
group of layers that share an input (q/k/v, gate/up) is accumulated, each layer is pruned, the pruned
weights are rounded to the dtype the checkpoint stores (so later blocks calibrate on exactly the
model that will be written), the calibration activations are pushed through the pruned block, and
the caller writes the block out before it is released.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict

import torch
from tqdm.auto import tqdm

from apt.collective import Collective
from apt.errors import InvalidInputError
from apt.models.activations import ActivationStore
from apt.models.families import block_groups
from apt.models.layered import LayeredModel, _Stop, first_output, give_back_memory, to_device
from apt.run.config import RunConfig
from apt.solver import corrected_target, prune_layer
from apt.solver.patterns import Pattern, conforms, positive_zeros, sparsity_of

log = logging.getLogger(__name__)


# A hook called with (block index, the block's layer records) once a block is pruned, before release.
BlockDone = Callable[[int, list[dict]], None]


def layer_plan(layered: LayeredModel, config: RunConfig) -> list[list[list[tuple[str, torch.nn.Linear]]]]:
    """Per block, the groups of ``(name, Linear)`` to prune; refuses a selection that matches nothing."""
    plans = [
        block_groups(block, layered.family, f"{layered.block_path}.{i}", config.targets, config.ignore)
        for i, block in enumerate(layered.blocks)
    ]
    if not any(plans):
        raise InvalidInputError(
            f"no prunable layer matches --targets {config.targets!r} / --ignore {config.ignore!r} in this "
            f"{layered.family.name} model; its layers are named like "
            f"{layered.block_path}.0.{layered.family.groups[0][0]}"
        )
    return plans


def collect_hessians(
    block: torch.nn.Module,
    store: ActivationStore,
    groups,
    device: str,
    coll: Collective,
    stop_after_last: bool = True,
) -> list[torch.Tensor | None]:
    """One pass of ``block`` over this rank's stored batches; ``H = Σ x xᵀ`` (float32) at the input of each
    group, summed over ranks. ``None`` where no calibration token reached a group."""
    hessians: list[torch.Tensor | None] = [None] * len(groups)
    handles = []
    for i, group in enumerate(groups):

        def hook(_module, inputs, _output, i=i):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            if hessians[i] is None:
                hessians[i] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
            hessians[i].addmm_(x.T, x)
            if stop_after_last and i == len(groups) - 1:
                raise _Stop

        handles.append(group[0][1].register_forward_hook(hook))
    try:
        with torch.no_grad():
            for i in range(len(store)):
                try:
                    block(store.hidden(i).to(device), **to_device(store.kwargs(i), device))
                except _Stop:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    if coll.world == 1:
        return hessians
    reached = torch.tensor([h is not None for h in hessians], dtype=torch.float64)
    coll.sum_(reached)
    summed = []
    for (group, hessian), seen in zip(zip(groups, hessians), reached.tolist()):
        if not seen:
            summed.append(None)
            continue
        width = group[0][1].in_features
        summed.append(coll.sum_(hessian if hessian is not None else torch.zeros(width, width, device=device)))
    return summed


def collect_corrected(
    block: torch.nn.Module, store: ActivationStore, dense: ActivationStore, groups, device: str, coll: Collective
) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
    """Like ``collect_hessians``, and also ``G = Σ x_d x_pᵀ`` between the dense model's input ``x_d`` to each
    group (the block, still dense, on the dense model's activations ``dense``) and the pruned model's
    ``x_p``; ``dense`` is advanced to the block's dense output on the way."""
    hessians: list[torch.Tensor | None] = [None] * len(groups)
    crosses: list[torch.Tensor | None] = [None] * len(groups)
    captured: list[torch.Tensor | None] = [None] * len(groups)
    phase = {"dense": True}
    handles = []
    for i, group in enumerate(groups):

        def hook(_module, inputs, _output, i=i):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            if phase["dense"]:
                captured[i] = x
                return
            if hessians[i] is None:
                hessians[i] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
                crosses[i] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
            hessians[i].addmm_(x.T, x)
            crosses[i].addmm_(captured[i].T, x)
            if i == len(groups) - 1:
                raise _Stop

        handles.append(group[0][1].register_forward_hook(hook))
    try:
        with torch.no_grad():
            for i in range(len(store)):
                phase["dense"] = True
                out = first_output(block(dense.hidden(i).to(device), **to_device(dense.kwargs(i), device)))
                phase["dense"] = False
                try:
                    block(store.hidden(i).to(device), **to_device(store.kwargs(i), device))
                except _Stop:
                    pass
                dense.replace(i, out)
    finally:
        for handle in handles:
            handle.remove()
    if coll.world > 1:  # a rank without batches adds zeros
        widths = [group[0][1].in_features for group in groups]
        zeros = lambda w: torch.zeros(w, w, device=device)  # noqa: E731
        hessians = [coll.sum_(h if h is not None else zeros(w)) for h, w in zip(hessians, widths)]
        crosses = [coll.sum_(c if c is not None else zeros(w)) for c, w in zip(crosses, widths)]
    return hessians, crosses


def prune_blocks(
    layered: LayeredModel,
    store: ActivationStore,
    config: RunConfig,
    start: int = 0,
    on_block_done: BlockDone | None = None,
    coll: Collective | None = None,
    dense: ActivationStore | None = None,
) -> list[dict]:
    """Prune blocks ``start..`` of ``layered`` on the calibration activations in ``store`` (which must hold
    the inputs of block ``start``). Returns one record per layer (see ``prune_group``). Under several
    ranks (``coll``), each holds its share of the batches and solves its share of every layer's rows.
    With ``config.correction``, ``dense`` holds the dense model's activations entering block ``start``
    (a copy of ``store`` when ``start`` is 0)."""
    coll = coll or Collective()
    plans = layer_plan(layered, config)
    n_blocks = len(layered.blocks)
    records: list[dict] = []
    total = sum(len(g) for plan in plans[start:] for g in plan)
    if config.correction and dense is None:
        if start:
            raise ValueError("error-correcting targets from a later block need the dense model's activations there")
        dense = store.copy()
    elif not config.correction:
        dense = None
    bar = tqdm(total=total, desc="pruning", unit="layer", disable=None if coll.is_writer else True)
    try:
        for index in range(start, n_blocks):
            names = layered.parameter_names(layered.block_prefix(index))
            block = layered.blocks[index]
            with layered.loaded(names):
                groups = plans[index]
                block_records = []
                if config.true_sequential:
                    for group in groups:
                        (hessian,) = collect_hessians(block, store, [group], layered.device, coll)
                        block_records += prune_group(group, hessian, layered, config, bar, index, coll)
                else:
                    if dense is not None:
                        hessians, crosses = collect_corrected(block, store, dense, groups, layered.device, coll)
                    else:
                        hessians = collect_hessians(block, store, groups, layered.device, coll)
                        crosses = [None] * len(groups)
                    for i, group in enumerate(groups):
                        hessian, hessians[i] = hessians[i], None  # freed as soon as its group is pruned
                        cross, crosses[i] = crosses[i], None
                        block_records += prune_group(group, hessian, layered, config, bar, index, coll, cross)
                        del hessian, cross
                try:
                    layered.run_block(index, store)
                except FloatingPointError as err:
                    raise InvalidInputError(f"{err} after pruning: check the model dtype (--dtype)") from err
                if on_block_done is not None:
                    on_block_done(index, block_records)
                records += block_records
    finally:
        bar.close()
    return records


def prune_group(
    group, hessian, layered: LayeredModel, config: RunConfig, bar, index, coll=None, cross=None
) -> list[dict]:
    """Prune every layer of one group on its shared Hessian; the layer's weight is replaced in place by the
    pruned one as the checkpoint will store it. A record holds ``name, shape, skipped, nm_valid,
    sparsity, relative_loss, loss, damp, seconds`` and the solver's stats."""
    coll = coll or Collective()
    records = []
    pattern: Pattern = config.solver.pattern
    prefix = f"{layered.block_path}.{index}."
    for position, (name, linear) in enumerate(group):
        bar.set_description(f"block {index + 1}/{len(layered.blocks)} · {name[len(prefix) :]}")
        weight = linear.weight.data
        record = {"name": name, "shape": list(weight.shape), "skipped": None}
        skip = None
        if pattern.is_nm and weight.shape[1] % pattern.m:
            skip = f"in={weight.shape[1]} is not a multiple of {pattern.m}"
            log.warning("%s: %s; left dense", name, skip)
        elif hessian is None:
            skip = "no calibration input reached this layer"
        if skip:
            record.update(skipped=skip, nm_valid=False, sparsity=sparsity_of(weight))
            record.update(relative_loss=None, loss=None, damp=None, seconds=0.0)
        else:
            # the group's last layer may damp the shared Hessian in place: nobody reads it afterwards
            target = weight
            if cross is not None:
                target = corrected_target(weight, hessian, cross, config.correction, config.solver.damp_value)
            pruned, summary = _solve_rows(name, target, hessian, config, coll, consume=position == len(group) - 1)
            # round to the stored dtype now: later blocks calibrate on the model as it will be written
            stored = positive_zeros(pruned.to(layered.stored_dtype(f"{name}.weight")))
            linear.weight.data.copy_(stored.to(weight.dtype))
            record.update(
                nm_valid=conforms(stored, pattern) if pattern.is_nm else None,
                sparsity=sparsity_of(stored),
                **summary,
            )
        records.append(record)
        bar.update(1)
        give_back_memory()  # the solver's temporaries of this layer
    return records


def _solve_rows(name, weight, hessian, config: RunConfig, coll: Collective, consume: bool) -> tuple[torch.Tensor, dict]:
    """This rank's slice of the layer's rows, solved with the full Hessian, gathered with the others'."""
    rows = coll.row_slice(weight.shape[0])
    try:
        result = prune_layer(weight[rows], hessian.to(weight.device), config=config.solver, consume_hessian=consume)
    except InvalidInputError as err:
        raise InvalidInputError(f"{name}: {err}") from err
    stats = asdict(result.stats)
    pruned, loss, zero = result.weight, result.loss, result.zero_loss
    if coll.world > 1:
        pruned = coll.gather_rows(result.weight, weight.shape[0])
        losses = coll.sum_(torch.tensor([loss, zero], dtype=torch.float64))
        loss, zero = float(losses[0]), float(losses[1])
        ranks = coll.gather_objects(stats)
        stats |= {
            "seconds": max(r["seconds"] for r in ranks),
            "iterations": max(r["iterations"] for r in ranks),
            "residual": max((r["residual"] for r in ranks if r["residual"] is not None), default=None),
            "refine_swaps": sum(r["refine_swaps"] for r in ranks),
            "refine_rounds": max(r["refine_rounds"] for r in ranks),
            "loss_before_reconstruction": None
            if stats["loss_before_reconstruction"] is None
            else sum(r["loss_before_reconstruction"] for r in ranks),
            "ranks": len(ranks),
        }
    return pruned, {
        "relative_loss": loss / zero if zero > 0 else 0.0,  # as prune_layer computes it, over all rows
        "loss": loss,
        "damp": stats["damp"],
        "seconds": stats["seconds"],
        "solver": stats,
    }


def calibrate_and_prune(model, windows: torch.Tensor, config: RunConfig) -> dict:
    """Prune a model that is already in memory, in place, on calibration ``windows`` ``[n, seq]`` (int64).

    The same engine as the streaming run, with nothing to read or write. Returns ``{"layers", "seconds"}``.
    """
    start = time.perf_counter()
    layered = LayeredModel.resident(model, config.device)
    model.to(config.device)
    batches = [{"input_ids": windows[s : s + config.batch_size]} for s in range(0, len(windows), config.batch_size)]
    store = layered.block_inputs(batches, ActivationStore(layered.dtype, device=config.device))
    layers = prune_blocks(layered, store, config)
    model.to("cpu")
    return {"layers": layers, "seconds": time.perf_counter() - start}
