import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from apt.folder.report import REPORT_NAME
from apt.models.checkpoint import CheckpointReader
from apt.models.loading import load_tokenizer
from apt.run import PruneJob, RunConfig, partial_folder, prune_model
from apt.solver import PruneConfig
from apt.solver.patterns import is_nm_sparse
from apt_sparse.cli import main

from ..tiny_models import save_images, save_tiny_model, save_tiny_vlm_with_processor

FAST = dict(num_calibration_samples=4, max_seq_length=32, num_eval_windows=2)
REPO = Path(__file__).resolve().parents[3]


def test_targets_and_ignore_select_layers(tmp_path):
    src = save_tiny_model("llama", tmp_path / "src")
    run = RunConfig(solver=PruneConfig(method="sparsegpt"), ignore=r"down_proj", targets=r"layers\.1\.")
    report = prune_model(PruneJob(model=str(src), out=str(tmp_path / "out"), run=run, evaluate=False, **FAST))
    names = [r["name"] for r in report["layers"]]
    assert len(names) == 6 and all(".layers.1." in n and "down_proj" not in n for n in names)
    assert report["accuracy"] is None
    written, source = CheckpointReader(tmp_path / "out"), CheckpointReader(src)
    untouched = [n for n in source.names() if n.removesuffix(".weight") not in names]
    assert all(torch.equal(written.read(n), source.read(n)) for n in untouched)


def test_true_sequential_recalibrates_each_group_on_the_pruned_groups_before_it(tmp_path):
    src = save_tiny_model("llama", tmp_path / "src")
    weights = {}
    for flag in (False, True):
        run = RunConfig(solver=PruneConfig(method="sparsegpt"), true_sequential=flag)
        prune_model(PruneJob(model=str(src), out=str(tmp_path / str(flag)), run=run, evaluate=False, **FAST))
        weights[flag] = CheckpointReader(tmp_path / str(flag))
    block0 = "model.layers.0."
    # q/k/v read the block's input, which no pruning inside the block has touched yet
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        assert torch.equal(weights[False].read(f"{block0}{name}.weight"), weights[True].read(f"{block0}{name}.weight"))
    # o_proj's input comes from the pruned q/k/v only under true sequential calibration
    for name in ("self_attn.o_proj", "mlp.down_proj"):
        assert not torch.equal(
            weights[False].read(f"{block0}{name}.weight"), weights[True].read(f"{block0}{name}.weight")
        )


