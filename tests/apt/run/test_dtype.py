import json

import pytest
import torch

import apt.run.dtype
import apt.run.sequential
from apt.folder.report import REPORT_NAME
from apt.run import JobInterrupted, PruneJob, partial_folder, prune_model
from apt.run.dtype import DeviceFacts, auto_compute_dtype, compute_dtype
from apt.run.state import RESUME_NAME, CannotResume

from ..tiny_models import save_tiny_model

AVX2 = DeviceFacts("cpu", cpu_capability="AVX2")
AVX512 = DeviceFacts("cpu", cpu_capability="AVX512")  # AVX-512 without its bfloat16 extension (Skylake-SP)
AVX512_BF16 = DeviceFacts("cpu", cpu_capability="AVX512", avx512_bf16=True)  # Cooper Lake, Zen 4
AMX = DeviceFacts("cpu", cpu_capability="AVX512", avx512_bf16=True, amx=True)  # Sapphire Rapids
T4 = DeviceFacts("cuda", cuda_capability=(7, 5))
A100 = DeviceFacts("cuda", cuda_capability=(8, 0))
H100 = DeviceFacts("cuda", cuda_capability=(9, 0))

EMULATED = "bfloat16 checkpoint, but the CPU has neither AVX512-BF16 nor AMX (PyTorch's CPU capability: {}), where "
EMULATED += "bfloat16 matrix products are emulated"


@pytest.mark.parametrize(
    "stored, facts, dtype, reason",
    [
        (torch.bfloat16, AVX2, "float32", EMULATED.format("AVX2")),
        (torch.bfloat16, AVX512, "float32", EMULATED.format("AVX512")),
        (torch.bfloat16, DeviceFacts("cpu"), "float32", EMULATED.format("unknown")),
        (torch.bfloat16, AVX512_BF16, "bfloat16", "bfloat16 checkpoint on a CPU with AVX512-BF16"),
        (torch.bfloat16, AMX, "bfloat16", "bfloat16 checkpoint on a CPU with AVX512-BF16 and AMX"),
        (torch.bfloat16, DeviceFacts("cpu", amx=True), "bfloat16", "bfloat16 checkpoint on a CPU with AMX"),
        (torch.bfloat16, T4, "float32", "bfloat16 checkpoint, but the CUDA GPU's compute capability 7.5 is below 8.0"),
        (torch.bfloat16, A100, "bfloat16", "bfloat16 checkpoint on a CUDA GPU of compute capability 8.0 (8.0+)"),
        (torch.bfloat16, H100, "bfloat16", "bfloat16 checkpoint on a CUDA GPU of compute capability 9.0 (8.0+)"),
        # float16 activations can overflow; float32 checkpoints stay float32 wherever they run
        (torch.float16, H100, "float32", "the checkpoint is stored in float16"),
        (torch.float16, AMX, "float32", "the checkpoint is stored in float16"),
        (torch.float32, H100, "float32", "the checkpoint is stored in float32"),
        (torch.float32, AMX, "float32", "the checkpoint is stored in float32"),
    ],
)
def test_auto_computes_in_bfloat16_only_where_the_device_multiplies_it_natively(stored, facts, dtype, reason):
    assert auto_compute_dtype(stored, facts) == (dtype, reason)


@pytest.mark.parametrize("requested", ["float32", "float16", "bfloat16"])
def test_an_explicit_dtype_is_kept_on_any_device(requested):
    assert compute_dtype(requested, torch.bfloat16, "cpu") == (requested, f"--dtype {requested}")


def test_the_facts_of_this_cpu_are_what_torch_reports():
    facts = DeviceFacts.of("cpu")
    assert facts.kind == "cpu" and facts.cuda_capability is None
    assert facts.cpu_capability == torch.backends.cpu.get_cpu_capability()
    assert facts.avx512_bf16 == getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    assert facts.amx == getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()


FAST = dict(num_calibration_samples=4, max_seq_length=32, evaluate=False)


def pretend(monkeypatch, facts: DeviceFacts) -> None:
    """Make every device of this run report ``facts``."""
    monkeypatch.setattr(apt.run.dtype.DeviceFacts, "of", staticmethod(lambda device: facts))


def test_the_report_says_which_dtype_auto_chose_and_why(tmp_path, monkeypatch):
    src = save_tiny_model("llama", tmp_path / "bf16", poison=lambda model: model.to(torch.bfloat16))
    # this machine, whatever it has: the report follows the rule on its own facts
    report = prune_model(PruneJob(model=str(src), out=str(tmp_path / "here"), **FAST))
    here = auto_compute_dtype(torch.bfloat16, DeviceFacts.of("cpu"))
    assert (report["model"]["compute_dtype"], report["model"]["compute_dtype_reason"]) == here
    # a CPU without native bfloat16 (AVX2 only) computes the bf16 checkpoint in float32, and says why
    pretend(monkeypatch, AVX2)
    prune_model(PruneJob(model=str(src), out=str(tmp_path / "avx2"), **FAST))
    written = json.loads((tmp_path / "avx2" / REPORT_NAME).read_text())
    assert written["config"]["dtype"] == "auto"
    assert written["model"]["compute_dtype"] == "float32"
    assert written["model"]["compute_dtype_reason"] == EMULATED.format("AVX2")
    pretend(monkeypatch, AMX)
    report = prune_model(PruneJob(model=str(src), out=str(tmp_path / "amx"), **FAST))
    assert report["model"]["compute_dtype"] == "bfloat16"
    assert report["model"]["compute_dtype_reason"] == "bfloat16 checkpoint on a CPU with AVX512-BF16 and AMX"


def test_a_resume_where_auto_chooses_otherwise_is_refused_with_the_dtype_to_pass(tmp_path, monkeypatch):
    src = save_tiny_model("llama", tmp_path / "bf16", poison=lambda model: model.to(torch.bfloat16))
    out = tmp_path / "out"
    real, calls = apt.run.sequential.prune_layer, []

    def interrupt_in_block_1(*args, **kwargs):  # 7 layers a block: a Ctrl-C once block 0 is written
        calls.append(1)
        if len(calls) > 7:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(apt.run.sequential, "prune_layer", interrupt_in_block_1)
    pretend(monkeypatch, AMX)
    with pytest.raises(JobInterrupted):
        prune_model(PruneJob(model=str(src), out=str(out), **FAST))
    assert json.loads((partial_folder(out) / RESUME_NAME).read_text())["blocks_done"] == 1
    monkeypatch.setattr(apt.run.sequential, "prune_layer", real)
    # the same command on a CPU without native bfloat16 would finish the blocks in float32
    pretend(monkeypatch, AVX2)
    message = "(it computed in bfloat16, where --dtype auto chooses float32 on this machine: pass --dtype bfloat16)"
    with pytest.raises(CannotResume, match="started with other options \\(dtype\\)") as refused:
        prune_model(PruneJob(model=str(src), out=str(out), resume=True, **FAST))
    assert message in str(refused.value)
    report = prune_model(PruneJob(model=str(src), out=str(out), resume=True, dtype="bfloat16", **FAST))
    assert report["model"]["compute_dtype"] == "bfloat16" and report["checkpoint"]["resumed_at_block"] == 1
