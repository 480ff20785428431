"""``apt-sparse``: the command line. Parses arguments, builds configs, calls plain functions, prints.

apt-sparse prune --model smollm2-135m --out pruned/
apt-sparse eval pruned/ --json
apt-sparse inspect pruned/
apt-sparse export onnx pruned/ onnx_out/
apt-sparse demo --out demo_out/ [--quick]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from apt.errors import AptError, InvalidInputError


def _add_prune(sub) -> None:
    p = sub.add_parser("prune", help="prune a model to N:M sparsity and write a Hugging Face folder with a report")
    p.add_argument("--model", required=True, help="hub id, local folder, .gguf file, or smollm2-135m / minilm-l6")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--method", default="apt", choices=["apt", "sparsegpt", "wanda", "magnitude"])
    p.add_argument("--pattern", default="2:4", help="2:4 (default), 4:8, or an unstructured ratio such as 50%%")
    p.add_argument("--damp", type=float, default=0.01, help="Hessian damping λ, times mean(diag H)")
    p.add_argument("--refine", action=argparse.BooleanOptionalAction, default=False, help="apt: swap refinement")
    p.add_argument("--lookahead", action=argparse.BooleanOptionalAction, default=True, help="apt: one-group lookahead")
    p.add_argument(
        "--reconstruct", action=argparse.BooleanOptionalAction, default=True, help="apt: exact reconstruction"
    )
    p.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--targets", default=None, help="regex over module names: prune only matching layers")
    p.add_argument("--ignore", default=None, help="regex over module names: leave matching layers dense")
    p.add_argument("--calibration-data", default="stdlib", help="stdlib, a .txt/.jsonl file, or hf:NAME[:CONFIG]")
    p.add_argument("--eval-data", default="stdlib", help="stdlib, a .txt/.jsonl file, or hf:NAME[:CONFIG]")
    p.add_argument("--num-calibration-samples", type=int, default=128)
    p.add_argument("--max-seq-length", type=int, default=512)
    p.add_argument("--num-eval-windows", type=int, default=32)
    p.add_argument("--evaluate", action=argparse.BooleanOptionalAction, default=True, help="measure accuracy")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trust-remote-code", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False)


def _prune(args) -> None:
    from apt.pipeline import RunConfig
    from apt.run import PruneJob, prune_model
    from apt.solver import PruneConfig

    solver = PruneConfig(
        method=args.method,
        pattern=args.pattern,
        damp=args.damp,
        refine=args.refine,
        lookahead=args.lookahead,
        reconstruct=args.reconstruct,
    )
    job = PruneJob(
        model=args.model,
        out=args.out,
        run=RunConfig(
            solver=solver,
            targets=args.targets,
            ignore=args.ignore,
            true_sequential=args.true_sequential,
            device=args.device,
            batch_size=args.batch_size,
        ),
        calibration_data=args.calibration_data,
        eval_data=args.eval_data,
        num_calibration_samples=args.num_calibration_samples,
        max_seq_length=args.max_seq_length,
        num_eval_windows=args.num_eval_windows,
        dtype=args.dtype,
        seed=args.seed,
        trust_remote_code=args.trust_remote_code,
        evaluate=args.evaluate,
        overwrite=args.overwrite,
    )
    report = prune_model(job)
    totals = report["totals"]
    print(
        f"pruned {totals['layers_pruned']} layers ({totals['layers_skipped']} skipped) with {args.method} "
        f"{args.pattern} in {totals['seconds_pruning']:.0f} s; all N:M valid: {totals['all_nm_valid']}"
    )
    print(f"summed relative layer loss {totals['sum_relative_loss']:.3f}")
    if report["accuracy"]:
        acc = report["accuracy"]
        print(f"{acc['metric']}: dense {acc['dense'][acc['metric']]:.4f} → pruned {acc['pruned'][acc['metric']]:.4f}")
    print(f"wrote {args.out} (report: {args.out}/prune_report.json)")


def _eval(args) -> None:
    from apt.run import evaluate_model

    result = evaluate_model(
        args.model,
        eval_data=args.eval_data,
        num_eval_windows=args.num_eval_windows,
        max_seq_length=args.max_seq_length,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return
    metric = result["metric"]
    for key in ("dense", "pruned"):
        if key in result and metric in result[key]:
            print(f"{key:7s} {metric} {result[key][metric]:.4f}")


def _inspect(args) -> None:
    from apt.inspect import inspect_checkpoint

    rows = inspect_checkpoint(args.path, n=args.n, m=args.m)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    width = max((len(r["name"]) for r in rows), default=10)
    for r in rows:
        nm = {True: "yes", False: "NO", None: "-"}[r["nm_valid"]]
        print(f"{r['name']:{width}s}  {str(r['shape']):14s}  sparsity {r['sparsity']:.3f}  {args.n}:{args.m} {nm}")
    valid = sum(r["nm_valid"] is True for r in rows)
    print(f"{valid}/{len(rows)} 2-D weights are {args.n}:{args.m} along the input dimension")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="apt-sparse", description="One-shot N:M pruning and deployment of LMs")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_prune(sub)
    e = sub.add_parser("eval", help="accuracy of a dense model or a pruned folder (with its dense reference)")
    e.add_argument("model")
    e.add_argument("--eval-data", default="stdlib")
    e.add_argument("--num-eval-windows", type=int, default=32)
    e.add_argument("--max-seq-length", type=int, default=512)
    e.add_argument("--device", default="cpu")
    e.add_argument("--trust-remote-code", action=argparse.BooleanOptionalAction, default=False)
    e.add_argument("--json", action="store_true", help="print JSON on stdout")
    i = sub.add_parser("inspect", help="per-layer sparsity and N:M validity of any checkpoint folder")
    i.add_argument("path")
    i.add_argument("--n", type=int, default=2)
    i.add_argument("--m", type=int, default=4)
    i.add_argument("--json", action="store_true")
    for add in _EXTRA_COMMANDS:
        add(sub)
    return parser


def _add_export(sub) -> None:
    from exporters import EXPORTERS

    x = sub.add_parser("export", help="turn a pruned folder into a deployable artifact, with a manifest")
    x.add_argument("target", choices=sorted(EXPORTERS))
    x.add_argument("src", help="a pruned Hugging Face folder (apt-sparse prune --out)")
    x.add_argument("out", help="output folder (written atomically)")
    x.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    x.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False)
    x.add_argument(
        "--with-past",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="onnx: the decoding graph with past/present keys and values",
    )
    x.set_defaults(handler=_export)


def _export(args) -> None:
    from exporters import export

    options = {"with_past": args.with_past} if args.target == "onnx" else {}
    if args.with_past and args.target != "onnx":
        raise InvalidInputError("--with-past applies to the onnx target only")
    manifest = export(args.target, args.src, args.out, dtype=args.dtype, overwrite=args.overwrite, **options)
    size = sum(f["bytes"] for f in manifest["files"])
    print(
        f"wrote {args.out}: {len(manifest['files'])} files, {size / 2**20:.1f} MiB; "
        f"{len(manifest['pattern_check']['layers'])} weights checked 2:4"
    )
    for key, value in manifest["validation"].items():
        print(f"  {key}: {value}")
    if "trtexec" in manifest:
        print(f"  trtexec: {manifest['trtexec']}")


def _add_demo(sub) -> None:
    d = sub.add_parser("demo", help="prune (apt and baselines) → export → bench → report on the offline model")
    d.add_argument("--out", required=True, help="output folder for checkpoints, artifacts, results.json, report.md")
    d.add_argument("--quick", action="store_true", help="small settings (CI): two methods, tiny calibration")
    d.add_argument(
        "--keep-results",
        default=None,
        metavar="NAME",
        help="also copy results.json, report.md and plots into runtime_bench/results/NAME",
    )
    d.set_defaults(handler=_demo)


def _demo(args) -> None:
    from runtime_bench.demo import DemoConfig, copy_results_into_repository, run_demo, summary_line

    config = DemoConfig.quick() if args.quick else DemoConfig()
    report = run_demo(args.out, config)
    print(f"accuracy ({'perplexity'}): {summary_line(report.parent / 'results.json')}")
    if args.keep_results:
        print(f"kept results in {copy_results_into_repository(report.parent, args.keep_results)}")
    print(f"report: {report}")


_HANDLERS = {"prune": _prune, "eval": _eval, "inspect": _inspect}
_EXTRA_COMMANDS: list = [_add_export, _add_demo]


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        handler = _HANDLERS.get(args.command) or args.handler
        handler(args)
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        print(f"\ninterrupted: nothing was written{f' to {out}' if out else ''}", file=sys.stderr)
        return 130
    except AptError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