@pytest.mark.parametrize("pattern, n, m", [("4:8", 4, 8), ("50%", None, None)])
def test_4_8_and_unstructured_patterns_follow_their_pattern(tmp_path, pattern, n, m):
    src = save_tiny_model("llama", tmp_path / "src")
    run = RunConfig(solver=PruneConfig(pattern=pattern))
    out = tmp_path / pattern.replace("%", "")
    report = prune_model(PruneJob(model=str(src), out=str(out), run=run, evaluate=False, **FAST))
    assert report["pattern"] == pattern
    weights = CheckpointReader(out)
    not_2_4 = 0
    for record in report["layers"]:
        weight = weights.read(record["tensor"])
        if n:
            assert is_nm_sparse(weight, n, m), record["name"]
        else:
            assert torch.all((weight == 0).sum(dim=1) == weight.shape[1] // 2), record["name"]
        not_2_4 += not is_nm_sparse(weight, 2, 4)
    assert not_2_4 == len(report["layers"])  # every layer uses the freedom 2:4 would not allow


def test_the_compute_dtype_changes_the_result_but_not_the_stored_dtype(tmp_path):
    # what ``auto`` chooses for a bfloat16 checkpoint depends on the device: tests/apt/run/test_dtype.py
    float32 = save_tiny_model("llama", tmp_path / "f32")
    bf16 = save_tiny_model("llama", tmp_path / "bf16", poison=lambda model: model.to(torch.bfloat16))
    reports = {
        name: prune_model(PruneJob(model=str(src), out=str(tmp_path / name), dtype=dtype, evaluate=False, **FAST))
        for name, src, dtype in (("a", float32, "auto"), ("b", bf16, "bfloat16"), ("c", bf16, "float32"))
    }
    assert [r["model"]["compute_dtype"] for r in reports.values()] == ["float32", "bfloat16", "float32"]
    computed_bf16, computed_f32 = CheckpointReader(tmp_path / "b"), CheckpointReader(tmp_path / "c")
    differ = 0
    for record in reports["b"]["layers"]:
        a, b = computed_bf16.read(record["tensor"]), computed_f32.read(record["tensor"])
        # written in the checkpoint's own dtype either way; the compute dtype changes the result
        assert a.dtype == b.dtype == torch.bfloat16 and is_nm_sparse(a, 2, 4) and is_nm_sparse(b, 2, 4)
        differ += not torch.equal(a, b)
    assert differ > 0


def quick_prune(src, out, *extra) -> list[str]:
    """The prune command on a tiny calibration set, without evaluation."""
    args = ["--num-calibration-samples", "2", "--max-seq-length", "16", "--no-evaluate", *extra]
    return ["prune", "--model", str(src), "--out", str(out), *args]


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_wrong_model_path_is_a_clear_error(tmp_path, capsys):
    code, _, err = run_cli(capsys, "prune", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert code == 2 and "not found" in err and not (tmp_path / "o").exists()


def test_a_model_without_linear_layers_says_what_discovery_found(tmp_path, capsys, monkeypatch):
    # GPT-2 keeps its projections in Conv1D modules, which discovery now prunes: with that recognition switched
    # off, it stands for a family whose layers are of a kind discovery does not know
    monkeypatch.setattr("apt.models.discovery.is_conv1d", lambda module: False)
    config = transformers.GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=100)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    code, _, err = run_cli(capsys, "prune", "--model", str(tmp_path / "gpt2"), "--out", str(tmp_path / "o"))
    assert code == 2 and "gpt2: found 1 blocks at transformer.h (GPT2Block)" in err and "Conv1D" in err
    assert not (tmp_path / "o").exists()


def test_nan_weights_name_the_layer_and_write_nothing(tmp_path, capsys):
    def poison(model):
        model.model.layers[0].mlp.up_proj.weight.data[0, 0] = float("nan")

    src = save_tiny_model("llama", tmp_path / "src", poison=poison)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *quick_prune(src, out))
    assert code == 2 and "NaN" in err and "model.layers.0.mlp.up_proj" in err and "nothing was written" in err
    assert not out.exists() and not partial_folder(out).exists()


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


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--refine", "local", "--pattern", "50%"], "refine swaps weights inside N:M groups"),
        (["--method", "magnitude", "--damp", "0.1"], "damp is not an option of method 'magnitude'"),
        (["--method", "sparsegpt", "--no-reconstruct"], "reconstruct is not an option of method 'sparsegpt'"),
        (["--lookahead", "--pattern", "4:8"], "it applies to 2:4"),
        (["--targets", "no_such_layer"], "no prunable layer matches --targets 'no_such_layer'"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
        (["--activation-dir", "/tmp/x"], "--activation-dir applies to --offload-activations disk only"),
        (["--max-shard-size", "lots"], "unknown size 'lots'"),
        (["--max-seq-length", "1"], "--max-seq-length must be at least 2"),
        (["--resume"], "nothing to resume"),
    ],
)
def test_option_combinations_that_cannot_work_are_refused_up_front(tmp_path, capsys, extra, message):
    src = save_tiny_model("llama", tmp_path / "src")
    code, _, err = run_cli(capsys, *quick_prune(src, tmp_path / "out", *extra))
    assert code == 2 and message in err, err
    assert not (tmp_path / "out").exists() and not partial_folder(tmp_path / "out").exists()


