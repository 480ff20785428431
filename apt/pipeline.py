"""The layer-by-layer pruning run (sequential calibration, as in SparseGPT §3).

Block 0's full call (hidden states plus keyword arguments: position embeddings, attention masks) is
captured for every calibration batch; each block then sees inputs produced by the already pruned
blocks before it. Only the block being pruned lives on the compute device; activations stay on CPU.
"""

from __future__ import annotations

import logging
import resource
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from apt.errors import InvalidInputError
from apt.families import Family, block_groups, find_blocks
from apt.patterns import Pattern, is_nm_sparse, sparsity_of
from apt.solver import PruneConfig, prune_layer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunConfig:
    """How to prune a whole model. ``solver`` applies to every layer; ``targets``/``ignore`` are regexes
    over full module names; ``true_sequential`` recollects each group's inputs after the groups before
    it in the same block are pruned."""

    solver: PruneConfig = PruneConfig()
    targets: str | None = None
    ignore: str | None = None
    true_sequential: bool = False
    device: str = "cpu"
    batch_size: int = 8


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the needed inputs were seen."""


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


_CACHE_KWARGS = ("past_key_value", "past_key_values", "cache_params", "use_cache")


def capture_block_inputs(model, blocks, windows: torch.Tensor, batch_size: int, device: str) -> list[tuple]:
    """Run the model up to block 0 for each batch of ``windows`` ``[n, seq]`` and return, per batch,
    ``(hidden_states on CPU, keyword arguments on CPU)``. No KV cache is built or replayed."""
    captured = []

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k not in _CACHE_KWARGS}
        captured.append((hidden.detach().cpu(), _to(kwargs, "cpu")))
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    _move_outside_blocks(model, blocks, device)
    try:
        with torch.no_grad():
            for start in range(0, len(windows), batch_size):
                try:
                    model(input_ids=windows[start : start + batch_size].to(device), use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
        _move_outside_blocks(model, blocks, "cpu")
    return captured


def _move_outside_blocks(model, blocks, device):
    """Put every parameter and buffer outside the blocks (embeddings, rotary tables, norms) on ``device``;
    the blocks stay where they are, so a model larger than the device still runs."""
    inside = {id(t) for t in blocks.parameters()} | {id(t) for t in blocks.buffers()}
    for module in model.modules():
        for _name, param in module.named_parameters(recurse=False):
            if id(param) not in inside:
                param.data = param.data.to(device)
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and id(buf) not in inside:
                module._buffers[name] = buf.to(device)


def _collect_hessians(block, batches, groups, device, stop_after_last: bool) -> list[torch.Tensor]:
    """One pass of ``block`` over ``batches``; returns ``H = Σ x xᵀ`` (float32) at the input of each group."""
    hessians = [None] * len(groups)
    handles = []
    for i, group in enumerate(groups):
        leader = group[0][1]

        def hook(_module, inputs, _output, i=i):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            if hessians[i] is None:
                hessians[i] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
            hessians[i].addmm_(x.T, x)
            if stop_after_last and i == len(groups) - 1:
                raise _Stop

        handles.append(leader.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for hidden, kwargs in batches:
                try:
                    block(hidden.to(device), **_to(kwargs, device))
                except _Stop:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    return hessians


def calibrate_and_prune(model, family: Family, windows: torch.Tensor, config: RunConfig) -> dict:
    """Prune ``model`` in place block by block on calibration ``windows`` ``[n, seq]`` (int64).

    Returns ``{"layers": [...], "seconds": ..., "peak_memory_bytes": ...}``; a layer record holds
    ``name, shape, nm_valid, sparsity, relative_loss, loss, damp, seconds, skipped`` and solver stats.
    """
    start = time.perf_counter()
    pattern: Pattern = config.solver.pattern
    block_path, blocks = find_blocks(model, family)
    device = config.device
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    rss_reset = _reset_peak_rss()
    batches = capture_block_inputs(model, blocks, windows, config.batch_size, device)
    plans = [block_groups(b, family, f"{block_path}.{i}", config.targets, config.ignore) for i, b in enumerate(blocks)]
    total = sum(len(g) for plan in plans for g in plan)
    records: list[dict] = []
    bar = tqdm(total=total, desc="pruning", unit="layer", disable=None)
    try:
        for index, (block, groups) in enumerate(zip(blocks, plans)):
            block.to(device)
            if config.true_sequential:
                for group in groups:
                    (hessian,) = _collect_hessians(block, batches, [group], device, stop_after_last=True)
                    records += _prune_group(group, hessian, config, bar, index, len(blocks), block_path)
            else:
                hessians = _collect_hessians(block, batches, groups, device, stop_after_last=True)
                for group, hessian in zip(groups, hessians):
                    records += _prune_group(group, hessian, config, bar, index, len(blocks), block_path)
            with torch.no_grad():
                batches = [(_first(block(h.to(device), **_to(kw, device))).cpu(), kw) for h, kw in batches]
            block.to("cpu")
            if not all(torch.isfinite(h).all() for h, _ in batches):
                raise InvalidInputError(
                    f"block {index} produced NaN/Inf activations after pruning: check the model dtype"
                )
    finally:
        bar.close()
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated(device)
        peak_kind = "cuda_max_allocated"
    elif rss_reset:
        peak, peak_kind = _peak_rss_bytes(), "run_peak_rss"
    else:  # the kernel cannot reset the high-water mark: the process's lifetime peak
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peak_kind = "process_max_rss"
    log.info("pruned %d layers in %.1f s", sum(not r["skipped"] for r in records), time.perf_counter() - start)
    return {
        "layers": records,
        "seconds": time.perf_counter() - start,
        "peak_memory_bytes": peak,
        "peak_memory_kind": peak_kind,
        "pattern": str(pattern),
    }


def _reset_peak_rss() -> bool:
    """Reset this process's resident-set high-water mark (Linux ``clear_refs`` 5), so the peak read at
    the end belongs to this run alone."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _prune_group(group, hessian, config: RunConfig, bar, index, n_blocks, block_path) -> list[dict]:
    records = []
    pattern = config.solver.pattern
    for name, linear in group:
        short = name[len(f"{block_path}.{index}.") :]
        bar.set_description(f"block {index + 1}/{n_blocks} · {short}")
        weight = linear.weight.data
        record = {"name": name, "shape": list(weight.shape), "skipped": None}
        if pattern.is_nm and weight.shape[1] % pattern.m:
            record.update(skipped=f"in={weight.shape[1]} is not a multiple of {pattern.m}", nm_valid=False)
            record.update(sparsity=sparsity_of(weight), relative_loss=None, loss=None, damp=None, seconds=0.0)
            log.warning("%s: %s; left dense", name, record["skipped"])
        elif hessian is None:
            record.update(skipped="no calibration input reached this layer", nm_valid=False)
            record.update(sparsity=sparsity_of(weight), relative_loss=None, loss=None, damp=None, seconds=0.0)
        else:
            try:
                result = prune_layer(weight, hessian.to(weight.device), config=config.solver)
            except InvalidInputError as err:
                raise InvalidInputError(f"{name}: {err}") from err
            linear.weight.data.copy_(result.weight)
            stats = result.stats
            record.update(
                nm_valid=is_nm_sparse(linear.weight.data, pattern.n, pattern.m) if pattern.is_nm else None,
                sparsity=sparsity_of(linear.weight.data),
                relative_loss=result.relative_loss,
                loss=result.loss,
                damp=stats.damp,
                seconds=stats.seconds,
                solver=asdict(stats),
            )
        records.append(record)
        bar.update(1)
    return records
