"""FP8 after pruning (``apt-sparse prune --quantize fp8``, ``apt-sparse quantize``): the folder holds exactly the
rounding of the pruned weights, the mask and every other tensor unchanged, compressed-tensors' FP8 config
and the plugin's side file; damaged folders are refused with what to do."""

import json

import pytest
import torch

from apt.errors import InvalidInputError
from apt.folder.fp8 import SIDE_FILE, DequantizingReader, is_fp8_config, quantization_config
from apt.folder.inspect import inspect_checkpoint
from apt.measure.fp8 import fp8_activations, load_fp8_emulated
from apt.models.checkpoint import CheckpointReader
from apt.run import PruneJob, prune_model
from apt.run.command import command_of
from apt.run.quantize import quantize_folder
from apt.solver.fp8 import FP8, quantize_weight
from apt.solver.patterns import Pattern, conforms
from apt_sparse.cli import main
from serving.vllm_plugin import SIDE_FILE as PLUGIN_SIDE_FILE

from ..tiny_models import copy_editing_tensors, save_tiny_model

PRUNE = ["--num-calibration-samples", "4", "--max-seq-length", "32", "--num-eval-windows", "1"]


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    src = save_tiny_model("llama", root / "src")
    job = PruneJob(model=str(src), out=str(root / "pruned"), num_calibration_samples=4, max_seq_length=32)
    prune_model(job)
    quantize_folder(root / "pruned", root / "fp8")
    return root


def test_the_folder_holds_the_rounding_of_every_pruned_weight_bit_for_bit(pruned):
    source, written = CheckpointReader(pruned / "pruned"), CheckpointReader(pruned / "fp8")
    report = json.loads((pruned / "pruned" / "prune_report.json").read_text())
    targets = {r["tensor"] for r in report["layers"] if not r["skipped"]}
    assert len(targets) == 14
    for name in source.names():
        if name in targets:
            q, scale = quantize_weight(source.read(name))
            stored = written.read(name)
            assert stored.dtype == FP8 and torch.equal(stored.view(torch.uint8), q.view(torch.uint8))
            stored_scale = written.read(name.removesuffix(".weight") + ".weight_scale")
            assert stored_scale.dtype == torch.float32 and torch.equal(stored_scale, scale.reshape(-1, 1))
            # the mask: zeros exactly where the pruned weight had them (+0 bits), 2:4 kept
            assert torch.equal(stored.view(torch.uint8) == 0, source.read(name) == 0)
            assert conforms(stored.float(), Pattern.parse("2:4"))
        else:
            assert torch.equal(written.read(name), source.read(name))  # everything else untouched
    assert set(written.names()) == set(source.names()) | {t.removesuffix(".weight") + ".weight_scale" for t in targets}


def test_config_side_file_report_and_card_say_what_the_folder_is(pruned):
    config = json.loads((pruned / "fp8" / "config.json").read_text())
    assert is_fp8_config(config) and config["quantization_config"] == quantization_config(["lm_head"])
    group = config["quantization_config"]["config_groups"]["group_0"]
    assert group["weights"]["strategy"] == "channel" and group["weights"]["dynamic"] is False
    assert group["input_activations"]["strategy"] == "token" and group["input_activations"]["dynamic"] is True
    assert SIDE_FILE == PLUGIN_SIDE_FILE
    side = json.loads((pruned / "fp8" / SIDE_FILE).read_text())
    assert side["format"] == "fp8" and side["pattern"] == "2:4" and len(side["targets"]) == 14
    report = json.loads((pruned / "fp8" / "prune_report.json").read_text())
    assert report["quantization"]["weights_quantized"] == 14 and report["quantization"]["pass"] == "round to nearest"
    card = (pruned / "fp8" / "README.md").read_text()
    assert "## FP8 (W8A8)" in card and "--quantization apt_sparse_24" in card and '- "fp8"' in card


def test_inspect_shows_scales_and_the_pattern(pruned):
    rows = inspect_checkpoint(pruned / "fp8")["tensors"]
    fp8 = [r for r in rows if "scale" in r]
    assert len(fp8) == 14 and all(r["follows_pattern"] and r["dtype"] == "float8_e4m3fn" for r in fp8)
    assert not any(r["name"].endswith("weight_scale") for r in rows)


def test_the_emulated_model_quantizes_the_inputs_of_the_fp8_layers(pruned):
    model, modules = load_fp8_emulated(pruned / "fp8")
    assert len(modules) == 14
    ids = torch.tensor([[101, 2054, 2003, 1996, 3437, 102]])
    with torch.no_grad():
        plain = model(ids).logits
        with fp8_activations(model, modules):
            quantized = model(ids).logits
    assert not torch.equal(plain, quantized)
    torch.testing.assert_close(plain, quantized, rtol=0.1, atol=0.1)


def test_dense_fp8_quantizes_every_linear_of_the_blocks_without_a_side_file(pruned, tmp_path, capsys):
    assert main(["quantize", str(pruned / "src"), str(tmp_path / "dense")]) == 0
    assert "14 dense weights" in capsys.readouterr().out
    assert not (tmp_path / "dense" / SIDE_FILE).exists()
    assert len(DequantizingReader(tmp_path / "dense").fp8) == 14


def test_prune_quantize_fp8_with_compensation_writes_the_fp8_folder(pruned, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["prune", "--model", str(pruned / "src"), "--out", str(out), *PRUNE, "--quantize", "fp8", "--fp8-compensate"]
    assert main(args) == 0
    assert "FP8: 14 weights" in capsys.readouterr().out
    report = json.loads((out / "prune_report.json").read_text())
    assert report["quantization"]["pass"].startswith("error-compensating")
    assert "--quantize fp8 --fp8-compensate" in command_of(report["config"])
    assert all(r["fp8_relative_loss"] >= 0 for r in report["layers"] if not r["skipped"])
    assert len(DequantizingReader(out).fp8) == 14 and not list(tmp_path.glob(".out.unquantized"))
    assert main(["prune", "--model", str(pruned / "src"), "--out", str(tmp_path / "x"), "--fp8-compensate"]) == 2
    assert "applies to --quantize fp8 only" in capsys.readouterr().err


def test_missing_scales_and_a_broken_pattern_are_refused(pruned, tmp_path, capsys):
    key = "model.layers.1.mlp.up_proj"
    lost = copy_editing_tensors(pruned / "fp8", tmp_path / "lost", lambda t: t.pop(f"{key}.weight_scale"))
    with pytest.raises(InvalidInputError, match=rf"lacks {key}\.weight_scale \(its per-channel scales\)"):
        DequantizingReader(lost)
    assert main(["inspect", str(lost)]) == 2
    assert "lacks model.layers.1.mlp.up_proj.weight_scale" in capsys.readouterr().err

    def densify(tensors):
        tensors[f"{key}.weight"] = torch.ones_like(tensors[f"{key}.weight"])

    broken = copy_editing_tensors(pruned / "pruned", tmp_path / "broken", densify)
    with pytest.raises(InvalidInputError, match=rf"{key}\.weight breaks 2:4 \(row 0, columns 0\.\.3\)"):
        quantize_folder(broken, tmp_path / "never")
    assert not (tmp_path / "never").exists()
    with pytest.raises(InvalidInputError, match="already FP8"):
        quantize_folder(pruned / "fp8", tmp_path / "twice")