@pytest.mark.parametrize(
    "target, extra, message",
    [
        ("vllm", ["--with-past"], "--with-past applies to the onnx target(s), not vllm"),
        ("onnx", ["--max-shard-size", "1GB"], "--max-shard-size applies to the vllm and compressed-tensors"),
        ("vllm", ["--polygraphy"], "--polygraphy applies to the onnx and tensorrt target(s)"),
        ("compressed-tensors", ["--dtype", "float32"], "float16 or bfloat16"),
        ("tensorrt", ["--dtype", "float32"], "float16 or bfloat16"),
    ],
)
def test_export_options_that_do_not_apply_are_refused(tmp_path, capsys, target, extra, message):
    src = save_tiny_model("llama", tmp_path / "src")
    prune_model(PruneJob(model=str(src), out=str(tmp_path / "pruned"), evaluate=False, **FAST))
    code, _, err = run_cli(capsys, "export", target, str(tmp_path / "pruned"), str(tmp_path / "x"), *extra)
    assert code == 2 and message in err, err
    assert not (tmp_path / "x").exists()


def test_ctrl_c_before_any_block_finished_leaves_nothing(tmp_path, capsys, monkeypatch):
    import apt.run.sequential

    real = apt.run.sequential.prune_layer
    calls = []

    def interrupt_on_third_layer(*args, **kwargs):  # the real solver, then a Ctrl-C in block 0
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(apt.run.sequential, "prune_layer", interrupt_on_third_layer)
    src = save_tiny_model("llama", tmp_path / "src")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *quick_prune(src, out))
    assert code == 130 and f"nothing was written to {out}" in err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


