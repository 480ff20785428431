"""Every folder we write reads the same in transformers 4.57 as in transformers 5, and Optimum's ONNX Runtime
decoder runs our ONNX graph with past keys/values. Transformers 4.57 lives in an environment of its own
(``make install`` builds ``.venv-tf457``: it needs huggingface-hub < 1.0 and its own tokenizers), driven
here in a subprocess."""

import json
import subprocess
from pathlib import Path

import pytest
import torch
import transformers

from apt.run import PruneJob, prune_model
from exporters import export

from .apt.tiny_models import save_tiny_model

REPO = Path(__file__).resolve().parents[1]
COMPAT = REPO / ".venv-tf457" / "bin" / "python"
IDS = [1, 422, 1450, 28, 264, 3056, 1329, 30, 4210, 16, 1018, 77, 5, 940, 33, 2048]

RUN = """
import json, sys, torch, transformers
folder, ids = sys.argv[1], json.loads(sys.argv[2])
tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
model = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
with torch.no_grad():
    logits = model(torch.tensor([ids])).logits[0]
    generated = model.generate(torch.tensor([ids[:6]]), max_new_tokens=10, do_sample=False, pad_token_id=0)
print(json.dumps({"transformers": transformers.__version__, "logits": logits.tolist(),
                  "tokens": tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"],
                  "generated": generated[0].tolist()}))
"""


def in_transformers_457(code: str, *args: str) -> dict:
    assert COMPAT.is_file(), "make install builds .venv-tf457 (transformers 4.57) for this test"
    run = subprocess.run(
        [str(COMPAT), "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def here(folder: Path) -> dict:
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([IDS])).logits[0]
        generated = model.generate(torch.tensor([IDS[:6]]), max_new_tokens=10, do_sample=False, pad_token_id=0)
    return {
        "logits": logits,
        "tokens": tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"],
        "generated": generated[0].tolist(),
    }


def same_model(folder: Path) -> None:
    old, new = in_transformers_457(RUN, str(folder), json.dumps(IDS)), here(folder)
    assert old["transformers"].startswith("4.57")
    assert old["tokens"] == new["tokens"]
    torch.testing.assert_close(torch.tensor(old["logits"]), new["logits"], rtol=0, atol=1e-4)
    assert old["generated"] == new["generated"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["pruned", "vllm"])
def test_smollm2_folders_read_the_same_in_transformers_457(smollm2_demo, kind):
    out, _ = smollm2_demo
    folder = out / "pruned" / "apt" if kind == "pruned" else out / "export" / "vllm"
    config = json.loads((folder / "config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 100000.0  # 4.57 reads the first
    same_model(folder)


CT_RUN = RUN.replace(
    "import json, sys, torch, transformers",
    "import json, sys, torch, transformers\nimport compressed_tensors  # transformers 4.57 decompresses through it",
)


@pytest.mark.slow
def test_smollm2_bitmask_folder_reads_as_the_pruned_model_in_transformers_457(smollm2_demo):
    out, _ = smollm2_demo
    old = in_transformers_457(CT_RUN, str(out / "export" / "compressed-tensors"), json.dumps(IDS))
    plain = in_transformers_457(RUN, str(out / "export" / "vllm"), json.dumps(IDS))  # the same fp16 weights, plain
    torch.testing.assert_close(torch.tensor(old["logits"]), torch.tensor(plain["logits"]), rtol=0, atol=1e-4)
    assert old["generated"] == plain["generated"]


OPTIMUM = """
import json, sys, torch
from optimum.onnxruntime import ORTModelForCausalLM
folder, ids = sys.argv[1], json.loads(sys.argv[2])
model = ORTModelForCausalLM.from_pretrained(folder, use_cache=True, use_io_binding=False)
out = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, pad_token_id=0)
print(json.dumps({"generated": out[0].tolist()}))
"""


def test_optimum_runs_our_onnx_decoder_and_generates_what_transformers_5_generates(tmp_path):
    src = save_tiny_model("llama", tmp_path / "src", rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
    prune_model(
        PruneJob(
            model=str(src), out=str(tmp_path / "pruned"), num_calibration_samples=4, max_seq_length=32, evaluate=False
        )
    )
    export("onnx", tmp_path / "pruned", tmp_path / "onnx", with_past=True)
    ours = here(tmp_path / "pruned")
    optimum = in_transformers_457(OPTIMUM, str(tmp_path / "onnx"), json.dumps(IDS[:6]))
    assert optimum["generated"] == ours["generated"]
    same_model(tmp_path / "pruned")  # a tiny llama with rope_theta 100000, saved by transformers 5
