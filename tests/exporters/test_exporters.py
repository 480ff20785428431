import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import exporters.compressed_tensors as ct
from apt.errors import InvalidInputError
from apt.models.checkpoint import CheckpointReader
from apt.models.loading import resolve_model
from apt.run import PruneJob, RunConfig, prune_model
from apt.solver import PruneConfig
from apt.solver.patterns import is_nm_sparse
from apt_sparse.cli import main
from exporters import export
from exporters.compressed_tensors import read_bitmask_folder
from serving.bitmask import pack_bitmask, unpack_bitmask

from ..apt.tiny_models import save_tiny_model

REPO = Path(__file__).resolve().parents[2]
LEGACY_COMPRESSED_TENSORS = REPO / ".venv" / "ct014"  # make install: compressed-tensors 0.14.0.1, isolated
FAST = dict(num_calibration_samples=4, max_seq_length=32, evaluate=False)


@pytest.fixture(scope="module")
def pruned_llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("pruned")
    src = save_tiny_model("llama", root / "src")
    prune_model(PruneJob(model=str(src), out=str(root / "pruned"), **FAST))
    return root / "pruned"


def test_bitmask_packing_is_little_endian():
    mask = torch.tensor([[1, 0, 1, 0, 0, 1, 1, 0, 1, 1, 0, 0]], dtype=torch.bool)
    packed = pack_bitmask(mask)
    # columns 0, 2, 5, 6 → 1 + 4 + 32 + 64 = 101; columns 8, 9 → 1 + 2 = 3
    assert packed.dtype == torch.uint8 and packed.tolist() == [[101, 3]]
    assert torch.equal(unpack_bitmask(packed, 12), mask)


def test_compressed_tensors_export_is_decoded_by_compressed_tensors_014(pruned_llama, tmp_path):
    out = tmp_path / "ct"
    manifest = export("compressed-tensors", pruned_llama, out, max_shard_size="400KB", vllm_check=False)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert set(config) == {"quant_method", "sparsity_config"}  # any other key makes the loader parse a quant config
    sparsity = config["sparsity_config"]
    assert sparsity["format"] == "sparse-24-bitmask" and sparsity["sparsity_structure"] == "2:4"
    assert len(sparsity["targets"]) == 14 and {"lm_head", "model.embed_tokens"} == set(sparsity["ignore"])
    assert len(list(out.glob("*.safetensors"))) > 1
    stored = CheckpointReader(out)
    assert "model.layers.0.mlp.up_proj.bitmask" in stored and "model.layers.0.mlp.up_proj.weight" not in stored
    assert stored.info("model.layers.0.mlp.up_proj.shape").shape == (2, 1)
    assert manifest["validation"]["round_trip_bit_exact"] == len(CheckpointReader(pruned_llama).names())
    assert manifest["size"]["bytes_on_disk"] < manifest["size"]["dense_bytes_same_dtype"]

    # the library's own loader (0.14, kept apart from transformers 5 where make install puts it) decoded every
    # tensor bit for bit, and where no zeros tie its own compressor writes the very bytes of the export
    assert LEGACY_COMPRESSED_TENSORS.is_dir(), "make install puts compressed-tensors 0.14.0.1 in .venv/ct014"
    loaded = manifest["validation"]["compressed_tensors_loader"]
    assert loaded["status"] == "ok" and "compressed-tensors 0.14.0.1" in loaded["loader"], loaded
    assert loaded["tensors_bit_exact"] == len(CheckpointReader(pruned_llama).names())
    assert loaded["compressed_as_the_library_does"] + loaded["with_ties"] == 14
    assert loaded["compressed_as_the_library_does"] >= 7

    # an export whose bitmask says otherwise than its values is caught by the library's decoding
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for f in out.iterdir():
        (damaged / f.name).write_bytes(f.read_bytes())
    key = "model.layers.0.mlp.up_proj.bitmask"
    shard = next(f for f in damaged.glob("*.safetensors") if key in load_file(str(f)))
    tensors = load_file(str(shard))
    group = int(tensors[key][0, 0]) & 0xF  # the first group of four's kept slots
    kept, free = [b for b in range(4) if group >> b & 1], [b for b in range(4) if not group >> b & 1]
    tensors[key][0, 0] ^= (1 << kept[0]) | (1 << free[0])  # one kept value moves to a pruned slot
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(InvalidInputError, match="loader .* rejects the export: .*decodes model.layers.0.mlp.up_proj"):
        ct.legacy_loader_check(damaged, CheckpointReader(pruned_llama), {}, "float16")


