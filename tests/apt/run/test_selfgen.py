"""Calibration text the model writes itself (``--calibration-data self[:SOURCE]``): continuations of the
source's prefixes, the highest-perplexity ones dropped, the same windows on every run with one seed, and the
source's own held-out documents as its evaluation text."""

import json
import math

import pytest
import torch
import transformers

from apt.errors import InvalidInputError
from apt.run import PruneJob, prune_model
from apt.run.quantize import QuantizeConfig, quantize_folder
from apt.run.selfgen import KEEP, PREFIX_TOKENS, generate_windows, prompt_count
from apt.text.sources import prefix_source

from ..tiny_models import save_tiny_model


def test_a_self_source_continues_the_text_after_its_colon():
    assert prefix_source("self") == "stdlib" and prefix_source("self:man") == "man"
    assert prefix_source("stdlib") == "stdlib" and prefix_source("selfish.txt") == "selfish.txt"
    with pytest.raises(InvalidInputError, match="needs a source after the colon"):
        prefix_source("self:")
    assert prompt_count(128) == 160 and prompt_count(4) == math.ceil(4 / KEEP)


def _perplexities(folder, windows):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(windows).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), windows[:, 1:], reduction="none")
    return nll.mean(dim=1).exp()


def test_generated_windows_continue_their_prefixes_and_keep_the_lowest_perplexity(tmp_path):
    folder = save_tiny_model("llama", tmp_path / "llama")
    prompts = torch.randint(5, 1000, (10, PREFIX_TOKENS), generator=torch.Generator().manual_seed(1))
    got = generate_windows(folder, prompts, 6, 24, seed=3, batch_size=4)  # three batches, the last one short
    assert got.windows.shape == (6, 24) and got.windows.dtype == torch.long and got.generated == 10
    # each kept window starts with its own prompt, in prompt order
    index = [next(i for i in range(10) if torch.equal(prompts[i], w[:PREFIX_TOKENS])) for w in got.windows]
    assert index == sorted(index) and len(set(index)) == 6
    # the kept ones are the six of lowest perplexity under the model, as transformers computes it
    kept = _perplexities(folder, got.windows)
    assert kept.min().item() == pytest.approx(got.perplexity_kept[0], rel=1e-4)
    assert kept.max().item() == pytest.approx(got.perplexity_kept[1], rel=1e-4)
    assert got.perplexity_kept[1] <= got.perplexity_dropped_min
    # seeded: the same windows again, other ones with another seed
    assert torch.equal(generate_windows(folder, prompts, 6, 24, seed=3, batch_size=4).windows, got.windows)
    assert not torch.equal(generate_windows(folder, prompts, 6, 24, seed=4, batch_size=4).windows, got.windows)


def test_a_run_calibrated_on_its_own_text_says_so_and_counts_the_generation_as_pruning(tmp_path):
    src = save_tiny_model("llama", tmp_path / "src")
    job = dict(model=str(src), num_calibration_samples=4, max_seq_length=32, num_eval_windows=2)
    report = prune_model(PruneJob(out=str(tmp_path / "out"), calibration_data="self", **job))
    data = report["data"]
    assert data["calibration_windows"] == 4 and data["self_generated"]["generated"] == 5
    assert data["self_generated"]["kept"] == 4 and data["calibration"].startswith("self")
    assert report["totals"]["seconds_pruning"] >= data["self_generated"]["seconds_generating"]
    assert data["eval"].startswith("stdlib: held-out documents")  # the prefixes' text, held out
    assert report["totals"]["all_nm_valid"]
    # another run writes the same folder: the generation is seeded
    again = prune_model(PruneJob(out=str(tmp_path / "again"), calibration_data="self", **job))
    assert again["accuracy"] == report["accuracy"]
    first = json.loads((tmp_path / "out" / "prune_report.json").read_text())["layers"]
    assert [r["relative_loss"] for r in first] == [r["relative_loss"] for r in again["layers"]]
    # apt-sparse quantize's error-compensating pass on such a folder rounds on the prefixes' text (stdlib)
    quantize_folder(tmp_path / "out", tmp_path / "fp8", config=QuantizeConfig(evaluate=False))
    assert (tmp_path / "fp8" / "config.json").is_file()


def test_an_encoder_is_refused_self_generated_calibration(tmp_path):
    src = save_tiny_model("bert", tmp_path / "bert")
    with pytest.raises(InvalidInputError, match="is an encoder .* does not write text"):
        prune_model(
            PruneJob(
                model=str(src),
                out=str(tmp_path / "out"),
                calibration_data="self",
                num_calibration_samples=2,
                max_seq_length=16,
            )
        )
    assert not (tmp_path / "out").exists()
