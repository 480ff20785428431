"""The Hugging Face model card (``README.md``) of a pruned folder, written from its ``prune_report.json``.

YAML front matter (``base_model``, ``library_name``, ``pipeline_tag``, ``tags``), then the method and
its options, the calibration data, a per-layer summary, dense vs pruned accuracy, the command that
made the folder, and what each deployment path does with the zeros today. Every number comes from
the report, formatted by ``figure``, so a reader can check the card against the report. The card
reads the report only, never the run that wrote it.
"""

from __future__ import annotations

import json
import re


def figure(value: float | None) -> str:
    """How the card prints a measured number: four significant digits."""
    return "n/a" if value is None else f"{value:.4g}"


def model_card(report: dict, command: str) -> str:
    """The card's markdown text; ``command`` is the ``apt-sparse prune`` command that made the folder."""
    model = report["model"]
    pattern = report["pattern"]
    causal = model.get("causal", model["family"] != "bert")
    totals = report["totals"]
    base = model.get("base_model") or (model["name"] if re.fullmatch(r"[\w.-]+/[\w.-]+", model["name"]) else None)
    front = {
        **({"base_model": base} if base else {}),
        "library_name": "transformers",
        "pipeline_tag": _pipeline(report, causal),
        "tags": ["sparse", f"{pattern}-sparsity", "pruned", "apt-sparse", report["config"]["run"]["solver"]["method"]],
    }
    lines = ["---", *_yaml(front), "---", "", f"# {model['name']} pruned to {pattern} sparsity", ""]
    solver = report["config"]["run"]["solver"]
    lines += [
        f"The {model['family']}-family model `{model['name']}` with every prunable linear layer of its blocks "
        f"pruned to **{pattern}** in one shot (no retraining) by "
        f"[apt-sparse](https://pypi.org/project/apt-sparse/) with the `{solver['method']}` method.",
        "",
        "## How it was made",
        "",
        f"- Method: `{solver['method']}`, options {json.dumps({k: v for k, v in solver.items() if k != 'method'})}",
        f"- Calibration: {report['data']['calibration_windows']} windows × {report['data']['max_seq_length']} tokens "
        f"({report['data']['calibration_tokens']} tokens) of `{report['data']['calibration']}`"
        + (
            f", each with one of {report['data']['calibration_images']} images"
            if report["data"].get("calibration_images")
            else ""
        ),
        f"- Command: `{command}`",
        f"- Versions: {', '.join(f'{k} {v}' for k, v in report['versions'].items())}",
        "",
        "## Layers",
        "",
        f"- {totals['layers_pruned']} layers pruned, {totals['layers_skipped']} left dense"
        + (
            f" ({', '.join(sorted({r['skipped'] for r in report['layers'] if r['skipped']}))})"
            if totals["layers_skipped"]
            else ""
        ),
        f"- sparsity of the pruned layers: {figure(totals['target_sparsity'])}; every one follows {pattern}: "
        f"{'yes' if totals['all_nm_valid'] else 'NO'}",
        f"- relative layer loss L(Ŵ)/L(0): mean {figure(totals['mean_relative_loss'])}, "
        f"sum {figure(totals['sum_relative_loss'])}",
        "- embeddings and the LM head are dense",
        *_vision(report.get("vision")),
        "",
    ]
    worst = sorted((r for r in report["layers"] if not r["skipped"]), key=lambda r: -r["relative_loss"])[:3]
    if worst:
        lines += [
            "Highest relative losses: " + ", ".join(f"`{r['name']}` {figure(r['relative_loss'])}" for r in worst),
            "",
        ]
    lines += _accuracy(report)
    lines += _deploy(pattern, causal)
    return "\n".join(lines) + "\n"


def _pipeline(report: dict, causal: bool) -> str:
    if report.get("vision") is not None:
        return "image-text-to-text"
    return "text-generation" if causal else "feature-extraction"


def _vision(vision: dict | None) -> list[str]:
    """The vision-language model's vision part: dense, or pruned (its blocks, the Linears after them, what stayed
    dense)."""
    if vision is None:
        return []
    if not vision.get("pruned"):
        return ["- the vision tower and projector are dense, byte for byte the source's"]
    kept = vision["matrices_kept_dense"]
    return [
        f"- the vision tower's {vision['count']} blocks (`{vision['blocks']}`) and the "
        f"{len(vision['after_blocks'])} Linears after them are pruned too; {len(kept)} other matrices of the vision "
        "part stay dense" + (f" (e.g. `{kept[0]}`)" if kept else "")
    ]


def _accuracy(report: dict) -> list[str]:
    accuracy = report.get("accuracy")
    lines = ["## Accuracy", ""]
    if not accuracy:
        return lines + ["Not measured: the run was made with `--no-evaluate`; run `apt-sparse eval` here.", ""]
    lines += [f"Measured by the run on {accuracy['data']}.", "", "| metric | dense | pruned |", "|---|---|---|"]
    for metric in ("perplexity", "embedding_cosine", "retrieval_top1"):
        dense, pruned = accuracy["dense"].get(metric), accuracy["pruned"].get(metric)
        if dense is not None or pruned is not None:
            lines.append(f"| {metric} | {figure(dense) if dense is not None else 'reference'} | {figure(pruned)} |")
    windows = accuracy["pruned"].get("windows")
    if windows:
        lines += ["", f"Perplexity over {windows} windows of {accuracy['pruned']['seq_len']} tokens."]
    return lines + [""]


def _deploy(pattern: str, causal: bool) -> list[str]:
    load = "AutoModelForCausalLM" if causal else "AutoModel"
    lines = [
        "## Load and deploy",
        "",
        "```python",
        f"from transformers import {load}",
        f'model = {load}.from_pretrained("path/to/this/folder")',
        "```",
        "",
        "- **transformers** stores and runs the zeros densely: same speed and memory as the dense model.",
        "- **TensorRT**: `apt-sparse export tensorrt` writes an fp16 ONNX graph whose pruned weights are constant "
        "initializers; `trtexec --sparsity=enable` (SPARSE_WEIGHTS) considers 2:4 sparse tactics and keeps them only "
        "where they are faster, typically at large batch × sequence (prefill).",
        "- **vLLM** (current releases) loads this folder as a dense model (`apt-sparse export vllm` for fp16/bf16): "
        "vLLM removed its 2:4 kernels in 0.19.1. vLLM 0.6.5–0.19.0 ran 2:4 with CUTLASS on Hopper from the "
        "compressed-tensors bitmask format (`apt-sparse export compressed-tensors`).",
    ]
    if pattern != "2:4":
        lines.append(
            f"- {pattern} is not 2:4: no GPU kernel accelerates it today; the TensorRT and bitmask exports refuse it."
        )
    return lines + [""]


def _yaml(data: dict) -> list[str]:
    out = []
    for key, value in data.items():
        if isinstance(value, list):
            out.append(f"{key}:")
            out += [f"- {json.dumps(item)}" for item in value]
        else:
            out.append(f"{key}: {json.dumps(value)}")
    return out
