"""What FP8 (W8A8 e4m3, per-channel weights, dynamic per-token activations) costs on top of 2:4, emulated exactly.

    python -m runtime_bench.fp8_accuracy [--model smollm2-135m] [--encoder minilm-l6] [--windows 64]
        [--seq-len 256] [--eval-windows 16] [--rows NAME ...] [--diagnostics] [--seeds S ...] [--out FILE]

The domains, the evaluation and the pruning rows are those of ``runtime_bench.method_comparison`` (validation
chooses, test is in domain, four never-calibrated domains). Each FP8 folder is the real one, written by
``apt.run.quantize`` (what ``apt-sparse quantize`` runs) or by the pruning run (``--quantize fp8``), and
measured as every command reads it: through its reader (``apt.models.checkpoint``), weights ``q · scale`` and
the inputs of every FP8 Linear through float8_e4m3fn and back per token (exact up to the float32 accumulation
of an FP8 GEMM). Every rounding calibrates on the pruning's text (``--windows`` × ``--seq-len`` stdlib tokens).
Rows:

- ``dense FP8`` / ``dense FP8, nearest``: the source quantized by ``apt-sparse quantize`` (its default, the
  error-compensating pass) and with ``--rounding nearest``;
- ``apt`` / ``apt FP8`` / ``apt FP8, nearest``: apt 2:4 at the prune defaults, then quantized the same two ways;
- ``apt FP8, prune --quantize fp8``: the pruning run writing FP8 itself, at its defaults (the same pruning,
  then ``apt-sparse quantize``'s default on the run's calibration windows: it must equal ``apt FP8``);
- ``apt FP8, --fp8-in-run``: each layer put on the FP8 grid (error-compensating) as soon as it is pruned,
  later blocks pruned on the W8A8 model (``... --no-fp8-compensate``, to nearest, is not run by default);
- ``sparsegpt`` / ``sparsegpt FP8``;
- diagnostics (``--diagnostics``, or named in ``--rows``): ``dense FP8 weights only`` and ``apt FP8 weights
  only`` (FP8 weights rounded to nearest, activations unquantized: what the weights alone cost).

``--seeds S …`` rounds every compensated row once per calibration seed (the windows the pass calibrates on),
measures each (``figures_by_seed``) and gives the row their geometric mean; ``vs_dense_fp8_cost_by_seed`` holds
the bar seed by seed, apt and dense rounded on the same windows. One rounding moves a perplexity by ~±0.5 %,
as much as the bar's margin: a single seed cannot tell the two costs apart.

Per domain: ``fp8_cost`` = an FP8 row's figure over its unquantized row's (perplexity; for embeddings the loss
of cosine to dense over the unquantized row's), ``vs_dense_fp8_cost`` = that cost over the dense model's FP8
cost with the same rounding (the issue's bar: ≤ 1, FP8 costs the 2:4 model no more than the dense one; rows
rounded in the run are held against ``apt-sparse quantize``'s default on the dense model), and
``vs_sparsegpt`` = the increase over dense as a fraction of SparseGPT's (FP8 rows against dense FP8 and
SparseGPT FP8; < 1: apt keeps its lead).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from apt.atomic import write_json_atomic
from apt.folder.report import versions
from apt.models.checkpoint import CheckpointReader
from apt.models.loading import source_folder
from apt.run.quantize import QuantizeConfig, quantize_folder
from runtime_bench import save_results
from runtime_bench.method_comparison import DOMAINS, Domains, Row, increase_fraction, prune_row

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class FP8Row:
    """One row: ``pruning`` (None: the dense source) and how it becomes FP8: ``None`` (it does not), ``compensate``
    / ``nearest`` (``apt-sparse quantize --rounding``), ``run`` (the pruning run wrote it), ``weights`` (rounded
    to nearest, measured with unquantized activations); ``unquantized`` names the row its cost is taken over."""

    pruning: Row | None
    fp8: str | None
    unquantized: str | None = None


APT, SPARSEGPT = Row({"method": "apt"}), Row({"method": "sparsegpt"})
ROWS: dict[str, FP8Row] = {
    "dense FP8, nearest": FP8Row(None, "nearest"),
    "dense FP8": FP8Row(None, "compensate"),
    "apt": FP8Row(APT, None),
    "apt FP8": FP8Row(APT, "compensate", "apt"),
    "apt FP8, nearest": FP8Row(APT, "nearest", "apt"),
    "apt FP8, prune --quantize fp8": FP8Row(Row({"method": "apt"}, run={"quantize": "fp8"}), "run", "apt"),
    "apt FP8, --fp8-in-run": FP8Row(Row({"method": "apt"}, run={"quantize": "fp8", "fp8_in_run": True}), "run", "apt"),
    "sparsegpt": FP8Row(SPARSEGPT, None),
    "sparsegpt FP8": FP8Row(SPARSEGPT, "compensate", "sparsegpt"),
    # not run by default: the in-run pass rounding to nearest
    "apt FP8, --fp8-in-run --no-fp8-compensate": FP8Row(
        Row({"method": "apt"}, run={"quantize": "fp8", "fp8_in_run": True, "fp8_compensate": False}), "run", "apt"
    ),
    # diagnostics (not run by default): FP8 weights with the activations left unquantized (W8A16)
    "dense FP8 weights only": FP8Row(None, "weights"),
    "apt FP8 weights only": FP8Row(APT, "weights", "apt"),
}
DEFAULT_ROWS = [name for name, row in ROWS.items() if row.fp8 != "weights" and "--no-fp8-compensate" not in name]
ENCODER_ROWS = [name for name, row in ROWS.items() if row.fp8 != "run"]  # the study's encoder rows: no FP8 run


class WeightsOnly:
    """An FP8 folder's reader whose layers keep their inputs unquantized (the W8A16 diagnostic)."""

    fp8_inputs = frozenset()

    def __init__(self, reader: CheckpointReader):
        self.reader = reader

    def __contains__(self, name: str) -> bool:
        return name in self.reader

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.reader.read(name, dtype)


