"""Layer-level diagnosis of masks: how well each solver variant's pruned layers, fitted on calibration text,
hold on text of other kinds — the question behind the accuracy levers, without the cost of whole runs.

    python -m runtime_bench.mask_diagnosis [--model smollm2-135m] [--windows 16] [--domain-windows 8]
        [--seq-len 512] [--variants sparsegpt apt "apt, admm"] [--layers 2] [--out ...]

Every prunable layer of the dense model (blocks every ``--layers``) gets a Hessian from the calibration
source (stdlib) and one from each other offline domain (the dense model's own inputs to the layer; no
sequential effects). Each variant prunes each layer on the calibration Hessian; its loss is then
measured on every domain's Hessian, relative to the loss of pruning the layer to zero on that domain
(``L_d(Ŵ)/L_d(0)``), summed over layers, and compared with SparseGPT's. Down-projection layers are also
pruned after the free channel permutation (``apt.solver.permute``), chosen on the calibration Hessian.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from apt import PruneConfig, prune_layer
from apt.models.loading import load_model
from apt.solver.loss import layer_loss
from apt.solver.permute import balanced_permutation
from apt.text.sources import load_text, token_windows
from runtime_bench import save_results
from runtime_bench.solver_bench import layer_hessians

RESULTS = Path(__file__).resolve().parent / "results" / "mask_diagnosis.json"
DOMAINS = ("man", "debian-doc", "info", "licenses")
VARIANTS = {
    "sparsegpt": dict(method="sparsegpt"),
    "apt": dict(method="apt"),
    "apt, admm support search": dict(method="apt", mask_search="admm"),
    "apt, no refit ridge": dict(method="apt", refit_damp=0.0),
    "apt, permuted down_proj inputs": dict(method="apt"),
}
PERMUTED = {"apt, permuted down_proj inputs"}


def domain_hessians(model, tokenizer, windows: int, domain_windows: int, seq_len: int, every: int) -> dict:
    """``{layer: {"weight", "calibration" H, domain: H, ...}}`` for every ``every``-th block's layers."""
    texts = {"calibration": (load_text("stdlib").calibration, windows)}
    texts |= {"held-out stdlib": (load_text("stdlib").evaluation, domain_windows)}
    texts |= {d: (load_text(d).whole, domain_windows) for d in DOMAINS}
    layers: dict[str, dict] = {}
    for name, (docs, count) in texts.items():
        ids = token_windows(docs, tokenizer, count, seq_len)
        for layer, weight, hessian in layer_hessians(model, ids):
            block = int(layer.split(".layers.")[1].split(".")[0])
            if block % every == 0:
                layers.setdefault(layer, {"weight": weight})[name] = hessian
    return layers


def run(model_name: str, windows: int, domain_windows: int, seq_len: int, variants: list[str], every: int) -> dict:
    model, tokenizer, _ = load_model(model_name)
    layers = domain_hessians(model, tokenizer, windows, domain_windows, seq_len, every)
    domains = [d for d in next(iter(layers.values())) if d != "weight"]
    results = {}
    for variant in variants:
        config = PruneConfig(**VARIANTS[variant])
        sums, seconds = dict.fromkeys(domains, 0.0), 0.0
        chosen = 0
        for name, data in tqdm(layers.items(), desc=variant, disable=None):
            weight, hessians = data["weight"], {d: data[d] for d in ["calibration", *domains]}
            result = prune_layer(weight, hessians["calibration"], config=config)
            seconds += result.stats.seconds
            if variant in PERMUTED and name.endswith("down_proj"):
                perm = balanced_permutation(weight, hessians["calibration"], 4)
                permuted = {d: h[perm][:, perm] for d, h in hessians.items()}
                other = prune_layer(weight[:, perm], permuted["calibration"], config=config)
                seconds += other.stats.seconds
                if other.loss < result.loss:  # chosen by the loss after the refit, on calibration text
                    weight, hessians, result, chosen = weight[:, perm], permuted, other, chosen + 1
            for d in domains:
                zero = layer_loss(torch.zeros_like(weight), weight, hessians[d])
                sums[d] += layer_loss(result.weight, weight, hessians[d]) / zero
        results[variant] = {"sum_relative_loss": sums, "seconds": seconds, "layers": len(layers)}
        if variant in PERMUTED:
            results[variant]["permutations_kept"] = chosen
    base = results.get("sparsegpt")
    for row in results.values():
        if base:
            row["vs_sparsegpt"] = {d: row["sum_relative_loss"][d] / base["sum_relative_loss"][d] for d in domains}
    return {
        "model": model_name,
        "windows": windows,
        "domain_windows": domain_windows,
        "seq_len": seq_len,
        "every_nth_block": every,
        "domains": domains,
        "variants": results,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--domain-windows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--layers", type=int, default=3, help="every n-th block")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    results = run(args.model, args.windows, args.domain_windows, args.seq_len, args.variants, args.layers)
    results["seconds"] = time.perf_counter() - started
    for variant, row in results["variants"].items():
        ratios = " ".join(f"{d} {r:.3f}" for d, r in row.get("vs_sparsegpt", {}).items())
        print(f"{variant:32s} {row['seconds']:7.1f} s  vs sparsegpt: {ratios}")
    save_results(args.out, results, "runtime_bench.mask_diagnosis", argv)


if __name__ == "__main__":
    main()
