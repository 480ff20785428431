"""The damped Hessian and the factor every OBS sweep runs on: ``H + λ·mean(diag H)·I`` and the upper
Cholesky factor ``U`` of its inverse (``H⁻¹ = Uᵀ U``), with SparseGPT's rule for dead columns."""

from __future__ import annotations

import torch

from apt.errors import SingularHessianError


def damped_diagonal(diagonal: torch.Tensor, lam: float) -> torch.Tensor:
    """``diag H + λ·mean(diag H)``: SparseGPT's damping, relative to the mean of the diagonal (whose dead
    columns the caller has already set to 1)."""
    return diagonal + lam * diagonal.mean()


def inverse_hessian_factor(
    H: torch.Tensor, damp: float, max_retries: int, dead: torch.Tensor | None = None, in_place: bool = False
) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """Damp ``H`` and return ``(H_damped, U, damp_used, retries)`` with ``U`` the upper Cholesky factor of
    ``H_damped⁻¹`` (``H⁻¹ = Uᵀ U``). ``dead`` columns get a unit diagonal first. Retries with λ×10;
    never falls back to the identity. ``U`` is computed in one buffer (Cholesky, inverse and Cholesky
    again, each in place); with ``in_place`` the damping is added to ``H`` itself. So the peak is
    three ``[in, in]`` matrices, or two in place (it was five)."""
    diagonal = H.diagonal().clone()
    if dead is not None:
        diagonal[dead] = 1.0
    lam = damp
    info = torch.zeros((), dtype=torch.int32, device=H.device)
    for attempt in range(max_retries + 1):
        H_damped = H if in_place else H.clone()
        H_damped.diagonal().copy_(damped_diagonal(diagonal, lam))
        F = H_damped.clone()
        torch.linalg.cholesky_ex(F, out=(F, info))  # L
        if int(info) == 0:
            torch.cholesky_inverse(F, out=F)  # H_damped⁻¹
            torch.linalg.cholesky_ex(F, upper=True, out=(F, info))  # U
            if int(info) == 0 and bool(torch.isfinite(F).all()):
                return H_damped, F, lam, attempt
        del F
        lam = lam * 10.0 if lam > 0 else 1e-4
    raise SingularHessianError(
        f"the Hessian [{H.shape[0]}x{H.shape[0]}] is not positive definite even with damping "
        f"{lam / 10:g}·mean(diag H) after {max_retries} increases; calibrate on more tokens or pass a larger damp"
    )


def factorise(W, H, config, may_overwrite_H) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """Shared by the OBS methods: a copy of ``W`` with dead columns (zero diagonal: no calibration token
    reached them, so they do not affect the loss) zeroed, and the damped Hessian with a unit diagonal
    there, as in SparseGPT, with its factor."""
    dead = H.diagonal() == 0
    W = W.clone()
    W[:, dead] = 0.0
    H_damped, U, damp, retries = inverse_hessian_factor(
        H, config.damp_value, config.max_damp_retries, dead, in_place=may_overwrite_H
    )
    return W, H_damped, U, {"dead_columns": int(dead.sum()), "damp": damp, "damp_retries": retries}
