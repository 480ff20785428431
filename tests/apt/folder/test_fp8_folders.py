"""An FP8 folder through every command that reads a folder's weights: ``eval`` measures it as it is served
(W8A8: the perplexity of the FP8 emulation in memory), and a damaged one (a scale missing, misshapen, NaN or
zero; a weight off its 2:4 pattern or holding NaN) is refused by each command in one line naming the tensor,
exit status 2, nothing written. Commands that cannot carry FP8 say why."""

import json
import re

import pytest
import torch

from apt.measure.evaluate import perplexity
from apt.measure.fp8 import fp8_activations, load_fp8_emulated
from apt.models.checkpoint import CheckpointReader
from apt.models.loading import load_tokenizer
from apt.run import PruneJob, prune_model
from apt.run.quantize import QuantizeConfig, quantize_folder
from apt.text.sources import evaluation_documents, token_windows
from apt_sparse.cli import main

from ..tiny_models import copy_editing_tensors, save_tiny_model

KEY = "model.layers.1.mlp.up_proj"  # [128, 64]
PRUNE = ["--num-calibration-samples", "4", "--max-seq-length", "32", "--num-eval-windows", "1"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8-folders")
    src = save_tiny_model("llama", root / "src")
    prune_model(PruneJob(model=str(src), out=str(root / "pruned"), num_calibration_samples=4, max_seq_length=32))
    quantize_folder(root / "pruned", root / "fp8", config=QuantizeConfig(evaluate=False))
    return root


def test_eval_measures_the_folder_as_served_w8a8(folders, capsys):
    fp8 = folders / "fp8"
    assert main(["eval", str(fp8), "--num-eval-windows", "4", "--max-seq-length", "32", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["fp8"]["weights_in_fp8"] == 14 and "per token" in result["fp8"]["inputs"]
    # the same windows through the whole model in memory: q·scale weights, every FP8 layer's input through FP8
    documents, _ = evaluation_documents("stdlib", "stdlib", 0)
    windows = token_windows(documents, load_tokenizer(fp8), 4, 32, 0)
    model, modules = load_fp8_emulated(fp8)
    with fp8_activations(model, modules):
        emulated = perplexity(model, windows)["perplexity"]
    unquantized_inputs = perplexity(model, windows)["perplexity"]
    measured = result["pruned"]["perplexity"]
    assert measured == pytest.approx(emulated, rel=1e-5)
    # it really quantizes the inputs: the figure is W8A8's, ten times closer to it than to W8A16's (on a tiny random
    # model FP8 inputs move the perplexity by only ~5e-5 relative, so a fixed threshold depends on the machine)
    assert abs(measured - emulated) * 10 < abs(measured - unquantized_inputs)
    # and the text output says what it measured
    assert main(["eval", str(fp8), "--num-eval-windows", "1", "--max-seq-length", "32"]) == 0
    assert "is FP8 (W8A8 FP8_DYNAMIC" in capsys.readouterr().out


def _set(tensors, name, edit):
    tensors[name] = edit(tensors[name].clone())


def _row(value, row):
    def edit(scale):
        scale[row] = value
        return scale

    return edit


def _nan_weight(q):
    q.view(torch.uint8)[2, 5] = 0x7F  # float8_e4m3fn's NaN
    return q


DAMAGES = {
    "missing scale": (
        lambda t: t.pop(f"{KEY}.weight_scale"),
        rf"lacks {KEY}\.weight_scale \(its per-channel scales\)",
    ),
    "misshapen scale": (
        lambda t: _set(t, f"{KEY}.weight_scale", lambda s: s[:-1].contiguous()),
        rf"{KEY}\.weight_scale is float32 \[127, 1\], expected float32 \[128, 1\]",
    ),
    "NaN scale": (
        lambda t: _set(t, f"{KEY}.weight_scale", _row(float("nan"), 3)),
        rf"{KEY}\.weight_scale is nan at row 3 \(a scale must be finite and positive\)",
    ),
    "zero scale": (
        lambda t: _set(t, f"{KEY}.weight_scale", _row(0.0, 5)),
        rf"{KEY}\.weight_scale is 0\.0 at row 5 \(a scale must be finite and positive\)",
    ),
    "weight off 2:4": (
        lambda t: _set(t, f"{KEY}.weight", lambda q: torch.ones(q.shape).to(torch.float8_e4m3fn)),
        rf"{KEY}\.weight breaks 2:4 \(row 0, columns 0\.\.3\)",
    ),
    "NaN weight": (
        lambda t: _set(t, f"{KEY}.weight", _nan_weight),
        rf"{KEY}\.weight holds NaN at row 2",
    ),
}

COMMANDS = {
    "eval": lambda f, out: ["eval", f, "--num-eval-windows", "1", "--max-seq-length", "32"],
    "eval --tasks": lambda f, out: ["eval", f, "--tasks", "boolq", "--limit", "1"],
    "inspect": lambda f, out: ["inspect", f],
    "export vllm": lambda f, out: ["export", "vllm", f, out, "--no-vllm-check"],
    "export compressed-tensors": lambda f, out: ["export", "compressed-tensors", f, out, "--no-vllm-check"],
    "export onnx": lambda f, out: ["export", "onnx", f, out],
    "export tensorrt": lambda f, out: ["export", "tensorrt", f, out],
    "bench": lambda f, out: ["bench", f, "--out", out, "--quick"],
    "quantize": lambda f, out: ["quantize", f, out],
    "prune": lambda f, out: ["prune", "--model", f, "--out", out, *PRUNE],
}


@pytest.fixture(scope="module")
def damaged(folders, tmp_path_factory):
    root = tmp_path_factory.mktemp("damaged")
    return {
        name: copy_editing_tensors(folders / "fp8", root / name.replace(" ", "-").replace(":", ""), edit)
        for name, (edit, _) in DAMAGES.items()
    }


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_every_command_refuses_a_damaged_fp8_folder_in_one_line_naming_the_tensor(
    damaged, damage, command, tmp_path, capsys
):
    out = tmp_path / "out"
    assert main(COMMANDS[command](str(damaged[damage]), str(out))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert re.search(DAMAGES[damage][1], err), err
    assert not out.exists()


def test_the_reader_refuses_each_damage_with_the_same_words(damaged):
    for damage, folder in damaged.items():
        pattern = DAMAGES[damage][1]
        with pytest.raises(Exception, match=pattern):
            reader = CheckpointReader(folder)
            reader.read(f"{KEY}.weight")


@pytest.mark.parametrize(
    "command, reason",
    [
        (["export", "onnx"], "no QuantizeLinear/DequantizeLinear nodes"),
        (["export", "tensorrt"], "no FP8 Q/DQ nodes"),
        (["export", "compressed-tensors"], "the FP8 variant vLLM 0.6.5–0.19.0 read"),
        (["bench"], "the benchmark has no FP8 GEMM backend"),
    ],
)
def test_commands_that_cannot_carry_fp8_say_why_and_write_nothing(folders, command, reason, tmp_path, capsys):
    out = tmp_path / "out"
    args = [*command, str(folders / "fp8"), *(["--out", str(out)] if command == ["bench"] else [str(out)])]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is FP8 (W8A8, 14 float8 weights)" in err and reason in err, err
    assert str(folders / "pruned") in err  # where the unquantized model is, from the report
    assert not out.exists()


def test_an_fp8_folder_is_neither_pruned_nor_quantized_again(folders, tmp_path, capsys):
    assert main(["prune", "--model", str(folders / "fp8"), "--out", str(tmp_path / "p"), *PRUNE]) == 2
    assert "is stored in FP8 (14 float8 weights): apt-sparse prunes unquantized" in capsys.readouterr().err
    assert main(["quantize", str(folders / "fp8"), str(tmp_path / "q")]) == 2
    assert "is already FP8: quantize its unquantized source instead" in capsys.readouterr().err
    assert not (tmp_path / "p").exists() and not (tmp_path / "q").exists()
