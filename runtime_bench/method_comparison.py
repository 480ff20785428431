"""Accuracy of every pruning method and every accuracy lever, in one run, in and out of the calibration domain.

    python -m runtime_bench.method_comparison [--model smollm2-135m] [--encoder minilm] [--windows 32]
        [--seq-len 512] [--eval-windows 16] [--rows NAME ...] [--keep DIR] [--out FILE] [--merge]

Every row prunes the model once (``PruneJob``, the same code as ``apt-sparse prune``) and is measured on:

- ``validation``: half of the calibration source's held-out documents. Options are chosen on this
  column only;
- ``test``: the other half, never used to choose anything — the in-domain figure;
- every other offline text domain (``man``, ``debian-doc``, ``info``, ``licenses`` by default), whole:
  text the calibration never saw.

For a causal LM the figure is perplexity, for the encoder (``--encoder``, all-MiniLM) the cosine of its
sentence embeddings to the dense model's, on the same domains. The dense model is measured once per
domain, on the same windows. Each row also records its pruning seconds and summed relative layer loss.
Results are written after every row (``--out``, atomically), so an interrupted run keeps what it measured;
a section not measured again (``--model ''`` or ``--encoder ''``) is kept from ``--out``, and with
``--merge`` so are the rows of a measured section that ``--rows`` does not name (same calibration only).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from apt.atomic import write_json_atomic
from apt.folder.report import versions
from apt.measure.accuracy import Accuracy
from apt.models.layered import LayeredModel
from apt.models.loading import load_tokenizer, source_folder
from apt.run import PruneJob, RunConfig, prune_model
from apt.solver import PruneConfig
from apt.text.sources import load_text, validation_split
from runtime_bench import save_results

RESULTS = Path(__file__).resolve().parent / "results"
DOMAINS = ("man", "debian-doc", "info", "licenses")


@dataclass(frozen=True)
class Row:
    """One pruning run of the study: solver options, run options and calibration text."""

    solver: dict = field(default_factory=dict)
    run: dict = field(default_factory=dict)
    calibration: str = "stdlib"
    windows: int | None = None  # None: the study's --windows
    encoder: bool = False  # also run on the encoder
    job: dict = field(default_factory=dict)  # PruneJob options (the compute dtype)


# One row per method, then one per lever on top of apt's defaults (and apt as it was before them).
ROWS: dict[str, Row] = {
    "magnitude": Row({"method": "magnitude"}),
    "wanda": Row({"method": "wanda"}),
    "sparsegpt": Row({"method": "sparsegpt"}, encoder=True),
    "apt": Row({"method": "apt"}, encoder=True),
    "apt, sweep mask only (before the ADMM search)": Row({"method": "apt", "mask_search": "off"}, encoder=True),
    "apt, no refit ridge (before)": Row({"method": "apt", "refit_damp": 0.0, "mask_search": "off"}, encoder=True),
    "apt, refit ridge 0.3": Row({"method": "apt", "refit_damp": 0.3}),
    "apt, local swaps (3 rounds)": Row({"method": "apt", "refine": "local", "max_refine_rounds": 3}),
    "apt, error-correcting targets α=0.5": Row({"method": "apt"}, run={"correction": 0.5}),
    "apt, 4× calibration tokens": Row({"method": "apt"}, windows=128),
    "sparsegpt, 4× calibration tokens": Row({"method": "sparsegpt"}, windows=128),
    "apt, permuted down_proj inputs": Row({"method": "apt"}, run={"permute": True}),
    "apt, bfloat16 compute": Row({"method": "apt"}, job={"dtype": "bfloat16"}),
    "apt, self-generated calibration": Row({"method": "apt"}, calibration="self"),
    "sparsegpt, self-generated calibration": Row({"method": "sparsegpt"}, calibration="self"),
}


class Domains:
    """The evaluation texts of the study, tokenised once, with the dense model's figure on each."""

    def __init__(self, model: str, calibration: str, domains, eval_windows: int, seq_len: int):
        _, folder = source_folder(model)
        self.dense = LayeredModel.from_folder(folder, torch.float32, "cpu")
        tokenizer = load_tokenizer(folder)
        held_out = load_text(calibration).evaluation
        validation, test = validation_split(held_out)
        texts = {"validation": validation, "test": test} | {d: load_text(d).whole for d in domains}
        self.meters = {
            name: Accuracy(self.dense, tokenizer, docs, eval_windows, seq_len) for name, docs in texts.items()
        }
        self.metric = next(iter(self.meters.values())).metric
        self.reference = {}
        for name, meter in self.meters.items():
            # an encoder's reference is itself: cosine 1
            self.reference[name] = meter.measure(reference=True).get(self.metric, 1.0)

    def measure(self, folder: Path) -> dict:
        pruned = LayeredModel.from_folder(folder, torch.float32, "cpu")
        figures = {}
        for name, meter in self.meters.items():
            meter.layered = pruned
            figures[name] = meter.measure()[self.metric]
            meter.layered = self.dense
        return figures