def measure(domains: Domains, folder: Path | None, weights_only: bool = False) -> dict:
    """Each domain's figure of ``folder`` (None: the dense source), read as every command reads it (an FP8 folder
    as W8A8, unless ``weights_only``)."""
    reader = CheckpointReader(folder) if folder is not None else None
    if weights_only:
        reader = WeightsOnly(reader)
    return {name: meter.measure(reader)[domains.metric] for name, meter in domains.meters.items()}


# the dense model's FP8 row each rounding is held against (a run's rounding: apt-sparse quantize's default)
DENSE_OF = {
    "nearest": "dense FP8, nearest",
    "compensate": "dense FP8",
    "run": "dense FP8",
    "weights": "dense FP8 weights only",
}


def geometric_mean(figures) -> dict:
    """Per domain, the geometric mean of several rows' figures (FP8's costs are ratios)."""
    figures = list(figures)
    return {d: math.exp(sum(math.log(f[d]) for f in figures) / len(figures)) for d in figures[0]}


def _cost(figure: float, unquantized: float, causal: bool) -> float | None:
    """Perplexity: FP8's over the unquantized one's; embeddings: FP8's loss of cosine to dense over its."""
    if causal:
        return figure / unquantized
    return (1 - figure) / (1 - unquantized) if unquantized != 1 else None


def derived(section: dict) -> None:
    """``fp8_cost``, ``vs_dense_fp8_cost`` and ``vs_sparsegpt`` per row and domain (see the module docstring)."""
    rows, dense = section["rows"], section["dense"]
    causal = section["metric"] == "perplexity"
    for name, row in rows.items():
        if row["fp8"] is None:
            unquantized = None
        else:
            unquantized = dense if row.get("unquantized") is None else rows.get(row["unquantized"], {}).get("figures")
        if unquantized:
            mine = row["figures"]
            row["fp8_cost"] = {d: _cost(mine[d], unquantized[d], causal) for d in dense}
        reference = rows.get(DENSE_OF.get(row["fp8"], ""), {})
        if name.startswith("dense") or not row.get("fp8_cost") or not reference.get("fp8_cost"):
            row.pop("vs_dense_fp8_cost", None)
        else:
            row["vs_dense_fp8_cost"] = {
                d: row["fp8_cost"][d] / reference["fp8_cost"][d]
                if row["fp8_cost"][d] is not None and reference["fp8_cost"][d]
                else None
                for d in dense
            }
            if "figures_by_seed" in row and "figures_by_seed" in reference and unquantized:
                # seed by seed: both rounded on the same calibration windows
                by_seed = {}
                for seed, figures in row["figures_by_seed"].items():
                    theirs = reference["figures_by_seed"].get(seed)
                    if theirs is not None:
                        costs = (
                            (_cost(figures[d], unquantized[d], causal), _cost(theirs[d], dense[d], causal))
                            for d in dense
                        )
                        by_seed[seed] = {
                            d: mine / ref if mine is not None and ref else None for d, (mine, ref) in zip(dense, costs)
                        }
                row["vs_dense_fp8_cost_by_seed"] = by_seed
        fp8 = row["fp8"] is not None
        base = reference.get("figures") if fp8 else dense
        ref = rows.get("sparsegpt FP8" if fp8 else "sparsegpt", {}).get("figures")
        if name.startswith("apt") and row["fp8"] != "weights" and base and ref:
            row["vs_sparsegpt"] = increase_fraction(row["figures"], base, ref)


