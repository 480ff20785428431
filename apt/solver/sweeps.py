"""Optimal Brain Surgeon column sweeps over a layer: SparseGPT's single removal and APT's joint removal.

Both sweep the input columns left to right with the upper Cholesky factor ``U`` of the damped
inverse Hessian (``H⁻¹ = Uᵀ U``), push each pruning error onto the columns to its right, and batch
those updates lazily in blocks of columns (SparseGPT §3.1). They differ in what is removed at once:
one weight (SparseGPT) or the whole set of M−N weights of an N:M group, with its closed-form joint
optimum (APT).
"""

from __future__ import annotations

import itertools

import torch

from apt.solver.patterns import Pattern

LOOKAHEAD_MAX_CANDIDATES = 20


def block_ranges(cols: int, blocksize: int, m: int):
    step = max(m, blocksize // m * m)
    for i1 in range(0, cols, step):
        yield i1, min(i1 + step, cols)


def sparsegpt_sweep(W: torch.Tensor, U: torch.Tensor, pattern: Pattern, blocksize: int):
    """SparseGPT (Frantar & Alistarh 2023, Alg. 1): per-column OBS with lazy batch updates.

    N:M masks are chosen per group at its first column from ``w²/U_jj²``; unstructured masks per row
    inside each block of columns (adaptive mask selection)."""
    rows, cols = W.shape
    m = pattern.m if pattern.is_nm else 1
    pruned = torch.zeros_like(W, dtype=torch.bool)
    for i1, i2 in block_ranges(cols, blocksize, m):
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        d = U1.diagonal()
        Err1 = torch.zeros_like(W1)
        prune1 = torch.zeros_like(W1, dtype=torch.bool)
        if not pattern.is_nm:
            k = round(pattern.sparsity * (i2 - i1))
            if k:
                prune1.scatter_(1, (W1**2 / d**2).topk(k, dim=1, largest=False).indices, True)
        for i in range(i2 - i1):
            if pattern.is_nm and i % m == 0:
                saliency = W1[:, i : i + m] ** 2 / d[i : i + m] ** 2
                prune1.scatter_(1, i + saliency.topk(m - pattern.n, dim=1, largest=False).indices, True)
            w = W1[:, i]
            err = torch.where(prune1[:, i], w, torch.zeros_like(w)) / d[i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W1[prune1] = 0.0
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
        pruned[:, i1:i2] = prune1
    return W, ~pruned


def joint_removal_sweep(W: torch.Tensor, U: torch.Tensor, pattern: Pattern, blocksize: int, lookahead: bool = False):
    """Multiple removal per N:M group (APT): every row removes the jointly cheapest set Q.

    With F the still-free columns, (H_FF)⁻¹ = U_FFᵀ U_FF, so for group g the 4×4 block is
    S = U_ggᵀ U_gg; each candidate Q costs ΔL = w_Q S_QQ⁻¹ w_Qᵀ and the optimal update of the free
    columns is δw_F = −(w_Q S_QQ⁻¹ U_gQᵀ) U_gF — an error vector over the group's rows of U, so
    SparseGPT's lazy batch updates carry over unchanged.
    """
    rows, cols = W.shape
    m, n_remove = pattern.m, pattern.m - pattern.n
    candidates = torch.tensor(list(itertools.combinations(range(m), n_remove)), device=W.device)
    # lookahead scores C(M,N)² windows per group: 36 for 2:4, but 4900 for 4:8 (too large to be worth it)
    lookahead = lookahead and len(candidates) <= LOOKAHEAD_MAX_CANDIDATES
    pair_candidates = torch.cat(
        [candidates.repeat_interleave(len(candidates), 0), m + candidates.repeat(len(candidates), 1)], dim=1
    )
    # Every group's small matrices at once. A candidate's cost w_Q S_QQ⁻¹ w_Qᵀ is a quadratic form in
    # the window's weights, so each candidate's S_QQ⁻¹ is scattered into a window-sized matrix A and
    # the costs of all candidates become one product (w ⊗ w) · A per group.
    G = cols // m
    U_groups = U.view(G, m, G, m).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [G, m, m]
    S_QQ_inv_all = torch.linalg.inv(
        (U_groups.transpose(1, 2) @ U_groups)[:, candidates[:, :, None], candidates[:, None, :]]
    )  # [G, C, r, r]
    A1 = _quadratic_forms(S_QQ_inv_all, candidates, m)  # [G, m·m, C]
    if lookahead and G > 1:
        U_windows = torch.stack([U[c : c + 2 * m, c : c + 2 * m] for c in range(0, cols - m, m)])  # [G-1, 2m, 2m]
        S2 = U_windows.transpose(1, 2) @ U_windows
        A2 = _quadratic_forms(
            torch.linalg.inv(S2[:, pair_candidates[:, :, None], pair_candidates[:, None, :]]), pair_candidates, 2 * m
        )  # [G-1, 4m², C²]
    pruned = torch.zeros_like(W, dtype=torch.bool)
    for i1, i2 in block_ranges(cols, blocksize, m):
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for g in range(0, i2 - i1, m):
            c = i1 + g
            wg = W1[:, g : g + m]
            if lookahead and c + 2 * m <= cols:
                # choose this group's set by the joint optimum over this group and the next
                # (receding horizon: only this group's removal is applied now)
                if g + m < i2 - i1:
                    nxt = W1[:, g + m : g + 2 * m]
                else:  # the next group lies in the next block: add the update still pending for it
                    nxt = W[:, c + m : c + 2 * m] + Err1 @ U[i1:i2, c + m : c + 2 * m]
                window = torch.cat([wg, nxt], dim=1)
                cost = _outer(window) @ A2[c // m]  # [rows, C²]
                best = cost.view(rows, len(candidates), len(candidates)).amin(dim=2).argmin(dim=1)
            else:
                best = (_outer(wg) @ A1[c // m]).argmin(dim=1)  # smallest joint ΔL per row
            Q = candidates[best]  # [rows, r]
            lam = torch.einsum("br,brs->bs", wg.gather(1, Q), S_QQ_inv_all[c // m][best])  # w_Q S_QQ⁻¹
            err = -(lam.unsqueeze(-1) * U_groups[c // m].T[Q]).sum(dim=1)  # [rows, m]
            W1[:, g:] += err @ U1[g : g + m, g:]
            group_pruned = torch.zeros(rows, m, dtype=torch.bool, device=W.device)
            group_pruned.scatter_(1, Q, True)
            W1[:, g : g + m][group_pruned] = 0.0
            pruned[:, i1 + g : i1 + g + m] = group_pruned
            Err1[:, g : g + m] = err
        W[:, i1:i2] = W1
        W[:, i2:] += Err1 @ U[i1:i2, i2:]
    return W, ~pruned


def _quadratic_forms(inverses: torch.Tensor, index: torch.Tensor, width: int) -> torch.Tensor:
    """Scatter each candidate's ``[r, r]`` inverse (``inverses`` ``[G, C, r, r]``, positions ``index``
    ``[C, r]``) into a ``[width, width]`` matrix; returns ``[G, width², C]`` so that
    ``(w ⊗ w) @ A`` gives every candidate's ``w_Q S_QQ⁻¹ w_Qᵀ``."""
    groups, n_cand, r, _ = inverses.shape
    A = torch.zeros(groups, n_cand, width * width, dtype=inverses.dtype, device=inverses.device)
    flat = (index[:, :, None] * width + index[:, None, :]).reshape(1, n_cand, r * r).expand(groups, -1, -1)
    A.scatter_(2, flat, inverses.reshape(groups, n_cand, r * r))
    return A.transpose(1, 2)


def _outer(w: torch.Tensor) -> torch.Tensor:
    """``[rows, k]`` → ``[rows, k²]``, the flattened outer product of each row with itself."""
    return (w.unsqueeze(2) * w.unsqueeze(1)).reshape(w.shape[0], -1)
