"""Sequential calibration: prune a model block by block (SparseGPT §3), one block in memory at a time.

Every block's full call (hidden states plus keyword arguments: position embeddings, attention masks,
which differ between sliding-window and global layers) is captured for every calibration batch; each
block then sees the outputs of the already pruned blocks before it. For each block: its tensors are
read, its prunable matrices found (``apt.models.discovery``) and grouped by the input they share, the
Hessian at each group's input accumulated (``apt.run.calibration``), each layer pruned, the pruned
weights rounded to the dtype the checkpoint stores (so later blocks calibrate on exactly the model
that will be written), the calibration activations pushed through the pruned block, and the caller
writes the block out before it is released. With ``--quantize fp8 --fp8-in-run`` a block computes as its FP8
copy will (``served_in_fp8``): each quantized layer's weight goes on the FP8 grid as soon as it is pruned, and
its inputs through FP8 per token, both for its Hessians and for the activations passed on. (Without
``--fp8-in-run`` the run prunes as without ``--quantize`` and ``apt.run.quantize`` writes the folder in FP8.)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict

import torch
from tqdm.auto import tqdm

from apt.collective import Collective
from apt.errors import InvalidInputError, UnsupportedModelError
from apt.models.activations import ActivationStore
from apt.models.discovery import Group, Target, block_targets, find_groups, shared_between_blocks, unknown_weights
from apt.models.layered import LayeredModel, give_back_memory, quantize_inputs, to_device
from apt.models.permutation import free_partners, permute_rows
from apt.run.calibration import Statistics, collect, collect_corrected
from apt.run.config import RunConfig
from apt.solver import corrected_target, layer_loss, prune_layer
from apt.solver.fp8 import compensated_fp8, dequantize_weight, quantize_weight
from apt.solver.patterns import Pattern, conforms, positive_zeros, sparsity_of
from apt.solver.permute import balanced_permutation

log = logging.getLogger(__name__)


# A hook called with (block index, the block's layer records) once a block is pruned, before release.
BlockDone = Callable[[int, list[dict]], None]


def layer_plan(layered: LayeredModel, config: RunConfig) -> list[list[Target]]:
    """Per block, the prunable matrices in module order; refuses a selection that matches nothing, and a model
    whose blocks share weights."""
    shared = shared_between_blocks(layered.model, layered.block_path)
    if shared:
        raise UnsupportedModelError(
            f"{layered.layout.name}: {shared[0]} is the same weight as {shared[1]}; blocks that share weights "
            "(one block reused at several depths) cannot be pruned block by block"
        )
    plans = [
        block_targets(block, layered.block_prefix(i)[:-1], layered.config, config.targets, config.ignore)
        for i, block in enumerate(layered.blocks)
    ]
    if not any(plans):
        every = block_targets(layered.blocks[0], layered.block_prefix(0)[:-1], layered.config)
        if every:
            raise InvalidInputError(
                f"no prunable layer matches --targets {config.targets!r} / --ignore {config.ignore!r} in this "
                f"{layered.layout.name} model; its layers are named like {every[0].name}"
            )
        holders = sorted(
            {type(m).__name__ for m in layered.blocks[0].modules() for p in m.parameters(False) if p.dim() >= 2}
        )
        raise UnsupportedModelError(
            f"{layered.layout.name}: found {len(layered.blocks)} blocks at {layered.block_path} "
            f"({type(layered.blocks[0]).__name__}) but no nn.Linear or fused experts in them to prune; their "
            f"weights are in {', '.join(holders) or 'no module'}"
        )
    return plans


def unknown_layouts(layered: LayeredModel) -> list[dict]:
    """Every block's weights of more than two dimensions that the run leaves dense because their layout is
    unknown (``apt.models.discovery.unknown_weights``), each with why."""
    found = []
    for i, block in enumerate(layered.blocks):
        every = block_targets(block, layered.block_prefix(i)[:-1], layered.config)
        found += unknown_weights(block, layered.block_prefix(i)[:-1], every)
    for entry in found:
        entry["why"] = (
            f"a {len(entry['shape'])}-D weight of {entry['module']}, whose layout apt-sparse does not know (not a "
            "Linear, not fused experts that record their layout): left dense"
        )
    if found:
        log.warning("%d weights of unknown layout left dense, e.g. %s", len(found), found[0]["why"])
    return found


class GroupFinder:
    """The groups of each block, found by one forward pass of its first calibration batch; blocks of the
    same structure (the same targets under the same relative names) reuse the grouping."""

    def __init__(self):
        self._known: dict[tuple, list[tuple[list[str], bool]]] = {}

    def groups(self, layered: LayeredModel, index: int, targets: list[Target], store: ActivationStore) -> list[Group]:
        prefix = layered.block_prefix(index)
        relative = {t.name[len(prefix) :]: t for t in targets}
        signature = tuple((name, type(t.module).__name__, tuple(t.weight.shape)) for name, t in relative.items())
        if signature not in self._known:
            block = layered.blocks[index]

            def run():
                with torch.no_grad():
                    block(store.hidden(0).to(layered.device), **to_device(store.kwargs(0, index), layered.device))

            found = find_groups(block, targets, run)
            self._known[signature] = [([t.name[len(prefix) :] for t in g.targets], g.source is not None) for g in found]
            return found
        groups = []
        for names, called in self._known[signature]:
            members = [relative[n] for n in names]
            first = members[0]
            groups.append(
                Group(members, first.module if called else None, first.expert, first.part if first.is_expert else None)
            )
        return groups


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
    records: list[dict] = []
    if config.correction and dense is None:
        if start:
            raise ValueError("error-correcting targets from a later block need the dense model's activations there")
        dense = store.copy()
    elif not config.correction:
        dense = None
    finder = GroupFinder()
    bar = tqdm(
        total=sum(map(len, plans[start:])), desc="pruning", unit="layer", disable=None if coll.is_writer else True
    )
    try:
        for index in range(start, len(layered.blocks)):
            with layered.loaded(layered.parameter_names(layered.block_prefix(index))):
                groups = finder.groups(layered, index, plans[index], store) if plans[index] else []
                with served_in_fp8(plans[index], config):
                    block_records = _prune_block(layered, index, groups, store, dense, config, bar, coll)
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


def quantized_in_run(target: Target, config: RunConfig) -> bool:
    """``--quantize fp8 --fp8-in-run`` puts this matrix on the FP8 grid as it is pruned: a Linear's ``[out, in]``
    weight (experts and ``Conv1D`` stay as stored, as ``apt.run.quantize`` leaves them)."""
    in_run = config.quantize == "fp8" and config.fp8_in_run
    return in_run and not target.is_expert and target.in_axis == -1


@contextlib.contextmanager
def served_in_fp8(targets: list[Target], config: RunConfig) -> Iterator[None]:
    """With ``--fp8-in-run``: while open, the block's layers that will be FP8 take their inputs through FP8 per
    token, as the FP8 folder is served (W8A8), so their Hessians are those of the inputs they will multiply and
    the next blocks calibrate on the block as it will compute."""
    hooks = [t.module.register_forward_pre_hook(quantize_inputs) for t in targets if quantized_in_run(t, config)]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def _prune_block(layered, index, groups: list[Group], store, dense, config: RunConfig, bar, coll) -> list[dict]:
    """Every group of one block, on Hessians collected in one pass (or, ``true_sequential``, one pass per
    stage: each Linear group, then each experts module's gate/up, then its down, recollected after the
    stages before it are pruned)."""
    block = layered.blocks[index]
    records = []
    if config.true_sequential:
        for stage in _stages(groups):
            stats = collect(block, index, store, stage, layered.device, coll, True, config.expert_min_tokens)
            for group, stat in zip(stage, stats):
                records += prune_group(group, stat, layered, config, bar, index, coll)
        return records
    if dense is not None:
        stats, crosses = collect_corrected(
            block, index, store, dense, groups, layered.device, coll, config.expert_min_tokens
        )
    else:
        stats = collect(block, index, store, groups, layered.device, coll, True, config.expert_min_tokens)
        crosses = [None] * len(groups)
    for i, group in enumerate(groups):
        stat, stats[i] = stats[i], None  # freed as soon as its group is pruned
        cross, crosses[i] = crosses[i], None
        records += prune_group(group, stat, layered, config, bar, index, coll, cross)
        del stat, cross
    return records


def _stages(groups: list[Group]) -> list[list[Group]]:
    stages: list[list[Group]] = []
    for group in groups:
        if (
            stages
            and group.expert is not None
            and stages[-1][0].source is group.source
            and (stages[-1][0].part == group.part)
        ):
            stages[-1].append(group)
        else:
            stages.append([group])
    return stages


def prune_group(
    group: Group, stat: Statistics, layered: LayeredModel, config: RunConfig, bar, index, coll=None, cross=None
) -> list[dict]:
    """Prune every layer of one group on its shared Hessian; the layer's weight is replaced in place by the
    pruned one as the checkpoint will store it. A record holds ``name, shape, skipped, nm_valid,
    sparsity, relative_loss, loss, damp, seconds`` and the solver's stats; an expert's also its index
    and the tokens its Hessian came from. ``index`` is the block's, None for Linears outside the blocks (a
    vision-language model's projector)."""
    coll = coll or Collective()
    records = []
    pattern: Pattern = config.solver.pattern
    prefix = layered.block_prefix(index) if index is not None else ""
    where = f"block {index + 1}/{len(layered.blocks)}" if index is not None else "after the vision blocks"
    hessian = stat.hessian
    for position, target in enumerate(group.targets):
        bar.set_description(f"{where} · {target.name[len(prefix) :]}")
        weight = target.weight
        record = {"name": target.name, "shape": list(weight.shape), "skipped": None}
        record |= layered.target_tensors(target)
        if target.is_expert:
            record |= {"expert": target.expert, "tokens": stat.tokens, "hessian": stat.rule} | stat.extra
        skip = None
        if pattern.is_nm and weight.shape[1] % pattern.m:
            skip = f"in={weight.shape[1]} is not a multiple of {pattern.m}"
            log.warning("%s: %s; left dense", target.name, skip)
        elif hessian is None:
            skip = "no calibration input reached this layer"
        if skip:
            record.update(skipped=skip, nm_valid=False, sparsity=sparsity_of(weight))
            record.update(relative_loss=None, loss=None, damp=None, seconds=0.0)
        else:
            # the group's last layer may damp the shared Hessian in place: nobody reads it afterwards
            goal = weight
            if cross is not None:
                goal = corrected_target(weight, hessian, cross, config.correction, config.solver.damp_value)
            last = position == len(group.targets) - 1
            partners = free_partners(layered.model, target) if config.permute and pattern.is_nm else None
            fp8 = quantized_in_run(target, config)
            if partners is None:
                consume = last and not (fp8 and config.fp8_compensate)  # the pass below reads the Hessian
                pruned, summary = _solve_rows(target.name, goal, hessian, config, coll, consume=consume)
            else:
                pruned, summary = _permuted_if_better(target, goal, hessian, partners, config, coll, record)
            if fp8:
                pruned, record["fp8_relative_loss"] = on_fp8_grid(pruned, hessian, config.fp8_compensate)
            # round to the stored dtype now: later blocks calibrate on the model as it will be written
            stored = positive_zeros(pruned.to(layered.stored_dtype(target.parameter)))
            weight.copy_(stored.to(weight.dtype))
            record.update(
                nm_valid=conforms(stored, pattern) if pattern.is_nm else None,
                sparsity=sparsity_of(stored),
                **summary,
            )
        records.append(record)
        bar.update(1)
        give_back_memory()  # the solver's temporaries of this layer
    return records