def table(section: dict) -> str:
    """Each row's figure per domain, with (FP8's cost; that cost over the dense model's; apt's increase as a
    fraction of SparseGPT's) where they exist."""
    domains = list(section["dense"])
    lines = [
        "| row | " + " | ".join(domains) + " | pruning s |",
        "|---|" + "---|" * (len(domains) + 1),
        "| dense | " + " | ".join(f"{section['dense'][d]:.4g}" for d in domains) + " | |",
    ]
    for name, row in section["rows"].items():
        cells = []
        for d in domains:
            notes = []
            if (row.get("fp8_cost") or {}).get(d) is not None:
                notes.append(f"{row['fp8_cost'][d]:.3f}×")
            if (row.get("vs_dense_fp8_cost") or {}).get(d) is not None:
                seeds = [v[d] for v in (row.get("vs_dense_fp8_cost_by_seed") or {}).values() if v[d] is not None]
                spread = f", {min(seeds):.3f}–{max(seeds):.3f} by seed" if len(seeds) > 1 else ""
                notes.append(f"{row['vs_dense_fp8_cost'][d]:.3f} of dense's{spread}")
            if (row.get("vs_sparsegpt") or {}).get(d) is not None:
                notes.append(f"{row['vs_sparsegpt'][d]:.2f} of SparseGPT's increase")
            cells.append(f"{row['figures'][d]:.4g}" + (f" ({'; '.join(notes)})" if notes else ""))
        seconds = row.get("seconds_pruning")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'' if seconds is None else f'{seconds:.0f}'} |")
    return "\n".join(lines)


