import json
import shlex

import yaml

from apt.folder.card import figure
from apt.folder.report import REPORT_NAME
from apt.models.checkpoint import CheckpointReader
from apt.run.command import command_of
from apt_sparse.cli import main

from ..tiny_models import save_tiny_model


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_the_model_card_renders_and_states_the_reports_numbers(tmp_path, capsys):
    src = save_tiny_model("llama", tmp_path / "src")
    out = tmp_path / "out"
    argv = [
        "prune",
        "--model",
        str(src),
        "--out",
        str(out),
        "--method",
        "sparsegpt",
        "--num-calibration-samples",
        "4",
        "--max-seq-length",
        "32",
        "--num-eval-windows",
        "2",
        "--damp",
        "0.05",
    ]
    assert main(argv) == 0
    capsys.readouterr()
    card = (out / "README.md").read_text()
    report = json.loads((out / REPORT_NAME).read_text())
    meta = front_matter(card)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"sparse", "2:4-sparsity", "sparsegpt"} <= set(meta["tags"]) and "base_model" not in meta  # a local path
    totals, accuracy = report["totals"], report["accuracy"]
    for value in (
        accuracy["dense"]["perplexity"],
        accuracy["pruned"]["perplexity"],
        totals["mean_relative_loss"],
        totals["sum_relative_loss"],
        totals["target_sparsity"],
    ):
        assert figure(value) in card
    assert f"{totals['layers_pruned']} layers pruned" in card and "vLLM removed its 2:4 kernels in 0.19.1" in card
    # the command in the card makes the same folder again
    command = command_of(report["config"])
    assert f"`{command}`" in card
    again = shlex.split(command)[1:]
    again[again.index("--out") + 1] = str(tmp_path / "again")
    assert main(again) == 0
    first, second = CheckpointReader(out), CheckpointReader(tmp_path / "again")
    assert all(first.read(n).equal(second.read(n)) for n in first.names())


def test_export_folders_carry_a_short_card(tmp_path):
    from exporters import export

    src = save_tiny_model("llama", tmp_path / "src")
    assert (
        main(
            [
                "prune",
                "--model",
                str(src),
                "--out",
                str(tmp_path / "p"),
                "--num-calibration-samples",
                "2",
                "--max-seq-length",
                "16",
                "--no-evaluate",
            ]
        )
        == 0
    )
    export("vllm", tmp_path / "p", tmp_path / "vllm", vllm_check=False)
    card = (tmp_path / "vllm" / "README.md").read_text()
    assert front_matter(card)["tags"] == ["sparse", "2:4-sparsity", "apt-sparse"]
    assert "from vllm import LLM" in card and "14 pruned weights" in card
    manifest = json.loads((tmp_path / "vllm" / "manifest.json").read_text())
    assert "README.md" in {f["path"] for f in manifest["files"]}
