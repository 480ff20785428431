"""Image+text calibration for a vision-language model: each calibration sample is one user turn holding an
image from a local folder and the text of one calibration window, turned into model inputs by the
checkpoint's own processor (``AutoProcessor``: its image preprocessing and its image placeholder tokens).

The prompt is the processor's chat template applied to ``[image, text]`` where the checkpoint has one,
else the processor's image placeholder (the token it expands into the image's tokens) followed by the
text. Images are used in file-name order and reused in turn when there are fewer images than calibration
windows. Each sample is a batch of its own, so no sample is padded (a padded position would add to the
Hessians what the model never sees).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from apt.errors import InvalidInputError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


def image_files(folder: str | Path) -> list[Path]:
    """The images of ``folder`` (not recursive), in name order; refuses a folder without any."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidInputError(f"--calibration-images {folder}: not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise InvalidInputError(
            f"--calibration-images {folder}: no image in it ({', '.join(IMAGE_SUFFIXES)}); give a folder of images"
        )
    return files


def image_text_batches(
    model_folder: str | Path, images: str | Path, windows: torch.Tensor, tokenizer, trust_remote_code: bool = False
) -> list[dict[str, torch.Tensor]]:
    """One batch per calibration window ``[n, seq]`` (int64): the processor's inputs (``input_ids``,
    ``attention_mask``, ``pixel_values`` and whatever else the model takes) for the window's text with one
    image of ``images``."""
    try:
        from PIL import Image
    except ImportError as err:
        raise InvalidInputError("--calibration-images needs Pillow: pip install 'apt-sparse[vision]'") from err
    import transformers

    files = image_files(images)
    try:
        processor = transformers.AutoProcessor.from_pretrained(model_folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, ImportError, AttributeError) as err:
        # transformers' Qwen2-VL and SmolVLM processors build a video processor, which needs torchvision
        raise InvalidInputError(
            f"--calibration-images: transformers cannot build the processor of {model_folder} "
            f"({type(err).__name__}: {str(err)[:300]}); add the model's processor files to the folder (or install "
            "torchvision, which some processors need), or calibrate on text alone (without --calibration-images)"
        ) from err
    if not hasattr(processor, "image_processor"):
        raise InvalidInputError(
            f"--calibration-images: the processor of {model_folder} ({type(processor).__name__}) reads no images"
        )
    batches = []
    for i, window in enumerate(windows):
        path = files[i % len(files)]
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
        except OSError as err:
            raise InvalidInputError(f"--calibration-images: cannot read {path}: {err}") from err
        text = tokenizer.decode(window.tolist(), skip_special_tokens=True)
        inputs = processor(images=[image], text=[_prompt(processor, text)], return_tensors="pt")
        batches.append({k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)})
    log.info("calibrating on %d image+text samples (%d images from %s)", len(batches), len(files), images)
    return batches


def _prompt(processor, text: str) -> str:
    """A user turn with one image and ``text``, as the checkpoint's processor writes it."""
    if getattr(processor, "chat_template", None):
        turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return processor.apply_chat_template(turn, tokenize=False, add_generation_prompt=False)
    # Gemma 3's processor expands its begin-of-image token (what its image_token names from transformers 5.11 on)
    placeholder = getattr(processor, "boi_token", None) or getattr(processor, "image_token", None)
    if not placeholder:
        raise InvalidInputError(
            f"{type(processor).__name__} has neither a chat template nor an image token: the run cannot tell "
            "where an image goes in the prompt"
        )
    return f"{placeholder} {text}"
