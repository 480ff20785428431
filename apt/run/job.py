"""The main job: prune a model on calibration text, block by block from its checkpoint, measure accuracy,
and write a Hugging Face folder — resumable after a crash.

``prune_model(PruneJob(...))`` never holds the whole model: the weights stream from the source's
safetensors one block at a time (``apt.models.layered``), and each pruned block is written in place
into output shards laid out in advance (``apt.models.checkpoint``). The folder is built under
``.OUT.partial`` beside ``OUT`` and renamed into place in one step when complete, so nothing that
looks finished exists before it is (``apt.run.state``). After every block, ``resume.json`` records
the run's options, the source's identity, the blocks done and their layer records; ``--resume``
continues from there, recomputing the activations entering the next block from the blocks already
written, and ends with files bit-identical to an uninterrupted run's (the report aside, which also
says where it resumed). The report's schema is in ``apt.folder.report``.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from apt.atomic import check_free_space, is_write_failure, write_failure, write_json_atomic
from apt.collective import Collective
from apt.errors import AptError, InvalidInputError, OutputError
from apt.folder.fp8 import open_fp8_checked
from apt.folder.report import REPORT_NAME, DamagedFileError
from apt.measure.accuracy import Accuracy, fp8_emulation
from apt.models.activations import ActivationStore
from apt.models.checkpoint import CheckpointReader, PlannedTensor, ShardedWriter, parse_size
from apt.models.discovery import vision_block_path
from apt.models.layered import LayeredModel, is_vision_language, token_batches
from apt.models.loading import DTYPES, ModelSource, load_tokenizer, source_folder
from apt.run.config import PruneJob
from apt.run.distributed import BroadcastReader, check_same_job
from apt.run.dtype import compute_dtype
from apt.run.multimodal import image_files, image_text_batches
from apt.run.record import PeakMemory, build_report
from apt.run.selfgen import PREFIX_TOKENS, Generated, generate_windows, prompt_count
from apt.run.sequential import layer_plan, prune_blocks, unknown_layouts
from apt.run.state import (
    RESUME_NAME,
    CannotResume,
    check_output,
    finish_folder,
    output_bytes_needed,
    partial_folder,
    start_or_resume,
)
from apt.run.vision import prune_vision
from apt.text.sources import (
    calibration_windows,
    evaluation_documents,
    is_self,
    load_text,
    prefix_source,
    token_windows,
)

log = logging.getLogger(__name__)


class JobInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run, with what it leaves behind."""


def prune_model(job: PruneJob, coll: Collective | None = None) -> dict:
    """Run the whole job and return the report (also written to ``OUT/prune_report.json``).

    Interrupted or failed, the job leaves no ``OUT``; the blocks it finished stay in ``.OUT.partial``
    for ``--resume`` (a run that finished no block leaves nothing at all). Under torchrun, pass the
    process group's ``coll`` (``apt.run.distributed.collective_for``): every rank runs this with the same
    job, and rank 0 writes."""
    started = time.perf_counter()
    coll = coll or Collective()
    out = Path(job.out).resolve()
    work = partial_folder(out)
    # rank 0 owns the output folder: it decides, the others follow its verdict
    refusal = None
    if coll.is_writer:
        try:
            check_output(out, job)
        except InvalidInputError as err:
            refusal = str(err)
    refusal = coll.broadcast_object(refusal)
    if refusal:
        raise InvalidInputError(refusal)
    progress = {"blocks_done": 0, "blocks": None}
    try:
        return _prune(job, out, work, started, progress, coll)
    except BaseException as err:
        done, total = progress["blocks_done"], progress["blocks"]
        if is_write_failure(err):
            err = write_failure(err, work)
        if done == 0 and not job.resume:
            if coll.is_writer:
                shutil.rmtree(work, ignore_errors=True)
            note = f"nothing was written to {out}"
        elif isinstance(err, (DamagedFileError, CannotResume)):
            note = f"the interrupted run in {work} was left as it is"
        else:
            fix = "free space (or allow the write) and " if isinstance(err, OutputError) else ""
            note = f"{out} was not written; {done} of {total} blocks are saved in {work}: {fix}rerun with --resume"
        if isinstance(err, KeyboardInterrupt):
            raise JobInterrupted(f"{err}; {note}" if str(err) else note) from err
        if isinstance(err, OutputError):
            raise OutputError(err.errno, f"{err} ({note})") from err
        if isinstance(err, AptError):
            raise type(err)(f"{err} ({note})") from err
        raise


