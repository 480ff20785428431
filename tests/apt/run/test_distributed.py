"""Pruning on two processes (gloo on CPU, launched by torchrun) against one process.

Whole-model masks are not compared bit for bit: a sum of partial Hessians differs from one sequential
sum in the last bits, masks flip where two candidates tie to float precision, and sequential
calibration carries that from block to block. One layer on identical inputs is compared tightly;
whole runs by their per-layer losses and accuracy, with the mask agreement measured.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import transformers

from apt.folder.report import REPORT_NAME
from apt.models.checkpoint import CheckpointReader
from apt.run import PruneJob, RunConfig, partial_folder, prune_model
from apt.solver import PruneConfig, prune_layer
from apt.solver.patterns import is_nm_sparse

from ..tiny_models import save_images, save_tiny_model, save_tiny_vlm_with_processor

REPO = Path(__file__).resolve().parents[3]
ENV = os.environ | {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_layer_on_two_ranks(rank: int, port: int, folder: str) -> None:
    """Each rank sums the Hessian of half the tokens; the all-reduced H and the row-split solve are saved."""
    import torch.distributed as dist

    from apt.collective import TorchCollective
    from apt.run import RunConfig
    from apt.run.sequential import _solve_rows

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    coll = TorchCollective("cpu", timeout_s=60)
    data = torch.load(Path(folder) / "layer.pt")
    X, W = data["X"], data["W"]
    half = X[:, rank::2]
    H = coll.sum_(half @ half.T)
    pruned, summary = _solve_rows("layer", W, H, RunConfig(), coll, consume=False)
    torch.save({"H": H, "W": pruned, "relative_loss": summary["relative_loss"]}, Path(folder) / f"rank{rank}.pt")
    coll.close()


def test_reduced_hessian_and_row_split_solve_equal_one_process(tmp_path):
    g = torch.Generator().manual_seed(0)
    mix = torch.eye(64) + 0.3 * torch.randn(64, 64, generator=g)
    X, W = mix @ torch.randn(64, 400, generator=g), torch.randn(24, 64, generator=g)
    torch.save({"X": X, "W": W}, tmp_path / "layer.pt")
    mp.spawn(one_layer_on_two_ranks, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got["H"], X @ X.T, rtol=1e-5, atol=1e-3)  # float sums in another order
        # on that Hessian, each rank's half of the rows with the other's gathered is the one-process solve
        # (the default ADMM search included: each row settles on its own)
        single = prune_layer(W, got["H"], config=PruneConfig())
        assert single.stats.mask_search_rows > 0
        assert is_nm_sparse(got["W"])
        assert torch.equal(got["W"] != 0, single.weight != 0)  # the same masks
        torch.testing.assert_close(got["W"], single.weight, rtol=1e-4, atol=1e-5)
        assert got["relative_loss"] == pytest.approx(single.relative_loss, rel=1e-4)


def torchrun(*args: str, script: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    target = [str(script)] if script else ["-m", "apt_sparse"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *target, *args]
    return subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


FAST = ["--num-calibration-samples", "8", "--max-seq-length", "32", "--batch-size", "2", "--num-eval-windows", "4"]


def one_rank(src: Path, out: Path, vision: bool = False, **job) -> dict:
    """The FAST run without the ADMM search in this one process: what two ranks are compared to."""
    run = RunConfig(batch_size=2, vision=vision, solver=PruneConfig(mask_search="off"))
    config = dict(num_calibration_samples=8, max_seq_length=32, num_eval_windows=4)
    return prune_model(PruneJob(model=str(src), out=str(out), run=run, **config, **job))


def test_two_ranks_prune_a_vision_language_model_with_its_vision_part_as_one_does(tmp_path):
    # --prune-vision under torchrun: each rank calibrates the vision blocks, the projector and the language model on
    # its share of the image+text samples; the Hessians are summed, rank 0 writes, and the ranks read the pruned
    # vision part back through the broadcast reader before the language model
    src = save_tiny_vlm_with_processor("llava", tmp_path / "src")
    images = save_images(tmp_path / "images", 2)
    vision = ["--prune-vision", "--calibration-images", str(images), "--mask-search", "off"]
    run = torchrun("prune", "--model", str(src), "--out", str(tmp_path / "two"), *FAST, *vision)
    assert run.returncode == 0, run.stderr[-3000:]
    one = one_rank(src, tmp_path / "one", calibration_images=str(images), vision=True)
    two = json.loads((tmp_path / "two" / REPORT_NAME).read_text())
    assert [r["calibration_batches"] for r in two["distributed"]["ranks"]] == [4, 4]  # 8 samples, one per batch
    assert two["vision"] == one["vision"] and two["totals"]["all_nm_valid"]
    assert [r["name"] for r in two["layers"]] == [r["name"] for r in one["layers"]]
    vision_layers = [r for r in one["layers"] if not r["name"].startswith("model.language_model.")]
    assert len(vision_layers) == 14  # 2 CLIP blocks × 6, the projector's 2
    for a, b in zip(one["layers"], two["layers"]):  # the ranks' summation order moves a few masks, as above
        assert b["relative_loss"] == pytest.approx(a["relative_loss"], rel=5e-2), a["name"]
    model = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "two")
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert all(is_nm_sparse(model.get_parameter(f"{r['name']}.weight").data) for r in vision_layers)


@pytest.mark.parametrize("family", ["llama", "deepseek_v3"])  # DeepSeek-V3: one dense block, then MoE blocks
def test_two_ranks_prune_a_tiny_model_as_one_does(tmp_path, family):
    # the sweep's masks: the ADMM search's thresholds turn the ranks' float summation order into more mask
    # flips (measured 94.5 % of groups agree), which would hide what this test looks for; the row split
    # with the search is checked exactly above
    src = save_tiny_model(family, tmp_path / "src", num_hidden_layers=3)
    run = torchrun("prune", "--model", str(src), "--out", str(tmp_path / "two"), *FAST, "--mask-search", "off")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 ranks (gloo)" in run.stdout and run.stdout.count("all N:M valid: True") == 1  # rank 0 prints
    one = one_rank(src, tmp_path / "one")
    two = json.loads((tmp_path / "two" / REPORT_NAME).read_text())
    assert two["distributed"]["world_size"] == 2 and [r["rank"] for r in two["distributed"]["ranks"]] == [0, 1]
    assert all(r["calibration_batches"] == 2 and r["seconds"] > 0 for r in two["distributed"]["ranks"])
    assert two["totals"]["all_nm_valid"]
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "two")
    assert all(is_nm_sparse(m.weight.data) for n, m in model.named_modules() if n.endswith("proj"))
    assert len(one["layers"]) == len(two["layers"])
    for a, b in zip(one["layers"], two["layers"]):
        # block 0 sees the same inputs on both; later blocks inherit the first mask flips (measured ≤ 2.4 %)
        tolerance = 5e-3 if ".layers.0." in a["name"] else 5e-2
        assert a["name"] == b["name"] and b["relative_loss"] == pytest.approx(a["relative_loss"], rel=tolerance)
    for report in (one, two):  # the ranks' routed tokens add up to every token's top-k choices, per MoE block
        routed: dict[str, int] = {}
        for r in report["layers"]:
            if r.get("expert") is not None and "gate_up_proj" in r["name"]:
                block = r["name"].split(".mlp.")[0]
                routed[block] = routed.get(block, 0) + r["tokens"]
        assert all(n == 8 * 32 * 2 for n in routed.values()) and (family == "llama") == (not routed)
    # dense: the same weights, only the evaluation's summation order differs; pruned: the mask flips above carry
    # into the perplexity (DeepSeek-V3's routed experts: 1.2e-3 measured on an AVX512/AMX CPU, under 1e-3 on AVX2)
    for key, tolerance in (("dense", 1e-3), ("pruned", 5e-3)):
        assert two["accuracy"][key]["perplexity"] == pytest.approx(one["accuracy"][key]["perplexity"], rel=tolerance)
    readers = CheckpointReader(tmp_path / "one"), CheckpointReader(tmp_path / "two")
    agree = total = 0
    for record in one["layers"]:
        masks = [(r.read(record["tensor"]) != 0).reshape(-1, 4) for r in readers]
        agree += int((masks[0] == masks[1]).all(dim=1).sum())
        total += masks[0].shape[0]
    assert agree / total > 0.95, agree / total  # float summation order alone: measured, not bit-equal


KILL_RANK_1 = """
import os, signal, sys
import apt.run.sequential as sequential
real = sequential.prune_group
def prune_group(group, hessian, layered, config, bar, index, *rest):
    if index == 2 and os.environ["RANK"] == "1":  # rank 1 dies (SIGKILL) in block 2
        os.kill(os.getpid(), signal.SIGKILL)
    return real(group, hessian, layered, config, bar, index, *rest)
