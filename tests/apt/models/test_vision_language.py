"""Vision-language models: the language model is pruned on text run through it alone, the vision tower and the
projector stay byte-identical, and the folder loads as the same vision-language class. The streamed run must
write exactly what the same run computes on the whole model held in memory."""

import importlib.util

import pytest
import torch
import transformers

from apt.errors import InvalidInputError
from apt.models.checkpoint import CheckpointReader
from apt.models.loading import load_tokenizer
from apt.run import PruneJob, RunConfig, prune_model
from apt.run.sequential import calibrate_and_prune
from apt.solver.patterns import as_rows, is_nm_sparse
from apt.text.sources import load_text, token_windows
from exporters import export

from ..tiny_models import VLM_CONFIGS, save_tiny_model

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
