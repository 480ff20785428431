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
import os
import signal
import sys
from dataclasses import replace

from apt.atomic import is_write_failure, write_failure
from apt.errors import AptError, InvalidInputError
from apt.solver import METHODS


def _add_prune(sub) -> None:
    p = sub.add_parser("prune", help="prune a model to N:M sparsity and write a Hugging Face folder with a report")
    p.add_argument("--model", required=True, help="hub id, local folder, .gguf file, or smollm2-135m / minilm-l6")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--method", default="apt", choices=sorted(METHODS))
    p.add_argument("--pattern", default="2:4", help="2:4 (default), 4:8, or an unstructured ratio such as 50%%")
    # apt's and sparsegpt's options default to None: an option the chosen method does not read is refused
    p.add_argument("--damp", type=float, default=None, help="sparsegpt/apt: Hessian damping λ (default 0.01)")
    p.add_argument(
        "--refit-damp",
        type=float,
        default=None,
        help="apt: ridge μ of the exact refit, H + μ·diag(H), pulling kept weights toward the dense ones",
    )
    p.add_argument(
        "--refine",
        default=None,
        choices=["off", "local", "window", "exact"],
        help="apt: swap refinement of the mask, scored with the group (local), a 64-column window, or the "
        "whole row (exact, O(out·in³)) compensating; default off",
    )
    p.add_argument(
        "--correction",
        type=float,
        default=0.0,
        help="error-correcting targets α in [0, 1]: fit W + α(W G H⁻¹ − W), the dense model's outputs from the "
        "pruned model's inputs (default 0)",
    )
    p.add_argument(
        "--expert-min-tokens",
        type=int,
        default=None,
        help="MoE: an expert routed fewer calibration tokens is also calibrated on every token the experts "
        "received (default: the expert matrix's input width; 0: routed tokens only)",
    )
    p.add_argument(
        "--permute",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="reorder each gated MLP's down-projection inputs (and its gate/up rows) where that lowers the loss",
    )
    p.add_argument(
        "--mask-search",
        default=None,
        choices=["off", "admm"],
        help="apt: search the N:M support by ADMM from the sweep's mask before the refit (default: admm on N:M)",
    )
    p.add_argument("--lookahead", action=argparse.BooleanOptionalAction, default=None, help="apt: one-group lookahead")
    p.add_argument("--reconstruct", action=argparse.BooleanOptionalAction, default=None, help="apt: exact refit")
    p.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument(
        "--quantize",
        default=None,
        choices=["fp8"],
        help="also write the pruned Linears in FP8: e4m3 weights with per-channel scales, dynamic per-token "
        "activations (compressed-tensors FP8_DYNAMIC), rounded once pruning is done as apt-sparse quantize does",
    )
    p.add_argument(
        "--fp8-compensate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="--quantize fp8: round with the error-compensating pass (GPTQ-style, through each layer's Hessian; "
        "the default), or to nearest (--no-fp8-compensate)",
    )
    p.add_argument(
        "--fp8-in-run",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="--quantize fp8: put each pruned Linear on the FP8 grid as soon as it is pruned, and prune later blocks "
        "on the W8A8 model (default: round once pruning is done)",
    )
    p.add_argument("--targets", default=None, help="regex over module names: prune only matching layers")
    p.add_argument("--ignore", default=None, help="regex over module names: leave matching layers dense")
    p.add_argument(
        "--calibration-data",
        default="stdlib",
        help="stdlib, a .txt/.jsonl file, hf:NAME[:CONFIG], or self[:SOURCE]: the model's own continuations of "
        "SOURCE's prefixes (default stdlib), its highest-perplexity fifth dropped; needs the model in memory once",
    )
    p.add_argument("--eval-data", default="stdlib", help="stdlib, a .txt/.jsonl file, or hf:NAME[:CONFIG]")
    p.add_argument(
        "--calibration-images",
        default=None,
        help="vision-language models: a folder of images; each calibration sample is one image with one text window, "
        "through the model's processor (default: text through the language model alone)",
    )
    p.add_argument(
        "--prune-vision",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="vision-language models: also prune the vision tower and projector (needs --calibration-images)",
    )
    p.add_argument("--num-calibration-samples", type=int, default=128)
    p.add_argument("--max-seq-length", type=int, default=512)
    p.add_argument("--num-eval-windows", type=int, default=32)
    p.add_argument("--evaluate", action=argparse.BooleanOptionalAction, default=True, help="measure accuracy")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="compute dtype (auto: bfloat16 for a bfloat16 checkpoint on a device with native bfloat16 matrix "
        "products, i.e. a CUDA GPU of compute capability 8.0+ or a CPU with AVX512-BF16 or AMX; else float32)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]: holds the current block and its Hessians")
    p.add_argument(
        "--offload-activations",
        default="host",
        choices=["host", "device", "disk"],
        help="where calibration activations live: host memory (default), the device, or a file",
    )
    p.add_argument(
        "--activation-dir", default=None, help="folder for --offload-activations disk (default: beside --out)"
    )
    p.add_argument(
        "--activation-dtype",
        default=None,
        choices=["float32", "float16", "bfloat16"],
        help="dtype activations are kept in (default: the compute dtype)",
    )
    p.add_argument("--max-shard-size", default="5GB", help="output shard size, e.g. 5GB (default), 500MB, 2GiB")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trust-remote-code", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="continue an interrupted run of the same job from the last block it wrote",
    )
    p.add_argument(
        "--dist-timeout",
        type=float,
        default=1800.0,
        help="under torchrun: seconds a rank waits for the others before the job fails (default 1800)",
    )


