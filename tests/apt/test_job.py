import json
import math

import pytest
import torch
import transformers

from apt.families import FAMILIES
from apt.inspect import inspect_checkpoint
from apt.patterns import is_nm_sparse
from apt.pipeline import RunConfig
from apt.run import REPORT_NAME, PruneJob, prune_model
from apt.solver import PruneConfig
from apt_sparse.cli import main

from .tiny_models import CONFIGS, save_tiny_model

FAST = dict(num_calibration_samples=4, max_seq_length=32, num_eval_windows=2)


def test_every_family_has_a_tiny_model():
    assert set(CONFIGS) == set(FAMILIES)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_prune_save_reload_every_family(tmp_path, family):
    src = save_tiny_model(family, tmp_path / "src")
    out = tmp_path / "out"
    report = prune_model(PruneJob(model=str(src), out=str(out), **FAST))

    assert (out / REPORT_NAME).is_file() and (out / "config.json").is_file()
    assert json.loads((out / REPORT_NAME).read_text())["schema"] == "apt-sparse/prune-report/1"
    pruned = [r for r in report["layers"] if not r["skipped"]]
    assert pruned and all(r["nm_valid"] for r in pruned)
    assert all(0 <= r["relative_loss"] < 1 for r in pruned)
    assert report["totals"]["all_nm_valid"] and report["totals"]["target_sparsity"] >= 0.5
    if family == "mamba":
        skipped = [r for r in report["layers"] if r["skipped"]]
        assert {r["name"].split(".")[-1] for r in skipped} == {"dt_proj"}
        assert "not a multiple of 4" in skipped[0]["skipped"]

    cls = transformers.AutoModel if family == "bert" else transformers.AutoModelForCausalLM
    reloaded = cls.from_pretrained(out).eval()
    weights = dict(reloaded.named_parameters())
    for record in pruned:
        weight = weights[f"{record['name']}.weight"].detach()
        assert is_nm_sparse(weight, 2, 4), record["name"]
    ids = torch.randint(0, 1000, (2, 16))
    with torch.no_grad():
        output = reloaded(input_ids=ids)
    values = output.last_hidden_state if family == "bert" else output.logits
    assert torch.isfinite(values).all()
    metric = report["accuracy"]["metric"]
    assert metric == ("embedding_cosine" if family == "bert" else "perplexity")
    assert math.isfinite(report["accuracy"]["pruned"][metric])

    rows = {r["name"]: r for r in inspect_checkpoint(out)}
    assert all(rows[f"{r['name']}.weight"]["nm_valid"] for r in pruned)


def test_targets_ignore_and_true_sequential(tmp_path):
    src = save_tiny_model("llama", tmp_path / "src")
    run = RunConfig(solver=PruneConfig(method="sparsegpt"), ignore=r"down_proj", true_sequential=True)
    report = prune_model(PruneJob(model=str(src), out=str(tmp_path / "out"), run=run, evaluate=False, **FAST))
    names = [r["name"] for r in report["layers"]]
    assert names and not any("down_proj" in n for n in names)
    assert report["accuracy"] is None


def test_4_8_and_unstructured_patterns(tmp_path):
    src = save_tiny_model("llama", tmp_path / "src")
    for pattern in ("4:8", "50%"):
        run = RunConfig(solver=PruneConfig(pattern=pattern))
        report = prune_model(PruneJob(model=str(src), out=str(tmp_path / pattern.replace("%", "")), run=run, **FAST))
        for r in report["layers"]:
            assert r["sparsity"] == pytest.approx(0.5, abs=1e-9)


def quick_prune(src, out) -> list[str]:
    """The prune command on a tiny calibration set, without evaluation."""
    args = ["--num-calibration-samples", "2", "--max-seq-length", "16", "--no-evaluate"]
    return ["prune", "--model", str(src), "--out", str(out), *args]


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_wrong_model_path_is_a_clear_error(tmp_path, capsys):
    code, _, err = run_cli(capsys, "prune", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert code == 2 and "not found" in err and not (tmp_path / "o").exists()


def test_unsupported_family_lists_the_supported_ones(tmp_path, capsys):
    config = transformers.GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=100)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    code, _, err = run_cli(capsys, "prune", "--model", str(tmp_path / "gpt2"), "--out", str(tmp_path / "o"))
    assert code == 2 and "'gpt2' is not supported" in err and "llama" in err and "mamba" in err


def test_nan_weights_name_the_layer_and_write_nothing(tmp_path, capsys):
    def poison(model):
        model.model.layers[1].mlp.up_proj.weight.data[0, 0] = float("nan")

    src = save_tiny_model("llama", tmp_path / "src", poison=poison)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *quick_prune(src, out))
    assert code == 2 and "NaN" in err
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


def test_empty_calibration_text_is_a_clear_error(tmp_path, capsys):
    src = save_tiny_model("llama", tmp_path / "src")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    code, _, err = run_cli(
        capsys, "prune", "--model", str(src), "--out", str(tmp_path / "o"), "--calibration-data", str(empty)
    )
    assert code == 2 and "no text found" in err


def test_existing_output_is_not_overwritten_without_asking(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, "prune", "--model", "smollm2-135m", "--out", str(out))
    assert code == 2 and "--overwrite" in err and (out / "keep.txt").read_text() == "mine"


def test_interrupted_run_leaves_no_folder_that_looks_complete(tmp_path, capsys, monkeypatch):
    import apt.pipeline

    real = apt.pipeline.prune_layer
    calls = []

    def interrupt_on_third_layer(*args, **kwargs):  # the real solver, then a Ctrl-C mid-run
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(apt.pipeline, "prune_layer", interrupt_on_third_layer)
    src = save_tiny_model("llama", tmp_path / "src")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *quick_prune(src, out))
    assert code == 130 and "nothing was written" in err
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_eval_and_inspect_commands(tmp_path, capsys):
    src = save_tiny_model("llama", tmp_path / "src")
    out = tmp_path / "out"
    assert (
        main(
            [
                "prune",
                "--model",
                str(src),
                "--out",
                str(out),
                "--num-calibration-samples",
                "4",
                "--max-seq-length",
                "32",
                "--num-eval-windows",
                "2",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "all N:M valid: True" in printed and "perplexity: dense" in printed

    assert main(["eval", str(out), "--json", "--num-eval-windows", "2", "--max-seq-length", "32"]) == 0
    result = json.loads(capsys.readouterr().out)
    report = json.loads((out / REPORT_NAME).read_text())
    # the dense source named in the report is measured in the same run, on the same windows
    assert result["dense"]["model"] == str(src)
    assert result["dense"]["perplexity"] == pytest.approx(report["accuracy"]["dense"]["perplexity"], rel=1e-5)
    assert result["pruned"]["perplexity"] == pytest.approx(report["accuracy"]["pruned"]["perplexity"], rel=1e-5)

    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "14/" in text and "model.layers.0.mlp.down_proj.weight" in text
    assert main(["inspect", str(src), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert not any(r["nm_valid"] for r in rows if ".layers." in r["name"])  # the dense source is not 2:4
