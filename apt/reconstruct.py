"""Optimal reconstruction of the kept weights for a fixed mask, and swap refinement of the mask.

For a row ``w`` with kept set K and pruned set P, the exact minimiser of ``(ŵ − w) H (ŵ − w)ᵀ``
subject to ``ŵ_P = 0`` solves ``H_KK ŵ_K = (H wᵀ)_K`` (stationarity on K). Every row shares one H, so
all rows are solved together by conjugate gradients on the masked operator ``x ↦ mask ⊙ (x H)`` —
one ``[out, in] × [in, in]`` GEMM per iteration — with a Jacobi preconditioner and a warm start.
"""

from __future__ import annotations

import torch

from apt.patterns import Pattern

# Rows are refitted in chunks of at most this many weights: CG keeps about ten [rows, in] temporaries,
# which for a wide layer (Llama-3-70B's down_proj: 8192 × 28672) would be 9 GB at once; a chunk keeps
# them at ~40 MB. SmolLM2's widest layer (576 × 1536) fits one chunk.
CHUNK_ELEMENTS = 2**20


def reconstruct(
    W: torch.Tensor,
    mask: torch.Tensor,
    H: torch.Tensor,
    x0: torch.Tensor | None = None,
    tol: float = 1e-4,
    max_iter: int = 300,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, int, float]:
    """Solve ``min_ŵ (ŵ − w) H (ŵ − w)ᵀ`` s.t. ``ŵ = 0`` where ``mask`` is False, for every row of ``W``,
    in chunks of rows (each row's solve is independent of the others). See ``_conjugate_gradients``.
    The result may be written into ``x0``'s memory."""
    rows, cols = W.shape
    step = max(1, chunk_elements // max(cols, 1))
    if rows <= step:
        return _conjugate_gradients(W, mask, H, x0, tol, max_iter)
    out, iterations, residual = x0 if x0 is not None else torch.empty_like(W), 0, 0.0
    for r0 in range(0, rows, step):
        part = slice(r0, min(r0 + step, rows))
        x, its, res = _conjugate_gradients(W[part], mask[part], H, None if x0 is None else x0[part], tol, max_iter)
        out[part] = x
        iterations, residual = max(iterations, its), max(residual, res)
    return out, iterations, residual


def _conjugate_gradients(
    W: torch.Tensor, mask: torch.Tensor, H: torch.Tensor, x0: torch.Tensor | None, tol: float, max_iter: int
) -> tuple[torch.Tensor, int, float]:
    """Solve ``min_ŵ (ŵ − w) H (ŵ − w)ᵀ`` s.t. ``ŵ = 0`` where ``mask`` is False, for every row of ``W``.

    ``W`` ``[out, in]`` (targets), ``mask`` bool ``[out, in]`` (True = kept), ``H`` ``[in, in]`` positive
    definite, ``x0`` an optional starting point. Each CG step lowers a row's loss by exactly ``α·rᵀz``;
    a row stops when that step lowered its loss by at most ``tol`` times the loss itself (or reached
    the exact solution). The preconditioner is Jacobi: on SmolLM2's layers, exact per-row inverses of
    the kept 64×64 diagonal blocks saved 6 % of the iterations and cost more than they saved, as the
    correlations are not local. Returns ``(Ŵ, iterations, residual)`` with the true final max relative
    residual ``‖H_KK ŵ_K − (H w)_K‖ / ‖(H w)_K‖``.
    """
    tiny = torch.finfo(W.dtype).tiny
    maskf = mask.to(W.dtype)
    WH = W @ H
    b = WH * maskf
    x = (x0 if x0 is not None else W) * maskf
    Hx = x @ H
    r = b - Hx * maskf
    loss = ((Hx - WH) * (x - W)).sum(dim=1)  # (x − w) H (x − w)ᵀ per row
    inv_diag = maskf / H.diagonal().unsqueeze(0)
    z = r * inv_diag
    p = z.clone()
    rz = (r * z).sum(dim=1)
    active = rz > 0
    iterations = 0
    while iterations < max_iter and bool(active.any()):
        Ap = (p @ H) * maskf
        pAp = (p * Ap).sum(dim=1)
        alpha = torch.where(active & (pAp > 0), rz / pAp.clamp_min(tiny), 0.0)
        x += alpha.unsqueeze(1) * p
        r -= alpha.unsqueeze(1) * Ap
        decrease = alpha * rz
        loss = (loss - decrease).clamp_min(0)
        z = r * inv_diag
        rz_new = (r * z).sum(dim=1)
        beta = torch.where(rz > 0, rz_new / rz.clamp_min(tiny), 0.0)
        p = z + beta.unsqueeze(1) * p
        rz = rz_new
        iterations += 1
        active &= (decrease > tol * loss) & (rz > 0)
    b_norm = b.norm(dim=1).clamp_min(tiny)
    true_residual = ((b - (x @ H) * maskf).norm(dim=1) / b_norm).max()
    return x, iterations, float(true_residual)


def row_losses(W_hat: torch.Tensor, W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Per-row loss ``(ŵ − w) H (ŵ − w)ᵀ`` → ``[out]``."""
    D = W_hat - W
    return ((D @ H) * D).sum(dim=1)


def refine_mask(
    W: torch.Tensor,
    mask: torch.Tensor,
    H: torch.Tensor,
    W_hat: torch.Tensor,
    pattern: Pattern,
    tol: float,
    max_iter: int,
    max_rounds: int,
    row_chunk_elements: int = 2**25,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Swap a kept and a pruned weight inside an N:M group while it lowers the loss, alternated with
    reconstruction, until no swap helps.

    ``W_hat`` must be the exact reconstruction for ``mask``. A swap is scored exactly, with every kept
    weight of the row compensating (Schur complements on ``M = H_KK⁻¹``): removing kept k costs
    ``ŵ_k² / M_kk``; then adding pruned p gains ``g'_p² / s'_p`` where ``g'`` is the gradient after the
    removal and ``s'_p`` the Schur complement of p. Cost per round: O(out · in³), so this stays opt-in.
    Each round applies every row's best swap per group at once, reconstructs, and keeps a row's new
    mask only if its loss fell; a row whose loss rose takes only its single best swap from then on.
    """
    rows, cols = W.shape
    n, m = pattern.n, pattern.m
    groups = cols // m
    n_kept = groups * n
    dev = W.device
    arange_rows = torch.arange(rows, device=dev)
    single = torch.zeros(rows, dtype=torch.bool, device=dev)
    losses = row_losses(W_hat, W, H)
    stats = {"rounds": 0, "swaps": 0, "iterations": 0, "residual": None}
    chunk = max(1, row_chunk_elements // max(n_kept * n_kept, 1))
    for _ in range(max_rounds):
        # every row keeps exactly N per group, so kept/pruned columns sorted ascending fall into
        # consecutive runs of N (and M−N) per group
        order = mask.to(torch.int8).argsort(dim=1, descending=True, stable=True)
        kept_idx = order[:, :n_kept].sort(dim=1).values
        pruned_idx = order[:, n_kept:].sort(dim=1).values
        grad = (W_hat - W) @ H
        delta = torch.empty(rows, groups, n, m - n, dtype=W.dtype, device=dev)
        new_value = torch.empty_like(delta)
        for r0 in range(0, rows, chunk):
            K, P = kept_idx[r0 : r0 + chunk], pruned_idx[r0 : r0 + chunk]
            H_KK = H[K.unsqueeze(-1), K.unsqueeze(-2)]
            H_KP = H[K.unsqueeze(-1), P.unsqueeze(-2)]
            M = torch.cholesky_inverse(torch.linalg.cholesky(H_KK))
            V = M @ H_KP  # [c, |K|, |P|]
            s = H.diagonal()[P] - (H_KP * V).sum(dim=1)  # Schur complement of each pruned column
            M_kk = M.diagonal(dim1=1, dim2=2)
            x_k = W_hat.gather(1, K)
            c = K.shape[0]
            V_blocks = V.view(c, groups, n, groups, m - n).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)
            scale = (x_k / M_kk).view(c, groups, n, 1)
            g_after = grad.gather(1, P)[r0 : r0 + chunk].view(c, groups, 1, m - n) - scale * V_blocks
            s_after = s.view(c, groups, 1, m - n) + V_blocks**2 / M_kk.view(c, groups, n, 1)
            delta[r0 : r0 + chunk] = (x_k**2 / M_kk).view(c, groups, n, 1) - g_after**2 / s_after
            new_value[r0 : r0 + chunk] = -g_after / s_after
        threshold = -1e-9 * losses.clamp_min(0).view(rows, 1)
        flat = delta.view(rows, groups, n * (m - n))
        best_val, best = flat.min(dim=-1)
        apply = best_val < threshold
        if bool(single.any()):
            only_best = torch.zeros_like(apply)
            only_best[arange_rows, best_val.argmin(dim=1)] = True
            apply = torch.where(single.unsqueeze(1), apply & only_best, apply)
        if not bool(apply.any()):
            break
        stats["rounds"] += 1
        k_col = kept_idx.view(rows, groups, n).gather(-1, (best // (m - n)).unsqueeze(-1)).squeeze(-1)
        p_col = pruned_idx.view(rows, groups, m - n).gather(-1, (best % (m - n)).unsqueeze(-1)).squeeze(-1)
        t = new_value.view(rows, groups, -1).gather(-1, best.unsqueeze(-1)).squeeze(-1)
        r_sel, g_sel = apply.nonzero(as_tuple=True)
        new_mask = mask.clone()
        start = W_hat.clone()
        new_mask[r_sel, k_col[r_sel, g_sel]] = False
        new_mask[r_sel, p_col[r_sel, g_sel]] = True
        start[r_sel, k_col[r_sel, g_sel]] = 0.0
        start[r_sel, p_col[r_sel, g_sel]] = t[r_sel, g_sel]
        candidate, iters, residual = reconstruct(W, new_mask, H, x0=start, tol=tol, max_iter=max_iter)
        stats["iterations"] += iters
        new_losses = row_losses(candidate, W, H)
        better = new_losses < losses
        stats["swaps"] += int(apply[better].sum())
        W_hat = torch.where(better.unsqueeze(1), candidate, W_hat)
        mask = torch.where(better.unsqueeze(1), new_mask, mask)
        losses = torch.where(better, new_losses, losses)
        single |= ~better & apply.any(dim=1)
        stats["residual"] = residual
    return W_hat, mask, stats
