"""FP8 after pruning (``apt-sparse prune --quantize fp8``, ``apt-sparse quantize``): the folder holds exactly the
rounding of the pruned weights (to nearest, or the error-compensating pass on each layer's FP8 inputs, the
default), the mask and every other tensor unchanged, compressed-tensors' FP8 config and the plugin's side
file; the report's accuracy is the folder's own in FP8 (W8A8), what ``apt-sparse eval`` gives."""

import json

import pytest
import torch
import transformers

from apt.errors import InvalidInputError
from apt.folder.fp8 import SIDE_FILE, is_fp8_config, quantization_config
from apt.folder.inspect import inspect_checkpoint
from apt.measure.accuracy import evaluate_model
from apt.measure.fp8 import fp8_activations, load_fp8_emulated
from apt.models.checkpoint import CheckpointReader
from apt.run import PruneJob, prune_model
from apt.run.command import command_of
from apt.run.quantize import QuantizeConfig, quantize_folder
from apt.solver import layer_loss
from apt.solver.fp8 import FP8, compensated_fp8, dequantize_weight, fake_quantize_activations, quantize_weight
from apt.solver.patterns import Pattern, conforms
from apt.text.sources import load_text, token_windows
from apt_sparse.cli import main
from serving.vllm_plugin import SIDE_FILE as PLUGIN_SIDE_FILE

from ..tiny_models import copy_editing_tensors, save_tiny_model

PRUNE = ["--num-calibration-samples", "4", "--max-seq-length", "32", "--num-eval-windows", "1"]


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """``src`` (a tiny llama), ``pruned`` (apt 2:4 on 4 × 32 stdlib tokens, with its accuracy), ``fp8``
    (``apt-sparse quantize``'s default: the error-compensating pass, accuracy measured again in FP8) and
    ``nearest`` (``--rounding nearest``)."""
    root = tmp_path_factory.mktemp("fp8")
    src = save_tiny_model("llama", root / "src")
    job = PruneJob(model=str(src), out=str(root / "pruned"), num_calibration_samples=4, max_seq_length=32)
    prune_model(job)
    quantize_folder(root / "pruned", root / "fp8")
    quantize_folder(root / "pruned", root / "nearest", config=QuantizeConfig(rounding="nearest"))
    return root


