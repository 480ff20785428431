"""The pruning run's report: ``build_report`` assembles ``prune_report.json`` (schema in
``apt.folder.report``) from what the run did, and ``PeakMemory`` measures the run's memory peak."""

from __future__ import annotations

import dataclasses
import datetime
import json
import resource
import time

import torch

from apt.folder.report import SCHEMA, versions


def build_report(
    *,
    job,
    source,
    folder,
    layered,
    dtype_reason,
    calibration,
    layers,
    seconds_pruning,
    started,
    checkpoint,
    peak,
    accuracy,
) -> dict:
    pruned = [r for r in layers if not r["skipped"]]
    targets_total = sum(r["shape"][0] * r["shape"][1] for r in pruned)
    windows = calibration["windows"]
    return {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "name": source.name,
            "location": str(folder),
            "gguf_file": source.gguf_file,
            "model_type": layered.config.model_type,
            "family": layered.layout.name,
            "causal": layered.layout.causal,
            "base_model": source.origin,
            "layout": layered.layout.how,
            "compute_dtype": str(layered.dtype).removeprefix("torch."),
            "compute_dtype_reason": dtype_reason,
        },
        "config": {k: v for k, v in dataclasses.asdict(job).items() if k != "run"}
        | {"run": json.loads(json.dumps(dataclasses.asdict(job.run), default=str))},
        "versions": versions(),
        "data": {
            "calibration": calibration["source"],
            "calibration_windows": len(windows),
            "max_seq_length": int(windows.shape[1]),
            "calibration_tokens": int(windows.numel()),
            "eval": accuracy["data"] if accuracy else None,
        },
        "pattern": str(job.run.solver.pattern),
        "layers": layers,
        "totals": {
            "layers_pruned": len(pruned),
            "layers_skipped": len(layers) - len(pruned),
            "sum_relative_loss": sum(r["relative_loss"] for r in pruned),
            "mean_relative_loss": sum(r["relative_loss"] for r in pruned) / max(len(pruned), 1),
            "target_sparsity": sum(r["sparsity"] * r["shape"][0] * r["shape"][1] for r in pruned)
            / max(targets_total, 1),
            "all_nm_valid": all(r["nm_valid"] is not False for r in pruned),
            "seconds_pruning": seconds_pruning,
            "seconds_total": time.perf_counter() - started,
        },
        "checkpoint": checkpoint,
        "peak_memory": peak,
        "accuracy": accuracy,
    }


class PeakMemory:
    """The resident-set peak from now on (Linux ``clear_refs`` 5 resets the high-water mark), or the CUDA
    allocator's peak on a GPU."""

    def __init__(self, device: str):
        self.device = device
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(device)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.reset = True
        except OSError:
            self.reset = False

    def read(self) -> dict:
        if self.device.startswith("cuda"):
            return {"bytes": torch.cuda.max_memory_allocated(self.device), "kind": "cuda_max_allocated"}
        if self.reset:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return {"bytes": int(line.split()[1]) * 1024, "kind": "run_peak_rss"}
        return {"bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "kind": "process_max_rss"}
