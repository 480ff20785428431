import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from apt.models.checkpoint import CheckpointError, CheckpointReader, PlannedTensor, ShardedWriter, parse_size
from apt.models.layered import LayeredModel
from apt_sparse.cli import main

from ..tiny_models import save_tiny_model


def random_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(8, 16, generator=g),
        "b.weight": torch.randn(16, 16, generator=g).to(torch.bfloat16),
        "c.bias": torch.randn(16, generator=g).to(torch.float16),
        "d.index": torch.arange(5, dtype=torch.int64),
        "e.scalar": torch.tensor(3.5),
        "f.mask": torch.tensor([[1, 0, 1]], dtype=torch.uint8),
    }


def test_sharded_writer_output_is_read_by_the_safetensors_library(tmp_path):
    tensors = random_tensors()
    plan = [PlannedTensor(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    # a and b hold 512 bytes each, the other four 79 together: shards {a}, {b}, {c, d, e, f}
    writer = ShardedWriter(tmp_path, plan, max_shard_size=520)
    writer.create()
    for name in reversed(list(tensors)):  # any order: each tensor has its place already
        writer.write(name, tensors[name])
    writer.write_index()
    shards = sorted(tmp_path.glob("*.safetensors"))
    assert len(shards) == 3 and shards[0].name == "model-00001-of-00003.safetensors"
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert [index["weight_map"][n][6:11] for n in tensors] == ["00001", "00002"] + ["00003"] * 4
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    seen = {}
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            for name in f.keys():
                assert index["weight_map"][name] == shard.name
                seen[name] = f.get_tensor(name)
    assert seen.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert seen[name].dtype == tensor.dtype and torch.equal(seen[name], tensor), name
    reader = CheckpointReader(tmp_path)
    assert all(torch.equal(reader.read(n), t) for n, t in tensors.items())
    assert writer.matches_files_on_disk()


def test_one_shard_is_model_safetensors_and_the_layout_is_deterministic(tmp_path):
    tensors = random_tensors()
    plan = [PlannedTensor(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    for folder in (tmp_path / "a", tmp_path / "b"):
        writer = ShardedWriter(folder, plan, parse_size("5GB"))
        writer.create()
        for name, tensor in tensors.items():
            writer.write(name, tensor)
        writer.write_index()
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["model.safetensors"]
    assert (tmp_path / "a/model.safetensors").read_bytes() == (tmp_path / "b/model.safetensors").read_bytes()
    loaded = load_file(str(tmp_path / "a/model.safetensors"))
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())


def test_writer_refuses_a_tensor_that_breaks_the_layout(tmp_path):
    writer = ShardedWriter(tmp_path, [PlannedTensor("w", torch.float32, (2, 2))], 10**6)
    writer.create()
    with pytest.raises(ValueError, match="expected torch.float32 \\[2, 2\\]"):
        writer.write("w", torch.zeros(2, 3))
    with pytest.raises(ValueError, match="not part of this checkpoint's layout"):
        writer.write("v", torch.zeros(2, 2))


@pytest.mark.parametrize(
    "text, size", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), ("100", 100), ("1.5kb", 1500)]
)
def test_parse_size(text, size):
    assert parse_size(text) == size


def test_parse_size_refuses_nonsense():
    with pytest.raises(ValueError, match="unknown size"):
        parse_size("five gigs")


@pytest.fixture
def sharded_tiny(tmp_path):
    import transformers

    src = save_tiny_model("llama", tmp_path / "src")
    model = transformers.AutoModelForCausalLM.from_pretrained(src)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="2MB")
    for f in src.glob("tokenizer*"):
        (tmp_path / "sharded" / f.name).write_bytes(f.read_bytes())
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    return tmp_path / "sharded"


def test_truncated_shard_names_the_file_and_tensor(sharded_tiny):
    shard = sorted(sharded_tiny.glob("*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=rf"{shard.name} is truncated: tensor \S+ ends at byte"):
        CheckpointReader(sharded_tiny)


def test_corrupted_header_is_named(sharded_tiny):
    shard = sorted(sharded_tiny.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[8:20] = b"\xff" * 12
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{shard.name} is corrupted: its header is not valid JSON"):
        CheckpointReader(sharded_tiny)


def test_missing_shard_named_by_the_index(sharded_tiny):
    shard = sorted(sharded_tiny.glob("*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"lists {shard.name} \(holding \S+ and others\) but .* does not exist"):
        CheckpointReader(sharded_tiny)


def test_tensor_whose_shape_disagrees_with_the_config(tmp_path):
    src = save_tiny_model("llama", tmp_path / "src")
    tensors = load_file(str(src / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(64, 64)
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError,
        match=r"model.safetensors: tensor model.layers.1.mlp.up_proj.weight has shape "
        r"\[64, 64\] but the config implies \[128, 64\]",
    ):
        LayeredModel.from_folder(src)


def test_a_truncated_checkpoint_is_a_one_line_cli_error(sharded_tiny, tmp_path, capsys):
    shard = sorted(sharded_tiny.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:50])
    for argv in (
        ["export", "vllm", str(sharded_tiny), str(tmp_path / "v"), "--no-vllm-check"],
        ["prune", "--model", str(sharded_tiny), "--out", str(tmp_path / "p"), "--no-evaluate"],
        ["inspect", str(sharded_tiny)],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and shard.name in err
        assert not (tmp_path / "v").exists() and not (tmp_path / "p").exists()