def run_section(label: str, model: str, args, out_root: Path, results: dict, encoder: bool) -> None:
    domains = Domains(model, "stdlib", args.domains, args.eval_windows, args.seq_len)
    section = results.setdefault(label, {"model": model, "metric": domains.metric, "rows": {}})
    section["dense"] = domains.reference
    print(f"{model} dense: " + "  ".join(f"{d} {v:.4g}" for d, v in domains.reference.items()), flush=True)
    pruned: dict[str, tuple[Path, dict]] = {}  # a pruning row's folder, reused by its FP8 rows
    # every rounding calibrates on the pruning's text, the dense model's too
    calibrated = {"calibration_data": "stdlib", "num_calibration_samples": args.windows, "max_seq_length": args.seq_len}
    for name in args.rows:
        if encoder and name not in ENCODER_ROWS:
            continue
        start = time.perf_counter()
        spec = ROWS[name]
        record: dict = {"fp8": spec.fp8, "unquantized": spec.unquantized}
        folder = None
        if spec.pruning is not None:
            key = repr(spec.pruning)
            if key not in pruned:
                where = out_root / f"{label}-{len(pruned)}"
                pruned[key] = (where, prune_row(model, spec.pruning, args.windows, args.seq_len, where))
            folder, record["pruning"] = pruned[key]
            record["seconds_pruning"] = record["pruning"]["seconds_pruning"]
        if spec.fp8 == "compensate" and len(args.seeds) > 1:
            # the rounding on each seed's calibration windows: one figure per seed, and their geometric mean
            source = folder if folder is not None else source_folder(model)[1]
            record["figures_by_seed"] = {}
            for seed in args.seeds:
                quantized = out_root / f"{label}-{name.replace(' ', '_').replace(',', '')}-fp8-seed{seed}"
                config = QuantizeConfig(rounding="compensate", evaluate=False, **calibrated, seed=seed)
                record["quantization"] = quantize_folder(source, quantized, overwrite=True, config=config)
                record["quantization"].pop("fp8_relative_loss", None)
                record["figures_by_seed"][str(seed)] = measure(domains, quantized)
                print(f"{name} seed {seed}: {record['figures_by_seed'][str(seed)]}", flush=True)
            record["quantization"]["calibration"]["seed"] = list(args.seeds)
            record["figures"] = geometric_mean(record["figures_by_seed"].values())
        elif spec.fp8 in ("nearest", "compensate", "weights"):
            quantized = out_root / f"{label}-{name.replace(' ', '_').replace(',', '')}-fp8"
            source = folder if folder is not None else source_folder(model)[1]
            rounding = "compensate" if spec.fp8 == "compensate" else "nearest"
            config = QuantizeConfig(rounding=rounding, evaluate=False, **calibrated, seed=args.seeds[0])
            clock = time.perf_counter()
            record["quantization"] = quantize_folder(source, quantized, overwrite=True, config=config)
            record["quantization"].pop("fp8_relative_loss", None)  # per layer: kept in the folder's report
            record["seconds_quantizing"] = time.perf_counter() - clock
            folder = quantized
        elif spec.fp8 == "run":
            record["quantization"] = json.loads((folder / "prune_report.json").read_text())["quantization"]
            record["quantization"].pop("fp8_relative_loss", None)
        if "figures" not in record:
            record["figures"] = measure(domains, folder, weights_only=spec.fp8 == "weights")
        record["seconds"] = time.perf_counter() - start
        section["rows"][name] = record
        derived(section)
        print(f"{name:34s} " + "  ".join(f"{d} {v:.4g}" for d, v in record["figures"].items()), flush=True)
        save_results(args.out, results, "runtime_bench.fp8_accuracy", args.argv)
    section["table"] = table(section)
    print(f"\n{model} ({domains.metric})\n{section['table']}", flush=True)
    save_results(args.out, results, "runtime_bench.fp8_accuracy", args.argv)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="the causal LM ('' to skip)")
    parser.add_argument("--encoder", default="minilm-l6", help="the encoder ('' to skip)")
    parser.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, choices=list(ROWS), metavar="ROW")
    parser.add_argument("--diagnostics", action="store_true", help="also the weights-only rows (W8A16)")
    parser.add_argument("--domains", nargs="+", default=list(DOMAINS))
    parser.add_argument("--windows", type=int, default=64, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=[0],
        help="calibration seeds of the error-compensating rounding: with several, each compensated row is "
        "rounded and measured once per seed, its figure their geometric mean",
    )
    parser.add_argument("--keep", type=Path, default=None, help="keep the folders here")
    parser.add_argument("--out", type=Path, default=RESULTS / "fp8_accuracy.json")
    parser.add_argument("--render", action="store_true", help="only redo the ratios and tables of --out")
    args = parser.parse_args(argv)
    if args.diagnostics:
        args.rows = [
            *args.rows,
            *(name for name, row in ROWS.items() if row.fp8 == "weights" and name not in args.rows),
        ]
    if args.render:
        results = json.loads(args.out.read_text())
        for label in ("causal", "encoder"):
            if label in results:
                derived(results[label])
                results[label]["table"] = table(results[label])
                print(f"\n{results[label]['model']} ({results[label]['metric']})\n{results[label]['table']}")
        write_json_atomic(args.out, results)
        return
    args.argv = argv
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    results = {
        "schema": "apt-sparse/fp8-accuracy/2",
        "pattern": "2:4",
        "scheme": "FP8_DYNAMIC (e4m3 weights per output channel, dynamic per-token activations), emulated",
        "calibration": {"source": "stdlib", "windows": args.windows, "seq_len": args.seq_len},
        "evaluation": {
            "windows": args.eval_windows,
            "validation": "half of stdlib's held-out documents",
            "test": "the other half: the in-domain figure",
            "domains": {d: "every document (never calibrated)" for d in args.domains},
        },
        "versions": versions(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        if args.model:
            run_section("causal", args.model, args, root, results, encoder=False)
        if args.encoder:
            run_section("encoder", args.encoder, args, root, results, encoder=True)


if __name__ == "__main__":
    main()
