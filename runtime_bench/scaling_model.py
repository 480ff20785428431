"""A scaling model for pruning Llama-3-8B and Llama-3-70B on 1–16 GPUs, from costs measured here.

    python -m runtime_bench.scaling_model [--gpu-tflops 40] [--nvlink-gbs 450] [--ib-gbs 50]

What is measured (this machine, float32, apt with its defaults):

- the solver's seconds on real layer problems: SmolLM2-135M's 210 layers on their real Hessians
  (``runtime_bench/results/solver_bench.json``, made by ``python -m runtime_bench.solver_bench``)
  and the 1B model's 112 layers (``memory_bench.json``, ``python -m runtime_bench.memory_bench``),
  and the CPU's float32 GEMM throughput;
- from these, the solver's effective work per layer, ``seconds × GEMM throughput``, is fitted as
  ``a·out·in² + b·in³`` (the refit's conjugate-gradient steps and the factorisation), with the
  median relative error of the fit reported.

What is assumed (stated in the output): a GPU runs that work at ``--gpu-tflops`` of float32 GEMM
throughput (an H100/H200 sustains ~40–50 of its ~60 peak), the CG iteration counts of larger layers
are those of SmolLM2's, and the links move ``--nvlink-gbs`` within a host and ``--ib-gbs`` between
hosts. Per block and per rank count: the solve (rows split over ranks; each rank still factorises
every Hessian), the forward passes over its share of the calibration batches, and the bytes of the
Hessian all-reduce and the pruned-weight all-gather.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from runtime_bench import save_results

RESULTS = Path(__file__).resolve().parent / "results"
SMOLLM2 = {"hidden": 576, "intermediate": 1536, "kv": 192}
MODELS = {
    "llama-3-8b": {"hidden": 4096, "intermediate": 14336, "kv": 1024, "blocks": 32},
    "llama-3-70b": {"hidden": 8192, "intermediate": 28672, "kv": 1024, "blocks": 80},
}
LAYOUTS = (("1 GPU", 1, 1), ("2 GPUs", 2, 1), ("4 GPUs", 4, 1), ("8 GPUs", 8, 1), ("2 hosts × 8 GPUs", 16, 2))


def block_layers(shape: dict) -> list[tuple[str, int, int]]:
    """``(name, out, in)`` of a Llama block's seven pruned layers."""
    h, i, kv = shape["hidden"], shape["intermediate"], shape["kv"]
    return [("q", h, h), ("k", kv, h), ("v", kv, h), ("o", h, h), ("gate", i, h), ("up", i, h), ("down", h, i)]


def gemm_gflops(n: int = 2048, repeats: int = 20) -> float:
    """The CPU's float32 GEMM throughput: the best of ``repeats`` timed products (the machine's sustained
    rate, which one noisy sample understates)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def layer_costs(solver_bench: dict, memory_bench: dict | None) -> list[tuple[int, int, float]]:
    """``(out, in, seconds)`` of every apt layer solve measured here: SmolLM2's 210 layers, and the 1B
    model's 112 (hidden 2048, MLP 5632) where the memory benchmark has run."""
    shapes = {name: (o, i) for name, o, i in block_layers(SMOLLM2)}
    costs = []
    for layer in solver_bench["per_layer"]["apt"]:
        kind = layer["name"].split(".")[-1].split("_")[0]
        costs.append((*shapes[kind], layer["seconds"]))
    if memory_bench is not None:
        run = memory_bench["runs"].get("unlimited") or memory_bench["runs"].get("limited", {})
        for layer in run.get("per_layer", []):
            costs.append((*layer["shape"], layer["seconds"]))
    return costs


def fit_work(costs: list[tuple[int, int, float]], gflops: float) -> tuple[float, float]:
    """Least squares of measured work (GFLOP-equivalents) on ``out·in²`` and ``in³``, relative errors
    weighted equally (the large layers would otherwise decide alone)."""
    rows = [[o * i**2 / 1e9 / (s * gflops), i**3 / 1e9 / (s * gflops)] for o, i, s in costs]
    solution = torch.linalg.lstsq(
        torch.tensor(rows, dtype=torch.float64), torch.ones(len(rows), 1, dtype=torch.float64)
    )
    a, b = (max(float(x), 0.0) for x in solution.solution.reshape(-1))
    return a, b


