"""The accuracy levers of issue 12, each against an exact reference: the refit's ridge, the cheap swap
scores (upper bounds of the exact ones, exact for the point they move to), error-correcting targets."""

import itertools

import pytest
import torch

from apt import Pattern, prune_layer
from apt.solver import corrected_target, select_mask
from apt.solver.refit import reconstruct, row_losses
from apt.solver.swaps import _exact_swap_scores, _local_swap_scores, _window_swap_scores, kept_and_pruned


def _refitted_layer(correlated_layer, rows=6, cols=32, seed=5):
    W, H, _ = correlated_layer(rows, cols, tokens=96, seed=seed)
    mask = select_mask(
        torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=W.dtype), Pattern(2, 4)
    )
    W_hat, _, _ = reconstruct(W, mask, H, tol=1e-14, max_iter=500)
    return W, H, mask, W_hat


def _true_swap_changes(W, H, mask, W_hat, n=2, m=4):
    """Every in-group swap's change after the exact refit of the swapped mask: ``[rows, groups, n, m−n]``."""
    rows, cols = W.shape
    kept, pruned = kept_and_pruned(mask, cols // m * n)
    base = row_losses(W_hat, W, H)
    out = torch.empty(rows, cols // m, n, m - n, dtype=W.dtype)
    for g, a, b in itertools.product(range(cols // m), range(n), range(m - n)):
        swapped = mask.clone()
        k, p = kept[:, g * n + a], pruned[:, g * (m - n) + b]
        swapped[torch.arange(rows), k] = False
        swapped[torch.arange(rows), p] = True
        refit, _, _ = reconstruct(W, swapped, H, tol=1e-14, max_iter=500)
        out[:, g, a, b] = row_losses(refit, W, H) - base
    return out


def test_refit_ridge_solves_the_ridge_least_squares(correlated_layer):
    W, H, _ = correlated_layer(5, 16, tokens=40, seed=2)
    mu = 0.3
    result = prune_layer(W, H, damp=0.0, refit_damp=mu, tol=1e-14, max_iter=500, lookahead=False)
    A = H + mu * torch.diag(H.diagonal())
    for row in range(5):
        K = result.mask[row]
        expected = torch.linalg.solve(A[K][:, K], (A @ W[row])[K])  # stationarity of (ŵ−w)A(ŵ−w)ᵀ on K
        torch.testing.assert_close(result.weight[row, K], expected, rtol=0, atol=1e-8)
    # the ridge pulls toward the dense weights: no kept weight moves more than without it
    plain = prune_layer(W, H, damp=0.0, refit_damp=0.0, tol=1e-14, max_iter=500, lookahead=False)
    assert torch.equal(plain.mask, result.mask)
    assert ((result.weight - W)[result.mask].norm() < (plain.weight - W)[plain.mask].norm()).item()


def test_exact_swap_scores_are_the_refitted_changes(correlated_layer):
    W, H, mask, W_hat = _refitted_layer(correlated_layer)
    kept, pruned = kept_and_pruned(mask, 16)
    delta, _ = _exact_swap_scores(W_hat, H, kept, pruned, (W_hat - W) @ H, 2, 4, 2**25)
    torch.testing.assert_close(delta, _true_swap_changes(W, H, mask, W_hat), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("scoring", ["local", "window"])
def test_cheap_swap_scores_bound_the_exact_change_from_above(correlated_layer, scoring):
    W, H, mask, W_hat = _refitted_layer(correlated_layer)
    kept, pruned = kept_and_pruned(mask, 16)
    grad = (W_hat - W) @ H
    if scoring == "local":
        delta, (columns, steps) = _local_swap_scores(W_hat, H, kept, pruned, grad, 2, 4)
    else:
        delta, _ = _window_swap_scores(W_hat, H, mask, grad, Pattern(2, 4), window=16, offset=8)
    true = _true_swap_changes(W, H, mask, W_hat)
    assert bool((delta >= true - 1e-8 * true.abs().max()).all())
    assert bool((delta > true + 1e-6).any())  # a bound, not the exact change: less compensates
    if scoring == "local":
        # and exact for the point it moves to: k dropped, the group's other kept weight and p moved
        for g, a, b in [(0, 0, 0), (3, 1, 1), (7, 0, 1)]:
            moved = W_hat.clone()
            moved[torch.arange(6), kept[:, g * 2 + a]] = 0.0
            cols, step = columns[:, g, a, b], steps[:, g, a, b]
            moved.scatter_add_(1, cols, step)
            change = row_losses(moved, W, H) - row_losses(W_hat, W, H)
            torch.testing.assert_close(delta[:, g, a, b], change, rtol=1e-7, atol=1e-9)


def test_window_scores_over_the_whole_row_are_the_exact_ones(correlated_layer):
    W, H, mask, W_hat = _refitted_layer(correlated_layer)
    kept, pruned = kept_and_pruned(mask, 16)
    grad = (W_hat - W) @ H
    window, _ = _window_swap_scores(W_hat, H, mask, grad, Pattern(2, 4), window=32, offset=0)
    exact, _ = _exact_swap_scores(W_hat, H, kept, pruned, grad, 2, 4, 2**25)
    torch.testing.assert_close(window, exact, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("refine", ["local", "window", "exact"])
def test_refinement_only_lowers_the_loss_and_keeps_the_pattern(correlated_layer, refine):
    for seed in range(4):
        W, H, _ = correlated_layer(8, 96, tokens=192, seed=seed)
        # on the loss the refit minimises: H itself (with the ridge it would be H + μ·diag H)
        before = prune_layer(W, H, damp=0.0, tol=1e-12, refit_damp=0.0)
        after = prune_layer(W, H, damp=0.0, tol=1e-12, refit_damp=0.0, refine=refine, max_refine_rounds=20)
        assert after.loss <= before.loss * (1 + 1e-9)
        groups = after.mask.view(8, -1, 4).sum(-1)
        assert bool((groups == 2).all())
        if seed == 0:
            assert after.stats.refine_swaps > 0 and after.loss < before.loss


def test_corrected_target_fits_the_dense_outputs_from_the_pruned_inputs():
    g = torch.Generator().manual_seed(0)
    X_dense = torch.randn(300, 12, generator=g, dtype=torch.float64)  # tokens × in
    X_pruned = X_dense + 0.3 * torch.randn(300, 12, generator=g, dtype=torch.float64)
    W = torch.randn(5, 12, generator=g, dtype=torch.float64)
    H, G = X_pruned.T @ X_pruned, X_dense.T @ X_pruned
    full = corrected_target(W, H, G, alpha=1.0, damp=0.0)
    # min ‖X_d Wᵀ − X_p Ŵᵀ‖: least squares of the dense outputs on the pruned inputs
    expected = torch.linalg.lstsq(X_pruned, X_dense @ W.T).solution.T
    torch.testing.assert_close(full, expected, rtol=0, atol=1e-10)
    half = corrected_target(W, H, G, alpha=0.5, damp=0.0)
    torch.testing.assert_close(half, (W + expected) / 2, rtol=0, atol=1e-10)
    # with the same inputs on both sides the target is the weight itself
    torch.testing.assert_close(corrected_target(W, H, H, alpha=1.0, damp=0.0), W, rtol=0, atol=1e-10)


@pytest.mark.parametrize("pattern", [Pattern(2, 4), Pattern(1, 4), Pattern(4, 8)])
def test_the_projection_keeps_the_n_largest_of_every_group_by_brute_force(pattern):
    # against every N-subset of every group: the kept energy is the largest any subset keeps, at most N kept,
    # untouched; ties (integers here) are where the 2:4 min/max network hands a group to topk
    from apt.solver.admm import project

    g = torch.Generator().manual_seed(0)
    for W in (torch.randn(16, 64, generator=g), torch.randint(-3, 4, (16, 64), generator=g).float()):
        P = project(W, pattern)
        groups, kept = W.reshape(-1, pattern.m), P.reshape(-1, pattern.m)
        assert bool((kept == groups).logical_or(kept == 0).all()) and int((kept != 0).sum(dim=1).max()) <= pattern.n
        best = torch.stack(
            [(groups[:, list(c)] ** 2).sum(dim=1) for c in itertools.combinations(range(pattern.m), pattern.n)]
        ).amax(dim=0)
        assert torch.equal((kept**2).sum(dim=1), best)
        keep = torch.zeros_like(groups, dtype=torch.bool)  # the generic path's choice, ties included
        keep.scatter_(1, groups.abs().topk(pattern.n, dim=1).indices, True)
        assert torch.equal(P.reshape(-1, pattern.m), groups * keep)


def test_admm_support_search_stays_at_the_optimum_once_the_penalty_holds_it(correlated_layer):
    # with H = I the optimum N:M weight is the magnitude projection of w; under a penalty larger than every
    # pruned/kept ratio it is a fixed point of the iteration, which then stops after its patience
    from apt.solver.admm import admm_support, project

    W, _, _ = correlated_layer(8, 32)
    H = torch.eye(32, dtype=W.dtype)
    mask, steps, _ = admm_support(W, H, project(W, Pattern(2, 4)), Pattern(2, 4), rho=50.0, patience=4)
    assert torch.equal(mask, select_mask(W.abs(), Pattern(2, 4))) and steps == 4


def test_admm_support_search_is_never_worse_than_joint_removal_and_better_somewhere(correlated_layer):
    # each row keeps the support of lower calibration loss after the same refit: never worse, layer by layer
    gained = 0
    for seed in range(6):
        W, H, _ = correlated_layer(6, 16, tokens=48, seed=seed)
        off = prune_layer(W, H, mask_search="off")
        admm = prune_layer(W, H, mask_search="admm")
        assert is_nm(admm.weight) and admm.loss <= off.loss * (1 + 1e-12), (seed, admm.loss, off.loss)
        rows = admm.stats.mask_search_rows
        assert 0 <= rows <= 6 and (rows == 0) == torch.equal(admm.mask, off.mask)
        gained += admm.loss < off.loss * (1 - 1e-6)
    assert gained > 0  # the search finds a better support on some of these layers


def test_admm_support_of_a_row_does_not_depend_on_the_rows_beside_it(correlated_layer):
    # torchrun solves a layer's rows in slices: each row must settle on the support it settles on alone
    from apt.solver.admm import admm_support, project

    W, H, _ = correlated_layer(12, 32, tokens=64, seed=3)
    start = project(W, Pattern(2, 4))
    whole, steps, weight = admm_support(W, H, start, Pattern(2, 4))
    alone = [admm_support(W[r : r + 1], H, start[r : r + 1], Pattern(2, 4)) for r in range(12)]
    assert torch.equal(whole, torch.cat([mask for mask, _, _ in alone]))
    assert steps == max(s for _, s, _ in alone) and len({s for _, s, _ in alone}) > 1  # rows settle at different steps
    torch.testing.assert_close(weight, torch.cat([w for _, _, w in alone]))
    assert torch.equal(weight != 0, whole)  # the refit on the searched support starts from the search's iterate


def test_the_balanced_permutation_gives_each_group_one_channel_of_each_saliency_tier(correlated_layer):
    from apt.solver.permute import balanced_permutation, inverse

    W, H, _ = correlated_layer(8, 32)
    perm = balanced_permutation(W, H, 4)
    assert sorted(perm.tolist()) == list(range(32)) and torch.equal(perm[inverse(perm)], torch.arange(32))
    saliency = H.diagonal() * (W * W).sum(dim=0)
    tier = torch.empty(32, dtype=torch.long)
    tier[saliency.argsort(descending=True)] = torch.arange(32) // 8
    assert all(sorted(tier[perm[g * 4 : g * 4 + 4]].tolist()) == [0, 1, 2, 3] for g in range(8))


def is_nm(weight):
    return bool(((weight != 0).reshape(weight.shape[0], -1, 4).sum(-1) <= 2).all())
