"""One-shot pruning of one linear layer: ``prune_layer(weight, hessian, ...) -> PruneResult``.

The layer problem: for ``W`` ``[out, in]`` and ``H = Σ x xᵀ`` ``[in, in]`` over the calibration
tokens, find ``Ŵ`` with the sparsity pattern that minimises

    L(Ŵ) = tr((Ŵ − W) H (Ŵ − W)ᵀ)

The problem splits by output row and every method here is vectorised over rows. Methods are entries
of one registry, ``METHODS``: a function over ``(W, H, config)`` and the options it reads. This module
is a pure function of tensors: no model, no file, no printing, no device calls of its own.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch

from apt.errors import InvalidInputError
from apt.solver.loss import Quadratic
from apt.solver.methods import METHODS
from apt.solver.patterns import Pattern, positive_zeros
from apt.solver.sweeps import LOOKAHEAD_MAX_CANDIDATES

DEFAULT_DAMP = 0.01
DEFAULT_REFIT_DAMP = 0.1
REFINE_MODES = ("off", "local", "window", "exact")
MASK_SEARCHES = ("off", "admm")


@dataclass(frozen=True)
class PruneConfig:
    """How to prune one layer.

    ``damp`` is λ in the damping ``λ·mean(diag H)`` added to the diagonal (default 0.01); a failed
    factorisation retries with λ×10 up to ``max_damp_retries`` times. The apt-only options:

    - ``reconstruct`` (default on): the exact refit of the kept weights for the final mask. It stops
      for a row when a conjugate-gradient step lowered its loss by at most ``tol`` times the loss.
    - ``lookahead`` (default on for 2:4): each group's removal set is the joint optimum over the group
      and the next one (C(M,N)² candidates, so 2:4 only: 4:8 would need 4900), and only the first is
      applied. On tiny correlated layers it cut the median loss over the brute-force optimum from
      1.63× to 1.33× (4×12); on SmolLM2's layers it changed the summed loss by 0.2 %.
    - ``refit_damp`` μ: the refit minimises ``(ŵ−w)(H + μ·diag H)(ŵ−w)ᵀ`` instead of the loss on H
      alone, a ridge toward the dense weights that shrinks the calibration tokens' correlations
      toward independent inputs: the exact refit otherwise fits the calibration domain more than text
      of other kinds. Default ``DEFAULT_REFIT_DAMP``, chosen on held-out calibration text
      (``runtime_bench.method_comparison``).
    - ``mask_search`` (default ``"admm"`` on N:M patterns with the refit, else ``"off"``): after the
      joint-removal sweep, ADMM searches the N:M support (``apt.solver.admm``); both supports are refitted
      and each row keeps the one of lower calibration loss, so it is never worse than the sweep's. Chosen
      on held-out calibration text (``runtime_bench.method_comparison``); it costs ~1.4× apt's pruning time
      without it on SmolLM2. ``"off"``: the sweep's mask alone.
    - ``refine``: swap refinement of the mask, alternated with the refit, each swap scored with
      ``"local"`` (the group's own weights compensating, O(out·in) per round), ``"window"`` (a
      64-column window, O(out·in·64²)) or ``"exact"`` (the whole row, O(out·in³)) compensation;
      ``True`` means ``"exact"``. Default ``"off"``.

    An option left ``None`` takes the method's default; an option the method does not read is refused,
    so no setting is silently ignored.
    """

    method: str = "apt"
    pattern: Pattern = field(default_factory=lambda: Pattern(2, 4))
    damp: float | None = None
    refit_damp: float | None = None
    reconstruct: bool | None = None
    refine: bool | str | None = None
    mask_search: str | None = None
    lookahead: bool | None = None
    blocksize: int = 128
    tol: float = 1e-4
    max_iter: int = 300
    max_refine_rounds: int = 50
    max_damp_retries: int = 4

    def __post_init__(self) -> None:
        object.__setattr__(self, "pattern", Pattern.parse(self.pattern))
        if self.method not in METHODS:
            raise InvalidInputError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        reads = METHODS[self.method].options
        if self.refine is True:
            object.__setattr__(self, "refine", "exact")
        elif self.refine is False:
            object.__setattr__(self, "refine", "off")
        for option in ("damp", "refit_damp", "reconstruct", "refine", "lookahead", "mask_search"):
            if getattr(self, option) is not None and option not in reads:
                raise InvalidInputError(
                    f"{option} is not an option of method {self.method!r} "
                    f"(it reads {', '.join(sorted(reads)) or 'no options'})"
                )
        for option in ("damp", "refit_damp"):
            value = getattr(self, option)
            if value is not None and not (value >= 0.0):
                raise InvalidInputError(f"{option} must be >= 0, got {value}")
        if self.mask_search is not None and self.mask_search not in MASK_SEARCHES:
            raise InvalidInputError(f"mask_search takes one of {', '.join(MASK_SEARCHES)}, got {self.mask_search!r}")
        if self.mask_search not in (None, "off") and not self.pattern.is_nm:
            raise InvalidInputError(f"mask_search searches N:M supports; pattern {self.pattern} has none")
        if self.mask_search not in (None, "off") and self.reconstruct is False:
            raise InvalidInputError("mask_search sets only the mask: the exact refit must set its weights")
        if self.refine is not None and self.refine not in REFINE_MODES:
            raise InvalidInputError(f"refine takes one of {', '.join(REFINE_MODES)}, got {self.refine!r}")
        if self.blocksize < 1 or self.max_iter < 0 or self.max_damp_retries < 0 or self.tol <= 0:
            raise InvalidInputError("blocksize must be >= 1, max_iter and max_damp_retries >= 0, tol > 0")
        if self.refine_mode != "off" and not self.pattern.is_nm:
            raise InvalidInputError(f"refine swaps weights inside N:M groups; pattern {self.pattern} has none")
        if self.refine_mode != "off" and self.reconstruct is False:
            raise InvalidInputError(
                "refine scores swaps on the exact reconstruction: it cannot run with reconstruct off"
            )
        if self.lookahead and not (self.pattern.is_nm and _lookahead_fits(self.pattern)):
            raise InvalidInputError(
                f"lookahead scores C(M,N)² candidate pairs per group; pattern {self.pattern} has "
                f"{'no groups' if not self.pattern.is_nm else math.comb(self.pattern.m, self.pattern.n) ** 2}: "
                "it applies to 2:4"
            )

    @property
    def damp_value(self) -> float:
        return DEFAULT_DAMP if self.damp is None else self.damp

    @property
    def refit_damp_value(self) -> float:
        return DEFAULT_REFIT_DAMP if self.refit_damp is None else self.refit_damp

    @property
    def use_reconstruct(self) -> bool:
        return self.reconstruct is not False

    @property
    def mask_search_mode(self) -> str:
        if self.mask_search is not None:
            return self.mask_search
        return "admm" if self.method == "apt" and self.pattern.is_nm and self.use_reconstruct else "off"

    @property
    def refine_mode(self) -> str:
        if self.refine is not None:
            return self.refine
        return "off"

    @property
    def use_lookahead(self) -> bool:
        if self.lookahead is not None:
            return self.lookahead
        return self.pattern.is_nm and _lookahead_fits(self.pattern)


def _lookahead_fits(pattern: Pattern) -> bool:
    return math.comb(pattern.m, pattern.n) <= LOOKAHEAD_MAX_CANDIDATES


@dataclass(frozen=True)
class SolverStats:
    """What the solver did. ``damp`` is the relative λ actually used, ``refit_damp`` the refit's ridge μ;
    ``residual`` the final max relative residual of the reconstruction (``None`` where the method does
    not reconstruct)."""

    method: str
    pattern: str
    seconds: float
    dead_columns: int = 0
    damp: float | None = None
    damp_retries: int = 0
    refit_damp: float | None = None
    iterations: int = 0
    residual: float | None = None
    lookahead: bool = False
    refine_rounds: int = 0
    refine_swaps: int = 0
    mask_search_steps: int = 0
    mask_search_rows: int = 0  # rows that took the searched support (lower calibration loss after the refit)
    loss_before_reconstruction: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PruneResult:
    """``weight`` ``[out, in]`` in the input dtype with ``+0.0`` at pruned places; ``mask`` bool, True = kept;
    ``loss`` = ``tr((Ŵ−W) H (Ŵ−W)ᵀ)`` on the undamped ``H``; ``zero_loss`` = L(0), the loss of pruning
    everything; ``relative_loss`` = ``loss / zero_loss``."""

    weight: torch.Tensor
    mask: torch.Tensor
    loss: float
    relative_loss: float
    stats: SolverStats
    zero_loss: float = 0.0


def prune_layer(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    method: str = "apt",
    pattern: str | Pattern = "2:4",
    config: PruneConfig | None = None,
    consume_hessian: bool = False,
    **options,
) -> PruneResult:
    """Prune ``weight`` ``[out, in]`` given ``hessian`` ``[in, in]`` (= Σ x xᵀ over calibration tokens).

    Computes in float64 when ``weight`` is float64, else in float32, on the device of ``weight``.
    ``options`` are the remaining fields of :class:`PruneConfig`; pass ``config`` instead to reuse one.
    With ``consume_hessian`` the solver damps and factorises in ``hessian``'s own memory (the caller
    must not use it afterwards): one ``[in, in]`` matrix less at the peak, which is what bounds memory
    on wide layers (in = 28 672 is 3.3 GB in float32).
    """
    if config is None:
        config = PruneConfig(method=method, pattern=Pattern.parse(pattern), **options)
    start = time.perf_counter()
    _check_inputs(weight, hessian, config.pattern)
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    W = weight.to(dtype)
    H = hessian.to(device=weight.device, dtype=dtype)
    undamped = Quadratic(H, H.diagonal().clone())
    # methods never modify W; they modify H only when it is theirs to consume
    W_hat, mask, info = METHODS[config.method].prune(W, undamped.matrix, config, consume_hessian or H is not hessian)
    W_hat = torch.where(mask, W_hat, torch.zeros((), dtype=dtype, device=W_hat.device))
    out = positive_zeros(W_hat.to(weight.dtype))
    loss = undamped.loss(out.to(dtype), W)
    base = undamped.loss(None, W)
    stats = SolverStats(method=config.method, pattern=str(config.pattern), seconds=time.perf_counter() - start, **info)
    relative = loss / base if base > 0 else 0.0
    return PruneResult(weight=out, mask=mask, loss=loss, relative_loss=relative, stats=stats, zero_loss=base)


def _check_inputs(weight: torch.Tensor, hessian: torch.Tensor, pattern: Pattern) -> None:
    if weight.dim() != 2 or not weight.is_floating_point():
        raise InvalidInputError(
            f"weight must be a 2-D float tensor [out, in], got {tuple(weight.shape)} {weight.dtype}"
        )
    cols = weight.shape[1]
    if hessian.shape != (cols, cols):
        raise InvalidInputError(
            f"hessian must be [in, in] = [{cols}, {cols}] for this weight, got {tuple(hessian.shape)}"
        )
    if not bool(torch.isfinite(weight).all()):
        raise InvalidInputError("weight holds NaN or Inf values: check the checkpoint (and its dtype) before pruning")
    if not bool(torch.isfinite(hessian).all()):
        raise InvalidInputError(
            "hessian holds NaN or Inf values: the calibration activations overflowed; accumulate in float32 or float64"
        )
    if pattern.is_nm and cols % pattern.m:
        raise InvalidInputError(
            f"layer width in={cols} is not a multiple of M={pattern.m}, so {pattern} cannot apply: "
            "leave this layer dense (the pruning run skips and reports such layers)"
        )