def project(shape: dict, a: float, b: float, args) -> dict:
    layers = block_layers(shape)
    params = sum(o * i for _, o, i in layers)
    # one float32 Hessian per group of layers sharing an input: q/k/v, o and gate/up read the hidden size,
    # down reads the MLP's intermediate size
    hessian_bytes = 4 * (3 * shape["hidden"] ** 2 + shape["intermediate"] ** 2)
    tokens = args.windows * args.seq_len
    rows = []
    for label, ranks, hosts in LAYOUTS:
        # flop-equivalents / (flop/s)
        solve = sum((a * o * i**2 / ranks + b * i**3) for _, o, i in layers) / (args.gpu_tflops * 1e12)
        forward = 2 * 2 * params * tokens / ranks / (args.gpu_tflops * 1e12)  # the Hessian pass and propagation
        ring = 2 * (ranks - 1) / ranks
        reduce_bytes = ring * hessian_bytes
        gather_bytes = (ranks - 1) / ranks * 4 * params
        link = args.ib_gbs if hosts > 1 else args.nvlink_gbs
        comm = (reduce_bytes + gather_bytes) / (link * 1e9) if ranks > 1 else 0.0
        per_block = solve + forward + comm
        rows.append(
            {
                "layout": label,
                "ranks": ranks,
                "solve_s_per_block": solve,
                "forward_s_per_block": forward,
                "bytes_moved_per_rank_per_block": reduce_bytes + gather_bytes if ranks > 1 else 0,
                "comm_s_per_block": comm,
                "hours_total": per_block * shape["blocks"] / 3600,
            }
        )
    return {"params_per_block": params, "hessian_bytes_per_block": hessian_bytes, "layouts": rows}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--solver-bench", type=Path, default=RESULTS / "solver_bench.json")
    parser.add_argument("--memory-bench", type=Path, default=RESULTS / "memory_bench.json")
    parser.add_argument("--gpu-tflops", type=float, default=40.0, help="assumed sustained float32 GEMM TFLOP/s")
    parser.add_argument("--nvlink-gbs", type=float, default=450.0, help="assumed GB/s between GPUs of one host")
    parser.add_argument("--ib-gbs", type=float, default=50.0, help="assumed GB/s between hosts (400 Gb/s)")
    parser.add_argument("--windows", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=RESULTS / "scaling_model.json")
    args = parser.parse_args(argv)
    solver_bench = json.loads(args.solver_bench.read_text())
    memory_bench = json.loads(args.memory_bench.read_text()) if args.memory_bench.is_file() else None
    costs = layer_costs(solver_bench, memory_bench)
    gflops = gemm_gflops()
    a, b = fit_work(costs, gflops)
    predicted = [(a * o * i**2 + b * i**3) / 1e9 / gflops for o, i, _ in costs]  # seconds
    errors = sorted(abs(p / s - 1) for p, (_, _, s) in zip(predicted, costs))
    result = {
        "schema": "apt-sparse/scaling-model/1",
        "measured": {
            "cpu_gemm_gflops": gflops,
            "work_per_out_in2": a,
            "work_per_in3": b,
            "from": [args.solver_bench.name] + ([args.memory_bench.name] if memory_bench else []),
            "layers_fitted": len(costs),
            "fit_median_relative_error": errors[len(errors) // 2],
            "threads": torch.get_num_threads(),
        },
        "assumed": {
            "gpu_tflops_fp32": args.gpu_tflops,
            "cpu_to_gpu_ratio": args.gpu_tflops * 1e3 / gflops,
            "nvlink_gbs": args.nvlink_gbs,
            "ib_gbs": args.ib_gbs,
            "calibration_tokens": args.windows * args.seq_len,
        },
        "models": {name: project(shape, a, b, args) for name, shape in MODELS.items()},
    }
    print(f"CPU float32 GEMM {gflops:.0f} GFLOP/s; work ≈ {a:.1f}·out·in² + {b:.2f}·in³ (×1e9 flop-equivalents)")
    for name, model in result["models"].items():
        print(
            f"{name}: {model['params_per_block'] / 1e6:.0f} M parameters and "
            f"{model['hessian_bytes_per_block'] / 1e9:.2f} GB of Hessians per block"
        )
        for row in model["layouts"]:
            print(
                f"  {row['layout']:18s} solve {row['solve_s_per_block']:7.2f} s  forward "
                f"{row['forward_s_per_block']:6.2f} s  comm {row['comm_s_per_block']:6.3f} s "
                f"({row['bytes_moved_per_rank_per_block'] / 1e9:5.1f} GB)  total {row['hours_total']:6.2f} h"
            )
    save_results(args.out, result, "runtime_bench.scaling_model", argv)


if __name__ == "__main__":
    main()
