"""Accuracy on lm-evaluation-harness tasks, for a pruned folder and its dense source in one run.

``apt-sparse eval DIR --tasks boolq,rte,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa``
runs every task lm-eval knows (where its data is reachable), through lm-eval's Python API with each
model loaded here; ``--include-path DIR`` adds tasks defined in lm-eval's own YAML format over local
JSON/JSONL files, which run offline. The result has one row per task and metric: dense, pruned, and
the retained fraction (pruned / dense where higher is better, dense / pruned where lower is).
Needs the ``eval`` extra (``pip install 'apt-sparse[eval]'``: lm-eval 0.4.x).
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from apt.errors import InvalidInputError, MissingDependencyError
from apt.folder.fp8 import open_fp8_checked
from apt.folder.report import REPORT_NAME, read_report
from apt.models.loading import source_folder


def _lm_eval():
    try:
        return importlib.import_module("lm_eval"), importlib.import_module("lm_eval.models.huggingface")
    except ImportError as err:
        raise MissingDependencyError(
            "lm-evaluation-harness tasks need lm-eval: pip install 'apt-sparse[eval]' (lm-eval 0.4.x)"
        ) from err


def run_tasks(folder: Path, tasks: list[str], num_fewshot, limit, include_path, device: str, batch_size: int) -> dict:
    """lm-eval's ``simple_evaluate`` on the model in ``folder``, loaded here and handed to lm-eval's
    ``HFLM``. Returns lm-eval's result dictionary."""
    import torch
    import transformers

    lm_eval, huggingface = _lm_eval()
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise InvalidInputError(
            f"lm-eval knows no task {unknown}: check the names (lm-eval --tasks list) or pass --include-path"
        )
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    if tokenizer.bos_token_id is None and tokenizer.eos_token_id is None:
        raise InvalidInputError(
            f"{folder}: the tokenizer has neither a bos nor an eos token, which lm-eval puts before every "
            "continuation it scores; set bos_token (or eos_token) in its tokenizer_config.json"
        )
    lm = huggingface.HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    return lm_eval.simple_evaluate(
        model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager, log_samples=False
    )


def task_table(dense: dict, pruned: dict) -> list[dict]:
    """One row per task and metric (``acc,none`` → metric ``acc``, filter ``none``), stderr aside."""
    rows = []
    for task, metrics in pruned["results"].items():
        higher = pruned.get("higher_is_better", {}).get(task, {})
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, filter_name = key.split(",", 1)
            base = dense["results"][task][key]
            better_high = higher.get(metric, True)
            retained = None
            if base and value:
                retained = value / base if better_high else base / value
            rows.append(
                {
                    "task": task,
                    "metric": metric,
                    "filter": filter_name,
                    "dense": base,
                    "pruned": value,
                    "retained": retained,
                    "higher_is_better": better_high,
                    "samples": pruned.get("n-samples", {}).get(task, {}).get("effective"),
                }
            )
    return rows


def evaluate_tasks(
    folder: str | Path,
    tasks: list[str],
    num_fewshot: int | None = None,
    limit: int | None = None,
    include_path: str | Path | None = None,
    dense: str | None = None,
    device: str = "cpu",
    batch_size: int = 8,
) -> dict:
    """The pruned folder and its dense source (from its report, or ``dense``) on the same tasks."""
    lm_eval, _ = _lm_eval()
    folder = Path(folder)
    fp8 = open_fp8_checked(folder).fp8  # a damaged FP8 folder is refused naming the tensor
    if fp8 and importlib.util.find_spec("compressed_tensors") is None:
        raise MissingDependencyError(
            f"{folder} is FP8: transformers loads it through compressed-tensors >= 0.15, which is not installed "
            "here: pip install 'apt-sparse[fp8]'"
        )
    if dense is None:
        report = read_report(folder)
        if report is None:
            raise InvalidInputError(f"{folder} has no {REPORT_NAME} naming its dense source: pass --dense")
        dense = report["model"]["name"]
    _, dense_folder = source_folder(dense)
    if include_path is not None and not Path(include_path).is_dir():
        raise InvalidInputError(f"--include-path {include_path} is not a folder of lm-eval task YAML files")
    outputs = {
        side: run_tasks(path, tasks, num_fewshot, limit, include_path, device, batch_size)
        for side, path in (("dense", dense_folder), ("pruned", folder))
    }
    return {
        "pruned": str(folder),
        "dense": dense,
        "tasks": tasks,
        "num_fewshot": num_fewshot,
        "limit": limit,
        "lm_eval": getattr(lm_eval, "__version__", "unknown"),
        "rows": task_table(outputs["dense"], outputs["pruned"]),
    } | (
        {"fp8": f"{len(fp8)} FP8 weights: transformers runs the folder through compressed-tensors as W8A8"}
        if fp8
        else {}
    )
