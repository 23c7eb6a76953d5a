"""Ask a fine-tuned model something, for a person.

    soho predict --checkpoint VQA_RUN --image cat.png --text "what colour is the circle?"
    soho predict --checkpoint NLVR2_RUN --image left.png --image2 right.png --text "both images have a square"
    soho predict --checkpoint VE_RUN --image scene.png --text "there is a red circle"
    soho predict --checkpoint RETRIEVAL_RUN --images DIR --text "a blue square" --top-k 5

The task comes from the checkpoint. Missing files, unreadable images and a checkpoint of
another kind are clear errors before the model runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import UnidentifiedImageError

from soho_core.data.transforms import decode_image, pad_batch
from soho_core.tasks.catalog import DOWNSTREAM, get_task
from soho_core.train.checkpoint import load_checkpoint
from soho_core.train.engine import load_task_model

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def read_image(path: str, short_max: int, long_max: int) -> torch.Tensor:
    """uint8 (3, h, w) resized as in training; a clear error for a missing or unreadable file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"image {path!r} does not exist")
    try:
        return decode_image(p.read_bytes(), short_max, long_max)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ValueError(f"image {path!r} cannot be read as an image: {err}") from err


def checkpoint_task(checkpoint: str) -> str:
    kind = load_checkpoint(checkpoint).get("kind")
    if kind not in DOWNSTREAM:
        raise ValueError(f"checkpoint {checkpoint!r} is a {kind!r} checkpoint; predict needs one "
                         f"fine-tuned for {', '.join(DOWNSTREAM)} (soho finetune --task ...)")
    return kind


def predict(checkpoint: str, text: str, image: str | None = None, image2: str | None = None,
            images_dir: str | None = None, top_k: int = 5) -> dict[str, Any]:
    task_name = checkpoint_task(checkpoint)
    if not text.strip():
        raise ValueError("--text is empty")
    if task_name == "retrieval":
        if not images_dir:
            raise ValueError("a retrieval checkpoint ranks a folder of images: give --images DIR")
        if not Path(images_dir).is_dir():
            raise FileNotFoundError(f"--images {images_dir!r} is not a folder")
    elif not image:
        raise ValueError(f"a {task_name} checkpoint needs --image")
    if task_name == "nlvr2" and not image2:
        raise ValueError("an nlvr2 checkpoint compares two images: give --image and --image2")
    if task_name in ("vqa", "ve") and image2:
        raise ValueError(f"--image2 is only for nlvr2, and this is a {task_name} checkpoint")

    model, cfg, tok = load_task_model(get_task(task_name), checkpoint)
    size = (cfg.data.image_min, cfg.data.image_max)
    if task_name == "retrieval":
        from soho_core.tasks.retrieval import rank_images

        paths = sorted(p for p in Path(images_dir).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise ValueError(f"--images {images_dir!r} holds no {'/'.join(IMAGE_SUFFIXES)} files")
        pictures = [read_image(str(p), *size) for p in paths]
        ranked = rank_images(model, pictures, text, tok, cfg, top_k)
        return {"task": task_name, "text": text,
                "results": [{"image": str(paths[i]), "score": round(float(s), 4)} for i, s in ranked]}

    pictures = [read_image(image, *size)] + ([read_image(image2, *size)] if image2 else [])
    images, sizes = pad_batch(pictures, cfg.data.size_divisor)
    enc = tok([text], truncation=True, max_length=cfg.model.fusion.max_text_len, return_tensors="pt")
    with torch.no_grad():
        if task_name == "nlvr2":
            logits = model.logits(images, sizes, enc["input_ids"], enc["attention_mask"],
                                  torch.tensor([0]), torch.tensor([1]))
            prob = logits.softmax(1)[0, 1].item()
            return {"task": task_name, "text": text, "answer": prob >= 0.5,
                    "probability": round(prob if prob >= 0.5 else 1 - prob, 4)}
        logits = model.logits(images, sizes, enc["input_ids"], enc["attention_mask"], torch.tensor([0]))
    if task_name == "vqa":
        probs = logits.sigmoid()[0]
        best = int(probs.argmax())
        return {"task": task_name, "text": text, "answer": model.answer_vocab[best],
                "probability": round(float(probs[best]), 4)}
    from soho_core.tasks.ve import LABELS

    probs = logits.softmax(1)[0]
    best = int(probs.argmax())
    return {"task": task_name, "text": text, "answer": LABELS[best], "probability": round(float(probs[best]), 4)}