def job_from_args(args, device: str):
    """The ``PruneJob`` of a ``prune`` command line (the device resolved per rank under torchrun)."""
    from apt.run import PruneJob, RunConfig
    from apt.solver import PruneConfig

    solver = PruneConfig(
        method=args.method,
        pattern=args.pattern,
        damp=args.damp,
        refit_damp=args.refit_damp,
        refine=args.refine,
        mask_search=args.mask_search,
        lookahead=args.lookahead,
        reconstruct=args.reconstruct,
    )
    return PruneJob(
        model=args.model,
        out=args.out,
        run=RunConfig(
            solver=solver,
            targets=args.targets,
            ignore=args.ignore,
            true_sequential=args.true_sequential,
            correction=args.correction,
            expert_min_tokens=args.expert_min_tokens,
            permute=args.permute,
            quantize=args.quantize,
            fp8_compensate=args.fp8_compensate,
            fp8_in_run=args.fp8_in_run,
            device=device,
            batch_size=args.batch_size,
            vision=args.prune_vision,
        ),
        calibration_data=args.calibration_data,
        calibration_images=args.calibration_images,
        eval_data=args.eval_data,
        num_calibration_samples=args.num_calibration_samples,
        max_seq_length=args.max_seq_length,
        num_eval_windows=args.num_eval_windows,
        dtype=args.dtype,
        activations=args.offload_activations,
        activation_dtype=args.activation_dtype,
        activation_dir=args.activation_dir,
        max_shard_size=args.max_shard_size,
        seed=args.seed,
        trust_remote_code=args.trust_remote_code,
        evaluate=args.evaluate,
        overwrite=args.overwrite,
        resume=args.resume,
    )


def _prune(args) -> None:
    from apt.run import prune_model
    from apt.run.distributed import collective_for

    coll, device = collective_for(args.device, args.dist_timeout)  # a process group under torchrun
    report = prune_model(job_from_args(args, device), coll)
    if coll.is_writer:
        _print_prune_summary(args, report, coll)