def test_formats_that_hold_2_4_only_refuse_4_8(tmp_path):
    src = save_tiny_model("llama", tmp_path / "src")
    run = RunConfig(solver=PruneConfig(pattern="4:8"))
    prune_model(PruneJob(model=str(src), out=str(tmp_path / "p48"), run=run, **FAST))
    for target, reason in (("compressed-tensors", "hold 2:4 only"), ("tensorrt", "take 2:4 weights only")):
        with pytest.raises(InvalidInputError, match=f"cannot hold pattern 4:8: .*{reason}"):
            export(target, tmp_path / "p48", tmp_path / target)
        assert not (tmp_path / target).exists()
    manifest = export("vllm", tmp_path / "p48", tmp_path / "vllm", vllm_check=False)  # plain weights hold any pattern
    assert not (tmp_path / "vllm" / "apt_sparse_24.json").exists()  # the plugin serves 2:4 only
    assert manifest["pattern_check"]["pattern"] == "4:8" and manifest["pattern_check"]["all_valid"]


def test_a_folder_without_pruned_weights_is_refused(tmp_path):
    src = save_tiny_model("mamba", tmp_path / "src")
    # only dt_proj, whose width is not a multiple of 4: every selected layer is skipped, none pruned
    run = RunConfig(targets=r"dt_proj")
    prune_model(PruneJob(model=str(src), out=str(tmp_path / "none"), run=run, **FAST))
    with pytest.raises(InvalidInputError, match="has no pruned weights"):
        export("vllm", tmp_path / "none", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_a_dense_encoder_without_report_is_refused_naming_a_layer(tmp_path):
    minilm = Path(resolve_model("minilm-l6").location)
    with pytest.raises(InvalidInputError, match=r"encoder\.layer\.0\.attention\.self\.query\.weight .* is not 2:4"):
        export("vllm", minilm, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_vllm_export_is_plain_and_loads(pruned_llama, tmp_path):
    out = tmp_path / "vllm"
    manifest = export("vllm", pruned_llama, out, dtype="float16", max_shard_size="300KB", vllm_check=False)
    config = json.loads((out / "config.json").read_text())
    assert "sparsity_config" not in json.dumps(config) and config["torch_dtype"] == "float16"
    assert "quantization_config" not in config  # transformers and vLLM without the plugin load it as they are
    assert manifest["validation"]["vllm_loaded"] == "not measured: not asked (vllm_check off)"
    side = json.loads((out / "apt_sparse_24.json").read_text())  # what the plugin reads when asked to serve it
    assert side["pattern"] == "2:4" and len(side["targets"]) == 14
    assert set(side["targets"]) == {r["name"].removesuffix(".weight") for r in manifest["pattern_check"]["layers"]}
    assert (out / "model.safetensors.index.json").is_file()
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    reference = transformers.AutoModelForCausalLM.from_pretrained(pruned_llama).eval()
    for name, module in model.model.layers.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert is_nm_sparse(module.weight.data), name
            assert not torch.signbit(module.weight.data[module.weight.data == 0]).any()
    ids = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=2e-2, rtol=0)


def test_non_2_4_weight_is_refused_with_its_name(pruned_llama, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in pruned_llama.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(broken / "model.safetensors"))
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.ones_like(
        tensors["model.layers.1.self_attn.k_proj.weight"]
    )
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    for target in ("vllm", "compressed-tensors"):
        with pytest.raises(InvalidInputError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight .* is not 2:4"):
            export(target, broken, tmp_path / target)
        assert not (tmp_path / target).exists()


def test_interrupted_export_leaves_no_complete_looking_folder(pruned_llama, tmp_path, monkeypatch, capsys):
    def interrupted(*_args):  # the files are written; Ctrl-C arrives during validation
        raise KeyboardInterrupt

    monkeypatch.setattr(ct, "legacy_loader_check", interrupted)
    code = main(["export", "compressed-tensors", str(pruned_llama), str(tmp_path / "ct"), "--no-vllm-check"])
    assert code == 130 and "nothing was written" in capsys.readouterr().err
    assert not (tmp_path / "ct").exists() and not list(tmp_path.glob(".ct.*"))


def test_our_decoder_reads_the_bitmask_folder_back(pruned_llama, tmp_path):
    export("compressed-tensors", pruned_llama, tmp_path / "ct", dtype="bfloat16", vllm_check=False)
    decoded = dict(read_bitmask_folder(tmp_path / "ct"))
    source = CheckpointReader(pruned_llama)
    assert decoded.keys() == set(source.names())
    assert all(torch.equal(decoded[n], source.read(n).to(torch.bfloat16)) for n in source.names())


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_moe_folders_export_for_vllm_with_every_expert_checked_and_other_formats_refuse(tmp_path, family):
    # qwen3_moe keeps its experts per expert on disk, gpt_oss fused and transposed [E, in, out]
    src = save_tiny_model(family, tmp_path / "src")
    prune_model(PruneJob(model=str(src), out=str(tmp_path / "pruned"), **FAST))
    manifest = export("vllm", tmp_path / "pruned", tmp_path / "vllm", dtype="float16", vllm_check=False)
    checked = manifest["pattern_check"]["layers"]
    experts = [r for r in checked if "experts" in r["name"]]
    assert manifest["pattern_check"]["all_valid"] and experts
    if family == "gpt_oss":
        assert {r["in_axis"] for r in experts} == {-2} and all(len(r["shape"]) == 3 for r in experts)
    else:
        assert len(experts) == 3 * 4 and all(len(r["shape"]) == 2 for r in experts)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "vllm", dtype=torch.float32)
    assert reloaded.config.model_type == family
    for target, reason in (("compressed-tensors", "cannot hold pruned MoE experts"), ("onnx", "mixture-of-experts")):
        with pytest.raises(InvalidInputError, match=reason):
            export(target, tmp_path / "pruned", tmp_path / target)
        assert not (tmp_path / target).exists() and not list(tmp_path.glob(f".{target}*"))
    # an expert tensor broken off the pattern is named, like a Linear's
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in (tmp_path / "pruned").iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(broken / "model.safetensors"))
    name = experts[0]["name"]
    tensors[name] = torch.ones_like(tensors[name])
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(InvalidInputError, match=f"{name.replace('.', '[.]')} .* is not 2:4"):
        export("vllm", broken, tmp_path / "v2")


def test_gpt2_conv1d_exports_for_vllm_in_its_own_layout_and_compressed_tensors_refuses(tmp_path):
    # transformers' Conv1D stores [in, out]: 2:4 runs along axis 0 of the stored tensor (K)
    src = save_tiny_model("gpt2", tmp_path / "src")
    prune_model(PruneJob(model=str(src), out=str(tmp_path / "pruned"), **FAST))
    manifest = export("vllm", tmp_path / "pruned", tmp_path / "vllm", dtype="float16", vllm_check=False)
    checked = manifest["pattern_check"]
    assert checked["all_valid"] and len(checked["layers"]) == 8 and {r["in_axis"] for r in checked["layers"]} == {-2}
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "vllm", dtype=torch.float32)
    assert type(reloaded).__name__ == "GPT2LMHeadModel"
    with pytest.raises(InvalidInputError, match="Conv1D"):
        export("compressed-tensors", tmp_path / "pruned", tmp_path / "ct", vllm_check=False)
    assert not (tmp_path / "ct").exists()
