"""The registry of pruning methods: one function over ``(W, H, config)`` and the options it reads, per method.

``magnitude`` and ``wanda`` choose a mask from a score; ``sparsegpt`` sweeps the columns removing one
weight at a time (Frantar & Alistarh 2023); ``apt`` removes the M−N weights of every group jointly,
refits the kept weights exactly and may refine the mask by swaps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from apt.solver.admm import admm_support
from apt.solver.hessian import factorise
from apt.solver.loss import Quadratic
from apt.solver.patterns import select_mask
from apt.solver.refit import reconstruct
from apt.solver.swaps import refine_mask
from apt.solver.sweeps import joint_removal_sweep, sparsegpt_sweep

if TYPE_CHECKING:
    from apt.solver.layer import PruneConfig

# A method: (W [out, in], H [in, in], config, may it damp H in place) in the compute dtype → (Ŵ, keep-mask,
# stats fields). It never modifies W; it modifies H only by adding to its diagonal, and only when allowed.
MethodFn = Callable[[torch.Tensor, torch.Tensor, "PruneConfig", bool], tuple[torch.Tensor, torch.Tensor, dict]]


@dataclass(frozen=True)
class Method:
    prune: MethodFn
    options: frozenset[str]  # the PruneConfig options it reads


def _magnitude(W, H, config, may_overwrite_H):
    return W, select_mask(W.abs(), config.pattern), {}


def _wanda(W, H, config, may_overwrite_H):
    # Sun et al. 2023: |w_ij| · ‖x_j‖₂, with ‖x_j‖² = H_jj.
    return W, select_mask(W.abs() * H.diagonal().clamp_min(0).sqrt().unsqueeze(0), config.pattern), {}


def _sparsegpt(W, H, config, may_overwrite_H):
    W, _, U, info = factorise(W, H, config, may_overwrite_H)
    W_hat, mask = sparsegpt_sweep(W, U, config.pattern, config.blocksize)
    return W_hat, mask, info


def _apt(W, H, config, may_overwrite_H):
    """Joint removal per N:M group, then the exact refit of the kept weights, then (optionally) swaps.
    On unstructured ratios: SparseGPT's adaptive mask, then the exact refit."""
    undamped = Quadratic(H, H.diagonal().clone())
    W_target, H_damped, U, info = factorise(W, H, config, may_overwrite_H)
    pattern = config.pattern
    lookahead = config.use_lookahead
    if pattern.is_nm:
        W_hat, mask = joint_removal_sweep(W_target.clone(), U, pattern, config.blocksize, lookahead)
    else:
        W_hat, mask = sparsegpt_sweep(W_target.clone(), U, pattern, config.blocksize)
    del U  # the refit needs only the damped Hessian
    searched = None
    if config.mask_search_mode == "admm":  # N:M only: PruneConfig refuses it on other patterns
        searched, info["mask_search_steps"], x0 = admm_support(W_target, H_damped, W_hat, pattern)
    info["lookahead"] = lookahead
    if config.use_reconstruct:
        info["loss_before_reconstruction"] = undamped.loss(W_hat, W)
        info["refit_damp"] = config.refit_damp_value
        if config.refit_damp_value:  # ridge toward the dense weights: H + μ·diag(H)
            H_damped.diagonal().add_(config.refit_damp_value * undamped.diagonal)
        W_hat, info["iterations"], info["residual"] = reconstruct(
            W_target, mask, H_damped, x0=W_hat, tol=config.tol, max_iter=config.max_iter
        )
        if searched is not None:
            W_searched, its, residual = reconstruct(
                W_target, searched, H_damped, x0=x0, tol=config.tol, max_iter=config.max_iter
            )
            info["iterations"], info["residual"] = max(info["iterations"], its), max(info["residual"], residual)
            W_hat, mask, info["mask_search_rows"] = _better_rows(W, undamped, (W_hat, mask), (W_searched, searched))
        if config.refine_mode != "off":
            W_hat, mask, refined = refine_mask(
                W_target,
                mask,
                H_damped,
                W_hat,
                pattern,
                tol=config.tol,
                max_iter=config.max_iter,
                max_rounds=config.max_refine_rounds,
                scoring=config.refine_mode,
            )
            info["refine_rounds"], info["refine_swaps"] = refined["rounds"], refined["swaps"]
            info["iterations"] += refined["iterations"]
            info["residual"] = refined["residual"]
    return W_hat, mask, info


def _better_rows(W, undamped, start, searched):
    """Each row with the support of lower calibration loss after the exact refit: the joint-removal one
    or the searched one (each a refitted ``(weight, mask)``). Rows are independent, so the result is never
    worse than either, row by row. Returns ``(weight, mask, rows that took the searched support)``."""
    better = (undamped.row_losses(searched[0], W) < undamped.row_losses(start[0], W)).unsqueeze(1)
    weight, mask = (torch.where(better, s, j) for s, j in zip(searched, start))
    return weight, mask, int(better.sum())


METHODS: dict[str, Method] = {
    "magnitude": Method(_magnitude, frozenset()),
    "wanda": Method(_wanda, frozenset()),
    "sparsegpt": Method(_sparsegpt, frozenset({"damp"})),
    "apt": Method(_apt, frozenset({"damp", "refit_damp", "reconstruct", "refine", "lookahead", "mask_search"})),
}