def _print_prune_summary(args, report: dict, coll) -> None:
    totals = report["totals"]
    print(
        f"pruned {totals['layers_pruned']} layers ({totals['layers_skipped']} skipped) with {args.method} "
        f"{args.pattern} in {totals['seconds_pruning']:.0f} s; all N:M valid: {totals['all_nm_valid']}"
    )
    print(f"summed relative layer loss {totals['sum_relative_loss']:.3f}")
    if report["accuracy"]:
        acc = report["accuracy"]
        metric = acc["metric"]
        dense = acc["dense"].get(metric)
        pruned = "pruned in FP8 (W8A8)" if acc.get("fp8") else "pruned"
        line = f"{metric}: dense {dense:.4f} → {pruned} " if dense is not None else f"{metric} to dense: "
        print(line + f"{acc['pruned'][metric]:.4f}")
    print(f"peak memory {report['peak_memory']['bytes'] / 2**30:.2f} GiB ({report['peak_memory']['kind']})")
    if coll.world > 1:
        ranks = report["distributed"]["ranks"]
        print(
            f"{coll.world} ranks ({coll.backend}): "
            + "; ".join(
                f"rank {r['rank']} {r['seconds']:.0f} s, {r['seconds_in_collectives']:.0f} s in collectives, "
                f"peak {r['peak_memory']['bytes'] / 2**30:.2f} GiB"
                for r in ranks
            )
        )
    if report.get("quantization"):
        quant = report["quantization"]
        print(f"FP8: {quant['weights_quantized']} weights in float8_e4m3fn with per-channel scales ({quant['pass']})")
    print(f"wrote {args.out} (report: {args.out}/prune_report.json)")


def _eval(args) -> None:
    from apt.measure.accuracy import evaluate_model

    if args.tasks:
        return _eval_tasks(args)
    for option in ("num_fewshot", "limit", "include_path", "dense"):
        if getattr(args, option) is not None:
            raise InvalidInputError(f"--{option.replace('_', '-')} applies to --tasks only")
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
    print(f"evaluated on {result['data']}")
    if "fp8" in result:
        fp8 = result["fp8"]
        print(
            f"{args.model} is FP8 ({fp8['scheme']}; {fp8['weights_in_fp8']} weights in float8_e4m3fn), measured "
            "as served: W8A8 emulated exactly (weights q·scale, each FP8 layer's inputs through float8 per token, "
            "float32 accumulation)"
        )
    for key in ("dense", "pruned"):
        for metric in (result["metric"], "retrieval_top1"):
            if key in result and metric in result[key]:
                print(f"{key:7s} {metric} {result[key][metric]:.4f}")


def _eval_tasks(args) -> None:
    from apt.measure.harness import evaluate_tasks

    if args.eval_data != "stdlib" or args.num_eval_windows is not None:
        raise InvalidInputError("--eval-data and --num-eval-windows are for perplexity; --tasks runs lm-eval tasks")
    result = evaluate_tasks(
        args.model,
        [t.strip() for t in args.tasks.split(",") if t.strip()],
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        include_path=args.include_path,
        dense=args.dense,
        device=args.device,
        batch_size=args.batch_size,
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"lm-eval {result['lm_eval']}: {result['pruned']} against {result['dense']}")
    print(f"{'task':24s} {'metric':14s} {'dense':>9s} {'pruned':>9s} {'retained':>9s}")
    for row in result["rows"]:
        retained = f"{row['retained']:.3f}" if row["retained"] is not None else "-"
        print(f"{row['task']:24s} {row['metric']:14s} {row['dense']:9.4f} {row['pruned']:9.4f} {retained:>9s}")