def fp8_inputs_hessian(folder, layer: str) -> torch.Tensor:
    """``Σ x xᵀ`` of ``layer``'s inputs through FP8 per token on the run's calibration windows (4 × 32 stdlib
    tokens, one batch), computed by transformers on the unquantized folder: what the pass rounds block 0 on."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    windows = token_windows(load_text("stdlib", seed=0).calibration, tokenizer, 4, 32, 0)
    seen = []
    hook = model.get_submodule(layer).register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        model(input_ids=windows, use_cache=False)
    hook.remove()
    x = fake_quantize_activations(seen[0]).reshape(-1, seen[0].shape[-1])
    return torch.zeros(x.shape[1], x.shape[1]).addmm_(x.T, x)


def test_round_to_nearest_holds_the_rounding_of_every_pruned_weight_bit_for_bit(pruned):
    source, written = CheckpointReader(pruned / "pruned"), CheckpointReader(pruned / "nearest")
    report = json.loads((pruned / "pruned" / "prune_report.json").read_text())
    targets = {r["tensor"] for r in report["layers"] if not r["skipped"]}
    assert len(targets) == 14 and written.fp8 == targets
    for name in source.names():
        if name in targets:
            q, scale = quantize_weight(source.read(name))
            stored = written.read_stored(name)
            assert stored.dtype == FP8 and torch.equal(stored.view(torch.uint8), q.view(torch.uint8))
            stored_scale = written.read(name.removesuffix(".weight") + ".weight_scale")
            assert stored_scale.dtype == torch.float32 and torch.equal(stored_scale, scale.reshape(-1, 1))
            # the mask: zeros exactly where the pruned weight had them (+0 bits), 2:4 kept
            assert torch.equal(stored.view(torch.uint8) == 0, source.read(name) == 0)
            assert conforms(stored.float(), Pattern.parse("2:4"))
            # and every reader reads it as FP8: q · scale
            assert torch.equal(written.read(name), q.float() * scale[:, None])
        else:
            assert torch.equal(written.read(name), source.read(name))  # everything else untouched
    assert set(written.names()) == set(source.names()) | {t.removesuffix(".weight") + ".weight_scale" for t in targets}


def test_the_default_rounding_compensates_each_layer_on_its_fp8_inputs(pruned):
    source, written = CheckpointReader(pruned / "pruned"), CheckpointReader(pruned / "fp8")
    record = json.loads((pruned / "fp8" / "prune_report.json").read_text())["quantization"]
    assert record["pass"].startswith("error-compensating (apt-sparse quantize")
    assert record["calibration"] == {"source": "stdlib", "windows": 4, "seq_len": 32, "seed": 0}  # the run's
    assert record["compensated"] == 14 and set(record["fp8_relative_loss"]) == written.fp8
    for name in written.fp8:  # the scales are the pruned weights' amax/448, the mask never moves
        weight = source.read(name)
        _, scale = quantize_weight(weight)
        assert torch.equal(written.read(name.removesuffix(".weight") + ".weight_scale").reshape(-1), scale)
        assert torch.equal(written.read_stored(name).view(torch.uint8) == 0, weight == 0)
    # block 0's q/k/v see the embeddings, untouched by FP8: their rounding is exactly the pass on that Hessian
    hessian = fp8_inputs_hessian(pruned / "pruned", "model.layers.0.self_attn.q_proj")
    for part in ("q_proj", "k_proj", "v_proj"):
        name = f"model.layers.0.self_attn.{part}.weight"
        weight = source.read(name)
        q, scale = compensated_fp8(weight, hessian)
        assert torch.equal(written.read_stored(name).view(torch.uint8), q.view(torch.uint8)), name
        rtn = dequantize_weight(*quantize_weight(weight))
        ours = written.read(name)
        assert layer_loss(ours, weight, hessian) < layer_loss(rtn, weight, hessian), name
        zero = layer_loss(torch.zeros_like(weight), weight, hessian)
        assert record["fp8_relative_loss"][name] == pytest.approx(layer_loss(ours, weight, hessian) / zero)


def test_the_report_s_accuracy_is_measured_again_in_fp8(pruned):
    source = json.loads((pruned / "pruned" / "prune_report.json").read_text())
    report = json.loads((pruned / "fp8" / "prune_report.json").read_text())
    assert report["accuracy_unquantized"] == source["accuracy"]
    accuracy = report["accuracy"]
    assert accuracy["data"] == source["accuracy"]["data"] and accuracy["fp8"]["weights_in_fp8"] == 14
    assert accuracy["dense"] == source["accuracy"]["dense"]  # the same windows of the same text
    assert accuracy["pruned"]["tokens"] == source["accuracy"]["pruned"]["tokens"]
    assert accuracy["pruned"]["perplexity"] != source["accuracy"]["pruned"]["perplexity"]
    # what apt-sparse eval says of the folder, to the bit: one reader, one measurement
    again = evaluate_model(str(pruned / "fp8"), num_eval_windows=32, max_seq_length=32)
    assert again["pruned"]["perplexity"] == accuracy["pruned"]["perplexity"]
    assert "Accuracy in FP8 (W8A8" in (pruned / "fp8" / "README.md").read_text()


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
    assert report["quantization"]["weights_quantized"] == 14 and report["quantization"]["pass"].startswith("error")
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
    calibration = ["--num-calibration-samples", "4", "--max-seq-length", "32"]  # no report: given
    assert main(["quantize", str(pruned / "src"), str(tmp_path / "dense"), *calibration]) == 0
    assert "14 dense weights in float8_e4m3fn with per-channel scales, rounded by error-compensating" in (
        capsys.readouterr().out
    )
    assert not (tmp_path / "dense" / SIDE_FILE).exists()
    assert len(CheckpointReader(tmp_path / "dense").fp8) == 14


def test_prune_quantize_fp8_is_prune_then_apt_sparse_quantize(pruned, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["prune", "--model", str(pruned / "src"), "--out", str(out), *PRUNE, "--quantize", "fp8"]
    assert main(args) == 0
    assert "pruned in FP8 (W8A8)" in capsys.readouterr().out
    report = json.loads((out / "prune_report.json").read_text())
    assert report["quantization"]["pass"].startswith("error-compensating (apt-sparse quantize")
    assert report["quantization"]["calibration"] == {"source": "stdlib", "windows": 4, "seq_len": 32, "seed": 0}
    command = command_of(report["config"])
    assert "--quantize fp8" in command and "fp8-compensate" not in command  # the default needs no flag
    # bit for bit the folder that pruning without --quantize, then apt-sparse quantize, writes
    plain = tmp_path / "plain"
    assert main([*args[:4], str(plain), *PRUNE]) == 0
    assert main(["quantize", str(plain), str(tmp_path / "then"), "--no-evaluate"]) == 0
    ours, theirs = CheckpointReader(out), CheckpointReader(tmp_path / "then")
    assert ours.names() == theirs.names() and len(ours.fp8) == 14
    for name in ours.names():
        assert torch.equal(ours.read_stored(name).view(torch.uint8), theirs.read_stored(name).view(torch.uint8))
    # its accuracy is the FP8 folder's (W8A8), the unquantized one kept beside it
    plain_report = json.loads((plain / "prune_report.json").read_text())
    assert report["accuracy_unquantized"]["pruned"] == plain_report["accuracy"]["pruned"]
    assert report["accuracy"]["fp8"]["weights_in_fp8"] == 14
    capsys.readouterr()
    assert main(["eval", str(out), "--num-eval-windows", "1", "--max-seq-length", "32", "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["pruned"]["perplexity"] == report["accuracy"]["pruned"]["perplexity"]
    assert not list(tmp_path.glob(".out.unquantized"))


def test_prune_quantize_fp8_in_the_run_measures_w8a8_as_eval_does(pruned, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["prune", "--model", str(pruned / "src"), "--out", str(out), *PRUNE, "--quantize", "fp8", "--fp8-in-run"]
    assert main(args) == 0
    assert "pruned in FP8 (W8A8)" in capsys.readouterr().out  # the run's own figure, W8A8
    report = json.loads((out / "prune_report.json").read_text())
    assert report["quantization"]["pass"].startswith("error-compensating (in the run")
    assert "--quantize fp8 --fp8-in-run" in command_of(report["config"])
    assert all(r["fp8_relative_loss"] >= 0 for r in report["layers"] if not r["skipped"])
    assert len(CheckpointReader(out).fp8) == 14 and "accuracy_unquantized" not in report
    # the run measured its model as the FP8 folder computes (W8A8), which apt-sparse eval of the folder gives
    assert main(["eval", str(out), "--num-eval-windows", "1", "--max-seq-length", "32", "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["fp8"]["weights_in_fp8"] == 14
    assert evaluated["pruned"]["perplexity"] == pytest.approx(report["accuracy"]["pruned"]["perplexity"], rel=1e-6)
    assert evaluated["dense"]["perplexity"] == report["accuracy"]["dense"]["perplexity"]


def test_prune_quantize_fp8_rounds_to_nearest_when_asked(pruned, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["prune", "--model", str(pruned / "src"), "--out", str(out), *PRUNE, "--quantize", "fp8"]
    assert main([*args, "--no-fp8-compensate", "--no-evaluate"]) == 0
    report = json.loads((out / "prune_report.json").read_text())
    assert report["quantization"]["pass"] == "round to nearest"
    assert "--quantize fp8 --no-fp8-compensate" in command_of(report["config"])
    assert main(["prune", "--model", str(pruned / "src"), "--out", str(tmp_path / "x"), "--fp8-compensate"]) == 2
    assert "applies to --quantize fp8 only" in capsys.readouterr().err
    assert main([*args[:4], str(tmp_path / "y"), *PRUNE, "--quantize", "fp8", "--fp8-in-run", "--permute"]) == 2
    assert "add --no-fp8-compensate" in capsys.readouterr().err


def test_an_unquantized_folder_off_its_pattern_and_an_fp8_folder_are_not_quantized(pruned, tmp_path):
    key = "model.layers.1.mlp.up_proj"

    def densify(tensors):
        tensors[f"{key}.weight"] = torch.ones_like(tensors[f"{key}.weight"])

    broken = copy_editing_tensors(pruned / "pruned", tmp_path / "broken", densify)
    with pytest.raises(InvalidInputError, match=rf"{key}\.weight breaks 2:4 \(row 0, columns 0\.\.3\)"):
        quantize_folder(broken, tmp_path / "never")
    assert not (tmp_path / "never").exists()
    with pytest.raises(InvalidInputError, match="already FP8"):
        quantize_folder(pruned / "fp8", tmp_path / "twice")
    assert not (tmp_path / "twice").exists()
