"""APT: optimal one-shot N:M pruning of language models (solver, pruning run, calibration, evaluation).

The solver is importable without transformers: ``from apt import prune_layer``.
"""

from apt.errors import (
    AptError,
    InvalidInputError,
    MissingDependencyError,
    ModelNotFoundError,
    SingularHessianError,
    UnsupportedModelError,
)
from apt.patterns import Pattern, is_nm_sparse
from apt.solver import METHODS, PruneConfig, PruneResult, SolverStats, layer_loss, prune_layer

__all__ = [
    "METHODS",
    "AptError",
    "InvalidInputError",
    "MissingDependencyError",
    "ModelNotFoundError",
    "Pattern",
    "PruneConfig",
    "PruneResult",
    "SingularHessianError",
    "SolverStats",
    "UnsupportedModelError",
    "is_nm_sparse",
    "layer_loss",
    "prune_layer",
]
__version__ = "0.1.0"
