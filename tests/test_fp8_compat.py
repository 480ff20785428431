"""Our FP8 folders in their real consumers: transformers 5 in the environment ``make install`` builds (``.venv``:
the newest transformers 5 with compressed-tensors >= 0.15, the ``fp8`` extra), transformers 5.19 with
compressed-tensors 0.17 (``.venv-vllm``) and transformers 4.57 with compressed-tensors 0.14 (``.venv-tf457``)
load them through compressed-tensors and compute exactly the logits of our own FP8 emulation; our
``quantization_config`` is what compressed-tensors' own ``FP8_DYNAMIC`` preset dumps."""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from packaging.version import Version

from apt.folder.fp8 import quantization_config
from apt.measure.fp8 import fp8_activations, load_fp8_emulated
from apt.run import PruneJob, prune_model
from apt.run.quantize import quantize_folder

from .apt.tiny_models import save_tiny_model

REPO = Path(__file__).resolve().parents[1]
ENVIRONMENTS = {
    "transformers 5 (make install)": REPO / ".venv",
    "transformers 5.19 (vLLM's)": REPO / ".venv-vllm",
    "transformers 4.57": REPO / ".venv-tf457",
}
IDS = [101, 2054, 2003, 1996, 3437, 2000, 2166, 1010, 1996, 4483, 1998, 2673, 102]

LOAD = """
import json, sys, torch, transformers
folder, ids = sys.argv[1], json.loads(sys.argv[2])
model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
down = model.model.layers[0].mlp.down_proj
weight, scale = str(down.weight.dtype), list(down.weight_scale.shape)
with torch.no_grad():
    logits = model(torch.tensor([ids])).logits[0]
import compressed_tensors
print(json.dumps({"transformers": transformers.__version__, "logits": logits.tolist(), "weight": weight,
                  "scale": scale, "compressed_tensors": compressed_tensors.__version__}))
"""

PRESET = """
import json
from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme
config = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme("FP8_DYNAMIC", ["Linear"])},
                            ignore=["lm_head"], format="float-quantized", quantization_status="compressed")
print(json.dumps(config.model_dump(mode="json")))
"""


def run_in(env: Path, code: str, *args: str) -> dict:
    python = env / "bin" / "python"
    if not python.is_file():
        pytest.skip(f"{env.name} is missing: make install builds it")
    run = subprocess.run(
        [str(python), "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def fp8_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8compat")
    src = save_tiny_model("llama", root / "src")
    prune_model(PruneJob(model=str(src), out=str(root / "pruned"), num_calibration_samples=4, max_seq_length=32))
    quantize_folder(root / "pruned", root / "fp8")
    return root / "fp8"


@pytest.mark.parametrize("label", list(ENVIRONMENTS))
def test_transformers_loads_the_folder_with_the_logits_of_our_emulation(fp8_folder, label):
    theirs = run_in(ENVIRONMENTS[label], LOAD, str(fp8_folder), json.dumps(IDS))
    assert theirs["weight"] == "torch.float8_e4m3fn" and theirs["scale"] == [64, 1]  # loaded quantized
    if label.endswith("(make install)"):  # our own environment, as make install builds it
        assert Version(theirs["transformers"]).major == 5
        assert Version(theirs["compressed_tensors"]) >= Version("0.15")
    model, modules = load_fp8_emulated(fp8_folder)
    with torch.no_grad(), fp8_activations(model, modules):
        ours = model(torch.tensor([IDS])).logits[0]
    with torch.no_grad():
        unquantized_inputs = model(torch.tensor([IDS])).logits[0]
    logits = torch.tensor(theirs["logits"])
    torch.testing.assert_close(logits, ours, rtol=0, atol=0)  # exactly: the same float32 operations
    assert float((logits - unquantized_inputs).abs().max()) > 1e-3  # they quantize the inputs too


@pytest.mark.parametrize("label", [label for label in ENVIRONMENTS if label.startswith("transformers 5")])
def test_our_config_is_compressed_tensors_own_fp8_dynamic_preset(label):
    preset = run_in(ENVIRONMENTS[label], PRESET)
    ours = quantization_config(["lm_head"])
    for key in ("quant_method", "format", "quantization_status", "ignore", "kv_cache_scheme"):
        assert ours[key] == preset[key], key
    group, theirs = ours["config_groups"]["group_0"], preset["config_groups"]["group_0"]
    assert group["targets"] == theirs["targets"] and group["output_activations"] == theirs["output_activations"]
    for part in ("weights", "input_activations"):
        # every key both write has compressed-tensors' value (the observer's name aside: 0.17 renamed minmax to
        # memoryless_minmax, 0.14 knows only minmax; it is not read when loading)
        shared = set(group[part]) & set(theirs[part]) - {"observer"}
        assert {k: group[part][k] for k in shared} == {k: theirs[part][k] for k in shared}, part
        # 0.20 leaves out the keys at their defaults, which 0.14 needs and 0.20 still reads (the folder loads
        # in every environment above): we write them empty
        left_out = set(group[part]) - set(theirs[part])
        assert left_out <= {"observer", "block_structure", "actorder", "observer_kwargs"}, part
        assert all(group[part][k] in (None, {}) for k in left_out - {"observer"}), part
        assert {"num_bits", "type", "symmetric", "strategy", "dynamic"} <= shared, part
