"""APT: optimal one-shot N:M pruning of language models.

Layers, lowest first (each may import the ones before it, never after): ``errors``, ``atomic``,
``collective`` (shared by all); ``solver`` (pure tensor math); ``text`` (calibration and evaluation
text); ``models`` (checkpoints, families, loading, the model streamed block by block); ``folder`` (what a
written folder holds: report, targets, card); ``measure`` (accuracy); ``run`` (the pruning run).
This package never imports ``serving``, ``exporters``, ``runtime_bench`` or ``apt_sparse``.
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
from apt.solver import METHODS, Pattern, PruneConfig, PruneResult, SolverStats, is_nm_sparse, layer_loss, prune_layer

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