KILL_AT_BLOCK = """
import os, signal, sys
import apt.run.sequential as sequential
real = sequential.prune_group
def prune_group(group, hessian, layered, config, bar, index, *rest):
    if index == {block} and "{blocks}" in layered.block_path:  # a crash (SIGKILL: no handler runs) in this block
        os.kill(os.getpid(), signal.SIGKILL)
    return real(group, hessian, layered, config, bar, index, *rest)
sequential.prune_group = prune_group
from apt_sparse.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize(
    "family, extra",
    [("llama", []), ("llama", ["--correction", "0.5"]), ("qwen3_moe", []), ("llava", ["--prune-vision"])],
    ids=["plain", "error-correcting", "moe", "vision"],
)
def test_resume_after_sigkill_gives_a_bit_identical_folder(tmp_path, capsys, family, extra):
    # with error-correcting targets the resumed run must also rebuild the dense model's activations; a MoE
    # model is written back per expert, under its checkpoint's names, block by block; a vision-language model
    # whose vision part was pruned resumes its language model on what that pruned part (as written) gives it
    overrides = {"mlp_only_layers": [0, 2]} if family == "qwen3_moe" else {}
    killed_at, blocks = 2, ""
    if family == "llava":
        src = save_tiny_vlm_with_processor(family, tmp_path / "src")
        extra = [*extra, "--calibration-images", str(save_images(tmp_path / "images", 2))]
        killed_at, blocks = 1, "language_model"  # its language model has 2 blocks; the vision tower's come first
    else:
        src = save_tiny_model(family, tmp_path / "src", num_hidden_layers=4, **overrides)
    argv = [
        "--num-calibration-samples",
        "4",
        "--max-seq-length",
        "32",
        "--num-eval-windows",
        "2",
        "--max-shard-size",
        "300KB",
        *extra,
    ]
    assert main(["prune", "--model", str(src), "--out", str(tmp_path / "whole"), *argv]) == 0
    out = tmp_path / "resumed"
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            KILL_AT_BLOCK.format(block=killed_at, blocks=blocks),
            *("prune", "--model", str(src), "--out", str(out), *argv),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=os.environ | {"PYTHONPATH": str(REPO)},
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not out.exists()
    assert json.loads((partial_folder(out) / "resume.json").read_text())["blocks_done"] == killed_at

    code, _, err = run_cli(capsys, "prune", "--model", str(src), "--out", str(out), *argv)
    assert code == 2 and "pass --resume to continue it" in err  # a partial run is never silently replaced
    code, printed, err = run_cli(capsys, "prune", "--model", str(src), "--out", str(out), *argv, "--resume")
    assert code == 0 and "all N:M valid: True" in printed, err
    whole = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert whole == sorted(p.name for p in out.iterdir()) and len([n for n in whole if n.endswith("safetensors")]) > 1
    for name in whole:
        if name not in (REPORT_NAME, "README.md"):
            assert (tmp_path / "whole" / name).read_bytes() == (out / name).read_bytes(), name
    card = (tmp_path / "whole" / "README.md").read_text().replace(str(tmp_path / "whole"), str(out))
    assert card == (out / "README.md").read_text()  # the same card, with its own --out
    reports = [json.loads((folder / REPORT_NAME).read_text()) for folder in (tmp_path / "whole", out)]
    assert reports[1]["checkpoint"]["resumed_at_block"] == killed_at
    assert reports[0]["checkpoint"]["resumed_at_block"] is None
    timing = ("seconds", "solver")
    assert [{k: v for k, v in r.items() if k not in timing} for r in reports[0]["layers"]] == [
        {k: v for k, v in r.items() if k not in timing} for r in reports[1]["layers"]
    ]
    assert reports[0]["accuracy"]["pruned"] == reports[1]["accuracy"]["pruned"]


def test_resume_refuses_other_options_and_another_source(tmp_path, capsys):
    src = save_tiny_model("llama", tmp_path / "src", num_hidden_layers=3)
    out = tmp_path / "out"
    argv = quick_prune(src, out)
    killed = subprocess.run(
        [sys.executable, "-c", KILL_AT_BLOCK.format(block=1, blocks=""), *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=os.environ | {"PYTHONPATH": str(REPO)},
    )
    assert killed.returncode == -9
    code, _, err = run_cli(capsys, *argv, "--resume", "--method", "sparsegpt")
    assert code == 2 and "started with other options (run)" in err
    code, _, err = run_cli(capsys, *argv, "--resume", "--num-calibration-samples", "3")
    assert code == 2 and "num_calibration_samples" in err
    tensors = src / "model.safetensors"
    os.utime(tensors, ns=(tensors.stat().st_atime_ns, tensors.stat().st_mtime_ns + 10**9))
    code, _, err = run_cli(capsys, *argv, "--resume")
    assert code == 2 and "the source changed since it was started" in err
    assert partial_folder(out).exists()  # refusing keeps the interrupted run
    code, _, _ = run_cli(capsys, *argv, "--overwrite")
    assert code == 0 and out.is_dir() and not partial_folder(out).exists()


def test_eval_command_reads_the_whole_given_file_and_the_held_out_share_of_the_calibration_source(tmp_path, capsys):
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
    # the dense source named in the report is measured in the same run, on the same held-out windows
    assert result["dense"]["model"] == str(src) and "held-out documents" in result["data"]
    assert result["dense"]["perplexity"] == pytest.approx(report["accuracy"]["dense"]["perplexity"], rel=1e-6)
    assert result["pruned"]["perplexity"] == pytest.approx(report["accuracy"]["pruned"]["perplexity"], rel=1e-6)

    docs = [f"Document {i}: " + " ".join(f"word{i * 7 + j}" for j in range(40)) for i in range(30)]
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(docs))
    assert main(["eval", str(out), "--json", "--eval-data", str(text), "--max-seq-length", "32"]) == 0
    result = json.loads(capsys.readouterr().out)
    tokenizer = load_tokenizer(src)
    tokens = sum(len(tokenizer(d + "\n\n", add_special_tokens=False)["input_ids"]) for d in docs)
    assert "every document" in result["data"]
    assert result["pruned"]["windows"] == tokens // 32 and result["pruned"]["tokens"] == tokens // 32 * 31


def test_inspect_reads_the_pattern_and_targets_from_the_report(tmp_path, capsys):
    src = save_tiny_model("llama", tmp_path / "src")
    out = tmp_path / "out"
    run = RunConfig(solver=PruneConfig(pattern="4:8"))
    prune_model(PruneJob(model=str(src), out=str(out), run=run, evaluate=False, **FAST))
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "14/14 pruned weights follow 4:8" in text and "model.layers.0.mlp.down_proj.weight" in text
    assert main(["inspect", str(src), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    targets = [r for r in summary["tensors"] if r["target"]]
    assert len(targets) == 14 and not any(r["follows_pattern"] for r in targets)  # the dense source is not 2:4
    assert "assumed" in summary["targets_from"]
