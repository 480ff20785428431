"""Accuracy of a checkpoint on held-out text, measured block by block: perplexity for causal LMs, and for
encoders the fidelity of sentence embeddings to the dense model plus a retrieval task both are scored on.

``Accuracy`` is what the pruning run measures after pruning; ``evaluate_model`` is ``apt-sparse eval``:
a pruned folder against the dense source its report names, on the same text.
"""

from __future__ import annotations

from pathlib import Path

import torch

from apt.collective import Collective
from apt.errors import AptError, InvalidInputError
from apt.folder.fp8 import open_fp8_checked
from apt.folder.report import REPORT_NAME, read_report
from apt.measure.evaluate import (
    embedding_cosine,
    retrieval_accuracy,
    split_halves,
    streaming_perplexity,
    streaming_sentence_embeddings,
    text_batches,
)
from apt.models.checkpoint import CheckpointReader
from apt.models.layered import LayeredModel
from apt.models.loading import check_device, load_tokenizer, source_folder
from apt.text.sources import evaluation_documents, prefix_source, token_windows


class Accuracy:
    """Held-out accuracy, computed block by block: perplexity for causal LMs; for encoders, embedding
    fidelity to the dense model and half-document retrieval (scored for dense and pruned alike)."""

    def __init__(
        self, layered: LayeredModel, tokenizer, documents, num_windows: int | None, seq_len: int, seed=0, coll=None
    ):
        self.layered = layered
        self.coll = coll or Collective()
        self.causal = layered.layout.causal
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
    source, and the whole of it otherwise. An FP8 folder is measured as it is served (W8A8, emulated
    exactly: ``fp8_emulation`` is in the result as ``fp8``); a damaged one is refused before any work."""
    check_device(device)
    report_path = Path(name) / REPORT_NAME
    report = read_report(name) if Path(name).is_dir() else None
    # a folder calibrated on its own continuations of a text (``self:SOURCE``) holds out that text's documents
    calibration_source = prefix_source(report["config"]["calibration_data"]) if report else None
    documents, chosen = evaluation_documents(eval_data, calibration_source, seed)
    _, folder = source_folder(name, trust_remote_code)
    reader = open_fp8_checked(folder)  # a damaged FP8 folder is refused before any work
    layered = LayeredModel.from_folder(folder, torch.float32, device, trust_remote_code, reader)
    tokenizer = load_tokenizer(folder, trust_remote_code)
    meter = Accuracy(layered, tokenizer, documents, num_eval_windows, max_seq_length, seed)
    result = {"model": name, "metric": meter.metric, "data": chosen}
    if reader.fp8:
        result["fp8"] = fp8_emulation(reader)
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


def fp8_emulation(reader: CheckpointReader) -> dict:
    """How an FP8 folder's accuracy is measured: what ``apt.models.layered`` does with its reader."""
    return {
        "scheme": "W8A8 FP8_DYNAMIC (compressed-tensors float-quantized)",
        "weights_in_fp8": len(reader.fp8),
        "weights": "float8_e4m3fn q times its per-output-channel float32 scale, computed in float32",
        "inputs": "the input of every FP8 Linear quantized per token to float8_e4m3fn (scale amax/448) and back, "
        "as vLLM's FP8 path does",
        "accumulation": "float32 (an FP8 GEMM's only difference)",
    }