def _inspect(args) -> None:
    from apt.folder.inspect import inspect_checkpoint

    summary = inspect_checkpoint(args.path, pattern=args.pattern)
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    rows = summary["tensors"]
    pattern = summary["pattern"]
    width = max((len(r["name"]) for r in rows), default=10)
    for r in rows:
        follows = {True: "yes", False: "NO", None: "-"}[r["follows_pattern"]]
        role = "pruned" if r["target"] else "dense "
        scale = f"  fp8, scales {r['scale']['min']:.3g}..{r['scale']['max']:.3g}" if "scale" in r else ""
        print(
            f"{r['name']:{width}s}  {str(r['shape']):14s}  {role}  sparsity {r['sparsity']:.3f}  {pattern} {follows}"
            + scale
        )
    targets = [r for r in rows if r["target"]]
    print(
        f"{sum(r['follows_pattern'] is True for r in targets)}/{len(targets)} pruned weights follow {pattern} "
        f"along the input dimension (pruned weights from {summary['targets_from']})"
    )
    fp8 = [r for r in rows if "scale" in r]
    if fp8:
        print(f"{len(fp8)} weights in float8_e4m3fn, each with float32 per-output-channel scales (.weight_scale)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="apt-sparse", description="One-shot N:M pruning and deployment of LMs")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_prune(sub)
    e = sub.add_parser("eval", help="accuracy of a dense model or a pruned folder (with its dense reference)")
    e.add_argument("model")
    e.add_argument("--eval-data", default="stdlib")
    e.add_argument("--num-eval-windows", type=int, default=None, help="default: every window of the text")
    e.add_argument("--max-seq-length", type=int, default=512)
    e.add_argument("--device", default="cpu")
    e.add_argument("--trust-remote-code", action=argparse.BooleanOptionalAction, default=False)
    e.add_argument("--json", action="store_true", help="print JSON on stdout")
    e.add_argument("--tasks", default=None, help="lm-eval tasks, comma-separated (needs apt-sparse[eval])")
    e.add_argument("--num-fewshot", type=int, default=None, help="--tasks: few-shot examples (default: each task's)")
    e.add_argument("--limit", type=int, default=None, help="--tasks: at most this many examples per task")
    e.add_argument("--include-path", default=None, help="--tasks: a folder of lm-eval task YAML files (offline)")
    e.add_argument("--dense", default=None, help="--tasks: the dense source (default: the report's)")
    e.add_argument("--batch-size", type=int, default=8, help="--tasks: lm-eval's batch size")
    i = sub.add_parser("inspect", help="per-layer sparsity and N:M validity of any checkpoint folder")
    i.add_argument("path")
    i.add_argument("--pattern", default=None, help="the pattern to check (default: the report's, else 2:4)")
    i.add_argument("--json", action="store_true")
    for add in _EXTRA_COMMANDS:
        add(sub)
    return parser


# export options and the targets that read them; any other combination is refused up front
EXPORT_OPTIONS = {
    "with_past": ("onnx",),
    "polygraphy": ("onnx", "tensorrt"),
    "max_shard_size": ("vllm", "compressed-tensors"),
    "vllm_check": ("vllm", "compressed-tensors"),
}


def _add_export(sub) -> None:
    from exporters import EXPORTERS

    x = sub.add_parser("export", help="turn a pruned folder into a deployable artifact, with a manifest")
    x.add_argument("target", choices=sorted(EXPORTERS))
    x.add_argument("src", help="a pruned Hugging Face folder (apt-sparse prune --out)")
    x.add_argument("out", help="output folder (written atomically)")
    x.add_argument(
        "--dtype", default=None, choices=["float32", "float16", "bfloat16"], help="default: float16 (onnx: float32)"
    )
    x.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False)
    x.add_argument(
        "--with-past",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="onnx: the decoding graph with past/present keys and values",
    )
    x.add_argument(
        "--polygraphy",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="onnx/tensorrt: also run polygraphy's independent sparsity inspection (minutes)",
    )
    x.add_argument("--max-shard-size", default=None, help="vllm/compressed-tensors: shard size (default 5GB)")
    x.add_argument(
        "--vllm-check",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="vllm/compressed-tensors: load the export in vLLM through the apt_sparse_24 plugin and compare "
        "greedy tokens with transformers (default: where an environment with vLLM exists)",
    )
    x.set_defaults(handler=_export)


def _export(args) -> None:
    from exporters import export

    options = {}
    for option, targets in EXPORT_OPTIONS.items():
        value = getattr(args, option)
        if value is None:
            continue
        if args.target not in targets:
            flag = "--" + option.replace("_", "-")
            raise InvalidInputError(f"{flag} applies to the {' and '.join(targets)} target(s), not {args.target}")
        options[option] = value
    if args.dtype:
        options["dtype"] = args.dtype
    manifest = export(args.target, args.src, args.out, overwrite=args.overwrite, **options)
    size = sum(f["bytes"] for f in manifest["files"])
    check = manifest["pattern_check"]
    print(
        f"wrote {args.out}: {len(manifest['files'])} files, {size / 2**20:.1f} MiB; "
        f"{len(check['layers'])} pruned weights checked {check['pattern']} ({check['targets_from']})"
    )
    for key, value in manifest["validation"].items():
        print(f"  {key}: {value}")
    if "trtexec" in manifest:
        print(f"  trtexec: {manifest['trtexec']}")


