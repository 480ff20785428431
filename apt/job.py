"""The main job: prune a model on calibration text, block by block from its checkpoint, measure accuracy,
and write a Hugging Face folder — resumable after a crash.

``prune_model(PruneJob(...))`` never holds the whole model: the weights stream from the source's
safetensors one block at a time (``apt.streaming``), and each pruned block is written in place into
output shards laid out in advance (``apt.checkpoint``). The folder is built under ``.OUT.partial``
beside ``OUT`` and renamed into place in one step when complete, so nothing that looks finished
exists before it is. After every block, ``.OUT.partial/resume.json`` records the run's options, the
source's identity, the blocks done and their layer records; ``--resume`` continues from there,
recomputing the activations entering the next block from the blocks already written, and ends with
files bit-identical to an uninterrupted run's (the report aside, which also says where it resumed).

``prune_report.json`` (schema ``apt-sparse/prune-report/2``):

- ``model``: ``name``, ``location`` (the folder read), ``gguf_file``, ``model_type``, ``family``
- ``config``: every option of the run; ``versions``: python, torch, transformers, apt-sparse
- ``data``: calibration source, windows, sequence length, tokens; evaluation source and how its
  documents were chosen
- ``pattern``: the N:M (or unstructured) pattern every pruned layer follows
- ``layers``: per layer ``name`` (module), ``tensor`` (checkpoint name), ``shape``, ``nm_valid``,
  ``sparsity``, ``relative_loss``, ``loss``, ``damp``, ``seconds``, ``skipped`` (reason or null),
  ``solver`` (the solver's stats)
- ``totals``: layers pruned/skipped, summed and mean relative loss, target sparsity, all_nm_valid,
  seconds of pruning and of the whole run
- ``checkpoint``: the source's files, the output's shards and ``max_shard_size``, ``resumed_at_block``
- ``peak_memory``: ``bytes`` and ``kind`` (``run_peak_rss``: resident-set peak of the job on CPU,
  evaluation included; ``cuda_max_allocated`` on CUDA; ``process_max_rss`` where the peak cannot be reset)
- ``accuracy``: ``metric``, ``data`` and ``dense`` / ``pruned`` entries; ``null`` when evaluation was off
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import platform
import resource
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from apt.artifacts import write_json_atomic
from apt.checkpoint import CheckpointReader, PlannedTensor, ShardedWriter, parse_size
from apt.data import evaluation_documents, load_text, token_windows
from apt.distributed import BroadcastReader, Collective, check_same_job
from apt.errors import AptError, InvalidInputError
from apt.evaluate import (
    embedding_cosine,
    retrieval_accuracy,
    split_halves,
    streaming_perplexity,
    streaming_sentence_embeddings,
    text_batches,
)
from apt.model_card import model_card
from apt.models import DTYPES, load_tokenizer, source_folder
from apt.portable import copy_side_files, write_config
from apt.sequential import RunConfig, layer_plan, prune_blocks
from apt.streaming import ActivationStore, LayeredModel

log = logging.getLogger(__name__)

REPORT_NAME = "prune_report.json"
RESUME_NAME = "resume.json"
SCHEMA = "apt-sparse/prune-report/2"
ACTIVATION_PLACES = ("host", "device", "disk")


@dataclass(frozen=True)
class PruneJob:
    """One pruning run. ``dtype`` is the compute dtype (the output keeps the checkpoint's own dtypes);
    ``activations`` where calibration activations live (``host`` memory, the compute ``device``, or
    ``disk`` under ``activation_dir``, default the partial output folder) and ``activation_dtype`` their
    dtype (default: the compute dtype). ``num_eval_windows=None`` evaluates every full window."""

    model: str
    out: str
    run: RunConfig = RunConfig()
    calibration_data: str = "stdlib"
    eval_data: str = "stdlib"
    num_calibration_samples: int = 128
    max_seq_length: int = 512
    num_eval_windows: int | None = 32
    dtype: str = "float32"
    activations: str = "host"
    activation_dtype: str | None = None
    activation_dir: str | None = None
    max_shard_size: str = "5GB"
    seed: int = 0
    trust_remote_code: bool = False
    evaluate: bool = True
    overwrite: bool = False
    resume: bool = False

    def __post_init__(self):
        if self.num_calibration_samples < 1 or (self.num_eval_windows is not None and self.num_eval_windows < 1):
            raise InvalidInputError("--num-calibration-samples and --num-eval-windows must be at least 1")
        if self.dtype not in DTYPES or (self.activation_dtype or self.dtype) not in DTYPES:
            raise InvalidInputError(f"--dtype and --activation-dtype take one of {', '.join(DTYPES)}")
        if self.activations not in ACTIVATION_PLACES:
            raise InvalidInputError(f"--offload-activations takes one of {', '.join(ACTIVATION_PLACES)}")
        if self.activation_dir and self.activations != "disk":
            raise InvalidInputError("--activation-dir applies to --offload-activations disk only")
        if self.max_seq_length < 2:
            raise InvalidInputError(f"--max-seq-length must be at least 2, got {self.max_seq_length}")
        parse_size(self.max_shard_size)
        check_device(self.run.device)

    def fingerprint(self) -> dict:
        """Everything that decides the output's bytes: a resume must match it exactly."""
        options = dataclasses.asdict(self)
        # where activations live changes no byte of the output (their dtype does)
        for key in (
            "out",
            "overwrite",
            "resume",
            "evaluate",
            "eval_data",
            "num_eval_windows",
            "activations",
            "activation_dir",
        ):
            options.pop(key)
        options["run"]["device"] = options["run"]["device"].split(":")[0]  # cuda:LOCAL_RANK differs per rank
        return json.loads(json.dumps(options, default=str))


def check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidInputError(f"--device {device}: no CUDA GPU is available here; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise InvalidInputError(f"--device takes cpu or cuda[:N], got {device!r}")


def versions() -> dict:
    import transformers

    from apt import __version__

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "apt-sparse": __version__,
    }


def partial_folder(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


class Accuracy:
    """Held-out accuracy, computed block by block: perplexity for causal LMs; for encoders, embedding
    fidelity to the dense model and half-document retrieval (scored for dense and pruned alike)."""

    def __init__(
        self, layered: LayeredModel, tokenizer, documents, num_windows: int | None, seq_len: int, seed=0, coll=None
    ):
        self.layered = layered
        self.coll = coll or Collective()
        self.causal = layered.family.causal
        if self.causal:
            self.windows = token_windows(documents, tokenizer, num_windows, seq_len, seed)
        else:
            texts = list(documents[: (num_windows or len(documents)) * 8])
            queries, corpus = split_halves(texts)
            self.batches = text_batches(tokenizer, texts)
            self.queries, self.corpus = text_batches(tokenizer, queries), text_batches(tokenizer, corpus)
            self.reference = None

    @property
    def metric(self) -> str:
        return "perplexity" if self.causal else "embedding_cosine"

    def measure(self, reader: CheckpointReader | None = None, reference: bool = False) -> dict:
        """Accuracy of the checkpoint ``reader`` holds (default: the source). The encoder's reference
        embeddings are those of the first checkpoint measured with ``reference=True``."""
        if self.causal:
            return streaming_perplexity(self.layered, self.windows, reader, coll=self.coll)
        embed = lambda batches: streaming_sentence_embeddings(self.layered, batches, reader)  # noqa: E731
        result = retrieval_accuracy(embed(self.queries), embed(self.corpus))
        embeddings = embed(self.batches)
        if reference:
            self.reference = embeddings
            return result | {"texts": len(embeddings), "note": "the reference the pruned model's cosine is taken to"}
        return result | embedding_cosine(self.reference, embeddings)


def _check_out(out: Path, job: PruneJob) -> Path:
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


class JobInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run, with what it leaves behind."""


def prune_model(job: PruneJob, coll: Collective | None = None) -> dict:
    """Run the whole job and return the report (also written to ``OUT/prune_report.json``).

    Interrupted or failed, the job leaves no ``OUT``; the blocks it finished stay in ``.OUT.partial``
    for ``--resume`` (a run that finished no block leaves nothing at all). Under torchrun, pass the
    process group's ``coll`` (``apt.distributed.collective_for``): every rank runs this with the same
    job, and rank 0 writes."""
    started = time.perf_counter()
    coll = coll or Collective()
    out = Path(job.out).resolve()
    work = partial_folder(out)
    # rank 0 owns the output folder: it decides, the others follow its verdict
    refusal = None
    if coll.is_writer:
        try:
            _check_out(out, job)
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
        if done == 0 and not job.resume:
            if coll.is_writer:
                shutil.rmtree(work, ignore_errors=True)
            note = f"nothing was written to {out}"
        else:
            note = f"{out} was not written; {done} of {total} blocks are saved in {work}: rerun with --resume"
        if isinstance(err, KeyboardInterrupt):
            raise JobInterrupted(f"{err}; {note}" if str(err) else note) from err
        if isinstance(err, AptError):
            raise type(err)(f"{err} ({note})") from err
        raise


def _prune(job: PruneJob, out: Path, work: Path, started: float, progress: dict, coll: Collective) -> dict:
    peak = PeakMemory(job.run.device)
    source, folder = source_folder(job.model, job.trust_remote_code)
    layered = LayeredModel.from_folder(folder, DTYPES[job.dtype], job.run.device, job.trust_remote_code)
    layer_plan(layered, job.run)  # a --targets/--ignore that matches nothing fails here
    progress["blocks"] = len(layered.blocks)
    tokenizer = load_tokenizer(folder, job.trust_remote_code)
    calibration = load_text(job.calibration_data, seed=job.seed)
    windows = token_windows(
        calibration.calibration, tokenizer, job.num_calibration_samples, job.max_seq_length, job.seed
    )
    log.info("calibrating on %d windows × %d tokens from %s", len(windows), windows.shape[1], calibration.source)

    reader = layered.reader
    layout = {name: (reader.info(name).dtype, reader.info(name).shape) for name in reader.names()}
    writer = ShardedWriter(
        work,
        [PlannedTensor(name, dtype, shape) for name, (dtype, shape) in layout.items()],
        parse_size(job.max_shard_size),
    )
    identity = {"model": job.model, "folder": str(folder), "files": reader.identity()}
    check_same_job(coll, job.fingerprint(), identity)
    state = _start_or_resume(work, writer, layered, job, identity) if coll.is_writer else None
    state = coll.broadcast_object(state)
    done = progress["blocks_done"] = state["blocks_done"]
    written = BroadcastReader(coll, CheckpointReader(work) if coll.is_writer else None, layout)
    store = ActivationStore(
        DTYPES[job.activation_dtype or job.dtype],
        device=job.run.device if job.activations == "device" else "cpu",
        spill_to=(job.activation_dir or work) if job.activations == "disk" else None,
    )
    seconds = {"forward": 0.0}
    dense = None
    try:
        batch = job.run.batch_size
        batches = coll.share([{"input_ids": windows[s : s + batch]} for s in range(0, len(windows), batch)])
        clock = time.perf_counter()
        layered.block_inputs(batches, store)
        if job.run.correction:  # the dense model's activations, beside the pruned model's
            dense = store.copy()
            layered.run_blocks(dense, range(done))
        if done:
            log.info("resuming at block %d: recomputing its inputs from the %d blocks written", done, done)
            layered.run_blocks(store, range(done), written)
        seconds["forward"] += time.perf_counter() - clock

        def write_block(index: int, records: list[dict]) -> None:
            for record in records:
                record["tensor"] = layered.checkpoint_key(f"{record['name']}.weight")
            progress["blocks_done"] = index + 1
            if not coll.is_writer:
                return
            for name in layered.parameter_names(layered.block_prefix(index)):
                writer.write(layered.checkpoint_key(name), layered.stored_tensor(name))
            writer.sync()  # the data is on disk before the state says so
            state["blocks_done"] = index + 1
            state["layers"] += records
            state["seconds_pruning"] += time.perf_counter() - block_clock[0]
            block_clock[0] = time.perf_counter()
            write_json_atomic(work / RESUME_NAME, state)

        block_clock = [time.perf_counter()]
        layers = prune_blocks(layered, store, job.run, start=done, on_block_done=write_block, coll=coll, dense=dense)
    finally:
        store.close()
        if dense is not None:
            dense.close()
    if not coll.is_writer:
        state["layers"] += layers

    accuracy = None
    if job.evaluate:
        documents, chosen = evaluation_documents(job.eval_data, job.calibration_data, job.seed)
        meter = Accuracy(layered, tokenizer, documents, job.num_eval_windows, job.max_seq_length, job.seed, coll)
        accuracy = {"metric": meter.metric, "data": chosen, "dense": meter.measure(reference=True)}
        accuracy["pruned"] = meter.measure(written)

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
            source=source,
            folder=folder,
            layered=layered,
            calibration={"source": calibration.source, "windows": windows},
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
        _finish_folder(work, out, folder, writer, report, job.overwrite)
    return coll.broadcast_object(report)


def _start_or_resume(work: Path, writer: ShardedWriter, layered: LayeredModel, job: PruneJob, identity: dict) -> dict:
    """A new partial folder with every tensor outside the blocks already copied, or the state of the
    interrupted run it holds, after checking that run was the same job on the same source."""
    if job.resume:
        state = json.loads((work / RESUME_NAME).read_text())
        changed = sorted(
            k
            for k in set(state["options"]) | set(job.fingerprint())
            if state["options"].get(k) != job.fingerprint().get(k)
        )
        if changed:
            raise InvalidInputError(
                f"cannot resume {work}: it was started with other options ({', '.join(changed)}); "
                "run with the same options, or pass --overwrite instead of --resume to start over"
            )
        if state["source"] != identity:
            raise InvalidInputError(
                f"cannot resume {work}: the source changed since it was started (was {state['source']['folder']} "
                f"with {len(state['source']['files'])} files); pass --overwrite instead of --resume to start over"
            )
        if not writer.matches_files_on_disk():
            raise InvalidInputError(f"cannot resume {work}: its shards are missing or altered; pass --overwrite")
        return state
    work.mkdir(parents=True)
    writer.create()
    block_keys = {layered.checkpoint_key(n) for n in layered.parameter_names(f"{layered.block_path}.")}
    for key in layered.reader.names():
        if key not in block_keys:  # embeddings, final norm, head, and anything else the source holds
            writer.write(key, layered.reader.read(key))
    writer.sync()
    state = {
        "schema": "apt-sparse/resume/1",
        "options": job.fingerprint(),
        "source": identity,
        "blocks_done": 0,
        "layers": [],
        "seconds_pruning": 0.0,
    }
    write_json_atomic(work / RESUME_NAME, state)
    return state


def _finish_folder(work: Path, out: Path, source: Path, writer: ShardedWriter, report: dict, overwrite: bool) -> None:
    """Index, config, tokenizer and report beside the shards; then one rename makes the folder appear."""
    writer.write_index()
    write_config(json.loads((source / "config.json").read_text()), work)
    copy_side_files(source, work)
    write_json_atomic(work / REPORT_NAME, report)
    (work / "README.md").write_text(model_card(report))
    os.unlink(work / RESUME_NAME)
    if out.exists():
        if not overwrite:
            raise InvalidInputError(f"{out} appeared while the run was working; the result is in {work}")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        work.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        work.rename(out)


def build_report(
    *, job, source, folder, layered, calibration, layers, seconds_pruning, started, checkpoint, peak, accuracy
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
            "family": layered.family.name,
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


def evaluate_model(
    name: str,
    eval_data: str = "stdlib",
    num_eval_windows: int | None = None,
    max_seq_length: int = 512,
    device: str = "cpu",
    seed: int = 0,
    trust_remote_code: bool = False,
) -> dict:
    """Accuracy of a dense model or a pruned folder, block by block. For a pruned folder the dense source
    named in its ``prune_report.json`` is measured in the same run, on the same text, as the reference.
    The evaluation text is the held-out share of ``eval_data`` when it is the folder's calibration
    source, and the whole of it otherwise."""
    check_device(device)
    report_path = Path(name) / REPORT_NAME
    report = json.loads(report_path.read_text()) if report_path.is_file() else None
    calibration_source = report["config"]["calibration_data"] if report else None
    documents, chosen = evaluation_documents(eval_data, calibration_source, seed)
    _, folder = source_folder(name, trust_remote_code)
    layered = LayeredModel.from_folder(folder, torch.float32, device, trust_remote_code)
    tokenizer = load_tokenizer(folder, trust_remote_code)
    meter = Accuracy(layered, tokenizer, documents, num_eval_windows, max_seq_length, seed)
    result = {"model": name, "metric": meter.metric, "data": chosen}
    if report:
        dense_name = report["model"]["name"]
        try:
            _, dense_folder = source_folder(dense_name, trust_remote_code)
            dense = LayeredModel.from_folder(dense_folder, torch.float32, device, trust_remote_code)
        except AptError as err:
            raise InvalidInputError(
                f"the dense source {dense_name!r} named in {report_path} cannot be read: {err}"
            ) from err
        meter.layered = dense
        result["dense"] = {"model": dense_name} | meter.measure(reference=True)
        meter.layered = layered
        result["pruned"] = meter.measure()
    else:
        result["dense"] = {"model": name} | meter.measure(reference=True)
    return result
