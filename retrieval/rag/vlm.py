"""A vision-language model from a local transformers directory (Qwen2-VL, LLaVA, MedGemma layouts).

Loaded with ``AutoProcessor`` + ``AutoModelForImageTextToText`` from a local path only. The
prompt is multi-image: the current study, the prior (when given), then reference cases' images,
followed by the reference reports and the instruction to cite (:mod:`retrieval.rag.prompting`).
Greedy decoding, so the same inputs give the same draft.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from retrieval._compat import ensure_torchvision
from retrieval.encoders.base import EncoderError
from retrieval.encoders.hf import _torch_device
from retrieval.encoders.preprocess import to_uint8_rgb
from retrieval.rag.prompting import SYSTEM, build_prompt, parse_generated
from retrieval.rag.types import Draft, DraftContext, DraftImages


class TransformersVLMGenerator:
    name = "transformers-vlm"

    def __init__(self, model_dir: str | Path, device: str = "cpu", max_new_tokens: int = 384,
                 max_reference_images: int = 3) -> None:
        path = Path(model_dir)
        if not (path / "config.json").is_file():
            raise EncoderError(f"VLM: {path} is not a local transformers model directory (no config.json)")
        ensure_torchvision()
        from transformers import AutoModelForImageTextToText, AutoProcessor
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.path = path
        self.device = _torch_device(device)
        self.processor = AutoProcessor.from_pretrained(str(path), local_files_only=True)
        model = AutoModelForImageTextToText.from_pretrained(str(path), local_files_only=True)
        self.model = model.to(self.device).eval()  # type: ignore[arg-type]
        self.max_new_tokens = max_new_tokens
        self.max_refs = max_reference_images

    def generate(self, ctx: DraftContext, images: DraftImages | None = None) -> Draft:
        import torch

        images = images or DraftImages()
        refs = images.references[: self.max_refs]
        pil = [to_uint8_rgb(i) for i in [*images.current, *images.prior[:1], *(r[1] for r in refs)]]
        prompt = build_prompt(ctx, len(images.current), min(1, len(images.prior)), [r[0] for r in refs])
        content = [{"type": "image"} for _ in pil] + [{"type": "text", "text": f"{SYSTEM}\n{prompt}"}]
        text = self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                  add_generation_prompt=True, tokenize=False)
        inputs = self.processor(images=pil or None, text=text, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        generated = self.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
        return parse_generated(generated, ctx, self.name)


def to_images(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    return [np.asarray(a, dtype=np.float32) for a in arrays]