def _add_demo(sub) -> None:
    d = sub.add_parser("demo", help="prune (apt and baselines) → export → bench → report on the offline model")
    d.add_argument("--out", required=True, help="output folder for checkpoints, artifacts, results.json, report.md")
    d.add_argument(
        "--quick",
        action="store_true",
        help="small settings (CI): two methods, tiny calibration, apt without the ADMM search",
    )
    d.add_argument("--model", default="smollm2-135m", help="the model to run the chain on (default smollm2-135m)")
    d.add_argument(
        "--vllm-check",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="load the vllm and compressed-tensors exports in vLLM (default: where an environment with vLLM exists)",
    )
    d.add_argument(
        "--keep-results",
        default=None,
        metavar="NAME",
        help="also copy results.json, report.md and plots into runtime_bench/results/NAME",
    )
    d.set_defaults(handler=_demo)


def _demo(args) -> None:
    from runtime_bench.demo import DemoConfig, copy_results_into_repository, run_demo, summary_line

    config = replace(DemoConfig.quick() if args.quick else DemoConfig(), model=args.model, vllm_check=args.vllm_check)
    command = " ".join(["apt-sparse demo", *sys.argv[2:]]) if sys.argv[1:2] == ["demo"] else "apt-sparse demo"
    report = run_demo(args.out, config, command=command)
    print(f"accuracy: {summary_line(report.parent / 'results.json')}")
    if args.keep_results:
        print(f"kept results in {copy_results_into_repository(report.parent, args.keep_results)}")
    print(f"report: {report}")


_HANDLERS = {"prune": _prune, "eval": _eval, "inspect": _inspect}


def _add_bench(sub) -> None:
    b = sub.add_parser("bench", help="how much faster and how much worse a pruned folder is than its dense source")
    b.add_argument("folder", help="a pruned Hugging Face folder (ours, or any whose pruned weights are N:M)")
    b.add_argument("--dense", default=None, help="the dense source (default: the one named in prune_report.json)")
    b.add_argument("--backends", default=None, help="comma-separated backends to run (default: every one)")
    b.add_argument("--out", default=None, help="where results.json and report.md go (default: FOLDER-bench)")
    b.add_argument("--onnx", default=None, help="an apt-sparse export onnx folder of this model")
    b.add_argument("--tensorrt", default=None, help="an apt-sparse export tensorrt folder of this model")
    b.add_argument("--quick", action="store_true", help="a short sweep (M in 1, 16, 256; one prefill shape)")
    b.set_defaults(handler=_bench)


def _bench(args) -> None:
    from runtime_bench.bench import BenchConfig
    from runtime_bench.folder_bench import bench_folder

    config = BenchConfig()
    if args.quick:
        config = replace(
            config,
            gemm_ms=(1, 16, 256),
            gemm_repeats=5,
            llama_shapes=False,
            prefill=((1, 128),),
            decode=(1, 32, 16),
            e2e_repeats=3,
        )
    backends = tuple(b.strip() for b in args.backends.split(",")) if args.backends else None
    out = args.out or f"{args.folder.rstrip('/')}-bench"
    report = bench_folder(
        args.folder, out, dense=args.dense, backends=backends, onnx=args.onnx, tensorrt=args.tensorrt, config=config
    )
    results = json.loads((report.parent / "results.json").read_text())
    for row in results["e2e"]["prefill"] + results["e2e"]["decode"]:
        unit = "ms" if "seq" in row else "tokens/s"
        shape = f"{row['batch']}×{row.get('seq', row.get('prompt'))}"
        print(f"{row['model']:6s} {row['backend']:34s} {shape:>9s}  {row['result']['median']:.2f} {unit}")
    for what, reason in results["not_measured"].items():
        print(f"not measured: {what}: {reason}")
    print(f"report: {report}")


