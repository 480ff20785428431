"""Vision-language models: the language model is pruned on text run through it alone, the vision tower and the
projector stay byte-identical, and the folder loads as the same vision-language class. The streamed run must
write exactly what the same run computes on the whole model held in memory."""

import importlib.util

import pytest
import torch
import transformers

from apt.errors import InvalidInputError
from apt.folder.targets import targets_of_folder
from apt.models.checkpoint import CheckpointReader
from apt.models.loading import load_tokenizer
from apt.run import PruneJob, RunConfig, prune_model
from apt.run.calibration import Statistics
from apt.run.multimodal import image_files, image_text_batches
from apt.run.resident import calibrate_and_prune
from apt.solver import prune_layer
from apt.solver.patterns import as_rows, is_nm_sparse
from apt.text.sources import load_text, token_windows
from exporters import export

from ..tiny_models import VLM_CONFIGS, save_images, save_tiny_model, save_tiny_vlm_with_processor

RUN = RunConfig(batch_size=2)
FAST = dict(num_calibration_samples=4, max_seq_length=32, num_eval_windows=2)


def load_whole(folder):
    return transformers.AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("family", sorted(VLM_CONFIGS))
def test_a_vision_language_model_prunes_its_language_model_only(tmp_path, family):
    src = save_tiny_model(family, tmp_path / "src")
    out = tmp_path / "out"
    report = prune_model(PruneJob(model=str(src), out=str(out), run=RUN, **FAST))
    pruned = [r for r in report["layers"] if not r["skipped"]]
    assert len(pruned) == 14 and all(r["nm_valid"] for r in pruned)  # q, k, v, o, gate, up, down × 2 blocks
    accuracy = report["accuracy"]  # perplexity of the language model on held-out text, dense and pruned
    assert accuracy["metric"] == "perplexity"
    assert all(0 < accuracy[k]["perplexity"] < float("inf") for k in ("dense", "pruned"))
    assert report["vision"] == {"pruned": False}
    card = (out / "README.md").read_text()
    assert 'pipeline_tag: "image-text-to-text"' in card and "vision tower and projector are dense" in card

    model = load_whole(src)
    decoder = model.get_decoder()
    windows = token_windows(load_text("stdlib").calibration, load_tokenizer(src), 4, 32, 0)
    calibrate_and_prune(model, windows, RUN)
    reloaded = load_whole(out)
    assert type(reloaded) is type(model)
    state, written = model.state_dict(), reloaded.state_dict()
    assert state.keys() == written.keys()
    for name in state:
        assert torch.equal(state[name], written[name]), name
    with torch.no_grad():
        ids = windows[:2]
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-5)

    # every target is a Linear of the language model, 2:4 along its input; every other tensor is untouched
    source, output = CheckpointReader(src), CheckpointReader(out)
    assert output.names() == source.names()
    targets = {r["tensor"] for r in pruned}  # the checkpoint's names (Gemma 3 keeps language_model.model.…)
    language = {n for n, p in model.named_parameters() if any(p is q for q in decoder.parameters())}
    assert {f"{r['name']}.weight" for r in pruned} <= language
    vision = [n for n in source.names() if any(w in n for w in ("vision", "visual", "projector", "connector"))]
    assert vision and not set(vision) & targets
    for name in source.names():
        if name in targets:
            assert is_nm_sparse(as_rows(output.read(name)), 2, 4), name
        else:
            assert torch.equal(source.read(name), output.read(name)), f"{name} is not a pruning target but changed"

    # the vLLM export carries the whole model and loads as the same class; where transformers has no causal LM
    # class for the family, the ONNX export (a traced causal LM) refuses it with what to do
    manifest = export("vllm", out, tmp_path / "vllm", dtype="float16", vllm_check=False)
    assert manifest["pattern_check"]["all_valid"] and CheckpointReader(tmp_path / "vllm").names() == source.names()
    assert type(load_whole(tmp_path / "vllm")) is type(model)
    if family != "gemma3" and importlib.util.find_spec("onnx"):  # .venv-tf5pin holds no ONNX packages
        with pytest.raises(InvalidInputError, match="vision-language model.: export vllm"):
            export("onnx", out, tmp_path / "onnx")