@dataclass
class _Source:
    """What the job reads: the model (streamed), its tokenizer and the calibration windows."""

    source: ModelSource
    folder: Path
    layered: LayeredModel
    tokenizer: object
    calibration: str
    windows: torch.Tensor
    dtype: str  # the compute dtype, ``auto`` resolved
    dtype_reason: str  # why (``apt.run.dtype``)
    batches: list[dict] | None = None  # with calibration images: one image+text sample per batch
    generated: Generated | None = None  # ``--calibration-data self``: how the text was generated

    def calibration_batches(self, batch_size: int) -> list[dict]:
        """The model inputs calibration runs on: the image+text samples, or the text windows in batches."""
        if self.batches is not None:
            return self.batches
        return token_batches(self.windows, batch_size)


def _open_source(job: PruneJob, coll: Collective) -> _Source:
    source, folder = source_folder(job.model, job.trust_remote_code)
    reader = CheckpointReader(folder)
    if reader.fp8:
        open_fp8_checked(folder)  # a damaged FP8 folder is named for what is damaged
        raise InvalidInputError(
            f"{job.model} is stored in FP8 ({len(reader.fp8)} float8 weights): apt-sparse prunes unquantized "
            "checkpoints; prune its unquantized source and add --quantize fp8"
        )
    dtype, reason = compute_dtype(job.dtype, reader.float_dtype(), job.run.device)
    log.info("computing in %s: %s", dtype, reason)
    layered = LayeredModel.from_folder(folder, DTYPES[dtype], job.run.device, job.trust_remote_code, reader)
    layer_plan(layered, job.run)  # a --targets/--ignore that matches nothing fails here
    tokenizer = load_tokenizer(folder, job.trust_remote_code)
    generated = None
    if is_self(job.calibration_data):
        generated = _self_generated(job, layered, folder, tokenizer, coll)
        windows, described = generated.windows, f"{job.calibration_data} (the model's own continuations)"
    else:
        calibration = load_text(job.calibration_data, seed=job.seed)
        windows = calibration_windows(
            calibration.calibration,
            tokenizer,
            job.num_calibration_samples,
            job.max_seq_length,
            job.seed,
            layered.layout.causal,
        )
        described = calibration.source
        if not layered.layout.causal:
            described += " (framed as the encoder embeds a text: special tokens at both ends)"
    log.info("calibrating on %d windows × %d tokens from %s", len(windows), windows.shape[1], described)
    batches = None
    if job.calibration_images:
        if not is_vision_language(layered.config):
            raise InvalidInputError(
                f"--calibration-images: {job.model} is a {layered.layout.name} model, not a vision-language model"
            )
        if job.run.vision:
            vision_block_path(layered.model, layered.block_path)  # a tower it cannot find fails before any work
        batches = image_text_batches(folder, job.calibration_images, windows, tokenizer, job.trust_remote_code)
    return _Source(source, folder, layered, tokenizer, described, windows, dtype, reason, batches, generated)