def _add_quantize(sub) -> None:
    q = sub.add_parser(
        "quantize", help="write a pruned (or dense) folder in FP8: compressed-tensors float-quantized, W8A8"
    )
    q.add_argument("src", help="a pruned Hugging Face folder, a dense one (the dense FP8 baseline), or a short name")
    q.add_argument("out", help="output folder (written atomically)")
    q.add_argument("--scheme", default="fp8", choices=["fp8"], help="fp8: e4m3, per-channel weights, per-token inputs")
    q.add_argument(
        "--rounding",
        default="compensate",
        choices=["compensate", "nearest"],
        help="compensate (default): GPTQ's sequential error-compensating pass with the mask fixed, on calibration "
        "text; nearest: each weight rounded on its own, no data",
    )
    q.add_argument("--calibration-data", default=None, help="--rounding compensate: default the run's (report)")
    q.add_argument("--num-calibration-samples", type=int, default=None, help="default the run's, else 128")
    q.add_argument("--max-seq-length", type=int, default=None, help="default the run's, else 512")
    q.add_argument("--batch-size", type=int, default=8)
    q.add_argument("--device", default="cpu", help="cpu or cuda[:N]: holds one block and its Hessians")
    q.add_argument(
        "--evaluate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure the report's accuracy again, in FP8 (W8A8), on the run's evaluation text",
    )
    q.add_argument("--max-shard-size", default="5GB")
    q.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False)
    q.set_defaults(handler=_quantize)


def _quantize(args) -> None:
    from apt.folder.report import read_report
    from apt.models.loading import source_folder
    from apt.run.quantize import QuantizeConfig, quantize_folder

    config = QuantizeConfig(
        rounding=args.rounding,
        calibration_data=args.calibration_data,
        num_calibration_samples=args.num_calibration_samples,
        max_seq_length=args.max_seq_length,
        device=args.device,
        batch_size=args.batch_size,
        evaluate=args.evaluate,
        max_shard_size=args.max_shard_size,
    )
    src = args.src
    if not os.path.isdir(src):
        src = source_folder(src)[1]  # a short name or hub id: its dense folder
    record = quantize_folder(src, args.out, overwrite=args.overwrite, config=config)
    what = f"{record['pattern']} sparse" if record["pattern"] else "dense"
    print(
        f"wrote {args.out}: {record['weights_quantized']} {what} weights in float8_e4m3fn with per-channel scales, "
        f"rounded by {record['pass']}; unquantized: {', '.join(record['ignore'])}"
    )
    report = read_report(args.out)
    accuracy = report.get("accuracy") if report else None
    if accuracy and "fp8" in accuracy:
        metric = accuracy["metric"]
        dense = accuracy["dense"].get(metric)
        line = f"{metric} in FP8 (W8A8): dense {dense:.4f} → " if dense is not None else f"{metric} in FP8 (W8A8): "
        print(line + f"{accuracy['pruned'][metric]:.4f}")


_EXTRA_COMMANDS: list = [_add_export, _add_demo, _add_bench, _add_quantize]


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    rank = os.environ.get("RANK") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    who = f"rank {rank}: " if rank is not None else ""
    # SIGTERM (kill, a scheduler's stop; under torchrun, the launcher stopping the other ranks when one
    # failed) is handled like Ctrl-C: the job says what it leaves, and the exit status is 143
    previous = signal.signal(signal.SIGTERM, _terminated_by(rank))
    try:
        handler = _HANDLERS.get(args.command) or args.handler
        handler(args)
    except KeyboardInterrupt as err:
        # the job and the demo say what they leave behind; anything else writes atomically or not at all
        out = getattr(args, "out", None)
        said = str(err) or f"nothing was written{f' to {out}' if out else ''}"
        stopped = "stopped by SIGTERM" if _TERMINATED["signal"] else "interrupted"
        print(f"\n{who}{stopped}: {said}", file=sys.stderr)
        return 143 if _TERMINATED["signal"] else 130
    except AptError as err:
        print(f"{who}error: {' '.join(str(err).split())}", file=sys.stderr)  # one line, whatever it quotes
        return 2
    except OSError as err:
        if not is_write_failure(err):
            raise
        # a write that failed outside the code that names its output: still one line, and what is left
        print(f"{who}error: {write_failure(err)}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
        _TERMINATED["signal"] = False
    return 0


_TERMINATED = {"signal": False}


def _terminated_by(rank):
    def handler(_signum, _frame):
        _TERMINATED["signal"] = True
        raise KeyboardInterrupt("the launcher stops every rank when one fails" if rank is not None else "asked to stop")

    return handler


if __name__ == "__main__":
    sys.exit(main())
