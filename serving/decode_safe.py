"""A pruned model made to serve through the sparse op: every pruned 2:4 Linear becomes a ``Sparse24Linear``
(``serving.sparse_op``) with the dispatch measured for its shape.

In ``speed-first`` mode (the default: decode-safe) each layer keeps its dense weight for the token counts
where dense was measured faster, so the model is never slower than dense where its shapes were measured;
a shape that was not measured stays dense. ``memory-first`` keeps only the compressed layout (0.5625× the
dense bytes). Dispatches come from ``serving.tuning`` (``runtime_bench.gpu_suite`` writes them per shape);
a plain measured threshold of the older rule (dense below it, cuSPARSELt from it) is still accepted.
"""

from __future__ import annotations

import torch

from apt.folder.targets import PrunedTargets, target_linears
from apt.solver.patterns import is_nm_sparse
from serving.sparse_op import MEMORY_FIRST, SPEED_FIRST, Dispatch, Sparse24Linear, from_threshold, shape_key

MARGIN = 1.02  # a sparse path must beat dense by 2 % to count as faster: timing noise is not a win


def threshold_from(points: list[tuple[int, float | None]], margin: float = MARGIN) -> int | None:
    """The smallest measured M from which the sparse kernel beat dense by ``margin`` at every larger measured
    M (``points``: ``(M, speedup over dense)``, ``None`` where not measured); ``None`` where it never did:
    that shape stays dense."""
    threshold = None
    for m, speedup in sorted(points, reverse=True):
        if speedup is None or speedup < margin:
            break
        threshold = m
    return threshold


def _dispatch(measured: Dispatch | int | None, mode: str) -> Dispatch | None:
    if isinstance(measured, Dispatch):
        return measured
    if mode == MEMORY_FIRST:
        return None  # the op's memory-first default for the shape
    return from_threshold(measured)


def make_decode_safe(
    model: torch.nn.Module,
    dispatches: dict[str, Dispatch | int | None],
    targets: PrunedTargets | None = None,
    mode: str = SPEED_FIRST,
) -> dict:
    """Replace every pruned Linear (``apt.folder.targets``: the folder's report, else discovery) whose weight
    is 2:4 by a ``Sparse24Linear`` in ``mode``, with the dispatch of its ``"{in}x{out}"`` shape
    (a ``Dispatch``, or a measured cuSPARSELt threshold; a shape not listed stays dense in speed-first mode).
    Returns ``{"replaced", "with_sparse_path", "weight_bytes", "dense_weight_bytes"}``."""
    modules = dict(model.named_modules())
    counts = {"replaced": 0, "with_sparse_path": 0, "weight_bytes": 0, "dense_weight_bytes": 0}
    for name, linear in target_linears(model, targets):
        if not isinstance(linear, torch.nn.Linear) or not is_nm_sparse(linear.weight.data, 2, 4):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name in modules else model.get_submodule(parent_name)
        dispatch = _dispatch(dispatches.get(shape_key(linear.in_features, linear.out_features)), mode)
        layer = Sparse24Linear.from_linear(linear, mode, dispatch)
        setattr(parent, child, layer)
        counts["replaced"] += 1
        counts["with_sparse_path"] += any(layer.path_for(m) != "dense" for m in _band_starts(layer.dispatch))
        counts["weight_bytes"] += layer.weight_bytes()
        counts["dense_weight_bytes"] += linear.weight.nbytes
    return counts


def _band_starts(dispatch: Dispatch) -> list[int]:
    return [band.start for band in dispatch.bands]