def prune_row(model: str, row: Row, windows: int, seq_len: int, out: Path) -> dict:
    solver = PruneConfig(**row.solver)
    job = PruneJob(
        model=model,
        out=str(out),
        run=RunConfig(solver=solver, **row.run),
        calibration_data=row.calibration,
        num_calibration_samples=row.windows or windows,
        max_seq_length=seq_len,
        evaluate=False,
        overwrite=True,
        **row.job,
    )
    report = prune_model(job)
    return {
        "solver": {k: str(v) if k == "pattern" else v for k, v in asdict(solver).items()},
        "run": row.run,
        "job": row.job,
        "calibration": {"source": row.calibration, "windows": row.windows or windows, "seq_len": seq_len},
        "sum_relative_loss": report["totals"]["sum_relative_loss"],
        "seconds_pruning": report["totals"]["seconds_pruning"],
        "all_nm_valid": report["totals"]["all_nm_valid"],
    }


def increase_ratios(section: dict) -> None:
    """Per row and domain, the increase over dense as a fraction of SparseGPT's calibrated on the same
    text (perplexity), or the loss of cosine to dense as a fraction of SparseGPT's (embeddings)."""
    dense = section["dense"]
    references = {
        json.dumps(row["calibration"], sort_keys=True): row["figures"]
        for name, row in section["rows"].items()
        if row["solver"]["method"] == "sparsegpt" and not row.get("run")
    }
    for row in section["rows"].values():
        ref = references.get(json.dumps(row["calibration"], sort_keys=True))
        row["vs_sparsegpt"] = increase_fraction(row["figures"], dense, ref)


def increase_fraction(figures: dict, base: dict, reference: dict | None) -> dict:
    """Per domain, ``figures``' move away from ``base`` as a fraction of ``reference``'s (``None`` where the
    reference is missing or did not move)."""
    return {
        d: (figures[d] - base[d]) / (reference[d] - base[d]) if reference and reference[d] != base[d] else None
        for d in base
    }


