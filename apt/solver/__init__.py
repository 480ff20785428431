"""The layer solver: pure tensor math over a weight ``[out, in]`` and its Hessian ``[in, in]``.

Imports torch and ``apt.errors`` only: no model, no file, no printing. ``prune_layer`` is the entry
point; ``METHODS`` the registry of pruning methods (``methods``), built from the column sweeps
(``sweeps``), the exact refit (``refit``), swap refinement (``swaps``) and N:M ``patterns``.
"""

from apt.solver.correction import corrected_target
from apt.solver.layer import PruneConfig, PruneResult, SolverStats, prune_layer
from apt.solver.loss import layer_loss
from apt.solver.methods import METHODS, Method
from apt.solver.patterns import Pattern, conforms, is_nm_sparse, positive_zeros, select_mask, sparsity_of

__all__ = [
    "METHODS",
    "Method",
    "Pattern",
    "PruneConfig",
    "PruneResult",
    "SolverStats",
    "conforms",
    "corrected_target",
    "is_nm_sparse",
    "layer_loss",
    "positive_zeros",
    "prune_layer",
    "select_mask",
    "sparsity_of",
]