def _self_generated(job: PruneJob, layered: LayeredModel, folder: Path, tokenizer, coll: Collective) -> Generated:
    """``--calibration-data self[:SOURCE]``: the writer generates (``apt.run.selfgen``), every rank gets the
    windows."""
    if not layered.layout.causal:
        raise InvalidInputError(
            f"--calibration-data {job.calibration_data}: {job.model} is an encoder ({layered.layout.name}), it "
            "does not write text; calibrate it on text (e.g. stdlib)"
        )
    if job.calibration_images:
        raise InvalidInputError("--calibration-data self cannot be combined with --calibration-images")
    generated = None
    if coll.is_writer:
        text = load_text(prefix_source(job.calibration_data), seed=job.seed)
        count = prompt_count(job.num_calibration_samples)
        prompts = token_windows(text.calibration, tokenizer, count, PREFIX_TOKENS, job.seed)
        if len(prompts) < job.num_calibration_samples:
            raise InvalidInputError(
                f"--calibration-data {job.calibration_data}: its text gives {len(prompts)} prefixes, fewer than "
                f"--num-calibration-samples {job.num_calibration_samples}"
            )
        log.info("generating calibration text: %d continuations of %d tokens", len(prompts), job.max_seq_length)
        generated = generate_windows(
            folder,
            prompts,
            job.num_calibration_samples,
            job.max_seq_length,
            job.seed,
            job.run.device,
            layered.dtype,
            job.trust_remote_code,
        )
    return coll.broadcast_object(generated)