def table(section: dict) -> str:
    """The section as a Markdown table: each domain's figure, with the increase over dense as a
    fraction of SparseGPT's (``×``) where both exist, then seconds and summed relative loss."""
    domains = list(section["dense"])
    lines = [
        "| row | " + " | ".join(domains) + " | pruning s | Σ rel. loss |",
        "|---|" + "---|" * (len(domains) + 2),
        "| dense | " + " | ".join(f"{section['dense'][d]:.4g}" for d in domains) + " | | |",
    ]
    for name, row in section["rows"].items():
        ratios = row.get("vs_sparsegpt") or {}
        cells = [
            f"{row['figures'][d]:.4g}"
            + (f" ({ratios[d]:.2f}×)" if ratios.get(d) is not None and row["solver"]["method"] != "sparsegpt" else "")
            for d in domains
        ]
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {row['seconds_pruning']:.0f} | {row['sum_relative_loss']:.3f} |"
        )
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Per domain, each apt row's increase over dense as a fraction of SparseGPT's (1 = no better)."""
    from runtime_bench.report import _plt

    plt = _plt()
    sections = [results[label] for label in ("causal", "encoder") if label in results]
    fig, axes = plt.subplots(len(sections), 1, figsize=(10, 4 * len(sections)), squeeze=False)
    for ax, section in zip(axes[:, 0], sections):
        rows = {n: r for n, r in section["rows"].items() if n.startswith("apt") and r.get("vs_sparsegpt")}
        domains = list(section["dense"])
        width = 0.8 / max(len(rows), 1)
        for i, (name, row) in enumerate(rows.items()):
            values = [row["vs_sparsegpt"][d] or 0 for d in domains]
            ax.bar([j + i * width for j in range(len(domains))], values, width, label=name)
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(domains))], domains)
        what = "perplexity increase" if section["metric"] == "perplexity" else "loss of cosine to dense"
        ax.set_ylabel(f"{what}\n÷ SparseGPT's")
        ax.set_title(f"{section['model']}, 2:4: validation chooses, test is in domain, the rest never calibrated")
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_study(args, out_root: Path, results: dict) -> None:
    for label, model, wanted in (
        ("causal", args.model, lambda r: True),
        ("encoder", args.encoder, lambda r: r.encoder),
    ):
        rows = {name: ROWS[name] for name in args.rows if wanted(ROWS[name])}
        if not model or not rows:
            continue
        start = time.perf_counter()
        domains = Domains(model, "stdlib", args.domains, args.eval_windows, args.seq_len)
        section = results.setdefault(label, {"model": model, "metric": domains.metric, "rows": {}})
        command = shlex.join(
            ["python", "-m", "runtime_bench.method_comparison", *(sys.argv[1:] if args.argv is None else args.argv)]
        )
        merged = args.merge and section.get("command") and section["command"] != command
        section["command"] = f"{section['command']} && {command}" if merged else command
        section["dense"] = domains.reference
        section["seconds_dense_evaluation"] = time.perf_counter() - start
        print(f"{model} dense: " + "  ".join(f"{d} {v:.4g}" for d, v in domains.reference.items()), flush=True)
        for name, row in rows.items():
            record = prune_row(model, row, args.windows, args.seq_len, out_root / f"{label}-{len(section['rows'])}")
            record["figures"] = domains.measure(out_root / f"{label}-{len(section['rows'])}")
            section["rows"][name] = record
            increase_ratios(section)
            print(
                f"{name:44s} "
                + "  ".join(f"{d} {v:.4g}" for d, v in record["figures"].items())
                + f"   {record['seconds_pruning']:.0f} s",
                flush=True,
            )
            save_results(args.out, results, "runtime_bench.method_comparison", args.argv)
            plot(results, args.out.with_suffix(".png"))
    render(results, args.out)


def render(results: dict, out: Path) -> None:
    """Ratios, the plot beside ``out`` and the tables, printed."""
    for label in ("causal", "encoder"):
        if label in results:
            increase_ratios(results[label])
            print(f"\n{results[label]['model']} ({results[label]['metric']})\n{table(results[label])}")
    plot(results, out.with_suffix(".png"))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="the causal LM ('' to skip)")
    parser.add_argument("--encoder", default="minilm-l6", help="the encoder ('' to skip)")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS), metavar="ROW")
    parser.add_argument("--domains", nargs="+", default=list(DOMAINS))
    parser.add_argument("--windows", type=int, default=32, help="calibration windows (rows may set their own)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--keep", type=Path, default=None, help="keep the pruned folders here")
    parser.add_argument("--out", type=Path, default=RESULTS / "method_comparison.json")
    parser.add_argument("--render", action="store_true", help="only redo the ratios, tables and plot of --out")
    parser.add_argument(
        "--merge", action="store_true", help="keep --out's other rows: measure only --rows (same calibration)"
    )
    args = parser.parse_args(argv)
    if args.render:
        results = json.loads(args.out.read_text())
        render(results, args.out)
        write_json_atomic(args.out, results)
        return
    args.argv = argv
    logging.basicConfig(level=logging.WARNING)
    results = {
        "schema": "apt-sparse/method-comparison/2",
        "pattern": "2:4",
        "calibration": {"source": "stdlib", "windows": args.windows, "seq_len": args.seq_len},
        "evaluation": {
            "windows": args.eval_windows,
            "validation": "half of stdlib's held-out documents: options are chosen here",
            "test": "the other half: the in-domain figure",
            "domains": {d: "every document (never calibrated)" for d in args.domains},
        },
        "versions": versions(),
    }
    if args.out.is_file():  # a section not measured again (--model '' or --encoder '') is kept
        kept = json.loads(args.out.read_text())
        if kept.get("schema") == results["schema"]:
            if args.merge and kept["calibration"] != results["calibration"]:
                raise SystemExit(
                    f"--merge: {args.out} was calibrated on {kept['calibration']}, not {results['calibration']}"
                )
            results |= {label: kept[label] for label in ("causal", "encoder") if label in kept}
            for label, model in (("causal", args.model), ("encoder", args.encoder)):
                if model and not args.merge:
                    results.pop(label, None)
    with tempfile.TemporaryDirectory() as tmp:
        run_study(args, args.keep or Path(tmp), results)


if __name__ == "__main__":
    main()
