"""Error-correcting targets: the weight a layer should be pruned toward when its inputs already carry the
error of the pruned layers before it."""

from __future__ import annotations

import torch

from apt.solver.hessian import damped_diagonal


def corrected_target(weight, hessian, cross, alpha: float, damp: float) -> torch.Tensor:
    """``W + α (W G H⁻¹ − W)`` for ``weight`` ``[out, in]``, the pruned model's ``hessian`` ``H = Σ x_p x_pᵀ`` and
    ``cross`` ``G = Σ x_d x_pᵀ`` (``[in, in]`` each): at α = 1 the weight whose output on the pruned model's
    inputs best matches the dense layer's output on the dense model's inputs. ``H`` is damped as the
    solver damps it (dead columns to 1, then ``damp·mean(diag H)``); solved in float64."""
    H = hessian.to(torch.float64).clone()
    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1.0
    H.diagonal().copy_(damped_diagonal(H.diagonal(), damp))
    W = weight.to(torch.float64)
    full = torch.linalg.solve(H, (W @ cross.to(torch.float64)).T).T
    return (W + alpha * (full - W)).to(weight.dtype)
