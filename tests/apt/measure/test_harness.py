"""lm-evaluation-harness tasks on a pruned folder and its dense source, with a local task written here."""

import json

import pytest

from apt.run import PruneJob, prune_model
from apt_sparse.cli import main

from ..tiny_models import save_tiny_model

lm_eval = pytest.importorskip("lm_eval", reason="the eval extra (lm-eval) is not installed: make install adds it")

QUESTIONS = [
    ("The sky on a clear day is", ["blue", "green", "red"], 0),
    ("Two plus two equals", ["five", "four", "three"], 1),
    ("Water freezes at zero degrees", ["Celsius", "Kelvin", "Rankine"], 0),
    ("The capital of France is", ["Rome", "Berlin", "Paris"], 2),
    ("A week has seven", ["days", "hours", "years"], 0),
    ("Cats are a kind of", ["plant", "animal", "stone"], 1),
]


def write_local_task(folder):
    """A multiple-choice task in lm-eval's own YAML format over a local JSONL file: runs offline."""
    folder.mkdir()
    data = folder / "questions.jsonl"
    data.write_text("\n".join(json.dumps({"question": q, "choices": c, "answer": a}) for q, c, a in QUESTIONS))
    (folder / "apt_tiny_choice.yaml").write_text(
        "\n".join(
            [
                "task: apt_tiny_choice",
                "dataset_path: json",
                "dataset_kwargs:",
                "  data_files:",
                f"    test: {data}",
                "test_split: test",
                "output_type: multiple_choice",
                'doc_to_text: "{{question}}"',
                'doc_to_choice: "{{choices}}"',
                'doc_to_target: "{{answer}}"',
                "metric_list:",
                "  - metric: acc",
                "    aggregation: mean",
                "    higher_is_better: true",
            ]
        )
    )
    return folder


def causal_tiny_model(folder):
    """The tiny model with [CLS]/[SEP] as bos/eos: lm-eval scores every continuation after a bos (or eos)."""
    src = save_tiny_model("llama", folder)
    config = json.loads((src / "tokenizer_config.json").read_text())
    (src / "tokenizer_config.json").write_text(json.dumps(config | {"bos_token": "[CLS]", "eos_token": "[SEP]"}))
    return src


def test_eval_tasks_scores_dense_and_pruned_like_lm_eval_itself(tmp_path, capsys):
    src = causal_tiny_model(tmp_path / "src")
    prune_model(
        PruneJob(
            model=str(src), out=str(tmp_path / "pruned"), num_calibration_samples=4, max_seq_length=32, evaluate=False
        )
    )
    tasks = write_local_task(tmp_path / "tasks")
    argv = ["eval", str(tmp_path / "pruned"), "--tasks", "apt_tiny_choice", "--include-path", str(tasks), "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    (row,) = [r for r in result["rows"] if r["metric"] == "acc"]
    assert row["task"] == "apt_tiny_choice" and row["samples"] == len(QUESTIONS) and row["higher_is_better"]
    assert row["retained"] == pytest.approx(row["pruned"] / row["dense"]) if row["dense"] else row["retained"] is None
    # lm-eval loading each folder by path itself gives the same scores
    manager = lm_eval.tasks.TaskManager(include_path=str(tasks))
    for side, folder in (("dense", src), ("pruned", tmp_path / "pruned")):
        direct = lm_eval.simple_evaluate(
            model="hf",
            model_args=f"pretrained={folder},dtype=float32",
            tasks=["apt_tiny_choice"],
            task_manager=manager,
            device="cpu",
        )
        assert direct["results"]["apt_tiny_choice"]["acc,none"] == pytest.approx(row[side], abs=1e-12)
    assert main(["eval", str(tmp_path / "pruned"), "--tasks", "apt_tiny_choice", "--include-path", str(tasks)]) == 0
    table = capsys.readouterr().out
    assert "apt_tiny_choice" in table and "retained" in table


def test_unknown_tasks_and_misplaced_options_are_refused(tmp_path, capsys):
    src = save_tiny_model("llama", tmp_path / "src")
    prune_model(
        PruneJob(
            model=str(src), out=str(tmp_path / "pruned"), num_calibration_samples=2, max_seq_length=16, evaluate=False
        )
    )
    assert main(["eval", str(tmp_path / "pruned"), "--tasks", "no_such_task_anywhere"]) == 2
    assert "lm-eval knows no task ['no_such_task_anywhere']" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "pruned"), "--limit", "3"]) == 2
    assert "--limit applies to --tasks only" in capsys.readouterr().err
    tasks = write_local_task(tmp_path / "tasks")  # a BERT tokenizer has no bos/eos: said before lm-eval fails on it
    assert main(["eval", str(tmp_path / "pruned"), "--tasks", "apt_tiny_choice", "--include-path", str(tasks)]) == 2
    assert "neither a bos nor an eos token" in capsys.readouterr().err
