"""A Linear for deployment that uses the 2:4 kernel only where the GEMM sweep showed it faster.

Sparse kernels lose to dense at small M (decode: one token per sequence). ``DecodeSafeLinear`` keeps
the dense weight and, where a sparse backend is available, its semi-structured copy; each call takes
the sparse path only when the number of tokens reaches the per-shape threshold measured by
the GEMM sweep (``runtime_bench.gemm.sparse_thresholds``). Holding both copies costs about 1.56× the layer's weight
memory (dense + half the values + metadata); that is the price of never being slower than dense.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from apt.folder.targets import PrunedTargets, target_linears
from apt.solver.patterns import is_nm_sparse
from serving.kernels import kernel_availability, to_sparse

MARGIN = 1.02  # the sparse kernel must beat dense by 2 % to count as faster: timing noise is not a win


def threshold_from(points: list[tuple[int, float | None]], margin: float = MARGIN) -> int | None:
    """The smallest measured M from which the sparse kernel beat dense by ``margin`` at every larger measured
    M (``points``: ``(M, speedup over dense)``, ``None`` where not measured); ``None`` where it never did:
    that shape stays dense."""
    threshold = None
    for m, speedup in sorted(points, reverse=True):
        if speedup is None or speedup < margin:
            break
        threshold = m
    return threshold


PROBE_TOKENS = (1, 16, 64, 256, 1024, 4096)


def measure_threshold(weight: torch.Tensor, kernel: str, tokens=PROBE_TOKENS, repeats: int = 10) -> int | None:
    """The threshold of one CUDA weight ``[out, in]``, measured: dense against the 2:4 kernel at each token
    count (CUDA events, alternated, median of ``repeats``), through ``threshold_from``. For serving stacks
    that meet a shape the GEMM sweep did not measure; a GPU is needed."""
    sparse = to_sparse(weight, kernel)
    points = []
    for m in tokens:
        x = torch.randn(m, weight.shape[1], dtype=weight.dtype, device=weight.device)
        times = {"dense": [], "sparse": []}
        for _ in range(repeats + 2):  # the first two warm up
            for name, w in (("dense", weight), ("sparse", sparse)):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                F.linear(x, w)
                end.record()
                torch.cuda.synchronize()
                times[name].append(start.elapsed_time(end))
        dense, fast = (sorted(t[2:])[len(t[2:]) // 2] for t in (times["dense"], times["sparse"]))
        points.append((m, dense / fast if fast > 0 else None))
    return threshold_from(points)


def choose_path(tokens: int, threshold: int | None, has_sparse: bool) -> str:
    """``"sparse"`` when a sparse copy exists and ``tokens`` reaches the measured threshold, else ``"dense"``."""
    return "sparse" if has_sparse and threshold is not None and tokens >= threshold else "dense"


class DecodeSafeLinear(torch.nn.Module):
    def __init__(self, linear: torch.nn.Linear, threshold: int | None, backend: str = "torch-sparse-cusparselt"):
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.threshold = threshold
        self.backend = backend
        self.sparse_weight = None
        if threshold is not None and kernel_availability(backend).available and linear.weight.is_cuda:
            self.sparse_weight = to_sparse(linear.weight.data, backend)

    @property
    def uses_sparse(self) -> bool:
        return self.sparse_weight is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.numel() // x.shape[-1]
        if choose_path(tokens, self.threshold, self.sparse_weight is not None) == "sparse":
            out = F.linear(x.reshape(tokens, x.shape[-1]), self.sparse_weight)
            out = out.reshape(*x.shape[:-1], out.shape[-1])
            return out + self.bias if self.bias is not None else out
        return F.linear(x, self.weight, self.bias)


def make_decode_safe(
    model: torch.nn.Module,
    thresholds: dict[str, int | None],
    backend: str = "torch-sparse-cusparselt",
    targets: PrunedTargets | None = None,
) -> dict:
    """Replace every pruned Linear (``apt.folder.targets``: the folder's report, else the family adapter) that
    is 2:4 by a ``DecodeSafeLinear`` with the threshold of its ``"{in}x{out}"`` shape (a shape that was
    not measured stays dense). Returns counts."""
    modules = dict(model.named_modules())
    replaced = sparse = 0
    for name, linear in target_linears(model, targets):
        if not isinstance(linear, torch.nn.Linear) or not is_nm_sparse(linear.weight.data, 2, 4):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name in modules else model.get_submodule(parent_name)
        safe = DecodeSafeLinear(linear, thresholds.get(f"{linear.in_features}x{linear.out_features}"), backend)
        setattr(parent, child, safe)
        replaced += 1
        sparse += safe.uses_sparse
    return {"replaced": replaced, "with_sparse_path": sparse}
