"""The streaming run and evaluation (one block in memory): shards, dtypes and activations on disk. Every
family against the in-memory computation is in ``test_families``."""

import torch
import transformers

from apt.models.checkpoint import CheckpointReader
from apt.run import PruneJob, prune_model
from apt.solver.patterns import is_nm_sparse

from ..tiny_models import save_tiny_model

FAST = dict(num_calibration_samples=4, max_seq_length=32, evaluate=False)


def load_whole(folder, family):
    cls = transformers.AutoModel if family == "bert" else transformers.AutoModelForCausalLM
    return cls.from_pretrained(folder, dtype=torch.float32).eval()


def test_sharded_source_and_sharded_output(tmp_path):
    src = save_tiny_model("llama", tmp_path / "src")
    sharded = tmp_path / "sharded"
    load_whole(src, "llama").save_pretrained(sharded, max_shard_size="2MB")
    for f in src.glob("tokenizer*"):
        (sharded / f.name).write_bytes(f.read_bytes())
    assert (sharded / "model.safetensors.index.json").is_file()
    prune_model(PruneJob(model=str(src), out=str(tmp_path / "single"), **FAST))
    prune_model(PruneJob(model=str(sharded), out=str(tmp_path / "out"), max_shard_size="1MB", **FAST))
    shards = sorted((tmp_path / "out").glob("*.safetensors"))
    assert len(shards) >= 3 and (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert all(p.stat().st_size <= 10**6 or len(CheckpointReader(tmp_path / "out").names()) for p in shards)
    single, out = CheckpointReader(tmp_path / "single"), CheckpointReader(tmp_path / "out")
    assert set(single.names()) == set(out.names())
    assert all(torch.equal(single.read(n), out.read(n)) for n in single.names())
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert is_nm_sparse(reloaded.model.layers[1].mlp.down_proj.weight.data)


def test_a_bfloat16_checkpoint_stays_bfloat16(tmp_path):
    src = save_tiny_model("llama", tmp_path / "src")
    bf16 = tmp_path / "bf16"
    load_whole(src, "llama").to(torch.bfloat16).save_pretrained(bf16)
    for f in src.glob("tokenizer*"):
        (bf16 / f.name).write_bytes(f.read_bytes())
    report = prune_model(PruneJob(model=str(bf16), out=str(tmp_path / "out"), **FAST))
    out = CheckpointReader(tmp_path / "out")
    assert {out.info(n).dtype for n in out.names()} == {torch.bfloat16}
    for record in report["layers"]:
        weight = out.read(record["tensor"])
        assert is_nm_sparse(weight) and not torch.signbit(weight[weight == 0]).any()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto")
    assert reloaded.dtype == torch.bfloat16


def test_activations_on_disk_give_the_same_checkpoint(tmp_path):
    src = save_tiny_model("llama", tmp_path / "src")
    prune_model(PruneJob(model=str(src), out=str(tmp_path / "host"), **FAST))
    spill = tmp_path / "spill"
    prune_model(
        PruneJob(model=str(src), out=str(tmp_path / "disk"), activations="disk", activation_dir=str(spill), **FAST)
    )
    host, disk = CheckpointReader(tmp_path / "host"), CheckpointReader(tmp_path / "disk")
    assert all(torch.equal(host.read(n), disk.read(n)) for n in host.names())
    assert spill.is_dir() and not list(spill.iterdir())  # the activation file is gone with the run
    half = prune_model(PruneJob(model=str(src), out=str(tmp_path / "bf16-act"), activation_dtype="bfloat16", **FAST))
    assert half["totals"]["all_nm_valid"]
