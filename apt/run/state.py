"""The partial folder of a run: ``.OUT.partial`` beside ``OUT``, with the shards written so far and
``resume.json``, the state ``--resume`` continues from; renamed into ``OUT`` in one step when complete.

``resume.json`` (schema ``apt-sparse/resume/1``) holds the run's options (``PruneJob.fingerprint``, with
``dtype`` the compute dtype ``auto`` resolved to), the source's identity (folder, files with sizes and
modification times), the blocks done, their layer records and the seconds spent pruning them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from apt.atomic import write_json_atomic, writing
from apt.errors import InvalidInputError
from apt.folder.card import model_card
from apt.folder.report import REPORT_NAME, DamagedFileError, read_json
from apt.models.checkpoint import ShardedWriter
from apt.models.layered import LayeredModel
from apt.models.portable import copy_side_files, write_config
from apt.run.command import command_of
from apt.run.config import PruneJob


class CannotResume(InvalidInputError):
    """The interrupted run cannot be continued as asked (other options, another source, altered shards)."""


RESUME_NAME = "resume.json"
RESUME_SCHEMA = "apt-sparse/resume/1"


def partial_folder(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def check_output(out: Path, job: PruneJob) -> Path:
    """Refuse before minutes of work: an existing output, a partial run that was not asked about."""
    if out.exists() and not out.is_dir():
        raise InvalidInputError(f"{out} exists and is not a folder: choose another --out")
    if out.exists() and any(out.iterdir()) and not job.overwrite:
        raise InvalidInputError(f"{out} already exists and is not empty: pass --overwrite or choose another --out")
    work = partial_folder(out)
    if job.resume and not (work / RESUME_NAME).is_file():
        raise InvalidInputError(f"nothing to resume: {work} holds no interrupted run of {out}")
    if work.exists() and not job.resume:
        if not job.overwrite:
            raise InvalidInputError(
                f"an interrupted run left {work}: pass --resume to continue it, or --overwrite to start over"
            )
        shutil.rmtree(work)
    return work


def read_resume_state(work: Path) -> dict:
    """The partial folder's ``resume.json``, checked: a damaged one, or one another version wrote, is refused
    with the way out (starting over), never half-read."""
    remedy = "pass --overwrite instead of --resume to start over"
    path = work / RESUME_NAME
    state = read_json(path, "the state of the interrupted run", remedy)
    if state.get("schema") != RESUME_SCHEMA:
        raise DamagedFileError(
            f"{path} was written by another version of apt-sparse (schema {state.get('schema')!r}, this one reads "
            f"{RESUME_SCHEMA!r}); {remedy}"
        )
    missing = [k for k in ("options", "source", "blocks_done", "layers", "seconds_pruning") if k not in state]
    if missing or not isinstance(state.get("blocks_done"), int) or not isinstance(state.get("layers"), list):
        raise DamagedFileError(f"{path} is damaged (missing or malformed: {', '.join(missing) or 'fields'}); {remedy}")
    return state


def output_bytes_needed(work: Path, writer: ShardedWriter) -> int:
    """What the shards still need on disk: all of them for a new run; for a resumed one, what the files
    laid out sparse have not yet been given."""
    needed = 0
    for path, size in writer.sizes.items():
        allocated = path.stat().st_blocks * 512 if path.exists() else 0
        needed += max(size - allocated, 0)
    return needed


def start_or_resume(
    work: Path, writer: ShardedWriter, layered: LayeredModel, job: PruneJob, options: dict, identity: dict
) -> dict:
    """A new partial folder with every tensor outside the blocks already copied, or the state of the
    interrupted run it holds, after checking that run was the same job (``options``: the job's fingerprint
    with the compute dtype resolved) on the same source."""
    if job.resume:
        state = read_resume_state(work)
        changed = sorted(k for k in set(state["options"]) | set(options) if state["options"].get(k) != options.get(k))
        if changed:
            started = state["options"].get("dtype")
            hint = (
                f" (it computed in {started}, where --dtype auto chooses {options['dtype']} on this machine: "
                f"pass --dtype {started})"
                if changed == ["dtype"] and job.dtype == "auto"
                else ""
            )
            raise CannotResume(
                f"cannot resume {work}: it was started with other options ({', '.join(changed)}){hint}; "
                "run with the same options, or pass --overwrite instead of --resume to start over"
            )
        if state["source"] != identity:
            raise CannotResume(
                f"cannot resume {work}: the source changed since it was started (was {state['source']['folder']} "
                f"with {len(state['source']['files'])} files); pass --overwrite instead of --resume to start over"
            )
        if not writer.matches_files_on_disk():
            raise CannotResume(
                f"cannot resume {work}: its shards are missing or altered; pass --overwrite instead of --resume "
                "to start over"
            )
        return state
    with writing(work):
        work.mkdir(parents=True)
    writer.create()
    block_keys = {k for n in layered.parameter_names(f"{layered.block_path}.") for k in layered.checkpoint_keys(n)}
    for key in layered.reader.names():
        if key not in block_keys:  # embeddings, final norm, head, and anything else the source holds
            writer.write(key, layered.reader.read(key))
    writer.sync()
    state = {
        "schema": RESUME_SCHEMA,
        "options": options,
        "source": identity,
        "blocks_done": 0,
        "layers": [],
        "seconds_pruning": 0.0,
    }
    write_json_atomic(work / RESUME_NAME, state)
    return state


def finish_folder(work: Path, out: Path, source: Path, writer: ShardedWriter, report: dict, overwrite: bool) -> None:
    """Index, config, tokenizer and report beside the shards; then one rename makes the folder appear."""
    writer.write_index()
    with writing(work):
        write_config(json.loads((source / "config.json").read_text()), work)
        copy_side_files(source, work)
        write_json_atomic(work / REPORT_NAME, report)
        (work / "README.md").write_text(model_card(report, command_of(report["config"])))
    os.unlink(work / RESUME_NAME)  # every file is written: from here the folder is complete
    if out.exists():
        if not overwrite:
            raise InvalidInputError(f"{out} appeared while the run was working; the result is in {work}")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        work.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        work.rename(out)