sequential.prune_group = prune_group
from apt_sparse.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_rank_that_dies_ends_the_job_and_resume_continues_it(tmp_path):
    src = save_tiny_model("llama", tmp_path / "src", num_hidden_layers=4)
    args = ["--model", str(src), *FAST]
    whole = torchrun("prune", *args, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    killer = tmp_path / "kill_rank_1.py"
    killer.write_text(KILL_RANK_1)
    out = tmp_path / "out"
    died = torchrun("prune", *args, "--out", str(out), script=killer, timeout=240)
    assert died.returncode != 0 and not out.exists()
    assert "exitcode  : -9" in died.stderr or "Signals.SIGKILL" in died.stderr, died.stderr[-2000:]
    assert json.loads((partial_folder(out) / "resume.json").read_text())["blocks_done"] == 2
    resumed = torchrun("prune", *args, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for name in sorted(p.name for p in (tmp_path / "whole").iterdir()):
        if name not in (REPORT_NAME, "README.md"):
            assert (tmp_path / "whole" / name).read_bytes() == (out / name).read_bytes(), name
    card = (tmp_path / "whole" / "README.md").read_text().replace(str(tmp_path / "whole"), str(out))
    assert card == (out / "README.md").read_text()  # the same card, with its own --out
    assert json.loads((out / REPORT_NAME).read_text())["checkpoint"]["resumed_at_block"] == 2


OTHER_OPTIONS_ON_RANK_1 = """
import os, sys
from apt_sparse.cli import main
argv = sys.argv[1:] + (["--method", "sparsegpt"] if os.environ["RANK"] == "1" else [])
sys.exit(main(argv))
"""


def test_ranks_launched_with_other_options_are_refused_at_start(tmp_path):
    src = save_tiny_model("llama", tmp_path / "src")
    script = tmp_path / "other_options.py"
    script.write_text(OTHER_OPTIONS_ON_RANK_1)
    run = torchrun("prune", "--model", str(src), "--out", str(tmp_path / "out"), *FAST, script=script)
    assert run.returncode != 0
    assert "rank 1 runs other options than rank 0 (run)" in run.stderr
    assert not (tmp_path / "out").exists() and not partial_folder(tmp_path / "out").exists()