def on_fp8_grid(pruned: torch.Tensor, hessian: torch.Tensor, compensate: bool) -> tuple[torch.Tensor, float]:
    """The pruned weight as its FP8 copy computes (``q · scale``, in its dtype), rounded to nearest or with the
    error-compensating pass on ``hessian``; and that copy's layer loss relative to the pruned weight's zero
    loss. Every rank computes the same rows (the pass is cheap next to the solve)."""
    hessian = hessian.to(pruned.device)
    q, scale = compensated_fp8(pruned, hessian) if compensate else quantize_weight(pruned)
    on_grid = dequantize_weight(q, scale, pruned.dtype)
    zero = layer_loss(torch.zeros_like(pruned, dtype=torch.float32), pruned.float(), hessian.float())
    loss = layer_loss(on_grid.float(), pruned.float(), hessian.float())
    return on_grid, loss / zero if zero > 0 else 0.0


def _permuted_if_better(target, goal, hessian, partners, config: RunConfig, coll, record) -> tuple[torch.Tensor, dict]:
    """Prune a down projection on its inputs as they are and in the balanced order (``apt.solver.permute``),
    and keep the order whose loss after the exact refit is lower on the calibration tokens; a new order is
    applied to the gate and up rows too, so the model computes the same function."""
    plain = _solve_rows(target.name, goal, hessian, config, coll, consume=False)
    perm = balanced_permutation(goal, hessian, config.solver.pattern.m)
    moved = _solve_rows(target.name, goal[:, perm], hessian[perm][:, perm], config, coll, consume=True)
    record["permuted_inputs"] = moved[1]["loss"] < plain[1]["loss"]
    if not record["permuted_inputs"]:
        return plain
    permute_rows(partners, perm)  # the pruned weight's columns are in the new order: its inputs follow
    return moved


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
