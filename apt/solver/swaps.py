"""Swap refinement of an N:M mask: exchange a kept and a pruned weight inside a group while the exact refit's
loss falls, each swap scored with the whole row, a window of columns or the group alone compensating."""

from __future__ import annotations

import torch

from apt.solver.loss import CHUNK_ELEMENTS
from apt.solver.patterns import Pattern
from apt.solver.refit import reconstruct, row_losses


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
    scoring: str = "exact",
    window: int = 64,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Swap a kept and a pruned weight inside an N:M group while it lowers the loss, alternated with
    reconstruction, until no swap helps.

    ``W_hat`` must be the exact reconstruction for ``mask``. ``scoring="exact"`` scores a swap with every
    kept weight of the row compensating (Schur complements on ``M = H_KK⁻¹``): removing kept k costs
    ``ŵ_k² / M_kk``; then adding pruned p gains ``g'_p² / s'_p`` where ``g'`` is the gradient after the
    removal and ``s'_p`` the Schur complement of p; O(out · in³) per round. ``"window"`` does the same
    within windows of ``window`` columns, ``"local"`` with the group alone compensating (both upper
    bounds of the exact change); a layer no wider than ``window`` is always scored exactly. Only the
    rows that swapped are refitted.
    Each round applies every row's best swap per group at once, reconstructs, and keeps a row's new
    mask only if its loss fell; a row whose loss rose takes only its single best swap from then on.
    """
    rows, cols = W.shape
    n_kept = cols // pattern.m * pattern.n
    single = torch.zeros(rows, dtype=torch.bool, device=W.device)
    losses = row_losses(W_hat, W, H)
    stats = {"rounds": 0, "swaps": 0, "iterations": 0, "residual": None}
    for _ in range(max_rounds):
        kept_idx, pruned_idx = kept_and_pruned(mask, n_kept)
        grad = (W_hat - W) @ H
        if scoring == "exact" or cols <= window:
            scores = _exact_swap_scores(W_hat, H, kept_idx, pruned_idx, grad, pattern.n, pattern.m, row_chunk_elements)
        elif scoring == "window":
            offset = (stats["rounds"] % 2) * (window // 2) // pattern.m * pattern.m  # no group stays at an edge
            scores = _window_swap_scores(W_hat, H, mask, grad, pattern, window, offset)
        else:
            scores = _local_swap_scores(W_hat, H, kept_idx, pruned_idx, grad, pattern.n, pattern.m)
        best, apply = _swaps_to_try(scores[0], losses, single, pattern)
        if not bool(apply.any()):
            break
        stats["rounds"] += 1
        new_mask, start = _swapped(mask, W_hat, kept_idx, pruned_idx, best, apply, scores, pattern)
        # only the rows that swapped are refitted
        changed = apply.any(dim=1).nonzero(as_tuple=True)[0]
        refit, iters, residual = reconstruct(
            W[changed], new_mask[changed], H, x0=start[changed], tol=tol, max_iter=max_iter
        )
        candidate = W_hat.clone()
        candidate[changed] = refit
        stats["iterations"] += iters
        new_losses = losses.clone()
        new_losses[changed] = row_losses(refit, W[changed], H)
        better = new_losses < losses  # a row keeps its new mask only if its loss fell
        stats["swaps"] += int(apply[better].sum())
        W_hat = torch.where(better.unsqueeze(1), candidate, W_hat)
        mask = torch.where(better.unsqueeze(1), new_mask, mask)
        losses = torch.where(better, new_losses, losses)
        single |= ~better & apply.any(dim=1)
        stats["residual"] = residual
    return W_hat, mask, stats


def _swaps_to_try(delta, losses, single, pattern: Pattern) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row and group, the best swap (index into the group's ``n·(m−n)`` swaps) and whether to apply it:
    every group whose best swap lowers the row's loss, or only the row's single best for ``single`` rows."""
    rows, groups = delta.shape[:2]
    threshold = -1e-9 * losses.clamp_min(0).view(rows, 1)
    best_val, best = delta.reshape(rows, groups, -1).min(dim=-1)
    apply = best_val < threshold
    if bool(single.any()):
        only_best = torch.zeros_like(apply)
        only_best[torch.arange(rows, device=delta.device), best_val.argmin(dim=1)] = True
        apply = torch.where(single.unsqueeze(1), apply & only_best, apply)
    return best, apply


