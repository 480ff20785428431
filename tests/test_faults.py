"""The fault suite: each fault a user meets, injected for real, must end in one line with exit code 2 (143 for
SIGTERM), keep what ``--resume`` can continue from and remove what it cannot, and a resume afterwards
must give the bit-identical folder. File system faults run in a user and mount namespace of their own
(``tests/faults_driver.py``): small tmpfs mounts, read-only bind mounts, a folder of another owner, a
file size limit. Faults covered elsewhere are listed in the README's reliability table."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from apt.models.loading import resolve_model
from apt_sparse.cli import main

from .apt.tiny_models import save_tiny_model
from .faults_driver import FAST

REPO = Path(__file__).resolve().parents[1]


def namespaces_work() -> str | None:
    try:
        run = subprocess.run(
            ["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"unshare is not available: {err}"
    return None if run.returncode == 0 else f"user namespaces are not allowed here: {run.stderr.decode()[-200:]}"


WHY_NOT = namespaces_work()


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    if WHY_NOT:
        pytest.skip(WHY_NOT)
    root = tmp_path_factory.mktemp("faults")
    src = save_tiny_model("llama", root / "src", num_hidden_layers=4)
    assert main(["prune", "--model", str(src), "--out", str(root / "reference"), *FAST]) == 0
    arena = root / "arena"
    arena.mkdir()
    locked = arena / "locked"  # owned by another user, read and execute only: the namespace's root may not write
    locked.mkdir()
    os.chown(locked, 65534, 65534)
    locked.chmod(0o555)
    smollm2 = resolve_model("smollm2-135m")
    run = subprocess.run(
        [
            "unshare",
            "--user",
            "--map-root-user",
            "--mount",
            sys.executable,
            "-m",
            "tests.faults_driver",
            str(arena),
            str(src),
            str(root / "reference"),
            str(Path(smollm2.location) / smollm2.gguf_file),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
        env=os.environ | {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"},
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def one_line(record: dict, code: int = 2) -> str:
    assert record["code"] == code and record["lines"] == 1, record
    return record["stderr"][-1]


def test_disk_full_at_the_start_is_refused_before_any_work(faults):
    line = one_line(faults["disk full at start"])
    assert "not enough free space in" in line and "output shards" in line and "free" in line
    assert "nothing was written" in line and faults["disk full at start"]["left"] == []


def test_disk_full_in_the_middle_keeps_the_blocks_and_resume_is_bit_identical(faults):
    record = faults["disk full in the middle"]
    line = one_line(record)
    assert "could not write" in line and "no space left on the device" in line
    assert "2 of 4 blocks are saved" in line and "free space (or allow the write) and rerun with --resume" in line
    assert record["blocks_saved"] == 2 and ".out.partial/resume.json" in record["left"] and "out" not in record["left"]
    assert record["resume"]["code"] == 0 and record["resume_identical"]


def test_activations_that_would_not_fit_on_their_disk_are_refused(faults):
    line = one_line(faults["activation disk full"])
    assert "activations on disk" in line and "--activation-dir" in line and faults["activation disk full"]["left"] == []


def test_a_gguf_cache_too_small_for_the_dequantised_model_is_refused(faults):
    line = one_line(faults["gguf cache full"])
    assert (
        "the dequantised GGUF model" in line and "APT_SPARSE_CACHE" in line and faults["gguf cache full"]["left"] == []
    )


@pytest.mark.parametrize(
    "fault, why", [("read-only output", "the file system is read-only"), ("permission denied", "permission denied")]
)
def test_an_output_the_system_refuses_is_one_line_and_leaves_nothing(faults, fault, why):
    line = one_line(faults[fault])
    assert "could not write" in line and why in line and "nothing was written" in line
    assert faults[fault]["left"] == []


def test_a_file_size_limit_is_one_line(faults):
    line = one_line(faults["file size limit"])
    assert "the file would exceed the file size limit" in line and "nothing was written" in line
    assert not [n for n in faults["file size limit"]["left"] if n.startswith(("limited", ".limited"))]


def test_sigterm_says_what_it_leaves_exits_143_and_resume_is_bit_identical(faults):
    record = faults["SIGTERM"]
    line = one_line(record, 143)
    assert line.startswith("stopped by SIGTERM: asked to stop") and "2 of 4 blocks are saved" in line
    assert record["blocks_saved"] == 2 and record["resume"]["code"] == 0 and record["resume_identical"]


@pytest.mark.parametrize(
    "fault, why",
    [
        ("resume.json corrupted", "is damaged: not valid JSON"),
        ("resume.json of another version", "was written by another version of apt-sparse"),
        ("resume.json missing a field", "is damaged (missing or malformed: blocks_done)"),
        ("a shard of the partial run removed", "its shards are missing or altered"),
    ],
)
def test_a_damaged_resume_state_is_refused_with_the_way_out_and_left_alone(faults, fault, why):
    line = one_line(faults[fault])
    assert why in line and "pass --overwrite instead of --resume to start over" in line and "was left as it is" in line
    assert faults[fault]["unchanged"] and faults[fault]["overwrite"]["code"] == 0


@pytest.mark.parametrize(
    "fault, why",
    [
        ("export to a full disk", "not enough free space"),
        ("export to a read-only disk", "the file system is read-only"),
        ("export past the file size limit", "the file would exceed the file size limit"),
        ("bench to a read-only disk", "the file system is read-only"),
    ],
)
def test_exports_and_the_benchmark_fail_in_one_line_and_write_nothing(faults, fault, why):
    line = one_line(faults[fault])
    assert why in line and faults[fault]["left"] == []


@pytest.fixture
def pruned(tmp_path):
    src = save_tiny_model("llama", tmp_path / "src")
    assert main(["prune", "--model", str(src), "--out", str(tmp_path / "pruned"), *FAST]) == 0
    return tmp_path / "pruned"


@pytest.mark.parametrize(
    "damage, why",
    [
        (lambda p: p.write_text(p.read_text()[:100]), "is damaged: not valid JSON"),
        (lambda p: p.write_text(json.dumps({"schema": "apt-sparse/prune-report/1"})), "has schema"),
        (
            lambda p: p.write_text(json.dumps({"schema": "apt-sparse/prune-report/2", "model": {}})),
            "is damaged: it lacks",
        ),
    ],
    ids=["truncated", "another schema", "missing fields"],
)
def test_a_damaged_prune_report_is_named_by_every_command_that_reads_it(pruned, tmp_path, capsys, damage, why):
    damage(pruned / "prune_report.json")
    for argv in (
        ["inspect", str(pruned)],
        ["export", "vllm", str(pruned), str(tmp_path / "x"), "--no-vllm-check"],
        ["eval", str(pruned)],
        ["bench", str(pruned), "--out", str(tmp_path / "b")],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "prune_report.json" in err[0] and why in err[0], (argv, err)
    assert not (tmp_path / "x").exists() and not (tmp_path / "b").exists()


def test_a_damaged_config_is_one_line(tmp_path, capsys):
    src = save_tiny_model("llama", tmp_path / "src")
    (src / "config.json").write_text('{"model_type": "llama", ')
    capsys.readouterr()
    assert main(["prune", "--model", str(src), "--out", str(tmp_path / "out"), *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config.json" in err[0] and not (tmp_path / "out").exists()
    shutil.rmtree(tmp_path / "src")
