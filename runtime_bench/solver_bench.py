"""Solver benchmark: every method on every prunable linear layer of a real model, one Hessian per layer.

Hessians come from the dense model on real calibration text (all layers in one pass, no sequential
pruning, so every method sees exactly the same problems). Prints, per method, the summed relative
layer loss ``Σ L(Ŵ)/L(0)`` and the solver's seconds, and writes them as JSON.

    python -m runtime_bench.solver_bench [--model smollm2-135m] [--windows 16] [--seq-len 512]
    python -m runtime_bench.solver_bench --llama-shapes q/o gate/up --methods sparsegpt apt   # the solver at 8B width
"""

from __future__ import annotations

import argparse
import logging
import platform
from pathlib import Path

import torch
from tqdm.auto import tqdm

from apt import PruneConfig, prune_layer
from apt.models.discovery import block_targets, find_groups
from apt.models.layered import LayeredModel
from apt.models.loading import load_model
from apt.text.sources import load_text, token_windows
from runtime_bench import save_results

RESULTS = Path(__file__).resolve().parent / "results"

# name → solver options; the "apt (no ...)" rows show what each step buys (on the calibration tokens, where
# the refit ridge gives up a little loss for other text: runtime_bench.method_comparison measures that)
VARIANTS = {
    "magnitude": dict(method="magnitude"),
    "wanda": dict(method="wanda"),
    "sparsegpt": dict(method="sparsegpt"),
    "apt (no reconstruction)": dict(method="apt", reconstruct=False),
    "apt (no lookahead)": dict(method="apt", lookahead=False),
    "apt (no refit ridge)": dict(method="apt", refit_damp=0.0),
    "apt": dict(method="apt"),
}


def layer_hessians(model, windows: torch.Tensor, batch_size: int = 4) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(name, weight, H)`` for every prunable linear layer, H accumulated in float32 on the dense model; the
    layers are found and grouped by the run's own discovery."""
    layered = LayeredModel.resident(model)
    body = model.model if hasattr(model, "model") else model  # the blocks only: no LM head needed
    groups = []
    for index, block in enumerate(layered.blocks):
        targets = [t for t in block_targets(block, layered.block_prefix(index)[:-1], model.config) if not t.is_expert]
        groups += [g for g in find_groups(block, targets, lambda: body(input_ids=windows[:1])) if g.source]
    hessians: dict[int, torch.Tensor] = {}
    handles = []
    for gi, group in enumerate(groups):

        def hook(_m, inputs, _o, gi=gi):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            hessians.setdefault(gi, torch.zeros(x.shape[1], x.shape[1])).addmm_(x.T, x)

        handles.append(group.source.register_forward_hook(hook))
    with torch.no_grad():
        for start in tqdm(range(0, len(windows), batch_size), desc="hessians", disable=None):
            body(input_ids=windows[start : start + batch_size])
    for h in handles:
        h.remove()
    return [(t.name, t.weight.clone(), hessians[gi]) for gi, group in enumerate(groups) for t in group.targets]


# Llama-3-8B's layer shapes ([out, in]) for --llama-shapes: the solver at the width of an 8B model, on synthetic
# Hessians (this machine has no 8B model's activations); down_proj (in = 14 336) is left out: its Hessian alone
# takes minutes to build on 2 cores
LLAMA_SHAPES = {"q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (14336, 4096)}


def synthetic_layers(names: list[str], seed: int = 0) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(name, weight, H)`` at Llama-3-8B's shapes: weights ~ N(0, 1/in), and ``H = XᵀX`` over ``2·in`` tokens
    whose channels carry lognormal scales (a few outlier channels, as LLM activations have) and a shared rank-32
    component (their correlations), so the solver meets a Hessian conditioned like a real one, not the identity."""
    generator = torch.Generator().manual_seed(seed)
    layers = []
    for name in names:
        out, inp = LLAMA_SHAPES[name]
        scales = torch.exp(torch.randn(inp, generator=generator) * 0.8)
        X = torch.randn(2 * inp, inp, generator=generator) + torch.randn(2 * inp, 32, generator=generator) @ (
            torch.randn(32, inp, generator=generator) * 0.3
        )
        X *= scales
        weight = torch.randn(out, inp, generator=generator) / inp**0.5
        layers.append((f"llama-3-8b {name} {out}x{inp}", weight, X.T @ X))
    return layers


def run(
    model_name: str, n_windows: int, seq_len: int, variants: list[str], threads: int | None, llama: list[str] = ()
) -> dict:
    if threads:
        torch.set_num_threads(threads)
    if llama:
        layers, model_name = synthetic_layers(llama), "llama-3-8b shapes, synthetic Hessians"
        calibration = {"source": "synthetic: 2·in tokens, lognormal channel scales, a rank-32 shared component"}
    else:
        model, tokenizer, _ = load_model(model_name)
        text = load_text("stdlib")
        windows = token_windows(text.calibration, tokenizer, n_windows, seq_len)
        layers = layer_hessians(model, windows)
        calibration = {"source": "stdlib", "windows": len(windows), "seq_len": seq_len}
    results = {}
    for variant in variants:
        config = PruneConfig(**VARIANTS[variant])
        total_rel, total_sec, per_layer = 0.0, 0.0, []
        for name, weight, hessian in tqdm(layers, desc=variant, disable=None):
            result = prune_layer(weight, hessian, config=config)
            total_rel += result.relative_loss
            total_sec += result.stats.seconds
            per_layer.append(
                {
                    "name": name,
                    "relative_loss": result.relative_loss,
                    "seconds": result.stats.seconds,
                    "iterations": result.stats.iterations,
                    "residual": result.stats.residual,
                }
            )
        results[variant] = {"sum_relative_loss": total_rel, "seconds": total_sec, "layers": per_layer}
        print(f"{variant:26s} sum relative loss {total_rel:9.3f}   solver seconds {total_sec:8.1f}", flush=True)
    base = results.get("sparsegpt")
    summary = {
        "schema": "apt-sparse/solver-bench/1",
        "model": model_name,
        "calibration": calibration,
        "layers": len(layers),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "methods": {
            k: {"sum_relative_loss": v["sum_relative_loss"], "seconds": v["seconds"]} for k, v in results.items()
        },
        "per_layer": {k: v["layers"] for k, v in results.items()},
    }
    if base and "apt" in results:
        summary["apt_vs_sparsegpt"] = {
            "loss_ratio": results["apt"]["sum_relative_loss"] / base["sum_relative_loss"],
            "time_ratio": results["apt"]["seconds"] / base["seconds"],
        }
        print(
            f"apt / sparsegpt: loss ×{summary['apt_vs_sparsegpt']['loss_ratio']:.3f}, "
            f"time ×{summary['apt_vs_sparsegpt']['time_ratio']:.2f}"
        )
    return summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--methods", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--llama-shapes",
        nargs="+",
        default=[],
        choices=list(LLAMA_SHAPES),
        help="instead of --model: single layers at Llama-3-8B's shapes on synthetic Hessians",
    )
    parser.add_argument("--out", type=Path, default=None, help="default results/solver_bench[_llama_shapes].json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    args.out = args.out or RESULTS / ("solver_bench_llama_shapes.json" if args.llama_shapes else "solver_bench.json")
    summary = run(args.model, args.windows, args.seq_len, args.methods, args.threads, args.llama_shapes)
    save_results(args.out, summary, "runtime_bench.solver_bench", argv)


if __name__ == "__main__":
    main()