def _check_space(job: PruneJob, work: Path, writer: ShardedWriter, src: _Source, coll: Collective) -> None:
    """Refuse before any work when the output's file system (or the activations') lacks what the run
    writes: the shards, laid out in advance, and this rank's activations when they spill to disk."""
    shards = output_bytes_needed(work, writer) if job.resume and work.exists() else sum(writer.sizes.values())
    side = sum(f.stat().st_size for f in src.folder.iterdir() if f.is_file() and not f.name.endswith(".safetensors"))
    needs = [("output shards", work, shards), ("config and tokenizer", work, side)]
    if job.activations == "disk":
        config = src.layered.config
        hidden = getattr(config, "hidden_size", None) or getattr(config, "d_model", 0)
        itemsize = DTYPES[job.activation_dtype or src.dtype].itemsize
        windows = -(-len(src.windows) // coll.world)
        copies = 2 if job.run.correction else 1  # the dense model's activations beside the pruned model's
        nbytes = windows * src.windows.shape[1] * hidden * itemsize * copies
        needs.append(("activations on disk", Path(job.activation_dir or work), nbytes))
    check_free_space(needs, "free space there, or choose another --out (or --activation-dir)")


def _output_layout(reader: CheckpointReader) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Every tensor of the output as the source stores it: a pruned weight keeps its dtype and shape."""
    return {name: (reader.info(name).dtype, reader.info(name).shape) for name in reader.names()}


def _prune(job: PruneJob, out: Path, work: Path, started: float, progress: dict, coll: Collective) -> dict:
    peak = PeakMemory(job.run.device)
    src = _open_source(job, coll)
    layered = src.layered
    progress["blocks"] = len(layered.blocks)
    layout = _output_layout(layered.reader)
    writer = ShardedWriter(
        work,
        [PlannedTensor(name, dtype, shape) for name, (dtype, shape) in layout.items()],
        parse_size(job.max_shard_size),
    )
    identity = {"model": job.model, "folder": str(src.folder), "files": layered.reader.identity()}
    # the dtype computed in decides the bytes, not the request: ``auto`` resolves per machine, so a rank or
    # a resume where it resolves otherwise runs another job
    options = job.fingerprint() | {"dtype": src.dtype}
    check_same_job(coll, options, identity)
    if coll.is_writer:
        _check_space(job, work, writer, src, coll)
    state = start_or_resume(work, writer, layered, job, options, identity) if coll.is_writer else None
    if coll.is_writer and src.generated is not None:  # generating the calibration text is part of pruning
        state["seconds_pruning"] += src.generated.seconds
    state = coll.broadcast_object(state)
    done = progress["blocks_done"] = state["blocks_done"]
    written = BroadcastReader(coll, CheckpointReader(work) if coll.is_writer else None, layout)
    batches = _calibrate(job, src, work, writer, state, written, progress, coll)
    accuracy = _evaluate(job, src, _as_computed(job, written, state), coll) if job.evaluate else None
    ranks = coll.gather_objects(
        {
            "rank": coll.rank,
            "host": socket.gethostname(),
            "device": job.run.device,
            "calibration_batches": len(batches),
            "seconds": time.perf_counter() - started,
            "seconds_in_collectives": coll.seconds,
            "bytes_sent": coll.bytes_moved,
            "peak_memory": peak.read(),
        }
    )
    report = None
    if coll.is_writer:
        report = build_report(
            job=job,
            source=src.source,
            folder=src.folder,
            layered=layered,
            dtype_reason=src.dtype_reason,
            calibration={"source": src.calibration, "windows": src.windows},
            layers=state["layers"],
            seconds_pruning=state["seconds_pruning"],
            started=started,
            checkpoint={
                "source_files": identity["files"],
                "shards": [p.name for p in writer.files],
                "max_shard_size": job.max_shard_size,
                "resumed_at_block": done or None,
            },
            peak=ranks[0]["peak_memory"],
            accuracy=accuracy,
        )
        report["distributed"] = {"world_size": coll.world, "backend": coll.backend, "ranks": ranks}
        if src.generated is not None:
            report["data"]["self_generated"] = src.generated.describe()
        if src.batches is not None:
            report["data"]["calibration_images"] = len(image_files(job.calibration_images))
            report["data"]["calibration_samples"] = "one image and one text window each"
        report["left_dense"] = unknown_layouts(layered)
        report["vision"] = state.get("vision") or ({"pruned": False} if is_vision_language(layered.config) else None)
        if job.run.quantize:
            _finish_quantized(work, out, src.folder, writer, report, job)
        else:
            finish_folder(work, out, src.folder, writer, report, job.overwrite)
    return coll.broadcast_object(report)


def _finish_quantized(work: Path, out: Path, source: Path, writer, report: dict, job: PruneJob) -> None:
    """``--quantize fp8``: the pruned folder is completed beside ``out``, then written in FP8 to ``out``
    (``apt.run.quantize``, as ``apt-sparse quantize`` does: with ``--fp8-in-run`` its weights are already on the
    FP8 grid, which rounding to nearest keeps; otherwise rounded now, on the run's calibration windows, and its
    accuracy measured again in FP8) and removed (kept where quantizing fails)."""
    from apt.run.quantize import QuantizeConfig, quantize_folder

    staged = out.with_name(f".{out.name}.unquantized")
    shutil.rmtree(staged, ignore_errors=True)
    finish_folder(work, staged, source, writer, report, overwrite=True)
    config = QuantizeConfig(
        rounding="compensate" if job.run.fp8_compensate else "nearest",
        device=job.run.device,
        batch_size=job.run.batch_size,
    )
    try:
        quantize_folder(staged, out, overwrite=job.overwrite, config=config)
        report.clear()
        report.update(json.loads((out / REPORT_NAME).read_text()))  # what the folder says, accuracy included
    except AptError as err:  # the pruned folder stays: quantizing it again is all that is left to do
        raise type(err)(
            f"{err} (the pruned folder is complete in {staged}: apt-sparse quantize {staged} {out})"
        ) from err
    shutil.rmtree(staged, ignore_errors=True)


def _calibrate(
    job: PruneJob,
    src: _Source,
    work: Path,
    writer: ShardedWriter,
    state: dict,
    written: BroadcastReader,
    progress: dict,
    coll: Collective,
) -> list[dict]:
    """Sequential calibration from the block ``state`` says is next; each pruned block is written and
    recorded in ``resume.json`` before the next one starts. Returns this rank's calibration batches."""
    layered, done = src.layered, state["blocks_done"]

    def new_store() -> ActivationStore:
        return ActivationStore(
            DTYPES[job.activation_dtype or src.dtype],
            device=job.run.device if job.activations == "device" else "cpu",
            spill_to=(job.activation_dir or work) if job.activations == "disk" else None,
        )

    def write_parameters(names: list[str]) -> None:
        if coll.is_writer:
            for name in names:
                for key, tensor in layered.stored_tensors(name):
                    writer.write(key, tensor)
            writer.sync()  # the data is on disk before the state says so

    store, dense = new_store(), None
    try:
        batches = coll.share(src.calibration_batches(job.run.batch_size))
        before = None  # where the parameters before language block 0 are read: the source, or the pruned vision part
        if job.run.vision:
            if not state.get("vision"):
                clock = time.perf_counter()
                records, summary = prune_vision(layered, batches, job.run, new_store, write_parameters, written, coll)
                state["vision"] = summary
                state["layers"] += records
                state["seconds_pruning"] += time.perf_counter() - clock
                if coll.is_writer:
                    write_json_atomic(work / RESUME_NAME, state)
            before = written
        layered.block_inputs(batches, store, before)
        if job.run.correction:  # the dense model's activations, beside the pruned model's
            dense = store.copy() if before is None else layered.block_inputs(batches, new_store())
            layered.run_blocks(dense, range(done))
        if done:
            log.info("resuming at block %d: recomputing its inputs from the %d blocks written", done, done)
            layered.run_blocks(store, range(done), _as_computed(job, written, state))
        block_clock = [time.perf_counter()]

        def write_block(index: int, records: list[dict]) -> None:
            if not coll.is_writer:
                progress["blocks_done"] = index + 1
                return
            write_parameters(layered.parameter_names(layered.block_prefix(index)))
            state["blocks_done"] = index + 1
            state["layers"] += records
            state["seconds_pruning"] += time.perf_counter() - block_clock[0]
            block_clock[0] = time.perf_counter()
            write_json_atomic(work / RESUME_NAME, state)
            progress["blocks_done"] = index + 1  # only now is the block saved

        layers = prune_blocks(layered, store, job.run, start=done, on_block_done=write_block, coll=coll, dense=dense)
    finally:
        store.close()
        if dense is not None:
            dense.close()
    if not coll.is_writer:
        state["layers"] += layers
    return batches


def _as_computed(job: PruneJob, written, state: dict):
    """The written blocks as the run computes them: with ``--fp8-in-run``, W8A8 (``ServedInFp8``), as the
    blocks after them were calibrated and as the FP8 folder is served."""
    if not (job.run.quantize and job.run.fp8_in_run):
        return written
    return ServedInFp8(written, {r["tensor"] for r in state["layers"] if "fp8_relative_loss" in r})


class ServedInFp8:
    """The run's written folder as its FP8 copy computes (``--fp8-in-run``): the quantized weights are already on
    the FP8 grid (``q · scale``, stored unquantized until the run ends), and their layers take their inputs
    through FP8 per token (``fp8_inputs``, which ``apt.models.layered`` applies), as the FP8 folder's reader
    makes them do."""

    def __init__(self, reader, tensors: set[str]):
        self.reader, self.fp8_inputs = reader, frozenset(tensors)
        self.fp8 = self.fp8_inputs  # the weights its FP8 folder will store in float8

    def __contains__(self, name: str) -> bool:
        return name in self.reader

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.reader.read(name, dtype)


def _evaluate(job: PruneJob, src: _Source, written, coll: Collective) -> dict:
    """Dense and pruned accuracy on held-out text, both streamed block by block."""
    documents, chosen = evaluation_documents(job.eval_data, prefix_source(job.calibration_data), job.seed)
    meter = Accuracy(src.layered, src.tokenizer, documents, job.num_eval_windows, job.max_seq_length, job.seed, coll)
    accuracy = {"metric": meter.metric, "data": chosen, "dense": meter.measure(reference=True)}
    accuracy["pruned"] = meter.measure(written)
    if getattr(written, "fp8_inputs", None):  # --fp8-in-run: measured as the FP8 folder computes
        accuracy["fp8"] = fp8_emulation(written)
    return accuracy