@pytest.mark.parametrize("family", ["llava", "gemma3"])
def test_the_vision_tower_and_projector_are_pruned_on_images_when_asked(tmp_path, family):
    """--prune-vision with --calibration-images: the vision blocks, then the Linears after them, then the language
    model on what the pruned vision part gives it; the streamed run writes what the in-memory run computes."""
    src = save_tiny_vlm_with_processor(family, tmp_path / "src")
    images = save_images(tmp_path / "images", 3)
    run = RunConfig(batch_size=2, vision=True)
    out = tmp_path / "out"
    job = PruneJob(model=str(src), out=str(out), run=run, calibration_images=str(images), **FAST)
    report = prune_model(job)

    model = load_whole(src)
    vision_path = report["vision"]["blocks"]
    assert vision_path == "model.vision_tower.encoder.layers" and report["data"]["calibration_images"] == 3
    vision = [r for r in report["layers"] if r["name"].startswith(vision_path)]
    language = [r for r in report["layers"] if r["name"].startswith("model.language_model.")]
    assert len(vision) == 12 and all(r["nm_valid"] for r in vision)  # q, k, v, out, fc1, fc2 × 2 blocks
    assert len(language) == 14 and all(r["nm_valid"] for r in language)
    tail = [r for r in report["layers"] if r not in vision and r not in language]
    if family == "llava":  # the projector's two Linears, pruned on what the pruned tower gives them
        assert [r["name"] for r in tail] == [f"model.multi_modal_projector.linear_{i}" for i in (1, 2)]
        assert all(r["nm_valid"] for r in tail)
    else:  # Gemma 3's projection matrix is no Linear: it stays dense, and the report says so
        assert tail == []
        assert "model.multi_modal_projector.mm_input_projection_weight" in report["vision"]["matrices_kept_dense"]
    assert "model.vision_tower.embeddings.patch_embedding.weight" in report["vision"]["matrices_kept_dense"]
    card = (out / "README.md").read_text()
    assert "each with one of 3 images" in card and "the vision tower's 2 blocks" in card

    # the same run on the model held in memory, on the same image+text samples
    tokenizer = load_tokenizer(src)
    windows = token_windows(load_text("stdlib").calibration, tokenizer, 4, 32, 0)
    batches = image_text_batches(src, images, windows, tokenizer)
    assert len(batches) == 4 and all("pixel_values" in b for b in batches)
    calibrate_and_prune(model, batches, run)
    reloaded = load_whole(out)
    state, written = model.state_dict(), reloaded.state_dict()
    assert state.keys() == written.keys()
    for name in state:
        assert torch.equal(state[name], written[name]), name
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batches[0]).logits, model(**batches[0]).logits, rtol=0, atol=1e-5)

    source, output = CheckpointReader(src), CheckpointReader(out)
    targets = {r["tensor"] for r in report["layers"] if not r["skipped"]}
    found = targets_of_folder(out)  # what every exporter reads: a check on text alone expects no vision layer
    assert set(found.tensors) == targets
    assert found.vision == {r["tensor"] for r in report["layers"] if not r["skipped"] and r not in language}
    for name in source.names():
        if name in targets:
            assert is_nm_sparse(as_rows(output.read(name)), 2, 4), name
        else:
            assert torch.equal(source.read(name), output.read(name)), f"{name} is not a pruning target but changed"


def test_image_calibration_is_refused_where_it_cannot_run(tmp_path):
    with pytest.raises(InvalidInputError, match="--prune-vision needs --calibration-images"):
        PruneJob(model="x", out="y", run=RunConfig(vision=True))
    images = save_images(tmp_path / "images", 1)
    llama = save_tiny_model("llama", tmp_path / "llama")
    with pytest.raises(InvalidInputError, match="llama model, not a vision-language model"):
        prune_model(PruneJob(model=str(llama), out=str(tmp_path / "o"), calibration_images=str(images), **FAST))
    with pytest.raises(InvalidInputError, match="no image in it"):
        image_files(tmp_path)
    llava = save_tiny_model("llava", tmp_path / "llava")  # no processor saved
    with pytest.raises(InvalidInputError, match="processor"):
        prune_model(PruneJob(model=str(llava), out=str(tmp_path / "o"), calibration_images=str(images), **FAST))
    assert not (tmp_path / "o").exists()


def qwen2_vl_image_batches(config, count: int) -> list[dict]:
    """Qwen2-VL inputs as its processor makes them (patches, grid, one image token per merged 2×2 patches, the
    token types its multimodal rotary positions read), built here: its processor needs torchvision's video one."""
    from PIL import Image

    images = transformers.Qwen2VLImageProcessor(
        min_pixels=32 * 32, max_pixels=64 * 64, patch_size=8, merge_size=2, temporal_patch_size=2
    )
    generator = torch.Generator().manual_seed(0)
    batches = []
    for i in range(count):
        pixels = torch.randint(0, 256, (32 + 8 * i, 40, 3), generator=generator, dtype=torch.uint8)
        inputs = images(images=[Image.fromarray(pixels.numpy())], return_tensors="pt")
        tokens = int(inputs["image_grid_thw"].prod()) // 4
        text = torch.randint(1000, 2000, (20,), generator=generator)
        ids = torch.cat(
            [torch.tensor([config.vision_start_token_id]), torch.full((tokens,), config.image_token_id), text]
        )
        batches.append(
            {"input_ids": ids[None], "mm_token_type_ids": (ids == config.image_token_id).long()[None]} | inputs
        )
    return batches


def test_qwen2_vl_vision_blocks_are_pruned_on_their_patches():
    """Qwen2-VL's vision blocks take unbatched patches with cu_seqlens; block 0's qkv is exactly the solver's answer
    on the Hessian of the patch embeddings it reads, and everything outside the targets is untouched."""
    pytest.importorskip("PIL")
    torch.manual_seed(0)
    model = transformers.AutoModelForImageTextToText.from_config(VLM_CONFIGS["qwen2_vl"]()).eval()
    batches = qwen2_vl_image_batches(model.config, 3)
    qkv = model.model.visual.blocks[0].attn.qkv
    stat = Statistics()
    handle = qkv.register_forward_hook(lambda _m, inputs, _o: stat.add(inputs[0]))
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    handle.remove()
    expected = prune_layer(qkv.weight.detach().clone(), stat.hessian, config=RUN.solver).weight
    before = {k: v.clone() for k, v in model.state_dict().items()}

    run = RunConfig(batch_size=1, vision=True)
    records = calibrate_and_prune(model, batches, run)["layers"]
    assert torch.equal(qkv.weight, expected)
    names = [r["name"] for r in records if not r["skipped"]]
    assert names[:8] == [
        f"model.visual.blocks.{b}.{m}" for b in (0, 1) for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    ]
    assert names[8:10] == ["model.visual.merger.mlp.0", "model.visual.merger.mlp.2"] and len(names) == 24
    for name, tensor in model.state_dict().items():
        if name.removesuffix(".weight") in names:
            assert is_nm_sparse(tensor, 2, 4), name
        else:
            assert torch.equal(tensor, before[name]), name
    with torch.no_grad():
        assert torch.isfinite(model(**batches[0]).logits).all()
