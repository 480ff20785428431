import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from apt.errors import InvalidInputError
from apt.models import load_model
from apt.patterns import Pattern, is_nm_sparse
from apt.run import PruneJob, prune_model
from apt.solver import select_mask
from apt_sparse.cli import main
from exporters import export
from exporters.compressed_tensors import compress_24, decompress_24, pack_bitmask, read_bitmask_folder, unpack_bitmask

from ..apt.tiny_models import save_tiny_model


@pytest.fixture(scope="module")
def pruned_llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("pruned")
    src = save_tiny_model("llama", root / "src")
    prune_model(
        PruneJob(model=str(src), out=str(root / "pruned"), num_calibration_samples=4, max_seq_length=32, evaluate=False)
    )
    return root / "pruned"


def test_bitmask_packing_is_little_endian():
    mask = torch.tensor([[1, 0, 1, 0, 0, 1, 1, 0, 1, 1, 0, 0]], dtype=torch.bool)
    packed = pack_bitmask(mask)
    # columns 0, 2, 5, 6 → 1 + 4 + 32 + 64 = 101; columns 8, 9 → 1 + 2 = 3
    assert packed.dtype == torch.uint8 and packed.tolist() == [[101, 3]]
    assert torch.equal(unpack_bitmask(packed, 12), mask)


def test_bitmask_round_trip_is_bit_exact_on_real_weights():
    model, _, _ = load_model("smollm2-135m")
    layer = model.model.layers[5]
    for linear in (layer.self_attn.q_proj, layer.mlp.down_proj):
        weight = linear.weight.data.to(torch.float16)
        weight = weight * select_mask(weight.abs().float(), Pattern(2, 4))
        weight = torch.where(weight == 0, torch.zeros((), dtype=weight.dtype), weight)
        packed = compress_24(weight)
        rows, cols = weight.shape
        assert packed["compressed"].shape == (rows, cols // 2)
        assert packed["bitmask"].shape == (rows, (cols + 7) // 8) and packed["bitmask"].dtype == torch.uint8
        assert packed["shape"].tolist() == [rows, cols] and packed["shape"].dtype == torch.int64
        back = decompress_24(**packed)
        assert torch.equal(back.view(torch.int16), weight.view(torch.int16))


def test_compressed_tensors_export(pruned_llama, tmp_path):
    out = tmp_path / "ct"
    manifest = export("compressed-tensors", pruned_llama, out)
    assert manifest["validation"]["round_trip_bit_exact"] is True
    assert manifest["pattern_check"]["all_valid"] and len(manifest["pattern_check"]["layers"]) == 14
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    sparsity = config["sparsity_config"]
    assert sparsity["format"] == "sparse-24-bitmask" and sparsity["sparsity_structure"] == "2:4"
    assert len(sparsity["targets"]) == 14 and "lm_head" in sparsity["ignore"]
    assert sparsity["global_sparsity"] >= 0.5
    stored = load_file(str(out / "model.safetensors"))
    assert "model.layers.0.mlp.up_proj.weight.bitmask" in stored
    assert "model.layers.0.mlp.up_proj.weight" not in stored
    assert manifest["size"]["bytes_on_disk"] < manifest["size"]["dense_bytes_same_dtype"] + 10_000
    source = load_file(str(pruned_llama / "model.safetensors"))
    decoded = read_bitmask_folder(out)
    for name, tensor in source.items():
        assert torch.equal(decoded[name], tensor.to(torch.float16)), name
    listed = {f["path"] for f in manifest["files"]}
    assert "model.safetensors" in listed and "config.json" in listed


def test_vllm_export_is_plain_and_loads(pruned_llama, tmp_path):
    out = tmp_path / "vllm"
    manifest = export("vllm", pruned_llama, out, dtype="float16")
    config = json.loads((out / "config.json").read_text())
    assert "sparsity_config" not in json.dumps(config) and config["torch_dtype"] == "float16"
    assert manifest["validation"]["vllm_loaded"].startswith("not measured")
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    reference = transformers.AutoModelForCausalLM.from_pretrained(pruned_llama).eval()
    for name, module in model.model.layers.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert is_nm_sparse(module.weight.data), name
            assert not torch.signbit(module.weight.data[module.weight.data == 0]).any()
    ids = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=2e-2, rtol=0)


def test_non_24_weight_is_refused_with_its_name(pruned_llama, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in pruned_llama.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(broken / "model.safetensors"))
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.ones_like(
        tensors["model.layers.1.self_attn.k_proj.weight"]
    )
    save_file(tensors, str(broken / "model.safetensors"))
    for target in ("vllm", "compressed-tensors"):
        with pytest.raises(InvalidInputError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight .* not 2:4"):
            export(target, broken, tmp_path / target)
        assert not (tmp_path / target).exists()


def test_interrupted_export_leaves_no_complete_looking_folder(pruned_llama, tmp_path, monkeypatch, capsys):
    import exporters.compressed_tensors as ct

    def interrupted(_folder):  # the files are written; Ctrl-C arrives during validation
        raise KeyboardInterrupt

    monkeypatch.setattr(ct, "read_bitmask_folder", interrupted)
    code = main(["export", "compressed-tensors", str(pruned_llama), str(tmp_path / "ct")])
    assert code == 130 and "nothing was written" in capsys.readouterr().err
    assert not (tmp_path / "ct").exists() and not list(tmp_path.glob(".ct.*"))
