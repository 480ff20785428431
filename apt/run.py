"""The main job: load a model, prune it on calibration text, measure accuracy, write a checkpoint.

``prune_model(PruneJob(...))`` writes ``OUT/`` (safetensors, config, tokenizer, ``prune_report.json``)
in one atomic rename: an interrupted or failed run leaves nothing that looks complete.

``prune_report.json`` (schema ``apt-sparse/prune-report/1``):

- ``model``: ``name``, ``location``, ``gguf_file``, ``model_type``, ``family``
- ``config``: every option of the run; ``versions``: python, torch, transformers, apt-sparse
- ``data``: calibration/eval sources, windows, sequence length, tokens
- ``layers``: per layer ``name``, ``shape``, ``nm_valid``, ``sparsity``, ``relative_loss``, ``loss``,
  ``damp``, ``seconds``, ``skipped`` (reason or null), ``solver`` (the solver's stats)
- ``totals``: layers pruned/skipped, summed and mean relative loss, target sparsity, all_nm_valid,
  seconds of pruning and of the whole run
- ``peak_memory``: ``bytes`` and ``kind`` (``run_peak_rss``: resident-set peak of the pruning run on CPU;
  ``cuda_max_allocated`` on CUDA; ``process_max_rss`` where the peak cannot be reset)
- ``accuracy``: ``metric`` and ``dense`` / ``pruned`` entries (``perplexity`` for causal LMs,
  ``embedding_cosine`` for encoders); ``null`` when evaluation was switched off
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from apt.artifacts import atomic_directory, write_json_atomic
from apt.data import load_text, token_windows
from apt.errors import InvalidInputError
from apt.evaluate import embedding_cosine, perplexity, sentence_embeddings
from apt.families import family_for
from apt.models import load_model
from apt.pipeline import RunConfig, calibrate_and_prune

log = logging.getLogger(__name__)

REPORT_NAME = "prune_report.json"
SCHEMA = "apt-sparse/prune-report/1"


@dataclass(frozen=True)
class PruneJob:
    model: str
    out: str
    run: RunConfig = RunConfig()
    calibration_data: str = "stdlib"
    eval_data: str = "stdlib"
    num_calibration_samples: int = 128
    max_seq_length: int = 512
    num_eval_windows: int = 32
    dtype: str = "float32"
    seed: int = 0
    trust_remote_code: bool = False
    evaluate: bool = True
    overwrite: bool = False

    def __post_init__(self):
        if self.num_calibration_samples < 1 or self.num_eval_windows < 1:
            raise InvalidInputError("--num-calibration-samples and the number of eval windows must be at least 1")


def versions() -> dict:
    import transformers

    from apt import __version__

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "apt-sparse": __version__,
    }


class Accuracy:
    """Held-out accuracy of one family of model: perplexity (causal) or embedding fidelity (encoder)
    against embeddings of the dense model taken before pruning."""

    def __init__(
        self, model, tokenizer, eval_docs, causal: bool, num_windows: int, seq_len: int, device: str = "cpu"
    ) -> None:
        self.causal = causal
        self.tokenizer = tokenizer
        self.device = device
        if causal:
            self.windows = token_windows(eval_docs, tokenizer, num_windows, seq_len)
        else:
            self.texts = list(eval_docs[: num_windows * 8])
            self.reference = sentence_embeddings(model, tokenizer, self.texts, device=self.device)

    @property
    def metric(self) -> str:
        return "perplexity" if self.causal else "embedding_cosine"

    def measure(self, model) -> dict:
        if self.causal:
            return perplexity(model, self.windows, device=self.device)
        return embedding_cosine(
            self.reference, sentence_embeddings(model, self.tokenizer, self.texts, device=self.device)
        )


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise InvalidInputError(f"{out} already exists and is not empty: pass --overwrite or choose another --out")


def prune_model(job: PruneJob) -> dict:
    """Run the whole job and return the report (also written to ``OUT/prune_report.json``)."""
    started = time.perf_counter()
    out = Path(job.out)
    _check_out(out, job.overwrite)  # fail before minutes of work, not after
    model, tokenizer, source = load_model(job.model, dtype=job.dtype, trust_remote_code=job.trust_remote_code)
    family = family_for(model.config)
    calibration = load_text(job.calibration_data, seed=job.seed)
    evaluation = calibration if job.eval_data == job.calibration_data else load_text(job.eval_data, seed=job.seed)
    windows = token_windows(
        calibration.calibration, tokenizer, job.num_calibration_samples, job.max_seq_length, job.seed
    )
    log.info("calibrating on %d windows × %d tokens from %s", len(windows), windows.shape[1], calibration.source)

    accuracy = None
    if job.evaluate:
        meter = Accuracy(
            model,
            tokenizer,
            evaluation.evaluation,
            family.causal,
            job.num_eval_windows,
            job.max_seq_length,
            job.run.device,
        )
        accuracy = {"metric": meter.metric, "data": evaluation.source, "dense": meter.measure(model)}
    result = calibrate_and_prune(model, family, windows, job.run)
    if job.evaluate:
        accuracy["pruned"] = meter.measure(model)

    layers = result["layers"]
    pruned = [r for r in layers if not r["skipped"]]
    targets_total = sum(r["shape"][0] * r["shape"][1] for r in pruned)
    report = {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "name": source.name,
            "location": source.location,
            "gguf_file": source.gguf_file,
            "model_type": model.config.model_type,
            "family": family.name,
        },
        "config": {k: v for k, v in dataclasses.asdict(job).items() if k != "run"}
        | {"run": json.loads(json.dumps(dataclasses.asdict(job.run), default=str))},
        "versions": versions(),
        "data": {
            "calibration": calibration.source,
            "calibration_windows": len(windows),
            "max_seq_length": int(windows.shape[1]),
            "calibration_tokens": int(windows.numel()),
            "eval": evaluation.source,
        },
        "layers": layers,
        "totals": {
            "layers_pruned": len(pruned),
            "layers_skipped": len(layers) - len(pruned),
            "sum_relative_loss": sum(r["relative_loss"] for r in pruned),
            "mean_relative_loss": sum(r["relative_loss"] for r in pruned) / max(len(pruned), 1),
            "target_sparsity": sum(r["sparsity"] * r["shape"][0] * r["shape"][1] for r in pruned)
            / max(targets_total, 1),
            "all_nm_valid": all(r["nm_valid"] is not False for r in pruned),
            "seconds_pruning": result["seconds"],
            "seconds_total": time.perf_counter() - started,
        },
        "peak_memory": {"bytes": result["peak_memory_bytes"], "kind": result["peak_memory_kind"]},
        "accuracy": accuracy,
    }
    with atomic_directory(out, overwrite=job.overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / REPORT_NAME, report)
    return report


def evaluate_model(
    name: str,
    eval_data: str = "stdlib",
    num_eval_windows: int = 32,
    max_seq_length: int = 512,
    device: str = "cpu",
    seed: int = 0,
    trust_remote_code: bool = False,
) -> dict:
    """Accuracy of a dense model or a pruned folder. For a pruned folder the dense source named in its
    ``prune_report.json`` is measured in the same run as the reference."""
    report_path = Path(name) / REPORT_NAME
    reference_name = json.loads(report_path.read_text())["model"]["name"] if report_path.is_file() else None
    model, tokenizer, source = load_model(name, trust_remote_code=trust_remote_code)
    family = family_for(model.config)
    docs = load_text(eval_data, seed=seed).evaluation
    result = {"model": name, "metric": "perplexity" if family.causal else "embedding_cosine", "data": eval_data}
    if reference_name:
        dense, _, _ = load_model(reference_name, trust_remote_code=trust_remote_code)
        meter = Accuracy(dense, tokenizer, docs, family.causal, num_eval_windows, max_seq_length, device)
        result["dense"] = {"model": reference_name} | meter.measure(dense)
        result["pruned"] = meter.measure(model)
    else:
        meter = Accuracy(model, tokenizer, docs, family.causal, num_eval_windows, max_seq_length, device)
        result["dense"] = {"model": name} | meter.measure(model)
        if not family.causal:
            result["dense"]["note"] = "an encoder's fidelity is measured against its dense source; none was given"
    return result