def _swapped(mask, W_hat, kept_idx, pruned_idx, best, apply, scores, pattern: Pattern):
    """The swapped mask and the refit's starting point: the dropped weight at zero and the added one (with,
    for local scores, the group's other kept weights) at the value its score moved it to."""
    rows, groups = best.shape
    n, m = pattern.n, pattern.m
    k_col = kept_idx.view(rows, groups, n).gather(-1, (best // (m - n)).unsqueeze(-1)).squeeze(-1)
    p_col = pruned_idx.view(rows, groups, m - n).gather(-1, (best % (m - n)).unsqueeze(-1)).squeeze(-1)
    r_sel, g_sel = apply.nonzero(as_tuple=True)
    new_mask = mask.clone()
    start = W_hat.clone()
    new_mask[r_sel, k_col[r_sel, g_sel]] = False
    new_mask[r_sel, p_col[r_sel, g_sel]] = True
    start[r_sel, k_col[r_sel, g_sel]] = 0.0
    _, moved = scores
    if isinstance(moved, torch.Tensor):  # exact and window scores: the added weight's new value
        t = moved.view(rows, groups, -1).gather(-1, best.unsqueeze(-1)).squeeze(-1)
        start[r_sel, p_col[r_sel, g_sel]] = t[r_sel, g_sel]
    else:  # local scores: the group's other kept weights and the added one move by the local optimum
        columns, steps = moved
        pick = best.view(rows, groups, 1, 1).expand(-1, -1, 1, n)
        cols_sel = columns.view(rows, groups, -1, n).gather(2, pick).squeeze(2)[r_sel, g_sel]
        steps_sel = steps.view(rows, groups, -1, n).gather(2, pick).squeeze(2)[r_sel, g_sel]
        start.index_put_((r_sel.unsqueeze(1).expand_as(cols_sel), cols_sel), steps_sel, accumulate=True)
    return new_mask, start


def kept_and_pruned(mask: torch.Tensor, n_kept: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Column indices ``[rows, n_kept]`` kept and ``[rows, rest]`` pruned, ascending. Every row keeps exactly
    N per group, so both fall into consecutive runs of N (and M−N) per group."""
    order = mask.to(torch.int8).argsort(dim=1, descending=True, stable=True)
    return order[:, :n_kept].sort(dim=1).values, order[:, n_kept:].sort(dim=1).values


def _exact_swap_scores(W_hat, H, kept_idx, pruned_idx, grad, n, m, row_chunk_elements, which=None):
    """Every in-group swap's exact loss change, the whole row compensating: ``[rows, groups, n, m−n]``
    changes and the added weight's new value. ``H`` is one ``[in, in]`` matrix for every row, or one
    per row ``[B, in, in]`` picked by ``which`` ``[rows]``."""
    rows, n_kept = kept_idx.shape
    groups = n_kept // n
    delta = torch.empty(rows, groups, n, m - n, dtype=W_hat.dtype, device=W_hat.device)
    new_value = torch.empty_like(delta)
    chunk = max(1, row_chunk_elements // max(n_kept * n_kept, 1))
    for r0 in range(0, rows, chunk):
        K, P = kept_idx[r0 : r0 + chunk], pruned_idx[r0 : r0 + chunk]
        if which is None:
            H_KK = H[K.unsqueeze(-1), K.unsqueeze(-2)]
            H_KP = H[K.unsqueeze(-1), P.unsqueeze(-2)]
            H_PP = H.diagonal()[P]
        else:
            b = which[r0 : r0 + chunk].view(-1, 1, 1)
            H_KK = H[b, K.unsqueeze(-1), K.unsqueeze(-2)]
            H_KP = H[b, K.unsqueeze(-1), P.unsqueeze(-2)]
            H_PP = H[b.view(-1, 1), P, P]
        M = torch.cholesky_inverse(torch.linalg.cholesky(H_KK))
        V = M @ H_KP  # [c, |K|, |P|]
        s = H_PP - (H_KP * V).sum(dim=1)  # Schur complement of each pruned column
        M_kk = M.diagonal(dim1=1, dim2=2)
        x_k = W_hat.gather(1, K)
        c = K.shape[0]
        V_blocks = V.view(c, groups, n, groups, m - n).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)
        scale = (x_k / M_kk).view(c, groups, n, 1)
        g_after = grad.gather(1, P)[r0 : r0 + chunk].view(c, groups, 1, m - n) - scale * V_blocks
        s_after = s.view(c, groups, 1, m - n) + V_blocks**2 / M_kk.view(c, groups, n, 1)
        delta[r0 : r0 + chunk] = (x_k**2 / M_kk).view(c, groups, n, 1) - g_after**2 / s_after
        new_value[r0 : r0 + chunk] = -g_after / s_after
    return delta, new_value


def _local_swap_scores(W_hat, H, kept_idx, pruned_idx, grad, n, m, chunk_elements=CHUNK_ELEMENTS):
    """Every in-group swap (drop kept k, add pruned p) scored with only the group itself compensating:
    the other kept weights J of the group and p move to their joint optimum, everything else stays.

    With ``g = (ŵ − w) H`` and S = J ∪ {p}, setting ŵ_k = 0 and moving S by δ changes the loss by
    ``ŵ_k² H_kk − 2 ŵ_k g_k + 2 δ·b + δᵀ H_SS δ`` with ``b = g_S − ŵ_k H_Sk``, least at
    ``δ = −H_SS⁻¹ b``: ``Δ = ŵ_k² H_kk − 2 ŵ_k g_k − bᵀ H_SS⁻¹ b``. That point is feasible for the
    swapped mask, so Δ bounds the swap's change from above (the refit can only lower it), at the cost
    of an N×N solve per candidate: O(out·in) per round instead of O(out·in³).

    Returns ``Δ`` ``[rows, groups, n, m−n]`` and ``(columns, steps)`` ``[rows, groups, n, m−n, n]``:
    the columns of S (J then p) and δ on them.
    """
    rows, n_kept = kept_idx.shape
    groups = n_kept // n
    dev = W_hat.device
    H_groups = H.view(groups, m, groups, m).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [G, m, m]
    others = torch.tensor([[j for j in range(n) if j != a] for a in range(n)], device=dev, dtype=torch.long)
    delta = torch.empty(rows, groups, n, m - n, dtype=W_hat.dtype, device=dev)
    columns = torch.empty(rows, groups, n, m - n, n, dtype=torch.long, device=dev)
    steps = torch.empty(rows, groups, n, m - n, n, dtype=W_hat.dtype, device=dev)
    g_index = torch.arange(groups, device=dev).view(1, groups, 1, 1)
    step = max(1, chunk_elements // max(groups * n * (m - n) * n * n, 1))
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        c = r1 - r0
        kept = kept_idx[r0:r1].view(c, groups, n) % m  # positions inside the group
        pruned = pruned_idx[r0:r1].view(c, groups, m - n) % m
        J = kept[:, :, others]  # [c, G, n, n−1]: the kept ones other than candidate k
        S = torch.cat(
            [
                J.unsqueeze(3).expand(c, groups, n, m - n, n - 1),
                pruned.view(c, groups, 1, m - n, 1).expand(c, groups, n, m - n, 1),
            ],
            dim=-1,
        )  # [c, G, n, m−n, n]
        k = kept.view(c, groups, n, 1).expand(c, groups, n, m - n)
        H_SS = H_groups[g_index[..., None, None], S[..., :, None], S[..., None, :]]
        H_Sk = H_groups[g_index[..., None], S, k[..., None]]
        H_kk = H_groups[g_index, k, k]
        g_rows = grad[r0:r1].view(c, groups, m)
        w_rows = W_hat[r0:r1].view(c, groups, m)
        g_S = g_rows.gather(2, S.reshape(c, groups, -1)).view(S.shape)
        w_k = w_rows.gather(2, kept).view(c, groups, n, 1)
        g_k = g_rows.gather(2, kept).view(c, groups, n, 1)
        b = g_S - w_k.unsqueeze(-1) * H_Sk
        d = -torch.linalg.solve(H_SS, b.unsqueeze(-1)).squeeze(-1)
        delta[r0:r1] = w_k**2 * H_kk - 2 * w_k * g_k + (b * d).sum(-1)
        columns[r0:r1] = S + (torch.arange(groups, device=dev) * m).view(1, groups, 1, 1, 1)
        steps[r0:r1] = d
    return delta, (columns, steps)


def _window_swap_scores(W_hat, H, mask, grad, pattern: Pattern, window: int, offset: int):
    """Every in-group swap scored exactly as if only the weights of its window of ``window`` columns
    could compensate (the rest of the row held still): the same Schur-complement score as the exact
    one on the window's ``H`` block, with the row's true gradient. The moved point is feasible for the
    swapped mask, so the score bounds the swap's change from above; it costs O(out·in·window²) per
    round instead of O(out·in³). Windows start at ``offset``; the columns before it form a shorter
    first window, and so may the last ones."""
    rows, cols = W_hat.shape
    n, m = pattern.n, pattern.m
    groups = cols // m
    delta = torch.empty(rows, groups, n, m - n, dtype=W_hat.dtype, device=W_hat.device)
    new_value = torch.empty_like(delta)
    edges = sorted({0, cols, *range(offset, cols, window)})
    # windows of equal width are scored together: every row's slice of each such window is one problem
    spans = [(a, b) for a, b in zip(edges, edges[1:]) if b > a]
    for width in sorted({b - a for a, b in spans}):
        starts = torch.tensor([a for a, b in spans if b - a == width], device=W_hat.device)
        cols_idx = starts.view(-1, 1) + torch.arange(width, device=W_hat.device)  # [w, width]
        blocks = H[cols_idx.unsqueeze(-1), cols_idx.unsqueeze(-2)]  # [w, width, width]
        count = len(starts)

        def part(t, cols_idx=cols_idx, count=count, width=width):
            return t[:, cols_idx].reshape(rows * count, width)

        K, P = kept_and_pruned(part(mask), width // m * n)
        which = torch.arange(len(starts), device=W_hat.device).repeat(rows)
        d, v = _exact_swap_scores(part(W_hat), blocks, K, P, part(grad), n, m, 2**25, which)
        g0 = (starts // m).view(-1, 1) + torch.arange(width // m, device=W_hat.device)  # the windows' groups
        delta[:, g0.reshape(-1)] = d.view(rows, -1, n, m - n)
        new_value[:, g0.reshape(-1)] = v.view(rows, -1, n, m - n)
    return delta, new_value
