"""``prune_report.json``: the record a pruned folder carries of how it was made, and the one way to read it.

Written by the pruning run (``apt.run``); read by everything that describes or uses a folder: its
pruned targets, its model card, ``eval``, ``bench`` and the exporters. ``read_report`` refuses a
damaged report or one of another schema with the reason, instead of failing somewhere later.

Schema ``apt-sparse/prune-report/2``:

- ``model``: ``name``, ``location`` (the folder read), ``gguf_file``, ``model_type``, ``family``,
  ``compute_dtype`` and ``compute_dtype_reason`` (why ``--dtype`` resolved to it, ``apt.run.dtype``)
- ``config``: every option of the run; ``versions``: python, torch, transformers, apt-sparse
- ``data``: calibration source, windows, sequence length, tokens (and ``calibration_images``: how many
  images were paired with the windows); evaluation source and how its documents were chosen
- ``pattern``: the N:M (or unstructured) pattern every pruned layer follows
- ``layers``: per layer ``name`` (module), ``tensor`` (checkpoint name), ``shape``, ``nm_valid``,
  ``sparsity``, ``relative_loss``, ``loss``, ``damp``, ``seconds``, ``skipped`` (reason or null),
  ``solver`` (the solver's stats)
- ``totals``: layers pruned/skipped, summed and mean relative loss, target sparsity, all_nm_valid,
  seconds of pruning and of the whole run
- ``checkpoint``: the source's files, the output's shards and ``max_shard_size``, ``resumed_at_block``
- ``peak_memory``: ``bytes`` and ``kind`` (``run_peak_rss``: resident-set peak of the job on CPU,
  evaluation included; ``cuda_max_allocated`` on CUDA; ``process_max_rss`` where the peak cannot be reset)
- ``accuracy``: ``metric``, ``data`` and ``dense`` / ``pruned`` entries; ``null`` when evaluation was off. In an
  FP8 folder it is the folder's own, measured W8A8 (its ``fp8`` entry says how), and ``accuracy_unquantized``
  keeps the pruned folder's where ``apt-sparse quantize`` measured it again
- ``quantization`` (FP8 folders): the scheme, the weights quantized and left out, the rounding (``pass``) and,
  for ``apt-sparse quantize``'s error-compensating pass, its calibration and each layer's ``fp8_relative_loss``
- ``distributed``: world size, backend and each rank's time, batches and communication
- ``left_dense``: block weights of more than two dimensions in a layout the run does not know (``name``,
  ``shape``, ``module``, ``why``), left dense
- ``vision``: for a vision-language model, ``pruned`` and, when its vision part was pruned, the vision
  blocks' path and count, the Linears after them, and the matrices kept dense; ``null`` for other models
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

from apt.errors import InvalidInputError

REPORT_NAME = "prune_report.json"
SCHEMA = "apt-sparse/prune-report/2"
REQUIRED = ("model", "config", "pattern", "layers", "totals")


class DamagedFileError(InvalidInputError):
    """A file this toolchain wrote and now reads back is truncated, corrupted or of another schema."""


def read_json(path: Path, what: str, remedy: str) -> dict:
    """A JSON object from ``path``, or a ``DamagedFileError`` naming the file, what is wrong and ``remedy``."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DamagedFileError(f"{path} ({what}) is damaged: not valid JSON ({err}); {remedy}") from err
    if not isinstance(data, dict):
        raise DamagedFileError(f"{path} ({what}) is damaged: not a JSON object; {remedy}")
    return data


def read_report(folder: str | Path) -> dict | None:
    """The folder's ``prune_report.json``, checked against the schema; ``None`` where the folder has none."""
    path = Path(folder) / REPORT_NAME
    if not path.is_file():
        return None
    remedy = "prune the model again (or remove the file to treat the folder as pruned elsewhere)"
    report = read_json(path, "the pruning report", remedy)
    if report.get("schema") != SCHEMA:
        raise DamagedFileError(
            f"{path} has schema {report.get('schema')!r}, this apt-sparse reads {SCHEMA!r}: {remedy}"
        )
    missing = [key for key in REQUIRED if key not in report]
    if missing or not isinstance(report["layers"], list):
        raise DamagedFileError(f"{path} is damaged: it lacks {', '.join(missing) or 'a list of layers'}; {remedy}")
    return report


def versions() -> dict:
    """The library versions every report and manifest records."""
    import torch
    import transformers

    from apt import __version__

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "apt-sparse": __version__,
    }
